"""Checkpoint -> SavedModel for TF Serving (thin script; the code is uda_tf/cli/export.py).

    python export/export_savedmodel.py --checkpoint=demo_out/runs/source_only_randomized/checkpoints \
        --export_dir=export/serving/models --model_name=uda_demo

Same as the console script `uda-export` and `python -m uda_tf.cli.export`.
"""
from uda_tf.serving.export import run

if __name__ == "__main__":
    run()
