"""``stjfd finetune`` (the alternating temporal/spatial schedule) and ``stjfd evaluate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import ConfigError
from . import render
from .app import EXIT_INTERRUPTED, EXIT_TERMINATED, app, command_line, guarded
from .options import (
    ArchOption,
    InputDtypeOption,
    InputLayoutOption,
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
    clip_layout,
    parse_size,
)
from .render import FitTable as Table  # wraps rather than cuts on a narrow terminal

MIB = 2**20


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / MIB:,.1f} MiB"


def _parse_triple(name: str, text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(
            f"{name} needs three comma-separated numbers (R,G,B), got {text!r}", f"e.g. {name} 0.43,0.39,0.38"
        )
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _top_k(summaries: list[Any]) -> int:
    return next((s.val_top5_k for s in summaries if s.val_top5_k), 5)


def stage_table(summaries: list[Any], title: str) -> Table:
    """Every column of the stages (the final table, on stdout)."""
    k = _top_k(summaries)
    table = Table(title=title, header_style="bold")
    for column, justify in (
        ("stage", "left"), ("epochs", "right"), ("input (per process)", "left"), ("trainable / frozen params", "right"),
        ("train loss", "right"), ("train top-1", "right"), ("val loss", "right"), ("val top-1", "right"),
        (f"val top-{k}", "right"), ("peak memory", "right"), ("clips/s", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column == "stage")  # type: ignore[arg-type]
    for s in summaries:
        epochs = f"{s.first_epoch + 1}"
        if s.last_epoch != s.first_epoch:
            epochs += f"–{s.last_epoch + 1}"
        table.add_row(
            f"{s.index + 1}. cycle {s.cycle + 1} {s.stage}", epochs, "×".join(map(str, s.input_shape)),
            f"{s.trainable_params:,} / {s.frozen_params:,}", _num(s.train_loss), _pct(s.train_top1), _num(s.val_loss),
            _pct(s.val_top1), _pct(s.val_top5), _mib(s.peak_memory_bytes),
            "—" if not s.clips_per_s else f"{s.clips_per_s:.1f}",
        )
    return table


def compact_stage_table(summary: Any) -> Table:
    """The table printed when a stage ends (narrow enough for an 80-column terminal)."""
    k = _top_k([summary])
    table = Table(title=f"stage {summary.index + 1}: cycle {summary.cycle + 1} {summary.stage}", header_style="bold")
    for column in ("input", "train loss", "val loss", "val top-1", f"val top-{k}", "peak memory"):
        table.add_column(column, justify="left" if column == "input" else "right", no_wrap=True)
    table.add_row(
        "×".join(map(str, summary.input_shape)), _num(summary.train_loss), _num(summary.val_loss),
        _pct(summary.val_top1), _pct(summary.val_top5), _mib(summary.peak_memory_bytes),
    )
    return table


class _TrainingView:
    """Renders fine-tuning events: one progress bar (stage, epoch, batch, loss, clips/s, ETA), a line per
    epoch and a table per stage."""

    def __init__(self, bars: bool, lines: bool) -> None:
        self.lines = lines
        self.console = render.stderr
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=render.stderr,
            transient=True,
            disable=not bars,
        )
        self.task: Any = None
        self.run_task: Any = None
        self.total_epochs = 0
        self.batches = 0

    def __enter__(self) -> _TrainingView:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def _print(self, *items: Any) -> None:
        if self.lines:
            self.progress.console.print(*items)

    def _bar(self, description: str, total: int, completed: int = 0) -> None:
        if self.task is None:
            self.task = self.progress.add_task(description, total=total, completed=completed, loss="", rate="")
        else:
            self.progress.reset(self.task, total=total, completed=completed, description=description, loss="", rate="")

    def indexing(self, done: int, total: int) -> None:
        """Progress of the dataset probe (before training starts)."""
        first = self.progress.tasks[0] if self.task is not None else None
        if first is None or first.description != "indexing videos" or first.total != total:
            self._bar("indexing videos", total)
        self.progress.update(self.task, completed=done)

    def __call__(self, event: Any) -> None:
        from .. import finetune as ft

        if isinstance(event, ft.RunStarted):
            self.total_epochs = event.total_epochs
            self.batches = event.batches_per_epoch
            where = f" → {escape(str(event.run_dir))}" if event.run_dir else ""
            resumed = ""
            if event.resumed_from:
                p = event.resumed_from
                resumed = f", resuming at epoch {p['epoch'] + 1} batch {p['batch']}"
            self._print(
                f"[bold]fine-tuning[/] {event.train_clips} training / {event.val_clips} validation clips, "
                f"{len(event.plan)} stages, {event.total_epochs} epochs × {event.batches_per_epoch} batches on "
                f"{event.device}" + (f" × {event.world_size} processes" if event.world_size > 1 else "")
                + resumed + where
            )
            total = event.total_epochs * event.batches_per_epoch
            done = 0
            if event.resumed_from:
                done = event.resumed_from["epoch"] * event.batches_per_epoch + event.resumed_from["batch"]
            self.run_task = self.progress.add_task("whole run", total=total, completed=done, loss="", rate="")
        elif isinstance(event, ft.StageStarted):
            frozen = f"; frozen: {event.frozen_params:,} params" if event.frozen_params else ""
            self._print(
                f"[bold cyan]stage {event.plan.index + 1}[/]: {event.plan.label}, input "
                f"{'×'.join(map(str, event.input_shape))}, trainable {event.trainable_params:,}{frozen}"
            )
        elif isinstance(event, ft.BatchEnd):
            description = f"{event.plan.label} · epoch {event.epoch + 1}/{self.total_epochs}"
            if self.task is None or self.progress.tasks[0].description != description:
                self._bar(description, event.batches, event.batch - 1)
            self.progress.update(
                self.task, completed=event.batch, loss=f"loss {event.loss:.4f}", rate=f"{event.clips_per_s:.1f} clips/s"
            )
            if self.run_task is not None:
                self.progress.update(self.run_task, completed=event.epoch * event.batches + event.batch)
        elif isinstance(event, ft.PhaseProgress):
            name = "BN re-estimation" if event.phase == "bn_recal" else "evaluation"
            description = f"{name} · epoch {event.epoch + 1}/{self.total_epochs}"
            if self.task is None or self.progress.tasks[0].description != description:
                self._bar(description, event.total)
            self.progress.update(self.task, completed=event.done)
        elif isinstance(event, ft.EpochEnd):
            r = event.record
            val = ""
            if r.get("val_top1") is not None:
                val = (f" · val loss {_num(r['val_loss'])} top-1 {_pct(r['val_top1'])} "
                       f"top-{r.get('val_top5_k') or 5} {_pct(r['val_top5'])}")
            self._print(
                f"epoch {r['epoch'] + 1}/{self.total_epochs} (cycle {r['cycle'] + 1} {r['stage']}): "
                f"train loss {_num(r['train_loss'])} top-1 {_pct(r['train_top1'])}{val}"
                + (f" · {r['clips_per_s']:.1f} clips/s" if r.get("clips_per_s") else "")
            )
        elif isinstance(event, ft.StageEnd):
            self._print(compact_stage_table(event.summary))
        elif isinstance(event, ft.SkippedFiles):
            for split, path, reason in event.entries:
                self.progress.console.print(
                    f"[yellow]skipped[/] unreadable {split} video {escape(path)}: {escape(reason)}"
                )
        elif isinstance(event, ft.CheckpointSaved) and event.kind == "best":
            self._print(f"[dim]best so far: epoch {event.epoch + 1} → {escape(str(event.path))}[/]")


def _render_result(result: Any, as_json: bool) -> None:
    if as_json:
        render.print_json(result.to_dict())
        return
    out = render.stdout
    if result.stages:
        out.print(stage_table(result.stages, f"{result.config.schedule} schedule"))
    if result.best_top1 is not None:
        out.print(
            f"[bold]best[/] val top-1 {_pct(result.best_top1)} at epoch {result.best_epoch + 1}"
            + (f" → {escape(str(result.run_dir / 'best'))}/" if result.run_dir else "")
        )
    if result.skipped:
        out.print(f"[yellow]skipped {len(result.skipped)} unreadable videos[/] (listed in run.log and metrics.jsonl)")
    for note in result.notes:
        out.print(f"[dim]note:[/] {escape(note)}")
    if result.run_dir is not None and result.changed:
        out.print(f"[bold green]saved[/] {escape(str(result.run_dir))}/: {', '.join(result.saved)}")
    elif result.run_dir is not None:
        out.print(f"[bold]unchanged[/] {escape(str(result.run_dir))}/: {', '.join(result.saved)}")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


@app.command()
@guarded
def finetune(
    source: Path = typer.Argument(..., help="converted-model folder or checkpoint; with --resume: the run folder"),
    data: Optional[Path] = typer.Argument(None, help="dataset root (train/ + val/, or one split with --val-split)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="run folder to create, e.g. runs/exp1"),
    resume: bool = typer.Option(False, "--resume", help="continue the run folder SOURCE where it stopped"),
    force: bool = typer.Option(False, "--force", help="replace an existing run folder (never anything else)"),
    clip_len: int = typer.Option(16, "--clip-len", help="frames per clip"),
    size: str = typer.Option("112", "--size", metavar="HxW", help="frame size: N (square) or HxW, e.g. 27x48"),
    frame_stride: int = typer.Option(1, "--frame-stride", help="take every n-th frame"),
    val_split: Optional[float] = typer.Option(None, "--val-split", help="hold out this share of train/ (no val/)"),
    val_clips: int = typer.Option(1, "--val-clips", help="clips per validation video (logits averaged)"),
    mean: Optional[str] = typer.Option(None, "--mean", help="R,G,B mean (default: the architecture's)"),
    std: Optional[str] = typer.Option(None, "--std", help="R,G,B std"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="alternating (default) | joint"),
    cycles: Optional[int] = typer.Option(None, "--cycles", help="temporal→spatial cycles (default 1)"),
    epochs_per_stage: Optional[int] = typer.Option(None, "--epochs-per-stage", help="epochs per stage (default 1)"),
    spatial_downsample: Optional[int] = typer.Option(
        None, "--spatial-downsample", "-s", help="s: frame downsampling in the temporal stage (default 2)"
    ),
    temporal_downsample: Optional[int] = typer.Option(
        None, "--temporal-downsample", "-r", help="r: clip downsampling in the spatial stage (default 2)"
    ),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="global batch size (default 8)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="data-loading processes (default 2)"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd (default) | adamw"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (default 0.01)"),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (default 0.9)"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="default 1e-4 (not on biases/norms)"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="cosine (default) | step | constant"),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="linear warm-up (default 0)"),
    lr_step_epochs: Optional[int] = typer.Option(
        None, "--lr-step-epochs", help="step schedule period (default one cycle)"
    ),
    lr_gamma: Optional[float] = typer.Option(None, "--lr-gamma", help="step schedule factor (default 0.1)"),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="default 0"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="clip the gradient norm"),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="mixed precision (bf16 on CPU, fp16 on CUDA)"),
    amp_dtype: Optional[str] = typer.Option(None, "--amp-dtype", help="auto | bfloat16 | float16"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="micro-batches per optimizer step (default 1)"),
    checkpoint_activations: Optional[bool] = typer.Option(
        None, "--checkpoint-activations/--no-checkpoint-activations", help="recompute each block in backward"
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default) | cpu | cuda"),
    seed: Optional[int] = typer.Option(None, "--seed", help="default 0 (deterministic on CPU)"),
    bn_recal_batches: Optional[int] = typer.Option(
        None, "--bn-recal-batches", help="batches for BN re-estimation (default 10; 0 = off)"
    ),
    log_every: Optional[int] = typer.Option(
        None, "--log-every", help="optimizer steps per metrics.jsonl step record (default 10)"
    ),
    no_plot: bool = typer.Option(False, "--no-plot", help="do not draw training_curve.png"),
    pathway_strides: PathwayStridesOption = None,
    input_layout: InputLayoutOption = None,
    input_dtype: InputDtypeOption = None,
    resize_mode: ResizeModeOption = None,
    no_normalize: NoNormalizeOption = False,
    no_flip: bool = typer.Option(
        False, "--no-flip", help="never mirror training clips (actions or events where left and right differ)"
    ),
    unlabeled: bool = typer.Option(
        False, "--unlabeled", help="every video under DATA_ROOT, no class folders, no labels (use with --distill)"
    ),
    distill: Optional[str] = typer.Option(
        None, "--distill", help="learn from this frozen teacher (checkpoint or folder; `source`: the one converted)"
    ),
    distill_loss: str = typer.Option("auto", "--distill-loss", help="auto | kl | bce | mse, per output"),
    distill_weight: float = typer.Option(
        0.0, "--distill-weight", help="share of cross-entropy on labelled clips mixed into distillation (0..1)"
    ),
    arch: ArchOption = None,
    model: ModelOption = None,
    model_kwargs: ModelKwargsOption = None,
    trust_pickle: TrustPickleOption = False,
    trust_code: TrustCodeOption = False,
    as_json: JsonOption = False,
) -> None:
    """Fine-tune with the paper's alternating schedule: temporal stage (frames downsampled by s, spatial atoms
    frozen) → spatial stage (clips downsampled by r, temporal atoms frozen), BN re-estimation and evaluation
    at full resolution; or --schedule joint (everything at full size)."""
    from .. import finetune as ft
    from ..inputs import parse_pathway_strides

    given = {
        name: value for name, value in (
            ("schedule", schedule), ("cycles", cycles), ("epochs_per_stage", epochs_per_stage),
            ("spatial_downsample", spatial_downsample), ("temporal_downsample", temporal_downsample),
            ("batch_size", batch_size), ("optimizer", optimizer), ("lr", lr), ("momentum", momentum),
            ("weight_decay", weight_decay), ("lr_schedule", lr_schedule), ("warmup_epochs", warmup_epochs),
            ("lr_step_epochs", lr_step_epochs), ("lr_gamma", lr_gamma), ("label_smoothing", label_smoothing),
            ("grad_clip", grad_clip), ("amp", amp), ("amp_dtype", amp_dtype), ("grad_accum", grad_accum),
            ("checkpoint_activations", checkpoint_activations), ("device", device), ("seed", seed),
            ("bn_recal_batches", bn_recal_batches), ("log_every", log_every),
            ("pathway_strides", parse_pathway_strides(pathway_strides)),
        ) if value is not None
    }
    main_rank = _is_main_rank()
    interactive = main_rank and not as_json and render.stderr.is_terminal
    view = _TrainingView(bars=interactive, lines=main_rank and not as_json)
    try:
        if resume:
            clip_flags = {"input_layout": input_layout, "input_dtype": input_dtype, "resize_mode": resize_mode,
                          "no_normalize": no_normalize or None, "no_flip": no_flip or None}
            named = [*given, *(k for k, v in clip_flags.items() if v is not None)]
            if named:
                flags = ", ".join("--" + k.replace("_", "-") for k in sorted(named))
                raise ConfigError(
                    f"{flags} cannot be changed when resuming", "the run keeps the options it started with"
                )
            if output is not None:
                raise ConfigError("-o does not apply with --resume", "the run folder is SOURCE")
            with view:
                result = ft.resume(
                    source, callbacks=[view], trust_pickle=trust_pickle, data_root=data, progress=view.indexing,
                    workers=workers, plot=False if no_plot else None, trust_code=trust_code, model=model,
                )
        else:
            if data is None:
                raise ConfigError("missing DATA_ROOT", "usage: stjfd finetune MODEL DATA_ROOT -o runs/exp1")
            if output is None:
                raise ConfigError("missing -o/--output run folder", "e.g. -o runs/exp1")
            config = ft.FinetuneConfig(**given, workers=2 if workers is None else workers, plot=not no_plot)
            from ..models import parse_model_kwargs

            kwargs = parse_model_kwargs(model_kwargs)
            for name, value in (("--clip-len", clip_len), ("--frame-stride", frame_stride), ("--val-clips", val_clips)):
                if value < 1:
                    raise ConfigError(f"{name} must be ≥ 1, got {value}", f"e.g. {name} 1")
            if val_split is not None and not 0.0 < val_split < 1.0:
                raise ConfigError(f"--val-split must be between 0 and 1, got {val_split}", "e.g. --val-split 0.2")
            with view:
                result = ft.finetune_paths(
                    source, data, config, output=output, clip_len=clip_len, size=parse_size(size),
                    frame_stride=frame_stride, val_split=val_split, mean=_parse_triple("--mean", mean),
                    std=_parse_triple("--std", std), val_clips_per_video=val_clips, arch=arch, model=model,
                    model_kwargs=kwargs, trust_pickle=trust_pickle, trust_code=trust_code, overwrite=force,
                    command=command_line(), unlabeled=unlabeled, distill=distill, distill_loss=distill_loss,
                    distill_weight=distill_weight, layout=clip_layout(input_layout) if input_layout else None,
                    dtype=input_dtype, resize_mode=check_resize_mode(resize_mode) or "crop",
                    normalize=not no_normalize, flip=not no_flip,
                    callbacks=[view], progress=view.indexing,
                )
    except ft.TrainingInterrupted as exc:
        if main_rank:
            render.error_line(exc.message)
        raise typer.Exit(EXIT_TERMINATED if exc.signal_name == "SIGTERM" else EXIT_INTERRUPTED) from None
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, a third Ctrl-C while stopping)
        if main_rank:
            render.error_line(ft.stopped_at_once(source if resume else output).message)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if main_rank:
        _render_result(result, as_json)


def confusion_table(result: Any, limit: int = 30) -> Table | None:
    if len(result.classes) > limit:
        return None
    table = Table(title="confusion matrix (rows: true class, columns: predicted)", header_style="bold")
    table.add_column("true \\ predicted")
    for index, _ in enumerate(result.classes):
        table.add_column(str(index), justify="right")
    for index, (name, row) in enumerate(zip(result.classes, result.confusion)):
        cells = [
            f"[bold]{v}[/]" if i == index else ("[dim]0[/]" if v == 0 else f"[red]{v}[/]") for i, v in enumerate(row)
        ]
        table.add_row(f"{index} {escape(name)}", *cells)
    return table


@app.command()
@guarded
def evaluate(
    model_dir: Path = typer.Argument(..., help="model folder, e.g. runs/exp1/best (or any converted model)"),
    data: Path = typer.Argument(..., help="labelled split: class folders or a list file (or a root with val/)"),
    clip_len: Optional[int] = typer.Option(None, "--clip-len", help="default: as fine-tuned"),
    size: SizeOption = None,
    frame_stride: Optional[int] = typer.Option(None, "--frame-stride"),
    clips_per_video: Optional[int] = typer.Option(None, "--clips", help="clips per video, logits averaged"),
    mean: Optional[str] = typer.Option(None, "--mean", help="R,G,B mean (default: as fine-tuned)"),
    std: Optional[str] = typer.Option(None, "--std", help="R,G,B std"),
    batch_size: int = typer.Option(8, "--batch-size"),
    workers: int = typer.Option(2, "--workers"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    amp: bool = typer.Option(False, "--amp", help="mixed precision"),
    trust_pickle: TrustPickleOption = False,
    trust_code: TrustCodeOption = False,
    playback_speed: float = typer.Option(
        1.0, "--playback-speed", help="resample each clip's frames: 0.5 = videos slowed 2×, 2 = sped up 2×"
    ),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="text file: the model's class names, one per output in order (matches folders by name)"
    ),
    input_layout: InputLayoutOption = None,
    input_dtype: InputDtypeOption = None,
    resize_mode: ResizeModeOption = None,
    no_normalize: NoNormalizeOption = False,
    as_json: JsonOption = False,
) -> None:
    """Accuracy (top-1/top-5), loss, per-class accuracy and confusion matrix at full resolution (clip options
    default to what the folder records)."""
    from ..finetune import evaluate_folder

    interactive = not as_json and render.stderr.is_terminal
    progress_bar = Progress(
        TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=render.stderr, transient=True, disable=not interactive,
    )
    task = None

    def progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress_bar.add_task("eval", total=total)
        progress_bar.update(task, completed=done)

    with progress_bar:
        result, skipped = evaluate_folder(
            model_dir, data, clip_len=clip_len, size=parse_size(size), frame_stride=frame_stride,
            clips_per_video=clips_per_video, mean=_parse_triple("--mean", mean), std=_parse_triple("--std", std),
            batch_size=batch_size, workers=workers, device=device, amp=amp, trust_pickle=trust_pickle,
            trust_code=trust_code, progress=progress, playback_speed=playback_speed, labels=labels,
            layout=input_layout, dtype=input_dtype, resize_mode=check_resize_mode(resize_mode),
            normalize=not no_normalize,
        )
    if result.class_note and not as_json:
        render.stderr.print(f"[dim]note:[/] {escape(result.class_note)}")
    for warning in result.warnings:
        render.stderr.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if as_json:
        render.print_json({**result.to_dict(), "skipped": [{"path": p, "reason": r} for p, r in skipped]})
        return
    out = render.stdout
    table = Table(title="per-class accuracy", header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column("correct", justify="right")
    table.add_column("clips", justify="right")
    table.add_column("accuracy", justify="right")
    for index, row in enumerate(result.per_class):
        table.add_row(str(index), escape(row["class"]), str(row["correct"]), str(row["total"]), _pct(row["accuracy"]))
    out.print(table)
    matrix = confusion_table(result)
    if matrix is not None:
        out.print(matrix)
    correct = round(result.top1 * result.clips)
    out.print(
        f"[bold]top-1[/] {_pct(result.top1)} ({correct}/{result.clips}) · [bold]top-{result.top5_k}[/] "
        f"{_pct(result.top5)} · loss {_num(result.loss)} on {result.clips} videos from {escape(str(data))}"
        + (f" at playback speed {result.playback_speed:g}" if result.playback_speed != 1.0 else "")
    )
    for path, reason in skipped:
        out.print(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}")
