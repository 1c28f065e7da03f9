#!/usr/bin/env bash
# Launch one training command on every worker of a TPU VM / pod slice, detached (tmux, or nohup
# where tmux is missing) so that it survives the ssh session, with one log file per worker. A
# gs:// --workdir is mounted on every worker with Cloud Storage FUSE (gcsfuse), and the trainer
# gets the mounted local path.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: $SCRIPT_NAME --name NAME --zone ZONE --workdir DIR [options] [-- TRAIN_ARGS...]

Run on every worker, at the same time, in REMOTE_DIR:
  .venv/bin/python -m spafit_jax.MODULE [--config FILE]... --workdir DIR distributed.enabled=true TRAIN_ARGS...
(MODULE: train, or experiment with --module experiment)
inside a detached tmux session (nohup where tmux is missing). Worker N (its index from the
TPU VM metadata) streams its output with tee into LOG_DIR/NAME-workerN.log and, when the
command ends, writes its exit status to LOG_DIR/NAME-workerN.exit (watch.sh reads worker 0's).
distributed.enabled=true makes every worker call jax.distributed.initialize(), which finds the
coordinator, the number of processes and its own index from the TPU VM metadata by itself.
Re-running the same command with the same --workdir resumes from its last Orbax checkpoint.

A gs://BUCKET/PATH workdir: the trainer reads and writes local paths only, so before it starts,
each worker mounts gs://BUCKET at ~/$GCS_MOUNT_DIR/BUCKET with Cloud Storage FUSE (unless it is
mounted there already), with
  gcsfuse ${GCSFUSE_FLAGS[*]} --log-file ~/$GCS_MOUNT_DIR/BUCKET.gcsfuse.log BUCKET ~/$GCS_MOUNT_DIR/BUCKET
and runs the command with --workdir ~/$GCS_MOUNT_DIR/BUCKET/PATH. gcsfuse comes from setup.sh. If
the mount fails, the worker writes one "error:" line to its log and exit status 1 to its .exit file.

required:
  --name NAME              TPU node id
  --zone ZONE              zone of the node
  --workdir DIR            run folder, the same for every worker: gs://BUCKET/PATH (mounted as
                           above, so checkpoints are shared and outlive a preempted VM), or a
                           path every worker sees alike (an NFS mount), passed on as it is

options:
  --config FILE            a config YAML, relative to REMOTE_DIR (repeatable; later wins), e.g.
                           configs/glue/sst2.yaml then configs/methods/spafit.yaml
  --module MODULE          train (default): python -m spafit_jax.train; experiment: python -m
                           spafit_jax.experiment, a grid (--config configs/experiments/FILE,
                           --workdir EXP, and e.g. -- --shard 0/4 --no-report)
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --worker SPEC            workers to launch on: all (default); a subset only for debugging
  --remote-dir DIR         project folder on the workers (default: ~/$REMOTE_DIR_DEFAULT)
  --log-dir DIR            log folder on the workers, relative to REMOTE_DIR (default: $LOG_DIR_DEFAULT)
  --session NAME           tmux session name (default: $SESSION_DEFAULT)
  --env KEY=VALUE          export KEY=VALUE for the training process (repeatable); the
                           defaults are PYTHONUNBUFFERED=1 and JAX_PLATFORMS=tpu
  --no-distributed         leave out distributed.enabled=true
  --no-preflight           skip the preflight: before launching, worker 0 compiles the run's train
                           and eval steps for its own TPU topology (python -m spafit_jax.aot
                           --topology <the VM's accelerator type> with the same --config files and
                           overrides) and the launch stops, with the line that says what to change,
                           when a program would not fit in HBM (exit status 2). Train runs only.
  --follow                 afterwards, stream worker 0's log here (Ctrl-C stops following,
                           not the training)
  --dry-run                print the gcloud commands instead of running them
  -h, --help               show this help
  -- TRAIN_ARGS...         passed to python -m spafit_jax.MODULE as they are, e.g.
                           train.max_steps=2000 train.batch_size=32

example:
  $SCRIPT_NAME --name sst2 --zone us-central2-b --workdir gs://my-bucket/runs/sst2-spafit \\
      --config configs/glue/sst2.yaml --config configs/methods/spafit.yaml -- train.eval_every=500
EOF
}

WORKDIR="" WORKER=all REMOTE_DIR=$REMOTE_DIR_DEFAULT LOG_DIR=$LOG_DIR_DEFAULT
SESSION=$SESSION_DEFAULT DISTRIBUTED=1 FOLLOW=0 MODULE=train PREFLIGHT=1
CONFIGS=() ENVS=() TRAIN_ARGS=()
script_option() { # all but --name, --zone (both required), --project, --dry-run: see parse_options
  case $1 in
    --) takes_rest "$@"; TRAIN_ARGS=("${@:2}") ;;
    --workdir) takes_value "$@"; WORKDIR=$2 ;;
    --config) takes_value "$@"; CONFIGS+=("$2") ;;
    --module) takes_value "$@"; MODULE=$2 ;;
    --worker) takes_value "$@"; WORKER=$2 ;;
    --remote-dir) takes_value "$@"; REMOTE_DIR=$2 ;;
    --log-dir) takes_value "$@"; LOG_DIR=$2 ;;
    --session) takes_value "$@"; SESSION=$2 ;;
    --env) takes_value "$@"; ENVS+=("$2") ;;
    --no-distributed) DISTRIBUTED=0 ;;
    --no-preflight) PREFLIGHT=0 ;;
    --follow) FOLLOW=1 ;;
    *) unknown_option "$1" ;;
  esac
}
parse_options "$@"

require "$WORKDIR" --workdir
check_name "$NAME"
check_worker "$WORKER"
require "$REMOTE_DIR" --remote-dir
require "$LOG_DIR" --log-dir
[[ $SESSION =~ ^[A-Za-z0-9_-]+$ ]] || die "bad --session '$SESSION': use letters, digits, '_' and '-'"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env '$kv': expected KEY=VALUE"
done
[[ $MODULE == train || $MODULE == experiment ]] || die "bad --module '$MODULE': use train or experiment"
# The runner's lines that set $workdir, the folder the trainer gets: for gs://BUCKET/PATH, mount
# the bucket with gcsfuse (unless mounted) and use the mounted path; otherwise DIR as it is.
if [[ $WORKDIR == gs://* ]]; then
  [[ $WORKDIR =~ ^gs://([a-z0-9][-a-z0-9_.]{1,220}[a-z0-9])(/+(.*))?$ ]] ||
    die "bad --workdir '$WORKDIR': expected gs://BUCKET/PATH with a valid bucket name"
  bucket=${BASH_REMATCH[1]} gcs_path=${BASH_REMATCH[3]}
  while [[ $gcs_path == */ ]]; do gcs_path=${gcs_path%/}; done
  [[ $gcs_path =~ ^[A-Za-z0-9._=+@,:%~/-]*$ && ! $gcs_path =~ (^|/)\.\.?(/|$) && $gcs_path != *//* ]] ||
    die "bad --workdir '$WORKDIR': use letters, digits and ._=+@,:%~- in the path, no empty, . or .. parts"
  mnt="\$HOME/$GCS_MOUNT_DIR/$bucket"
  mounted="{ mountpoint -q \"\$mnt\" && ls \"\$mnt\" >/dev/null 2>&1; }"
  mount_failed="cannot mount gs://$bucket at \$mnt with gcsfuse (see the lines above and \$mnt.gcsfuse.log; the VM's service account needs read/write access to the bucket)"
  set_workdir="mnt=$mnt
workdir=\$mnt${gcs_path:+/$(q "$gcs_path")}
if ! command -v gcsfuse >/dev/null 2>&1; then
  fail \"gcsfuse is not installed on this worker, and a gs:// --workdir needs it: run tpu_scripts/setup.sh\"
fi
if ! $mounted; then
  if mountpoint -q \"\$mnt\"; then fusermount -u \"\$mnt\" 2>/dev/null || fusermount3 -u \"\$mnt\" 2>/dev/null; fi
  mkdir -p \"\$mnt\"
  echo \"=== mount gs://$bucket at \$mnt with gcsfuse\" | tee -a \"\$log\"
  gcsfuse $(q "${GCSFUSE_FLAGS[@]}") --log-file \"\$mnt.gcsfuse.log\" $(q "$bucket") \"\$mnt\" 2>&1 | tee -a \"\$log\"
fi
$mounted || fail \"$mount_failed\""
else
  warn "--workdir $WORKDIR is not on GCS: every worker must see the same folder (a shared mount)," \
    "and it must outlive the VM for a resume after preemption"
  set_workdir="workdir=$(q "$WORKDIR")"
fi
location_flags

# The training command and the runner that each worker keeps in LOG_DIR/NAME-launch.sh; the
# runner sets $workdir (above) before it runs the command.
train=(.venv/bin/python -m "spafit_jax.$MODULE")
for c in ${CONFIGS[@]+"${CONFIGS[@]}"}; do train+=(--config "$c"); done
train_rest=()
((DISTRIBUTED)) && train_rest+=(distributed.enabled=true)
train_rest+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
command_line="$(q "${train[@]}") --workdir \"\$workdir\""
((${#train_rest[@]})) && command_line+=" $(q "${train_rest[@]}")"

exports="export PYTHONUNBUFFERED=1 JAX_PLATFORMS=tpu"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do exports+="
export $(q "$kv")"; done
logbase="$(q "$LOG_DIR")/$NAME-worker"
runner_path="$LOG_DIR/$NAME-launch.sh"
runner="#!/usr/bin/env bash
# Written by tpu_scripts/launch.sh: the training command of run $NAME on this worker.
set -uo pipefail
w=\$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null) || w=0
[[ \$w =~ ^[0-9]+\$ ]] || w=0
log=${logbase}\${w}.log
rm -f ${logbase}\${w}.exit
fail() { # one line in the log, exit status 1 in the .exit file (watch.sh reads worker 0's)
  echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) error: \$*\" | tee -a \"\$log\"
  echo 1 > ${logbase}\${w}.exit
  exit 1
}
$exports
# The run folder's lock names this TPU node and worker, which a re-created VM keeps (its host name changes).
export SPAFIT_LOCK_HOST=tpu-vm/$(q "$ZONE/$NAME")/worker\$w
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) start on worker \$w (\$(hostname)), command in \$0\" >> \"\$log\"
$set_workdir
$command_line 2>&1 | tee -a \"\$log\"
status=\${PIPESTATUS[0]}
echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) exit status \$status\" | tee -a \"\$log\"
echo \$status > ${logbase}\${w}.exit
exit \$status"

script="set -euo pipefail
cd $(q "$REMOTE_DIR")
mkdir -p $(q "$LOG_DIR")
cat > $(q "$runner_path") <<'SPAFIT_LAUNCH_EOF'
$runner
SPAFIT_LAUNCH_EOF
if command -v tmux >/dev/null 2>&1; then
  if tmux has-session -t $(q "$SESSION") 2>/dev/null; then
    echo \"\$(hostname): tmux session $SESSION is still running; stop it first: tpu_scripts/ssh.sh --name $NAME --zone $ZONE --worker all -- tmux kill-session -t $SESSION\" >&2
    exit 3
  fi
  tmux new-session -d -s $(q "$SESSION") -c \"\$PWD\" $(q "bash $(q "$runner_path")")
else
  nohup bash $(q "$runner_path") >/dev/null 2>&1 </dev/null &
fi
echo \"\$(hostname): launched; log in $(remote_path "$(remote_log "$REMOTE_DIR" "$LOG_DIR" "$NAME-worker<N>.log")")\""
if [[ -n ${bucket:-} ]]; then
  note "every worker mounts gs://$bucket at ~/$GCS_MOUNT_DIR/$bucket (gcsfuse) and runs with --workdir ~/$GCS_MOUNT_DIR/$bucket${gcs_path:+/$gcs_path}"
fi
# Preflight (train runs): worker 0 compiles the steps for the VM's own topology, ahead of time, on
# its CPU (spafit_jax.aot never opens the TPU); exit status 2 and one line when they would not fit.
if ((PREFLIGHT)) && [[ $MODULE == train ]]; then
  aot=(.venv/bin/python -m spafit_jax.aot --topology)
  aot_rest=()
  for c in ${CONFIGS[@]+"${CONFIGS[@]}"}; do aot_rest+=(--config "$c"); done
  for a in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do # the overrides (section.key=value), not the trainer's options
    [[ $a == -* || $a != *=* ]] || aot_rest+=("$a")
  done
  preflight="set -uo pipefail
cd $(q "$REMOTE_DIR")
topology=\$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/accelerator-type)
$(q "${aot[@]}") \"\$topology\"${aot_rest[*]:+ $(q "${aot_rest[@]}")}"
  note "preflight: worker 0 compiles the run's steps for its TPU topology (skip with --no-preflight)"
  status=0
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOC_FLAGS[@]}" --worker=0 --command "$preflight" || status=$?
  if ((status == 2)); then
    echo "$SCRIPT_NAME: error: preflight: the run would not fit on this TPU or its config is wrong (the error line above says what to change); nothing was launched (--no-preflight skips the check)" >&2
    exit 2
  elif ((status)); then
    warn "the preflight could not run on worker 0 (exit status $status); launching anyway"
  fi
fi
run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOC_FLAGS[@]}" --worker="$WORKER" --command "$script"

if ((FOLLOW)); then
  log0=$(remote_log "$REMOTE_DIR" "$LOG_DIR" "$NAME-worker0.log")
  run "$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOC_FLAGS[@]}" --worker=0 \
    --command "tail -n +1 -F $(q "$log0")"
fi
