# Training image: python train.py --flagfile=<config> on the official TensorFlow GPU image
# (it runs on CPU too when no GPU is visible).
#   docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t uda-tf-train .
#   docker run --rm --gpus all -v $PWD/demo_out:/data uda-tf-train \
#       --flagfile=uda:demo --data_dir=/data/prepared --output_dir=/data/runs
# The other CLIs are in the image too: --entrypoint python ... -m uda_tf.cli.prepare | export | ...
# export/serving/docker-compose.yml runs it next to an MLflow server and TF Serving.
FROM tensorflow/tensorflow:2.21.0-gpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg

WORKDIR /opt/uda_tf
# The package first: its dependencies (TensorFlow is already in the image and satisfies
# tensorflow~=2.21.0) land in a layer (the shipped configs are package data: --flagfile=uda:NAME).
COPY setup.cfg pyproject.toml README.md ./
COPY uda_tf ./uda_tf
# The import check fails the build if setup.cfg lacks tensorflow-serving-api (export warm-up).
RUN pip install . && python -c "import uda_tf.cli.train, uda_tf.serving.export, tensorflow_serving.apis"
COPY train.py ./

# No .git in the image (.dockerignore): the commit comes in as a build argument and is logged
# as the MLflow run's git_commit tag (uda_tf.training.tracking.git_commit).
ARG GIT_COMMIT=""
ENV UDA_TF_GIT_COMMIT=${GIT_COMMIT}

ENTRYPOINT ["python", "train.py"]
CMD ["--flagfile=uda:demo", "--data_dir=/data/prepared", "--output_dir=/data/runs"]
