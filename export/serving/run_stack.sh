#!/usr/bin/env bash
# MLflow server + training + TF Serving with Docker Compose, then one scan segmented through
# the REST API. Needs Docker with Compose v2 (and the NVIDIA Container Toolkit for a GPU; see
# docker-compose.yml). Outputs go to $UDA_TF_DATA (default: <repo>/demo_out/stack).
set -euo pipefail
cd "$(dirname "$0")"
export GIT_COMMIT="${GIT_COMMIT:-$(git -C ../.. rev-parse HEAD 2>/dev/null || true)}"
mkdir -p "${UDA_TF_DATA:-../../demo_out/stack}/models"

docker compose build
docker compose up -d --wait mlflow
docker compose run --rm prepare
docker compose run --rm train
docker compose run --rm export
docker compose up -d serving

echo "waiting for TF Serving to load uda_demo (warm-up included) ..."
for _ in $(seq 90); do
  if curl -fs http://localhost:8501/v1/models/uda_demo | grep -q AVAILABLE; then break; fi
  sleep 2
done
curl -fs http://localhost:8501/v1/models/uda_demo

# The client runs in the training image, on the compose network (host "serving").
docker compose run --rm --no-deps --entrypoint python train -m uda_tf.cli.serve_client \
  --host=serving --model_name=uda_demo --protocol=rest \
  --nifti=/data/raw/imagesTr/scanner_b_000_0000.nii.gz \
  --manifest=/data/prepared/manifest.json --output=/data/scanner_b_000_mask.nii.gz
echo "MLflow: http://localhost:5000   TF Serving: http://localhost:8501/v1/models/uda_demo"
