"""Fine-tuning with the paper's alternating temporal/spatial schedule (DESIGN.md §3).

A run is a list of *stages*. ``schedule="alternating"`` gives ``cycles`` × (temporal stage → spatial
stage), each ``epochs_per_stage`` epochs:

- temporal stage: every frame of the clip, frames downsampled by ``spatial_downsample`` (s); the spatial
  atoms Φ are frozen (``requires_grad=False`` and absent from the optimizer), so Ψ, the coefficients A and
  every other parameter (BN, classifier, biases, dense convs) train;
- spatial stage: full-resolution frames, clips temporally downsampled by ``temporal_downsample`` (r);
  the temporal atoms Ψ are frozen.

``schedule="joint"`` is the baseline the paper compares with: every parameter at full size, for the same
number of epochs (one joint stage of 2 · ``epochs_per_stage`` epochs per cycle). A plain, unconverted
model trains everything in every stage.

After each epoch of a downsampled stage the BatchNorm statistics are re-estimated at full resolution
(:func:`recalibrate_batchnorm`, ``bn_recal_batches``) and the model is evaluated at full resolution
(:func:`evaluate`: top-1/top-5, loss, per-class accuracy, confusion matrix).

The training loss is pluggable: ``loss_fn(LossContext) -> Tensor`` (or ``(Tensor, {name: float})`` to
log extra terms). The context carries the outputs, labels, the stage's clips *and* the full-size clips,
and the model being trained, so a distillation loss holding a teacher slots in without changes here
(an ``nn.Module`` loss is moved to the training device).

Run folder (``run_dir``): ``config.json``, ``metrics.jsonl`` (one JSON object per line: ``step``,
``epoch``, ``stage``, ``skipped``, ``interrupted``, ``resumed``, ``error`` records), ``run.log``,
``training_curve.png``, ``last/`` after every epoch and ``best/`` by validation top-1 — both loadable
with :func:`~stjfd_convert.saved_model.load_converted` — and ``last/training_state.pt``: optimizer
state (by parameter name), LR-schedule position, GradScaler, RNG states (torch, CUDA, numpy, python,
stored as tensors/ints so ``torch.load(weights_only=True)`` reads it) and the stage/epoch/batch/step
position, so :func:`resume` continues exactly (bit-identical on CPU with the same seed).

SIGINT/SIGTERM (main thread only) finish the current optimizer step, save ``last/`` and raise
:class:`TrainingInterrupted` (a ``KeyboardInterrupt``); a second Ctrl-C stops at once. A non-finite loss
raises :class:`NonFiniteLossError` and keeps the last good checkpoint.

Distributed (torchrun): when ``WORLD_SIZE`` > 1 the process group is initialised from the environment
(gloo on CPU, nccl on CUDA). ``batch_size`` is the *global* batch: every global batch is the one a
single process would draw, split evenly across ranks (:class:`ShardedShuffleSampler`), and DDP averages
the per-rank mean gradients, so a run without BatchNorm matches a single-process run up to float
rounding. Metrics are summed across ranks; only rank 0 writes files and emits callbacks.

Memory per stage (``measure_memory``): CPU = bytes autograd saves for backward on the stage's first
step (each storage once; parameters and buffers that are saved count once, as parameters) + parameters
+ buffers + gradients + optimizer state after the step; CUDA additionally
``torch.cuda.max_memory_allocated`` over the stage, which is then the reported peak.

Nothing here prints; progress goes to ``callbacks`` (callables receiving the event dataclasses below).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Sampler

from .atomic import atomic_directory, atomic_file, check_output
from . import __version__
from .errors import ConfigError, StjfdError
from .formats import (
    BEST_DIR,
    CONFIG_FILE,
    CURVE_FILE,
    LAST_DIR,
    LOG_FILE,
    METRICS_FILE,
    PNG_SOFTWARE,
    RUN_FORMAT,
    STATE_FILE,
)
from .memory import storage_key
from .models import ArchSpec
from .stages import disable_activation_checkpointing, enable_activation_checkpointing, set_trainable

__all__ = [
    "BatchEnd",
    "Callback",
    "CheckpointSaved",
    "ClassificationLoss",
    "EpochEnd",
    "EvalResult",
    "FinetuneConfig",
    "FinetuneResult",
    "LossContext",
    "LossFn",
    "LossOutput",
    "NonFiniteLossError",
    "PhaseProgress",
    "ResumeError",
    "RunStarted",
    "ShardedShuffleSampler",
    "SkippedFiles",
    "StageEnd",
    "StagePlan",
    "StageStarted",
    "StageSummary",
    "TrainingInterrupted",
    "adapt_classifier",
    "evaluate",
    "evaluate_folder",
    "finetune",
    "finetune_paths",
    "load_training_state",
    "lr_at",
    "plot_training_curve",
    "read_metrics",
    "read_run_config",
    "recalibrate_batchnorm",
    "resume",
    "stage_plan",
]

SCHEDULES = ("alternating", "joint")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "step", "constant")
AMP_DTYPES = ("auto", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
DOWNSAMPLE_MODES = ("area", "bilinear")

STATE_FORMAT = "stjfd-training-state"
STATE_VERSION = 1

# BN re-estimation draws its batches from the training loader under epochs of their own, so that it
# never replays (or shifts) the augmentation of a training epoch.
RECAL_EPOCH_OFFSET = 1_000_000
# Seed offset for a classifier head that has to be re-created for a new number of classes.
HEAD_SEED_OFFSET = 7919


class NonFiniteLossError(StjfdError):
    """The training loss became NaN/Inf; the run folder keeps the last good checkpoint."""


class ResumeError(StjfdError):
    """A run folder that cannot be resumed (missing or damaged state)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM / a callback's KeyboardInterrupt: the step finished and ``last/`` was saved
    (``checkpoint`` is None when no run folder was given or nothing could be saved)."""

    def __init__(
        self, message: str, checkpoint: Path | None, position: Mapping[str, int], signal_name: str = "SIGINT"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.checkpoint = checkpoint
        self.position = dict(position)
        self.signal_name = signal_name  # SIGINT, SIGTERM, or KeyboardInterrupt (raised by a callback)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer ≥ {minimum}, got {value!r}", f"e.g. {name} {max(minimum, 1)}")


def _finite(name: str, value: Any, low: float, high: float = math.inf, *, closed_high: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        upper = "" if high == math.inf else (f", ≤ {high}" if closed_high else f", < {high}")
        raise ConfigError(f"{name} must be a number ≥ {low}{upper}, got {value!r}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option of a fine-tuning run (recorded in ``config.json``; validated on creation).

    ``batch_size`` is the global batch (split across DDP ranks); ``grad_accum`` micro-batches of that
    size make one optimizer step. ``lr`` follows ``lr_schedule`` over all optimizer steps of the run
    after ``warmup_epochs`` of linear warm-up (``step``: × ``lr_gamma`` every ``lr_step_epochs``,
    default one cycle). Weight decay applies to parameters with ≥ 2 dimensions (convolutions, atoms,
    coefficients, linear weights), not to biases and norm parameters. ``amp`` uses bf16 autocast on CPU,
    fp16 + GradScaler (``amp_dtype="auto"``/``"float16"``) or bf16 on CUDA. ``bn_recal_batches`` = 0
    disables BN re-estimation; it only runs for models with BatchNorm after downsampled stages.
    ``log_every`` optimizer steps write one ``step`` record to metrics.jsonl.
    """

    schedule: str = "alternating"
    cycles: int = 1
    epochs_per_stage: int = 1
    spatial_downsample: int = 2
    temporal_downsample: int = 2
    downsample_mode: str = "area"
    batch_size: int = 8
    workers: int = 0
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_step_epochs: int | None = None
    lr_gamma: float = 0.1
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    amp: bool = False
    amp_dtype: str = "auto"
    grad_accum: int = 1
    checkpoint_activations: bool = False
    device: str = "auto"
    seed: int = 0
    deterministic: bool = True
    bn_recal_batches: int = 10
    eval_batch_size: int | None = None
    log_every: int = 10
    measure_memory: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        for name in ("cycles", "epochs_per_stage", "spatial_downsample", "temporal_downsample", "batch_size",
                     "grad_accum", "log_every"):
            _positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("workers", "bn_recal_batches", "seed"):
            _positive_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum=0)
        if self.eval_batch_size is not None:
            _positive_int("--eval-batch-size", self.eval_batch_size)
        if self.lr_step_epochs is not None:
            _positive_int("--lr-step-epochs", self.lr_step_epochs)
        if self.downsample_mode not in DOWNSAMPLE_MODES:
            raise ConfigError(f"unknown downsample mode {self.downsample_mode!r}", "use area or bilinear")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown LR schedule {self.lr_schedule!r}", f"use one of {', '.join(LR_SCHEDULES)}")
        if self.amp_dtype not in AMP_DTYPES:
            raise ConfigError(f"unknown AMP dtype {self.amp_dtype!r}", f"use one of {', '.join(AMP_DTYPES)}")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ConfigError(f"unknown device {self.device!r}", "use auto, cpu or cuda")
        _finite("--lr", self.lr, 0.0)
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}", "e.g. --lr 0.01")
        _finite("--min-lr", self.min_lr, 0.0, self.lr)
        _finite("--momentum", self.momentum, 0.0, 1.0, closed_high=False)
        _finite("--weight-decay", self.weight_decay, 0.0)
        _finite("--warmup-epochs", self.warmup_epochs, 0.0)
        _finite("--lr-gamma", self.lr_gamma, 0.0, 1.0)
        _finite("--label-smoothing", self.label_smoothing, 0.0, 1.0, closed_high=False)
        if self.grad_clip is not None:
            _finite("--grad-clip", self.grad_clip, 0.0)
            if self.grad_clip <= 0:
                raise ConfigError(f"--grad-clip must be positive, got {self.grad_clip}")

    @property
    def total_epochs(self) -> int:
        return self.cycles * 2 * self.epochs_per_stage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown fine-tuning options {', '.join(unknown)}", "the run was written by a newer stjfd"
            )
        return cls(**dict(data))


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


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@dataclass
class LossContext:
    """Everything a training loss may need for one micro-batch.

    ``clips`` is what the model saw (downsampled for the stage), ``full_clips`` the full-size batch
    (e.g. for a teacher), ``labels`` may be −1 for unlabeled clips, ``model`` is the unwrapped model.
    """

    outputs: Tensor
    labels: Tensor
    clips: Tensor
    full_clips: Tensor
    model: nn.Module
    stage: str
    epoch: int
    step: int


LossOutput = Union[Tensor, tuple[Tensor, Mapping[str, float]]]
LossFn = Callable[[LossContext], LossOutput]


class ClassificationLoss:
    """Cross-entropy with label smoothing; clips labelled −1 (unlabeled) are ignored."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)

    def __call__(self, ctx: LossContext) -> Tensor:
        return F.cross_entropy(
            ctx.outputs.float(), ctx.labels, label_smoothing=self.label_smoothing, ignore_index=-1
        )


# --------------------------------------------------------------------------------------------
# Events (callbacks receive these; the CLI renders them)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class StageSummary:
    """Train/val figures and measured peak memory of one stage."""

    index: int
    cycle: int
    stage: str
    first_epoch: int
    last_epoch: int
    input_shape: list[int]
    trainable_params: int
    frozen_params: int
    train_loss: float | None = None
    train_top1: float | None = None
    val_loss: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    val_top5_k: int | None = None
    peak_memory_bytes: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    clips_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSummary:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class EvalResult:
    """Accuracy of a model on a labelled dataset (full resolution, K clips per video averaged)."""

    classes: list[str]
    clips: int
    loss: float
    top1: float
    top5: float
    top5_k: int
    per_class: list[dict[str, Any]]
    confusion: list[list[int]]  # [true][predicted]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    run_dir: Path | None
    config: FinetuneConfig
    classes: list[str]
    stages: list[StageSummary]
    epochs: list[dict[str, Any]]
    best_top1: float | None
    best_epoch: int | None
    final: EvalResult | None
    skipped: list[tuple[str, str, str]]
    world_size: int
    device: str
    steps: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    changed: bool = True  # False: a resumed run that had finished (nothing on disk was touched)
    saved: list[str] = field(default_factory=list)  # what the run folder holds: last/, best/, metrics.jsonl…

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "changed": self.changed,
            "saved": self.saved,
            "config": self.config.to_dict(),
            "classes": self.classes,
            "stages": [s.to_dict() for s in self.stages],
            "epochs": self.epochs,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "final": self.final.to_dict() if self.final else None,
            "skipped": [{"split": s, "path": p, "reason": r} for s, p, r in self.skipped],
            "world_size": self.world_size,
            "device": self.device,
            "steps": self.steps,
            "seconds": self.seconds,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


class ShardedShuffleSampler(Sampler[int]):
    """Shuffled global batches of ``global_batch`` samples, each split evenly across ``world_size`` ranks.

    The permutation depends on ``(seed, epoch)`` only, so rank r's k-th batch is the r-th slice of the
    k-th batch a single process would draw: DDP then sees exactly the single-process global batches.
    Incomplete global batches are dropped. ``skip_batches`` (reset by the caller) resumes mid-epoch.
    """

    def __init__(self, length: int, global_batch: int, *, seed: int = 0, world_size: int = 1, rank: int = 0) -> None:
        if global_batch % world_size:
            raise ConfigError(
                f"batch size {global_batch} is not divisible by the {world_size} processes",
                f"use a multiple of {world_size}",
            )
        self.length = length
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self.skip_batches = 0

    @property
    def batches(self) -> int:
        return self.length // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch, 0xC0FFEE]).permutation(self.length)
        for batch in range(self.skip_batches, self.batches):
            start = batch * self.global_batch + self.rank * self.local_batch
            yield from order[start : start + self.local_batch].tolist()

    def __len__(self) -> int:
        return max(0, self.batches - self.skip_batches) * self.local_batch


class _ShardSampler(Sampler[int]):
    """Evaluation shard: indices ``rank, rank + W, …`` in order (no padding, no duplicates)."""

    def __init__(self, length: int, world_size: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------
# Distributed, devices, determinism
# --------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _resolve_device(request: str, local_rank: int) -> torch.device:
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no CUDA device is available", "use --device cpu or auto")
        if request == "cuda":
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device(request)


def _init_distributed(device_request: str) -> _Dist:
    world = _env_world_size()
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    created = False
    if not dist.is_initialized():
        wants_cuda = device_request.startswith("cuda") or (device_request == "auto" and torch.cuda.is_available())
        backend = "nccl" if wants_cuda else "gloo"
        if wants_cuda:
            torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        dist.init_process_group(backend=backend)
        created = True
    return _Dist(dist.get_world_size(), dist.get_rank(), local_rank, created)


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.benchmark = previous_benchmark


def _amp_settings(config: FinetuneConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if not config.amp:
        return None, False
    if device.type == "cpu":
        if config.amp_dtype == "float16":
            raise ConfigError("--amp-dtype float16 is not supported on CPU", "use bfloat16 (the CPU default)")
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                nn.functional.conv3d(torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1))
        except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
            raise ConfigError(f"bf16 autocast is not supported on this CPU: {exc}", "drop --amp") from None
        return torch.bfloat16, False
    if config.amp_dtype == "bfloat16":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU does not support bfloat16", "use --amp-dtype float16")
        return torch.bfloat16, False
    return torch.float16, True


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------
# RNG state as weights_only-safe values
# --------------------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --------------------------------------------------------------------------------------------
# BatchNorm re-estimation and evaluation
# --------------------------------------------------------------------------------------------


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Re-estimate every BatchNorm's running mean/var from ``batches`` (full-resolution clips).

    Running statistics are reset and accumulated as a cumulative average (``momentum=None``) with only
    the BatchNorm layers in train mode (dropout etc. stay in eval) under ``no_grad``; momentum and every
    module's train/eval flag are restored. Only the running statistics (and ``num_batches_tracked``)
    change. Returns the number of batches used (0: no BatchNorm or no batches, nothing changed).
    """
    norms = _batch_norms(model)
    if not norms:
        return 0
    device = torch.device(device) if device is not None else next(model.parameters()).device
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    count = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad(), _autocast(device, autocast_dtype):
            for clips in batches:
                model(clips.to(device, non_blocking=True))
                count += 1
                if progress is not None:
                    progress(count)
        if count == 0:
            for m, (mean, var, tracked) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in flags.items():
            m.training = training
    return count


def _forward_clips(model: nn.Module, clips: Tensor) -> Tensor:
    """Logits of ``[B, C, T, H, W]`` or ``[B, K, C, T, H, W]`` (K clips per video: logits averaged)."""
    if clips.ndim == 6:
        batch, k = clips.shape[:2]
        logits = model(clips.flatten(0, 1))
        return logits.reshape(batch, k, -1).mean(1)
    return model(clips)


@dataclass
class _EvalSums:
    loss_sum: float
    count: int
    top1: int
    top5: int
    confusion: Tensor  # int64 [C, C]


def _evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    dist: _Dist,
    progress: Callable[[int], None] | None = None,
) -> _EvalSums:
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, count, top1, top5
    try:
        with torch.no_grad():
            for index, (clips, labels) in enumerate(batches, 1):
                clips = clips.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with _autocast(device, autocast_dtype):
                    logits = _forward_clips(model, clips)
                logits = logits.float()
                keep = labels >= 0
                if keep.any():
                    logits, labels = logits[keep], labels[keep]
                    sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
                    sums[1] += labels.numel()
                    topk = logits.topk(k, dim=1).indices
                    sums[2] += (topk[:, 0] == labels).sum()
                    sums[3] += (topk == labels[:, None]).any(1).sum()
                    confusion.index_put_(
                        (labels, topk[:, 0]), torch.ones_like(labels, dtype=torch.float64), accumulate=True
                    )
                if progress is not None:
                    progress(index)
    finally:
        model.train(was_training)
    dist.all_reduce(sums)
    dist.all_reduce(confusion)
    return _EvalSums(float(sums[0]), int(sums[1]), int(sums[2]), int(sums[3]), confusion.round().long().cpu())


def _eval_result(sums: _EvalSums, classes: Sequence[str], seconds: float) -> EvalResult:
    n = max(1, sums.count)
    confusion = sums.confusion
    per_class = []
    for i, name in enumerate(classes):
        total = int(confusion[i].sum())
        correct = int(confusion[i, i])
        per_class.append(
            {"class": name, "correct": correct, "total": total, "accuracy": correct / total if total else None}
        )
    return EvalResult(
        classes=list(classes),
        clips=sums.count,
        loss=sums.loss_sum / n if sums.count else float("nan"),
        top1=sums.top1 / n,
        top5=sums.top5 / n,
        top5_k=min(5, len(classes)),
        per_class=per_class,
        confusion=confusion.tolist(),
        seconds=seconds,
    )


def _num_classes(model: nn.Module, classes: Sequence[str] | None) -> int:
    if classes:
        return len(classes)
    last = _last_linear(model)
    if last is None:
        raise ConfigError("cannot tell the number of classes", "pass classes=[…]")
    return last[1].out_features


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    classes: Sequence[str] | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str | torch.device = "auto",
    amp: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Top-1/top-5 accuracy, mean cross-entropy, per-class accuracy and the confusion matrix of ``model``
    on ``dataset`` (items ``(clip, label)``; a clip ``[K, C, T, H, W]`` averages K logits). The model is
    moved to ``device`` and left in eval mode. Distributed when a process group is initialised."""
    from .data import make_loader

    dist = _current_dist()
    device = _resolve_device(str(device), dist.local_rank)
    classes = list(classes if classes is not None else getattr(dataset, "classes", []) or [])
    num_classes = _num_classes(model, classes)
    if not classes:
        classes = [str(i) for i in range(num_classes)]
    autocast_dtype, _ = _amp_settings(FinetuneConfig(amp=amp), device)
    sampler = _ShardSampler(len(dataset), dist.world_size, dist.rank)
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers, device=device, sampler=sampler)
    model.to(device)
    start = time.perf_counter()
    total = len(loader)
    sums = _evaluate_batches(
        model, loader, num_classes, device, autocast_dtype, dist,
        (lambda done: progress(done, total)) if progress else None,
    )
    model.eval()
    return _eval_result(sums, classes, time.perf_counter() - start)


def _current_dist() -> _Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return _Dist(dist.get_world_size(), rank, int(os.environ.get("LOCAL_RANK", rank)))
    return _Dist()


# --------------------------------------------------------------------------------------------
# Memory of a stage
# --------------------------------------------------------------------------------------------


class _SavedBytes:
    """saved_tensors_hooks that sum the bytes of every storage autograd keeps, each storage once."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.saved: dict[int, int] = {}

    def pack(self, tensor: Tensor) -> Tensor:
        key = storage_key(tensor)
        if key and key not in self.exclude and key not in self.saved:
            self.saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())


def _tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    seen: set[int] = set()
    grads = 0
    for p in params:
        if p.grad is not None and storage_key(p.grad) not in seen:
            seen.add(storage_key(p.grad))
            grads += p.grad.untyped_storage().nbytes()
    return {
        "param_bytes": sum(_tensor_bytes(p) for p in params),
        "buffer_bytes": sum(_tensor_bytes(b) for b in model.buffers()),
        "grad_bytes": grads,
        "optimizer_bytes": sum(
            _tensor_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)
        ),
    }


# --------------------------------------------------------------------------------------------
# Models: classifier head, names
# --------------------------------------------------------------------------------------------


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def adapt_classifier(
    model: nn.Module, spec: ArchSpec, num_classes: int, *, seed: int = 0
) -> tuple[ArchSpec, str | None]:
    """Give ``model`` a fresh ``num_classes``-way head (its last ``nn.Linear``) when it has another number
    of outputs, in place; returns the architecture spec to record (``num_classes`` set) and a note."""
    from .models import build_model

    last = _last_linear(model)
    if last is None or last[1].out_features == num_classes:
        return spec, None
    name, linear = last
    hint = "fine-tune a model built for the dataset's classes (e.g. convert with --model-kwargs '{\"num_classes\": N}')"
    if spec.kind == "pickle":
        raise ConfigError(
            f"the model predicts {linear.out_features} classes but the dataset has {num_classes}", hint
        )
    new_spec = ArchSpec(spec.kind, spec.name, {**spec.kwargs, "num_classes": num_classes})
    try:
        skeleton = build_model(new_spec)
    except StjfdError:
        raise ConfigError(
            f"the model predicts {linear.out_features} classes but the dataset has {num_classes}, and "
            f"{spec.name} cannot be built with num_classes={num_classes}",
            hint,
        ) from None
    try:
        twin = skeleton.get_submodule(name)
    except AttributeError:
        twin = None
    if not isinstance(twin, nn.Linear) or twin.out_features != num_classes or twin.in_features != linear.in_features:
        raise ConfigError(
            f"the model predicts {linear.out_features} classes but the dataset has {num_classes}, and "
            f"num_classes={num_classes} does not resize its last layer {name}",
            hint,
        )
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed + HEAD_SEED_OFFSET)
    head = nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None, dtype=linear.weight.dtype)
    torch.set_rng_state(generator_state)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, head.to(linear.weight.device))
    return new_spec, f"replaced the {linear.out_features}-way classifier {name} by a new {num_classes}-way one"


def _param_groups(params: Sequence[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _make_optimizer(config: FinetuneConfig, params: Sequence[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    groups = _param_groups(params, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


def _clean(value: Any) -> Any:
    """JSON-safe floats (NaN/Inf → None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_training_curve(records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """A two-panel PNG: training loss per step (+ train/val loss per epoch) over stage bands, and
    validation top-1/top-5 per epoch. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    colours = {"temporal": "#dbe9f6", "spatial": "#fde6cf", "joint": "#e8e8e8"}
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    seen_stage: set[str] = set()
    for r in epochs:
        stage = r.get("stage", "joint")
        label = f"{stage} stage" if stage not in seen_stage else None
        seen_stage.add(stage)
        for ax in (ax_loss, ax_acc):
            ax.axvspan(r["epoch"], r["epoch"] + 1, color=colours.get(stage, "#eeeeee"), lw=0,
                       label=label if ax is ax_loss else None)
    if steps:
        xs = [r["epoch_progress"] for r in steps]
        ys = [r["loss"] for r in steps]
        ax_loss.plot(xs, ys, color="#1f77b4", lw=0.8, alpha=0.45, label="train loss (per step)")
        window = max(1, len(ys) // 30)
        if window > 1:
            smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
            ax_loss.plot(xs[window - 1 :], smooth, color="#1f77b4", lw=1.8, label=f"train loss ({window}-step mean)")
    ends = [r["epoch"] + 1 for r in epochs]
    train_loss = [r.get("train_loss") for r in epochs]
    val_loss = [r.get("val_loss") for r in epochs]
    if any(v is not None for v in train_loss):
        ax_loss.plot(ends, train_loss, "o-", color="#0b3d91", ms=4, lw=1.2, label="train loss (epoch mean)")
    if any(v is not None for v in val_loss):
        ax_loss.plot(ends, val_loss, "s-", color="#d62728", ms=5, lw=1.5, label="val loss (full resolution)")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=8, ncol=2)
    k = next((r.get("val_top5_k") for r in epochs if r.get("val_top5_k")), 5)
    for key, style, colour, label in (
        ("val_top1", "s-", "#d62728", "val top-1 (full resolution)"),
        ("val_top5", "^--", "#9467bd", f"val top-{k}"),
        ("train_top1", "o:", "#0b3d91", "train top-1 (stage input)"),
    ):
        values = [r.get(key) for r in epochs]
        if any(v is not None for v in values):
            percent = [100 * v if v is not None else np.nan for v in values]
            ax_acc.plot(ends, percent, style, color=colour, ms=5, label=label)
    ax_acc.set_ylim(-2, 102)
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    with atomic_file(path, "internal") as staging:
        fig.savefig(staging, dpi=110, format="png", metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class _Position:
    """Where training stands: the next micro-batch to run is ``batch`` of ``epoch`` in stage ``stage``."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _SignalFlag:
    """SIGINT/SIGTERM set a flag (the loop stops after the current optimizer step); a second SIGINT
    raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - exotic embeddings
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        val_dataset: Dataset | None,
        config: FinetuneConfig,
        *,
        callbacks: Sequence[Callback],
        loss_fn: LossFn | None,
        run_dir: Path | None,
        spec: ArchSpec | None,
        classes: Sequence[str] | None,
        overwrite: bool,
        run_info: Mapping[str, Any] | None,
        state: Mapping[str, Any] | None,
        dist: _Dist,
        inputs: Sequence[str | Path] = (),
        datasets: Sequence[str | Path] = (),
    ) -> None:
        from .data import make_loader

        self.config = config
        self.dist = dist
        self.device = _resolve_device(config.device, self.dist.local_rank)
        self.autocast_dtype, use_scaler = _amp_settings(config, self.device)
        self.callbacks = list(callbacks) if self.dist.main else []
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else ClassificationLoss(config.label_smoothing)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.spec = spec
        self.model = model
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.classes = list(classes if classes is not None else getattr(train_dataset, "classes", []) or [])
        self.num_classes = _num_classes(model, self.classes)
        if not self.classes:
            self.classes = [str(i) for i in range(self.num_classes)]
        self.run_info = dict(run_info or {})
        self.plans = stage_plan(config)
        self.notes: list[str] = []
        if val_dataset is None or len(val_dataset) == 0:
            self.notes.append(
                "no validation set: nothing was evaluated and best/ is not written (add val/ or --val-split)"
            )

        if len(train_dataset) < config.batch_size:
            raise ConfigError(
                f"the training set has {len(train_dataset)} clips, fewer than one batch of {config.batch_size}",
                "lower --batch-size or add training videos",
            )
        self.sampler = ShardedShuffleSampler(
            len(train_dataset), config.batch_size, seed=config.seed, world_size=self.dist.world_size,
            rank=self.dist.rank,
        )
        self.local_batch = self.sampler.local_batch
        self.train_loader = make_loader(
            train_dataset, self.local_batch, shuffle=False, workers=config.workers, seed=config.seed,
            device=self.device, sampler=self.sampler, drop_last=False,
        )
        self.val_loader = None
        if val_dataset is not None and len(val_dataset) > 0:
            eval_batch = config.eval_batch_size or self.local_batch
            self.val_loader = make_loader(
                val_dataset, eval_batch, shuffle=False, workers=config.workers, seed=config.seed,
                device=self.device, sampler=_ShardSampler(len(val_dataset), self.dist.world_size, self.dist.rank),
            )
        self.batches_per_epoch = self.sampler.batches
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.total_epochs
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.has_bn = bool(_batch_norms(model))

        # Progress state (restored from a saved state when resuming).
        self.position = _Position()
        self.history: list[dict[str, Any]] = []
        self.stage_summaries: dict[int, dict[str, Any]] = {}
        self.best_top1: float | None = None
        self.best_epoch: int | None = None
        self.optimizer_state: dict[str, dict[str, Any]] = {}
        self.epoch_sums = [0.0, 0, 0]  # loss sum, labelled clips, correct
        self.log_sums = [0.0, 0]  # loss sum, micro-batches since the last step record
        self.skipped_seen: set[tuple[str, str]] = set()
        self.skipped: list[tuple[str, str, str]] = []
        self.final: EvalResult | None = None
        self.rng_at_boundary: dict[str, Any] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.ddp: nn.Module | None = None
        self.forward_model: nn.Module = model
        self._counter: _SavedBytes | None = None
        self._input_shape: list[int] = []
        self.stage_measured = False
        self.epoch_seconds = 0.0
        self.epoch_clips = 0
        self.resumed = state is not None
        if state is not None:
            self._load_state(state)
        self.model.to(self.device)
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.to(self.device)
        self.overwrite = overwrite
        self.inputs, self.datasets = list(inputs), list(datasets)
        self.created_run_dir = False  # by this process: removed again if the run fails before any checkpoint
        self.checkpoints_saved = 0

    # ---- callbacks, files -----------------------------------------------------------------------

    def emit(self, event: Any) -> None:
        for callback in self.callbacks:
            callback(event)

    def _write_record(self, record: Mapping[str, Any]) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_clean(dict(record)), default=_json_default) + "\n")

    def _log(self, text: str) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {text}\n")

    def create_run_dir(self) -> None:
        if self.run_dir is None:
            return
        if self.dist.main:
            config_json = {
                "format": RUN_FORMAT,
                "version": STATE_VERSION,
                "finetune": self.config.to_dict(),
                "classes": self.classes,
                "world_size": self.dist.world_size,
                **self.run_info,
            }
            with atomic_directory(
                self.run_dir, "run", force=self.overwrite, inputs=self.inputs, datasets=self.datasets
            ) as staging:
                text = json.dumps(_clean(config_json), indent=2, default=_json_default)
                (staging / CONFIG_FILE).write_text(text + "\n")
                (staging / METRICS_FILE).write_text("")
            self.created_run_dir = True
        self.dist.barrier()
        self._log(
            f"started: {len(self.plans)} stages, {self.config.total_epochs} epochs, world size {self.dist.world_size}"
        )

    def _check_skipped(self) -> None:
        new = []
        for split, dataset in (("train", self.train_dataset), ("val", self.val_dataset)):
            for path, reason in getattr(dataset, "skipped", []) if dataset is not None else []:
                key = (split, str(path))
                if key not in self.skipped_seen:
                    self.skipped_seen.add(key)
                    new.append((split, str(path), reason))
        if not new:
            return
        self.skipped.extend(new)
        for split, path, reason in new:
            self._write_record(
                {"type": "skipped", "split": split, "path": path, "reason": reason, "step": self.position.step}
            )
            self._log(f"skipped unreadable {split} sample {path}: {reason}")
        self.emit(SkippedFiles(new))

    # ---- state ---------------------------------------------------------------------------------

    def _state(
        self, position: _Position, rng: Mapping[str, Any], epoch_sums: Sequence[Any], log_sums: Sequence[Any]
    ) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "position": position.to_dict(),
            "optimizer": self.optimizer_state_by_name(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": dict(rng),
            "epoch_sums": [float(epoch_sums[0]), int(epoch_sums[1]), int(epoch_sums[2])],
            "log_sums": [float(log_sums[0]), int(log_sums[1])],
            "history": _clean(self.history),
            "stages": {str(k): _clean(v) for k, v in self.stage_summaries.items()},
            "best": {"top1": self.best_top1, "epoch": self.best_epoch},
            "skipped": [list(s) for s in self.skipped],
            "world_size": self.dist.world_size,
            "classes": self.classes,
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.position = _Position(**{k: int(v) for k, v in state["position"].items()})
        self.history = list(state.get("history", []))
        self.stage_summaries = {int(k): dict(v) for k, v in state.get("stages", {}).items()}
        best = state.get("best", {})
        self.best_top1, self.best_epoch = best.get("top1"), best.get("epoch")
        self.optimizer_state = {name: dict(value) for name, value in state.get("optimizer", {}).items()}
        self.epoch_sums = list(state.get("epoch_sums", [0.0, 0, 0]))
        self.log_sums = list(state.get("log_sums", [0.0, 0]))
        self.skipped = [tuple(s) for s in state.get("skipped", [])]
        self.skipped_seen = {(s[0], s[1]) for s in self.skipped}
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.rng_at_boundary = state["rng"]
        if int(state.get("world_size", 1)) != self.dist.world_size:
            self.notes.append(
                f"resumed with {self.dist.world_size} processes; the run was saved with {state.get('world_size')} "
                "(same global batches, so the data order is unchanged)"
            )

    def optimizer_state_by_name(self) -> dict[str, dict[str, Any]]:
        """Optimizer state keyed by parameter name (kept across stages for parameters that keep training)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        state = dict(self.optimizer_state)
        if self.optimizer is not None:
            for param, values in self.optimizer.state.items():
                name = names.get(id(param))
                if name is not None:
                    state[name] = {
                        k: (v.detach().clone().cpu() if isinstance(v, Tensor) else v) for k, v in values.items()
                    }
        return state

    def save_checkpoint(
        self, kind: str, state: Mapping[str, Any] | None, epoch: int, extra: Mapping[str, Any]
    ) -> Path | None:
        """Write ``last/`` (with the training state) or ``best/`` atomically (rank 0 only)."""
        if self.run_dir is None:
            return None
        target = self.run_dir / kind
        if self.dist.main:
            from .saved_model import build_manifest, write_converted_files

            spec = self.spec or ArchSpec("pickle", f"{type(self.model).__module__}.{type(self.model).__qualname__}")
            clip = _clip_description(self.val_dataset if self.val_dataset is not None else self.train_dataset)
            shape = [1, 3, clip["clip_len"], *clip["size"]] if clip else None
            manifest = build_manifest(
                self.model, spec, input_shape=shape, command=self.run_info.get("command"),
                source=self.run_info.get("model", {}).get("source"),
                extra={"finetune": {"run": str(self.run_dir), "epoch": epoch, "step": self.position.step,
                                    "classes": self.classes, "clip": clip, **_clean(dict(extra))},
                       **({"normalization": _manifest_normalization(clip)} if clip else {})},
            )
            wrapped = self.config.checkpoint_activations and spec.kind == "pickle"
            if wrapped:
                disable_activation_checkpointing(self.model)
            try:
                with atomic_directory(target, "converted", force=True) as staging:
                    write_converted_files(self.model, manifest, staging)
                    if state is not None:
                        torch.save(dict(state), staging / STATE_FILE)
            finally:
                if wrapped:
                    enable_activation_checkpointing(self.model)
        self.dist.barrier()
        self.checkpoints_saved += 1
        self.emit(CheckpointSaved(kind, target, epoch))
        return target

    # ---- stages ----------------------------------------------------------------------------------

    def _stage_input_shape(self, plan: StagePlan) -> tuple[int, ...]:
        clip = _clip_description(self.train_dataset)
        if clip is None:
            return ()
        from .stages import stage_clip_shape

        shape = (self.local_batch, 3, clip["clip_len"], *clip["size"])
        if plan.stage == "temporal":
            return stage_clip_shape(shape, "temporal", self.config.spatial_downsample, 1)
        if plan.stage == "spatial":
            t = math.ceil(shape[2] / self.config.temporal_downsample)  # downsample_clip keeps ceil(T / r) frames
            return (*shape[:2], t, *shape[3:])
        return shape

    def start_stage(self, plan: StagePlan) -> None:
        # Optimizer state of parameters that keep training carries over; that of newly frozen ones is dropped.
        self.optimizer_state = self.optimizer_state_by_name()
        self.optimizer = None
        if self.ddp is not None:
            # The previous stage's DDP reducer hooks the parameters; it must be gone before the next wrap.
            self.ddp = self.forward_model = None
            gc.collect()
        trainable = set(map(id, set_trainable(self.model, plan.stage)))
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) in trainable]
        frozen = [n for n, p in self.model.named_parameters() if id(p) not in trainable]
        self.optimizer = _make_optimizer(self.config, named)
        for name, param in named:
            saved = self.optimizer_state.get(name)
            if saved:
                self.optimizer.state[param] = {
                    k: (v.to(self.device) if isinstance(v, Tensor) and k != "step" else v) for k, v in saved.items()
                }
        frozen_set = set(frozen)
        active = {n for n, _ in named}
        self.optimizer_state = {k: v for k, v in self.optimizer_state.items() if k not in frozen_set | active}
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.forward_model = self.ddp if self.ddp is not None else self.model
        self.stage_measured = bool(self.stage_summaries.get(plan.index, {}).get("memory"))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        summary = self.stage_summaries.setdefault(
            plan.index,
            StageSummary(
                plan.index, plan.cycle, plan.stage, plan.first_epoch, plan.last_epoch,
                list(self._stage_input_shape(plan)),
                sum(p.numel() for _, p in named), sum(self.model.get_parameter(n).numel() for n in frozen),
            ).to_dict(),
        )
        summary.setdefault("seconds", 0.0)
        self.emit(StageStarted(plan, tuple(summary["input_shape"]), [n for n, _ in named], frozen,
                               summary["trainable_params"], summary["frozen_params"]))

    def _update_stage_summary(self, plan: StagePlan, seconds: float) -> None:
        """Fold the stage's epoch records into its summary (before ``last/`` is saved, so a resumed run
        reports finished stages in full)."""
        summary = self.stage_summaries[plan.index]
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
            memory = summary.setdefault("memory", {})
            memory["cuda_peak_bytes"] = max(peak, memory.get("cuda_peak_bytes") or 0)
            summary["peak_memory_bytes"] = memory["cuda_peak_bytes"]
        records = [r for r in self.history if r.get("stage_index") == plan.index]
        if records:
            last = records[-1]
            for key in ("val_loss", "val_top1", "val_top5", "val_top5_k"):
                summary[key] = last.get(key)
            losses = [r["train_loss"] for r in records if r.get("train_loss") is not None]
            summary["train_loss"] = sum(losses) / len(losses) if losses else None
            tops = [r["train_top1"] for r in records if r.get("train_top1") is not None]
            summary["train_top1"] = tops[-1] if tops else None
            rates = [r["clips_per_s"] for r in records if r.get("clips_per_s")]
            summary["clips_per_s"] = sum(rates) / len(rates) if rates else None
        summary["seconds"] = float(summary.get("seconds") or 0.0) + seconds

    def end_stage(self, plan: StagePlan) -> StageSummary:
        result = StageSummary.from_dict(self.stage_summaries[plan.index])
        self._write_record({"type": "stage", **result.to_dict(), "step": self.position.step})
        self._log(
            f"stage {plan.index + 1} ({plan.label}) done: val top-1 {_fmt(result.val_top1)}, "
            f"peak memory {_fmt_bytes(result.peak_memory_bytes)}"
        )
        self.emit(StageEnd(result))
        self.ddp = None
        self.forward_model = self.model
        return result

    # ---- one micro-batch -------------------------------------------------------------------------

    def _stage_clips(self, clips: Tensor, stage: str) -> Tensor:
        from .data import downsample_clip

        if stage == "temporal" and self.config.spatial_downsample > 1:
            return downsample_clip(clips, spatial=self.config.spatial_downsample, mode=self.config.downsample_mode)
        if stage == "spatial" and self.config.temporal_downsample > 1:
            return downsample_clip(clips, temporal=self.config.temporal_downsample)
        return clips

    def _measure_first_step(self, plan: StagePlan) -> contextlib.AbstractContextManager[Any]:
        if not self.config.measure_memory or self.stage_measured:
            return contextlib.nullcontext(None)
        exclude = {storage_key(t) for t in [*self.model.parameters(), *self.model.buffers()]}
        counter = _SavedBytes(exclude)
        self._counter = counter
        return torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)

    def _record_memory(self, plan: StagePlan) -> None:
        counter = self._counter
        if counter is None:
            return
        self._counter = None
        self.stage_measured = True
        memory = {"saved_bytes": counter.bytes, **_state_bytes(self.model, self.optimizer), "device": self.device.type}
        memory["cpu_accounting_bytes"] = (
            memory["saved_bytes"] + memory["param_bytes"] + memory["buffer_bytes"] + memory["grad_bytes"]
            + memory["optimizer_bytes"]
        )
        summary = self.stage_summaries[plan.index]
        summary["input_shape"] = self._input_shape  # what the model really saw (also for datasets without a ClipConfig)
        summary["memory"] = memory
        summary["peak_memory_bytes"] = memory["cpu_accounting_bytes"]

    # ---- epochs --------------------------------------------------------------------------------

    def _agree(self, local: bool) -> bool:
        """True on every rank when any rank says so (one flag, all-reduced)."""
        if not self.dist.enabled:
            return local
        flag = torch.tensor([1.0 if local else 0.0], dtype=torch.float64, device=self.device)
        return bool(self.dist.all_reduce(flag, "max")[0] > 0)

    def train_epoch(self, plan: StagePlan, epoch: int, flag: _SignalFlag) -> str:
        """Run (the rest of) one epoch. Returns ``"done"``, ``"stop"`` (stop requested on the last batch:
        finish the epoch, then stop) or ``"interrupted"`` (stopped at an optimizer-step boundary inside the
        epoch; ``self.position`` and the saved sums/RNG describe that boundary)."""
        config = self.config
        skip = self.position.batch if self.position.epoch == epoch else 0
        if skip == 0:
            self.epoch_sums = [0.0, 0, 0]
        self.sampler.skip_batches = skip
        self.train_loader.set_epoch(epoch)
        batches = self.batches_per_epoch
        model = self.model
        model.train()
        boundary = _Position(plan.index, epoch, skip, self.position.step)
        if self.rng_at_boundary is None:
            self.rng_at_boundary = _rng_state(self.device)
        boundary_sums = (list(self.epoch_sums), list(self.log_sums))
        callback_stop = False
        stop = False
        rate = 0.0
        tick = epoch_start = time.perf_counter()
        clips_done = 0
        self.optimizer.zero_grad(set_to_none=True)
        batch = skip
        try:
            for clips, labels in self.train_loader:
                batch += 1
                group_start = ((batch - 1) // config.grad_accum) * config.grad_accum
                group_size = min(config.grad_accum, batches - group_start)
                is_boundary = batch == group_start + group_size
                stage_clips = self._stage_clips(clips, plan.stage).to(self.device, non_blocking=True)
                self._input_shape = list(stage_clips.shape)
                labels = labels.to(self.device, non_blocking=True)
                no_sync = self.ddp is not None and not is_boundary
                with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                    with self._measure_first_step(plan):
                        with _autocast(self.device, self.autocast_dtype):
                            outputs = self.forward_model(stage_clips)
                            ctx = LossContext(
                                outputs, labels, stage_clips, clips, model, plan.stage, epoch, self.position.step
                            )
                            value = self.loss_fn(ctx)
                        loss, extras = value if isinstance(value, tuple) else (value, {})
                        loss = loss.float()
                    keep = labels >= 0
                    hits = outputs.detach().argmax(1)[keep] == labels[keep]
                    correct = float(hits.sum()) if hits.numel() else 0.0
                    detached = float(loss.detach())
                    finite = math.isfinite(detached)
                    local_stop = flag.requested or callback_stop
                    stats = torch.tensor(
                        [detached if finite else 0.0, 1.0, float(keep.sum()), correct, 0.0 if finite else 1.0,
                         1.0 if local_stop else 0.0],
                        dtype=torch.float64, device=self.device,
                    )
                    self.dist.all_reduce(stats)
                    if stats[4] > 0:
                        self._raise_non_finite(plan, epoch, batch, detached)
                    scaled = loss / group_size
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                mean_loss = float(stats[0] / stats[1])
                self.epoch_sums[0] += mean_loss * float(stats[2])
                self.epoch_sums[1] += int(stats[2])
                self.epoch_sums[2] += int(stats[3])
                self.log_sums[0] += mean_loss
                self.log_sums[1] += 1
                lr = lr_at(self.position.step, self.total_steps, self.steps_per_epoch, config)
                if is_boundary:
                    self._optimizer_step(lr, plan)
                    self.position.step += 1
                    if self.position.step % config.log_every == 0 or batch == batches:
                        self._step_record(plan, epoch, batch, batches, lr, extras)
                    boundary = _Position(plan.index, epoch, batch, self.position.step)
                    self.rng_at_boundary = _rng_state(self.device)
                    boundary_sums = (list(self.epoch_sums), list(self.log_sums))
                clips_done += stage_clips.shape[0] * self.dist.world_size
                now = time.perf_counter()
                instant = stage_clips.shape[0] * self.dist.world_size / max(now - tick, 1e-9)
                tick = now
                rate = instant if rate == 0.0 else 0.8 * rate + 0.2 * instant
                try:
                    self.emit(
                        BatchEnd(plan, epoch, batch, batches, self.position.step, is_boundary, mean_loss, lr, rate)
                    )
                except KeyboardInterrupt:
                    callback_stop = True
                # Every rank must stop at the same boundary: under DDP only the all-reduced flag counts
                # (a request seen after this batch's reduction is honoured at the next boundary).
                stop = bool(stats[5] > 0) if self.dist.enabled else (flag.requested or callback_stop)
                if stop and is_boundary:
                    break
        finally:
            self.sampler.skip_batches = 0
        self.epoch_seconds = time.perf_counter() - epoch_start
        self.epoch_clips = clips_done
        if stop and batch < batches:
            self.position = boundary
            self.epoch_sums, self.log_sums = boundary_sums
            return "interrupted"
        return "stop" if stop else "done"

    def _optimizer_step(self, lr: float, plan: StagePlan) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            if self.config.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self._trainable(), self.config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self._trainable(), self.config.grad_clip)
            self.optimizer.step()
        self._record_memory(plan)  # gradients and optimizer state both exist only now
        self.optimizer.zero_grad(set_to_none=True)

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _step_record(
        self, plan: StagePlan, epoch: int, batch: int, batches: int, lr: float, extras: Mapping[str, Any]
    ) -> None:
        loss = self.log_sums[0] / max(1, self.log_sums[1])
        self.log_sums = [0.0, 0]
        record = {
            "type": "step", "step": self.position.step, "epoch": epoch, "epoch_progress": epoch + batch / batches,
            "cycle": plan.cycle, "stage": plan.stage, "loss": loss, "lr": lr,
        }
        for key, value in extras.items():
            record[f"loss_{key}"] = float(value)
        self._write_record(record)

    def _raise_non_finite(self, plan: StagePlan, epoch: int, batch: int, loss: float) -> None:
        last = f"{self.run_dir / LAST_DIR}" if self.run_dir is not None and (self.run_dir / LAST_DIR).is_dir() else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        message = (
            f"the training loss became non-finite ({loss}) in stage {plan.index + 1} "
            f"({plan.label}), epoch {epoch + 1}, batch {batch}; {kept}"
        )
        self._write_record({"type": "error", "message": message, "step": self.position.step})
        self._log(message)
        raise NonFiniteLossError(message, "lower --lr, add --grad-clip, or check the data for broken clips")

    def recalibrate(self, plan: StagePlan, epoch: int) -> int:
        """BN statistics at full resolution after a downsampled stage's epoch; averaged across ranks."""
        if plan.stage == "joint" or not self.has_bn or self.config.bn_recal_batches == 0:
            return 0
        total = min(self.config.bn_recal_batches, self.batches_per_epoch)
        self.train_loader.set_epoch(RECAL_EPOCH_OFFSET + epoch)

        def batches() -> Iterator[Tensor]:
            for index, (clips, _) in enumerate(self.train_loader):
                if index >= total:
                    break
                yield clips

        used = recalibrate_batchnorm(
            self.model, batches(), device=self.device, autocast_dtype=self.autocast_dtype,
            progress=lambda done: self.emit(PhaseProgress("bn_recal", epoch, done, total)),
        )
        if self.dist.enabled:
            for norm in _batch_norms(self.model):
                for buffer in (norm.running_mean, norm.running_var):
                    self.dist.all_reduce(buffer)
                    buffer.div_(self.dist.world_size)
        return used

    def validate(self, epoch: int) -> EvalResult | None:
        if self.val_loader is None:
            return None
        start = time.perf_counter()
        total = len(self.val_loader)
        sums = _evaluate_batches(
            self.model, self.val_loader, self.num_classes, self.device, self.autocast_dtype, self.dist,
            lambda done: self.emit(PhaseProgress("eval", epoch, done, total)),
        )
        return _eval_result(sums, self.classes, time.perf_counter() - start)

    def end_epoch(self, plan: StagePlan, epoch: int) -> None:
        recal = self.recalibrate(plan, epoch)
        result = self.validate(epoch)
        self.final = result
        self.position = _Position(plan.index + (1 if epoch == plan.last_epoch else 0), epoch + 1, 0, self.position.step)
        labelled = self.epoch_sums[1]
        record: dict[str, Any] = {
            "type": "epoch",
            "epoch": epoch,
            "stage_index": plan.index,
            "cycle": plan.cycle,
            "stage": plan.stage,
            "step": self.position.step,
            "lr": lr_at(max(0, self.position.step - 1), self.total_steps, self.steps_per_epoch, self.config),
            "train_loss": self.epoch_sums[0] / labelled if labelled else None,
            "train_top1": self.epoch_sums[2] / labelled if labelled else None,
            "val_loss": result.loss if result else None,
            "val_top1": result.top1 if result else None,
            "val_top5": result.top5 if result else None,
            "val_top5_k": result.top5_k if result else None,
            "bn_recal_batches": recal,
            "seconds": self.epoch_seconds,
            "clips_per_s": self.epoch_clips / self.epoch_seconds if self.epoch_seconds > 0 else None,
            "peak_memory_bytes": self.stage_summaries[plan.index].get("peak_memory_bytes"),
        }
        self.history.append(_clean(record))
        self._update_stage_summary(plan, self.epoch_seconds)
        self._write_record(record)
        self.emit(EpochEnd(dict(record)))
        self._check_skipped()
        improved = result is not None and (self.best_top1 is None or result.top1 > self.best_top1)
        if improved:
            self.best_top1, self.best_epoch = result.top1, epoch
        self.epoch_sums = [0.0, 0, 0]
        self.rng_at_boundary = _rng_state(self.device)
        extra = {"val_top1": record["val_top1"], "val_top5": record["val_top5"], "stage": plan.stage}
        state = self._state(self.position, self.rng_at_boundary, self.epoch_sums, self.log_sums)
        self.save_checkpoint(LAST_DIR, state, epoch, extra)
        if improved:
            self.save_checkpoint(BEST_DIR, None, epoch, extra)
        self._log(
            f"epoch {epoch + 1}/{self.config.total_epochs} ({plan.label}): train loss {_fmt(record['train_loss'])}, "
            f"val top-1 {_fmt(record['val_top1'])}"
        )

    def plot(self) -> None:
        if self.run_dir is None or not self.dist.main or not self.config.plot:
            return
        title = f"{self.run_dir.name}: {self.config.schedule} schedule"
        if self.config.schedule == "alternating":
            title += f" (s={self.config.spatial_downsample}, r={self.config.temporal_downsample})"
        plot_training_curve(read_metrics(self.run_dir), self.run_dir / CURVE_FILE, title=title)

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        """Train from the current position; a resumed run that had finished returns at once, touching nothing."""
        start = time.perf_counter()
        if self.resumed and self.position.stage >= len(self.plans):
            self.notes.append("the run had already finished: nothing was trained and no file was changed")
            stages = [StageSummary.from_dict(self.stage_summaries[p.index]) for p in self.plans
                      if p.index in self.stage_summaries]
            return self._result(start, stages, changed=False)
        try:
            return self._run(start)
        except TrainingInterrupted:
            raise
        except BaseException:
            self._remove_empty_run()
            raise

    def _remove_empty_run(self) -> None:
        """A run that fails before its first checkpoint leaves nothing: its folder is removed, so the
        rerun needs no --force. Only a folder this process created, and only while it holds no checkpoint."""
        if not (self.created_run_dir and self.checkpoints_saved == 0 and self.dist.main and self.run_dir is not None):
            return
        if not any((self.run_dir / name).exists() for name in (LAST_DIR, BEST_DIR)):
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.notes.append(f"removed {self.run_dir}: the run failed before its first checkpoint")

    def _result(self, start: float, stages: list[StageSummary], *, changed: bool = True) -> FinetuneResult:
        return FinetuneResult(
            run_dir=self.run_dir, config=self.config, classes=self.classes, stages=stages,
            epochs=list(self.history), best_top1=self.best_top1, best_epoch=self.best_epoch, final=self.final,
            skipped=list(self.skipped), world_size=self.dist.world_size, device=str(self.device),
            steps=self.position.step, seconds=time.perf_counter() - start, notes=self.notes, changed=changed,
            saved=self._saved_entries(),
        )

    def _saved_entries(self) -> list[str]:
        if self.run_dir is None:
            return []
        names = [f"{LAST_DIR}/", f"{BEST_DIR}/", METRICS_FILE, CONFIG_FILE, LOG_FILE, CURVE_FILE]
        return [name for name in names if (self.run_dir / name.rstrip("/")).exists()]

    def _run(self, start: float) -> FinetuneResult:
        resumed_from = self.position.to_dict() if self.resumed else None
        if self.resumed:
            self._truncate_metrics()
            self._write_record({"type": "resumed", **self.position.to_dict()})
            self._log(
                f"resumed at stage {self.position.stage + 1}, epoch {self.position.epoch + 1}, "
                f"batch {self.position.batch}"
            )
        else:
            self.create_run_dir()
        self.emit(RunStarted(self.plans, self.config.total_epochs, self.batches_per_epoch, self.steps_per_epoch,
                             len(self.train_dataset), len(self.val_dataset) if self.val_dataset is not None else 0,
                             self.dist.world_size, str(self.device), resumed_from, self.run_dir))
        self._check_skipped()
        if self.config.checkpoint_activations:
            enable_activation_checkpointing(self.model)
        if self.resumed and self.rng_at_boundary is not None:
            _set_rng_state(self.rng_at_boundary, self.device)
        else:
            _seed_everything(self.config.seed)
            self.rng_at_boundary = None
        stage_results: list[StageSummary] = [
            StageSummary.from_dict(self.stage_summaries[p.index]) for p in self.plans[: self.position.stage]
            if p.index in self.stage_summaries
        ]
        try:
            with _SignalFlag() as flag, _deterministic(self.config.deterministic, self.device):
                for plan in self.plans[self.position.stage :]:
                    self.start_stage(plan)
                    for epoch in range(max(plan.first_epoch, self.position.epoch), plan.last_epoch + 1):
                        if self.position.epoch != epoch:
                            self.position = _Position(plan.index, epoch, 0, self.position.step)
                        outcome = self.train_epoch(plan, epoch, flag)
                        if outcome == "interrupted":
                            self._interrupt(flag)
                        self.end_epoch(plan, epoch)
                        if self._agree(outcome == "stop" or flag.requested):
                            if epoch == plan.last_epoch:
                                stage_results.append(self.end_stage(plan))
                            self._interrupt(flag, saved=True)
                    stage_results.append(self.end_stage(plan))
                    self.plot()
        finally:
            if self.config.checkpoint_activations:
                disable_activation_checkpointing(self.model)
            self.model.eval()
        self._log("finished")
        return self._result(start, stage_results)

    def _interrupt(self, flag: _SignalFlag, saved: bool = False) -> None:
        reason = flag.signal_name or "KeyboardInterrupt"
        if not saved:
            rng = self.rng_at_boundary or _rng_state(self.device)
            state = self._state(self.position, rng, self.epoch_sums, self.log_sums)
            self.save_checkpoint(LAST_DIR, state, self.position.epoch, {"interrupted": True})
        target = self.run_dir / LAST_DIR if self.run_dir is not None else None
        self._write_record({"type": "interrupted", "signal": reason, **self.position.to_dict()})
        self._log(f"interrupted ({reason}) at stage {self.position.stage + 1}, epoch {self.position.epoch + 1}, "
                  f"batch {self.position.batch}; saved {target}")
        self.plot()
        where = f"epoch {self.position.epoch + 1}, batch {self.position.batch}, step {self.position.step}"
        message = f"interrupted at {where}"
        if target is not None:
            message += f"; saved {target} — resume with: stjfd finetune {self.run_dir} --resume"
        raise TrainingInterrupted(message, target, self.position.to_dict(), reason)

    def _truncate_metrics(self) -> None:
        """Drop records written after the saved position (a crash between a record and the checkpoint)."""
        if self.run_dir is None or not self.dist.main:
            return
        path = self.run_dir / METRICS_FILE
        keep = [r for r in read_metrics(self.run_dir) if int(r.get("step", 0)) <= self.position.step]
        with atomic_file(path, "internal") as staging:
            staging.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in keep), encoding="utf-8")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fmt_bytes(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f} MiB"


def _manifest_normalization(clip: Mapping[str, Any]) -> dict[str, list[float]]:
    """The input normalisation the model was trained with; frames scaled to 0..1 without mean/std."""
    if clip.get("mean") and clip.get("std"):
        return {"mean": list(clip["mean"]), "std": list(clip["std"])}
    return {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def _clip_description(dataset: Dataset | None) -> dict[str, Any] | None:
    config = getattr(dataset, "config", None)
    if config is None or not hasattr(config, "clip_len"):
        return None
    return {
        "clip_len": config.clip_len,
        "size": list(config.size),
        "frame_stride": config.frame_stride,
        "resize": config.resize,
        "mean": list(config.mean) if config.mean else None,
        "std": list(config.std) if config.std else None,
        "clips_per_video": config.clips_per_video,
    }


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def finetune(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset | None = None,
    config: FinetuneConfig | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    run_dir: str | Path | None = None,
    spec: ArchSpec | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    run_info: Mapping[str, Any] | None = None,
    inputs: Sequence[str | Path] = (),
    datasets: Sequence[str | Path] = (),
) -> FinetuneResult:
    """Fine-tune ``model`` (in place; converted or plain) on ``train_dataset`` with ``config``'s schedule.

    Items of the datasets are ``(clip [C, T, H, W], label)`` (``stjfd_convert.data`` datasets); validation
    clips may be ``[K, C, T, H, W]``. With ``run_dir`` the run folder is written (``spec`` — the model's
    :class:`ArchSpec` — makes ``last/``/``best/`` loadable without pickles; ``overwrite`` replaces an existing
    run folder, never anything else, nor one of ``inputs`` or ``datasets``: :mod:`stjfd_convert.atomic`). ``run_info`` adds fields to config.json (the CLI records data options and the model source there
    so that :func:`resume` can rebuild everything). Raises :class:`TrainingInterrupted` on Ctrl-C and
    :class:`NonFiniteLossError` when the loss diverges. The model is returned to eval mode.
    """
    config = config or FinetuneConfig()
    if run_dir is not None and os.environ.get("RANK", "0") == "0":
        check_output(run_dir, "run", force=overwrite, inputs=inputs, datasets=datasets)
    return _train(
        lambda dist: _Trainer(
            model, train_dataset, val_dataset, config, callbacks=callbacks, loss_fn=loss_fn, run_dir=run_dir,
            spec=spec, classes=classes, overwrite=overwrite, run_info=run_info, state=None, dist=dist,
            inputs=inputs, datasets=datasets,
        ),
        config,
    )


def _train(make: Callable[[_Dist], _Trainer], config: FinetuneConfig, note: str | None = None) -> FinetuneResult:
    """Initialise the process group (torchrun), build the trainer, run it; tear down what we set up."""
    dist = _init_distributed(config.device)
    try:
        trainer = make(dist)
        if note:
            trainer.notes.append(note)
        return trainer.run()
    finally:
        if dist.created:
            import torch.distributed as torch_dist

            with contextlib.suppress(Exception):
                torch_dist.destroy_process_group()


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ResumeError(f"{run_dir} has no {CONFIG_FILE}; it is not a fine-tuning run folder",
                          "pass the -o folder of an earlier `stjfd finetune`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path} is not readable JSON: {exc}", "the run folder is damaged; start a new run") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise ResumeError(f"{path} is not a stjfd fine-tuning config", "pass the -o folder of `stjfd finetune`")
    return data


def load_training_state(run_dir: str | Path) -> dict[str, Any]:
    """``last/training_state.pt`` of a run, read with ``torch.load(weights_only=True)``."""
    path = Path(run_dir) / LAST_DIR / STATE_FILE
    if not path.is_file():
        raise ResumeError(
            f"{run_dir} has no {LAST_DIR}/{STATE_FILE}: it stopped before its first checkpoint",
            "start the run again (without --resume)",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ResumeError(f"{path} cannot be read: {str(exc).splitlines()[0][:200]}", "start a new run") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{path} is not a stjfd training state", "start a new run")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise ResumeError(f"{path} was written by a newer stjfd", "upgrade stjfd")
    return state


def resume(
    run_dir: str | Path,
    train_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    trust_pickle: bool = False,
    data_root: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    plot: bool | None = None,
    trust_code: bool = False,
    model: str | None = None,
) -> FinetuneResult:
    """Continue the run in ``run_dir`` from ``last/`` exactly where it stopped.

    A run that had finished is left exactly as it is (``result.changed`` is False). ``trust_code``
    (or ``model``, the same builder named again) allows the builder named by the run's manifest
    (see :func:`stjfd_convert.saved_model.load_converted`).

    Without datasets they are rebuilt from the data options recorded in config.json (``data_root``
    overrides a moved dataset root). Same seed on CPU ⇒ the same final weights and metrics as a run that
    was never interrupted. Only ``workers`` and ``plot`` may differ from the original run (neither changes
    the results: clips are seeded per sample).
    """
    from .saved_model import load_converted

    run_dir = Path(run_dir)
    info = read_run_config(run_dir)
    state = load_training_state(run_dir)
    config = FinetuneConfig.from_dict(state["config"])
    if workers is not None:
        config = replace(config, workers=workers)
    if plot is not None:
        config = replace(config, plot=plot)
    loaded = load_converted(run_dir / LAST_DIR, trust_pickle=trust_pickle, trust_code=trust_code, model=model)
    if train_dataset is None:
        data = info.get("data")
        if not data:
            raise ResumeError(f"{run_dir}/{CONFIG_FILE} records no dataset", "pass the datasets to resume()")
        train_dataset, val_dataset, _ = _build_data(data, data_root, config.seed, progress)
    classes = list(state.get("classes") or info.get("classes") or [])
    train_classes = list(getattr(train_dataset, "classes", []) or [])
    if train_classes and classes and train_classes != classes:
        raise ResumeError(
            f"the dataset's classes ({', '.join(train_classes[:5])}…) differ from the run's "
            f"({', '.join(classes[:5])}…)",
            "resume with the dataset the run was started on",
        )
    run_info = {k: v for k, v in info.items() if k not in ("format", "version", "finetune", "classes", "world_size")}
    return _train(
        lambda dist: _Trainer(
            loaded.model.train(), train_dataset, val_dataset, config, callbacks=callbacks, loss_fn=loss_fn,
            run_dir=run_dir, spec=loaded.spec, classes=classes or None, overwrite=False, run_info=run_info,
            state=state, dist=dist,
        ),
        config,
    )


# --------------------------------------------------------------------------------------------
# From paths (the CLI's workflows)
# --------------------------------------------------------------------------------------------


def _build_data(
    data: Mapping[str, Any], root_override: str | Path | None, seed: int, progress: Callable[[int, int], None] | None
) -> tuple[Dataset, Dataset | None, list[str]]:
    from .data import build_datasets

    root = Path(root_override) if root_override is not None else Path(data["root"])
    size = data["size"]
    return build_datasets(
        root,
        clip_len=int(data["clip_len"]),
        size=tuple(size) if isinstance(size, (list, tuple)) else int(size),
        frame_stride=int(data.get("frame_stride", 1)),
        val_split=data.get("val_split"),
        mean=data.get("mean"),
        std=data.get("std"),
        seed=seed,
        val_clips_per_video=int(data.get("val_clips_per_video", 1)),
        progress=progress,
    )


def _load_any_model(
    source: str | Path,
    *,
    arch: str | None,
    model: str | None,
    model_kwargs: Mapping[str, Any] | None,
    trust_pickle: bool,
    trust_code: bool = False,
) -> tuple[nn.Module, ArchSpec, dict[str, Any]]:
    from .models import load_model
    from .saved_model import is_converted_dir, load_converted

    source = Path(source)
    if is_converted_dir(source):
        if arch:
            raise ConfigError(f"{source} is a converted-model folder; --arch does not apply", "drop it")
        loaded = load_converted(source, trust_pickle=trust_pickle, trust_code=trust_code, model=model)
        return loaded.model, loaded.spec, {"source": str(source), "kind": "converted"}
    if source.is_dir():
        raise ConfigError(
            f"{source} is a folder without a converted model (no model.stjfd.json)",
            "pass a folder written by `stjfd convert`, a checkpoint file, or a run folder with --resume",
        )
    if not source.exists():
        raise ConfigError(f"model {source} does not exist", "pass a converted-model folder or a checkpoint file")
    loaded = load_model(source, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle)
    return loaded.model, loaded.spec, {"source": str(source), "kind": "checkpoint", "sha256": loaded.sha256}


def finetune_paths(
    model_source: str | Path,
    data_root: str | Path,
    config: FinetuneConfig,
    *,
    output: str | Path,
    clip_len: int,
    size: int | tuple[int, int],
    frame_stride: int = 1,
    val_split: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    val_clips_per_video: int = 1,
    arch: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> FinetuneResult:
    """Load a converted-model folder (or a checkpoint: a plain model), build the datasets, fine-tune.

    Everything that can be wrong with the input is checked before the run folder ``output`` is created.
    The classifier is re-created when the model predicts another number of classes than the dataset has.
    Normalisation defaults to the statistics of the torchvision architecture (if any).
    """
    from .data import normalization_for
    from .models import TORCHVISION_VIDEO_ARCHS

    from .models import model_source_paths

    is_main = os.environ.get("RANK", "0") == "0"
    inputs, datasets = [model_source, *model_source_paths(model)], [data_root]
    if is_main:
        check_output(output, "run", force=overwrite, inputs=inputs, datasets=datasets)
    net, spec, source_info = _load_any_model(
        model_source, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle,
        trust_code=trust_code,
    )
    if mean is None and std is None and spec.kind == "torchvision" and spec.name in TORCHVISION_VIDEO_ARCHS:
        mean, std = normalization_for(spec.name)
    data = {
        "root": str(Path(data_root).absolute()),
        "clip_len": clip_len,
        "size": list(size) if isinstance(size, (list, tuple)) else size,
        "frame_stride": frame_stride,
        "val_split": val_split,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "val_clips_per_video": val_clips_per_video,
    }
    train_ds, val_ds, classes = _build_data(data, None, config.seed, progress)
    spec, note = adapt_classifier(net, spec, len(classes), seed=config.seed)
    info = {"data": data, "model": {**source_info, "spec": spec.to_dict()}, "command": command}
    result = finetune(
        net, train_ds, val_ds, config, callbacks=callbacks, loss_fn=loss_fn, run_dir=output, spec=spec,
        classes=classes, overwrite=overwrite, run_info=info, inputs=inputs, datasets=datasets,
    )
    if note:
        result.notes.insert(0, note)
    return result


def evaluate_folder(
    model_dir: str | Path,
    data: str | Path,
    *,
    clip_len: int | None = None,
    size: int | tuple[int, int] | None = None,
    frame_stride: int | None = None,
    clips_per_video: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str = "auto",
    amp: bool = False,
    trust_pickle: bool = False,
    trust_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[EvalResult, list[tuple[str, str]]]:
    """Evaluate a saved model folder (``runs/x/best``, or any converted model) on a labelled split.

    Clip options default to those recorded by fine-tuning in the manifest; classes are the run's (else
    the split's folder names). ``data`` is a split (class folders or list file), or a root holding ``val/``.
    Returns the result and the skipped (path, reason) pairs.
    """
    from .data import ClipConfig, ClipDataset, DataError, find_sources, normalization_for
    from .models import TORCHVISION_VIDEO_ARCHS
    from .saved_model import load_converted

    loaded = load_converted(model_dir, trust_pickle=trust_pickle, trust_code=trust_code)
    recorded = (loaded.manifest.get("finetune") or {}) if isinstance(loaded.manifest.get("finetune"), dict) else {}
    clip = recorded.get("clip") or {}
    classes = recorded.get("classes")
    clip_len = clip_len or clip.get("clip_len")
    if size is None and clip.get("size"):
        size = tuple(clip["size"])
    if clip_len is None or size is None:
        shape = (loaded.manifest.get("input") or {}).get("shape")
        if shape and len(shape) == 5:
            clip_len = clip_len or shape[2]
            size = size or (shape[3], shape[4])
    if clip_len is None or size is None:
        raise ConfigError(f"{model_dir} records no clip size", "pass --clip-len and --size")
    if mean is None and std is None:
        mean, std = clip.get("mean"), clip.get("std")
        spec = loaded.spec
        if mean is None and spec.kind == "torchvision" and spec.name in TORCHVISION_VIDEO_ARCHS:
            mean, std = normalization_for(spec.name)
    config = ClipConfig(
        clip_len=int(clip_len), size=size if isinstance(size, int) else tuple(int(s) for s in size),
        frame_stride=int(frame_stride or clip.get("frame_stride") or 1), resize=clip.get("resize"), train=False,
        clips_per_video=int(clips_per_video or clip.get("clips_per_video") or 1),
        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
    )
    split = Path(data)
    if split.is_dir() and (split / "val").is_dir() and not (classes and "val" in classes):
        split = split / "val"
    sources, found_classes, skipped = find_sources(split, classes)
    if not sources:
        raise DataError(f"{split} has no videos to evaluate", "pass a folder of class folders or a list file")
    dataset = ClipDataset(sources, found_classes, config, name=str(split))
    result = evaluate(
        loaded.model, dataset, classes=found_classes, batch_size=batch_size, workers=workers, device=device,
        amp=amp, progress=progress,
    )
    return result, [(str(p), r) for p, r in dataset.skipped]
