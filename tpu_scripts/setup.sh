#!/usr/bin/env bash
# Install the project with jax[tpu] on every worker of a TPU VM / pod slice, and Cloud Storage
# FUSE (gcsfuse, for a gs:// --workdir of launch.sh) where it is missing; then check that JAX sees
# the TPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

LIBTPU_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

usage() {
  cat <<EOF
usage: $SCRIPT_NAME --name NAME --zone ZONE [options]

On every worker (--worker=all): install gcsfuse if it is missing (sudo apt-get, from Google's
apt repository gcsfuse-\$(lsb_release -c -s); launch.sh mounts a gs:// --workdir with it), put the
project in REMOTE_DIR, make a venv REMOTE_DIR/.venv, pip install -e '.[tpu]' (jax[tpu] and
libtpu), and print what JAX sees (smoke test).
Safe to run again (after a code change, or on a recreated VM).

Where the code comes from (default: your local checkout):
  (default)                pack the local checkout (tracked and untracked files, without .git,
                           .venv, runs/, logs/, caches) and scp it to every worker: the workers
                           run exactly the code you have, uncommitted edits included, and
                           need no git credentials
  --src DIR                the local checkout to pack (default: $REPO_DIR)
  --git-url URL            instead, git clone URL on every worker (it must be reachable there)
  --git-ref REF            with --git-url: branch, tag or commit to check out (default: HEAD)

required:
  --name NAME              TPU node id
  --zone ZONE              zone of the node

options:
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --worker SPEC            workers to set up: all (default), 0, 0,2 or 1-3; on a pod slice
                           the smoke test waits until JAX runs on every worker, so set up all
  --remote-dir DIR         project folder on the workers (default: ~/$REMOTE_DIR_DEFAULT)
  --python PYTHON          interpreter that makes the venv (default: python3)
  --extras EXTRAS          pip extras to install (default: tpu)
  --no-find-links          do not pass -f $LIBTPU_LINKS
                           to pip (recent jax[tpu] finds libtpu on PyPI alone)
  --no-gcsfuse             do not install gcsfuse (a --workdir that is not on GCS needs none)
  --dry-run                print the commands instead of running them
  -h, --help               show this help
EOF
}

WORKER=all REMOTE_DIR=$REMOTE_DIR_DEFAULT PYTHON=python3 EXTRAS=tpu
SRC=$REPO_DIR GIT_URL="" GIT_REF=HEAD FIND_LINKS=1 GCSFUSE=1
script_option() { # all but --name, --zone (both required), --project, --dry-run: see parse_options
  case $1 in
    --worker) takes_value "$@"; WORKER=$2 ;;
    --remote-dir) takes_value "$@"; REMOTE_DIR=$2 ;;
    --python) takes_value "$@"; PYTHON=$2 ;;
    --extras) takes_value "$@"; EXTRAS=$2 ;;
    --src) takes_value "$@"; SRC=$2 ;;
    --git-url) takes_value "$@"; GIT_URL=$2 ;;
    --git-ref) takes_value "$@"; GIT_REF=$2 ;;
    --no-find-links) FIND_LINKS=0 ;;
    --no-gcsfuse) GCSFUSE=0 ;;
    *) unknown_option "$1" ;;
  esac
}
parse_options "$@"

check_name "$NAME"
check_worker "$WORKER"
require "$REMOTE_DIR" --remote-dir
[[ $EXTRAS =~ ^[A-Za-z0-9_,-]+$ ]] || die "bad --extras '$EXTRAS': e.g. tpu or tpu,test"
location_flags
ssh_cmd=("$GCLOUD" compute tpus tpu-vm ssh "$NAME" "${LOC_FLAGS[@]}" --worker="$WORKER")

# 1. The code.
fetch=""
if [[ -n $GIT_URL ]]; then
  fetch="if [ ! -d $(q "$REMOTE_DIR")/.git ]; then git clone --quiet $(q "$GIT_URL") $(q "$REMOTE_DIR"); fi
git -C $(q "$REMOTE_DIR") fetch --quiet origin $(q "$GIT_REF")
git -C $(q "$REMOTE_DIR") checkout --quiet --detach FETCH_HEAD
echo \"code: \$(git -C $(q "$REMOTE_DIR") rev-parse --short HEAD)\""
else
  [[ -f $SRC/pyproject.toml ]] || die "--src $SRC is not the project checkout (no pyproject.toml there)"
  tarball="${TMPDIR:-/tmp}/spafit_jax-$NAME-src.tgz"
  remote_tarball="spafit_jax-$NAME-src.tgz"
  ((DRY_RUN)) || trap 'rm -f "$tarball"' EXIT
  run tar -czf "$tarball" -C "$SRC" --exclude=.git --exclude=.venv --exclude=runs --exclude=logs \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.hypothesis \
    --exclude=build --exclude=dist .
  run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$NAME:$remote_tarball" "${LOC_FLAGS[@]}" \
    --worker="$WORKER"
  fetch="mkdir -p $(q "$REMOTE_DIR")
tar -xzf $(q "$remote_tarball") -C $(q "$REMOTE_DIR")
rm -f $(q "$remote_tarball")"
fi

# 2. gcsfuse where it is missing: Google's apt repository for this Ubuntu release, as in
# https://cloud.google.com/storage/docs/cloud-storage-fuse/install (TPU VM images are Ubuntu).
gcsfuse_install=""
if ((GCSFUSE)); then
  gcsfuse_install="if command -v gcsfuse >/dev/null 2>&1; then
  echo \"\$(hostname): gcsfuse is installed: \$(gcsfuse --version 2>&1 | head -n 1)\"
else
  repo=gcsfuse-\$(lsb_release -c -s 2>/dev/null || echo unknown)
  echo \"\$(hostname): installing gcsfuse from https://packages.cloud.google.com/apt \$repo\"
  if ! { curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null &&
    echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$repo main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null &&
    sudo apt-get update -qq &&
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse &&
    command -v gcsfuse >/dev/null 2>&1; }; then
    echo \"\$(hostname): error: could not install gcsfuse (apt repository \$repo), which launch.sh needs for a gs:// --workdir; install it by hand (https://cloud.google.com/storage/docs/cloud-storage-fuse/install) or pass --no-gcsfuse\" >&2
    exit 1
  fi
  echo \"\$(hostname): gcsfuse installed: \$(gcsfuse --version 2>&1 | head -n 1)\"
fi"
fi

# 3. venv, install, smoke test: one ssh per worker, all workers at once.
pip_flags=""
((FIND_LINKS)) && pip_flags=" -f $LIBTPU_LINKS"
script="set -euo pipefail
$gcsfuse_install
$fetch
cd $(q "$REMOTE_DIR")
if [ ! -x .venv/bin/python ]; then
  $(q "$PYTHON") -m venv .venv || {
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    rm -rf .venv && $(q "$PYTHON") -m venv .venv
  }
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e \".[$EXTRAS]\"$pip_flags
smoke=\$(.venv/bin/python -c \"import jax; print(jax.device_count(), jax.local_device_count(), jax.devices()[0].device_kind)\")
echo \"\$(hostname): jax.device_count(), local_device_count(), kind: \$smoke\""
run "${ssh_cmd[@]}" --command "$script"
note "setup done on worker(s) $WORKER of $NAME: project in $(remote_path "$REMOTE_DIR"), venv $(remote_path "$REMOTE_DIR")/.venv"
