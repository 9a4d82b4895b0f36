"""`python -m uda_tf.cli.phantom --output_dir=DIR` (uda-phantom): write the built-in demo
dataset; the library is uda_tf.data.phantom.
"""
from __future__ import annotations

import time

from absl import app, flags

from uda_tf.cli import entry
from uda_tf.data.phantom import DOMAINS, generate


FLAGS = flags.FLAGS


def define_flags():
    if "subjects_per_domain" in FLAGS:
        return
    flags.DEFINE_string("output_dir", None, "Dataset root to write (dataset.json, imagesTr, "
                        "labelsTr).", required=True)
    flags.DEFINE_list("domains", ["scanner_a", "scanner_b"],
                      f"Scanner domains to render, from: {', '.join(DOMAINS)} (scanner_a: "
                      "the T1 source; scanner_b: another T1 scanner; lowfield: low-field-like "
                      "T1, flat grey/white contrast, strong bias field, heavy noise and blur, "
                      "5 mm slices; t2like: T2-like, inverted contrast).")
    flags.DEFINE_integer("subjects_per_domain", 10, "Subjects per domain.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed; each subject draws from (seed, domain, index).")
    flags.DEFINE_integer("workers", 2, "Worker processes.", lower_bound=1)

    def known(names):
        bad = [n for n in names if n not in DOMAINS]
        if bad or not names:
            what = f"unknown domain(s) {', '.join(bad)}" if bad else "no domain given"
            # absl prefixes "flag --domains=<value>: " to this message.
            raise flags.ValidationError(f"{what}; allowed: {', '.join(DOMAINS)}")
        return True

    flags.register_validator("domains", known)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    path = generate(FLAGS.output_dir, FLAGS.domains, FLAGS.subjects_per_domain, FLAGS.seed,
                    FLAGS.workers, log=print)
    print(f"wrote {path} in {time.perf_counter() - start:.1f} s")


ABOUT = """Write the built-in demo dataset: simulated brain scans (NIfTI, with tissue labels)
for each of several simulated scanners, generated from anatomy shipped in the package.

example: python -m uda_tf.cli.phantom --output_dir=demo_out/raw"""


def run():
    entry.run(main, define_flags, ABOUT)


if __name__ == "__main__":
    run()
