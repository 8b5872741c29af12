"""``stjfd export`` (verified ONNX export) and ``stjfd predict`` (classify a video with an ONNX model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from ..inputs import format_input_shape
from . import render
from .app import app, guarded
from .options import (
    ArchOption,
    InputDtypeOption,
    InputLayoutOption,
    InputShapeOption,
    JsonOption,
    ModelKwargsOption,
    ModelOption,
    NoNormalizeOption,
    PathwayStridesOption,
    ResizeModeOption,
    SizeOption,
    TrustCodeOption,
    TrustPickleOption,
    check_resize_mode,
    input_shape_value,
    parse_size,
)
from .render import FitTable as Table  # wraps rather than cuts on a narrow terminal


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.2f} MB"


def _ms(value: float | None) -> str:
    return f"{value:,.1f} ms" if value is not None else "—"


def _ratio(value: float | None) -> str:
    return f"{value:.3f}×" if value is not None else "—"


def _validation_table(validation: Any) -> Table:
    table = Table(title="onnxruntime vs PyTorch", header_style="bold")
    for column, justify in (("clip", "right"), ("input", "left"), ("output", "left"), ("max abs diff", "right"),
                            ("relative diff", "right"), ("", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for check in validation.checks:
        status = "[green]ok[/]" if check.ok else f"[red]{escape(check.problem or 'over atol')}[/]"
        table.add_row(
            str(check.clip),
            format_input_shape(check.input_shape),
            escape(check.name),
            f"{check.max_abs:.3e}",
            f"{check.rel_diff:.3e}",
            status,
        )
    return table


def _render_export(result: Any, as_json: bool) -> None:
    if as_json:
        render.print_json(result.to_dict())
        return
    out = render.stdout
    counts = ", ".join(f"{n} {form}" for form, n in sorted(result.form_counts.items()))
    # Without decomposed layers the plan source says just that; once is enough.
    forms = f"{counts}; {escape(result.plan_source)}" if counts else "no decomposed layers"
    written = escape(str(result.path)) if result.path else "[red]not kept[/]"
    out.print(
        f"[bold]graph[/]: {written} — mode {result.mode} ({forms}), "
        f"opset {result.opset}, {result.exporter} exporter"
        + (f", dynamic axes {','.join(result.dynamic_axes)}" if result.dynamic_axes else "")
        + (", fp16 weights" if result.fp16 else "")
    )
    if result.plan is not None:
        saved = f", stored in {escape(str(result.plan_saved))}" if result.plan_saved else " (not stored: not a converted folder)"
        out.print(
            f"[bold]plan[/]: {len(result.plan.layers)} layers measured in onnxruntime in {result.plan_seconds:.1f} s{saved}"
        )
    out.print(f"[bold]onnx.checker[/]: {'[green]passed[/]' if result.checker_passed else '[red]failed[/]'}")
    validation = result.validation
    if validation is None:
        out.print("[bold]validation[/]: skipped (--no-validate)")
    else:
        out.print(_validation_table(validation))
        verdict = "[bold green]PASS[/]" if validation.passed else "[bold red]FAIL[/]"
        out.print(
            f"[bold]validation[/]: {verdict} on {len(validation.input_shapes)} random clips at atol "
            f"{validation.atol:.1e}: max abs diff {validation.max_abs:.3e}, max relative diff {validation.rel_diff:.3e}"
            + (f"; {len(validation.mismatches)} of {len(validation.checks)} outputs mismatch" if not validation.passed else "")
        )
    stats = result.stats
    files = " + ".join(escape(f) for f in stats.files)
    out.print(f"[bold]file size[/]: {_mb(stats.file_bytes)} ({files}); [bold]parameters[/]: {stats.parameters:,}")
    shape = format_input_shape(result.latency_shape)
    threads = f"{result.threads} threads" if result.threads else "default threads"
    if stats.latency_ms is not None:
        out.print(
            f"[bold]ORT latency[/]: {_ms(stats.latency_ms)} median of {stats.latency_runs} runs "
            f"({shape} clip, CPU, {threads})"
        )
    if result.original is not None:
        original, ratios = result.original, result.ratios()
        table = Table(title="vs the dense original", header_style="bold")
        for column in ("", "file size", "parameters", "ORT latency"):
            table.add_column(column, justify="right" if column else "left")
        table.add_row("original", _mb(original.file_bytes), f"{original.parameters:,}", _ms(original.latency_ms))
        table.add_row(result.mode, _mb(stats.file_bytes), f"{stats.parameters:,}", _ms(stats.latency_ms))
        table.add_row("ratio", _ratio(ratios.get("file_bytes")), _ratio(ratios.get("parameters")), _ratio(ratios.get("latency")))
        out.print(table)
    if result.normalization:
        mean = ",".join(f"{m:g}" for m in result.normalization["mean"])
        std = ",".join(f"{s:g}" for s in result.normalization["std"])
        out.print(f"[dim]normalisation stored in the metadata: mean {mean}, std {std}[/]")
    for note in result.notes:
        out.print(f"[dim]note:[/] {escape(note)}")


def _floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of numbers", f"e.g. {flag} 0.45,0.45,0.45") from None


@app.command()
@guarded
def export(
    source: Path = typer.Argument(..., help="converted-model folder, or a checkpoint with --arch/--model"),
    onnx: Path = typer.Option(..., "--onnx", help="ONNX file to write"),
    mode: str = typer.Option(
        "auto", help="fused (one Conv per layer) | factorized (atoms + coefficients) | auto (planner's choice per layer) "
        "| sandwich | spatial_first | temporal_first"
    ),
    measure: bool = typer.Option(
        False, "--measure", help="with --mode auto: time every form of every layer in onnxruntime (with --threads) "
        "and export the fastest; a converted folder's manifest keeps the plan for later auto exports"
    ),
    measure_repeats: int = typer.Option(
        6, "--measure-repeats", help="--measure rounds: each form of each layer runs twice per round, the fastest run counts"
    ),
    opset: int = typer.Option(17, help="ONNX opset (11 to the installed exporter's maximum)"),
    dynamic: Optional[str] = typer.Option(
        None, "--dynamic", help="dynamic input axes: any of batch,time,height,width (placed by --input-layout)"
    ),
    input_shape: InputShapeOption = None,
    input_layout: InputLayoutOption = None,
    input_dtype: InputDtypeOption = None,
    fp16: bool = typer.Option(False, "--fp16", help="store weights in float16 (inputs and compute stay float32)"),
    atol: Optional[float] = typer.Option(None, "--atol", help="validation tolerance (default 1e-4; 1e-2 with --fp16)"),
    clips: int = typer.Option(3, "--clips", help="random clips to validate on"),
    no_validate: bool = typer.Option(False, "--no-validate", help="skip the onnxruntime validation"),
    keep_invalid: bool = typer.Option(False, "--keep-invalid", help="keep the file even when validation fails"),
    compare: bool = typer.Option(False, "--compare", help="also export the dense original: size, parameters, latency"),
    runs: int = typer.Option(10, "--runs", help="timed onnxruntime runs for the latency median (0: no timing)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads (default: its own)"),
    mean: Optional[str] = typer.Option(None, "--mean", help="input mean per channel to record, e.g. 0.45,0.45,0.45"),
    std: Optional[str] = typer.Option(None, "--std", help="input std per channel to record"),
    arch: ArchOption = None,
    model: ModelOption = None,
    model_kwargs: ModelKwargsOption = None,
    trust_pickle: TrustPickleOption = False,
    trust_code: TrustCodeOption = False,
    force: bool = typer.Option(False, "--force", help="replace an existing ONNX file stjfd exported (never another file)"),
    as_json: JsonOption = False,
) -> None:
    """Export a model to ONNX and verify it: onnx.checker, onnxruntime vs PyTorch, size and latency."""
    from ..export import ExportValidationError, export_onnx
    from ..models import parse_model_kwargs

    shape = input_shape_value(input_shape)
    try:
        result = export_onnx(
            source,
            onnx,
            mode=mode,
            measure=measure,
            measure_repeats=measure_repeats,
            opset=opset,
            dynamic_axes=dynamic,
            input_shape=shape,
            fp16=fp16,
            atol=atol,
            validate=not no_validate,
            clips=clips,
            compare=compare,
            runs=runs,
            threads=threads,
            keep_invalid=keep_invalid,
            mean=_floats(mean, "--mean"),
            std=_floats(std, "--std"),
            arch=arch,
            model=model,
            model_kwargs=parse_model_kwargs(model_kwargs),
            trust_pickle=trust_pickle,
            trust_code=trust_code,
            force=force,
            input_layout=input_layout,
            input_dtype=input_dtype,
        )
    except ExportValidationError as exc:
        _render_export(exc.result, as_json)  # every mismatch, then the one error line (exit 1)
        raise
    _render_export(result, as_json)


def _render_prediction(prediction: Any, as_json: bool) -> None:
    for warning in getattr(prediction, "warnings", ()):
        render.stderr.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if as_json:
        render.print_json(prediction.to_dict())
        return
    out = render.stdout
    shape = format_input_shape(prediction.input_shape)
    if prediction.playback_speed != 1.0:
        shape += f" at playback speed {prediction.playback_speed:g}"
    if (prediction.input_layout, prediction.input_dtype) != ("BCTHW", "float32"):
        shape += f" {prediction.input_layout} {prediction.input_dtype}"
    if prediction.resize_mode != "crop":
        shape += f", frames {prediction.resize_mode}ed"
    frames = ("raw uint8 frames" if prediction.normalization is None
              else f"normalised with {escape(prediction.normalization_source)}")
    out.print(
        f"[bold]{escape(prediction.video.name)}[/]: centre clip {shape}, {frames}, {prediction.num_classes} classes"
    )
    table = Table(header_style="bold")
    for column, justify in (("rank", "right"), ("class", "right"), ("label", "left"), ("probability", "right"), ("logit", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for entry in prediction.top:
        table.add_row(str(entry["rank"]), str(entry["index"]), escape(entry["label"]), f"{entry['probability']:.4f}",
                      f"{entry['logit']:.4f}")
    out.print(table)


@app.command()
@guarded
def predict(
    model: Path = typer.Argument(..., help="ONNX file written by `stjfd export --onnx`"),
    video: Path = typer.Argument(..., help="video file (.mp4, .avi, .mkv, …)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="text file with one class name per line"),
    top_k: int = typer.Option(5, "--top-k", help="how many classes to show"),
    mean: Optional[str] = typer.Option(None, "--mean", help="input mean per channel (default: the model's metadata)"),
    std: Optional[str] = typer.Option(None, "--std", help="input std per channel (default: the model's metadata)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads"),
    playback_speed: float = typer.Option(
        1.0, "--playback-speed", help="resample the clip's frames: 0.5 = video slowed 2×, 2 = sped up 2×"
    ),
    pathway_strides: PathwayStridesOption = None,
    input_layout: InputLayoutOption = None,
    input_dtype: InputDtypeOption = None,
    size: SizeOption = None,
    resize_mode: ResizeModeOption = None,
    no_normalize: NoNormalizeOption = False,
    as_json: JsonOption = False,
) -> None:
    """Classify the centre clip of a video with an exported ONNX model (onnxruntime, CPU); layout, dtype and
    frame size default to what the graph and its metadata say."""
    from ..export import predict as run_predict
    from ..inputs import parse_pathway_strides

    prediction = run_predict(
        model, video, labels=labels, top_k=top_k, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), threads=threads,
        playback_speed=playback_speed, pathway_strides=parse_pathway_strides(pathway_strides),
        input_layout=input_layout, input_dtype=input_dtype, size=parse_size(size),
        resize_mode=check_resize_mode(resize_mode), normalize=not no_normalize,
    )
    _render_prediction(prediction, as_json)
