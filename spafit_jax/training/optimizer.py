"""The optimizer of a run, built from the plan and the `train:` config: one AdamW per trainable label.

`make_optimizer(plan, train_cfg, total_steps)` chains gradient clipping with
`masking.stratified_optimizer` (optax.multi_transform over the plan's labels); each label gets
its own learning-rate schedule (`train.lr_by_label`, else `train.lr`). The steps that apply it
are in `steps`.
"""

from __future__ import annotations

import optax

from spafit_jax import masking
from spafit_jax.training.plan import Plan


def schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup to `peak` over warmup_ratio * total_steps, then linear decay to 0."""
    warmup = min(max(int(round(warmup_ratio * total_steps)), 0), total_steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))],
        [warmup],
    )


def _schedules(plan: Plan, train_cfg, total_steps: int) -> dict[str, optax.Schedule]:
    return {label: schedule(train_cfg.lr_by_label.get(label, train_cfg.lr), total_steps, train_cfg.warmup_ratio)
            for label in plan.trainable_labels}


def make_optimizer(plan: Plan, train_cfg, total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping, then one AdamW per trainable label of the (labelled) `plan` with its own schedule.

    `train_cfg` needs lr, lr_by_label, warmup_ratio, weight_decay and max_grad_norm.
    """
    settings = {label: {"learning_rate": s, "weight_decay": train_cfg.weight_decay}
                for label, s in _schedules(plan, train_cfg, total_steps).items()}
    tx = masking.stratified_optimizer(plan.labels, settings)
    if train_cfg.max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(train_cfg.max_grad_norm), tx)
    return tx


def learning_rates(plan: Plan, train_cfg, total_steps: int, step) -> dict[str, float]:
    """The learning rate of each trainable label at `step` (for logging)."""
    return {label: float(s(step)) for label, s in _schedules(plan, train_cfg, total_steps).items()}
