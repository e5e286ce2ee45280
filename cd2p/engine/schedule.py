"""Learning-rate schedule: per-step linear warm-up, then cosine decay to ``min_lr``.

The rate is a pure function of the global step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cd2p.config import ScheduleConfig


@dataclass(frozen=True)
class StepPlan:
    """How many optimiser steps a run takes and how its learning rate moves.

    steps_per_epoch: batches per epoch on each rank (the last incomplete batch is dropped).
    total_steps: length of the run, ``epochs * steps_per_epoch`` capped by ``max_steps``.
    warmup_steps: steps of linear warm-up; when ``max_steps`` shortens the run, the warm-up
        shrinks in proportion (``warmup_epochs / epochs`` of the run).
    """

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def from_config(cls, config: ScheduleConfig, steps_per_epoch: int) -> StepPlan:
        if steps_per_epoch < 1:
            raise ValueError("an epoch must hold at least one batch")
        if config.epochs < 1:
            raise ValueError(f"schedule.epochs must be >= 1, got {config.epochs}")
        if not 0 <= config.warmup_epochs <= config.epochs:
            raise ValueError(
                f"schedule.warmup_epochs must be in [0, epochs={config.epochs}], "
                f"got {config.warmup_epochs}"
            )
        full = config.epochs * steps_per_epoch
        total = full if config.max_steps is None else min(full, config.max_steps)
        if total < 1:
            raise ValueError(f"schedule.max_steps must be >= 1, got {config.max_steps}")
        warmup = min(
            config.warmup_epochs * steps_per_epoch,
            round(total * config.warmup_epochs / config.epochs),
        )
        return cls(steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup)


def lr_at(step: int, base_lr: float, min_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    Warm-up rises linearly to ``base_lr`` at step ``warmup_steps - 1``; the cosine then falls
    from ``base_lr`` to ``min_lr`` at the last step.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's rate to ``lr``, scaled by the group's ``lr_scale`` (default 1).

    Groups may carry ``lr_scale`` for layer-wise learning-rate decay when fine-tuning.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
