"""The wheel ships the configs: `--config glue/mrpc.yaml` works from an install outside the checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

from spafit_jax import config as config_lib

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
