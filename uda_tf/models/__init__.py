"""Models: the segmentor is built from resolved flag values in one place."""


def segmentor_from_flags(values: dict, manifest: dict, *, sync_batchnorm: bool = False):
    """The segmentor train.py builds for these resolved flags and this prepared dataset
    (freshly initialised; load a checkpoint into it). Export rebuilds it the same way."""
    from uda_tf.models.unet import residual_unet_2d
    return residual_unet_2d(tuple(manifest["image_shape"]), int(manifest["num_classes"]),
                            base_filters=int(values["base_filters"]), norm=values["norm"],
                            sync_batchnorm=sync_batchnorm)
