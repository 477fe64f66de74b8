#!/usr/bin/env bash
# Entrypoint of the training image (docker/train.Dockerfile): pull the training data with DVC,
# then run `cvgen fit` with the container's arguments.
#
#   docker run --gpus all -e CVGEN_DVC_REMOTE=gs://BUCKET/dvc -e WANDB_API_KEY \
#     -v "$PWD/runs:/runs" -e CVGEN_RUN_DIR=/runs/portraits IMAGE --config configs/lora.yaml
#
# Environment (all optional):
#   CVGEN_DVC_REMOTE   DVC remote to pull from (gs://..., s3://..., or a path such as a Vertex AI
#                      /gcs/BUCKET/... mount); default: the repository's default remote
#   CVGEN_DVC_TARGETS  what to pull (default: prepare, the prepared photos dvc.lock records;
#                      empty: pull nothing, the data is mounted)
#   CVGEN_RUN_DIR      run folder (trainer.default_root_dir; wins over the arguments): a mounted
#                      volume, or /gcs/BUCKET/... on Vertex AI
#   WANDB_API_KEY      W&B key (online runs: lineage and registry link); without it W&B runs offline
#   WANDB_API_KEY_SECRET  Secret Manager name to read WANDB_API_KEY from when it is not set
# Credentials for the remote come from the environment or the machine's service account (dvc-gs,
# dvc-s3 and the Google/AWS libraries find them themselves).
set -euo pipefail

export DVC_NO_ANALYTICS=1
say() { echo "cvgen-train: $*" >&2; }

if [ -z "${WANDB_API_KEY:-}" ] && [ -n "${WANDB_API_KEY_SECRET:-}" ]; then
  WANDB_API_KEY="$(python -m cvgen.gcpsecret "$WANDB_API_KEY_SECRET")"
  export WANDB_API_KEY
fi

# the image holds the DVC project files without git history
if [ ! -e .git ]; then
  dvc config --local core.no_scm true
fi
if [ -n "${CVGEN_DVC_REMOTE:-}" ]; then
  dvc remote add --local --force --default job "$CVGEN_DVC_REMOTE" >/dev/null
fi

targets="${CVGEN_DVC_TARGETS-prepare}"
if [ -n "$targets" ]; then
  say "dvc pull $targets from $(dvc remote default 2>/dev/null || echo 'the default remote')"
  # shellcheck disable=SC2086  # several targets are several words
  if ! dvc pull --quiet $targets; then
    say "error: dvc pull $targets failed: push the data first (make repro && make data-push," \
      "with the remote set) or point CVGEN_DVC_REMOTE at the remote holding it"
    exit 2
  fi
fi

run_dir=()
if [ -n "${CVGEN_RUN_DIR:-}" ]; then
  run_dir=(--trainer.default_root_dir "$CVGEN_RUN_DIR")
fi
exec cvgen fit "$@" "${run_dir[@]}"
