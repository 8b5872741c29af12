"""``stjfd swap``: dilate or resize the atoms of a converted model, coefficients unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from ..inputs import format_input_shape
from . import render
from .app import app, command_line, guarded
from .options import JsonOption, ModelOption, TrustCodeOption, TrustPickleOption
from .render import FitTable as Table  # wraps rather than cuts on a narrow terminal


def _padding(value: Any) -> str:
    return value if isinstance(value, str) else ",".join(map(str, value))


def _render_swap(result: Any) -> None:
    out = render.stdout
    title = f"atom swap: {escape(str(result.source))} → {escape(str(result.output))}"
    table = Table(title=title, header_style="bold")
    for column in ("layer", "kernel", "dilation", "padding", "swapped", "atom energy ×"):
        table.add_column(column, justify="right" if column == "atom energy ×" else "left")
    for layer in result.report.swapped:
        pairs = (("Ψ", layer.temporal_energy), ("Φ", layer.spatial_energy))
        energies = [f"{label} {value:.3f}" for label, value in pairs if value is not None]
        table.add_row(
            escape(layer.name),
            f"{'×'.join(map(str, layer.kernel_before))} → {'×'.join(map(str, layer.kernel_after))}",
            f"{layer.dilation_before[0]} → {layer.dilation_after[0]}",
            f"{_padding(layer.padding_before)} → {_padding(layer.padding_after)}",
            escape("; ".join(layer.applied)),
            " ".join(energies),
        )
    out.print(table)
    for name, reason in result.report.skipped:
        out.print(f"[yellow]skipped[/] {escape(name)}: {escape(reason)}")
    for note in result.report.notes + result.notes:
        out.print(f"[dim]note:[/] {escape(note)}")
    if result.output_shape is not None:
        out.print(
            f"[bold]check[/]: a {format_input_shape(result.input_shape)} clip still gives "
            f"{'×'.join(map(str, result.output_shape))} outputs"
        )
    out.print(
        f"[bold green]saved[/] {escape(str(result.output))}/ ({len(result.report.swapped)} layers swapped, "
        f"{result.parameters_before:,} → {result.parameters_after:,} parameters)"
    )


@app.command()
@guarded
def swap(
    directory: Path = typer.Argument(..., help="converted folder (from stjfd convert, or a run's best/ or last/)"),
    temporal_dilation: Optional[int] = typer.Option(
        None, "--temporal-dilation", help="dilate the temporal atoms' conv by this factor (2: video played 2× slower)"
    ),
    temporal_size: Optional[int] = typer.Option(
        None, "--temporal-size", help="interpolate each temporal atom to this many taps"
    ),
    spatial_size: Optional[int] = typer.Option(None, "--spatial-size", help="interpolate each spatial atom to N×N taps"),
    normalization: str = typer.Option(
        "sum", "--normalization", help="resized atoms keep their mean tap (sum: taps × L/n) or L2 norm (energy)"
    ),
    include: List[str] = typer.Option([], "--include", help="glob on layer names to swap (repeatable)"),
    exclude: List[str] = typer.Option([], "--exclude", help="glob on layer names to leave alone (repeatable)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output folder (a new converted folder)"),
    force: bool = typer.Option(False, "--force", help="replace an existing converted folder (never anything else)"),
    trust_code: TrustCodeOption = False,
    trust_pickle: TrustPickleOption = False,
    model: ModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replace each decomposed layer's atoms by dilated or resized ones; the coefficients stay as trained."""
    from ..config import SwapConfig
    from ..errors import ConfigError
    from ..swap import swap_folder

    config = SwapConfig(
        temporal_dilation=temporal_dilation, temporal_size=temporal_size, spatial_size=spatial_size,
        normalization=normalization, include=tuple(include), exclude=tuple(exclude),
    )
    if output is None:
        raise ConfigError("stjfd swap needs an output folder", f"pass -o DIR, e.g. -o {directory.name}-swapped")
    result = swap_folder(
        directory, output, config, force=force, trust_code=trust_code, trust_pickle=trust_pickle, model=model,
        command=command_line(),
    )
    if as_json:
        render.print_json(result.to_dict())
    else:
        _render_swap(result)
