#!/usr/bin/env bash
# Train on Vertex AI: fill in docker/vertex-train.yaml and submit it as a custom job.
#
#   PROJECT=my-project BUCKET=my-bucket IMAGE=europe-west4-docker.pkg.dev/my-project/cvgen/train:TAG \
#     docker/vertex-train.sh
#   gcloud ai custom-jobs stream-logs JOB_ID --region europe-west4     # follow it
#
# Required: PROJECT, BUCKET (the run folder is gs://BUCKET/runs/RUN_NAME), IMAGE (the training
# image docker/cloudbuild.yaml pushed). Optional, with their defaults below: REGION,
# RUN_NAME, BASE_MODEL, DVC_REMOTE, WANDB_SECRET, SERVICE_ACCOUNT.
# DRY_RUN=1 prints the filled-in job spec instead of submitting it.
set -euo pipefail

: "${PROJECT:?set PROJECT (the Google Cloud project)}"
: "${BUCKET:?set BUCKET (runs go to gs://BUCKET/runs/)}"
: "${IMAGE:?set IMAGE (the training image, e.g. REGION-docker.pkg.dev/PROJECT/cvgen/train:TAG)}"
REGION="${REGION:-europe-west4}"
RUN_NAME="${RUN_NAME:-portraits-$(date +%Y%m%d-%H%M%S)}"
BASE_MODEL="${BASE_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}"   # or /gcs/BUCKET/models/sd15
DVC_REMOTE="${DVC_REMOTE:-gs://${BUCKET}/dvc}"
WANDB_SECRET="${WANDB_SECRET:-projects/${PROJECT}/secrets/wandb-api-key/versions/latest}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-cvgen-train@${PROJECT}.iam.gserviceaccount.com}"
export IMAGE BUCKET RUN_NAME BASE_MODEL DVC_REMOTE WANDB_SECRET SERVICE_ACCOUNT

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
spec="$(mktemp "${TMPDIR:-/tmp}/cvgen-vertex-XXXXXX.yaml")"
trap 'rm -f "$spec"' EXIT
# only these variables are replaced; a ${...} left over is an error
python3 - "$here/vertex-train.yaml" "$spec" <<'PY'
import os, re, sys
names = ("IMAGE", "BUCKET", "RUN_NAME", "BASE_MODEL", "DVC_REMOTE", "WANDB_SECRET",
         "SERVICE_ACCOUNT")
text = open(sys.argv[1]).read()
for name in names:
    text = text.replace("${%s}" % name, os.environ[name])
left = re.findall(r"\$\{(\w+)\}", text)
if left:
    sys.exit(f"vertex-train: {sys.argv[1]} uses unknown variables: {', '.join(left)}")
open(sys.argv[2], "w").write(text)
PY

if [ -n "${DRY_RUN:-}" ]; then
  cat "$spec"
  exit 0
fi
gcloud ai custom-jobs create --project "$PROJECT" --region "$REGION" \
  --display-name "cvgen-$RUN_NAME" --config "$spec"
echo "vertex-train: the LoRA will be in gs://$BUCKET/runs/$RUN_NAME/lora/" >&2
