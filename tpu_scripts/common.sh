# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables below are used by the scripts that source this file
# Shared helpers for the tpu_scripts/*.sh entry points. Sourced, never run.
#
# Conventions every script follows:
#   * usage errors (unknown option, missing or bad value) print ONE line to stderr and exit 2;
#   * runtime failures (a gcloud call failed, retries exhausted) exit 1;
#   * --dry-run prints each command it would run, one per line, on stdout, as a runnable shell
#     script (notes are "# ..." comments), and never calls gcloud;
#   * a real run echoes each command to stderr as "+ cmd" before running it.
# Works with bash >= 3.2 (the macOS default): no associative arrays, no mapfile, and empty
# arrays are expanded as ${a[@]+"${a[@]}"} so that `set -u` accepts them.

SCRIPT_NAME=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
DRY_RUN=0
GCLOUD=${GCLOUD:-gcloud}

# fd 3 is the real stdout, so commands printed under --dry-run reach the terminal even from
# inside a command substitution.
exec 3>&1

die() { # usage error: one line, exit 2
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 2
}

fail() { # runtime failure: one line, exit 1
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 1
}

warn() { echo "$SCRIPT_NAME: warning: $*" >&2; }

note() { # progress message: a comment in the dry-run script, a log line otherwise
  if ((DRY_RUN)); then
    echo "# $*" >&3
  else
    echo "[$SCRIPT_NAME] $*" >&2
  fi
}

# q WORD...: print the words shell-quoted (single quotes only where needed), space separated.
q() {
  local out="" w
  for w in "$@"; do
    if [[ -n $w && $w =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+="$w "
    elif [[ $w =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then # --flag='value with spaces'
      out+="${BASH_REMATCH[1]}$(q "${BASH_REMATCH[2]}") "
    else
      out+="'${w//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# run CMD...: print the command; execute it unless --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(q "$@")" >&3
    return 0
  fi
  printf '+ %s\n' "$(q "$@")" >&2
  "$@"
}

# parse_options ARGS...: the option loop of every script; it reads the words in order.
# It handles itself what all the scripts share:
#   -h, --help     print the script's usage, exit 0
#   --opt=value    read as the two words --opt value
#   --name NAME, --zone ZONE, --project PROJECT, --dry-run   set NAME, ZONE, PROJECT, DRY_RUN
# and hands every other word, with the words after it, to the script's own function
# `script_option WORD [NEXT_WORDS...]`: a case that sets the script's variables and ends with
# `*) unknown_option "$1" ;;`. An option that takes more words first calls one of
#   takes_value "$@"      its value is the next word, which must not start with --
#   takes_any_value "$@"  its value is the next word, whatever it is (e.g. a flag to pass on)
#   takes_rest "$@"       for --: all the words after it are the script's; parsing stops
# (they set OPT_USED, the number of words parse_options then moves past). At the end it checks
# that --name and --zone were given: every script needs both.
NAME="" ZONE="" PROJECT=""
parse_options() {
  while (($#)); do
    OPT_USED=1
    case $1 in
      -h | --help) usage; exit 0 ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}"; continue ;;
      --name) takes_value "$@"; NAME=$2 ;;
      --zone) takes_value "$@"; ZONE=$2 ;;
      --project) takes_value "$@"; PROJECT=$2 ;;
      --dry-run) DRY_RUN=1 ;;
      *) script_option "$@" ;;
    esac
    shift "$OPT_USED"
  done
  require "$NAME" --name
  require "$ZONE" --zone
}

# takes_value OPT [WORDS...], takes_any_value OPT [WORDS...], takes_rest -- [WORDS...]: called
# by script_option with its "$@"; see parse_options.
takes_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    die "option $1 needs a value (see $SCRIPT_NAME --help)"
  fi
  OPT_USED=2
}

takes_any_value() {
  (($# >= 2)) || die "option $1 needs a value (see $SCRIPT_NAME --help)"
  OPT_USED=2
}

takes_rest() {
  OPT_USED=$#
}

# require VALUE OPT: a required option was given.
require() {
  [[ -n $1 ]] || die "missing required option $2 (see $SCRIPT_NAME --help)"
}

unknown_option() {
  if [[ $1 == -* ]]; then
    die "unknown option $1 (see $SCRIPT_NAME --help)"
  fi
  die "unexpected argument '$1' (see $SCRIPT_NAME --help)"
}

# check_name NAME: a valid Cloud TPU node id (lowercase letters, digits, hyphens).
check_name() {
  [[ $1 =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "bad --name '$1': use lowercase letters, digits and hyphens, starting with a letter"
}

check_uint() { # check_uint VALUE OPT
  [[ $1 =~ ^[0-9]+$ ]] || die "option $2 needs a whole number, got '$1'"
}

# check_worker SPEC: a gcloud --worker value: all, N, N,M,... or N-M.
check_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+([,-][0-9]+)*$ ]] ||
    die "bad --worker '$1': use all, a worker index (0), a list (0,2) or a range (0-3)"
}

# Location flags shared by every gcloud tpus command; needs ZONE and PROJECT set.
location_flags() {
  [[ $ZONE =~ ^[a-z0-9-]+$ ]] || die "bad --zone '$ZONE': expected e.g. us-central2-b"
  [[ -z ${PROJECT:-} || $PROJECT =~ ^[A-Za-z0-9:._-]+$ ]] || die "bad --project '$PROJECT'"
  LOC_FLAGS=("--zone=$ZONE")
  if [[ -n ${PROJECT:-} ]]; then
    LOC_FLAGS+=("--project=$PROJECT")
  fi
}

# remote_path PATH: how a worker path reads in messages (relative paths live in the login home).
remote_path() {
  # shellcheck disable=SC2088 # a literal ~ for the reader
  if [[ $1 == /* ]]; then echo "$1"; else echo "~/$1"; fi
}

# remote_log REMOTE_DIR LOG_DIR FILE: a log file's path on a worker, for use from the login home.
remote_log() {
  if [[ $2 == /* ]]; then echo "$2/$3"; else echo "$1/$2/$3"; fi
}

# Paths of the project checkout on every worker (relative paths are under the login home).
REMOTE_DIR_DEFAULT=spafit_jax
LOG_DIR_DEFAULT=logs
SESSION_DEFAULT=spafit

# A gs://BUCKET/PATH --workdir: launch.sh mounts gs://BUCKET on every worker at
# ~/$GCS_MOUNT_DIR/BUCKET with Cloud Storage FUSE and gives the trainer the local path. The flags,
# for what the trainer does in its run folder (see tpu_scripts/README.md, "The run folder on GCS"):
#   --implicit-dirs                     folders that exist only as object name prefixes (written by
#                                       gcloud storage, Orbax/TensorStore on gs://, or another
#                                       tool) are visible as folders
#   --rename-dir-limit=200000           allow renaming folders of up to that many descendants:
#                                       Orbax finishes a checkpoint by renaming its temporary
#                                       folder (on a flat bucket: copy and delete object by object,
#                                       not atomic); gcsfuse refuses folder renames by default (0)
#   --metadata-cache-ttl-secs=0         no stat/type cache: every worker sees at once what another
#   --metadata-cache-negative-ttl-secs=0  one wrote (checkpoints written by all processes, the
#                                       lock and results of process 0); TPU v5e/v5p/v6e hosts
#                                       otherwise default to an infinite TTL
# No file cache (no --cache-dir): reads come from the bucket.
GCS_MOUNT_DIR=gcs
GCSFUSE_FLAGS=(--implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0
  --metadata-cache-negative-ttl-secs=0 --log-format=text)
