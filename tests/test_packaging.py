"""The wheel ships the configs: `--config glue/mrpc.yaml` works from an install outside the checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

from spafit_jax.config import files as config_lib

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_names_resolve_without_the_file_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("glue/mrpc.yaml", "configs/glue/mrpc.yaml"):
        assert config_lib.load_config([name]).data.task == "mrpc"
    assert config_lib.shipped_config("glue/nope.yaml") is None


def test_wheel_installed_outside_the_checkout_prints_a_packaged_glue_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("spafit_jax-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "spafit_jax/configs/glue/mrpc.yaml" in names and "spafit_jax/configs/methods/spafit.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    out = subprocess.run([sys.executable, "-c", "import spafit_jax, sys; from spafit_jax.train import main; "
                          "print(spafit_jax.__file__); sys.exit(main(sys.argv[1:]))",
                          "--config", "glue/mrpc.yaml", "--config", "configs/methods/lora.yaml", "--print-config"],
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(str(site))
    assert "task: mrpc" in out.stdout and "name: lora" in out.stdout


# ---- the light install and the console scripts ----------------------------------------------------------
COMMANDS = ("train", "predict", "export", "experiment", "report", "protocol", "aot")


def _pyproject():
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement):
    import re

    return re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0].lower()


def test_base_install_is_jax_flax_optax_numpy_and_the_rest_is_the_train_extra():
    project = _pyproject()
    assert {_name(r) for r in project["dependencies"]} == {"jax", "flax", "optax", "numpy"}
    train = {_name(r) for r in project["optional-dependencies"]["train"]}
    assert {"transformers", "datasets", "orbax-checkpoint", "matplotlib", "scikit-learn"} <= train
    from spafit_jax import launch

    import_names = {"pyyaml": "yaml", "scikit-learn": "sklearn", "orbax-checkpoint": "orbax.checkpoint"}
    assert {import_names.get(n, n) for n in train} == {m.lower() for m in launch.TRAIN_EXTRA}


def test_console_scripts_name_every_command():
    import ast

    scripts = _pyproject()["scripts"]
    assert scripts == {f"spafit-{c}": f"spafit_jax.launch:{c}" for c in COMMANDS}
    for c in COMMANDS:
        tree = ast.parse((ROOT / "spafit_jax" / f"{c}.py").read_text())
        main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
        assert main is not None, c
        assert "cli.run_command(" in ast.unparse(main), f"{c}.main does not go through cli.run_command"


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys):
    import runpy

    import pytest

    from spafit_jax import launch

    monkeypatch.setattr(launch, "TRAIN_EXTRA", ("yaml", "no_such_module.sub"))
    assert launch.missing() == ["no_such_module.sub"]
    assert launch._run("export") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spafit-export" in err and "pip install 'spafit-jax[train]'" in err
    with pytest.raises(ModuleNotFoundError, match=r"spafit-predict needs the training extra .*spafit-jax\[train\]"):
        launch.require_extra("spafit_jax.predict")
    monkeypatch.setattr(sys, "argv", ["/x/spafit_jax/report.py"])
    with pytest.raises(SystemExit) as e:  # python -m spafit_jax.report stops at its first line
        runpy.run_module("spafit_jax.report", run_name="__main__")
    assert e.value.code == 2 and "spafit-report needs the training extra" in capsys.readouterr().err
