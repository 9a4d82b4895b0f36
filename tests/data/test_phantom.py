"""The built-in phantom: deterministic, labels that follow the tissue maps, domains that differ
the way scanners do, and the nnU-Net v2 / MSD layout of docs/CONTRACTS.md."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from uda_tf.data import phantom

COARSE = 2.0  # spacing_scale for tests: same field of view, 1/8 of the voxels


@pytest.fixture(scope="module")
def subjects():
    return {d: phantom.make_subject(d, 0, seed=0, spacing_scale=COARSE) for d in phantom.DOMAINS}


def test_same_seed_gives_identical_arrays(subjects):
    again = phantom.make_subject("scanner_b", 0, seed=0, spacing_scale=COARSE)
    first = subjects["scanner_b"]
    np.testing.assert_array_equal(again.image, first.image)
    np.testing.assert_array_equal(again.label, first.label)
    np.testing.assert_array_equal(again.tissue, first.tissue)
    np.testing.assert_array_equal(again.affine, first.affine)


def test_other_seed_or_index_gives_other_subject(subjects):
    first = subjects["scanner_a"]
    for other in (phantom.make_subject("scanner_a", 0, seed=1, spacing_scale=COARSE),
                  phantom.make_subject("scanner_a", 1, seed=0, spacing_scale=COARSE)):
        assert other.image.shape == first.image.shape
        assert np.mean(other.image != first.image) > 0.5
        assert np.mean(other.label != first.label) > 0.01


def test_label_rule():
    tissue = np.array([[0.10, 0.20, 0.15],    # brain covers < half the voxel -> background
                       [0.30, 0.10, 0.20],    # CSF
                       [0.05, 0.50, 0.45],    # GM
                       [0.00, 0.20, 0.80]],   # WM
                      np.float32)
    np.testing.assert_array_equal(phantom.tissue_labels(tissue), [0, 1, 2, 3])


@pytest.mark.parametrize("domain", list(phantom.DOMAINS))
def test_labels_follow_tissue_maps(subjects, domain):
    s = subjects[domain]
    assert s.label.dtype == np.uint8 and s.image.dtype == np.int16
    assert s.tissue.shape == s.label.shape + (3,) and s.image.shape == s.label.shape
    np.testing.assert_array_equal(s.label, phantom.tissue_labels(s.tissue))
    counts = np.bincount(s.label.ravel(), minlength=4)
    brain = counts[1:].sum()
    assert 0.15 < brain / s.label.size < 0.6
    csf, gm, wm = counts[1:] / brain
    assert 0.02 < csf < 0.25 and 0.35 < gm < 0.75 and 0.2 < wm < 0.5


def _tissue_means(s):
    return [float(s.image[s.label == k].mean()) for k in (1, 2, 3)]


def test_domains_differ_like_scanners(subjects):
    csf, gm, wm = _tissue_means(subjects["scanner_a"])
    assert csf < gm < wm                                   # T1-like
    csf, gm, wm = _tissue_means(subjects["t2like"])
    assert wm < gm < csf                                   # inverted, T2-like
    zooms = {d: nib.affines.voxel_sizes(s.affine) / COARSE for d, s in subjects.items()}
    np.testing.assert_allclose(zooms["scanner_a"], [1.2, 1.2, 1.2])
    np.testing.assert_allclose(zooms["scanner_b"], [1.0, 1.0, 3.0])
    np.testing.assert_allclose(zooms["lowfield"], [1.4, 1.4, 5.0])
    codes = {d: "".join(nib.aff2axcodes(s.affine)) for d, s in subjects.items()}
    assert codes["scanner_a"] == "RAS" and codes["scanner_b"] == "LPS"
    assert codes["t2like"] == "LIP" and codes["lowfield"] == "LAI"
    # Stored intensity ranges: 0..1000 versus an offset 0..4095 scale and an offset 11-bit one.
    assert subjects["scanner_a"].image.max() <= 1000
    assert subjects["scanner_b"].image.min() >= 400 and subjects["scanner_b"].image.max() > 2000
    assert subjects["lowfield"].image.min() >= 100 and subjects["lowfield"].image.max() <= 2047


def _contrast_and_noise(s, domain):
    """(GM/WM contrast, noise), both relative to the WM mean on the unit intensity scale.
    Noise: std of the differences between neighbouring WM voxels along the first axis over
    sqrt(2): the added noise is white, the tissue signal and bias field are smooth."""
    params = phantom.DOMAINS[domain]
    image = (s.image.astype(np.float64) - params.offset) / params.gain
    gm, wm = (image[s.label == k].mean() for k in (2, 3))
    in_wm = (s.label[1:] == 3) & (s.label[:-1] == 3)
    noise = (image[1:] - image[:-1])[in_wm].std() / np.sqrt(2.0)
    return (wm - gm) / wm, noise / wm


def test_lowfield_has_flatter_contrast_and_more_noise_than_scanner_a(subjects):
    contrast_a, noise_a = _contrast_and_noise(subjects["scanner_a"], "scanner_a")
    contrast_low, noise_low = _contrast_and_noise(subjects["lowfield"], "lowfield")
    assert 0.0 < contrast_low < 0.75 * contrast_a      # still T1-like, but compressed
    assert noise_low > 1.5 * noise_a
    # The brain's intensity spread (bias field and noise) is wider too.
    def spread(s, domain):
        params = phantom.DOMAINS[domain]
        wm = (s.image[s.label == 3].astype(np.float64) - params.offset) / params.gain
        return wm.std() / wm.mean()
    assert spread(subjects["lowfield"], "lowfield") > 1.5 * spread(subjects["scanner_a"],
                                                                   "scanner_a")


def test_stored_orientation_is_only_a_relabelling(monkeypatch):
    """Same subject stored as RAS and as PIL: back in RAS, arrays and affine must match."""
    ras = phantom.make_subject("scanner_a", 2, seed=0, spacing_scale=COARSE)
    pil = dataclasses.replace(phantom.DOMAINS["scanner_a"], orientation="PIL")
    monkeypatch.setitem(phantom.DOMAINS, "scanner_a", pil)
    other = phantom.make_subject("scanner_a", 2, seed=0, spacing_scale=COARSE)
    assert nib.aff2axcodes(other.affine) == ("P", "I", "L")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(other.image, other.affine))
    np.testing.assert_allclose(canonical.affine, ras.affine, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), ras.image)


def test_generate_writes_msd_layout_independent_of_workers(tmp_path):
    path = phantom.generate(tmp_path, domains=("scanner_a", "t2like"), subjects_per_domain=2,
                            seed=5, workers=2, spacing_scale=3.0)
    assert Path(path) == tmp_path / "dataset.json"
    dataset = json.loads(Path(path).read_text())
    assert dataset["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    assert dataset["numTraining"] == 4 and dataset["file_ending"] == ".nii.gz"
    assert set(dataset["channel_names"]) == {"0"}
    assert dataset["domains"] == {"scanner_a": ["scanner_a_000", "scanner_a_001"],
                                  "t2like": ["t2like_000", "t2like_001"]}
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert not [n for n in written if n.startswith(".")]  # no temporary left
    for case in ("scanner_a_001", "t2like_000"):
        image = nib.load(tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        label = nib.load(tmp_path / "labelsTr" / f"{case}.nii.gz")
        assert label.get_data_dtype() == np.uint8
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, label.affine)
        # Written by a worker process, equal to the same subject rendered here.
        domain, index = case.rsplit("_", 1)
        here = phantom.make_subject(domain, int(index), seed=5, spacing_scale=3.0)
        np.testing.assert_array_equal(np.asarray(image.dataobj), here.image)
        np.testing.assert_array_equal(np.asarray(label.dataobj), here.label)
        np.testing.assert_allclose(image.affine, here.affine, atol=1e-5)


def test_unknown_domain_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scanner_z.*scanner_a"):
        phantom.generate(tmp_path, domains=("scanner_a", "scanner_z"), subjects_per_domain=1)
    with pytest.raises(ValueError, match="scanner_z"):
        phantom.make_subject("scanner_z", 0)
    result = subprocess.run(
        [sys.executable, "-m", "uda_tf.cli.phantom", f"--output_dir={tmp_path}",
         "--domains=scanner_a,scanner_z"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--domains" in result.stderr and "scanner_z" in result.stderr
    assert ", ".join(phantom.DOMAINS) in result.stderr
    assert "lowfield" in result.stderr
    assert not (tmp_path / "dataset.json").exists()


def test_missing_nilearn_names_the_file(monkeypatch):
    monkeypatch.setattr(phantom.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="mni_icbm152_gm_tal_nlin_sym_09a_converted"):
        phantom.template_path("gm")


def test_rerun_with_fewer_cases_leaves_a_consistent_dataset(tmp_path):
    phantom.generate(tmp_path, domains=("scanner_a", "scanner_b"), subjects_per_domain=2,
                     workers=1, spacing_scale=4.0)
    (tmp_path / "imagesTr" / "notes.txt").write_text("not ours")
    phantom.generate(tmp_path, domains=("scanner_b",), subjects_per_domain=1, workers=1,
                     spacing_scale=4.0)
    images = sorted(p.name for p in (tmp_path / "imagesTr").iterdir())
    labels = sorted(p.name for p in (tmp_path / "labelsTr").iterdir())
    assert images == ["notes.txt", "scanner_b_000_0000.nii.gz"]
    assert labels == ["scanner_b_000.nii.gz"]
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert dataset["domains"] == {"scanner_b": ["scanner_b_000"]}
    assert dataset["numTraining"] == 1


def test_cli_writes_a_dataset_and_a_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "uda_tf.cli.phantom", f"--output_dir={tmp_path}",
         "--domains=scanner_a", "--subjects_per_domain=1", "--workers=1", "--seed=3"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "scanner_a: 1 cases" in result.stdout and "wrote" in result.stdout
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 1
    image = nib.load(tmp_path / "imagesTr" / "scanner_a_000_0000.nii.gz")
    np.testing.assert_array_equal(np.asarray(image.dataobj),
                                  phantom.make_subject("scanner_a", 0, seed=3).image)


def test_paired_rendering_is_the_same_anatomy_with_the_other_scanners_look(subjects):
    a = subjects["scanner_a"]
    same = phantom.make_subject("scanner_a", 0, seed=0, spacing_scale=COARSE,
                                contrast_of="scanner_a")
    np.testing.assert_array_equal(same.image, a.image)  # its own look: the subject itself
    paired = phantom.make_subject("scanner_a", 0, seed=0, spacing_scale=COARSE,
                                  contrast_of="t2like")
    # same anatomy, pose and grid...
    np.testing.assert_array_equal(paired.label, a.label)
    np.testing.assert_array_equal(paired.affine, a.affine)
    assert paired.case_id == a.case_id
    # ...recorded with t2like's contrast (CSF brightest, WM darkest) and scale
    means = {k: paired.image[paired.label == v].mean() for k, v in phantom.LABELS.items()
             if k != "background"}
    assert means["CSF"] > means["GM"] > means["WM"]
    assert paired.image.max() > a.image.max()  # t2like stores up to 3000, scanner_a 1000
