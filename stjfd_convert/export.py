"""ONNX export of converted (and plain) models, verified with onnx.checker and onnxruntime.

Exporter
--------
torch 2.14's ``torch.onnx.export`` defaults to the dynamo (``torch.export``-based) exporter, which
needs the ``onnxscript`` package; it is not a dependency of stjfd (nor installed with the ``onnx``
extra) and the TorchScript exporter already gives the graph we want for these models: one ONNX
``Conv`` per conv, ``BatchNormalization`` folded into the preceding ``Conv`` in eval mode, plain
``dynamic_axes`` for the batch/time/height/width axes, and initializers stored exactly as the module
holds them. So this module calls ``torch.onnx.export(..., dynamo=False)`` (its deprecation warning is
silenced here) and supports opsets :data:`MIN_OPSET` to the TorchScript exporter's maximum (20).
``onnx`` and ``onnxruntime`` are imported lazily (``pip install 'stjfd[onnx]'``), so convert and
finetune work without them.

What is stored
--------------
``DecomposedConv3d.forward`` builds its depthwise weights with ``expand`` over the input's channel
count; traced, that count is dynamic and the exporter refuses a kernel of unknown shape, and torch's
constant folding would store every expanded weight as a constant C times the size of the atoms.
Before tracing, every decomposed layer is therefore replaced by an export module for its concrete
form (:func:`export_module`) whose parameters are exactly what the form stores: ``factorized`` holds
Ψ, Φ and A (atoms + coefficients only), ``fused`` is an ``nn.Conv3d`` with the reconstructed weight
(the same graph as a dense model), ``spatial_first`` / ``temporal_first`` hold one atom set plus the
folded A·Ψ / A·Φ weight (so an ``auto`` export can be larger than ``factorized``). The atom convs
are traced as ordinary grouped (depthwise) Convs over C copies of the atoms, which keeps every
kernel shape static and the graph clean (``do_constant_folding=True``: BatchNorm fused into the
preceding Conv, no shape arithmetic); a post-pass (:func:`_share_tiled_weights`) then finds every
grouped Conv weight made of identical blocks and stores the block once, as ``Reshape(Expand(block))``
with constant shapes, which onnxruntime folds back when it loads the graph. So the file holds the
atoms once while onnxruntime still runs grouped convs, which its CPU kernels do faster (measured
16 vs 26 ms at c64 T16 56²) than folding the channels into the batch axis would.

Modes: ``fused``, ``factorized`` (and the other forms of ``layers.FORMS``) set every layer's form;
``auto`` uses an execution plan stored in the converted folder's manifest for the export input
shape (one measured in onnxruntime first, then CPU plans, measured preferred), else plans the layers
hold for that input, else the planner's cost model (``plan_model(measure=False)`` +
``apply_plan(..., mode="fixed")``); see :func:`resolve_forms`. The cost model describes PyTorch
eager on CPU, whose relative costs differ from onnxruntime's (its depthwise 3-D convs run as
im2col + GEMM per group), so ``auto`` with ``measure=True`` (``stjfd export --mode auto --measure``)
plans in onnxruntime itself (:func:`plan_onnxruntime`: every form of every layer exported alone and
timed in a CPU session with the export's thread count) and stores that plan in the converted
folder's manifest (device ``"onnxruntime"``) for later ``auto`` exports.

``fp16`` stores every float initializer in half precision followed by a ``Cast`` to float: inputs,
outputs and arithmetic stay float32 (onnxruntime's CPU provider has few float16 kernels and would
insert casts around each op anyway), the file halves, and validation uses the looser
:data:`FP16_ATOL` against the float32 PyTorch model.

Validation runs PyTorch and onnxruntime on several seeded clips (a different batch size / clip
length / frame size for each dynamic axis), compares every output, collects every mismatch and
reports them all with the tolerance used. A failed validation raises :class:`ExportValidationError`
(exit code 1) carrying the full result; the file is written to a temporary sibling first and only
moved into place when it passed (or with ``keep_invalid``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from .atomic import check_output, make_staging_dir
from .errors import ConfigError, StjfdError, VerificationError
from .functional.conv import ConvGeometry, pad_amounts, pad_mode, spatial_first_weight, temporal_first_weight
from .convert import densify, replace_modules
from .layers import FORMS, MODES, DecomposedConv3d
from .models import TORCHVISION_VIDEO_ARCHS, ArchSpec, load_model, model_source_paths
from .parity import flatten_outputs, make_input, run_model
from .saved_model import is_converted_dir, load_converted

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "DYNAMIC_AXES",
    "EXPORT_MODES",
    "FP16_ATOL",
    "MIN_OPSET",
    "ORT_DEVICE",
    "ExportError",
    "ExportResult",
    "ExportValidationError",
    "GraphStats",
    "MissingDependencyError",
    "OutputCheck",
    "Prediction",
    "ValidationReport",
    "densify",
    "export_module",
    "export_onnx",
    "max_opset",
    "ort_latency",
    "ort_session",
    "plan_onnxruntime",
    "predict",
    "validate_onnx",
]

EXPORTER = "torchscript"
MIN_OPSET = 11  # Conv/Pad/Resize semantics we rely on; older opsets are not worth supporting
DEFAULT_OPSET = 17
EXPORT_MODES = MODES  # fused, factorized, sandwich, spatial_first, temporal_first, auto
#: Input axis of each name accepted by ``dynamic_axes`` (input layout [B, C, T, H, W]).
DYNAMIC_AXES = {"batch": 0, "time": 2, "height": 3, "width": 4}
#: Element-wise absolute tolerance, ORT vs PyTorch, float32 weights.
DEFAULT_ATOL = 1e-4
#: Element-wise absolute tolerance with ``fp16`` weights (half-precision rounding of every weight).
FP16_ATOL = 1e-2
DEFAULT_CLIPS = 3
DEFAULT_RUNS = 10
DEFAULT_WARMUP = 3
#: Protobuf's hard limit; above it (less a margin for the graph itself) weights go to an external file.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_MARGIN = 64 * 2**20
INPUT_NAME = "clip"
#: The ``device`` of execution plans measured in onnxruntime (CPU provider), as stored in manifests.
ORT_DEVICE = "onnxruntime"
#: Timed runs per form and layer in :func:`plan_onnxruntime` (fastest of them counts).
DEFAULT_PLAN_REPEATS = 6
#: Back-to-back timed runs of one form per round: the first may share the CPU with the previous
#: form's session, whose intra-op threads still spin for a while after its run.
PLAN_BLOCK = 2
#: After this many interleaved rounds, a form slower than PRUNE_FACTOR × fused stops being timed.
PRUNE_AFTER = 3
PRUNE_FACTOR = 2.0
LAYOUT = "NCTHW"
META_PREFIX = "stjfd."

_ONNX_HINT = "pip install 'stjfd[onnx]' (onnx and onnxruntime)"


class MissingDependencyError(StjfdError):
    """An optional package that this command needs is not installed."""


class ExportError(StjfdError):
    """torch.onnx could not export the model, or onnx.checker rejected the graph."""


class ExportValidationError(VerificationError):
    """onnxruntime's outputs differ from PyTorch's beyond the tolerance (exit code 1)."""

    def __init__(self, message: str, hint: str | None, result: "ExportResult") -> None:
        super().__init__(message, hint)
        self.result = result


# --------------------------------------------------------------------------------------------
# Optional imports
# --------------------------------------------------------------------------------------------


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("ONNX export needs the onnx package, which is not installed", _ONNX_HINT) from None
    return onnx


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            "validating and timing ONNX models needs onnxruntime, which is not installed",
            f"{_ONNX_HINT}, or pass --no-validate --runs 0",
        ) from None
    return onnxruntime


def max_opset() -> int:
    """Highest opset the TorchScript exporter of the installed torch writes."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:  # pragma: no cover - older/newer torch layouts
        return 17


def check_opset(opset: int) -> int:
    top = max_opset()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ConfigError(
            f"--opset {opset} is not supported by the installed exporter (torch {torch.__version__})",
            f"use an opset from {MIN_OPSET} to {top} (default {DEFAULT_OPSET})",
        )
    return opset


def parse_dynamic_axes(axes: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"batch,time"`` → ("batch", "time"), validated against :data:`DYNAMIC_AXES`."""
    if axes is None:
        return ()
    items = axes.split(",") if isinstance(axes, str) else list(axes)
    names = []
    for item in items:
        name = item.strip().lower()
        if not name:
            continue
        if name not in DYNAMIC_AXES:
            raise ConfigError(f"unknown dynamic axis {item!r}", f"use any of {', '.join(DYNAMIC_AXES)}, e.g. --dynamic batch,time")
        if name not in names:
            names.append(name)
    return tuple(sorted(names, key=DYNAMIC_AXES.__getitem__))


# --------------------------------------------------------------------------------------------
# Model surgery
# --------------------------------------------------------------------------------------------


class _AxisConv(nn.Module):
    """Shared-weight (depthwise) atom conv along the temporal or the spatial axes.

    Input [B, C, T, H, W] → [B, C·m, T', H', W'] with channel c·m + j, the layout of
    ``functional.conv``. Traced as a plain grouped Conv over C copies of the atoms (a static kernel
    shape, whatever the dynamic axes); ``_share_tiled_weights`` then stores the atoms once.
    """

    def __init__(self, atoms_weight: Tensor, channels: int, geometry: ConvGeometry, temporal: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(atoms_weight.detach().repeat(channels, 1, 1, 1, 1), requires_grad=False)
        axes = (0,) if temporal else (1, 2)
        self.explicit, self.conv_pad, self.need_pad = pad_amounts(geometry, axes)
        self.mode = pad_mode(geometry)
        if temporal:
            self.stride, self.dilation = (geometry.stride[0], 1, 1), (geometry.dilation[0], 1, 1)
        else:
            self.stride, self.dilation = (1, *geometry.stride[1:]), (1, *geometry.dilation[1:])
        self.channels = int(channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.need_pad:
            x = F.pad(x, self.explicit, mode=self.mode)
        return F.conv3d(x, self.weight, None, self.stride, self.conv_pad, self.dilation, self.channels)


class _DenseConv(nn.Module):
    """A plain conv with stored weight, the given stride/dilation and the padding of ``axes``."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry, axes: Sequence[int], groups: int
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.explicit, self.conv_pad, self.need_pad = pad_amounts(geometry, axes)
        self.mode = pad_mode(geometry)
        self.stride = tuple(geometry.stride[a] if a in axes else 1 for a in range(3))
        self.dilation = tuple(geometry.dilation[a] if a in axes else 1 for a in range(3))
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        if self.need_pad:
            x = F.pad(x, self.explicit, mode=self.mode)
        return F.conv3d(x, self.weight, self.bias, self.stride, self.conv_pad, self.dilation, self.groups)


class _GroupSpatialConv(nn.Module):
    """Sandwich's last step: a grouped (groups = O) spatial conv whose every group applies Φ.

    Traced over O copies of Φ; ``_share_tiled_weights`` stores Φ once (unless an eval-mode
    BatchNorm after it was fused into the conv, which scales each group differently).
    """

    def __init__(self, spatial_atoms: Tensor, bias: Tensor | None, geometry: ConvGeometry) -> None:
        super().__init__()
        m_s = spatial_atoms.shape[1]
        kh, kw = geometry.kernel_size[1:]
        block = spatial_atoms.detach().t().reshape(1, m_s, 1, kh, kw)
        self.weight = nn.Parameter(block.repeat(geometry.out_channels, 1, 1, 1, 1), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.explicit, self.conv_pad, self.need_pad = pad_amounts(geometry, (1, 2))
        self.mode = pad_mode(geometry)
        self.stride, self.dilation = (1, *geometry.stride[1:]), (1, *geometry.dilation[1:])
        self.out_channels = geometry.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.need_pad:
            x = F.pad(x, self.explicit, mode=self.mode)
        return F.conv3d(x, self.weight, self.bias, self.stride, self.conv_pad, self.dilation, self.out_channels)


def _skips_temporal(layer: DecomposedConv3d) -> bool:
    # Same rule as functional.conv: a 1-tap, unstrided, unpadded temporal atom is a scalar folded into A.
    g = layer.geometry
    return layer.temporal_atoms.shape == (1, 1) and g.stride[0] == 1 and g.pads[0] == (0, 0)


def _skips_spatial(layer: DecomposedConv3d) -> bool:
    g = layer.geometry
    return layer.spatial_atoms.shape == (1, 1) and g.stride[1:] == (1, 1) and g.pads[1:] == ((0, 0), (0, 0))


def export_module(layer: DecomposedConv3d, form: str) -> nn.Module:
    """An export-friendly module computing ``layer`` in ``form``, holding only what that form stores."""
    if form not in FORMS:
        raise ConfigError(f"unknown execution form {form!r}", f"use one of {', '.join(FORMS)}")
    if form == "fused":
        return layer.to_conv3d().eval()
    g = layer.geometry
    with torch.no_grad():
        coefficients = layer.coefficients.detach()
        temporal, spatial = layer.temporal_atoms.detach(), layer.spatial_atoms.detach()
        out_c, in_c, m_t, m_s = coefficients.shape
        length, kh, kw = g.kernel_size
        bias = None if layer.bias is None else layer.bias.detach()
        steps: list[nn.Module] = []
        skip_t, skip_s = _skips_temporal(layer), _skips_spatial(layer)
        temporal_conv = (
            None if skip_t else _AxisConv(temporal.t().reshape(m_t, 1, length, 1, 1), g.in_channels, g, temporal=True)
        )
        # Factorized runs Φ after Ψ (C·m_t channels); spatial_first runs it on the input (C channels).
        spatial_channels = g.in_channels * (m_t if form == "factorized" and not skip_t else 1)
        spatial_conv = (
            None if skip_s else _AxisConv(spatial.t().reshape(m_s, 1, 1, kh, kw), spatial_channels, g, temporal=False)
        )
        if skip_t:
            coefficients = coefficients * temporal[0, 0]
        if form == "factorized":
            if skip_s:
                coefficients = coefficients * spatial[0, 0]
            steps += [m for m in (temporal_conv, spatial_conv) if m is not None]
            weight = coefficients.reshape(out_c, in_c * m_t * m_s, 1, 1, 1)
            steps.append(_DenseConv(weight, bias, g, (), g.groups))
        elif form == "sandwich":
            if skip_s:
                coefficients = coefficients * spatial[0, 0]
            if temporal_conv is not None:
                steps.append(temporal_conv)
            weight = coefficients.permute(0, 3, 1, 2).reshape(out_c * m_s, in_c * m_t, 1, 1, 1)
            steps.append(_DenseConv(weight, None if not skip_s else bias, g, (), g.groups))
            if not skip_s:
                steps.append(_GroupSpatialConv(spatial, bias, g))
        elif form == "spatial_first":
            mixed = spatial_first_weight(coefficients, temporal if not skip_t else torch.ones_like(temporal))
            if skip_s:
                mixed = mixed * spatial[0, 0]
            elif spatial_conv is not None:
                steps.append(spatial_conv)
            steps.append(_DenseConv(mixed, bias, g, (0,), g.groups))
        else:  # temporal_first
            mixed = temporal_first_weight(coefficients, spatial, g.kernel_size)
            if temporal_conv is not None:
                steps.append(temporal_conv)
            steps.append(_DenseConv(mixed, bias, g, (1, 2), g.groups))
    return nn.Sequential(*steps).eval()


def _export_friendly(model: nn.Module, forms: Mapping[str, str]) -> nn.Module:
    """A copy of ``model`` with each DecomposedConv3d replaced by ``export_module(layer, forms[name])``."""
    work = copy.deepcopy(model)
    return replace_modules(
        work, lambda name, m: export_module(m, forms.get(name, "fused")) if isinstance(m, DecomposedConv3d) else None
    )


def _decomposed_layers(model: nn.Module) -> dict[str, DecomposedConv3d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DecomposedConv3d)}


def _stored_plan(manifest: Mapping[str, Any] | None, input_shape: Sequence[int]) -> dict[str, Any] | None:
    """The manifest's float32 plan for this input shape: one measured in onnxruntime (the runtime
    the export is for) first, then CPU plans, measured ones before cost-model ones."""
    if not manifest:
        return None
    candidates = [
        p
        for p in manifest.get("plans") or []
        if isinstance(p, dict)
        and list(p.get("input_shape") or []) == list(input_shape)
        and p.get("device", "cpu") in (ORT_DEVICE, "cpu")
        and p.get("dtype", "float32") == "float32"
        and isinstance(p.get("forms"), dict)
    ]
    candidates.sort(key=lambda p: (p.get("device", "cpu") != ORT_DEVICE, not p.get("measured", False)))
    return candidates[0] if candidates else None


def resolve_forms(
    model: nn.Module, mode: str, input_shape: Sequence[int], manifest: Mapping[str, Any] | None = None
) -> tuple[dict[str, str], str]:
    """Set (in place) each DecomposedConv3d of ``model`` to a concrete form; returns the forms and their source.

    ``auto``, first match wins: a plan stored in the manifest for ``input_shape`` in float32 (one
    measured in onnxruntime by :func:`plan_onnxruntime` first, then CPU plans, measured preferred);
    plans the layers hold for the shapes they see (``apply_plan(..., mode="auto")``, onnxruntime keys
    before CPU ones); the planner's cost model (``plan_model(measure=False)`` applied with
    ``apply_plan(..., mode="fixed")``).
    """
    if mode not in EXPORT_MODES:
        raise ConfigError(f"unknown --mode {mode!r}", f"use one of {', '.join(EXPORT_MODES)}")
    layers = _decomposed_layers(model)
    if not layers:
        return {}, "no decomposed layers"
    if mode != "auto":
        for layer in layers.values():
            layer.mode = mode
        return {name: mode for name in layers}, f"--mode {mode}"
    stored = _stored_plan(manifest, input_shape)
    if stored is not None:
        forms = {name: stored["forms"].get(name, "fused") for name in layers}
        unknown = sorted({f for f in forms.values() if f not in FORMS})
        if unknown:
            raise ConfigError(f"the stored execution plan names unknown forms {unknown}", "re-run `stjfd plan`")
        for name, layer in layers.items():
            layer.mode = forms[name]
        if stored.get("device") == ORT_DEVICE:
            kind = "onnxruntime-measured"
        else:
            kind = "measured" if stored.get("measured") else "cost-model"
        return forms, f"stored {kind} plan for {'×'.join(map(str, input_shape))}"
    from .planner import apply_plan, layer_plan_key, plan_model, trace_layer_inputs

    # Plans held by the layers themselves (apply_plan(..., mode="auto") in memory), if they cover this input.
    shapes = trace_layer_inputs(model, input_shape)
    held = {
        name: layer.plan.get(layer_plan_key(shapes[name], ORT_DEVICE, torch.float32))
        or layer.plan.get(layer_plan_key(shapes[name], "cpu", torch.float32))
        for name, layer in layers.items()
        if name in shapes
    }
    if held and all(form in FORMS for form in held.values()):
        for name, form in held.items():
            layers[name].mode = form  # type: ignore[assignment]
        return _concrete_forms(layers), "the layers' own execution plan"

    plan = plan_model(model, input_shape, measure=False)
    apply_plan(model, plan, mode="fixed")
    return _concrete_forms(layers), "cost model (no stored plan for this shape)"


def _concrete_forms(layers: Mapping[str, DecomposedConv3d]) -> dict[str, str]:
    """Each layer's form; a layer the input never reaches (still ``auto``) is exported fused."""
    for layer in layers.values():
        if layer.mode not in FORMS:
            layer.mode = "fused"
    return {name: layer.mode for name, layer in layers.items()}


# --------------------------------------------------------------------------------------------
# Execution plan measured in onnxruntime
# --------------------------------------------------------------------------------------------


def _layer_graph(module: nn.Module, shape: Sequence[int], opset: int) -> bytes:
    """One export module traced to a serialized ONNX model (in memory), post-processed as in export."""
    onnx = _import_onnx()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (make_input(shape, torch.float32, seed=0),), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=["output"], do_constant_folding=True, export_params=True,
            )
    except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.onnx could not export a layer at opset {opset}: {first[:300]}", "try another --opset") from None
    proto = onnx.load_from_string(buffer.getvalue())
    _share_tiled_weights(proto)
    return proto.SerializeToString()


def _time_sessions(
    sessions: Mapping[str, Any], feed_shape: Sequence[int], repeats: int, warmup: int
) -> dict[str, float]:
    """Fastest run of every session over ``repeats`` interleaved rounds, after ``warmup`` runs each.

    Each round runs every form :data:`PLAN_BLOCK` times back to back (onnxruntime's intra-op
    threads spin for a while after a run, so a session's first run after another session's shares
    the CPU with that session's threads; the next run does not). The minimum counts, as in
    ``planner._time_forms``: interference on a shared CPU only ever adds time, and interleaving
    exposes every form to the same conditions. After :data:`PRUNE_AFTER` rounds a form whose fastest
    run is over :data:`PRUNE_FACTOR` × fused's stops being timed: to be chosen it would have to get
    more than twice as fast relative to fused in the remaining runs, while both saw the same load
    (the early high-resolution layers, where atoms-first / sandwich are several times slower than
    fused, are otherwise most of the planning time).
    """
    feeds = {form: _latency_feed(session, feed_shape) for form, session in sessions.items()}
    for form, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[form])
    best = {form: math.inf for form in sessions}
    active = list(sessions)
    for round_index in range(repeats):
        for form in active:
            for _ in range(PLAN_BLOCK):
                best[form] = min(best[form], _timed_run(sessions[form], feeds[form]))
        if round_index + 1 == PRUNE_AFTER and "fused" in best:
            active = [f for f in active if f == "fused" or best[f] <= PRUNE_FACTOR * best["fused"]]
    return best


#: Times the onnxruntime sessions of every form of one layer:
#: ``timer(sessions, feed_shape, repeats, warmup) -> {form: seconds}``. ``sessions`` maps each form
#: to a CPU session on that form of the layer alone; ``feed_shape`` is the input shape the layer sees.
SessionTimer = Callable[[Mapping[str, Any], Sequence[int], int, int], dict[str, float]]


def plan_onnxruntime(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    forms: Sequence[str] = FORMS,
    repeats: int = DEFAULT_PLAN_REPEATS,
    warmup: int = 1,
    threads: int | None = None,
    opset: int = DEFAULT_OPSET,
    progress: Callable[[int, int, str], None] | None = None,
    timer: SessionTimer = _time_sessions,
) -> Any:
    """An :class:`~stjfd_convert.planner.ExecutionPlan` measured in onnxruntime (device :data:`ORT_DEVICE`).

    For every DecomposedConv3d and the input shape it sees for a model input of ``input_shape``
    (``planner.trace_layer_inputs``), each form of that one layer is exported (:func:`export_module`,
    the module a full export would use) to an in-memory ONNX model and loaded into a CPU session
    with the options :func:`ort_session` uses for latency (``threads``). ``timer`` times the forms
    (the default, :func:`_time_sessions`: round-robin, fastest run of ``repeats`` rounds after
    ``warmup``, on the wall clock; tests pass fixed times), and a non-fused form replaces fused only
    when it is faster by ``planner.MEASURE_MARGIN`` (``planner.choose_measured_form``, as in
    ``plan_model(measure=True)``). ``measured`` holds seconds per form (a pruned form: its fastest
    before it was dropped); ``predicted`` is the PyTorch-CPU cost model's, for comparison.
    ``progress(i, n, layer_name)`` is called after each layer. ``model`` is not modified.
    """
    from .functional.cost import form_cost, predict_seconds
    from .planner import ExecutionPlan, LayerChoice, choose_measured_form, trace_layer_inputs

    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ConfigError(f"unknown execution forms {unknown}", f"use {', '.join(FORMS)}")
    if repeats < 1 or warmup < 0:
        raise ConfigError("planning needs repeats ≥ 1 and warmup ≥ 0", "e.g. repeats=6")
    check_opset(opset)
    _import_onnx()
    _import_ort()
    forms = tuple(dict.fromkeys(("fused", *forms)))
    shapes = trace_layer_inputs(model, input_shape)
    layers = _decomposed_layers(model)
    choices = []
    for index, (name, shape) in enumerate(shapes.items(), start=1):
        layer = layers[name]
        batch, _, t, h, w = shape
        args = (layer.geometry, layer.num_temporal_atoms, layer.num_spatial_atoms, batch, t, h, w)
        sessions = {form: ort_session(_layer_graph(export_module(layer, form), shape, opset), threads) for form in forms}
        measured = dict(timer(sessions, shape, repeats, warmup))
        del sessions
        form = choose_measured_form(measured)
        choices.append(
            LayerChoice(
                name,
                tuple(shape),
                form,
                {f: predict_seconds(f, *args, "cpu") for f in forms},
                measured,
                {f: form_cost(f, *args).macs for f in forms},
                layer.geometry.to_dict(),
                (layer.num_temporal_atoms, layer.num_spatial_atoms),
            )
        )
        if progress is not None:
            progress(index, len(shapes), name)
    return ExecutionPlan(tuple(int(s) for s in input_shape), ORT_DEVICE, "float32", True, choices)


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class OutputCheck:
    """One output of one validation clip: ORT vs PyTorch."""

    clip: int
    input_shape: tuple[int, ...]
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_diff: float  # ‖ort − torch‖ / ‖torch‖
    ok: bool
    problem: str | None = None  # shape/dtype/non-finite mismatch, else None


@dataclass
class ValidationReport:
    """Every output of every clip, the tolerance used and the verdict."""

    atol: float
    checks: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def mismatches(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def rel_diff(self) -> float:
        return max((c.rel_diff for c in self.checks), default=0.0)

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        seen: dict[int, tuple[int, ...]] = {}
        for c in self.checks:
            seen.setdefault(c.clip, c.input_shape)
        return list(seen.values())

    def summary(self) -> str:
        """One line: verdict, clips, tolerance, worst differences and every mismatch."""
        head = (
            f"{'PASS' if self.passed else 'FAIL'}: {len(self.input_shapes)} clips, atol {self.atol:.1e}, "
            f"max abs diff {self.max_abs:.3e}, max relative diff {self.rel_diff:.3e}"
        )
        if self.passed:
            return head
        listed = "; ".join(
            f"clip {c.clip} ({'×'.join(map(str, c.input_shape))}) {c.name}: "
            + (c.problem or f"max abs {c.max_abs:.3e} > {self.atol:.1e}")
            for c in self.mismatches
        )
        return f"{head}; {len(self.mismatches)} of {len(self.checks)} outputs mismatch: {listed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "max_abs": self.max_abs,
            "rel_diff": self.rel_diff,
            "input_shapes": [list(s) for s in self.input_shapes],
            "checks": [asdict(c) for c in self.checks],
            "mismatches": len(self.mismatches),
        }


@dataclass
class GraphStats:
    """Size, stored parameters and onnxruntime latency of one ONNX file."""

    file_bytes: int
    files: list[str]
    parameters: int  # elements of all initializers (weights as stored in the file)
    latency_ms: float | None = None  # median of ``runs`` timed runs after warm-up
    latency_runs: int = 0
    latency_all_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and checked."""

    path: Path | None  # None when a failed file was removed
    source: str
    mode: str
    forms: dict[str, str]
    plan_source: str
    exporter: str
    opset: int
    input_shape: tuple[int, ...]
    dynamic_axes: tuple[str, ...]
    fp16: bool
    external_data: bool
    checker_passed: bool
    stats: GraphStats
    validation: ValidationReport | None
    latency_shape: tuple[int, ...]
    threads: int | None
    original: GraphStats | None = None  # the dense model's export, with compare=True
    normalization: dict[str, list[float]] | None = None
    architecture: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    kept_invalid: bool = False
    plan: Any = None  # the ExecutionPlan measured in onnxruntime (``measure=True``), else None
    plan_seconds: float = 0.0
    plan_saved: Path | None = None  # the manifest it was stored in (a converted folder as input)

    @property
    def form_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for form in self.forms.values():
            counts[form] = counts.get(form, 0) + 1
        return counts

    def ratios(self) -> dict[str, float | None]:
        """This export relative to the original's (file size, parameters, latency)."""
        if self.original is None:
            return {}
        o, s = self.original, self.stats
        return {
            "file_bytes": s.file_bytes / o.file_bytes if o.file_bytes else None,
            "parameters": s.parameters / o.parameters if o.parameters else None,
            "latency": s.latency_ms / o.latency_ms if s.latency_ms and o.latency_ms else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "source": self.source,
            "mode": self.mode,
            "forms": self.forms,
            "form_counts": self.form_counts,
            "plan_source": self.plan_source,
            "exporter": self.exporter,
            "opset": self.opset,
            "input_shape": list(self.input_shape),
            "dynamic_axes": list(self.dynamic_axes),
            "fp16": self.fp16,
            "external_data": self.external_data,
            "checker_passed": self.checker_passed,
            **{k: v for k, v in self.stats.to_dict().items()},
            "validation": self.validation.to_dict() if self.validation else None,
            "latency_shape": list(self.latency_shape),
            "threads": self.threads,
            "original": self.original.to_dict() if self.original else None,
            "ratios_to_original": self.ratios(),
            "normalization": self.normalization,
            "architecture": self.architecture,
            "notes": self.notes,
            "seconds": self.seconds,
            "kept_invalid": self.kept_invalid,
            "measured_plan": self.plan.to_dict() if self.plan is not None else None,
            "plan_seconds": self.plan_seconds,
            "plan_saved": str(self.plan_saved) if self.plan_saved else None,
        }


# --------------------------------------------------------------------------------------------
# Writing the graph
# --------------------------------------------------------------------------------------------


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _torch_export(model: nn.Module, example: Tensor, path: Path, opset: int, dynamic: Sequence[str], n_outputs: int) -> None:
    outputs = _output_names(n_outputs)
    axes: dict[str, dict[int, str]] = {}
    if dynamic:
        axes[INPUT_NAME] = {DYNAMIC_AXES[name]: name for name in dynamic}
        if "batch" in dynamic:
            for name in outputs:
                axes[name] = {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter's deprecation notice and tracer warnings are not the user's concern.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=outputs,
                dynamic_axes=axes or None,
                do_constant_folding=True,  # the clean graph: Conv+BatchNorm fused, no shape arithmetic
                export_params=True,
            )
    except (RuntimeError, ValueError, TypeError, torch.onnx.errors.OnnxExporterError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.onnx could not export the model at opset {opset}: {first[:300]}",
            "try another --opset or --mode; set STJFD_DEBUG=1 for details",
        ) from None


def _to_fp16_weights(onnx: Any, proto: Any) -> int:
    """Store float initializers as float16, each followed by a Cast back to float; returns the count."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    casts = []
    converted = 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        name = init.name
        half = numpy_helper.from_array(array.astype(np.float16), name=f"{name}__fp16")
        init.CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}__cast"))
        converted += 1
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return converted


def _share_tiled_weights(proto: Any) -> int:
    """Store each grouped Conv weight made of identical per-group blocks once, expanded in the graph.

    Torch's constant folding turns the expanded atoms of the depthwise atom convs into constants
    ``groups`` times their size. A weight ``W [G·m, k, …]`` whose G blocks ``[m, k, …]`` are exactly
    equal becomes ``Reshape(Expand(block[None], [G, m, k, …]), W.shape)`` over the stored block;
    onnxruntime folds it back once when it loads the graph. Returns the number of weights shared.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    # The exporter deduplicates equal initializers and feeds the copies through Identity nodes.
    identity_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    new_nodes, new_inits, drop = [], [], set()
    for node in graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        name = node.input[1]
        while name in identity_of:
            name = identity_of[name]
        if name not in initializers or name in drop:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = numpy_helper.to_array(initializers[name])
        if groups <= 1 or weight.shape[0] % groups:
            continue
        blocks = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        if not np.array_equal(blocks, np.broadcast_to(blocks[:1], blocks.shape)):
            continue
        shared = numpy_helper.from_array(np.ascontiguousarray(blocks[:1]), name=f"{name}__shared")
        expand_to = numpy_helper.from_array(np.array(blocks.shape, dtype=np.int64), name=f"{name}__expand_shape")
        flat = numpy_helper.from_array(np.array(weight.shape, dtype=np.int64), name=f"{name}__shape")
        new_inits += [shared, expand_to, flat]
        new_nodes += [
            helper.make_node("Expand", [shared.name, expand_to.name], [f"{name}__expanded"], name=f"{name}__expand"),
            helper.make_node("Reshape", [f"{name}__expanded", flat.name], [name], name=f"{name}__reshape"),
        ]
        drop.add(name)
    if not drop:
        return 0
    kept = [init for init in graph.initializer if init.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)  # inputs are initializers only, so first is a valid order
    return len(drop)


def _set_metadata(proto: Any, items: Mapping[str, str]) -> None:
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in items.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value


def _save(onnx: Any, proto: Any, path: Path) -> list[Path]:
    """Save ``proto`` at ``path``; weights go to ``<name>.data`` beside it only above protobuf's 2 GB limit."""
    data_name = f"{path.name}.data"
    if proto.ByteSize() > PROTOBUF_LIMIT - EXTERNAL_DATA_MARGIN:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
        return [path, path.parent / data_name]
    onnx.save_model(proto, str(path))
    return [path]


def _graph_stats(onnx: Any, files: Sequence[Path]) -> GraphStats:
    from onnx import TensorProto

    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    proto = onnx.load(str(files[0]), load_external_data=False)
    parameters = sum(int(np.prod(init.dims)) for init in proto.graph.initializer if init.data_type in floats)
    return GraphStats(sum(f.stat().st_size for f in files), [f.name for f in files], parameters)


def _write_graph(
    model: nn.Module,
    example: Tensor,
    path: Path,
    *,
    opset: int,
    dynamic: Sequence[str],
    n_outputs: int,
    fp16: bool,
    metadata: Mapping[str, str],
) -> tuple[list[Path], bool]:
    """Trace ``model`` into ``path`` (a staging location), post-process, run onnx.checker."""
    onnx = _import_onnx()
    # A folder of its own: above 2 GB the TorchScript exporter writes one external file per weight.
    raw_dir = path.parent / f"{path.name}.raw"
    raw_dir.mkdir()
    try:
        _torch_export(model, example, raw_dir / path.name, opset, dynamic, n_outputs)
        proto = onnx.load(str(raw_dir / path.name))
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    _share_tiled_weights(proto)
    if fp16:
        _to_fp16_weights(onnx, proto)
    _set_metadata(proto, metadata)
    proto.producer_name = "stjfd (torch.onnx TorchScript exporter)"
    proto.producer_version = __version__
    files = _save(onnx, proto, path)
    del proto
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx.checker.ValidationError, shape inference errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"onnx.checker rejected the exported graph: {first[:300]}", "report this with the command used") from None
    return files, len(files) > 1


# --------------------------------------------------------------------------------------------
# onnxruntime: validation and latency
# --------------------------------------------------------------------------------------------


def ort_session(path: str | os.PathLike[str] | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session (``threads`` intra-op threads, else onnxruntime's default) on a
    file, or on a serialized model given as ``bytes`` (the same options either way)."""
    ort = _import_ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: shape-mismatch warnings would flood the terminal
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    model = path if isinstance(path, bytes) else str(Path(path))
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        name = "the in-memory graph" if isinstance(path, bytes) else Path(path).name
        raise ExportError(f"onnxruntime cannot load {name}: {first[:300]}", "try another --opset") from None


def validation_shapes(input_shape: Sequence[int], dynamic: Sequence[str], clips: int) -> list[tuple[int, ...]]:
    """The base shape, then one shape per dynamic axis with that axis changed, then the base again."""
    base = tuple(int(s) for s in input_shape)
    shapes = [base]
    for name in dynamic:
        axis = DYNAMIC_AXES[name]
        n = base[axis]
        if name == "batch":
            changed = n + 1
        elif name == "time":
            changed = n // 2 if n >= 8 else n * 2
        else:
            changed = n // 2 if n >= 32 else n * 2
        shape = list(base)
        shape[axis] = changed
        shapes.append(tuple(shape))
    while len(shapes) < clips:
        shapes.append(base)
    return shapes


def validate_onnx(
    path: str | os.PathLike[str],
    reference: nn.Module,
    shapes: Sequence[Sequence[int]],
    *,
    atol: float = DEFAULT_ATOL,
    threads: int | None = None,
    session: Any = None,
    known: Mapping[int, list[tuple[str, Tensor]]] | None = None,
) -> ValidationReport:
    """Run ``reference`` (PyTorch) and the ONNX file on clip ``i`` = ``make_input(shapes[i], seed=i)``
    for each shape and compare every output. ``known`` holds PyTorch outputs already computed."""
    session = session or ort_session(Path(path), threads)
    input_name = session.get_inputs()[0].name
    report = ValidationReport(float(atol))
    reference.eval()
    known = known or {}
    for index, shape in enumerate(shapes):
        x = make_input(shape, torch.float32, seed=index)
        expected = known[index] if index in known else flatten_outputs(run_model(reference, x))
        try:
            actual = session.run(None, {input_name: x.numpy()})
        except Exception as exc:  # onnxruntime.capi errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            for name, ref in expected:
                report.checks.append(
                    OutputCheck(index, tuple(shape), name, tuple(ref.shape), math.inf, math.inf, False, f"onnxruntime failed: {first[:200]}")
                )
            continue
        if len(actual) != len(expected):
            report.checks.append(
                OutputCheck(index, tuple(shape), "outputs", (), math.inf, math.inf, False,
                            f"ONNX gives {len(actual)} outputs, PyTorch {len(expected)}")
            )
        for (name, ref), got in zip(expected, actual):
            ref64 = ref.detach().double().numpy()
            got64 = np.asarray(got, dtype=np.float64)
            problem = None
            if ref64.shape != got64.shape:
                problem = f"shape {tuple(got64.shape)} ≠ PyTorch {tuple(ref64.shape)}"
                max_abs = rel = math.inf
            else:
                diff = np.abs(got64 - ref64)
                max_abs = float(diff.max()) if diff.size else 0.0
                norm = float(np.linalg.norm(ref64))
                rel = float(np.linalg.norm(got64 - ref64)) / norm if norm > 0 else float(np.linalg.norm(diff))
                if not np.isfinite(got64).all() and np.isfinite(ref64).all():
                    problem = "non-finite values from onnxruntime"
            ok = problem is None and max_abs <= atol
            report.checks.append(OutputCheck(index, tuple(shape), name, tuple(ref64.shape), max_abs, rel, ok, problem))
    return report


def ort_latency(
    path: str | os.PathLike[str] | None,
    input_shape: Sequence[int],
    *,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    session: Any = None,
) -> list[float]:
    """Seconds of ``runs`` onnxruntime inferences on one seeded clip, after ``warmup`` untimed ones.

    Opens a CPU session on ``path`` unless an open ``session`` is given.
    """
    if session is None:
        if path is None:
            raise ValueError("ort_latency needs a path or a session")
        session = ort_session(Path(path), threads)
    feed = _latency_feed(session, input_shape)
    for _ in range(max(0, warmup)):
        session.run(None, feed)
    return [_timed_run(session, feed) for _ in range(runs)]


def _latency_feed(session: Any, input_shape: Sequence[int]) -> dict[str, np.ndarray]:
    return {session.get_inputs()[0].name: make_input(input_shape, torch.float32, seed=7).numpy()}


def _timed_run(session: Any, feed: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def _fill_latency(stats: GraphStats, times: Sequence[float]) -> None:
    if times:
        stats.latency_all_ms = [t * 1e3 for t in times]
        stats.latency_ms = statistics.median(stats.latency_all_ms)
        stats.latency_runs = len(times)


# --------------------------------------------------------------------------------------------
# Loading what to export
# --------------------------------------------------------------------------------------------


@dataclass
class _Source:
    model: nn.Module
    description: str
    spec: ArchSpec | None
    manifest: dict[str, Any] | None
    input_shape: tuple[int, ...] | None
    directory: Path | None = None  # a converted folder (where a measured plan is stored)


def _load_source(
    model_or_dir: nn.Module | str | os.PathLike[str],
    *,
    arch: str | None,
    model: str | None,
    model_kwargs: Mapping[str, Any] | None,
    trust_pickle: bool,
    trust_code: bool = False,
) -> _Source:
    if isinstance(model_or_dir, nn.Module):
        return _Source(model_or_dir, type(model_or_dir).__name__, None, None, None)
    path = Path(model_or_dir)
    if path.is_dir() or is_converted_dir(path):
        if arch is not None:
            raise ConfigError(
                f"{path} is a converted-model folder; --arch is for checkpoints",
                "drop --arch (the folder's manifest names its architecture)",
            )
        converted = load_converted(path, trust_pickle=trust_pickle, trust_code=trust_code, model=model)
        shape = (converted.manifest.get("input") or {}).get("shape")
        spec = converted.spec
        if shape is None:
            from .workflows import default_input_shape

            shape = default_input_shape(spec)
        return _Source(converted.model, str(path), spec, converted.manifest, tuple(shape) if shape else None, path)
    loaded = load_model(path, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle)
    from .workflows import default_input_shape

    return _Source(loaded.model.eval(), str(path), loaded.spec, None, default_input_shape(loaded.spec))


def _normalization(
    spec: ArchSpec | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, list[float]] | None:
    """--mean/--std, else what the model was fine-tuned with (manifest), else the arch's known stats."""
    if (mean is None) != (std is None):
        raise ConfigError("give both --mean and --std, or neither", "e.g. --mean 0.43,0.39,0.38 --std 0.23,0.22,0.22")
    if mean is not None and std is not None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError("--mean and --std need one value per channel and std > 0", "e.g. --mean 0.45,0.45,0.45 --std 0.225,0.225,0.225")
        return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    recorded = (manifest or {}).get("normalization")
    if isinstance(recorded, Mapping) and recorded.get("mean") and recorded.get("std"):
        return {"mean": [float(m) for m in recorded["mean"]], "std": [float(s) for s in recorded["std"]]}
    if spec is not None and spec.kind == "torchvision" and spec.name in TORCHVISION_VIDEO_ARCHS:
        info = TORCHVISION_VIDEO_ARCHS[spec.name]
        return {"mean": list(info.mean), "std": list(info.std)}
    return None


@contextlib.contextmanager
def _staging_dir(target: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``target``, removed afterwards whatever happens."""
    staging = make_staging_dir(target, "choose another --onnx path")
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(files: Sequence[Path], target: Path) -> list[Path]:
    """Move staged files into place: external data first, the .onnx last (the rename users see)."""
    final = []
    data_target = target.parent / f"{target.name}.data"
    for staged in files[1:]:
        os.replace(staged, data_target)
        final.append(data_target)
    if len(files) == 1 and data_target.exists():
        data_target.unlink()  # a stale external-data file of an earlier, larger export
    os.replace(files[0], target)
    return [target, *final]


# --------------------------------------------------------------------------------------------
# The one entry point the CLI uses
# --------------------------------------------------------------------------------------------


def export_onnx(
    model_or_dir: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    mode: str = "auto",
    measure: bool = False,
    measure_repeats: int = DEFAULT_PLAN_REPEATS,
    opset: int = DEFAULT_OPSET,
    dynamic_axes: str | Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    fp16: bool = False,
    atol: float | None = None,
    validate: bool = True,
    clips: int = DEFAULT_CLIPS,
    compare: bool = False,
    runs: int = DEFAULT_RUNS,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    keep_invalid: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    arch: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a converted folder, a checkpoint (with ``arch``/``model``) or a module to ONNX at ``path``.

    Checks (in order): onnx.checker, then (``validate``) onnxruntime vs PyTorch on ``clips`` seeded
    clips at ``atol`` (default :data:`DEFAULT_ATOL`, :data:`FP16_ATOL` with ``fp16``), then
    (``runs`` > 0) the median ORT latency of ``runs`` runs at ``input_shape``. ``compare`` also exports
    the dense original (:func:`densify`) to a temporary file for its size, parameters and latency.
    Raises :class:`ExportValidationError` (file removed unless ``keep_invalid``) when validation fails.
    An existing ``path`` is replaced only with ``force`` and only if stjfd exported it
    (:mod:`stjfd_convert.atomic`); ``trust_code`` allows the builder a converted folder's manifest names.

    ``measure`` (with ``mode="auto"``): the forms come from :func:`plan_onnxruntime` at the export
    shape with ``threads`` (``measure_repeats`` interleaved rounds per layer) instead of a stored
    plan or the cost model; for a converted folder the plan is stored in its manifest
    (``planner.save_plan``, device :data:`ORT_DEVICE`), where later ``auto`` exports find it.
    """
    start = time.perf_counter()
    step = progress or (lambda _: None)
    check_opset(opset)
    dynamic = parse_dynamic_axes(dynamic_axes)
    if mode not in EXPORT_MODES:
        raise ConfigError(f"unknown --mode {mode!r}", f"use one of {', '.join(EXPORT_MODES)}")
    if clips < 1:
        raise ConfigError(f"--clips must be ≥ 1, got {clips}", "e.g. --clips 3")
    if runs < 0 or warmup < 0:
        raise ConfigError("--runs and --warmup must be ≥ 0", "e.g. --runs 10")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be ≥ 1, got {threads}", "e.g. --threads 2, or leave it out")
    if measure and mode != "auto":
        raise ConfigError(f"--measure plans the forms of --mode auto, not --mode {mode}", "drop --measure, or use --mode auto")
    if measure and measure_repeats < 1:
        raise ConfigError(f"--measure-repeats must be ≥ 1, got {measure_repeats}", "e.g. --measure-repeats 6")
    tolerance = float(atol) if atol is not None else (FP16_ATOL if fp16 else DEFAULT_ATOL)
    if not tolerance > 0:
        raise ConfigError(f"--atol must be > 0, got {atol}", "e.g. --atol 1e-4")
    sources = [] if isinstance(model_or_dir, nn.Module) else [model_or_dir, *model_source_paths(model)]
    target = check_output(Path(path), "onnx", force=force, inputs=sources)
    # Fail on a missing dependency before any long work.
    onnx = _import_onnx()
    if validate or runs > 0 or compare or measure:
        _import_ort()

    step("loading the model")
    source = _load_source(
        model_or_dir, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle,
        trust_code=trust_code,
    )
    shape = tuple(int(s) for s in input_shape) if input_shape else source.input_shape
    if shape is None:
        raise ConfigError(
            "the export input shape is unknown for this model", "pass --input-shape, e.g. --input-shape 1,3,16,112,112"
        )
    if len(shape) != 5 and dynamic:
        raise ConfigError(
            f"--dynamic needs a 5-D input [batch, channels, time, height, width], got {'×'.join(map(str, shape))}",
            "pass a 5-D --input-shape",
        )
    normalization = _normalization(source.spec, mean, std, source.manifest)

    work = copy.deepcopy(source.model).eval()
    plan = None
    plan_seconds = 0.0
    plan_saved = None
    if measure and _decomposed_layers(work):
        from .planner import apply_plan, save_plan

        began = time.perf_counter()
        plan = plan_onnxruntime(
            work, shape, repeats=measure_repeats, threads=threads, opset=opset,
            progress=lambda i, n, name: step(f"measured layer {i}/{n} ({name}) in onnxruntime"),
        )
        plan_seconds = time.perf_counter() - began
        apply_plan(work, plan, mode="fixed")
        forms = dict(plan.modes)
        threads_text = f"{threads} threads" if threads else "default threads"
        plan_source = f"measured in onnxruntime now ({threads_text}, fastest of {measure_repeats} rounds × {PLAN_BLOCK} runs per form)"
        if source.directory is not None:
            plan_saved = save_plan(source.directory, plan)
    else:
        forms, plan_source = resolve_forms(work, mode, shape, source.manifest)
    notes: list[str] = []
    if not forms:
        notes.append("the model has no decomposed layers: exported as is (--mode does not apply)")
    example = make_input(shape, torch.float32, seed=0)
    # Every form is an exact reformulation of the dense conv (DESIGN.md §2), so the PyTorch reference
    # runs the dense model: the fastest form on CPU, and independent of the export modules under test.
    reference = densify(work)
    reference_outputs = flatten_outputs(run_model(reference, example))
    if not reference_outputs:
        raise ConfigError("the model returned no tensors", "export a model whose forward returns tensors")
    exportable = _export_friendly(work, forms)

    metadata = {
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}mode": mode,
        f"{META_PREFIX}forms": json.dumps(forms),
        f"{META_PREFIX}input_shape": ",".join(map(str, shape)),
        f"{META_PREFIX}layout": LAYOUT,
        f"{META_PREFIX}dynamic_axes": ",".join(dynamic),
        f"{META_PREFIX}fp16_weights": str(bool(fp16)).lower(),
    }
    if source.spec is not None:
        metadata[f"{META_PREFIX}architecture"] = json.dumps(source.spec.to_dict())
    if normalization is not None:
        metadata[f"{META_PREFIX}mean"] = ",".join(repr(float(m)) for m in normalization["mean"])
        metadata[f"{META_PREFIX}std"] = ",".join(repr(float(s)) for s in normalization["std"])
    classes = ((source.manifest or {}).get("finetune") or {}).get("classes")
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        metadata[f"{META_PREFIX}classes"] = json.dumps(classes)  # class names a fine-tuning run trained on

    with _staging_dir(target) as staging:
        step(f"exporting ({EXPORTER} exporter, opset {opset})")
        staged = staging / target.name
        files, external = _write_graph(
            exportable, example, staged, opset=opset, dynamic=dynamic, n_outputs=len(reference_outputs),
            fp16=fp16, metadata=metadata,
        )
        stats = _graph_stats(onnx, files)
        session = None
        validation = None
        if validate:
            step("validating with onnxruntime")
            session = ort_session(staged, threads)
            validation = validate_onnx(
                staged, reference, validation_shapes(shape, dynamic, clips), atol=tolerance, session=session,
                known={0: reference_outputs},  # clip 0 is the export example (seed 0)
            )
        failed = validation is not None and not validation.passed
        timed = runs > 0 and not failed
        if timed:
            session = session or ort_session(staged, threads)
        original = None
        original_session = None
        if compare and not failed:
            step("exporting the dense original for comparison")
            folder = staging / "original"
            folder.mkdir()
            original_files, _ = _write_graph(
                reference, example, folder / "original.onnx", opset=opset, dynamic=dynamic,
                n_outputs=len(reference_outputs), fp16=fp16, metadata={f"{META_PREFIX}mode": "original"},
            )
            original = _graph_stats(onnx, original_files)
            if timed:
                original_session = ort_session(original_files[0], threads)
        if timed:
            step(f"timing {runs} onnxruntime runs" + (" of each model, interleaved" if original_session else ""))
            _time_interleaved(session, original_session, shape, runs, warmup, stats, original)
        result = ExportResult(
            path=None,
            source=source.description,
            mode=mode,
            forms=forms,
            plan_source=plan_source,
            exporter=EXPORTER,
            opset=opset,
            input_shape=shape,
            dynamic_axes=dynamic,
            fp16=fp16,
            external_data=external,
            checker_passed=True,
            stats=stats,
            validation=validation,
            latency_shape=shape,
            threads=threads,
            original=original,
            normalization=normalization,
            architecture=source.spec.to_dict() if source.spec else None,
            notes=notes,
            plan=plan,
            plan_seconds=plan_seconds,
            plan_saved=plan_saved,
        )
        del session, original_session
        if not failed or keep_invalid:
            final = _publish(files, target)
            result.path = final[0]
            result.stats.files = [f.name for f in final]
            result.kept_invalid = failed
    result.seconds = time.perf_counter() - start
    if failed:
        where = f"kept at {target} (--keep-invalid)" if keep_invalid else "no file was written"
        raise ExportValidationError(
            f"ONNX validation failed: {validation.summary()}",  # type: ignore[union-attr]
            f"{where}; a larger --atol may be justified for --fp16, otherwise report the command",
            result,
        )
    return result


def _time_interleaved(
    session: Any,
    other: Any,
    shape: Sequence[int],
    runs: int,
    warmup: int,
    stats: GraphStats,
    other_stats: GraphStats | None,
) -> None:
    """Median ORT latency of ``session`` (and ``other``), alternating run by run so that load from
    others on a shared CPU hits both alike."""
    sessions = [s for s in (session, other) if s is not None]
    feeds = [_latency_feed(s, shape) for s in sessions]
    for s, feed in zip(sessions, feeds):
        for _ in range(warmup):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for index, (s, feed) in enumerate(zip(sessions, feeds)):
            times[index].append(_timed_run(s, feed))
    _fill_latency(stats, times[0])
    if other is not None and other_stats is not None:
        _fill_latency(other_stats, times[1])


# --------------------------------------------------------------------------------------------
# Prediction on a video
# --------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """Top-k classes of one clip of a video."""

    video: Path
    model: Path
    input_shape: tuple[int, ...]
    normalization: dict[str, list[float]]
    normalization_source: str
    top: list[dict[str, Any]]  # {"rank", "index", "label", "probability", "logit"}
    num_classes: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["video"] = str(self.video)
        data["model"] = str(self.model)
        data["input_shape"] = list(self.input_shape)
        return data


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of numbers", "e.g. 0.45,0.45,0.45") from None


def _read_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc}", "pass a UTF-8 text file with one label per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def predict(
    model_path: str | os.PathLike[str],
    video: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    top_k: int = 5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    threads: int | None = None,
) -> Prediction:
    """Classify the centre clip of ``video`` with an exported ONNX model (onnxruntime, CPU).

    Clip length and frame size come from the graph's input (or, for dynamic axes, from the export
    shape stored in its metadata); decoding is ``data.ClipDataset``'s evaluation path (centre clip,
    short side resized to 128/112 of the crop, centre crop). Mean/std come from ``mean``/``std`` or
    else from the metadata written at export time.
    """
    start = time.perf_counter()
    model_path, video = Path(model_path), Path(video)
    if top_k < 1:
        raise ConfigError(f"--top-k must be ≥ 1, got {top_k}", "e.g. --top-k 5")
    if not model_path.is_file():
        raise ConfigError(f"ONNX model {model_path} does not exist", "pass the file written by `stjfd export --onnx`")
    if not video.is_file():
        raise ConfigError(f"video {video} does not exist", "pass a video file (.mp4, .avi, .mkv, …)")
    label_names = _read_labels(Path(labels)) if labels is not None else None
    session = ort_session(model_path, threads)
    meta = dict(session.get_modelmeta().custom_metadata_map or {})
    graph_input = session.get_inputs()[0]
    stored = _floats(meta.get(f"{META_PREFIX}input_shape", ""), "stored input shape") if meta.get(f"{META_PREFIX}input_shape") else []
    dims = list(graph_input.shape)
    if len(dims) != 5:
        raise ConfigError(f"{model_path.name} takes a {len(dims)}-D input; predict needs [batch, 3, time, height, width]",
                          "export a video model")
    shape = []
    for axis, dim in enumerate(dims):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif axis == 0:
            shape.append(1)
        elif stored:
            shape.append(int(stored[axis]))
        else:
            raise ConfigError(f"{model_path.name} has a dynamic axis {axis} and no stored export shape", "re-export with stjfd")
    batch, channels, clip_len, height, width = shape
    if channels != 3:
        raise ConfigError(f"{model_path.name} expects {channels} input channels, not RGB", "export an RGB video model")
    if mean is not None or std is not None:
        norm = _normalization(None, mean, std)
        source = "--mean/--std"
    elif f"{META_PREFIX}mean" in meta and f"{META_PREFIX}std" in meta:
        norm = {"mean": _floats(meta[f"{META_PREFIX}mean"], "stored mean"), "std": _floats(meta[f"{META_PREFIX}std"], "stored std")}
        source = "ONNX metadata"
    else:
        raise ConfigError(
            f"{model_path.name} records no normalisation (mean/std)", "pass --mean and --std, e.g. --mean 0.45,0.45,0.45 --std 0.225,0.225,0.225"
        )
    assert norm is not None
    from .data import ClipConfig, ClipDataset, VideoSource

    config = ClipConfig(clip_len=clip_len, size=(height, width), mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    dataset = ClipDataset([VideoSource(video, -1)], ["video"], config, probe="metadata", probe_workers=1, name=str(video))
    clip, _ = dataset[0]  # float32 [3, T, H, W]; DataError if it cannot be decoded
    x = clip.unsqueeze(0).expand(batch, -1, -1, -1, -1).contiguous().numpy()
    try:
        outputs = session.run(None, {graph_input.name: x})
    except Exception as exc:  # onnxruntime errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"onnxruntime failed on the clip: {first[:300]}", "check that the model was exported by stjfd") from None
    logits = np.asarray(outputs[0], dtype=np.float64).reshape(batch, -1)[0]
    num_classes = logits.shape[0]
    if label_names is None and f"{META_PREFIX}classes" in meta:
        try:
            stored_names = json.loads(meta[f"{META_PREFIX}classes"])
        except json.JSONDecodeError:
            stored_names = None
        if isinstance(stored_names, list) and len(stored_names) == num_classes:
            label_names = [str(name) for name in stored_names]
    if label_names is not None and len(label_names) < num_classes:
        raise ConfigError(
            f"{labels} has {len(label_names)} labels but the model has {num_classes} classes",
            "give one label per line, in class-index order",
        )
    shifted = np.exp(logits - logits.max())
    probabilities = shifted / shifted.sum()
    order = np.argsort(-logits, kind="stable")[: min(top_k, num_classes)]
    top = [
        {
            "rank": rank,
            "index": int(i),
            "label": label_names[int(i)] if label_names is not None else str(int(i)),
            "probability": float(probabilities[i]),
            "logit": float(logits[i]),
        }
        for rank, i in enumerate(order, start=1)
    ]
    return Prediction(video, model_path, tuple(shape), norm, source, top, num_classes, time.perf_counter() - start)
