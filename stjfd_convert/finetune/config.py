"""The options of a fine-tuning run: :class:`FinetuneConfig`, validated on creation, and the choices it accepts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ConfigError

SCHEDULES = ("alternating", "joint")

OPTIMIZERS = ("sgd", "adamw")

LR_SCHEDULES = ("cosine", "step", "constant")

AMP_DTYPES = ("auto", "bfloat16", "float16")

DEVICES = ("auto", "cpu", "cuda")

DOWNSAMPLE_MODES = ("area", "bilinear")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer ≥ {minimum}, got {value!r}", f"e.g. {name} {max(minimum, 1)}")


def _finite(name: str, value: Any, low: float, high: float = math.inf, *, closed_high: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        upper = "" if high == math.inf else (f", ≤ {high}" if closed_high else f", < {high}")
        example = _EXAMPLES.get(name)
        raise ConfigError(f"{name} must be a number ≥ {low}{upper}, got {value!r}", f"e.g. {name} {example}" if example
                          else "leave it out for the default")


# An in-range value per option, for the hint of an out-of-range one.
_EXAMPLES = {"--lr": "0.01", "--min-lr": "0", "--momentum": "0.9", "--weight-decay": "1e-4", "--warmup-epochs": "1",
             "--lr-gamma": "0.1", "--label-smoothing": "0.1", "--grad-clip": "1.0"}


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
    # A multi-pathway model (SlowFast): pathway i = every pathway_strides[i]-th frame of each clip, passed
    # as a list (or tuple); None feeds the clip as one tensor. See stjfd_convert.inputs.
    pathway_strides: tuple[int, ...] | None = None
    input_container: str = "list"

    def __post_init__(self) -> None:
        if self.pathway_strides is not None:
            from ..inputs import parse_pathway_strides

            object.__setattr__(self, "pathway_strides", parse_pathway_strides(self.pathway_strides))
        from ..inputs import check_container

        check_container(self.input_container)
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
            raise ConfigError(f"unknown --device {self.device!r}", "use --device auto, cpu, cuda or cuda:N")
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
