#!/usr/bin/env bash
# Train on Compute Engine: one NVIDIA L4 on a g2-standard-4 VM (Container-Optimized OS) whose
# startup script (docker/gce-startup.sh) runs the training image, copies the run folder to
# gs://BUCKET/runs/RUN_NAME and powers the VM off.
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=europe-west4-docker.pkg.dev/my-project/cvgen/train:TAG \
#     docker/gce-train.sh
#   gcloud compute instances get-serial-port-output cvgen-train --zone europe-west4-a   # follow it
#   gcloud compute instances delete cvgen-train --zone europe-west4-a                  # afterwards
#
# Required: PROJECT, BUCKET, IMAGE. Optional, with their defaults below: ZONE, VM, RUN_NAME,
# BASE_MODEL, DVC_REMOTE, WANDB_SECRET, SERVICE_ACCOUNT, SPOT (1: a Spot VM, stopped when
# preempted; start it again and training resumes from its last checkpoint), POWER_OFF.
set -euo pipefail

: "${PROJECT:?set PROJECT (the Google Cloud project)}"
: "${BUCKET:?set BUCKET (runs are copied to gs://BUCKET/runs/)}"
: "${IMAGE:?set IMAGE (the training image, e.g. REGION-docker.pkg.dev/PROJECT/cvgen/train:TAG)}"
ZONE="${ZONE:-europe-west4-a}"
VM="${VM:-cvgen-train}"
RUN_NAME="${RUN_NAME:-portraits-$(date +%Y%m%d-%H%M%S)}"
BASE_MODEL="${BASE_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
DVC_REMOTE="${DVC_REMOTE:-gs://${BUCKET}/dvc}"
WANDB_SECRET="${WANDB_SECRET:-projects/${PROJECT}/secrets/wandb-api-key/versions/latest}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-cvgen-train@${PROJECT}.iam.gserviceaccount.com}"
POWER_OFF="${POWER_OFF:-true}"
ARGS="--config configs/lora.yaml --data.root data/prepared --model.base ${BASE_MODEL} --data.cache_dir /runs/latent_cache --trainer.logger.init_args.name ${RUN_NAME}"

spot=()
if [ "${SPOT:-0}" = 1 ]; then
  spot=(--provisioning-model SPOT --instance-termination-action STOP)
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# metadata values hold spaces and commas: '^|^' makes '|' the separator (gcloud topic escaping)
gcloud compute instances create "$VM" \
  --project "$PROJECT" --zone "$ZONE" \
  --machine-type g2-standard-4 \
  --accelerator type=nvidia-l4,count=1 \
  --maintenance-policy TERMINATE \
  --image-family cos-stable --image-project cos-cloud \
  --boot-disk-size 200GB --boot-disk-type pd-ssd \
  --service-account "$SERVICE_ACCOUNT" --scopes cloud-platform \
  --metadata-from-file startup-script="$here/gce-startup.sh" \
  --metadata "^|^cvgen-image=$IMAGE|cvgen-run-name=$RUN_NAME|cvgen-bucket=$BUCKET|cvgen-dvc-remote=$DVC_REMOTE|cvgen-wandb-secret=$WANDB_SECRET|cvgen-args=$ARGS|cvgen-power-off=$POWER_OFF" \
  ${spot[@]+"${spot[@]}"}
echo "gce-train: the LoRA will be in gs://$BUCKET/runs/$RUN_NAME/lora/ when $VM powers off" >&2
