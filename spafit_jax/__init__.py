"""SPAFIT (Stratified Progressive Adaptation Fine-tuning) for BERT-family encoders in JAX/Flax."""

__version__ = "0.1.0"
__all__ = ["load_run"]


def load_run(workdir, checkpoint="best"):
    """Reload a run folder (see `spafit_jax.run.load_run`); imported lazily so `import spafit_jax` stays light."""
    from spafit_jax.run import load_run as _load_run

    return _load_run(workdir, checkpoint)
