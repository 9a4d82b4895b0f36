"""Entry point: python train.py --flagfile=configs/demo.cfg (see uda_tf/cli/train.py)."""
from uda_tf.cli.train import run

if __name__ == "__main__":
    run()
