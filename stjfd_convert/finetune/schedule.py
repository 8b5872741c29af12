"""The stages of a run (alternating temporal/spatial, or joint) and the learning rate of every optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import FinetuneConfig


@dataclass(frozen=True)
class StagePlan:
    """One stage of a run: epochs ``first_epoch`` … ``first_epoch + epochs − 1`` (0-based, global)."""

    index: int
    cycle: int
    stage: str
    first_epoch: int
    epochs: int

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.epochs - 1

    @property
    def label(self) -> str:
        return f"cycle {self.cycle + 1} {self.stage}"


def stage_plan(config: FinetuneConfig) -> list[StagePlan]:
    """The stages of a run in order (alternating: temporal, spatial per cycle; joint: one per cycle)."""
    plans: list[StagePlan] = []
    epoch = 0
    for cycle in range(config.cycles):
        stages = (("temporal", config.epochs_per_stage), ("spatial", config.epochs_per_stage))
        if config.schedule == "joint":
            stages = (("joint", 2 * config.epochs_per_stage),)
        for stage, epochs in stages:
            plans.append(StagePlan(len(plans), cycle, stage, epoch, epochs))
            epoch += epochs
    return plans


def lr_at(step: int, total_steps: int, steps_per_epoch: int, config: FinetuneConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if warmup > 0 and step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "step":
        every = config.lr_step_epochs or 2 * config.epochs_per_stage
        return config.lr * config.lr_gamma ** (step // max(1, every * steps_per_epoch))
    span = max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
