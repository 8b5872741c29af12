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
from ..inputs import InputShape, input_tensors, make_model_input, map_pathways, normalize_input_shape
from ..parity import flatten_outputs, run_model
from .base import DEFAULT_ATOL, dynamic_axis_positions
from .results import OutputCheck, ValidationReport
from .runtime import ort_session


def validation_shapes(
    input_shape: InputShape | Sequence[int], dynamic: Sequence[str], clips: int, layout: str = "BCTHW"
) -> list[InputShape]:
    """The base shape, then one shape per dynamic axis with that axis changed (in every pathway), then the
    base again. Shapes are in the model's ``layout``."""
    base = normalize_input_shape(input_shape)
    shapes = [base]
    positions = dynamic_axis_positions(layout)
    for name in dynamic:
        axis = positions[name]

        def changed(one: tuple[int, ...], axis: int = axis, name: str = name) -> tuple[int, ...]:
            n = one[axis]
            if name == "batch":
                new = n + 1
            elif name == "time":
                new = n // 2 if n >= 8 else n * 2
            else:
                new = n // 2 if n >= 32 else n * 2
            return (*one[:axis], new, *one[axis + 1 :])

        shapes.append(map_pathways(base, changed))
    while len(shapes) < clips:
        shapes.append(base)
    return shapes


def validate_onnx(
    path: str | os.PathLike[str],
    reference: nn.Module,
    shapes: Sequence[InputShape | Sequence[int]],
    *,
    container: str = "list",
    atol: float = DEFAULT_ATOL,
    threads: int | None = None,
    session: Any = None,
    known: Mapping[int, list[tuple[str, Tensor]]] | None = None,
    dtype: torch.dtype = torch.float32,
) -> ValidationReport:
    """Run ``reference`` (PyTorch) and the ONNX file on clip ``i`` = ``make_model_input(shapes[i], dtype,
    seed=i)`` (one tensor per ONNX input for a multi-pathway model; ``uint8``: raw frames) for each shape and
    compare every output. ``known`` holds PyTorch outputs already computed."""
    session = session or ort_session(Path(path), threads)
    names = [i.name for i in session.get_inputs()]
    report = ValidationReport(float(atol))
    reference.eval()
    known = known or {}
    for index, shape in enumerate(shapes):
        shape = normalize_input_shape(shape)
        x = make_model_input(shape, dtype, seed=index, container=container)
        expected = known[index] if index in known else flatten_outputs(run_model(reference, x))
        try:
            actual = session.run(None, {name: t.numpy() for name, t in zip(names, input_tensors(x))})
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
