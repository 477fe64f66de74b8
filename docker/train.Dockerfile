# cvgen training image: CUDA runtime, torch for CUDA, cvgen[train] and the DVC remote's plugin.
# At start it pulls the prepared photos with DVC, then runs `cvgen fit` with its arguments
# (docker/train-entrypoint.sh says which environment variables it reads).
# Build (from the repository root):
#   docker build -f docker/train.Dockerfile -t cvgen-train .
#   docker build -f docker/train.Dockerfile --build-arg EXTRAS=train,s3 -t cvgen-train .   # S3 remote
# Run on a GPU machine:
#   docker run --gpus all -e CVGEN_DVC_REMOTE=gs://BUCKET/dvc -e WANDB_API_KEY \
#     -v "$PWD/runs:/runs" -e CVGEN_RUN_DIR=/runs/portraits cvgen-train
# Vertex AI and Compute Engine: docker/vertex-train.sh, docker/gce-train.sh.

# CUDA 12.8 runtime: torch's cu128 wheels bring their own CUDA libraries; the base image gives
# the driver mounts and library paths the NVIDIA container runtime (and COS) expect
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# the cvgen extras to install: train, plus the DVC remote's plugin (gs: dvc-gs, s3: dvc-s3)
ARG EXTRAS=train,gs

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 cvgen
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app

# dependencies first (cached while only the code changes): torch from the CUDA index, then the
# rest of cvgen[EXTRAS] from PyPI with torch already satisfied
COPY pyproject.toml README.md ./
RUN pip install --index-url ${TORCH_INDEX} "torch>=2.4,<2.15" "torchvision>=0.19,<0.30" \
    && mkdir -p cvgen && touch cvgen/__init__.py \
    && pip install ".[${EXTRAS}]" && pip uninstall -y cvgen && rm -rf cvgen build
COPY cvgen ./cvgen
RUN pip install --no-deps . && rm -rf build

# the DVC project (no git history: the entrypoint sets core.no_scm) and the configs, where
# `cvgen fit --config configs/lora.yaml` and dvc.yaml expect them
COPY dvc.yaml dvc.lock params.yaml data.dvc .dvcignore ./
COPY .dvc/config .dvc/config
COPY cvgen/configs ./configs
COPY docker/train-entrypoint.sh /usr/local/bin/cvgen-train
RUN chmod 0755 /usr/local/bin/cvgen-train && chown -R cvgen /app

ENV PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HOME=/home/cvgen
USER cvgen
ENTRYPOINT ["tini", "--", "cvgen-train"]
CMD ["--config", "configs/lora.yaml", "--data.root", "data/prepared"]
