"""Tiny raw datasets on disk, files named exactly as the public releases name them."""
import gzip
import io as pyio
import json
import os

import nibabel as nib
import numpy as np
from PIL import Image

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def volume(seed, shape=(10, 12, 6)):
    """A blob image (background 0) and its 0/1/2 label map."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    radius = np.sqrt((grid**2).sum(-1))
    label = np.zeros(shape, np.uint8)
    label[radius < 0.8] = 1
    label[radius < 0.4] = 2
    image = (label * 50.0 + 20.0 * (radius < 0.9) + rng.normal(0, 1, shape)).astype(np.float32)
    image[radius >= 0.9] = 0.0
    return image, label


def save_nifti(path, array, affine=AFFINE):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def make_cc359(root, masks=True):
    """Original/CC0001_philips_15_55_M.nii.gz + Silver-standard/..._ss.nii.gz (0/1 masks)."""
    names = ["CC0001_philips_15_55_M", "CC0002_philips_15_43_F", "CC0003_siemens_3_61_M",
             "CC0004_ge_15_58_F", "CC0005_ge_3_39_M"]
    for i, name in enumerate(names):
        image, label = volume(i)
        save_nifti(os.path.join(root, "Original", f"{name}.nii.gz"), image)
        if masks:
            save_nifti(os.path.join(root, "Silver-standard", f"{name}_ss.nii.gz"),
                       (label > 0).astype(np.uint8))
    return names


def make_crossmoda(root, flat=False):
    """The Zenodo release: source_training/ (ceT1 + Label), target_training/ (hrT2); or all in
    one folder with the short names crossmoda_<id>_<kind>.nii.gz."""
    if flat:
        files = {"": [("crossmoda_1", "ceT1"), ("crossmoda_1", "Label"), ("crossmoda_2", "ceT1"),
                      ("crossmoda_2", "Label"), ("crossmoda_3", "hrT2"), ("crossmoda_4", "hrT2")]}
    else:
        files = {"source_training": [("crossmoda2021_ldn_1", "ceT1"),
                                     ("crossmoda2021_ldn_1", "Label"),
                                     ("crossmoda2022_etz_2", "ceT1"),
                                     ("crossmoda2022_etz_2", "Label")],
                 "target_training": [("crossmoda2021_ldn_106", "hrT2"),
                                     ("crossmoda2022_etz_107", "hrT2")]}
    for folder, entries in files.items():
        for i, (base, kind) in enumerate(entries):
            image, label = volume(i)
            array = label if kind == "Label" else image
            save_nifti(os.path.join(root, folder, f"{base}_{kind}.nii.gz"), array)


def _picture(shape, seed, rgb=True):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    vessel = (np.abs(np.sin(xx / 3.0) * 6 - (yy - shape[0] / 2)) < 1.5)
    fov = ((yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2) < (min(shape) / 2.2) ** 2
    green = np.where(fov, 120 - 60 * vessel + rng.integers(0, 10, shape), 0).astype(np.uint8)
    rgb_image = np.stack([green // 2 + 60 * fov, green, green // 3], -1).astype(np.uint8)
    return (rgb_image if rgb else green), (vessel & fov).astype(np.uint8) * 255, \
        fov.astype(np.uint8) * 255


def make_drive(root, shape=(20, 18), test_labels=False):
    """training/images/21_training.tif, training/1st_manual/21_manual1.gif,
    training/mask/21_training_mask.gif; test/ without 1st_manual (as released now)."""
    sets = {"training": [21, 22, 23], "test": [1, 2]}
    for which, numbers in sets.items():
        for n in numbers:
            image, manual, fov = _picture(shape, n)
            base = os.path.join(root, which)
            for sub in ("images", "mask", "1st_manual"):
                os.makedirs(os.path.join(base, sub), exist_ok=True)
            Image.fromarray(image).save(os.path.join(base, "images", f"{n:02d}_{which}.tif"))
            Image.fromarray(fov).save(os.path.join(base, "mask", f"{n:02d}_{which}_mask.gif"))
            if which == "training" or test_labels:
                Image.fromarray(manual).save(os.path.join(base, "1st_manual",
                                                          f"{n:02d}_manual1.gif"))
        if which == "test" and not test_labels:
            os.rmdir(os.path.join(root, which, "1st_manual"))


def make_stare(root, shape=(16, 20)):
    """im0001.ppm (and im0003.ppm.gz, as downloaded) with labels-ah/im0001.ah.ppm and
    labels-vk/im0001.vk.ppm; im0003 is unlabelled."""
    for n in (1, 2, 3):
        image, manual, _ = _picture(shape, n)
        os.makedirs(os.path.join(root, "stare-images"), exist_ok=True)
        if n == 3:
            buffer = pyio.BytesIO()
            Image.fromarray(image).save(buffer, format="PPM")
            with gzip.open(os.path.join(root, "stare-images", f"im{n:04d}.ppm.gz"), "wb") as f:
                f.write(buffer.getvalue())
            continue
        Image.fromarray(image).save(os.path.join(root, "stare-images", f"im{n:04d}.ppm"))
        for observer in ("ah", "vk"):
            os.makedirs(os.path.join(root, f"labels-{observer}"), exist_ok=True)
            label = manual if observer == "ah" else np.roll(manual, 1, axis=1)
            Image.fromarray(np.stack([label] * 3, -1)).save(
                os.path.join(root, f"labels-{observer}", f"im{n:04d}.{observer}.ppm"))


def make_glob(root):
    """scans/<site>/<case>_img.nii.gz with segs/<case>_seg.nii.gz for siteA only."""
    for site, cases in (("siteA", ["p01", "p02", "p03"]), ("siteB", ["q01", "q02"])):
        for i, case in enumerate(cases):
            image, label = volume(i)
            save_nifti(os.path.join(root, "scans", site, f"{case}_img.nii.gz"), image)
            if site == "siteA":
                save_nifti(os.path.join(root, "segs", f"{case}_seg.nii.gz"), label)


def make_msd_with_tests(root):
    """nnU-Net v2: imagesTr/labelsTr (3 cases) and imagesTs (2 unlabelled cases)."""
    for i, case in enumerate(["c_000", "c_001", "c_002", "t_000", "t_001"]):
        image, label = volume(i)
        folder = "imagesTs" if case.startswith("t_") else "imagesTr"
        save_nifti(os.path.join(root, folder, f"{case}_0000.nii.gz"), image)
        if folder == "imagesTr":
            save_nifti(os.path.join(root, "labelsTr", f"{case}.nii.gz"), label)
    meta = {"name": "withtest", "channel_names": {"0": "CT"},
            "labels": {"background": 0, "organ": 1, "tumour": 2}, "numTraining": 3,
            "file_ending": ".nii.gz"}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f)
