"""The data pipeline's entry points: a ``data:`` config in, a tokenised task out.

``sources`` reads the raw examples and checks every row, ``tokens`` turns them into padded token
ids (cached on disk), ``batching`` cuts them into bucketed batches; ``tasks`` is the registry
they share. The trainer calls `load_task_data`, then cuts ``TaskData.train`` / ``evals`` with
`batching`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from spafit_jax.errors import DataError
from spafit_jax.data.sources import DataSection, Examples, read_task, task_from_config
from spafit_jax.data.tasks import TaskSpec
from spafit_jax.data.tokens import Encoded, encode

__all__ = ["TaskData", "load_task_data", "load_task_texts", "task_from_config"]

_SUBSET_SALT = 0  # seeds limit subsets with the run's seed; changing it moves every subset


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """A task's spec, its tokenised train split and its eval splits by name."""

    spec: TaskSpec
    train: Encoded
    evals: dict[str, Encoded]


def _subset(ex: Examples, limit: int | None, seed: int) -> Examples:
    """A deterministic subset of ``limit`` examples (seeded choice, original order kept)."""
    if limit is None or limit >= len(ex):
        return ex
    keep = np.sort(np.random.default_rng([_SUBSET_SALT, seed]).permutation(len(ex))[:limit])
    return Examples([ex.texts_a[i] for i in keep],
                    [ex.texts_b[i] for i in keep] if ex.texts_b is not None else None,
                    ex.labels[keep])


def load_task_texts(cfg: DataSection, *, seed: int
                    ) -> tuple[TaskSpec, Examples, dict[str, Examples]]:
    """Checked, untokenised ``(spec, train, evals)``.

    ``data.limit_train`` keeps a subset of the train split chosen by ``seed``; ``data.limit_eval``
    a fixed subset of each eval split. Subsets keep the original order.
    """
    spec, splits = read_task(cfg)
    train = _subset(splits[spec.train_split], cfg.limit_train, seed)
    if len(train) == 0:
        raise DataError(f"the train split of task {spec.name} is empty; add examples")
    evals = {}
    for split in spec.eval_splits:
        evals[split] = _subset(splits[split], cfg.limit_eval, 0)
        if len(evals[split]) == 0:
            raise DataError(f"eval split {split!r} of task {spec.name} is empty; add examples")
    return spec, train, evals


def load_task_data(cfg: DataSection, tokenizer: Any, *, seed: int) -> TaskData:
    """Load, check and tokenise a task: ``TaskData(spec, train, evals)``.

    ``seed`` only picks the ``data.limit_train`` subset.
    """
    spec, train, evals = load_task_texts(cfg, seed=seed)
    return TaskData(spec, encode(tokenizer, train, max_length=cfg.max_length),
                    {s: encode(tokenizer, ex, max_length=cfg.max_length)
                     for s, ex in evals.items()})

