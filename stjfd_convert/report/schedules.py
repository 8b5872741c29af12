"""Training schedules (original/converted, joint/stage, with or without checkpointing), measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..inputs import InputShape, primary_shape
from ..memory import TrainingMemory, measure_training_step
from ..stages import stage_clip_shape


@dataclass(frozen=True)
class Schedule:
    """A way to train: which model, which stage(s), with or without checkpointing.

    ``stages`` with two entries is the alternating schedule: the stage needing most memory decides.
    """

    key: str
    label: str
    model: str  # "original" | "converted"
    stages: tuple[str, ...]
    checkpointing: bool


# The three baselines every table compares against.
ORIGINAL_JOINT = Schedule("original_joint", "original joint", "original", ("joint",), False)
CONVERTED_JOINT = Schedule("joint", "converted joint", "converted", ("joint",), False)
CONVERTED_CHECKPOINTING = Schedule("checkpointing", "converted + checkpointing", "converted", ("joint",), True)

#: Measured one by one in the report's training table.
TRAINING_SCHEDULES = (
    ORIGINAL_JOINT,
    Schedule("original_checkpointing", "original + checkpointing", "original", ("joint",), True),
    CONVERTED_JOINT,
    CONVERTED_CHECKPOINTING,
    Schedule("temporal", "temporal stage", "converted", ("temporal",), False),
    Schedule("spatial", "spatial stage", "converted", ("spatial",), False),
    Schedule("temporal_checkpointing", "temporal + checkpointing", "converted", ("temporal",), True),
    Schedule("spatial_checkpointing", "spatial + checkpointing", "converted", ("spatial",), True),
)

#: Searched in a memory budget (``fits.what_fits``).
FIT_SCHEDULES = (
    ORIGINAL_JOINT,
    CONVERTED_JOINT,
    CONVERTED_CHECKPOINTING,
    Schedule("alternating", "alternating stages", "converted", ("temporal", "spatial"), False),
    Schedule("alternating_checkpointing", "alternating + checkpointing", "converted", ("temporal", "spatial"), True),
)

#: Measured against clip length for the plot (``fits.clip_sweep``).
SWEEP_SCHEDULES = (
    ORIGINAL_JOINT,
    CONVERTED_JOINT,
    Schedule("temporal", "temporal stage (H/s, W/s)", "converted", ("temporal",), False),
    Schedule("spatial", "spatial stage (T/r)", "converted", ("spatial",), False),
    CONVERTED_CHECKPOINTING,
)


@dataclass
class ScheduleMemory:
    """One measured training schedule and, for the stages, the analytic expectation.

    ``analytic_activation_bytes``: the full-size run's saved activations × 1/s² (temporal) or 1/r
    (spatial), the full-size run being the same model and checkpointing setting in joint training.
    """

    key: str
    label: str
    model: str
    stage: str
    checkpointing: bool
    memory: TrainingMemory
    analytic_activation_bytes: int | None = None
    analytic_factor: str | None = None

    @property
    def analytic_ratio(self) -> float | None:
        """measured / analytic saved activations (1.0: they agree)."""
        if not self.analytic_activation_bytes:
            return None
        return self.memory.saved_activation_bytes / self.analytic_activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "model": self.model,
            "stage": self.stage,
            "checkpointing": self.checkpointing,
            "analytic_activation_bytes": self.analytic_activation_bytes,
            "analytic_factor": self.analytic_factor,
            "analytic_ratio": self.analytic_ratio,
            **self.memory.to_dict(),
        }


def measure_schedules(
    models: Mapping[str, nn.Module],
    input_shape: InputShape | Sequence[int],
    *,
    spatial_downsample: int = 2,
    temporal_downsample: int = 2,
    optimizer: str = "sgd",
    device: str = "cpu",
    steps: int = 3,
    schedules: Sequence[Schedule] = TRAINING_SCHEDULES,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    container: str = "list",
) -> list[ScheduleMemory]:
    """Measure each single-stage schedule in ``schedules`` at ``input_shape`` (stages downsampled)."""
    results: list[ScheduleMemory] = []
    full: dict[tuple[str, bool], TrainingMemory] = {}
    for schedule in schedules:
        if schedule.model not in models or len(schedule.stages) != 1:
            continue
        stage = schedule.stages[0]
        if progress is not None:
            progress(schedule.label)
        shape = stage_clip_shape(input_shape, stage, spatial_downsample, temporal_downsample)
        memory = measure_training_step(
            models[schedule.model], shape, stage=stage, optimizer=optimizer, checkpointing=schedule.checkpointing,
            device=device, steps=steps, loss_fn=loss_fn, container=container,
        )
        entry = ScheduleMemory(schedule.key, schedule.label, schedule.model, stage, schedule.checkpointing, memory)
        if stage == "joint":
            full[(schedule.model, schedule.checkpointing)] = memory
        else:
            reference = full.get((schedule.model, schedule.checkpointing))
            if reference is not None:
                full_clip, stage_clip = primary_shape(input_shape), primary_shape(shape)
                if stage == "temporal":
                    factor = (full_clip[3] * full_clip[4]) / (stage_clip[3] * stage_clip[4])
                    entry.analytic_factor = f"1/{spatial_downsample}²"
                else:
                    factor = full_clip[2] / stage_clip[2]
                    entry.analytic_factor = f"1/{temporal_downsample}"
                entry.analytic_activation_bytes = round(reference.saved_activation_bytes / factor)
        results.append(entry)
    return results
