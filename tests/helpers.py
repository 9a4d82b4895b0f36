"""Small builders shared by the tests (tiny models, fixed data)."""
import json
import os

import nibabel as nib
import numpy as np

CLASS_NAMES = ["background", "a", "b"]
SHAPE = (16, 16, 1)


def tiny_segmentor(norm="instance", sync=False, seed=0, depth=2):
    import keras
    from uda_tf.models.unet import residual_unet_2d
    keras.utils.set_random_seed(seed)
    # depth 2: the fewest levels that still have skip connections at two scales; each level
    # adds about a third to the graph every Keras fit traces
    return residual_unet_2d(SHAPE, len(CLASS_NAMES), base_filters=4, depth=depth, norm=norm,
                            sync_batchnorm=sync)


def tiny_batch(n=4, seed=0):
    """Source images with labels that depend on intensity, and brighter target images."""
    rng = np.random.default_rng(seed)
    x_s = rng.random((n, *SHAPE), dtype=np.float32)
    y_s = np.digitize(x_s[..., 0], [0.4, 0.7]).astype(np.uint8)
    x_t = (0.5 + 0.5 * rng.random((n, *SHAPE))).astype(np.float32)
    return x_s, y_s, x_t


# -- a tiny labelled MSD dataset on disk: 2 domains x 3 cases, one stored LPS ------------------
LPS_CASE = "b_002"
LABELS = {"background": 0, "left": 1, "front": 2}


def _world_case(shape, spacing, flip_xy):
    """Image = linear ramp in world mm (increasing towards R, A, S); label = coarse blocks,
    kept away from the x edges the in-plane crop removes."""
    spacing = np.asarray(spacing, float)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, -20.0, 5.0]
    if flip_xy:  # store as LPS: voxel axes 0,1 run towards Left and Posterior
        affine[0, 0], affine[1, 1] = -spacing[0], -spacing[1]
        affine[:2, 3] = [(shape[0] - 1) * spacing[0] - 10.0, (shape[1] - 1) * spacing[1] - 20.0]
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    image = (100 + world[..., 0] + 2 * world[..., 1] + 3 * world[..., 2]).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    inner = (world[..., 0] > -4) & (world[..., 0] < 22)
    label[inner & (world[..., 0] < 8)] = 1
    label[inner & (world[..., 0] >= 8) & (world[..., 1] > 0)] = 2
    return image, label, affine


def make_msd(root, labels_form="v2"):
    """2 domains x 3 cases of 20x24x10 voxels at 2 mm; one stored LPS at 1.6x2.5x3 mm."""
    os.makedirs(root / "imagesTr")
    os.makedirs(root / "labelsTr")
    domains = {"dom_a": ["a_000", "a_001", "a_002"], "dom_b": ["b_000", "b_001", LPS_CASE]}
    for i, case_id in enumerate(sorted(sum(domains.values(), []))):
        lps = case_id == LPS_CASE
        spacing = (1.6, 2.5, 3.0) if lps else (2.0, 2.0, 2.0)
        image, label, affine = _world_case((20, 24, 10), spacing, lps)
        image = image + 10 * i
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"{case_id}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"{case_id}.nii.gz"))
    labels = LABELS if labels_form == "v2" else {str(v): k for k, v in LABELS.items()}
    meta = {"name": "tiny test", "channel_names": {"0": "T1"}, "labels": labels,
            "numTraining": 6, "file_ending": ".nii.gz", "domains": domains}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def free_ports(n):
    """`n` different free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
