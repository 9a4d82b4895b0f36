"""Every kind of bad input gets its own message naming the file; --skip_bad_cases goes on and
reports what it left out."""
import gzip
import json
import os
import re

import nibabel as nib
import numpy as np
import pytest

from tests.data import raw_layouts as raw
from uda_tf.data import prepare as prepare_mod
from uda_tf.data import io, layouts, preprocess

CONFIG = preprocess.PreprocessConfig(spacing=(1.5, 1.5, 2.0), size=(8, 8))


def _case(tmp_path, image=None, label=None, image_affine=raw.AFFINE, label_affine=raw.AFFINE,
          name="case"):
    good_image, good_label = raw.volume(0)
    image_path = str(tmp_path / f"{name}_img.nii.gz")
    label_path = str(tmp_path / f"{name}_lab.nii.gz")
    raw.save_nifti(image_path, good_image if image is None else image, image_affine)
    raw.save_nifti(label_path, good_label if label is None else label, label_affine)
    return layouts.CaseRecord(name, "d", image_path, label_path)


def _message(case, label_values=3):
    with pytest.raises((io.NiftiError, FileNotFoundError)) as info:
        preprocess.prepare_case(case, CONFIG, label_values)
    return str(info.value)


def test_each_bad_input_has_its_own_message(tmp_path):
    image, label = raw.volume(0)
    messages = {}
    messages["shape"] = _message(_case(tmp_path, label=label[:-1], name="shape"))
    shifted = raw.AFFINE.copy()
    shifted[0, 3] = 4.0
    messages["affine"] = _message(_case(tmp_path, label_affine=shifted, name="affine"))
    nan = image.copy()
    nan[1, 2, 3] = np.nan
    nan[2, 2, 2] = np.inf
    messages["nan"] = _message(_case(tmp_path, image=nan, name="nan"))
    messages["4d"] = _message(_case(tmp_path, image=np.stack([image, image], -1), name="fourd"))
    outside = label.copy()
    outside[0, 0, 0] = 7
    messages["values"] = _message(_case(tmp_path, label=outside, name="values"))
    messages["empty"] = _message(_case(tmp_path, image=np.zeros_like(image), name="empty"))
    junk = _case(tmp_path, name="junk")
    with open(junk.image_path, "wb") as f:
        f.write(b"this is not a NIfTI file")
    messages["unreadable"] = _message(junk)
    truncated = _case(tmp_path, name="truncated")
    data = open(truncated.image_path, "rb").read()
    with open(truncated.image_path, "wb") as f:
        f.write(data[: len(data) // 2])  # the gzip stream ends mid-voxels
    messages["truncated"] = _message(truncated)
    missing = _case(tmp_path, name="missing")
    os.remove(missing.label_path)
    messages["missing_file"] = _message(missing)
    float_label = _case(tmp_path, label=np.where(label > 0, np.nan, 0).astype(np.float32),
                        name="nanlabel")
    messages["nan_label"] = _message(float_label)

    expected = {
        "shape": r"label .*shape_lab\.nii\.gz has shape \(9, 12, 6\) but its image "
                 r".*shape_img\.nii\.gz has shape \(10, 12, 6\)",
        "affine": r"label .*affine_lab\.nii\.gz has a different affine from its image "
                  r".*affine_img\.nii\.gz \(largest difference 4 mm\)",
        "nan": r"image .*nan_img\.nii\.gz contains 2 NaN or infinite voxels",
        "4d": r"expected a 3D volume in .*fourd_img\.nii\.gz, got shape \(10, 12, 6, 2\)",
        "values": r"label .*values_lab\.nii\.gz has values \[7\] outside the declared "
                  r"labels 0\.\.2",
        "empty": r"image .*empty_img\.nii\.gz is empty: every voxel is 0",
        "unreadable": r"cannot read NIfTI file .*junk_img\.nii\.gz",
        "truncated": r"cannot read voxel data of .*truncated_img\.nii\.gz \(truncated or corrupt",
        "missing_file": r"NIfTI file not found: .*missing_lab\.nii\.gz",
        "nan_label": r"label file .*nanlabel_lab\.nii\.gz contains NaN or infinite values",
    }
    for key, pattern in expected.items():
        assert re.search(pattern, messages[key]), (key, messages[key])
    assert len(set(messages.values())) == len(messages)


def test_truncated_picture_and_gzip_are_named(tmp_path):
    raw.make_stare(tmp_path)
    path = tmp_path / "stare-images" / "im0003.ppm.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) // 3]))
    with pytest.raises(io.NiftiError, match=r"cannot read image file .*im0003\.ppm\.gz"):
        io.read_volume(str(path))


def _broken_msd(root):
    """tests/helpers' MSD dataset with one case of each layout- and voxel-level problem."""
    from tests.helpers import make_msd
    make_msd(root)
    os.remove(root / "labelsTr" / "a_001.nii.gz")  # image without its label
    bad = nib.load(str(root / "labelsTr" / "b_000.nii.gz"))
    nib.save(nib.Nifti1Image(np.full(bad.shape, 9, np.uint8), bad.affine),
             str(root / "labelsTr" / "b_000.nii.gz"))  # values outside the declared set
    (root / "imagesTr" / "b_001_0000.nii.gz").write_bytes(b"garbage")  # unreadable


def test_skip_bad_cases_reports_and_goes_on(tmp_path):
    _broken_msd(tmp_path / "raw")
    with pytest.raises(layouts.LayoutError, match=r"a_001_0000\.nii\.gz has no label.*"
                                                  r"--skip_bad_cases"):
        prepare_mod.prepare(str(tmp_path / "raw"), str(tmp_path / "o1"), size=(16, 24),
                            workers=1, verbose=False)
    out = tmp_path / "out"
    manifest = prepare_mod.prepare(str(tmp_path / "raw"), str(out), size=(16, 24), workers=2,
                                   skip_bad_cases=True, verbose=False)
    report = json.loads((out / "skipped_cases.json").read_text())
    reasons = {e["case_id"]: (e["error"], e["reason"]) for e in report}
    assert sorted(reasons) == ["a_001", "b_000", "b_001"]
    assert reasons["a_001"][0] == "LayoutError" and "has no label" in reasons["a_001"][1]
    assert reasons["b_000"][0] == "NiftiError" and "values [9]" in reasons["b_000"][1]
    assert reasons["b_001"][0] == "NiftiError" and "b_001_0000.nii.gz" in reasons["b_001"][1]
    assert manifest["skipped_cases"] == report
    assert sorted(manifest["cases"]) == ["a_000", "a_002", "b_002"]
    listed = [c for d in manifest["domains"].values() for ids in d["cases"].values() for c in ids]
    assert sorted(listed) == ["a_000", "a_002", "b_002"]
