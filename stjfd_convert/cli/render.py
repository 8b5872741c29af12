"""Rendering of library results with rich: tables, progress bars, one-line errors."""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Iterator

from rich import box
from rich.console import Console, ConsoleOptions, RenderResult
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


class FitTable(Table):
    """A rich Table that stays readable on a narrow terminal and never cuts a name or a number.

    Wide enough, it is drawn as usual. Too wide, it drops its borders and padding (columns one space apart) and
    wraps its columns at spaces, each at least as wide as its longest word — or its ``min_width`` when set, below
    which plain text (a skip reason) may fold — while ``no_wrap`` columns keep their full width. If even that
    does not fit, every row becomes a small block of ``column  value`` lines. Cells fold, never end in '…'.
    """

    def add_column(self, *args: Any, overflow: Any = "fold", **kwargs: Any) -> None:
        super().add_column(*args, overflow=overflow, **kwargs)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        wide = options.update_width(10_000)
        natural = sum(self._measure_column(console, wide, c).maximum for c in self.columns) + self._extra_width
        if self.box is None or natural <= width:
            yield from super().__rich_console__(console, options)
            return
        compact = copy.copy(self)
        compact.columns = [copy.copy(c) for c in self.columns]
        compact.box, compact.show_edge, compact.padding, compact.pad_edge = box.SIMPLE_HEAD, False, (0, 0), False
        ranges = [compact._measure_column(console, wide, c) for c in compact.columns]
        need = [
            r.maximum if c.no_wrap else (c.min_width if c.min_width is not None else r.minimum)
            for c, r in zip(compact.columns, ranges)
        ]
        spare = width - compact._extra_width - sum(need)
        if spare < 0:
            yield from Table.__rich_console__(self._records(), console, options)
            return
        deficit = [r.maximum - n for r, n in zip(ranges, need)]
        for index in sorted(range(len(need)), key=deficit.__getitem__):  # whole columns on one line first
            grant = min(deficit[index], spare)
            need[index] += grant
            spare -= grant
        for column, size in zip(compact.columns, need):
            column.width = size
        yield from Table.__rich_console__(compact, console, options)

    def _records(self) -> Table:
        """One ``column  value`` block per row, for terminals too narrow for the columns side by side."""
        records = Table(title=self.title, box=None, show_header=False, padding=(0, 1), pad_edge=False)
        records.add_column(style="bold", overflow="fold")
        records.add_column(overflow="fold")
        for index in range(self.row_count):
            if index:
                records.add_row("", "")
            for column in self.columns:
                records.add_row(column.header, list(column.cells)[index])
        return records


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


@contextlib.contextmanager
def step_progress(enabled: bool, description: str) -> Iterator[Any]:
    """``layer_progress`` for library calls that report ``progress(done, total, name)`` (the planner)."""
    with layer_progress(enabled, description) as callback:
        if callback is None:
            yield None
        else:
            yield lambda done, total, name: callback(SimpleNamespace(index=done, total=total, name=name))


@contextlib.contextmanager
def phase_progress(enabled: bool) -> Iterator[Any]:
    """A progress bar per phase for callbacks ``progress(phase, done, total)`` (calibration passes)."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=stderr, transient=True,
    )
    tasks: dict[str, Any] = {}

    def callback(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(f"calibrating: {phase}", total=total or None)
        progress.update(tasks[phase], completed=done)

    with progress:
        yield callback


def _errors_cell(calibrated: float | None, plain: float | None) -> str:
    if calibrated is None:
        return ""
    return f"{calibrated:.2e}" if plain is None else f"{calibrated:.2e} ({plain:.2e})"


def _layer_cells(layer: Any) -> tuple[str, str, str]:
    """The first three cells of a Conv3d row: name, kernel and channels, atoms (or why it was skipped)."""
    kernel = "×".join(str(k) for k in layer.kernel_size)
    channels = f"{layer.in_channels}→{layer.out_channels}" + (f" g{layer.groups}" if layer.groups > 1 else "")
    if layer.skipped:
        atoms = f"[dim]skipped: {escape(layer.skipped)}[/]"
    else:
        atoms = f"{layer.temporal_atoms}×{layer.spatial_atoms}"
    return escape(layer.name), f"{kernel} {channels}", atoms


def conversion_table(report: ConversionReport) -> Table:
    """One row per Conv3d; with calibration, weight and output errors (plain decomposition in brackets)."""
    if report.calibration is not None:
        return _calibrated_table(report)
    table = FitTable(title="Conv3d layers", header_style="bold", show_lines=False)
    table.add_column("layer", no_wrap=True)
    table.add_column("kernel, channels")
    table.add_column("atoms m_t×m_s", min_width=len("m_t×m_s"))  # a skip reason may fold below that
    table.add_column("params before → after", justify="right")
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("rel. error", justify="right")
    table.add_column("runs as")
    for layer in report.layers:
        if layer.skipped:
            table.add_row(*_layer_cells(layer), _params(layer.params_before), "", "", "dense")
        else:
            table.add_row(
                *_layer_cells(layer),
                f"{_params(layer.params_before)} → {_params(layer.params_after)}",
                f"{layer.ratio:.3f}",
                f"{layer.rel_error:.2e}" if layer.rel_error is not None else "",
                layer.form or "",
            )
    return table


def _calibrated_table(report: ConversionReport) -> Table:
    table = FitTable(title="Conv3d layers (calibrated; plain decomposition in brackets)", header_style="bold")
    table.add_column("layer", no_wrap=True)
    table.add_column("kernel, channels")
    table.add_column("atoms m_t×m_s", min_width=len("m_t×m_s"))
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("weight error", justify="right")
    table.add_column("output error", justify="right")
    for layer in report.layers:
        if layer.skipped:
            table.add_row(*_layer_cells(layer), "", "", "")
            continue
        table.add_row(
            *_layer_cells(layer),
            f"{layer.ratio:.3f}", _errors_cell(layer.rel_error, layer.plain_rel_error),
            _errors_cell(layer.output_error, layer.plain_output_error),
        )
    return table


def calibration_line(report: ConversionReport) -> str | None:
    """How calibration went, with the mean output error over layers against the plain decomposition."""
    info = report.calibration
    if info is None:
        return None
    rows = [layer for layer in report.layers if layer.output_error is not None and layer.plain_output_error is not None]
    text = f"[bold]calibrated[/] on {info.get('clips', '?')} clips"
    if rows:
        calibrated = sum(layer.output_error for layer in rows) / len(rows)
        plain = sum(layer.plain_output_error for layer in rows) / len(rows)
        text += f": mean layer output error {calibrated:.3f} (plain decomposition {plain:.3f})"
    if info.get("model_output_error") is not None:
        text += (f"; model output error {info['model_output_error']:.3f} "
                 f"(plain {info['plain_model_output_error']:.3f})")
    if info.get("batchnorm"):
        text += "; BatchNorm statistics re-estimated"
    elif info.get("batchnorm_rejected"):
        text += (f"; BatchNorm statistics kept as they were (re-estimated on these clips, model output error "
                 f"{info['batchnorm_rejected']['model_output_error']:.3f})")
    return text


def totals_lines(report: ConversionReport) -> list[str]:
    decomposed = len(report.decomposed)
    return [
        f"[bold]model[/]: {_params(report.params_before)} → {_params(report.params_after)} parameters "
        f"({report.ratio:.3f}×), {_mb(report.bytes_before)} → {_mb(report.bytes_after)}; "
        f"{decomposed} of {len(report.layers)} Conv3d decomposed in {report.seconds:.2f} s",
        f"[dim]atoms can touch {report.touchable_share:.0%} of the parameters (Conv3d kernels larger than 1×1×1)[/]",
    ]


def parity_line(parity: ParityResult | None) -> str:
    if parity is None:
        return "[bold]parity[/]: not checked"
    from ..inputs import format_input_shape

    shape = format_input_shape(parity.input_shape)
    text = (
        f"[bold]parity[/] on a fixed {shape} {parity.input_dtype} clip: max abs diff {parity.max_abs:.3e}, "
        f"relative L2 diff {parity.rel_l2:.3e}"
    )
    if parity.top1_total is not None:
        text += f", top-1 agreement {parity.top1_agree}/{parity.top1_total}"
    if len(parity.outputs) > 1:
        text += f" (worst of {len(parity.outputs)} outputs)"
    return text
