"""ONNX export of converted (and plain) models, verified with onnx.checker and onnxruntime.

Exporter
--------
torch 2.14's ``torch.onnx.export`` defaults to the dynamo (``torch.export``-based) exporter, which
needs the ``onnxscript`` package; it is not a dependency of stjfd (nor installed with the ``onnx``
extra) and the TorchScript exporter already gives the graph we want for these models: one ONNX
``Conv`` per conv, ``BatchNormalization`` folded into the preceding ``Conv`` in eval mode, plain
``dynamic_axes`` for the batch/time/height/width axes, and initializers stored exactly as the module
holds them. So this package calls ``torch.onnx.export(..., dynamo=False)`` (its deprecation warning is
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

The package, by what each part does (imports flow one way, each module only from those above it)
-------------------------------------------------------------------------------------------------
- ``base``: constants, errors, the optional imports of onnx/onnxruntime, ``--opset`` and
  ``--dynamic`` checks.
- ``results``: ``OutputCheck``, ``ValidationReport``, ``GraphStats``, ``ExportResult`` (data only).
- ``modules``: the per-form export modules (:func:`export_module`) and :func:`resolve_forms`.
- ``graph``: writing the graph: TorchScript export, shared atom weights, fp16 weights, metadata,
  external data above protobuf's limit (``graph.PROTOBUF_LIMIT``), onnx.checker.
- ``runtime``: onnxruntime sessions, latency and :func:`plan_onnxruntime`.
- ``validate``: :func:`validation_shapes`, :func:`validate_onnx`.
- ``source``: loading what to export and its normalisation.
- ``exporter``: :func:`export_onnx`.
- ``predict``: :func:`predict` on a video.

A constant is defined in the module that reads it: patch it there (e.g. ``graph.PROTOBUF_LIMIT``).
"""

from __future__ import annotations

from ..convert import densify  # re-exported: callers have long imported it from here
from .base import (
    DEFAULT_ATOL,
    DEFAULT_CLIPS,
    DEFAULT_OPSET,
    DEFAULT_RUNS,
    DEFAULT_WARMUP,
    DYNAMIC_AXES,
    EXPORT_MODES,
    EXPORTER,
    FP16_ATOL,
    INPUT_NAME,
    LAYOUT,
    META_PREFIX,
    MIN_OPSET,
    ORT_DEVICE,
    ExportError,
    ExportValidationError,
    MissingDependencyError,
    check_opset,
    max_opset,
    parse_dynamic_axes,
)
from .exporter import export_onnx
from .modules import export_module, resolve_forms
from .predict import Prediction, predict
from .results import ExportResult, GraphStats, OutputCheck, ValidationReport
from .runtime import (
    DEFAULT_PLAN_REPEATS,
    SessionTimer,
    ort_latency,
    ort_session,
    plan_onnxruntime,
)
from .validate import validate_onnx, validation_shapes

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_CLIPS",
    "DEFAULT_OPSET",
    "DEFAULT_PLAN_REPEATS",
    "DEFAULT_RUNS",
    "DEFAULT_WARMUP",
    "DYNAMIC_AXES",
    "EXPORTER",
    "EXPORT_MODES",
    "FP16_ATOL",
    "INPUT_NAME",
    "LAYOUT",
    "META_PREFIX",
    "MIN_OPSET",
    "ORT_DEVICE",
    "ExportError",
    "ExportResult",
    "ExportValidationError",
    "GraphStats",
    "MissingDependencyError",
    "OutputCheck",
    "Prediction",
    "SessionTimer",
    "ValidationReport",
    "check_opset",
    "densify",
    "export_module",
    "export_onnx",
    "max_opset",
    "ort_latency",
    "ort_session",
    "parse_dynamic_axes",
    "plan_onnxruntime",
    "predict",
    "resolve_forms",
    "validate_onnx",
    "validation_shapes",
]
