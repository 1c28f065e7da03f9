"""The console scripts, kept light: each checks that the `[train]` extra is installed, then runs its command.

`pip install spafit-jax` brings the masking and LoRA utilities only (jax, flax, optax, numpy); the
trainer, data, export and report need `pip install 'spafit-jax[train]'`. Without it, every command
(and `python -m spafit_jax.<command>`, through `require_extra`) says so in one line instead of a
traceback about a missing module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

#: modules of the `[train]` extra (import names), as pyproject.toml lists their packages.
TRAIN_EXTRA = ("transformers", "tokenizers", "datasets", "safetensors", "huggingface_hub", "yaml", "tqdm",
               "sklearn", "scipy", "tensorboardX", "matplotlib", "orbax.checkpoint")
INSTALL = "pip install 'spafit-jax[train]'"


def missing() -> list[str]:
    """The modules of the `[train]` extra that cannot be imported here."""
    out = []
    for name in TRAIN_EXTRA:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            out.append(name)
    return out


def _message(command: str, absent: list[str]) -> str:
    return f"spafit-{command} needs the training extra ({', '.join(absent)} not installed); run: {INSTALL}"


def require_extra(module: str) -> None:
    """Called first by each command module: a one-line exit under `python -m`, an ImportError on import."""
    absent = missing()
    if not absent:
        return
    command = module.rsplit(".", 1)[-1]
    if module == "__main__":
        command = (sys.argv[0].rsplit("/", 1)[-1].removesuffix(".py") if sys.argv else "") or "command"
        print(_message(command, absent), file=sys.stderr)
        raise SystemExit(2)
    raise ModuleNotFoundError(_message(command, absent), name=absent[0])


def _run(command: str) -> int:
    absent = missing()
    if absent:
        print(_message(command, absent), file=sys.stderr)
        return 2
    return importlib.import_module(f"spafit_jax.{command}").main()


def train() -> None:
    """`spafit-train`."""
    sys.exit(_run("train"))


def predict() -> None:
    """`spafit-predict`."""
    sys.exit(_run("predict"))


def export() -> None:
    """`spafit-export`."""
    sys.exit(_run("export"))


def experiment() -> None:
    """`spafit-experiment`."""
    sys.exit(_run("experiment"))


def report() -> None:
    """`spafit-report`."""
    sys.exit(_run("report"))


def protocol() -> None:
    """`spafit-protocol`."""
    sys.exit(_run("protocol"))


def aot() -> None:
    """`spafit-aot`."""
    sys.exit(_run("aot"))
