"""Segment a NIfTI volume (or .npy slices) with a model behind TF Serving, over REST or gRPC
(thin script; the code is uda_tf/cli/serve_client.py).

    python export/client.py --model_name=uda_demo --protocol=rest \
        --nifti=demo_out/raw/imagesTr/scanner_b_000_0000.nii.gz \
        --manifest=export/serving/models/uda_demo/1/assets.extra/manifest.json \
        --output=/tmp/scanner_b_000_mask.nii.gz

Same as `python -m uda_tf.cli.serve_client`.
"""
from uda_tf.serving.client import run

if __name__ == "__main__":
    run()
