"""SPAFIT (Stratified Progressive Adaptation Fine-tuning) for BERT-family encoders in JAX/Flax."""

from importlib import metadata as _metadata

try:  # one owner of the version: pyproject.toml, as installed
    __version__ = _metadata.version("spafit-jax")
except _metadata.PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
__all__ = ["load_run"]


def load_run(workdir, checkpoint="best"):
    """Reload a run folder (see `spafit_jax.after_training.run.load_run`); imported lazily so `import spafit_jax` stays light."""
    from spafit_jax.after_training.run import load_run as _load_run

    return _load_run(workdir, checkpoint)
