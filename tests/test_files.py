"""uda_tf/files.py: names stay names, one writer per output, --overwrite removes only ours."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from uda_tf import files


@pytest.mark.parametrize("bad", ["../victim", "/abs/path", "a/b", "..", ".", "", "a\\b",
                                 "x\x00y", "-rf"])
def test_check_name_refuses_paths_naming_the_flag(bad):
    with pytest.raises(ValueError, match="--run_name"):
        files.check_name(bad, "--run_name")


@pytest.mark.parametrize("good", ["run1", "grl-2026.11.30", "a_b", "café", "..x", "x.."])
def test_check_name_keeps_plain_names(good):
    assert files.check_name(good, "--run_name") == good


def test_inside_follows_symlinks(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok").mkdir()
    os.symlink(tmp_path, root / "escape")
    assert files.inside(str(root), str(root / "ok"), "--x")
    with pytest.raises(ValueError, match="outside"):
        files.inside(str(root), str(root / "escape" / "victim"), "--x")


def test_remove_created_refuses_foreign_directories(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(files.NotOurDirectoryError, match="not created by uda_tf"):
        files.remove_created(str(foreign))
    assert (foreign / "precious.txt").read_text() == "keep me"
    ours = tmp_path / "ours"
    ours.mkdir()
    files.mark_created(str(ours), "run")
    files.remove_created(str(ours))
    assert not ours.exists()


def test_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from uda_tf.files import OutputLock
            with OutputLock({str(out)!r}, "prepare --output_dir"):
                print("locked", flush=True)
                sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.OutputLockedError, match=f"pid {holder.pid}"):
            files.OutputLock(str(out), "prepare --output_dir").acquire()
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    # Released (and its file removed) when the holder is done; a new writer gets it.
    assert not (out / files.LOCK_FILE).exists()
    with files.OutputLock(str(out), "x"):
        info = json.loads((out / files.LOCK_FILE).read_text())
        assert info["pid"] == os.getpid()


def test_lock_of_a_killed_holder_is_free(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from uda_tf.files import OutputLock
            OutputLock({str(out)!r}, "x").acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=30)
    assert (out / files.LOCK_FILE).exists()  # left behind by the crash, but not held
    with files.OutputLock(str(out), "x"):
        pass


def test_lock_nests_within_one_process(tmp_path):
    with files.OutputLock(str(tmp_path), "a"):
        with files.OutputLock(str(tmp_path), "b"):
            pass
        assert (tmp_path / files.LOCK_FILE).exists()
    assert not (tmp_path / files.LOCK_FILE).exists()


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with files.atomic_write(target) as f:
            f.write("half of the new")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary left behind
    with files.atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["result.json"]


def test_atomic_write_gives_path_writers_a_temporary_with_the_extension(tmp_path):
    target = tmp_path / "best.weights.h5"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        with files.atomic_write(target, None) as tmp:
            # Keras, nibabel and matplotlib choose the format by the extension.
            assert tmp.endswith(".weights.h5") and os.path.dirname(tmp) == str(tmp_path)
            assert files.is_partial(tmp) and not files.is_partial(target.name)
            with open(tmp, "wb") as f:
                f.write(b"torn")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["best.weights.h5"]
    with files.atomic_write(tmp_path / "case_001.nii.gz", None) as tmp:
        assert tmp.endswith(".nii.gz")
        with open(tmp, "wb") as f:
            f.write(b"scan")
    assert sorted(os.listdir(tmp_path)) == ["best.weights.h5", "case_001.nii.gz"]


def test_check_created_is_the_one_ownership_check(tmp_path):
    foreign = tmp_path / "run"
    foreign.mkdir()
    with pytest.raises(files.NotOurDirectoryError,
                       match=r"refuses to remove .*run.*another --run_name\.$"):
        files.check_created(str(foreign), other="--run_name")
    files.mark_created(str(foreign), "run")
    files.check_created(str(foreign))
    (tmp_path / "link").symlink_to(foreign)
    with pytest.raises(files.NotOurDirectoryError, match="a link or a file"):
        files.check_created(str(tmp_path / "link"))


def test_add_unique_refuses_two_items_under_one_case_id():
    found = {}
    files.add_unique(found, "case", "a.nii.gz", lambda first, again: ValueError(first + again))
    files.add_unique(found, "case", "a.nii.gz", lambda first, again: ValueError(first + again))
    with pytest.raises(ValueError, match="a.nii.gzb.nii.gz"):
        files.add_unique(found, "case", "b.nii.gz", lambda first, again: ValueError(first + again))
    assert found == {"case": "a.nii.gz"}
