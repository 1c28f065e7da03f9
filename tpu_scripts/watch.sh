#!/usr/bin/env bash
# Watch a TPU VM that runs a training job; when it is preempted (or gone), delete and recreate
# it, set it up again and relaunch the same command with the same --workdir, so that the run
# resumes from its last Orbax checkpoint. Bounded retries.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $SCRIPT_NAME --name NAME --zone ZONE --type TYPE --workdir DIR [options] [-- TRAIN_ARGS...]

Every --interval seconds, read the state of TPU node NAME (queued resource NAME with --queued):
  READY (ACTIVE)                      look at worker 0: the run finished -> exit with its status
                                      (0 done, 1 failed: a failure is not a preemption, so no
                                      relaunch); no training process and no exit status (the
                                      VM was restarted) -> launch.sh again
  PREEMPTED, TERMINATED, STOPPED,     relaunch: delete.sh, create.sh, setup.sh, launch.sh with
  SUSPENDED, FAILED, or not found     the options below; the run resumes from --workdir
  CREATING, REPAIRING, ... (other)    wait
  unreadable 3 polls in a row         relaunch
Give the same options you gave create.sh, setup.sh and launch.sh. --dry-run prints the whole
sequence once, with the node taken to be PREEMPTED (see --simulate-state), and stops.

required:
  --name NAME              TPU node id
  --zone ZONE              zone of the node
  --type TYPE              accelerator type to recreate (v4-8, v5litepod-8, ...)
  --workdir DIR            the run folder given to launch.sh (gs://... so that it outlives the VM;
                           every new VM mounts the bucket again)

recreate (create.sh):
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --runtime-version VER    TPU software version (default: create.sh's choice for TYPE)
  --spot | --preemptible   provisioning model of the node
  --queued                 the node comes from a queued resource (create.sh --queued)
  --create-arg ARG         extra flag for gcloud create, e.g. --create-arg=--network=my-net
                           (repeatable)
set up (setup.sh):
  --src DIR | --git-url URL [--git-ref REF]   where the code comes from (default: this checkout)
  --remote-dir DIR         project folder on the workers (default: ~/$REMOTE_DIR_DEFAULT)
  --setup-arg ARG          extra option for setup.sh, e.g. --setup-arg=--no-find-links (repeatable)
launch (launch.sh):
  --config FILE            config YAML (repeatable), --env KEY=VALUE (repeatable),
  --module MODULE, --log-dir DIR, --session NAME, --no-distributed     as in launch.sh
  -- TRAIN_ARGS...         passed to python -m spafit_jax.train (or .experiment)
watch:
  --interval SECONDS       seconds between polls (default 120)
  --max-retries N          give up (exit 1) after N relaunches (default 5)
  --once                   poll once, act, and exit
  --simulate-state STATE   with --dry-run: the state to pretend the node is in (default PREEMPTED)
  --dry-run                print the commands instead of running them
  -h, --help               show this help
EOF
}

TYPE="" RUNTIME="" WORKDIR="" QUEUED=0 PROVISION=""
SRC="" GIT_URL="" GIT_REF="" REMOTE_DIR=$REMOTE_DIR_DEFAULT LOG_DIR=$LOG_DIR_DEFAULT
SESSION=$SESSION_DEFAULT DISTRIBUTED=1 INTERVAL=120 MAX_RETRIES=5 ONCE=0 SIMULATE="" MODULE=train
CREATE_EXTRA=() SETUP_EXTRA=() CONFIGS=() ENVS=() TRAIN_ARGS=()
script_option() { # all but --name, --zone (both required), --project, --dry-run: see parse_options
  case $1 in
    --) takes_rest "$@"; TRAIN_ARGS=("${@:2}") ;;
    --type) takes_value "$@"; TYPE=$2 ;;
    --runtime-version) takes_value "$@"; RUNTIME=$2 ;;
    --workdir) takes_value "$@"; WORKDIR=$2 ;;
    --create-arg) takes_any_value "$@"; CREATE_EXTRA+=("$2") ;;
    --setup-arg) takes_any_value "$@"; SETUP_EXTRA+=("$2") ;;
    --src) takes_value "$@"; SRC=$2 ;;
    --git-url) takes_value "$@"; GIT_URL=$2 ;;
    --git-ref) takes_value "$@"; GIT_REF=$2 ;;
    --remote-dir) takes_value "$@"; REMOTE_DIR=$2 ;;
    --config) takes_value "$@"; CONFIGS+=("$2") ;;
    --module) takes_value "$@"; MODULE=$2 ;;
    --env) takes_value "$@"; ENVS+=("$2") ;;
    --log-dir) takes_value "$@"; LOG_DIR=$2 ;;
    --session) takes_value "$@"; SESSION=$2 ;;
    --interval) takes_value "$@"; INTERVAL=$2 ;;
    --max-retries) takes_value "$@"; MAX_RETRIES=$2 ;;
    --simulate-state) takes_value "$@"; SIMULATE=$2 ;;
    --spot | --preemptible)
      [[ -z $PROVISION || $PROVISION == "$1" ]] || die "--spot and --preemptible exclude each other: pick one"
      PROVISION=$1 ;;
    --queued) QUEUED=1 ;;
    --no-distributed) DISTRIBUTED=0 ;;
    --once) ONCE=1 ;;
    *) unknown_option "$1" ;;
  esac
}
parse_options "$@"

require "$TYPE" --type
require "$WORKDIR" --workdir
check_name "$NAME"
check_uint "$INTERVAL" --interval
check_uint "$MAX_RETRIES" --max-retries
[[ -z $SRC || -z $GIT_URL ]] || die "--src and --git-url exclude each other: pick one"
if [[ -n $SIMULATE ]]; then
  ((DRY_RUN)) || die "--simulate-state only applies to --dry-run"
  [[ $SIMULATE =~ ^[A-Z_]+$ ]] || die "bad --simulate-state '$SIMULATE': e.g. PREEMPTED, READY, MISSING"
fi
SIMULATE=${SIMULATE:-PREEMPTED}
location_flags

# The arguments of the four steps; each script checks its own up front (below), so that a
# typo fails now rather than at the first preemption hours later.
node=(--name "$NAME" --zone "$ZONE")
[[ -n $PROJECT ]] && node+=(--project "$PROJECT")
dry=()
((DRY_RUN)) && dry=(--dry-run)
delete_args=("${node[@]}" --yes)
((QUEUED)) && delete_args+=(--queued)
create_args=("${node[@]}" --type "$TYPE")
[[ -n $RUNTIME ]] && create_args+=(--runtime-version "$RUNTIME")
[[ -n $PROVISION ]] && create_args+=("$PROVISION")
((QUEUED)) && create_args+=(--queued)
setup_args=("${node[@]}" --remote-dir "$REMOTE_DIR")
[[ -n $SRC ]] && setup_args+=(--src "$SRC")
[[ -n $GIT_URL ]] && setup_args+=(--git-url "$GIT_URL")
[[ -n $GIT_REF ]] && setup_args+=(--git-ref "$GIT_REF")
setup_args+=(${SETUP_EXTRA[@]+"${SETUP_EXTRA[@]}"})
# --no-preflight: a relaunch resumes a run that passed its preflight when launch.sh first started it
launch_args=("${node[@]}" --workdir "$WORKDIR" --remote-dir "$REMOTE_DIR" --log-dir "$LOG_DIR"
  --session "$SESSION" --module "$MODULE" --no-preflight)
for c in ${CONFIGS[@]+"${CONFIGS[@]}"}; do launch_args+=(--config "$c"); done
for e in ${ENVS[@]+"${ENVS[@]}"}; do launch_args+=(--env "$e"); done
((DISTRIBUTED)) || launch_args+=(--no-distributed)

create_step() { "$SCRIPT_DIR/create.sh" "${create_args[@]}" "$@" -- ${CREATE_EXTRA[@]+"${CREATE_EXTRA[@]}"}; }
setup_step() { "$SCRIPT_DIR/setup.sh" "${setup_args[@]}" "$@"; }
launch_step() { "$SCRIPT_DIR/launch.sh" "${launch_args[@]}" "$@" -- ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; }
delete_step() { "$SCRIPT_DIR/delete.sh" "${delete_args[@]}" "$@"; }

errfile=$(mktemp "${TMPDIR:-/tmp}/spafit-watch.XXXXXX")
trap 'rm -f "$errfile"' EXIT
for step in create_step setup_step launch_step delete_step; do
  if ! "$step" --dry-run >/dev/null 2>"$errfile"; then
    cat "$errfile" >&2
    die "the options for ${step%_step}.sh are wrong (above); nothing was done"
  fi
done
if [[ $WORKDIR != gs://* ]]; then
  warn "--workdir $WORKDIR is not on GCS: a recreated VM starts with empty disks, so the run" \
    "resumes only if that folder lives on storage that outlives the VM"
fi

# poll_state: the node's state, MISSING when gcloud says it does not exist, UNKNOWN when the
# state could not be read. A queued resource's ACTIVE reads as READY.
poll_state() {
  local cmd out
  if ((QUEUED)); then
    cmd=("$GCLOUD" compute tpus queued-resources describe "$NAME" "${LOC_FLAGS[@]}" --format='value(state.state)')
  else
    cmd=("$GCLOUD" compute tpus tpu-vm describe "$NAME" "${LOC_FLAGS[@]}" --format='value(state)')
  fi
  if ((DRY_RUN)); then
    run "${cmd[@]}"
    note "dry run: taking the state to be $SIMULATE"
    echo "$SIMULATE"
    return
  fi
  if out=$(run "${cmd[@]}" 2>"$errfile"); then
    out=${out//[[:space:]]/}
    [[ $out == ACTIVE ]] && out=READY
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found|does not exist' "$errfile"; then
    echo MISSING
  else
    tail -n 3 "$errfile" >&2
    echo UNKNOWN
  fi
}

# job_status: worker 0's exit status once the run ended, "running" while it runs, "gone" when
# neither (e.g. the VM restarted), "" when worker 0 could not be reached.
job_status() {
  local exit_file check out
  exit_file=$(remote_log "$REMOTE_DIR" "$LOG_DIR" "$NAME-worker0.exit")
  check="cat $(q "$exit_file") 2>/dev/null || { { pgrep -f '[s]pafit_jax[.](train|experiment)' || tmux has-session -t $(q "$SESSION"); } >/dev/null 2>&1 && echo running || echo gone; }"
  if ((DRY_RUN)); then
    run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOC_FLAGS[@]}" --worker=0 --command "$check"
    note "dry run: taking the run to be still going"
    echo running
    return
  fi
  out=$(run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOC_FLAGS[@]}" --worker=0 --command "$check" \
    2>"$errfile") || { tail -n 3 "$errfile" >&2; echo ""; return; }
  out=$(printf '%s\n' "$out" | tail -n 1)
  echo "${out//[[:space:]]/}"
}

relaunch() {
  note "step 1/4 delete: $NAME (a missing node is fine)"
  delete_step ${dry[@]+"${dry[@]}"} || warn "delete failed; the node may be gone already; going on"
  note "step 2/4 create: $NAME ($TYPE)"
  create_step ${dry[@]+"${dry[@]}"} || return 1
  note "step 3/4 setup: every worker"
  setup_step ${dry[@]+"${dry[@]}"} || return 1
  note "step 4/4 launch: resume from $WORKDIR"
  launch_step ${dry[@]+"${dry[@]}"} || return 1
}

note "watching $NAME every ${INTERVAL}s; at most $MAX_RETRIES relaunches"
attempts=0 unknown=0 pending=0
while :; do
  state=$(poll_state)
  action=none
  case $state in
    READY)
      unknown=0
      job=$(job_status)
      case $job in
        0) note "the run on $NAME finished (worker 0 exit status 0)"; exit 0 ;;
        [0-9]*)
          fail "the run on $NAME failed with exit status $job on worker 0 (not a preemption, so no relaunch); see its log with: $(dirname "$0")/ssh.sh --name $NAME --zone $ZONE --logs" ;;
        gone) note "$NAME is READY but no training runs there and none ended: launching again"
          action=launch ;;
        running) note "$NAME is READY; training is running" ;;
        *) note "$NAME is READY; worker 0 did not answer (${job:-no reply}); asking again later" ;;
      esac
      ;;
    PREEMPTED | TERMINATED | STOPPED | SUSPENDED | SUSPENDING | FAILED | MISSING) action=relaunch ;;
    UNKNOWN)
      unknown=$((unknown + 1))
      note "could not read the state of $NAME ($unknown/3)"
      ((unknown < 3)) || action=relaunch
      ;;
    *) unknown=0; note "$NAME is $state: waiting" ;;
  esac
  ((pending)) && action=relaunch
  if [[ $action != none ]]; then
    unknown=0
    attempts=$((attempts + 1))
    if ((attempts > MAX_RETRIES)); then
      fail "gave up after $MAX_RETRIES relaunches of $NAME (now $state); raise --max-retries or look at it"
    fi
    if [[ $action == launch ]]; then
      note "relaunch $attempts/$MAX_RETRIES: launch again on $NAME"
      if launch_step ${dry[@]+"${dry[@]}"}; then pending=0; else pending=1; fi
    else
      note "relaunch $attempts/$MAX_RETRIES: $NAME is $state"
      if relaunch; then pending=0; else pending=1; fi
    fi
    if ((pending)); then
      warn "relaunch $attempts of $NAME failed; trying again from the start in ${INTERVAL}s"
      ((ONCE)) && exit 1
    else
      note "relaunched $NAME; the run resumes from its last checkpoint in $WORKDIR"
    fi
    if ((DRY_RUN)); then
      note "dry run: stopping after one relaunch"
      exit 0
    fi
  fi
  ((DRY_RUN || ONCE)) && exit 0
  sleep "$INTERVAL"
done
