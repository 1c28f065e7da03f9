#!/usr/bin/env bash
# Delete a TPU VM / pod slice, or a queued resource together with its node (tear down).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $SCRIPT_NAME --name NAME --zone ZONE [--project PROJECT] [--queued] [--yes] [--dry-run]

Delete the TPU node NAME (every worker of a pod slice goes with it). Whatever is on the
workers' disks is lost; checkpoints on GCS (gs://...) are not touched.

  --name NAME          TPU node id
  --zone ZONE          zone of the node
  --project PROJECT    Google Cloud project (default: gcloud's configured project)
  --queued             the node was created with create.sh --queued: delete the queued
                       resource and its node (queued-resources delete --force)
  --yes                do not ask for confirmation (gcloud --quiet)
  --dry-run            print the gcloud command instead of running it
  -h, --help           show this help
EOF
}

QUEUED=0 YES=0
script_option() { # all but --name, --zone (both required), --project, --dry-run: see parse_options
  case $1 in
    --queued) QUEUED=1 ;;
    --yes) YES=1 ;;
    *) unknown_option "$1" ;;
  esac
}
parse_options "$@"

check_name "$NAME"
location_flags
if ((QUEUED)); then
  cmd=("$GCLOUD" compute tpus queued-resources delete "$NAME" "${LOC_FLAGS[@]}" --force)
else
  cmd=("$GCLOUD" compute tpus tpu-vm delete "$NAME" "${LOC_FLAGS[@]}")
fi
((YES)) && cmd+=(--quiet)
run "${cmd[@]}"
