"""Entry point: python train.py --flagfile=uda:demo --data_dir=... (see uda_tf/cli/train.py)."""
from uda_tf.cli.train import run

if __name__ == "__main__":
    run()
