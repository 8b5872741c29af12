"""``stjfd report``: parameters, MACs, inference and training memory, and what fits in a budget."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.markup import escape

from ..config import ConvertConfig
from ..errors import ConfigError
from ..inputs import format_input_shape, pathway_shapes, primary_shape
from . import render
from .app import app, guarded
from .options import (
    ArchOption,
    InputDtypeOption,
    InputLayoutOption,
    InputShapeOption,
    ModelKwargsOption,
    ModelOption,
    NonStrictOption,
    TrustCodeOption,
    TrustPickleOption,
    input_shape_value,
)
from .render import FitTable as Table  # wraps rather than cuts on a narrow terminal

MIB = 2**20


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / MIB:,.1f}"


def _gmacs(n: int) -> str:
    return f"{n / 1e9:,.2f}"


@contextlib.contextmanager
def _status(enabled: bool) -> Iterator[Callable[[str], None] | None]:
    if not enabled:
        yield None
        return
    with render.stderr.status("measuring") as status:
        yield lambda text: status.update(f"measuring: {escape(text)}")


def _model_table(report: Any) -> Table:
    from ..report import DTYPE_BYTES

    t, inf = report.totals, report.inference
    table = Table(title="Model: original vs converted", header_style="bold")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("converted", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("parameters", f"{t.params_original:,}", f"{t.params_converted:,}", f"{t.param_ratio:.3f}")
    for dtype in DTYPE_BYTES:
        table.add_row(f"MiB at {dtype}", _mib(t.bytes_original(dtype)), _mib(t.bytes_converted(dtype)), f"{t.param_ratio:.3f}")
    table.add_row("GMACs per clip", _gmacs(t.macs_original), _gmacs(t.macs_converted), f"{t.mac_ratio:.3f}")
    ratio = inf.converted.peak_bytes / max(1, inf.original.peak_bytes)
    table.add_row(
        f"peak inference activations MiB (batch {primary_shape(report.input_shape)[0]}, {inf.converted.device})",
        _mib(inf.original.peak_bytes), _mib(inf.converted.peak_bytes), f"{ratio:.3f}",
    )
    return table


def _form_table(report: Any) -> Table:
    from ..layers import FORMS

    table = Table(title="Every decomposed layer in one execution form", header_style="bold")
    table.add_column("form")
    table.add_column("GMACs per clip", justify="right")
    table.add_column("peak inference activations MiB (meta)", justify="right")
    for form in FORMS:
        table.add_row(form, _gmacs(report.totals.macs_by_form[form]), _mib(report.inference.by_form[form]))
    return table


def _layer_table(report: Any) -> Table:
    table = Table(title="Layers (per clip)", header_style="bold")
    table.add_column("layer")
    table.add_column("kernel")
    table.add_column("atoms")
    table.add_column("mode (form)")
    table.add_column("params orig → conv", justify="right")
    table.add_column("GMACs orig → conv", justify="right")
    table.add_column("output MiB", justify="right")
    for row in report.layers:
        kernel = "×".join(map(str, row.kernel_size)) if row.kernel_size else "linear"
        atoms = f"{row.atoms[0]}×{row.atoms[1]}" if row.atoms else "—"
        mode = row.mode or "—"
        if row.mode and row.form and row.form != row.mode:
            mode = f"{row.mode} ({row.form})"
        table.add_row(
            escape(row.name), kernel, atoms, mode,
            f"{row.params_original:,} → {row.params_converted:,}",
            f"{_gmacs(row.macs_original)} → {_gmacs(row.macs_converted)}",
            _mib(row.output_bytes),
        )
    return table


def _training_table(report: Any) -> Table:
    s = report.settings
    table = Table(
        title=f"Training memory, MiB (batch {primary_shape(report.input_shape)[0]}, {s['optimizer']}, s={s['spatial_downsample']}, "
        f"r={s['temporal_downsample']}, {s['device']})",
        header_style="bold",
    )
    table.add_column("schedule")
    table.add_column("clip T×H×W")
    table.add_column("trainable", justify="right")
    table.add_column("saved activations", justify="right")
    table.add_column("analytic (measured÷)", justify="right")
    table.add_column("saved weights", justify="right")
    table.add_column("params+grads+optim", justify="right")
    table.add_column("total", justify="right")
    table.add_column("live peak", justify="right")
    table.add_column("step s", justify="right")
    cuda = any(e.memory.peak_cuda_bytes is not None for e in report.training)
    if cuda:
        table.add_column("CUDA peak", justify="right")
    for entry in report.training:
        m = entry.memory
        analytic = "—"
        if entry.analytic_activation_bytes:
            analytic = f"{_mib(entry.analytic_activation_bytes)} {entry.analytic_factor} (×{entry.analytic_ratio:.3f})"
        cells = [
            escape(entry.label),
            " + ".join("×".join(map(str, one[2:])) for one in pathway_shapes(m.input_shape)),
            f"{m.trainable_params:,}",
            _mib(m.saved_activation_bytes),
            analytic,
            _mib(m.saved_weight_bytes),
            _mib(m.param_bytes + m.grad_bytes + m.optimizer_bytes),
            _mib(m.total_bytes),
            _mib(m.peak_live_bytes) if m.peak_live_bytes is not None else "—",
            f"{m.step_seconds_median:.3f}" if m.step_seconds_median is not None else "—",
        ]
        if cuda:
            cells.append(_mib(m.peak_cuda_bytes))
        table.add_row(*cells)
    return table


def _fits_table(fits: Any) -> Table:
    table = Table(
        title=f"What fits in {_mib(fits.budget_bytes)} MiB at {fits.frame_size}² frames "
        f"(s={fits.spatial_downsample}, r={fits.temporal_downsample}, measured on {fits.device})",
        header_style="bold",
    )
    table.add_column("schedule")
    table.add_column(f"longest clip (batch {fits.batch})", justify="right")
    table.add_column("MiB at it / +1 frame", justify="right")
    table.add_column("fit predicted", justify="right")
    table.add_column(f"largest batch ({fits.frames} frames)", justify="right")
    table.add_column("MiB at it / +1", justify="right")
    for answer in fits.answers:
        label = answer.label + (f" [dim]({answer.deciding_stage} stage decides)[/]" if answer.deciding_stage else "")
        clip, batch = answer.clip, answer.batch
        table.add_row(
            label,
            str(clip.answer) + ("+" if clip.capped else ""),
            f"{_mib(clip.answer_bytes)} / {_mib(clip.above_bytes)}",
            "—" if clip.predicted is None else str(clip.predicted),
            str(batch.answer) + ("+" if batch.capped else ""),
            f"{_mib(batch.answer_bytes)} / {_mib(batch.above_bytes)}",
        )
    return table


def _render(report: Any) -> None:
    out = render.stdout
    out.print(f"[bold]report[/] {escape(report.source)} at {format_input_shape(report.input_shape)} (B×C×T×H×W)")
    out.print(_model_table(report))
    out.print(_form_table(report))
    out.print(_layer_table(report))
    if report.training:
        out.print(_training_table(report))
        best = min(report.training, key=lambda e: e.memory.budget_bytes)
        out.print(f"[bold]least training memory[/]: {escape(best.label)} ({_mib(best.memory.budget_bytes)} MiB peak)")
    if report.fits is not None:
        out.print(_fits_table(report.fits))
        cross = report.fits.cross_check
        if cross:
            same = "equal" if cross["meta_bytes"] == cross["cpu_bytes"] else "[red]differ[/]"
            out.print(
                f"[dim]meta vs CPU at {format_input_shape(cross['input_shape'])}: {cross['meta_bytes']:,} vs "
                f"{cross['cpu_bytes']:,} bytes ({same})[/]"
            )
    for note in report.notes:
        out.print(f"[dim]note:[/] {escape(note)}")


@app.command()
@guarded
def report(
    source: Optional[Path] = typer.Argument(
        None, help="converted folder (from `stjfd convert`) or checkpoint; omit with --arch for fresh weights"
    ),
    arch: ArchOption = None,
    model: ModelOption = None,
    model_kwargs: ModelKwargsOption = None,
    atoms: Optional[int] = typer.Option(None, "--atoms", help="checkpoint input: spatial atoms per layer (default 6)"),
    temporal_atoms: Optional[int] = typer.Option(None, "--temporal-atoms", help="checkpoint input: temporal atoms"),
    mode: Optional[str] = typer.Option(None, "--mode", help="execution mode of the decomposed layers to report"),
    trust_pickle: TrustPickleOption = False,
    non_strict: NonStrictOption = False,
    input_shape: InputShapeOption = None,
    input_layout: InputLayoutOption = None,
    input_dtype: InputDtypeOption = None,
    spatial_downsample: int = typer.Option(2, "--spatial-downsample", "-s", help="temporal stage: frames H/s × W/s"),
    temporal_downsample: int = typer.Option(2, "--temporal-downsample", "-r", help="spatial stage: T/r frames"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (momentum) | adamw"),
    steps: int = typer.Option(3, "--steps", help="timed training steps per schedule (median reported)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    no_training: bool = typer.Option(False, "--no-training", help="skip the training-memory measurements"),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="e.g. 8GiB: what fits in it"),
    size: Optional[int] = typer.Option(None, "--size", help="frame size for --memory-budget (default: input H)"),
    markdown_file: Optional[Path] = typer.Option(None, "--markdown", help="also write the report as Markdown"),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="also write a PNG (parameters, memory vs clip)"),
    force: bool = typer.Option(False, "--force", help="replace --markdown/--plot files stjfd wrote (never other files)"),
    trust_code: TrustCodeOption = False,
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Measured savings: parameters, MACs, inference and training memory, and what fits in a budget.

    --input-shape is in the model's --input-layout (default: what the folder records, else BCTHW)."""
    import torch

    from ..atomic import check_output
    from ..layers import MODES, DecomposedConv3d
    from ..layouts import check_given_format
    from ..models import model_source_paths, parse_model_kwargs
    from ..report import (
        load_report_input,
        memory_report,
        parse_bytes,
        write_markdown,
        write_plot,
    )

    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    layout, dtype = check_given_format(input_layout, input_dtype)
    shape = input_shape_value(input_shape)
    if shape is not None:
        from ..inputs import check_clip_shapes

        check_clip_shapes(shape)
    if mode is not None and mode not in MODES:
        raise ConfigError(f"unknown --mode {mode!r}", f"use one of {', '.join(MODES)}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown --device {device!r}", "use auto, cpu or cuda")
    resolved_device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    inputs = [*([source] if source is not None else []), *model_source_paths(model)]
    for target, kind in ((markdown_file, "markdown"), (plot_file, "png")):
        if target is not None:
            check_output(target, kind, force=force, inputs=inputs)
    if source is None and arch is None and model is None:
        raise ConfigError("no model given", "pass a converted folder, a checkpoint, or --arch NAME")

    config = ConvertConfig(spatial_atoms=atoms, temporal_atoms=temporal_atoms, **({"mode": mode} if mode else {}))
    loaded = load_report_input(
        source, config=config, arch=arch, model=model, model_kwargs=parse_model_kwargs(model_kwargs),
        trust_pickle=trust_pickle, strict=not non_strict, trust_code=trust_code,
    )
    if mode is not None:
        for module in loaded.converted.modules():
            if isinstance(module, DecomposedConv3d):
                module.mode = mode
    layout = layout or loaded.layout or "BCTHW"
    if shape is None and loaded.input_shape is not None:
        from ..layouts import from_bcthw, to_bcthw

        # The recorded shape, re-laid out only when the folder records the layout it is in.
        shape = loaded.input_shape
        if loaded.layout is not None:
            shape = from_bcthw(to_bcthw(shape, loaded.layout), layout)
    if shape is None:
        raise ConfigError("the input shape of this model is unknown", "pass --input-shape B,C,T,H,W")
    with _status(not as_json and render.stderr.is_terminal) as progress:
        result = memory_report(
            loaded.converted, shape, original=loaded.original, source=loaded.source,
            spatial_downsample=spatial_downsample, temporal_downsample=temporal_downsample, optimizer=optimizer,
            device=resolved_device, steps=steps, training=not no_training, memory_budget=budget, frame_size=size,
            progress=progress, container=loaded.container, layout=layout,
            input_dtype=dtype or loaded.dtype or "float32",
        )
    result.notes[:0] = loaded.notes
    if markdown_file is not None:
        write_markdown(result, markdown_file, force=force, inputs=inputs)
    if plot_file is not None:
        write_plot(result, plot_file, force=force, inputs=inputs)
    if as_json:
        render.print_json(result.to_dict())
        return
    _render(result)
    for label, target in (("markdown", markdown_file), ("plot", plot_file)):
        if target is not None:
            render.stdout.print(f"[bold green]wrote[/] {label} {escape(str(target))}")
