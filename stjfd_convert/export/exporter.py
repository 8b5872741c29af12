"""``export_onnx``, the one entry point the CLI uses: load, choose the forms, write the graph in a
staging folder, validate, time, publish."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .. import __version__
from ..atomic import check_output, make_staging_dir
from ..convert import densify
from ..errors import ConfigError
from ..models import model_source_paths
from ..parity import flatten_outputs, make_input, run_model
from .base import (
    DEFAULT_ATOL,
    DEFAULT_CLIPS,
    DEFAULT_OPSET,
    DEFAULT_RUNS,
    DEFAULT_WARMUP,
    EXPORT_MODES,
    EXPORTER,
    FP16_ATOL,
    LAYOUT,
    META_PREFIX,
    ExportValidationError,
    _import_onnx,
    _import_ort,
    check_opset,
    parse_dynamic_axes,
)
from .graph import _graph_stats, _write_graph
from .modules import _decomposed_layers, _export_friendly, resolve_forms
from .results import ExportResult
from .runtime import DEFAULT_PLAN_REPEATS, PLAN_BLOCK, _time_interleaved, ort_session, plan_onnxruntime
from .source import _load_source, _normalization
from .validate import validate_onnx, validation_shapes


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
        from ..planner import apply_plan, save_plan

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
