#!/bin/bash
# Startup script of the Compute Engine training VM (docker/gce-train.sh creates the VM with it).
# On Container-Optimized OS it installs the NVIDIA driver, runs the training image on the GPU
# with the settings in the VM's metadata (cvgen-* keys), copies the run folder to the bucket and
# powers the VM off, so billing stops with the training. It runs again at every boot: a VM that
# was stopped mid-run resumes from its last checkpoint (the run folder stays on the boot disk).
# Logs: sudo journalctl -u google-startup-scripts (or the serial console).
set -euo pipefail

meta() {
  curl -fsS -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1" 2>/dev/null || true
}
IMAGE="$(meta cvgen-image)"
RUN_NAME="$(meta cvgen-run-name)"
BUCKET="$(meta cvgen-bucket)"
DVC_REMOTE="$(meta cvgen-dvc-remote)"
WANDB_SECRET="$(meta cvgen-wandb-secret)"
ARGS="$(meta cvgen-args)"
POWER_OFF="$(meta cvgen-power-off)"
: "${IMAGE:?metadata cvgen-image is not set}"
: "${RUN_NAME:?metadata cvgen-run-name is not set}"

# COS: the root file system is read-only; /mnt/stateful_partition lives on the boot disk
WORK=/mnt/stateful_partition/cvgen
mkdir -p "$WORK/runs" "$WORK/home"
chown 10001 "$WORK/runs"      # the image's non-root user writes the run folder
export HOME="$WORK/home"      # docker-credential-gcr writes its config here

# the NVIDIA driver (COS's own build), made executable for containers
cos-extensions install gpu -- --version=latest
mount --bind /var/lib/nvidia /var/lib/nvidia
mount -o remount,exec /var/lib/nvidia
/var/lib/nvidia/bin/nvidia-smi

registry="${IMAGE%%/*}"       # REGION-docker.pkg.dev: pull with the VM's service account
docker-credential-gcr configure-docker --registries="$registry"

read -r -a args <<< "${ARGS:---config configs/lora.yaml --data.root data/prepared}"
status=0
docker run --rm --name cvgen-train \
  --volume /var/lib/nvidia/lib64:/usr/local/nvidia/lib64 \
  --volume /var/lib/nvidia/bin:/usr/local/nvidia/bin \
  --device /dev/nvidia0:/dev/nvidia0 \
  --device /dev/nvidia-uvm:/dev/nvidia-uvm \
  --device /dev/nvidiactl:/dev/nvidiactl \
  --volume "$WORK/runs:/runs" \
  --env CVGEN_RUN_DIR="/runs/$RUN_NAME" \
  --env CVGEN_DVC_REMOTE="$DVC_REMOTE" \
  --env WANDB_API_KEY_SECRET="$WANDB_SECRET" \
  "$IMAGE" "${args[@]}" --ckpt_path last || status=$?
echo "cvgen-train: exit status $status"

if [ -n "$BUCKET" ]; then
  # gcloud from its own image, with the VM's service account
  docker run --rm --volume "$WORK/runs:/runs:ro" gcr.io/google.com/cloudsdktool/google-cloud-cli:slim \
    gcloud storage rsync --recursive "/runs/$RUN_NAME" "gs://$BUCKET/runs/$RUN_NAME"
fi
if [ "$status" = 0 ] && [ "$POWER_OFF" != "false" ]; then
  poweroff
fi
