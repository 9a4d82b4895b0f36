"""Layout readers on tiny files named exactly as the public datasets name them, and `prepare`
end to end on several of them."""
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.data import raw_layouts as raw
from uda_tf.data import prepare as prepare_mod
from uda_tf.data import io, layouts, tfrecord


def _by_id(listing):
    return {c.case_id: c for c in listing.cases}


def test_registry_lists_every_layout():
    assert {"msd", "cc359", "crossmoda", "drive", "stare", "glob"} <= set(layouts.LAYOUTS)
    assert layouts.layout_options("glob")[:2] == ("image_glob", "label_glob")


def test_cc359_domains_by_vendor_and_field(tmp_path):
    raw.make_cc359(tmp_path)
    listing = layouts.read_layout("cc359", str(tmp_path))
    cases = _by_id(listing)
    assert sorted(cases) == ["CC0001", "CC0002", "CC0003", "CC0004", "CC0005"]
    assert {c: cases[c].domain for c in cases} == {
        "CC0001": "philips_15", "CC0002": "philips_15", "CC0003": "siemens_3",
        "CC0004": "ge_15", "CC0005": "ge_3"}
    assert cases["CC0003"].label_path.endswith(
        os.path.join("Silver-standard", "CC0003_siemens_3_61_M_ss.nii.gz"))
    assert listing.label_names == {"0": "background", "1": "brain"}
    os.remove(tmp_path / "Silver-standard" / "CC0004_ge_15_58_F_ss.nii.gz")
    with pytest.raises(layouts.LayoutError, match=r"CC0004_ge_15_58_F\.nii\.gz has no label.*"
                                                  r"CC0004_ge_15_58_F_ss\.nii\.gz"):
        layouts.read_layout("cc359", str(tmp_path))
    listing = layouts.read_layout("cc359", str(tmp_path), skip_bad_cases=True)
    assert [p.case_id for p in listing.problems] == ["CC0004"]


def test_cc359_without_masks_is_unlabelled(tmp_path):
    raw.make_cc359(tmp_path, masks=False)
    listing = layouts.read_layout("cc359", str(tmp_path))
    assert all(c.label_path is None for c in listing.cases)


@pytest.mark.parametrize("flat", [False, True])
def test_crossmoda_source_labelled_target_not(tmp_path, flat):
    raw.make_crossmoda(tmp_path, flat=flat)
    cases = _by_id(layouts.read_layout("crossmoda", str(tmp_path)))
    ce = sorted(c for c in cases if cases[c].domain == "ceT1")
    t2 = sorted(c for c in cases if cases[c].domain == "hrT2")
    if flat:
        assert ce == ["crossmoda_1_ceT1", "crossmoda_2_ceT1"]
        assert t2 == ["crossmoda_3_hrT2", "crossmoda_4_hrT2"]
    else:
        assert ce == ["crossmoda2021_ldn_1_ceT1", "crossmoda2022_etz_2_ceT1"]
        assert t2 == ["crossmoda2021_ldn_106_hrT2", "crossmoda2022_etz_107_hrT2"]
    assert all(cases[c].label_path.endswith("_Label.nii.gz") for c in ce)
    assert all(cases[c].label_path is None for c in t2)


def test_crossmoda_prepared_with_domains_and_labels(tmp_path):
    raw.make_crossmoda(tmp_path / "raw")
    manifest = prepare_mod.prepare(str(tmp_path / "raw"), str(tmp_path / "out"), "crossmoda",
                                   size=(8, 8), spacing=(1.5, 1.5, 2), workers=1,
                                   split=(0.5, 0.5, 0.0), verbose=False)
    assert manifest["label_names"]["1"] == "vestibular_schwannoma"
    assert manifest["domains"]["ceT1"]["labelled"] is True
    assert manifest["domains"]["hrT2"]["labelled"] is False
    assert not any(c["has_label"] for c in manifest["cases"].values() if c["domain"] == "hrT2")


def test_msd_test_images_are_unlabelled_cases(tmp_path):
    raw.make_msd_with_tests(tmp_path / "raw")
    cases = _by_id(layouts.read_layout("msd", str(tmp_path / "raw")))
    assert cases["t_000"].label_path is None and cases["c_000"].label_path is not None
    manifest = prepare_mod.prepare(str(tmp_path / "raw"), str(tmp_path / "out"), size=(8, 8),
                                   workers=1, verbose=False)
    entry = manifest["domains"]["withtest"]
    # labelled cases are split; imagesTs cases are kept apart, never trained on as labelled
    assert entry["labelled"] is True and entry["cases"]["unlabelled"] == ["t_000", "t_001"]
    assert sorted(sum((entry["cases"][s] for s in ("train", "val", "test")), [])) == [
        "c_000", "c_001", "c_002"]
    assert manifest.num_records("withtest", "unlabelled") > 0


def test_drive_pictures_masks_and_unlabelled_test_set(tmp_path):
    raw.make_drive(tmp_path)
    cases = _by_id(layouts.read_layout("drive", str(tmp_path)))
    assert sorted(cases) == ["01_test", "02_test", "21_training", "22_training", "23_training"]
    train = cases["21_training"]
    assert train.domain == "drive" and train.label_path.endswith(
        os.path.join("training", "1st_manual", "21_manual1.gif"))
    assert train.mask_path.endswith(os.path.join("training", "mask", "21_training_mask.gif"))
    assert cases["01_test"].label_path is None and cases["01_test"].mask_path is not None
    green = io.read_volume(train.image_path)
    rgb = io.read_volume(train.image_path, color="rgb")
    assert green.array.shape == (20, 18, 1) and rgb.array.shape == (20, 18, 1, 3)
    np.testing.assert_array_equal(green.array[..., 0], rgb.array[:, :, 0, 1])
    label = io.read_volume(train.label_path, is_label=True, binarize=True)
    assert set(np.unique(label.array)) == {0, 1}  # stored as 0/255
    os.remove(tmp_path / "training" / "1st_manual" / "22_manual1.gif")
    with pytest.raises(layouts.LayoutError, match=r"22_training\.tif has no label.*"
                                                  r"22_manual1\.gif"):
        layouts.read_layout("drive", str(tmp_path))


@pytest.mark.parametrize("color,channels", [("green", 1), ("rgb", 3)])
def test_drive_prepared_as_single_slices_with_roi(tmp_path, color, channels):
    raw.make_drive(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = prepare_mod.prepare(str(tmp_path / "raw"), str(out), "drive", spacing=(1, 1, 1),
                                   size=(20, 18), color=color, normalize_in_foreground=True,
                                   foreground="roi", workers=1, verbose=False)
    assert manifest["image_shape"] == [20, 18, channels]
    case = manifest["cases"]["21_training"]
    assert case["num_slices"] == 1 and case["has_roi"] is True
    files = manifest.shard_files(str(out), "drive", case["split"])
    parsed = [tfrecord.parse_slice(r, 20, 18, channels) for r in tf.data.TFRecordDataset(files)]
    row = next(p for p in parsed if p["case_id"].numpy() == b"21_training")
    original_fov = io.read_volume(str(tmp_path / "raw" / "training" / "mask" /
                                      "21_training_mask.gif"), is_label=True, binarize=True)
    np.testing.assert_array_equal(row["roi"].numpy(), original_fov.array[..., 0])
    inside = row["image"].numpy()[row["roi"].numpy() > 0]
    assert inside.min() >= 0 and inside.max() <= 1  # min-max inside the field of view


def test_stare_observers_and_gzipped_pictures(tmp_path):
    raw.make_stare(tmp_path)
    cases = _by_id(layouts.read_layout("stare", str(tmp_path)))
    assert sorted(cases) == ["im0001", "im0002", "im0003"]
    assert cases["im0001"].label_path.endswith("im0001.ah.ppm")
    assert cases["im0003"].label_path is None and cases["im0003"].image_path.endswith(".ppm.gz")
    vk = _by_id(layouts.read_layout("stare", str(tmp_path), annotator="vk"))
    assert vk["im0002"].label_path.endswith(os.path.join("labels-vk", "im0002.vk.ppm"))
    assert io.read_volume(cases["im0003"].image_path).array.shape == (16, 20, 1)
    with pytest.raises(ValueError, match="annotator"):
        layouts.read_layout("stare", str(tmp_path), annotator="xx")
    with pytest.raises(ValueError, match=r"layout 'msd' does not take annotator"):
        layouts.read_layout("msd", str(tmp_path), annotator="ah")


def test_glob_pairs_by_case_regex_and_domain_regex(tmp_path):
    raw.make_glob(tmp_path)
    listing = layouts.read_layout(
        "glob", str(tmp_path), image_glob="scans/**/*_img.nii.gz",
        label_glob="segs/*_seg.nii.gz", case_regex=r"(?P<case>[pq]\d+)_",
        domain_regex=r"scans/(?P<domain>site\w)/", label_names="background,organ,tumour")
    cases = _by_id(listing)
    assert {c: (cases[c].domain, cases[c].label_path is not None) for c in cases} == {
        "p01": ("siteA", True), "p02": ("siteA", True), "p03": ("siteA", True),
        "q01": ("siteB", False), "q02": ("siteB", False)}  # siteB has no labels: a target
    assert listing.label_names == {"0": "background", "1": "organ", "2": "tumour"}
    os.remove(tmp_path / "segs" / "p02_seg.nii.gz")
    with pytest.raises(layouts.LayoutError, match=r"p02_img\.nii\.gz has no label"):
        layouts.read_layout("glob", str(tmp_path), image_glob="scans/**/*_img.nii.gz",
                            label_glob="segs/*_seg.nii.gz", case_regex=r"([pq]\d+)_",
                            domain_regex=r"scans/(site\w)/")
    with pytest.raises(ValueError, match="needs --image_glob"):
        layouts.read_layout("glob", str(tmp_path))
    with pytest.raises(layouts.LayoutError, match="matches no file"):
        layouts.read_layout("glob", str(tmp_path), image_glob="nothing/*.nii.gz")


@pytest.mark.parametrize("layout", ["cc359", "crossmoda", "drive", "stare", "msd"])
def test_directory_not_matching_the_layout_says_what_was_expected(tmp_path, layout):
    (tmp_path / "notes.txt").write_text("not a dataset")
    expected = {"cc359": "does not look like CC-359.*Original/CC0001_philips_15_55_M",
                "crossmoda": "does not look like crossMoDA.*_ceT1.nii.gz",
                "drive": "does not look like DRIVE.*training/images/21_training.tif",
                "stare": "does not look like STARE.*im0001.ppm",
                "msd": "is not an MSD/nnU-Net dataset.*dataset.json"}[layout]
    with pytest.raises(layouts.LayoutError, match=expected):
        layouts.read_layout(layout, str(tmp_path))


def test_nnunet_channels_are_one_case_and_must_be_complete(tmp_path):
    """nnU-Net v2 with several channel_names: <case>_0000 .. _000N are one case (channel 0
    first); a missing channel or an undeclared one is named; channels stack on the last axis."""
    raw.release_nnunet_multichannel(tmp_path / "bt")
    listing = layouts.read_layout("msd", str(tmp_path / "bt"))
    case = next(c for c in listing.cases if c.case_id == "BRATS_001")
    assert [os.path.basename(p) for p in case.image_paths] == [
        f"BRATS_001_000{k}.nii.gz" for k in range(4)]
    assert next(c for c in listing.cases if c.case_id == "BRATS_485").label_path is None
    volume = io.read_channels(case.image_paths)
    assert volume.array.shape == (12, 14, 8, 4)
    np.testing.assert_array_equal(volume.array[..., 0], io.read_volume(case.image_path).array)
    os.remove(tmp_path / "bt" / "imagesTr" / "BRATS_002_0002.nii.gz")
    with pytest.raises(layouts.LayoutError, match="'BRATS_002'.*no channel 0002"):
        layouts.read_layout("msd", str(tmp_path / "bt"))
    raw.release_nnunet_multichannel(tmp_path / "bt2")
    os.rename(tmp_path / "bt2" / "imagesTs" / "BRATS_485_0003.nii.gz",
              tmp_path / "bt2" / "imagesTs" / "BRATS_485_0004.nii.gz")
    with pytest.raises(layouts.LayoutError, match="channel 0004, but dataset.json declares 4"):
        layouts.read_layout("msd", str(tmp_path / "bt2"))


def test_a_channel_on_another_grid_is_named(tmp_path):
    raw.release_nnunet_multichannel(tmp_path / "bt")
    path = tmp_path / "bt" / "imagesTr" / "BRATS_001_0001.nii.gz"
    raw.save_scan(str(path), np.ones((12, 14, 7)), np.eye(4))
    case = next(c for c in layouts.read_layout("msd", str(tmp_path / "bt")).cases
                if c.case_id == "BRATS_001")
    with pytest.raises(io.NiftiError, match="BRATS_001_0001.nii.gz has shape"):
        io.read_channels(case.image_paths)
