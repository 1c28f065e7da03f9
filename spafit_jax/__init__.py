"""SPAFIT (Stratified Progressive Adaptation Fine-tuning) for BERT-family encoders in JAX/Flax."""

__version__ = "0.1.0"
