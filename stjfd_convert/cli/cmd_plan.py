"""``stjfd plan``: measure every execution form per layer and store the fastest in the manifest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ..inputs import format_input_shape
from . import render
from .app import app, guarded
from .options import InputDtypeOption, InputLayoutOption, InputShapeOption, TrustCodeOption, input_shape_value
from .render import FitTable as Table  # wraps rather than cuts on a narrow terminal


@app.command()
@guarded
def plan(
    directory: Path = typer.Argument(..., help="converted-model folder (from stjfd convert)"),
    input_shape: InputShapeOption = None,
    input_layout: InputLayoutOption = None,
    input_dtype: InputDtypeOption = None,
    device: str = typer.Option("cpu", "--device", help="cpu | cuda"),
    repeats: int = typer.Option(5, "--repeats", help="timed runs per form and layer (median)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="measure and show, do not write the manifest"),
    trust_code: TrustCodeOption = False,
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Time fused / factorized / sandwich / spatial_first / temporal_first per layer; keep the fastest.

    The timing clip is --input-shape in the model's --input-layout and --input-dtype, each defaulting to
    what the folder's manifest records."""
    from ..config import check_device
    from ..layouts import folder_input
    from ..workflows import plan_converted

    check_device(device)  # `--device cuda` without a GPU: refused before anything is read
    shape, layout, dtype = folder_input(directory, input_shape_value(input_shape), input_layout, input_dtype)
    with render.step_progress(not as_json and render.stderr.is_terminal, "measuring") as progress:
        result, path = plan_converted(
            directory, shape, device=device, repeats=repeats, input_dtype=dtype, save=not dry_run,
            trust_code=trust_code, progress=progress,
        )
    if as_json:
        render.print_json({**result.to_dict(), "input_layout": layout, "input_dtype": dtype,
                           "manifest": str(path) if path else None})
        return
    forms = list(result.layers[0].measured) if result.layers else []
    clip = format_input_shape(result.input_shape)
    if (layout, dtype) != ("BCTHW", "float32"):
        clip += f" {layout} {dtype}"
    table = Table(title=f"execution plan for {clip} on {result.device}")
    table.add_column("layer")
    table.add_column("input")
    for form in forms:
        table.add_column(f"{form} ms", justify="right")
    table.add_column("chosen")
    total_fused = total_chosen = 0.0
    for choice in result.layers:
        measured = choice.measured or {}
        total_fused += measured.get("fused", 0.0)
        total_chosen += measured.get(choice.form, 0.0)
        table.add_row(
            escape(choice.name),
            "×".join(map(str, choice.input_shape[1:])),
            *[f"{measured[f] * 1000:.1f}" for f in forms],
            choice.form,
        )
    render.stdout.print(table)
    if total_fused:
        render.stdout.print(
            f"[bold]decomposed convs[/]: {total_fused * 1000:.1f} ms fused → {total_chosen * 1000:.1f} ms planned "
            f"({total_chosen / total_fused:.2f}×)"
        )
    if path is not None:
        render.stdout.print(f"[bold green]saved[/] plan in {escape(str(path))} (layers now run in mode auto)")
