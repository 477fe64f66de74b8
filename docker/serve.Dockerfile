# cvgen serve: img2img over HTTP, as Cloud Run expects it (listens on $PORT, default 8080).
# Build (from the repository root):
#   docker build -f docker/serve.Dockerfile -t cvgen-serve .                         # model mounted at run time
#   docker build -f docker/serve.Dockerfile --build-arg MODEL_DIR=models/tiny \
#                --build-arg LORA_DIR=runs/demo/lora --build-arg LORA=/models/lora \
#                -t cvgen-serve:baked .                                                     # model baked in
# Run:
#   docker run -p 8080:8080 -v $PWD/models/tiny:/models/base:ro -e CVGEN_API_KEY=... cvgen-serve
# GPU images: set TORCH_INDEX to a CUDA wheel index (e.g. https://download.pytorch.org/whl/cu124).

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# dependencies first (cached while only the code changes): the base install only, which is
# what serving needs; training, data preparation, DVC and streaming are the `train` extra.
# It includes opencv-python-headless, whose Haar cascade detects faces (keep_face, framing)
# offline; its wheel bundles its libraries and needs only zlib and libstdc++ of the slim image.
# The looks (cvgen/configs/looks.yaml) ship inside the package.
COPY pyproject.toml README.md ./
RUN pip install --index-url ${TORCH_INDEX} "torch>=2.4,<2.15" \
    && mkdir -p cvgen && touch cvgen/__init__.py && pip install . && pip uninstall -y cvgen
COPY cvgen ./cvgen
RUN pip install --no-deps . && rm -rf /src

FROM python:${PYTHON_VERSION}-slim
# what to bake in (folders in the build context); docker/empty leaves /models empty for a mount
ARG MODEL_DIR=docker/empty
ARG LORA_DIR=docker/empty
# --lora for the server: /models/lora when a LoRA is baked in, or a wandb:// reference
ARG LORA=
RUN apt-get update && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 cvgen
COPY --from=build /opt/venv /opt/venv
COPY configs/serve.yaml /app/serve.yaml
COPY --chown=cvgen ${MODEL_DIR}/ /models/base/
COPY --chown=cvgen ${LORA_DIR}/ /models/lora/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    WANDB_DIR=/tmp/wandb \
    HOME=/home/cvgen \
    PORT=8080 \
    CVGEN_BASE=/models/base \
    CVGEN_LORA=${LORA}
USER cvgen
WORKDIR /home/cvgen
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\",\"8080\")}/health', timeout=2)"
# tini reaps zombies as PID 1; cvgen serve forwards SIGTERM and leaves no process behind
ENTRYPOINT ["tini", "--", "/bin/sh", "-c", "exec cvgen serve --config /app/serve.yaml --base \"$CVGEN_BASE\" ${CVGEN_LORA:+--lora \"$CVGEN_LORA\"} \"$@\"", "cvgen-serve"]
CMD []
