"""Validation: PyTorch and onnxruntime on several seeded clips, every output compared."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import first_line
from ..parity import flatten_outputs, make_input, run_model
from .base import DEFAULT_ATOL, DYNAMIC_AXES
from .results import OutputCheck, ValidationReport
from .runtime import ort_session


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
            problem = f"onnxruntime failed: {first_line(exc)[:200]}"
            for name, ref in expected:
                report.checks.append(
                    OutputCheck(index, tuple(shape), name, tuple(ref.shape), math.inf, math.inf, False, problem)
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
