"""Every flag of `python -m uda_tf.cli.prepare`, validated at start-up (errors name the flag)."""
from __future__ import annotations

from absl import flags

from uda_tf.data import io, layouts, preprocess

FLAGS = flags.FLAGS
_defined = False
# Layout options: passed to the reader only when set, so an option the chosen layout does not
# take is an error naming it instead of being silently ignored.
LAYOUT_OPTION_FLAGS = ("image_glob", "label_glob", "mask_glob", "case_regex", "domain_regex",
                       "label_names", "binary_labels", "mask_suffix", "annotator")


def _validator(parse):
    def check(value):
        if value is None:
            return True
        try:
            parse(value)
        except ValueError as e:
            raise flags.ValidationError(str(e)) from None
        return True

    return check


def define_layout_option_flags() -> None:
    """The options of the layout readers (`--image_glob`, `--mask_suffix`, ...), shared by
    prepare and predict (`predict --layout=glob` needs the same globs as prepare)."""
    d = flags
    d.DEFINE_string("image_glob", None, "glob: images, relative to --input_dir ('**' recurses).")
    d.DEFINE_string("label_glob", None, "glob: label files, relative to --input_dir.")
    d.DEFINE_string("mask_glob", None, "glob: region-of-interest masks, relative to --input_dir.")
    d.DEFINE_string("case_regex", None, "glob: regex finding the case id in each relative path "
                    "(group 'case', else group 1; default: file name without extension/_0000).")
    d.DEFINE_string("domain_regex", None, "glob: regex finding the domain in each image path "
                    "(group 'domain', else group 1).")
    d.DEFINE_string("label_names", None, "glob: class names, value 0 first "
                    "(default background,foreground).")
    d.DEFINE_bool("binary_labels", None, "glob: labels are binary masks stored as 0/255 etc.")
    d.DEFINE_string("mask_suffix", None, "cc359: mask file suffix: ss (Silver-standard, "
                    "default), staple or manual.")
    d.DEFINE_enum("annotator", None, ["ah", "vk"], "stare: observer whose labels to use "
                  "(default ah).")


def layout_options_from_flags() -> dict:
    """The layout options that were set (the reader refuses one it does not take)."""
    return {name: FLAGS[name].value for name in LAYOUT_OPTION_FLAGS
            if FLAGS[name].value is not None}


def define_flags() -> None:
    """Defines the flags (on first call only).

    Not at import time: other entry points import `prepare()` and may define flags with the
    same names (`--output_dir`), which absl would reject as duplicates.
    """
    global _defined
    if _defined:
        return
    _defined = True
    from uda_tf.data.prepare import OUTPUTS, check_split, parse_numbers

    d = flags
    d.DEFINE_enum("layout", "msd", sorted(layouts.LAYOUTS), "Raw dataset layout.")
    d.DEFINE_string("input_dir", None, "Raw dataset directory.")
    d.DEFINE_string("output_dir", None, "Where shards/ and manifest.json go.")
    d.DEFINE_string("default_domain", None, "Domain of every case when the layout names none "
                    "(default: the dataset name; drive/stare: drive/stare).")
    d.DEFINE_list("domains", None, "Only prepare these domains (default: all).")
    define_layout_option_flags()
    # -- preprocessing -------------------------------------------------------------------------
    d.DEFINE_list("spacing", ["2", "2", "2"], "Target voxel spacing in mm (x,y,z of RAS).")
    d.DEFINE_list("size", ["96", "112"], "Size after centre pad/crop: H,W (in-plane) or H,W,D "
                  "(the slice axis too).")
    d.DEFINE_list("clip_percentiles", ["1", "99"], "Intensity clip percentiles low,high.")
    d.DEFINE_enum("normalization", "minmax", list(preprocess.NORMALIZATIONS),
                  "minmax: clipped range to [0,1]; zscore: zero mean, unit std of the clipped "
                  "volume.")
    d.DEFINE_enum("image_interpolation", "linear", list(preprocess.INTERPOLATIONS),
                  "Image resampling (labels: interpolated one-hot masks).")
    d.DEFINE_enum("slice_axis", "axial", list(preprocess.SLICE_AXES),
                  "Slices across RAS z (axial), y (coronal) or x (sagittal).")
    d.DEFINE_enum("foreground", "nonzero", list(preprocess.FOREGROUNDS),
                  "Foreground for --crop_foreground/--normalize_in_foreground: nonzero voxels, "
                  "voxels above --foreground_percentile, or the case's region of interest.")
    d.DEFINE_float("foreground_percentile", 5.0, "Percentile for --foreground=percentile.",
                   lower_bound=0.0, upper_bound=99.999)
    d.DEFINE_bool("normalize_in_foreground", False, "Intensity statistics from foreground "
                  "voxels only.")
    d.DEFINE_bool("crop_foreground", False, "Crop each volume to its foreground bounding box.")
    d.DEFINE_enum("color", "green", list(io.COLOR_MODES), "RGB pictures (DRIVE, STARE): green "
                  "channel, luminance, or 3 channels.")
    # -- output --------------------------------------------------------------------------------
    d.DEFINE_enum("output", "slices", list(OUTPUTS), "2D slices, or whole 3D volumes (3D models "
                  "crop patches from them inside tf.data).")
    d.DEFINE_integer("context_slices", 0, "2.5D: k neighbouring slices on each side as extra "
                     "channels (2k+1 channels).", lower_bound=0)
    d.DEFINE_enum("image_dtype", "float32", ["float32", "float16"], "Stored image type.")
    d.DEFINE_enum("compression", "none", ["none", "gzip"], "TFRecord compression.")
    d.DEFINE_list("split", ["0.7", "0.2", "0.1"], "train,val,test fractions per domain.")
    d.DEFINE_integer("split_seed", 0, "Seed of the per-domain case shuffle.", lower_bound=0)
    d.DEFINE_string("split_file", None, "JSON {case_id: train|val|test|unlabelled} instead of "
                    "--split.")
    d.DEFINE_integer("records_per_shard", None, "Records per TFRecord shard (default 256 "
                     "slices, 4 volumes).", lower_bound=1)
    d.DEFINE_integer("workers", 2, "Processes preprocessing cases in parallel.", lower_bound=1)
    d.DEFINE_bool("skip_bad_cases", False, "Leave out unusable cases and list them in "
                  "<output_dir>/skipped_cases.json instead of stopping.")
    d.DEFINE_bool("overwrite", False, "Replace an output prepared with other parameters.")
    # privacy (uda_tf/data/privacy.py)
    d.DEFINE_bool("keep_identifiers", False, "Keep case ids from file names (often patient "
                  "names) and file paths in the shards, manifest and skipped-case report; "
                  "by default cases get derived ids <domain>_<k>.")
    d.DEFINE_string("identifier_map", None, "Write {derived id: original id and files} here "
                    "(outside --output_dir) to map results back to the original scans.")
    d.DEFINE_integer("max_voxels", io.MAX_VOXELS, "Refuse a scan or picture whose header "
                     "declares more voxels than this, before reading it (a forged header or a "
                     "gzip bomb cannot exhaust memory); raise it for really larger scans.",
                     lower_bound=1)
    d.DEFINE_bool("progress", True, "Progress bar on stderr.")
    flags.mark_flags_as_required(["input_dir", "output_dir"])

    def config_check(**kwargs):
        return _validator(
            lambda v: preprocess.PreprocessConfig(**{k: f(v) for k, f in kwargs.items()}))

    flags.register_validator(
        "spacing", config_check(spacing=lambda v: parse_numbers(v, 3, "spacing")))
    flags.register_validator(
        "size", config_check(size=lambda v: parse_numbers(v, (2, 3), "size", kind=int)))
    flags.register_validator(
        "clip_percentiles",
        config_check(clip_percentiles=lambda v: parse_numbers(v, 2, "clip_percentiles")))
    flags.register_validator("split", _validator(check_split))
    flags.register_validator(
        "default_domain",
        _validator(lambda v: layouts.check_domain_name(v, where="--default_domain")))
    flags.register_multi_flags_validator(
        ["output", "context_slices"],
        lambda v: v["output"] == "slices" or v["context_slices"] == 0,
        message="--context_slices applies to --output=slices only")


def prepare_kwargs() -> dict:
    """The keyword arguments of `prepare()` from the parsed flags."""
    names = ("default_domain", "domains", "spacing", "size", "clip_percentiles",
             "normalization", "image_interpolation", "slice_axis", "foreground",
             "foreground_percentile", "normalize_in_foreground", "crop_foreground", "color",
             "output", "context_slices", "image_dtype", "compression", "split", "split_seed",
             "split_file", "records_per_shard", "workers", "skip_bad_cases", "overwrite",
             "progress", "keep_identifiers", "identifier_map", "max_voxels")
    kwargs = {name: FLAGS[name].value for name in names}
    kwargs["layout_options"] = layout_options_from_flags()
    return dict(input_dir=FLAGS.input_dir, output_dir=FLAGS.output_dir, layout=FLAGS.layout,
                **kwargs)
