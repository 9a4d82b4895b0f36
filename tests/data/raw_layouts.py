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


def make_stare(root, shape=(16, 20), count=3):
    """im0001.ppm ... (the last one as im000<count>.ppm.gz, unlabelled, as downloaded) with
    labels-ah/im0001.ah.ppm and labels-vk/im0001.vk.ppm (0/255 annotations)."""
    for n in range(1, count + 1):
        image, manual, _ = _picture(shape, n)
        os.makedirs(os.path.join(root, "stare-images"), exist_ok=True)
        if n == count:
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


# -- releases: the headers as the public releases have them ------------------------------------
# The builders above keep every header plain (float32, diagonal RAS affine). Those below give
# each layout the geometry and storage of its public release (orientation codes, oblique and
# flipped affines, qform/sform codes, int16 with scl_slope/scl_inter, uint8 labels), with tiny
# voxel counts; tests/cli/test_layouts_e2e.py runs each through every command line. Where a
# property of a release is not documented, the docstring says what is assumed.
NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
_WORLD_AXIS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def oriented_affine(axcodes, spacing, origin, tilt_degrees=0.0, tilt_axis=0):
    """Affine whose voxel axes run towards `axcodes` (e.g. "PIR") with `spacing` mm, tilted
    by `tilt_degrees` about world axis `tilt_axis` (an oblique acquisition)."""
    affine = np.eye(4)
    for voxel_axis, (code, step) in enumerate(zip(axcodes, spacing)):
        world_axis, sign = _WORLD_AXIS[code]
        affine[:3, voxel_axis] = 0.0
        affine[world_axis, voxel_axis] = sign * step
    if tilt_degrees:
        t = np.deg2rad(tilt_degrees)
        a, b = [i for i in range(3) if i != tilt_axis]
        rotation = np.eye(3)
        rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = \
            np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
        affine[:3, :3] = rotation @ affine[:3, :3]
    affine[:3, 3] = origin
    return affine


def save_scan(path, values, affine, *, dtype=np.int16, slope=None, inter=0.0, qform_code=1,
              sform_code=1, header=None):
    """A scan as a scanner export stores it: `values` (float, in real units) stored as `dtype`
    with scl_slope/scl_inter (`slope` None: stored as is); qform and sform codes as given
    (0 = absent). `header`: a real header to keep as it is (its qform, sform and units;
    `affine` and the codes are then not used)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    values = np.asarray(values, np.float64)
    if slope is not None:
        stored = np.round((values - inter) / slope).astype(dtype)
    else:
        stored = np.round(values).astype(dtype) if np.dtype(dtype).kind in "iu" \
            else values.astype(dtype)
    kind = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = kind(stored, None, header)
    if header is None:  # a real header keeps its own qform/sform (and quaternion rounding)
        image.set_qform(affine, code=qform_code)
        image.set_sform(affine, code=sform_code)
        image.header.set_xyzt_units("mm", "sec")
    image.set_data_dtype(dtype)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, path)
    return path


def save_label(path, label, affine, *, qform_code=1, sform_code=1, dtype=np.uint8):
    return save_scan(path, label, affine, dtype=dtype, qform_code=qform_code,
                     sform_code=sform_code)


def release_cc359(root):
    """CC-359 (Souza et al. 2018): T1 volumes of three vendors at 1.5 T and 3 T, acquired and
    stored sagittally. Assumed (not all stated in the paper): the sagittal slice axis is the
    last voxel axis, in-plane axes run posterior and inferior (Philips "PIL") or anterior and
    superior (GE "ASR"); ~1 mm voxels, 1.2 mm across slices on Philips; int16 with
    scl_slope (Philips) or unscaled (GE, qform only: sform_code 0); Silver-standard masks
    uint8 0/1 in the scan's geometry. Domain philips_15 (3 cases, labelled) and ge_3 (2)."""
    cases = {"CC0001_philips_15_55_M": ("PIL", (1.0, 1.0, 1.2), 1.25, 1),
             "CC0002_philips_15_43_F": ("PIL", (1.0, 1.0, 1.2), 1.25, 1),
             "CC0003_philips_15_61_M": ("PIL", (1.0, 1.0, 1.2), 1.25, 1),
             "CC0101_ge_3_39_M": ("ASR", (0.94, 0.94, 1.0), None, 0),
             "CC0102_ge_3_58_F": ("ASR", (0.94, 0.94, 1.0), None, 0)}
    for i, (name, (codes, spacing, slope, sform)) in enumerate(cases.items()):
        image, label = volume(i, shape=(14, 12, 8))
        affine = oriented_affine(codes, spacing, (-7.0, 6.0, 4.0), tilt_degrees=2.0 * i)
        save_scan(os.path.join(root, "Original", f"{name}.nii.gz"), image * 8, affine,
                  slope=slope, sform_code=sform)
        save_label(os.path.join(root, "Silver-standard", f"{name}_ss.nii.gz"),
                   (label > 0).astype(np.uint8), affine, sform_code=sform)
    return list(cases)


def release_crossmoda(root):
    """crossMoDA (Dorent et al. 2023), Zenodo layout. Assumed from the challenge description:
    ceT1 ~0.41 x 0.41 x 1.5 mm axial, stored LPS-like with an oblique tilt, int16 with
    scl_slope; hrT2 ~0.5 x 0.5 x 0.8 mm, stored RAS with another tilt, float32; labels uint8
    (1 vestibular schwannoma, 2 cochlea) in the ceT1 geometry. Three labelled ceT1 cases
    (source), two hrT2 (target)."""
    for i, base in enumerate(["crossmoda2021_ldn_1", "crossmoda2021_ldn_2",
                              "crossmoda2022_etz_3"]):
        image, label = volume(i, shape=(14, 12, 8))
        affine = oriented_affine("LPS", (0.41, 0.41, 1.5), (2.9, 80.0, -30.0),
                                 tilt_degrees=4.0 + i, tilt_axis=0)
        folder = os.path.join(root, "source_training")
        save_scan(os.path.join(folder, f"{base}_ceT1.nii.gz"), image * 5, affine, slope=0.5)
        save_label(os.path.join(folder, f"{base}_Label.nii.gz"), label, affine)
    for i, base in enumerate(["crossmoda2021_ldn_106", "crossmoda2022_etz_107"]):
        image, _ = volume(10 + i, shape=(12, 14, 10))
        affine = oriented_affine("RAS", (0.5, 0.5, 0.8), (-3.0, -70.0, -25.0),
                                 tilt_degrees=-6.0, tilt_axis=1)
        save_scan(os.path.join(root, "target_training", f"{base}_hrT2.nii.gz"), image * 3,
                  affine, dtype=np.float32)


def release_msd_v1(root):
    """Medical Segmentation Decathlon (v1) task folder: dataset.json listing `training`
    pairs and `test` images with "./" paths, `modality`, labels {"0": "background", ...};
    images named without _0000; the macOS `._*` files the Decathlon tar archives carry. The
    scans are nibabel's real sample `anatomical.nii` (a T1 brain: big-endian int16, LAS,
    qform/sform code 2) with its header kept; labels uint8 from its intensities."""
    sample = nib.load(os.path.join(NIBABEL_DATA, "anatomical.nii"))
    real = np.asarray(sample.dataobj).astype(np.float64)
    names = ["brain_001", "brain_002", "brain_003", "brain_004"]
    meta = {"name": "BrainSample", "description": "nibabel anatomical.nii",
            "tensorImageSize": "3D", "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "tissue", "2": "bright"},
            "numTraining": 3, "numTest": 1, "training": [], "test": []}
    threshold = np.percentile(real, [60, 90])
    for i, name in enumerate(names):
        folder = "imagesTs" if i == 3 else "imagesTr"
        path = os.path.join(root, folder, f"{name}.nii.gz")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        values = np.roll(real, i, axis=1)  # one more case each, same real header
        image = nib.Nifti1Image(values.astype(">i2"), sample.affine, sample.header)
        nib.save(image, path)
        with open(os.path.join(root, folder, f"._{name}.nii.gz"), "wb") as f:
            f.write(b"\x00\x05\x16\x07AppleDouble")  # not a NIfTI: must be passed over
        if folder == "imagesTs":
            meta["test"].append(f"./imagesTs/{name}.nii.gz")
            continue
        label = np.digitize(values, threshold).astype(np.uint8)
        label_path = os.path.join(root, "labelsTr", f"{name}.nii.gz")
        os.makedirs(os.path.dirname(label_path), exist_ok=True)
        label_image = nib.Nifti1Image(label, sample.affine, sample.header)
        label_image.set_data_dtype(np.uint8)
        nib.save(label_image, label_path)
        meta["training"].append({"image": f"./imagesTr/{name}.nii.gz",
                                 "label": f"./labelsTr/{name}.nii.gz"})
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=4)
    return names


def release_msd_v2(root):
    """nnU-Net v2 raw dataset (Dataset003_Liver-like CT): imagesTr/<case>_0000.nii.gz,
    labelsTr/<case>.nii.gz, imagesTs/, dataset.json with channel_names, labels
    {"background": 0, ...}, numTraining, file_ending. CT as ITK writes it: LPS voxel order,
    0.78 x 0.78 x 2.5 mm, int16 with scl_inter -1024, qform/sform code 1; labels uint8."""
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": 3, "file_ending": ".nii.gz", "name": "Dataset003_Liver"}
    for i, case in enumerate(["liver_0", "liver_1", "liver_2", "liver_130", "liver_131"]):
        image, label = volume(i, shape=(14, 12, 8))
        affine = oriented_affine("LPS", (0.78, 0.78, 2.5), (5.0, 4.0, -300.0 + 2.5 * i))
        folder = "imagesTs" if i >= 3 else "imagesTr"
        save_scan(os.path.join(root, folder, f"{case}_0000.nii.gz"), image * 2 - 1024, affine,
                  slope=1.0, inter=-1024.0)
        if folder == "imagesTr":
            save_label(os.path.join(root, "labelsTr", f"{case}.nii.gz"), label, affine)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=4)


def release_nnunet_multichannel(root):
    """nnU-Net v2 raw dataset with four input channels (Dataset001_BrainTumour as
    nnUNetv2_convert_MSD_dataset writes it): imagesTr/<case>_0000 .. _0003.nii.gz (FLAIR, T1w,
    T1gd, T2w, each its own contrast of the same anatomy, on one grid), labelsTr/<case>.nii.gz,
    imagesTs/, channel_names in dataset.json. 1 mm, LPS, int16."""
    names = {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}
    meta = {"channel_names": names, "labels": {"background": 0, "edema": 1, "tumour": 2},
            "numTraining": 3, "file_ending": ".nii.gz", "name": "Dataset001_BrainTumour"}
    for i, case in enumerate(["BRATS_001", "BRATS_002", "BRATS_003", "BRATS_485"]):
        image, label = volume(20 + i, shape=(12, 14, 8))
        affine = oriented_affine("LPS", (1.0, 1.0, 1.0), (120.0, 120.0, -70.0 + i))
        folder = "imagesTs" if i >= 3 else "imagesTr"
        for k in range(len(names)):  # another contrast per channel: other tissue brightness
            contrast = image * (1.0 + 0.5 * k) + 30.0 * k * (label == 1)
            save_scan(os.path.join(root, folder, f"{case}_{k:04d}.nii.gz"), contrast, affine)
        if folder == "imagesTr":
            save_label(os.path.join(root, "labelsTr", f"{case}.nii.gz"), label, affine)
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=4)


def release_drive(root):
    """DRIVE as released: 8-bit RGB .tif pictures, .gif manual annotations and FOV masks
    (0/255); test/ without 1st_manual."""
    make_drive(root, shape=(24, 20))


def release_stare(root):
    """STARE: 8-bit RGB .ppm pictures (one gzipped, as downloaded), labels-ah/ and
    labels-vk/ .ppm annotations (0/255); four labelled pictures and one unlabelled."""
    make_stare(root, shape=(20, 22), count=5)


def release_glob(root):
    """An in-house layout for --layout=glob: scans/<site>/<case>_img.nii.gz, labels
    segs/<case>_seg.nii.gz for siteA only. The scans carry nibabel's real NIfTI-2 sample
    header (`example_nifti2.nii.gz`: int16, oblique LAS, qform/sform code 1) with
    volumes from its first frame."""
    sample = nib.load(os.path.join(NIBABEL_DATA, "example_nifti2.nii.gz"))
    first = np.asarray(sample.dataobj[..., 0]).astype(np.float64)
    header = sample.header.copy()
    header.set_data_shape(first.shape)
    header.set_dim_info(None, None, None)
    for site, cases in (("siteA", ["p01", "p02", "p03"]), ("siteB", ["q01", "q02"])):
        for i, case in enumerate(cases):
            values = np.roll(first, i, axis=0) * (1.0 if site == "siteA" else 1.3)
            save_scan(os.path.join(root, "scans", site, f"{case}_img.nii.gz"), values,
                      None, header=header)
            if site == "siteA":
                label = (values > np.percentile(values, 70)).astype(np.uint8)
                save_label(os.path.join(root, "segs", f"{case}_seg.nii.gz"), label,
                           sample.affine)
