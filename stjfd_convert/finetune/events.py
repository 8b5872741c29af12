"""Events: callbacks receive these dataclasses; the CLI renders them (nothing in the library prints)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .results import StageSummary
from .schedule import StagePlan


@dataclass
class RunStarted:
    plan: list[StagePlan]
    total_epochs: int
    batches_per_epoch: int  # micro-batches per epoch (per rank)
    steps_per_epoch: int  # optimizer steps per epoch
    train_clips: int
    val_clips: int
    world_size: int
    device: str
    resumed_from: dict[str, int] | None
    run_dir: Path | None


@dataclass
class StageStarted:
    plan: StagePlan
    input_shape: tuple[int, ...]  # per-rank batch as fed to the model
    trainable: list[str]
    frozen: list[str]
    trainable_params: int
    frozen_params: int


@dataclass
class BatchEnd:
    plan: StagePlan
    epoch: int
    batch: int  # 1-based micro-batch within the epoch
    batches: int
    step: int  # optimizer steps done in the run
    optimizer_step: bool  # this micro-batch completed an optimizer step
    loss: float
    lr: float
    clips_per_s: float


@dataclass
class PhaseProgress:
    """BN re-estimation (``phase="bn_recal"``) or evaluation (``"eval"``) progress."""

    phase: str
    epoch: int
    done: int
    total: int


@dataclass
class EpochEnd:
    record: dict[str, Any]


@dataclass
class StageEnd:
    summary: StageSummary


@dataclass
class CheckpointSaved:
    kind: str  # "last" | "best"
    path: Path
    epoch: int


@dataclass
class SkippedFiles:
    entries: list[tuple[str, str, str]]  # (split, path, reason), only new ones


Callback = Callable[[Any], None]
