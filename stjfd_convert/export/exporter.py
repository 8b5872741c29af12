"""``export_onnx``, the one entry point the CLI uses: check the options, load the model, choose the
forms, write the graph in a staging folder, validate, time, publish."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import __version__
from ..atomic import check_output, make_staging_dir
from ..convert import densify
from ..errors import ConfigError
from ..inputs import InputShape, format_input_shape, make_model_input, normalize_input_shape, pathway_shapes
from ..layouts import ONNX_LAYOUTS
from ..models import model_source_paths
from ..parity import check_input_memory, flatten_outputs, parse_dtype, run_model
from .base import (
    DEFAULT_ATOL,
    DEFAULT_CLIPS,
    DEFAULT_OPSET,
    DEFAULT_RUNS,
    DEFAULT_WARMUP,
    EXPORT_MODES,
    EXPORTER,
    FP16_ATOL,
    META_PREFIX,
    ExportValidationError,
    _import_onnx,
    _import_ort,
    check_opset,
    parse_dynamic_axes,
)
from .graph import _graph_stats, _write_graph
from .modules import _decomposed_layers, _export_friendly, resolve_forms
from .results import ExportResult, GraphStats, ValidationReport
from .runtime import (
    DEFAULT_PLAN_REPEATS,
    PLAN_BLOCK,
    _time_interleaved,
    ort_session,
    plan_onnxruntime,
)
from .source import _load_source, _normalization, _Source
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


@dataclass(frozen=True)
class _Options:
    """What one export was asked for, checked (everything but the model and the output path)."""

    mode: str
    measure: bool
    measure_repeats: int
    opset: int
    dynamic: tuple[str, ...]
    fp16: bool
    atol: float  # the tolerance validation uses: --atol, else DEFAULT_ATOL / FP16_ATOL
    validate: bool
    clips: int
    compare: bool
    runs: int
    warmup: int
    threads: int | None
    layout: str = "BCTHW"  # how the model takes a clip (the dynamic axes' positions follow it)
    dtype: str = "float32"  # float32 | uint8 (the graph's input type)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def needs_onnxruntime(self) -> bool:
        return self.validate or self.runs > 0 or self.compare or self.measure

    def without_onnxruntime(self) -> str:
        """The export command's flags that would make it run without onnxruntime."""
        steps = [("pass --no-validate", self.validate), ("pass --runs 0", self.runs > 0),
                 ("drop --compare", self.compare), ("drop --measure", self.measure)]
        return " and ".join(step for step, needed in steps if needed)


def _check_options(
    *,
    mode: str,
    measure: bool,
    measure_repeats: int,
    opset: int,
    dynamic_axes: str | Sequence[str] | None,
    fp16: bool,
    atol: float | None,
    validate: bool,
    clips: int,
    compare: bool,
    runs: int,
    warmup: int,
    threads: int | None,
) -> _Options:
    """``export_onnx``'s options checked before any work; a bad one raises ConfigError naming its flag."""
    check_opset(opset)
    dynamic = parse_dynamic_axes(dynamic_axes)
    if mode not in EXPORT_MODES:
        raise ConfigError(f"unknown --mode {mode!r}", f"use one of {', '.join(EXPORT_MODES)}")
    if clips < 1:
        raise ConfigError(f"--clips must be ≥ 1, got {clips}", "e.g. --clips 3")
    if runs < 0:
        raise ConfigError(f"--runs must be ≥ 0, got {runs}", "e.g. --runs 10 (0: no timing)")
    if warmup < 0:
        raise ConfigError(f"warmup must be ≥ 0, got {warmup}", "e.g. warmup=3 (untimed runs before timing)")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be ≥ 1, got {threads}", "e.g. --threads 2, or leave it out")
    if measure and mode != "auto":
        raise ConfigError(f"--measure plans the forms of --mode auto, not --mode {mode}", "drop --measure, or use --mode auto")
    if measure and measure_repeats < 1:
        raise ConfigError(f"--measure-repeats must be ≥ 1, got {measure_repeats}", "e.g. --measure-repeats 6")
    tolerance = float(atol) if atol is not None else (FP16_ATOL if fp16 else DEFAULT_ATOL)
    if not tolerance > 0:
        raise ConfigError(f"--atol must be > 0, got {atol}", "e.g. --atol 1e-4")
    return _Options(
        mode, measure, measure_repeats, opset, dynamic, fp16, tolerance, validate, clips, compare, runs, warmup, threads
    )


def _export_shape(
    source: _Source, input_shape: InputShape | Sequence[int] | None, dynamic: Sequence[str], layout: str = "BCTHW"
) -> InputShape:
    """``--input-shape`` (in the model's ``layout``), else the shape the source records (re-laid out if it
    records another layout) or its architecture's default."""
    from ..layouts import relaid

    shape = normalize_input_shape(input_shape) if input_shape else relaid(source.input_shape, source.manifest, layout)
    if shape is None:
        raise ConfigError(
            "the export input shape is unknown for this model", "pass --input-shape, e.g. --input-shape 1,3,16,112,112"
        )
    if dynamic and any(len(one) != 5 for one in pathway_shapes(shape)):
        raise ConfigError(
            f"--dynamic needs a 5-D input ({layout}), got {format_input_shape(shape)}",
            "pass a 5-D --input-shape",
        )
    return shape


@dataclass
class _ChosenForms:
    """The form of every decomposed layer and where it came from (with ``measure``: the plan)."""

    forms: dict[str, str]
    source: str
    plan: Any = None  # the ExecutionPlan measured in onnxruntime now
    seconds: float = 0.0
    saved: Path | None = None  # the manifest it was stored in


def _choose_forms(
    work: nn.Module, source: _Source, shape: InputShape, options: _Options, step: Callable[[str], None]
) -> _ChosenForms:
    """Set (in place) the form of every decomposed layer of ``work``: measured in onnxruntime now
    (``measure``; stored in a converted folder's manifest), else :func:`resolve_forms`."""
    if not (options.measure and _decomposed_layers(work)):
        forms, plan_source = resolve_forms(
            work, options.mode, shape, source.manifest, source.container, input_dtype=options.torch_dtype
        )
        return _ChosenForms(forms, plan_source)
    from ..planner import apply_plan, save_plan

    began = time.perf_counter()
    plan = plan_onnxruntime(
        work, shape, container=source.container, input_dtype=options.torch_dtype, repeats=options.measure_repeats,
        threads=options.threads, opset=options.opset,
        progress=lambda i, n, name: step(f"measured layer {i}/{n} ({name}) in onnxruntime"),
    )
    seconds = time.perf_counter() - began
    apply_plan(work, plan, mode="fixed")
    threads_text = f"{options.threads} threads" if options.threads else "default threads"
    rounds = f"fastest of {options.measure_repeats} rounds × {PLAN_BLOCK} runs per form"
    saved = save_plan(source.directory, plan) if source.directory is not None else None
    return _ChosenForms(dict(plan.modes), f"measured in onnxruntime now ({threads_text}, {rounds})", plan, seconds, saved)


def _metadata(
    source: _Source,
    forms: Mapping[str, str],
    shape: InputShape,
    options: _Options,
    normalization: Mapping[str, Sequence[float]] | None,
) -> dict[str, str]:
    """The ``stjfd.*`` metadata the graph carries: how it was exported and what ``predict`` needs."""
    metadata = {
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}mode": options.mode,
        f"{META_PREFIX}forms": json.dumps(forms),
        f"{META_PREFIX}input_shape": format_input_shape(shape, ",").replace(" + ", "+"),
        f"{META_PREFIX}layout": ONNX_LAYOUTS[options.layout],
        f"{META_PREFIX}input_dtype": options.dtype,
        f"{META_PREFIX}dynamic_axes": ",".join(options.dynamic),
        f"{META_PREFIX}fp16_weights": str(bool(options.fp16)).lower(),
    }
    if len(pathway_shapes(shape)) > 1:
        metadata[f"{META_PREFIX}input_container"] = source.container
        if source.pathway_strides:
            metadata[f"{META_PREFIX}pathway_strides"] = ",".join(map(str, source.pathway_strides))
    if source.spec is not None:
        metadata[f"{META_PREFIX}architecture"] = json.dumps(source.spec.to_dict())
    if normalization is not None:
        metadata[f"{META_PREFIX}mean"] = ",".join(repr(float(m)) for m in normalization["mean"])
        metadata[f"{META_PREFIX}std"] = ",".join(repr(float(s)) for s in normalization["std"])
    clip = ((source.manifest or {}).get("finetune") or {}).get("clip")
    if isinstance(clip, Mapping) and clip.get("resize_mode") == "stretch":
        metadata[f"{META_PREFIX}resize_mode"] = "stretch"  # predict decodes frames as fine-tuning did
    classes = ((source.manifest or {}).get("finetune") or {}).get("classes")
    if isinstance(classes, list) and all(isinstance(c, str) for c in classes):
        metadata[f"{META_PREFIX}classes"] = json.dumps(classes)  # class names a fine-tuning run trained on
    return metadata


#: Forms whose ONNX graph stores a weight rebuilt from the atoms (fused: the dense W; spatial_first: A·Ψ;
#: temporal_first: A·Φ) rather than the atoms and coefficients themselves (factorized, sandwich).
_REBUILT_WEIGHT_FORMS = ("fused", "spatial_first", "temporal_first")


def _size_note(stats: GraphStats, model: nn.Module, forms: Mapping[str, str]) -> str:
    """One line comparing the ONNX file with the converted model, and why it may store more weights."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
    elements = sum(t.numel() for t in tensors)
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    text = (
        f"ONNX file {stats.file_bytes / 2**20:,.2f} MB storing {stats.parameters:,} weights; the converted model: "
        f"{model_bytes / 2**20:,.2f} MB, {elements:,} weights"
    )
    rebuilt = sorted({form for form in forms.values() if form in _REBUILT_WEIGHT_FORMS})
    if rebuilt and stats.parameters > elements:
        count = sum(form in _REBUILT_WEIGHT_FORMS for form in forms.values())
        text += (
            f" — {count} of {len(forms)} decomposed layers run as {'/'.join(rebuilt)}, which store a weight rebuilt "
            "from their atoms; --mode factorized or sandwich stores only atoms and coefficients"
        )
    return text


def _write_and_check(
    onnx: Any,
    work: nn.Module,
    source: _Source,
    staged: Path,
    shape: InputShape,
    options: _Options,
    chosen: _ChosenForms,
    normalization: dict[str, list[float]] | None,
    step: Callable[[str], None],
) -> tuple[ExportResult, list[Path]]:
    """Write ``work`` in its chosen forms to ``staged`` and check it; the result (no path yet) and
    the staged files."""
    example = make_model_input(shape, options.torch_dtype, seed=0, container=source.container)
    # Every form is an exact reformulation of the dense conv (DESIGN.md §2), so the PyTorch reference
    # runs the dense model: the fastest form on CPU, and independent of the export modules under test.
    reference = densify(work)
    reference_outputs = flatten_outputs(run_model(reference, example))
    if not reference_outputs:
        raise ConfigError("the model returned no tensors", "export a model whose forward returns tensors")
    metadata = _metadata(source, chosen.forms, shape, options, normalization)
    step(f"exporting ({EXPORTER} exporter, opset {options.opset})")
    files, external = _write_graph(
        _export_friendly(work, chosen.forms), example, staged, opset=options.opset, dynamic=options.dynamic,
        n_outputs=len(reference_outputs), fp16=options.fp16, metadata=metadata, layout=options.layout,
    )
    stats = _graph_stats(onnx, files)
    validation, original = _validate_and_time(onnx, staged, reference, reference_outputs, example, stats, options, step)
    result = ExportResult(
        path=None,
        source=source.description,
        mode=options.mode,
        forms=chosen.forms,
        plan_source=chosen.source,
        exporter=EXPORTER,
        opset=options.opset,
        input_shape=shape,
        dynamic_axes=options.dynamic,
        fp16=options.fp16,
        external_data=external,
        checker_passed=True,
        stats=stats,
        validation=validation,
        latency_shape=shape,
        threads=options.threads,
        original=original,
        normalization=normalization,
        architecture=source.spec.to_dict() if source.spec else None,
        notes=[_size_note(stats, work, chosen.forms)] if chosen.forms
        else ["the model has no decomposed layers: exported as is (--mode does not apply)"],
        plan=chosen.plan,
        plan_seconds=chosen.seconds,
        plan_saved=chosen.saved,
    )
    return result, files


def _validate_and_time(
    onnx: Any,
    staged: Path,
    reference: nn.Module,
    reference_outputs: list[tuple[str, Tensor]],
    example: Tensor,
    stats: GraphStats,
    options: _Options,
    step: Callable[[str], None],
) -> tuple[ValidationReport | None, GraphStats | None]:
    """Validate the staged file, export the dense original beside it (``compare``) and time both.

    A failed validation skips the rest. The onnxruntime sessions end with this call, before any
    file is moved into place.
    """
    shape = normalize_input_shape(
        tuple(tuple(t.shape) for t in example) if isinstance(example, (list, tuple)) else tuple(example.shape)
    )
    session = None
    validation = None
    if options.validate:
        step("validating with onnxruntime")
        session = ort_session(staged, options.threads)
        validation = validate_onnx(
            staged, reference, validation_shapes(shape, options.dynamic, options.clips, options.layout),
            atol=options.atol, container="tuple" if isinstance(example, tuple) else "list",
            session=session, known={0: reference_outputs},  # clip 0 is the export example (seed 0)
            dtype=options.torch_dtype,
        )
        if not validation.passed:
            return validation, None
    timed = options.runs > 0
    if timed:
        session = session or ort_session(staged, options.threads)
    original = None
    original_session = None
    if options.compare:
        step("exporting the dense original for comparison")
        folder = staged.parent / "original"
        folder.mkdir()
        original_files, _ = _write_graph(
            reference, example, folder / "original.onnx", opset=options.opset, dynamic=options.dynamic,
            n_outputs=len(reference_outputs), fp16=options.fp16, metadata={f"{META_PREFIX}mode": "original"},
            layout=options.layout,
        )
        original = _graph_stats(onnx, original_files)
        if timed:
            original_session = ort_session(original_files[0], options.threads)
    if timed:
        step(f"timing {options.runs} onnxruntime runs" + (" of each model, interleaved" if original_session else ""))
        _time_interleaved(session, original_session, shape, options.runs, options.warmup, stats, original)
    return validation, original


def _validation_failed(result: ExportResult, target: Path, keep_invalid: bool) -> ExportValidationError:
    """The error of a failed validation (exit code 1), carrying the full result."""
    where = f"kept at {target} (--keep-invalid)" if keep_invalid else "no file was written"
    return ExportValidationError(
        f"ONNX validation failed: {result.validation.summary()}",  # type: ignore[union-attr]
        f"{where}; a larger --atol may be justified for --fp16, otherwise report the command",
        result,
    )


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
    input_layout: str | None = None,
    input_dtype: str | None = None,
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

    ``input_layout`` (``BCTHW`` | ``BTHWC`` | ``BTCHW``) and ``input_dtype`` (``float32`` | ``uint8``: the
    graph takes raw frames) default to what a converted folder's manifest records; ``input_shape`` and the
    ``dynamic_axes`` are in that layout, and the metadata records both for ``predict``.
    """
    start = time.perf_counter()
    step = progress or (lambda _: None)
    options = _check_options(
        mode=mode, measure=measure, measure_repeats=measure_repeats, opset=opset, dynamic_axes=dynamic_axes,
        fp16=fp16, atol=atol, validate=validate, clips=clips, compare=compare, runs=runs, warmup=warmup, threads=threads,
    )
    from ..layouts import check_given_format, resolve_input_format

    layout, dtype = check_given_format(input_layout, input_dtype)
    sources = [] if isinstance(model_or_dir, nn.Module) else [model_or_dir, *model_source_paths(model)]
    target = check_output(Path(path), "onnx", force=force, inputs=sources)
    # Fail on a missing dependency before any long work.
    onnx = _import_onnx()
    if options.needs_onnxruntime:
        _import_ort(options.without_onnxruntime())

    step("loading the model")
    source = _load_source(
        model_or_dir, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle,
        trust_code=trust_code,
    )
    layout, dtype = resolve_input_format(source.manifest, layout, dtype)
    options = replace(options, layout=layout, dtype=dtype)
    shape = _export_shape(source, input_shape, options.dynamic, layout)
    check_input_memory(shape)  # a huge --input-shape: refused before it is allocated
    channels = {one[layout.index("C")] for one in pathway_shapes(shape) if len(one) == 5}
    normalization = _normalization(source.spec, mean, std, source.manifest, channels.pop() if len(channels) == 1 else None)
    work = copy.deepcopy(source.model).eval()
    chosen = _choose_forms(work, source, shape, options, step)
    with _staging_dir(target) as staging:
        staged = staging / target.name
        result, files = _write_and_check(onnx, work, source, staged, shape, options, chosen, normalization, step)
        if (layout, dtype) != ("BCTHW", "float32"):
            result.notes.insert(0, f"the graph takes {layout} {dtype} clips ({format_input_shape(shape)}); the "
                                "metadata records both for `stjfd predict`")
        failed = result.validation is not None and not result.validation.passed
        if not failed or keep_invalid:
            final = _publish(files, target)
            result.path = final[0]
            result.stats.files = [f.name for f in final]
            result.kept_invalid = failed
    result.seconds = time.perf_counter() - start
    if failed:
        raise _validation_failed(result, target, keep_invalid)
    return result
