"""``stjfd compare``: how close a converted model stays to its original on held-out clips."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from . import render
from .app import app, guarded
from .cmd_finetune import _parse_triple
from .options import (
    ArchOption,
    InputDtypeOption,
    InputLayoutOption,
    JsonOption,
    ModelKwargsOption,
    ModelOption,
    NoNormalizeOption,
    ResizeModeOption,
    SizeOption,
    TrustCodeOption,
    TrustPickleOption,
    check_resize_mode,
    parse_size,
)
from .render import FitTable as Table  # wraps rather than cuts on a narrow terminal


def _num(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _render(result: Any) -> None:
    table = Table(title=f"converted vs original on {result.clips} clips", header_style="bold")
    for column in ("output", "shape", "rel. error", "cosine", "top-1 agreement", "events P / R / F1"):
        table.add_column(column, justify="left" if column in ("output", "shape") else "right")
    for o in result.outputs:
        events = "—"
        if o.events is not None:
            e = o.events
            events = f"{_num(e.precision)} / {_num(e.recall)} / {_num(e.f1)} ({e.original_events} events)"
        table.add_row(escape(o.name), "×".join(map(str, o.shape)), f"{o.rel_error:.3e}", f"{o.cosine:.4f}",
                      _num(o.top1_agreement, ".1%"), events)
    render.stdout.print(table)
    render.stdout.print(
        f"[dim]events: onsets of p ≥ {result.threshold} matched within ±{result.tolerance} frames; "
        f"{result.seconds:.1f} s[/]"
    )
    for path, reason in result.skipped:
        render.stdout.print(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}")


@app.command()
@guarded
def compare(
    original: Path = typer.Argument(..., help="the original: a checkpoint (or a converted folder)"),
    converted: Path = typer.Argument(..., help="the converted folder (from convert, swap, or a run's best/)"),
    clips: Path = typer.Argument(..., help="folder of held-out videos (searched recursively, no labels needed)"),
    # How ORIGINAL is loaded (a checkpoint defaults to the architecture CONVERTED records):
    arch: ArchOption = None,
    model: ModelOption = None,
    model_kwargs: ModelKwargsOption = None,
    trust_pickle: TrustPickleOption = False,
    trust_code: TrustCodeOption = False,
    clip_len: Optional[int] = typer.Option(None, "--clip-len", help="default: as the converted folder records"),
    size: SizeOption = None,
    mean: Optional[str] = typer.Option(None, "--mean", help="R,G,B mean (default: as recorded)"),
    std: Optional[str] = typer.Option(None, "--std", help="R,G,B std"),
    input_layout: InputLayoutOption = None,
    input_dtype: InputDtypeOption = None,
    resize_mode: ResizeModeOption = None,
    no_normalize: NoNormalizeOption = False,
    batch_size: int = typer.Option(4, "--batch-size", help="clips per forward"),
    threshold: float = typer.Option(0.5, "--threshold", help="per-frame probability that counts as an event"),
    tolerance: int = typer.Option(1, "--tolerance", help="frames an event may move and still match"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
    as_json: JsonOption = False,
) -> None:
    """Relative error, cosine similarity, top-1 agreement and per-frame event F1 of every output."""
    from ..compare import compare_paths
    from ..models import parse_model_kwargs

    result = compare_paths(
        original, converted, clips, arch=arch, model=model, model_kwargs=parse_model_kwargs(model_kwargs),
        trust_pickle=trust_pickle, trust_code=trust_code, clip_len=clip_len,
        size=parse_size(size), mean=_parse_triple("--mean", mean),
        std=_parse_triple("--std", std), batch_size=batch_size, threshold=threshold, tolerance=tolerance,
        device=device, layout=input_layout, dtype=input_dtype, resize_mode=check_resize_mode(resize_mode),
        normalize=not no_normalize,
    )
    if as_json:
        render.print_json(result.to_dict())
    else:
        _render(result)
