#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice (gcloud compute tpus tpu-vm create), or request one
# through a queued resource (gcloud compute tpus queued-resources create).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $SCRIPT_NAME --name NAME --zone ZONE --type TYPE [options] [-- GCLOUD_FLAGS...]

Create a TPU VM (one host, e.g. v4-8, v5litepod-8) or a pod slice (several hosts, e.g. v4-32).

required:
  --name NAME              TPU node id (lowercase letters, digits, hyphens)
  --zone ZONE              zone, e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)
  --type TYPE              accelerator type: v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ...

options:
  --runtime-version VER    TPU software version; default by family:
                             v2/v3/v4 -> tpu-ubuntu2204-base, v5litepod (v5e) -> v2-alpha-tpuv5-lite,
                             v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --spot                   Spot VM: cheap, preemptible at any time, no runtime limit
  --preemptible            preemptible TPU (legacy; limited runtime); not with --spot
  --queued                 request through a queued resource (waits in a queue for capacity
                           instead of failing; recommended for --spot); the queued resource
                           and the node share NAME
  --no-wait                with --queued: return once the request is accepted instead of
                           waiting until it is ACTIVE
  --wait-timeout SECONDS   with --queued: give up waiting after this long (default 3600)
  --poll-interval SECONDS  with --queued: seconds between state checks (default 30)
  --dry-run                print the gcloud commands instead of running them
  -h, --help               show this help
  -- GCLOUD_FLAGS...       extra flags for the gcloud create command (--network=..., --labels=...)

examples:
  $SCRIPT_NAME --name sst2 --zone us-central2-b --type v4-8
  $SCRIPT_NAME --name sst2 --zone us-west4-a --type v5litepod-8 --spot --queued
EOF
}

# default_runtime TYPE: the TPU software version for JAX on this accelerator family.
default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) return 1 ;;
  esac
}

TYPE="" RUNTIME="" SPOT=0 PREEMPTIBLE=0 QUEUED=0 WAIT=1 WAIT_TIMEOUT=3600 POLL=30
EXTRA=()
script_option() { # all but --name, --zone (both required), --project, --dry-run: see parse_options
  case $1 in
    --) takes_rest "$@"; EXTRA=("${@:2}") ;;
    --type) takes_value "$@"; TYPE=$2 ;;
    --runtime-version) takes_value "$@"; RUNTIME=$2 ;;
    --wait-timeout) takes_value "$@"; WAIT_TIMEOUT=$2 ;;
    --poll-interval) takes_value "$@"; POLL=$2 ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --queued) QUEUED=1 ;;
    --no-wait) WAIT=0 ;;
    *) unknown_option "$1" ;;
  esac
}
parse_options "$@"

require "$TYPE" --type
check_name "$NAME"
check_uint "$WAIT_TIMEOUT" --wait-timeout
check_uint "$POLL" --poll-interval
if [[ $TYPE =~ ^v5e-([0-9]+)$ ]]; then
  die "the accelerator type of TPU v5e is v5litepod-N: use --type v5litepod-${BASH_REMATCH[1]}"
fi
[[ $TYPE =~ ^[a-z0-9]+-[0-9]+$ ]] || die "bad --type '$TYPE': expected e.g. v4-8, v5litepod-8, v5p-8"
if [[ -z $RUNTIME ]]; then
  RUNTIME=$(default_runtime "$TYPE") ||
    die "no default runtime version for '$TYPE': pass --runtime-version (gcloud compute tpus tpu-vm versions list)"
fi
((SPOT && PREEMPTIBLE)) && die "--spot and --preemptible exclude each other: pick one"
((QUEUED && PREEMPTIBLE)) && die "queued resources take --spot, not --preemptible"

location_flags
if ((QUEUED)); then
  cmd=("$GCLOUD" compute tpus queued-resources create "$NAME" --node-id="$NAME"
    "${LOC_FLAGS[@]}" --accelerator-type="$TYPE" --runtime-version="$RUNTIME")
else
  cmd=("$GCLOUD" compute tpus tpu-vm create "$NAME"
    "${LOC_FLAGS[@]}" --accelerator-type="$TYPE" --version="$RUNTIME")
fi
((SPOT)) && cmd+=(--spot)
((PREEMPTIBLE)) && cmd+=(--preemptible)
run "${cmd[@]}" ${EXTRA[@]+"${EXTRA[@]}"}

((QUEUED && WAIT)) || exit 0

# A queued resource is ACCEPTED, then WAITING_FOR_RESOURCES, PROVISIONING and finally ACTIVE
# (its node is then READY); FAILED and SUSPENDED are final.
describe=("$GCLOUD" compute tpus queued-resources describe "$NAME" "${LOC_FLAGS[@]}"
  --format='value(state.state)')
if ((DRY_RUN)); then
  run "${describe[@]}"
  note "dry run: would repeat the line above every ${POLL}s until the state is ACTIVE (at most ${WAIT_TIMEOUT}s)"
  exit 0
fi
start=$SECONDS
while :; do
  state=$(run "${describe[@]}") || state=UNKNOWN
  note "queued resource $NAME: ${state:-UNKNOWN}"
  case $state in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDED | SUSPENDING | DELETING)
      fail "queued resource $NAME is $state; see: $(q "$GCLOUD" compute tpus queued-resources describe "$NAME" "${LOC_FLAGS[@]}")" ;;
  esac
  if ((SECONDS - start >= WAIT_TIMEOUT)); then
    fail "queued resource $NAME not ACTIVE after ${WAIT_TIMEOUT}s (state ${state:-UNKNOWN}); it stays queued: check later or delete it with delete.sh --queued"
  fi
  sleep "$POLL"
done
