"""onnxruntime: sessions, latency, and the execution plan measured in onnxruntime."""

from __future__ import annotations

import io
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, first_line
from ..inputs import InputShape, input_tensors, make_model_input, normalize_input_shape
from ..layers import FORMS
from ..parity import make_input
from .base import (
    DEFAULT_OPSET,
    DEFAULT_RUNS,
    DEFAULT_WARMUP,
    ORT_DEVICE,
    ExportError,
    _import_onnx,
    _import_ort,
    check_opset,
)
from .graph import _share_tiled_weights, _torch_export
from .modules import _decomposed_layers, export_module
from .results import GraphStats

#: Timed runs per form and layer in :func:`plan_onnxruntime` (fastest of them counts).
DEFAULT_PLAN_REPEATS = 6
#: Back-to-back timed runs of one form per round: the first may share the CPU with the previous
#: form's session, whose intra-op threads still spin for a while after its run.
PLAN_BLOCK = 2
#: After this many interleaved rounds, a form slower than PRUNE_FACTOR × fused stops being timed.
PRUNE_AFTER = 3
PRUNE_FACTOR = 2.0


# --------------------------------------------------------------------------------------------
# onnxruntime: sessions and latency
# --------------------------------------------------------------------------------------------


def ort_session(
    path: str | os.PathLike[str] | bytes, threads: int | None = None, *, hint: str = "try another --opset"
) -> Any:
    """An onnxruntime CPU session (``threads`` intra-op threads, else onnxruntime's default) on a
    file, or on a serialized model given as ``bytes`` (the same options either way); ``hint`` goes with
    the error when onnxruntime cannot load it."""
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
        name = "the in-memory graph" if isinstance(path, bytes) else Path(path).name
        raise ExportError(f"onnxruntime cannot load {name}: {first_line(exc)[:300]}", hint) from None


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


def _latency_feed(session: Any, input_shape: InputShape | Sequence[int]) -> dict[str, np.ndarray]:
    """One seeded clip for ``session``: raw uint8 frames where the graph takes ``tensor(uint8)``, else float32."""
    raw = session.get_inputs()[0].type == "tensor(uint8)"
    x = make_model_input(normalize_input_shape(input_shape), torch.uint8 if raw else torch.float32, seed=7)
    return {i.name: t.numpy() for i, t in zip(session.get_inputs(), input_tensors(x))}


def _timed_run(session: Any, feed: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def _fill_latency(stats: GraphStats, times: Sequence[float]) -> None:
    if times:
        stats.latency_all_ms = [t * 1e3 for t in times]
        stats.latency_ms = statistics.median(stats.latency_all_ms)
        stats.latency_runs = len(times)


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
# Execution plan measured in onnxruntime
# --------------------------------------------------------------------------------------------


def _layer_graph(module: nn.Module, shape: Sequence[int], opset: int) -> bytes:
    """One export module traced to a serialized ONNX model (in memory), post-processed as in export."""
    onnx = _import_onnx()
    buffer = io.BytesIO()
    example = make_input(shape, torch.float32, seed=0)
    _torch_export(module, example, buffer, opset, (), 1, what="a layer", hint="try another --opset")
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
    input_shape: InputShape | Sequence[int],
    *,
    container: str = "list",
    input_dtype: torch.dtype = torch.float32,
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
    (``planner.trace_layer_inputs``; ``input_dtype``: the model input's, ``torch.uint8`` for raw frames;
    the layers themselves see the float activations the model makes of it), each form of that one layer is exported (:func:`export_module`,
    the module a full export would use) to an in-memory ONNX model and loaded into a CPU session
    with the options :func:`ort_session` uses for latency (``threads``). ``timer`` times the forms
    (the default, :func:`_time_sessions`: round-robin, fastest run of ``repeats`` rounds after
    ``warmup``, on the wall clock; tests pass fixed times), and a non-fused form replaces fused only
    when it is faster by ``planner.MEASURE_MARGIN`` (``planner.choose_measured_form``, as in
    ``plan_model(measure=True)``). ``measured`` holds seconds per form (a pruned form: its fastest
    before it was dropped); ``predicted`` is the PyTorch-CPU cost model's, for comparison.
    ``progress(i, n, layer_name)`` is called after each layer. ``model`` is not modified.
    """
    from ..functional.cost import form_cost, predict_seconds
    from ..planner import (
        ExecutionPlan,
        LayerChoice,
        choose_measured_form,
        trace_layer_inputs,
    )

    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ConfigError(f"unknown execution forms {unknown}", f"use {', '.join(FORMS)}")
    if repeats < 1 or warmup < 0:
        raise ConfigError("planning needs repeats ≥ 1 and warmup ≥ 0", "e.g. repeats=6")
    check_opset(opset)
    _import_onnx()
    _import_ort()
    forms = tuple(dict.fromkeys(("fused", *forms)))
    shapes = trace_layer_inputs(model, input_shape, input_dtype, container=container)
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
    return ExecutionPlan(normalize_input_shape(input_shape), ORT_DEVICE, "float32", True, choices)
