#!/usr/bin/env bash
# ssh into one worker of a TPU VM / pod slice, or run a command on several or all of them.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $SCRIPT_NAME --name NAME --zone ZONE [--worker N | --all] [options] [-- COMMAND...]

Without COMMAND: an interactive shell on worker N (default 0).
With COMMAND: run it on the chosen workers at once (each prints its own output). As with
ssh(1), the words of COMMAND are joined with spaces and run by the remote shell, so quote
pipes and globs: $SCRIPT_NAME ... --all -- 'ps aux | grep [s]pafit_jax'

  --name NAME          TPU node id
  --zone ZONE          zone of the node
  --project PROJECT    Google Cloud project (default: gcloud's configured project)
  --worker SPEC        0 (default), 3, 0,2, 1-3 or all (several only with a COMMAND)
  --all                same as --worker all
  --logs               COMMAND = follow the run's per-worker logs written by launch.sh
                       (tail -F REMOTE_DIR/LOG_DIR/NAME-worker*.log) on the chosen workers
  --remote-dir DIR     with --logs: project folder on the workers (default: ~/$REMOTE_DIR_DEFAULT)
  --log-dir DIR        with --logs: log folder, relative to REMOTE_DIR (default: $LOG_DIR_DEFAULT)
  --dry-run            print the gcloud command instead of running it
  -h, --help           show this help

examples:
  $SCRIPT_NAME --name sst2 --zone us-central2-b                       # shell on worker 0
  $SCRIPT_NAME --name sst2 --zone us-central2-b --all -- nproc         # on every worker
  $SCRIPT_NAME --name sst2 --zone us-central2-b --worker 1 --logs      # worker 1's log
  $SCRIPT_NAME --name sst2 --zone us-central2-b --all -- tmux kill-session -t $SESSION_DEFAULT
EOF
}

WORKER=0 LOGS=0 REMOTE_DIR=$REMOTE_DIR_DEFAULT LOG_DIR=$LOG_DIR_DEFAULT
COMMAND=()
script_option() { # all but --name, --zone (both required), --project, --dry-run: see parse_options
  case $1 in
    --) takes_rest "$@"; COMMAND=("${@:2}") ;;
    --worker) takes_value "$@"; WORKER=$2 ;;
    --remote-dir) takes_value "$@"; REMOTE_DIR=$2 ;;
    --log-dir) takes_value "$@"; LOG_DIR=$2 ;;
    --all) WORKER=all ;;
    --logs) LOGS=1 ;;
    *) unknown_option "$1" ;;
  esac
}
parse_options "$@"

check_name "$NAME"
check_worker "$WORKER"
location_flags

cmd=("$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOC_FLAGS[@]}" --worker="$WORKER")
if ((LOGS)); then
  ((${#COMMAND[@]} == 0)) || die "--logs and a COMMAND exclude each other"
  COMMAND=(tail -n 50 -F "$(q "$(remote_log "$REMOTE_DIR" "$LOG_DIR" "$NAME")")-worker*.log")
fi
if ((${#COMMAND[@]})); then
  cmd+=(--command "${COMMAND[*]}")
elif [[ ! $WORKER =~ ^[0-9]+$ ]]; then
  die "an interactive shell needs one worker (--worker N); to reach several, give a COMMAND after --"
fi
run "${cmd[@]}"
