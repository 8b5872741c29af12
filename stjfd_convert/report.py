"""``stjfd report``: what a conversion saves, counted from the real modules and measured.

- Parameters and their bytes at fp32/fp16/bf16/int8, per layer and in total (Σ numel of the real
  modules; int8 counts one byte per weight, without quantisation scales).
- MACs per clip from each layer's actual input geometry (recorded with forward hooks) and
  ``functional/cost.py``'s ``form_cost`` for the form the layer runs (``auto`` resolved per input
  shape). Rebuilding a fused weight is a one-off (it is cached while the parameters do not change),
  reported apart and not in the per-clip MACs.
- Inference activation memory: peak of live tensors during a no-grad forward
  (``memory.measure_inference_peak``).
- Training memory per schedule (joint, temporal stage, spatial stage, each with and without
  per-block activation checkpointing), measured with ``memory.measure_training_step``, next to the
  analytic expectation for the stages' activations (1/s², 1/r).
- What fits in a memory budget: the longest clip and the largest batch per schedule, found by a
  linear fit of measurements and verified by measuring the answer and one step above.

Everything here returns dataclasses; terminal rendering lives in ``cli/cmd_report.py``.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .atomic import atomic_file
from .config import ConvertConfig
from .errors import ConfigError, OutputError
from .functional.cost import form_cost
from .functional.conv import ConvGeometry
from .convert import densify
from .layers import FORMS, DecomposedConv3d
from .memory import (
    OPTIMIZERS,
    InferenceMemory,
    MeasurementError,
    SizeSearch,
    TrainingMemory,
    measure_inference_peak,
    measure_training_step,
    search_max_size,
)
from .stages import stage_clip_shape

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
MIB = 2**20


_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kb": 10**3, "kib": 2**10,
    "m": 2**20, "mb": 10**6, "mib": 2**20,
    "g": 2**30, "gb": 10**9, "gib": 2**30,
    "t": 2**40, "tb": 10**12, "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``"8GiB"`` → 8·2³⁰, ``"500MB"`` → 5·10⁸, ``"8G"`` → 8·2³⁰ (bare letters are binary)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"--memory-budget {text!r} is not a size", "e.g. --memory-budget 8GiB (units B, KB, MB, GB, KiB, MiB, GiB)"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"--memory-budget {text!r} must be positive", "e.g. --memory-budget 8GiB")
    return value


# --------------------------------------------------------------------------------------------
# Per-layer accounting
# --------------------------------------------------------------------------------------------


@dataclass
class LayerMemory:
    """One Conv3d / DecomposedConv3d / Linear layer: original vs converted, per clip (batch 1).

    ``macs_by_form``: MACs of each execution form (``form_cost``; empty for non-decomposed layers).
    ``form``: the form the layer's ``mode`` runs at this input (``auto`` resolved).
    ``rebuild_macs``: rebuilding the dense weight (fused form), once per parameter change. ``output_bytes`` and
    ``intermediate_bytes`` are fp32 activation sizes (the latter of the layer's own form).
    """

    name: str
    kind: str  # "decomposed" | "conv3d" (left dense) | "linear"
    kernel_size: tuple[int, ...] | None
    in_channels: int
    out_channels: int
    atoms: tuple[int, int] | None
    mode: str | None
    form: str | None
    input_size: tuple[int, ...] | None  # (T, H, W) of the first call, per clip
    calls: int
    params_original: int
    params_converted: int
    macs_original: int
    macs_converted: int
    rebuild_macs: int = 0
    macs_by_form: dict[str, int] = field(default_factory=dict)
    output_bytes: int = 0
    intermediate_bytes: int = 0

    def bytes_original(self, dtype: str = "fp32") -> int:
        return self.params_original * DTYPE_BYTES[dtype]

    def bytes_converted(self, dtype: str = "fp32") -> int:
        return self.params_converted * DTYPE_BYTES[dtype]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bytes_original"] = {d: self.bytes_original(d) for d in DTYPE_BYTES}
        data["bytes_converted"] = {d: self.bytes_converted(d) for d in DTYPE_BYTES}
        return data


@dataclass
class ModelTotals:
    """Whole-model figures (parameters of every module, not only the layers listed)."""

    params_original: int
    params_converted: int
    macs_original: int
    macs_converted: int
    macs_by_form: dict[str, int]  # whole model with every decomposed layer in that form
    decomposed_layers: int
    conv_layers: int

    def bytes_original(self, dtype: str = "fp32") -> int:
        return self.params_original * DTYPE_BYTES[dtype]

    def bytes_converted(self, dtype: str = "fp32") -> int:
        return self.params_converted * DTYPE_BYTES[dtype]

    @property
    def param_ratio(self) -> float:
        return self.params_converted / self.params_original if self.params_original else 1.0

    @property
    def mac_ratio(self) -> float:
        return self.macs_converted / self.macs_original if self.macs_original else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bytes_original"] = {d: self.bytes_original(d) for d in DTYPE_BYTES}
        data["bytes_converted"] = {d: self.bytes_converted(d) for d in DTYPE_BYTES}
        data["param_ratio"] = self.param_ratio
        data["mac_ratio"] = self.mac_ratio
        return data


def _record_inputs(
    model: nn.Module, clip_shape: Sequence[int]
) -> dict[int, list[tuple[tuple[int, ...], tuple[int, ...], str | None]]]:
    """(input shape, output shape, form) of every call of each Conv3d/DecomposedConv3d/Linear.

    Shapes come from a run on the meta device (no arithmetic); the form of a decomposed layer is
    resolved on the real layer (``auto`` depends on the real device and the input shape).
    """
    calls: dict[int, list[tuple[tuple[int, ...], tuple[int, ...], str | None]]] = {}
    work = copy.deepcopy(model).to("meta").eval()
    twins = {id(twin): module for module, twin in zip(model.modules(), work.modules())}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        real = twins[id(module)]
        form = None
        if isinstance(real, DecomposedConv3d):
            probe = real.coefficients
            form = real.form_for(torch.empty(inputs[0].shape, dtype=probe.dtype, device=probe.device))
        calls.setdefault(id(real), []).append((tuple(inputs[0].shape), tuple(output.shape), form))

    handles = [
        twin.register_forward_hook(hook)
        for twin in work.modules()
        if isinstance(twin, (nn.Conv3d, DecomposedConv3d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            work(torch.empty(tuple(clip_shape), device="meta"))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"the model cannot run on a {'×'.join(map(str, clip_shape))} clip: {first[:200]}",
            "pass a matching --input-shape B,C,T,H,W",
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return calls


def rebuild_macs(layer: DecomposedConv3d) -> int:
    """MACs of ``reconstruct_weight``: (O·I·m_t × m_s)@(m_s × S), then (L × m_t)@(m_t × O·I·S)."""
    g = layer.geometry
    pairs = g.out_channels * g.in_per_group
    m_t, m_s = layer.num_temporal_atoms, layer.num_spatial_atoms
    return pairs * m_t * m_s * g.spatial_taps + g.temporal_taps * m_t * pairs * g.spatial_taps


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_table(
    converted: nn.Module, original: nn.Module, clip_shape: Sequence[int]
) -> tuple[list[LayerMemory], ModelTotals]:
    """Per-layer rows and totals for ``converted`` against ``original`` (same module names).

    ``clip_shape`` is [B, C, T, H, W]; MACs and activation bytes are per clip (batch 1).
    """
    clip = (1, *tuple(clip_shape)[1:])
    calls = _record_inputs(converted, clip)
    original_modules = dict(original.named_modules())
    rows: list[LayerMemory] = []
    form_macs = {form: 0 for form in FORMS}
    for name, module in converted.named_modules():
        if not isinstance(module, (nn.Conv3d, DecomposedConv3d, nn.Linear)):
            continue
        twin = original_modules.get(name)
        params_original = _numel(twin) if twin is not None else _numel(module)
        seen = calls.get(id(module), [])
        output_bytes = sum(_prod(o) for _, o, _ in seen) * 4
        if isinstance(module, nn.Linear):
            macs = sum(module.out_features * _prod(i) for i, _, _ in seen)
            rows.append(
                LayerMemory(
                    name, "linear", None, module.in_features, module.out_features, None, None, None,
                    None, len(seen), params_original, _numel(module), macs, macs, output_bytes=output_bytes,
                )
            )
            for form in FORMS:
                form_macs[form] += macs
            continue
        decomposed = isinstance(module, DecomposedConv3d)
        geometry = module.geometry if decomposed else ConvGeometry.from_conv(module)
        input_size = tuple(seen[0][0][2:]) if seen else None
        dense = sum(form_cost("dense", geometry, 1, 1, i[0], *i[2:]).macs for i, _, _ in seen)
        if not decomposed:
            for form in FORMS:
                form_macs[form] += dense
            rows.append(
                LayerMemory(
                    name, "conv3d", geometry.kernel_size, geometry.in_channels, geometry.out_channels, None, None,
                    None, input_size, len(seen), params_original, _numel(module), dense, dense,
                    output_bytes=output_bytes,
                )
            )
            continue
        m_t, m_s = module.num_temporal_atoms, module.num_spatial_atoms
        by_form = {form: 0 for form in FORMS}
        converted_macs = intermediate = 0
        for in_shape, _, used in seen:
            batch, _, t, h, w = in_shape
            for form in FORMS:
                cost = form_cost(form, geometry, m_t, m_s, batch, t, h, w)
                by_form[form] += cost.macs
                if form == used:
                    converted_macs += cost.macs
                    intermediate += cost.intermediate_elements
        for form in FORMS:
            form_macs[form] += by_form[form]
        forms_used = sorted({used for _, _, used in seen if used})
        rows.append(
            LayerMemory(
                name, "decomposed", geometry.kernel_size, geometry.in_channels, geometry.out_channels, (m_t, m_s),
                module.mode, "/".join(forms_used) or None, input_size, len(seen), params_original, _numel(module),
                dense, converted_macs, rebuild_macs(module), by_form, output_bytes, intermediate * 4,
            )
        )
    totals = ModelTotals(
        params_original=_numel(original),
        params_converted=_numel(converted),
        macs_original=sum(r.macs_original for r in rows),
        macs_converted=sum(r.macs_converted for r in rows),
        macs_by_form=form_macs,
        decomposed_layers=sum(1 for r in rows if r.kind == "decomposed"),
        conv_layers=sum(1 for r in rows if r.kind != "linear"),
    )
    return rows, totals


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


# --------------------------------------------------------------------------------------------
# Training schedules
# --------------------------------------------------------------------------------------------


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


TRAINING_SCHEDULES = (
    Schedule("original_joint", "original joint", "original", ("joint",), False),
    Schedule("original_checkpointing", "original + checkpointing", "original", ("joint",), True),
    Schedule("joint", "converted joint", "converted", ("joint",), False),
    Schedule("checkpointing", "converted + checkpointing", "converted", ("joint",), True),
    Schedule("temporal", "temporal stage", "converted", ("temporal",), False),
    Schedule("spatial", "spatial stage", "converted", ("spatial",), False),
    Schedule("temporal_checkpointing", "temporal + checkpointing", "converted", ("temporal",), True),
    Schedule("spatial_checkpointing", "spatial + checkpointing", "converted", ("spatial",), True),
)

FIT_SCHEDULES = (
    Schedule("original_joint", "original joint", "original", ("joint",), False),
    Schedule("joint", "converted joint", "converted", ("joint",), False),
    Schedule("checkpointing", "converted + checkpointing", "converted", ("joint",), True),
    Schedule("alternating", "alternating stages", "converted", ("temporal", "spatial"), False),
    Schedule("alternating_checkpointing", "alternating + checkpointing", "converted", ("temporal", "spatial"), True),
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
    input_shape: Sequence[int],
    *,
    spatial_downsample: int = 2,
    temporal_downsample: int = 2,
    optimizer: str = "sgd",
    device: str = "cpu",
    steps: int = 3,
    schedules: Sequence[Schedule] = TRAINING_SCHEDULES,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
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
            device=device, steps=steps, loss_fn=loss_fn,
        )
        entry = ScheduleMemory(schedule.key, schedule.label, schedule.model, stage, schedule.checkpointing, memory)
        if stage == "joint":
            full[(schedule.model, schedule.checkpointing)] = memory
        else:
            reference = full.get((schedule.model, schedule.checkpointing))
            if reference is not None:
                if stage == "temporal":
                    factor = (input_shape[3] * input_shape[4]) / (shape[3] * shape[4])
                    entry.analytic_factor = f"1/{spatial_downsample}²"
                else:
                    factor = input_shape[2] / shape[2]
                    entry.analytic_factor = f"1/{temporal_downsample}"
                entry.analytic_activation_bytes = round(reference.saved_activation_bytes / factor)
        results.append(entry)
    return results


# --------------------------------------------------------------------------------------------
# What fits in a memory budget
# --------------------------------------------------------------------------------------------


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
    model: nn.Module, stage: str, checkpointing: bool, shape: tuple[int, ...], s: int, r: int, optimizer: str,
    device: str, loss_fn: Callable[[Any], torch.Tensor] | None,
) -> int:
    memory = measure_training_step(
        model, stage_clip_shape(shape, stage, s, r), stage=stage, optimizer=optimizer, checkpointing=checkpointing,
        device=device, steps=1 if device.startswith("cuda") else 0, loss_fn=loss_fn,
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
) -> WhatFits:
    """Longest clip and largest batch per schedule within ``budget_bytes`` (see ``search_max_size``).

    The temporal stage sees frames of ``frame_size/s``, the spatial stage ``frames/r`` frames; an
    alternating schedule fits when both of its stages fit. The time axis starts at the smallest
    clip the model accepts (found by measuring).
    """
    s, r = spatial_downsample, temporal_downsample
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
                shape = (batch, channels, t, frame_size, frame_size)
                return _stage_bytes(model, stage, schedule.checkpointing, shape, s, r, optimizer, device, loss_fn)

            def by_batch(b: int, stage: str = stage, schedule: Schedule = schedule, model: nn.Module = model) -> int:
                shape = (b, channels, frames, frame_size, frame_size)
                return _stage_bytes(model, stage, schedule.checkpointing, shape, s, r, optimizer, device, loss_fn)

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
        shape = (batch, channels, max(size, 4), frame_size, frame_size)
        meta = measure_training_step(models[first.model], shape, optimizer=optimizer, device="meta", steps=0)
        cpu = measure_training_step(models[first.model], shape, optimizer=optimizer, device="cpu", steps=0)
        cross = {"schedule": first.key, "input_shape": list(shape), "meta_bytes": meta.total_bytes,
                 "cpu_bytes": cpu.total_bytes}
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


SWEEP_SCHEDULES = (
    Schedule("original_joint", "original joint", "original", ("joint",), False),
    Schedule("joint", "converted joint", "converted", ("joint",), False),
    Schedule("temporal", "temporal stage (H/s, W/s)", "converted", ("temporal",), False),
    Schedule("spatial", "spatial stage (T/r)", "converted", ("spatial",), False),
    Schedule("checkpointing", "converted + checkpointing", "converted", ("joint",), True),
)


def clip_sweep(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    frames: Sequence[int],
    *,
    spatial_downsample: int = 2,
    temporal_downsample: int = 2,
    optimizer: str = "sgd",
    device: str = "meta",
) -> list[SweepPoint]:
    """Measured total training bytes against clip length (sizes that the model rejects are skipped)."""
    points = []
    for t in frames:
        shape = (input_shape[0], input_shape[1], int(t), input_shape[3], input_shape[4])
        totals = {}
        for schedule in SWEEP_SCHEDULES:
            if schedule.model not in models:
                continue
            stage = schedule.stages[0]
            try:
                memory = measure_training_step(
                    models[schedule.model], stage_clip_shape(shape, stage, spatial_downsample, temporal_downsample),
                    stage=stage, optimizer=optimizer, checkpointing=schedule.checkpointing, device=device, steps=0,
                )
            except MeasurementError:
                continue
            totals[schedule.key] = memory.total_bytes
        if totals:
            points.append(SweepPoint(int(t), totals))
    return points


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class InferenceComparison:
    """Peak live activations at inference: original, converted (its own modes), and every
    decomposed layer switched to each form (measured on ``meta``: same sizes, no arithmetic)."""

    original: InferenceMemory
    converted: InferenceMemory
    by_form: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"original": self.original.to_dict(), "converted": self.converted.to_dict(), "by_form": self.by_form}


@dataclass
class MemoryReport:
    """Everything ``stjfd report`` shows; ``to_dict`` is the ``--json`` output."""

    source: str
    input_shape: tuple[int, ...]
    layers: list[LayerMemory]
    totals: ModelTotals
    inference: InferenceComparison
    training: list[ScheduleMemory]
    sweep: list[SweepPoint]
    fits: WhatFits | None
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def schedule(self, key: str) -> ScheduleMemory | None:
        return next((s for s in self.training if s.key == key), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "input_shape": list(self.input_shape),
            "settings": self.settings,
            "totals": self.totals.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "inference": self.inference.to_dict(),
            "training": [s.to_dict() for s in self.training],
            "sweep": [asdict(p) for p in self.sweep],
            "what_fits": self.fits.to_dict() if self.fits else None,
            "notes": list(self.notes),
        }


def _with_mode(model: nn.Module, mode: str) -> nn.Module:
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, DecomposedConv3d):
            module.mode = mode
    return twin


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 5 or any(s <= 0 for s in shape):
        raise ConfigError(
            f"--input-shape {','.join(map(str, shape))} is not B,C,T,H,W with positive sizes",
            "e.g. --input-shape 1,3,16,112,112",
        )
    return shape


def memory_report(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    original: nn.Module | None = None,
    source: str = "model",
    spatial_downsample: int = 2,
    temporal_downsample: int = 2,
    optimizer: str = "sgd",
    device: str = "cpu",
    steps: int = 3,
    training: bool = True,
    memory_budget: int | str | None = None,
    frame_size: int | None = None,
    sweep_frames: Sequence[int] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    progress: Callable[[str], None] | None = None,
) -> MemoryReport:
    """Compare converted ``model`` with ``original`` (default: ``densify(model)``) on [B,C,T,H,W] clips.

    ``device`` runs the training measurements (``cuda`` adds ``max_memory_allocated``); the
    what-fits searches and the clip sweep run on ``meta`` unless ``device`` is ``cuda``.
    """
    shape = _check_shape(input_shape)
    if spatial_downsample < 1 or temporal_downsample < 1:
        raise ConfigError("--spatial-downsample and --temporal-downsample must be ≥ 1", "e.g. 2")
    if steps < 1:
        raise ConfigError(f"--steps must be ≥ 1, got {steps}", "e.g. --steps 3")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown --optimizer {optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    if frame_size is not None and frame_size <= 0:
        raise ConfigError(f"--size must be positive, got {frame_size}", "e.g. --size 112")
    notes: list[str] = []
    original = original if original is not None else densify(model)
    models = {"original": original, "converted": model}
    if not any(isinstance(m, DecomposedConv3d) for m in model.modules()):
        notes.append("the model has no DecomposedConv3d: converted = original, every stage trains everything")

    def step(text: str) -> None:
        if progress is not None:
            progress(text)

    step("layers")
    layers, totals = layer_table(model, original, shape)
    step("inference")
    inference_device = "cuda" if str(device).startswith("cuda") else "cpu"
    inference = InferenceComparison(
        original=measure_inference_peak(original, shape, device=inference_device),
        converted=measure_inference_peak(model, shape, device=inference_device),
        by_form={form: measure_inference_peak(_with_mode(model, form), shape, device="meta").peak_bytes for form in FORMS},
    )
    schedules: list[ScheduleMemory] = []
    if training:
        schedules = measure_schedules(
            models, shape, spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample,
            optimizer=optimizer, device=device, steps=steps, loss_fn=loss_fn, progress=lambda t: step(f"training: {t}"),
        )
    search_device = "cuda" if str(device).startswith("cuda") else "meta"
    frames_list = list(sweep_frames) if sweep_frames is not None else sorted({4, 8, 16, 32, shape[2]})
    step("clip sweep")
    sweep = clip_sweep(
        models, shape, frames_list, spatial_downsample=spatial_downsample,
        temporal_downsample=temporal_downsample, optimizer=optimizer, device=search_device,
    )
    fits = None
    if budget is not None:
        fits = what_fits(
            models, budget, frame_size or shape[3], batch=shape[0], frames=shape[2], channels=shape[1],
            spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample, optimizer=optimizer,
            device=search_device, loss_fn=loss_fn, progress=lambda t: step(f"what fits: {t}"),
        )
    modes = sorted({m.mode for m in model.modules() if isinstance(m, DecomposedConv3d)})
    settings = {
        "spatial_downsample": spatial_downsample,
        "temporal_downsample": temporal_downsample,
        "optimizer": optimizer,
        "device": str(device),
        "steps": steps,
        "modes": modes,
        "memory_budget": budget,
        "frame_size": frame_size or shape[3],
        "how": {
            "params": "Σ numel of the real modules' parameters; bytes = params × dtype width (int8: 1 byte, no scales)",
            "macs": "per clip, from each layer's recorded input size; decomposed layers: functional/cost.py "
            "form_cost of the form their mode runs (auto resolved per input); fused weight rebuild is a cached "
            "one-off, listed apart; Linear included",
            "inference": "peak of live tensor storages during a no-grad forward (TorchDispatchMode), "
            "parameters excluded, input clip included; weights cached by a warm-up forward excluded; by_form measured on the meta device",
            "training": "saved_tensors_hooks, each storage once (data_ptr); weights = parameters, buffers and "
            "tensors computed only from them; + params + grads + optimizer state of the trainable subset",
            "what_fits": "linear fit bytes = a + b·size of measured samples, answer verified by measuring it "
            "and one step above; on meta (exact sizes, no arithmetic) unless on CUDA",
        },
    }
    return MemoryReport(source, shape, layers, totals, inference, schedules, sweep, fits, settings, notes)


# --------------------------------------------------------------------------------------------
# Inputs: a converted folder or a checkpoint converted in memory
# --------------------------------------------------------------------------------------------


@dataclass
class ReportInput:
    """The two models to compare and what is known about them."""

    converted: nn.Module
    original: nn.Module
    source: str
    input_shape: tuple[int, ...] | None
    notes: list[str] = field(default_factory=list)


def load_report_input(
    source: str | os.PathLike[str] | None,
    *,
    config: ConvertConfig | None = None,
    arch: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
) -> ReportInput:
    """A converted folder (``load_converted``; original = ``densify``) or a checkpoint / ``--arch``
    converted in memory with ``config`` (original = the loaded model)."""
    from .convert import convert_model
    from .models import load_model
    from .saved_model import is_converted_dir, load_converted
    from .workflows import default_input_shape

    if source is not None:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"{path} does not exist", "pass a converted folder or a checkpoint file")
        if path.is_dir():
            if not is_converted_dir(path):
                raise ConfigError(
                    f"{path} is a folder but not a converted model (no model.stjfd.json)",
                    "pass a folder written by `stjfd convert`, or a checkpoint file",
                )
            loaded = load_converted(path, trust_pickle=trust_pickle)
            shape = loaded.manifest.get("input", {}).get("shape")
            return ReportInput(
                loaded.model, densify(loaded.model).eval(), str(path), tuple(shape) if shape else None,
                ["original = the converted layers rebuilt dense (DecomposedConv3d.to_conv3d)"],
            )
    loaded = load_model(
        source, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle, strict=strict
    )
    original = loaded.model.eval()
    converted, _ = convert_model(original, config or ConvertConfig())
    shape = default_input_shape(loaded.spec)
    return ReportInput(converted, original, str(source or loaded.spec.describe()), shape, list(loaded.notes))


# --------------------------------------------------------------------------------------------
# Files: Markdown and PNG
# --------------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / MIB:,.1f}"


def _g(n: int) -> str:
    return f"{n / 1e9:,.2f}"


def markdown(report: MemoryReport) -> str:
    """The report as Markdown tables."""
    t = report.totals
    shape = "×".join(map(str, report.input_shape))
    lines = [
        f"# stjfd memory report: {report.source}",
        "",
        f"Input {shape} (B×C×T×H×W); execution modes: {', '.join(report.settings['modes']) or 'n/a'}.",
        "",
        "## Model",
        "",
        "| | original | converted | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {t.params_original:,} | {t.params_converted:,} | {t.param_ratio:.3f} |",
    ]
    for dtype in DTYPE_BYTES:
        lines.append(f"| MiB at {dtype} | {_mib(t.bytes_original(dtype))} | {_mib(t.bytes_converted(dtype))} | {t.param_ratio:.3f} |")
    lines.append(f"| GMACs per clip | {_g(t.macs_original)} | {_g(t.macs_converted)} | {t.mac_ratio:.3f} |")
    inf = report.inference
    lines.append(
        f"| peak inference activations, MiB (batch {report.input_shape[0]}) | {_mib(inf.original.peak_bytes)} | "
        f"{_mib(inf.converted.peak_bytes)} | {inf.converted.peak_bytes / max(1, inf.original.peak_bytes):.3f} |"
    )
    lines += ["", "GMACs per clip and peak inference activations with every decomposed layer in one form:", "",
              "| form | GMACs | peak activations MiB |", "|---|---:|---:|"]
    for form in FORMS:
        lines.append(f"| {form} | {_g(t.macs_by_form[form])} | {_mib(inf.by_form[form])} |")
    lines += ["", "## Layers (per clip)", "",
              "| layer | kernel | atoms | mode (form) | params orig → conv | GMACs orig → conv | "
              + " / ".join(FORMS) + " GMACs |",
              "|---|---|---|---|---:|---:|---:|"]
    for row in report.layers:
        kernel = "×".join(map(str, row.kernel_size)) if row.kernel_size else "linear"
        atoms = f"{row.atoms[0]}×{row.atoms[1]}" if row.atoms else "—"
        forms = " / ".join(_g(row.macs_by_form[f]) for f in FORMS) if row.macs_by_form else "—"
        mode = f"{row.mode} ({row.form})" if row.mode and row.form and row.form != row.mode else (row.mode or "—")
        lines.append(
            f"| {row.name} | {kernel} | {atoms} | {mode} | {row.params_original:,} → {row.params_converted:,} | "
            f"{_g(row.macs_original)} → {_g(row.macs_converted)} | {forms} |"
        )
    if report.training:
        lines += ["", f"## Training memory (batch {report.input_shape[0]}, {report.settings['optimizer']}, "
                  f"s={report.settings['spatial_downsample']}, r={report.settings['temporal_downsample']}, "
                  f"{report.settings['device']}), MiB", "",
                  "| schedule | clip | saved activations | analytic | saved weights | params + grads + optimizer | total | step s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for entry in report.training:
            m = entry.memory
            analytic = "—"
            if entry.analytic_activation_bytes:
                analytic = f"{_mib(entry.analytic_activation_bytes)} ({entry.analytic_factor}, ×{entry.analytic_ratio:.3f})"
            step = f"{m.step_seconds_median:.3f}" if m.step_seconds_median is not None else "—"
            lines.append(
                f"| {entry.label} | {'×'.join(map(str, m.input_shape[2:]))} | {_mib(m.saved_activation_bytes)} | {analytic} | "
                f"{_mib(m.saved_weight_bytes)} | {_mib(m.param_bytes + m.grad_bytes + m.optimizer_bytes)} | "
                f"{_mib(m.total_bytes)} | {step} |"
            )
    if report.fits:
        f = report.fits
        lines += ["", f"## What fits in {_mib(f.budget_bytes)} MiB ({f.frame_size}² frames, measured on {f.device})", "",
                  f"| schedule | longest clip at batch {f.batch} | MiB at it / +1 frame | largest batch at {f.frames} frames | MiB at it / +1 |",
                  "|---|---:|---:|---:|---:|"]
        for a in f.answers:
            deciding = f" ({a.deciding_stage} stage decides)" if a.deciding_stage else ""
            lines.append(
                f"| {a.label}{deciding} | {a.clip.answer} | {_mib(a.clip.answer_bytes)} / {_mib(a.clip.above_bytes)} | "
                f"{a.batch.answer} | {_mib(a.batch.answer_bytes)} / {_mib(a.batch.above_bytes)} |"
            )
    if report.notes:
        lines += ["", *[f"- note: {n}" for n in report.notes]]
    lines += ["", "How each figure is obtained:", ""]
    lines += [f"- {k}: {v}" for k, v in report.settings["how"].items()]
    return "\n".join(lines) + "\n"


def write_markdown(report: MemoryReport, path: str | os.PathLike[str]) -> Path:
    with atomic_file(path) as staging:
        staging.write_text(markdown(report), encoding="utf-8")
    return Path(path)


def write_plot(report: MemoryReport, path: str | os.PathLike[str]) -> Path:
    """PNG: per-layer parameters (original vs converted) and training memory against clip length."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise OutputError("--plot needs matplotlib, which is not installed", "reinstall stjfd or pip install matplotlib") from None
    rows = [r for r in report.layers if r.kind != "linear" or r.params_original]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.5, 1]})
    positions = range(len(rows))
    width = 0.4
    left.bar([p - width / 2 for p in positions], [r.params_original for r in rows], width, label="original", color="#9e9e9e")
    left.bar([p + width / 2 for p in positions], [r.params_converted for r in rows], width, label="converted", color="#1f77b4")
    left.set_yscale("log")
    left.set_xticks(list(positions))
    left.set_xticklabels([r.name for r in rows], rotation=70, ha="right", fontsize=7)
    left.set_ylabel("parameters (log scale)")
    t = report.totals
    left.set_title(f"Parameters per layer: {t.params_original / 1e6:.2f} M → {t.params_converted / 1e6:.2f} M "
                   f"(×{t.param_ratio:.3f})")
    left.legend()
    left.grid(axis="y", alpha=0.3)
    styles = {
        "original_joint": ("original joint", "#9e9e9e", "-"),
        "joint": ("converted joint", "#1f77b4", "-"),
        "checkpointing": ("converted + checkpointing", "#1f77b4", "--"),
        "temporal": (f"temporal stage (frames /{report.settings['spatial_downsample']})", "#2ca02c", "-"),
        "spatial": (f"spatial stage (clip /{report.settings['temporal_downsample']})", "#d62728", "-"),
    }
    highest = 0.0
    for key, (label, color, style) in styles.items():
        points = [(p.frames, p.total_bytes[key] / MIB) for p in report.sweep if key in p.total_bytes]
        if points:
            right.plot(*zip(*points), style, marker="o", color=color, label=label)
            highest = max(highest, max(y for _, y in points))
    b, _, _, h, w = report.input_shape
    right.set_xlabel("clip length T (frames)")
    right.set_ylabel("training memory, MiB (saved tensors + params + grads + optimizer)")
    right.set_title(f"Training memory, batch {b}, {h}×{w} frames, {report.settings['optimizer']}")
    budget = report.fits.budget_bytes / MIB if report.fits is not None and report.fits.frame_size == h else None
    if budget is not None and budget <= 1.5 * highest:  # a far-away budget line would flatten the curves
        right.axhline(budget, color="black", linewidth=0.8, linestyle=":", label="memory budget")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as staging:
        fig.savefig(staging, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
