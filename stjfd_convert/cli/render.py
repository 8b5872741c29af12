"""Rendering of library results with rich: tables, progress bars, one-line errors."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:  # torch is imported only by the commands that need it, so `stjfd --help` starts fast
    from ..convert import ConversionReport, LayerEvent
    from ..parity import ParityResult

# Piped output (logs, CI) gets a wide fixed width so tables stay one row per layer;
# soft_wrap keeps an error on one line whatever the terminal width.
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, soft_wrap=True)


def error_line(message: str) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}")


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else."""
    print(json.dumps(data, indent=2, default=str))


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MB"


def _params(n: int) -> str:
    return f"{n:,}"


@contextlib.contextmanager
def layer_progress(enabled: bool, description: str = "decomposing") -> Iterator[Any]:
    """A rich progress bar fed by ``LayerEvent`` callbacks; yields the callback (or None)."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[layer]}"),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
    )
    task = None

    def callback(event: LayerEvent) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task(description, total=event.total, layer="")
        progress.update(task, completed=event.index, layer=escape(event.name))

    with progress:
        yield callback


def conversion_table(report: ConversionReport) -> Table:
    """One row per Conv3d plus a totals row."""
    table = Table(title="Conv3d layers", header_style="bold", show_lines=False)
    table.add_column("layer")
    table.add_column("kernel")
    table.add_column("c_in→c_out")
    table.add_column("atoms m_t×m_s")
    table.add_column("params before → after", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("rel. error", justify="right")
    table.add_column("runs as")
    for layer in report.layers:
        kernel = "×".join(str(k) for k in layer.kernel_size)
        channels = f"{layer.in_channels}→{layer.out_channels}" + (f" g{layer.groups}" if layer.groups > 1 else "")
        if layer.skipped:
            table.add_row(
                escape(layer.name), kernel, channels, f"[dim]skipped: {escape(layer.skipped)}[/]",
                _params(layer.params_before), "", "", "dense",
            )
        else:
            table.add_row(
                escape(layer.name),
                kernel,
                channels,
                f"{layer.temporal_atoms}×{layer.spatial_atoms}",
                f"{_params(layer.params_before)} → {_params(layer.params_after)}",
                f"{layer.ratio:.3f}",
                f"{layer.rel_error:.2e}" if layer.rel_error is not None else "",
                layer.form or "",
            )
    return table


def totals_lines(report: ConversionReport) -> list[str]:
    decomposed = len(report.decomposed)
    return [
        f"[bold]model[/]: {_params(report.params_before)} → {_params(report.params_after)} parameters "
        f"({report.ratio:.3f}×), {_mb(report.bytes_before)} → {_mb(report.bytes_after)}; "
        f"{decomposed} of {len(report.layers)} Conv3d decomposed in {report.seconds:.2f} s",
    ]


def parity_line(parity: ParityResult | None) -> str:
    if parity is None:
        return "[bold]parity[/]: not checked"
    shape = "×".join(str(s) for s in parity.input_shape)
    text = (
        f"[bold]parity[/] on a fixed {shape} {parity.input_dtype} clip: max abs diff {parity.max_abs:.3e}, "
        f"relative L2 diff {parity.rel_l2:.3e}"
    )
    if parity.top1_total is not None:
        text += f", top-1 agreement {parity.top1_agree}/{parity.top1_total}"
    if len(parity.outputs) > 1:
        text += f" (worst of {len(parity.outputs)} outputs)"
    return text
