"""Raw dataset layouts: a registry of readers, each turning a directory into a list of cases
(base.py says how). Importing this package registers every built-in reader."""
from uda_tf.data.layouts.base import (LAYOUTS, CaseProblem, CaseRecord, LayoutError, Listing,
                                      check_domain_name, layout_options, parse_label_names,
                                      read_layout, register_layout, sanitize_domain_name)
from uda_tf.data.layouts import mri, msd, retina  # noqa: F401  (registers the readers)

__all__ = ["LAYOUTS", "CaseProblem", "CaseRecord", "LayoutError", "Listing", "check_domain_name",
           "layout_options", "parse_label_names", "read_layout", "register_layout",
           "sanitize_domain_name"]
