"""The report: ``memory_report`` gathers accounting, inference, training and what-fits into one
:class:`MemoryReport`; ``load_report_input`` finds the two models to compare."""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..config import ConvertConfig
from ..convert import densify
from ..errors import ConfigError
from ..inputs import (
    InputShape,
    check_clip_shapes,
    format_input_shape,
    input_shape_to_json,
    is_multi,
    normalize_input_shape,
    pathway_shapes,
    primary_shape,
    recorded_input,
)
from ..layers import FORMS, DecomposedConv3d
from ..memory import OPTIMIZERS, InferenceMemory, measure_inference_peak
from ..parity import check_input_memory
from .accounting import LayerMemory, ModelTotals, layer_table, parse_bytes
from .fits import SweepPoint, WhatFits, clip_sweep, what_fits
from .schedules import ScheduleMemory, measure_schedules


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
    input_shape: InputShape  # one clip's shape, or one per pathway
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
            "input_shape": input_shape_to_json(self.input_shape),
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


def _check_shape(shape: InputShape | Sequence[int]) -> InputShape:
    shape = normalize_input_shape(shape)
    check_clip_shapes(shape)
    if any(v <= 0 for one in pathway_shapes(shape) for v in one):
        raise ConfigError(
            f"--input-shape {format_input_shape(shape, ',')} is not B,C,T,H,W with positive sizes",
            "e.g. --input-shape 1,3,16,112,112",
        )
    return shape


#: How each figure of the report is obtained (``settings["how"]``, the Markdown's last section).
HOW_MEASURED: dict[str, str] = {
    "params": "Σ numel of the real modules' parameters; bytes = params × dtype width (int8: 1 byte, no scales)",
    "macs": "per clip, from each layer's recorded input size; decomposed layers: functional/cost.py "
    "form_cost of the form their mode runs (auto resolved per input); fused weight rebuild is a cached "
    "one-off, listed apart; Linear included",
    "inference": "peak of live tensor storages during a no-grad forward (TorchDispatchMode), "
    "parameters excluded, input clip included; weights cached by a warm-up forward excluded; by_form measured on the meta device",
    "training": "saved_tensors_hooks, each storage once (data_ptr); weights = parameters, buffers and "
    "tensors computed only from them; + params + grads + optimizer state of the trainable subset; "
    "live peak: the most bytes alive at once over a whole steady-state step (forward, backward, optimizer), "
    "transients and recomputed activations included (TorchDispatchMode over every op)",
    "what_fits": "linear fit of the live peak (CUDA: max_memory_allocated) = a + b·size of measured samples, "
    "answer verified by measuring it and one step above; on meta (exact sizes, no arithmetic) unless on CUDA",
}


def _check_options(
    input_shape: InputShape | Sequence[int],
    spatial_downsample: int,
    temporal_downsample: int,
    steps: int,
    optimizer: str,
    memory_budget: int | str | None,
    frame_size: int | None,
) -> tuple[InputShape, int | None]:
    """The clip shape and the budget in bytes, once every option of ``memory_report`` is valid."""
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
    return shape, budget


def _compare_inference(
    model: nn.Module, original: nn.Module, shape: InputShape, device: str, container: str = "list"
) -> InferenceComparison:
    """Peak inference activations of both models (on CUDA when ``device`` is, else CPU) and of
    ``model`` with every decomposed layer in each form (on ``meta``)."""
    inference_device = "cuda" if str(device).startswith("cuda") else "cpu"
    return InferenceComparison(
        original=measure_inference_peak(original, shape, device=inference_device, container=container),
        converted=measure_inference_peak(model, shape, device=inference_device, container=container),
        by_form={
            form: measure_inference_peak(_with_mode(model, form), shape, device="meta", container=container).peak_bytes
            for form in FORMS
        },
    )


def memory_report(
    model: nn.Module,
    input_shape: InputShape | Sequence[int],
    *,
    container: str = "list",
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
    layout: str = "BCTHW",
    input_dtype: str = "float32",
) -> MemoryReport:
    """Compare converted ``model`` with ``original`` (default: ``densify(model)``) on [B,C,T,H,W] clips
    (or one per pathway, fed as a ``container``; sizes below follow the primary pathway).

    ``device`` runs the training measurements (``cuda`` adds ``max_memory_allocated``); the
    what-fits searches and the clip sweep run on ``meta`` unless ``device`` is ``cuda``. A model that
    takes another ``layout`` (``BTHWC``, ``BTCHW``; ``input_shape`` is then in that layout) or ``uint8``
    frames is measured through :class:`~stjfd_convert.layouts.ClipLayoutHook`: the report works on
    B×C×T×H×W clips, so the stages shrink H, W (temporal) and T (spatial) wherever the model keeps them.
    """
    from ..layouts import attach_layout_hook, check_input_dtype, check_input_layout, to_bcthw

    layout, input_dtype = check_input_layout(layout), check_input_dtype(input_dtype)
    given = normalize_input_shape(input_shape)
    shape, budget = _check_options(
        to_bcthw(given, layout), spatial_downsample, temporal_downsample, steps, optimizer, memory_budget, frame_size
    )
    if not str(device).startswith("cuda"):
        check_input_memory(shape)  # the CPU measurements allocate the clip: a huge one is refused first
    notes: list[str] = []
    original = original if original is not None else densify(model)
    if (layout, input_dtype) != ("BCTHW", "float32"):
        notes.append(
            f"the model takes {layout} {input_dtype} clips ({format_input_shape(given)}); the report's shapes are "
            "B×C×T×H×W, permuted into the model's layout as it is called"
        )
    nets = {id(model): model, id(original): original}.values()  # once each, should they be one module
    handles = [attach_layout_hook(net, layout, input_dtype) for net in nets]
    try:
        return _measure(
            model, original, shape, budget, notes, container=container, source=source,
            spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample, optimizer=optimizer,
            device=device, steps=steps, training=training, frame_size=frame_size, sweep_frames=sweep_frames,
            loss_fn=loss_fn, progress=progress, layout=layout, input_dtype=input_dtype,
        )
    finally:
        for handle in handles:
            if handle is not None:
                handle.remove()


def _measure(
    model: nn.Module,
    original: nn.Module,
    shape: InputShape,
    budget: int | None,
    notes: list[str],
    *,
    container: str,
    source: str,
    spatial_downsample: int,
    temporal_downsample: int,
    optimizer: str,
    device: str,
    steps: int,
    training: bool,
    frame_size: int | None,
    sweep_frames: Sequence[int] | None,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    progress: Callable[[str], None] | None,
    layout: str,
    input_dtype: str,
) -> MemoryReport:
    """The measurements of :func:`memory_report`, once its options are checked (``shape`` is B×C×T×H×W)."""
    models = {"original": original, "converted": model}
    if not any(isinstance(m, DecomposedConv3d) for m in model.modules()):
        notes.append("the model has no DecomposedConv3d: converted = original, every stage trains everything")

    def step(text: str) -> None:
        if progress is not None:
            progress(text)

    step("layers")
    layers, totals = layer_table(model, original, shape, container)
    step("inference")
    inference = _compare_inference(model, original, shape, device, container)
    schedules: list[ScheduleMemory] = []
    if training:
        schedules = measure_schedules(
            models, shape, spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample,
            optimizer=optimizer, device=device, steps=steps, loss_fn=loss_fn, progress=lambda t: step(f"training: {t}"),
            container=container,
        )
    for entry in schedules:
        if entry.memory.adapted_pools:
            notes.append(
                f"{entry.label}: {', '.join(entry.memory.adapted_pools)} pooled over the whole downsampled input "
                "(its fixed kernel is larger than the stage's clip); evaluation and export keep the original kernel"
            )
    search_device = "cuda" if str(device).startswith("cuda") else "meta"
    primary = primary_shape(shape)
    frames_list = list(sweep_frames) if sweep_frames is not None else sorted({4, 8, 16, 32, primary[2]})
    step("clip sweep")
    sweep = clip_sweep(
        models, shape, frames_list, spatial_downsample=spatial_downsample,
        temporal_downsample=temporal_downsample, optimizer=optimizer, device=search_device, container=container,
    )
    fits = None
    if budget is not None:
        fits = what_fits(
            models, budget, frame_size or primary[3], batch=primary[0], frames=primary[2], channels=primary[1],
            spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample, optimizer=optimizer,
            device=search_device, loss_fn=loss_fn, progress=lambda t: step(f"what fits: {t}"),
            template=shape if is_multi(shape) else None, container=container,
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
        "frame_size": frame_size or primary[3],
        "container": container if is_multi(shape) else None,
        "input_layout": layout,
        "input_dtype": input_dtype,
        "how": dict(HOW_MEASURED),
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
    input_shape: InputShape | None
    notes: list[str] = field(default_factory=list)
    container: str = "list"
    layout: str | None = None  # what a converted folder's manifest records (None: nothing recorded)
    dtype: str | None = None


def load_report_input(
    source: str | os.PathLike[str] | None,
    *,
    config: ConvertConfig | None = None,
    arch: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    trust_code: bool = False,
) -> ReportInput:
    """A converted folder (``load_converted``; original = ``densify``) or a checkpoint / ``--arch``
    converted in memory with ``config`` (original = the loaded model)."""
    from ..convert import convert_model
    from ..models import default_input_shape, load_model
    from ..saved_model import is_converted_dir, load_converted

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
            loaded = load_converted(path, trust_pickle=trust_pickle, trust_code=trust_code, model=model)
            from ..layouts import recorded_dtype, recorded_layout

            shape, _, container, _ = recorded_input(loaded.manifest)
            return ReportInput(
                loaded.model, densify(loaded.model).eval(), str(path), shape,
                ["original = the converted layers rebuilt dense (DecomposedConv3d.to_conv3d)"], container,
                recorded_layout(loaded.manifest), recorded_dtype(loaded.manifest),
            )
    loaded = load_model(
        source, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle, strict=strict
    )
    original = loaded.model.eval()
    converted, _ = convert_model(original, config or ConvertConfig())
    shape = default_input_shape(loaded.spec)
    return ReportInput(converted, original, str(source or loaded.spec.describe()), shape, list(loaded.notes))


