"""What fits in a memory budget (longest clip, largest batch per schedule) and memory against clip length."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..inputs import InputShape, input_shape_to_json, normalize_input_shape, resize_input
from ..memory import MeasurementError, SizeSearch, measure_training_step, search_max_size
from ..stages import stage_clip_shape
from .schedules import FIT_SCHEDULES, SWEEP_SCHEDULES, Schedule


@dataclass
class FitAnswer:
    """Longest clip (at ``batch``) and largest batch (at ``frames``) of one schedule in the budget.

    An alternating schedule fits when each of its stages fits, so every stage is searched on its
    own (each has its own linear fit) and the smaller answer wins: ``deciding_stage``; ``clip`` and
    ``batch`` are that stage's searches, ``by_stage`` holds all of them.
    """

    key: str
    label: str
    clip: SizeSearch
    batch: SizeSearch
    deciding_stage: str | None = None
    by_stage: dict[str, dict[str, SizeSearch]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "max_frames": self.clip.answer,
            "max_batch": self.batch.answer,
            "deciding_stage": self.deciding_stage,
            "clip_search": self.clip.to_dict(),
            "batch_search": self.batch.to_dict(),
            "by_stage": {
                stage: {dim: search.to_dict() for dim, search in searches.items()}
                for stage, searches in self.by_stage.items()
            },
        }


@dataclass
class WhatFits:
    """The budget question: ``answers`` per schedule, at frames of ``frame_size``².

    ``device``: where the searches measured (``meta``: exact tensor sizes without arithmetic;
    ``cuda``: ``max_memory_allocated``). ``cross_check`` compares the smallest sample on ``meta``
    with the same step on CPU (both in bytes), when the searches ran on ``meta``.
    """

    budget_bytes: int
    frame_size: int
    batch: int
    frames: int
    spatial_downsample: int
    temporal_downsample: int
    optimizer: str
    device: str
    answers: list[FitAnswer]
    cross_check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("answers",)}
        data["answers"] = [a.to_dict() for a in self.answers]
        return data


def _stage_bytes(
    model: nn.Module, stage: str, checkpointing: bool, shape: InputShape, s: int, r: int, optimizer: str,
    device: str, loss_fn: Callable[[Any], torch.Tensor] | None, container: str = "list",
) -> int:
    memory = measure_training_step(
        model, stage_clip_shape(shape, stage, s, r), stage=stage, optimizer=optimizer, checkpointing=checkpointing,
        device=device, steps=1 if device.startswith("cuda") else 0, loss_fn=loss_fn, container=container,
    )
    return memory.budget_bytes


def what_fits(
    models: Mapping[str, nn.Module],
    budget_bytes: int,
    frame_size: int,
    *,
    batch: int = 1,
    frames: int = 16,
    channels: int = 3,
    spatial_downsample: int = 2,
    temporal_downsample: int = 2,
    optimizer: str = "sgd",
    device: str = "meta",
    schedules: Sequence[Schedule] = FIT_SCHEDULES,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
    template: InputShape | None = None,
    container: str = "list",
) -> WhatFits:
    """Longest clip and largest batch per schedule within ``budget_bytes`` (see ``search_max_size``).

    The temporal stage sees frames of ``frame_size/s``, the spatial stage ``frames/r`` frames; an
    alternating schedule fits when both of its stages fit. The time axis starts at the smallest
    clip the model accepts (found by measuring). ``template``: a multi-pathway input, whose primary
    pathway takes the searched size (the others keep their ratio to it).
    """
    s, r = spatial_downsample, temporal_downsample
    template = template if template is not None else (batch, channels, frames, frame_size, frame_size)
    answers: list[FitAnswer] = []
    for schedule in schedules:
        model = models.get(schedule.model)
        if model is None:
            continue
        if progress is not None:
            progress(schedule.label)
        by_stage: dict[str, dict[str, SizeSearch]] = {}
        for stage in schedule.stages:

            def by_frames(t: int, stage: str = stage, schedule: Schedule = schedule, model: nn.Module = model) -> int:
                shape = resize_input(template, batch=batch, frames=t, height=frame_size, width=frame_size)
                return _stage_bytes(
                    model, stage, schedule.checkpointing, shape, s, r, optimizer, device, loss_fn, container
                )

            def by_batch(b: int, stage: str = stage, schedule: Schedule = schedule, model: nn.Module = model) -> int:
                shape = resize_input(template, batch=b, frames=frames, height=frame_size, width=frame_size)
                return _stage_bytes(
                    model, stage, schedule.checkpointing, shape, s, r, optimizer, device, loss_fn, container
                )

            # The clip fit starts at 4 frames: very short clips are dominated by stride rounding.
            by_stage[stage] = {
                "frames": search_max_size(by_frames, budget_bytes, samples=(4, 8, 16)),
                "batch": search_max_size(by_batch, budget_bytes, samples=(1, 2, 4)),
            }
        clip_stage = min(by_stage, key=lambda st: by_stage[st]["frames"].answer)
        batch_stage = min(by_stage, key=lambda st: by_stage[st]["batch"].answer)
        answers.append(
            FitAnswer(
                schedule.key, schedule.label, by_stage[clip_stage]["frames"], by_stage[batch_stage]["batch"],
                clip_stage if len(by_stage) > 1 else None, by_stage,
            )
        )
    cross = None
    if device == "meta" and answers:
        first = next(s for s in schedules if s.model in models)
        size = answers[0].clip.minimum
        shape = resize_input(template, batch=batch, frames=max(size, 4), height=frame_size, width=frame_size)
        options = dict(optimizer=optimizer, steps=0, container=container)
        meta = measure_training_step(models[first.model], shape, device="meta", **options)
        cpu = measure_training_step(models[first.model], shape, device="cpu", **options)
        cross = {"schedule": first.key, "input_shape": input_shape_to_json(shape), "meta_bytes": meta.budget_bytes,
                 "cpu_bytes": cpu.budget_bytes}
    return WhatFits(
        budget_bytes, frame_size, batch, frames, s, r, optimizer, device, answers, cross,
    )


# --------------------------------------------------------------------------------------------
# Training memory against clip length (for the plot)
# --------------------------------------------------------------------------------------------


@dataclass
class SweepPoint:
    """Total training bytes of each schedule at ``frames`` frames (stages downsampled as usual)."""

    frames: int
    total_bytes: dict[str, int]


def clip_sweep(
    models: Mapping[str, nn.Module],
    input_shape: InputShape | Sequence[int],
    frames: Sequence[int],
    *,
    spatial_downsample: int = 2,
    temporal_downsample: int = 2,
    optimizer: str = "sgd",
    device: str = "meta",
    container: str = "list",
) -> list[SweepPoint]:
    """Measured total training bytes against clip length (sizes that the model rejects are skipped;
    ``frames`` is the primary pathway's length, the others keep their ratio to it)."""
    points = []
    for t in frames:
        shape = resize_input(normalize_input_shape(input_shape), frames=int(t))
        totals = {}
        for schedule in SWEEP_SCHEDULES:
            if schedule.model not in models:
                continue
            stage = schedule.stages[0]
            try:
                memory = measure_training_step(
                    models[schedule.model], stage_clip_shape(shape, stage, spatial_downsample, temporal_downsample),
                    stage=stage, optimizer=optimizer, checkpointing=schedule.checkpointing, device=device, steps=0,
                    container=container,
                )
            except MeasurementError:
                continue
            totals[schedule.key] = memory.total_bytes
        if totals:
            points.append(SweepPoint(int(t), totals))
    return points
