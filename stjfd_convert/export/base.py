"""The bottom of the export package: its shared constants, errors, optional imports (onnx,
onnxruntime) and the checks of ``--opset`` and ``--dynamic``. It imports nothing from the package at
run time (``results.ExportResult`` is a type only); the modules that need these import from here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import ConfigError, StjfdError, VerificationError
from ..layers import MODES

if TYPE_CHECKING:  # a type only: results.py imports nothing from the package
    from .results import ExportResult


EXPORTER = "torchscript"
MIN_OPSET = 11  # Conv/Pad/Resize semantics we rely on; older opsets are not worth supporting
DEFAULT_OPSET = 17
EXPORT_MODES = MODES  # fused, factorized, sandwich, spatial_first, temporal_first, auto
#: Input axis of each name accepted by ``dynamic_axes`` (input layout [B, C, T, H, W]; other layouts:
#: :func:`dynamic_axis_positions`).
DYNAMIC_AXES = {"batch": 0, "time": 2, "height": 3, "width": 4}
_AXIS_LETTERS = {"batch": "B", "time": "T", "height": "H", "width": "W"}


def dynamic_axis_positions(layout: str = "BCTHW") -> dict[str, int]:
    """Input axis of each dynamic-axis name for a model taking ``layout`` (``BTHWC``: time 1, width 3)."""
    return {name: layout.index(letter) for name, letter in _AXIS_LETTERS.items()}

#: Element-wise absolute tolerance, ORT vs PyTorch, float32 weights.
DEFAULT_ATOL = 1e-4
#: Element-wise absolute tolerance with ``fp16`` weights (half-precision rounding of every weight).
FP16_ATOL = 1e-2
DEFAULT_CLIPS = 3
DEFAULT_RUNS = 10
DEFAULT_WARMUP = 3
INPUT_NAME = "clip"


def input_names(count: int) -> list[str]:
    """ONNX input names: ``clip`` for one input, ``clip_0``, ``clip_1``, … for one per pathway."""
    return [INPUT_NAME] if count == 1 else [f"{INPUT_NAME}_{i}" for i in range(count)]
#: The ``device`` of execution plans measured in onnxruntime (CPU provider), as stored in manifests.
ORT_DEVICE = "onnxruntime"
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


def _import_ort(skip: str | None = None) -> Any:
    """onnxruntime; ``skip`` names the flags that would do without it (the command's own, if any)."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError(
            "running ONNX models (validating, timing, predicting) needs onnxruntime, which is not installed",
            f"{_ONNX_HINT}" + (f", or {skip}" if skip else ""),
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
