"""``stjfd`` command line: parse options, call one library function, render its result."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from ..config import ConvertConfig
from ..errors import ConfigError
from ..inputs import check_container
from ..layouts import check_input_layout
from . import render
from .app import app, command_line, guarded
from .options import (
    ArchOption,
    InputLayoutOption,
    InputShapeOption,
    JsonOption,
    ModelKwargsOption,
    ModelOption,
    NoNormalizeOption,
    NonStrictOption,
    PathwayStridesOption,
    TrustPickleOption,
    input_shape_value,
)


def _render_convert(result: Any, as_json: bool) -> None:
    if as_json:
        render.print_json(result.to_dict())
        return
    out = render.stdout
    out.print(render.conversion_table(result.report))
    for line in render.totals_lines(result.report):
        out.print(line)
    calibration = render.calibration_line(result.report)
    if calibration is not None:
        out.print(calibration)
    out.print(render.parity_line(result.parity))
    for note in result.report.notes + result.notes:
        out.print(f"[dim]note:[/] {escape(note)}")
    for warning in result.report.warnings:
        render.stderr.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if result.output is not None:
        out.print(f"[bold green]saved[/] {escape(str(result.output))}/ (model.safetensors + model.stjfd.json)")


def _strides_for(shape: Any, text: Optional[str]) -> Any:
    """``--pathway-strides``: one stride per ``--input-shape`` pathway, whose lengths they must explain."""
    from ..inputs import check_pathway_strides, parse_pathway_strides

    strides = parse_pathway_strides(text)
    return check_pathway_strides(shape, strides) if strides is not None else None


@app.command()
@guarded
def convert(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="state_dict (.pth/.pt/.bin/.safetensors); omit with --arch/--model for fresh weights"
    ),
    atoms: Optional[int] = typer.Option(None, "--atoms", help="spatial atoms per layer (default 6; clipped to a layer's taps)"),
    temporal_atoms: Optional[int] = typer.Option(
        None, "--temporal-atoms", help="temporal atoms per layer (default min(L, 3); L−1 for L×1×1 kernels)"
    ),
    energy: Optional[float] = typer.Option(None, help="keep this share of each mode's energy, e.g. 0.99"),
    budget: Optional[float] = typer.Option(
        None, help="shrink parameters to this share: of the decomposable convs' weights, or see --budget-of"
    ),
    budget_of: str = typer.Option(
        "convs", "--budget-of", help="what --budget is a share of: convs (decomposable conv weights) | model (all)"
    ),
    full_rank: bool = typer.Option(False, "--full-rank", help="exact decomposition (for verification)"),
    include: List[str] = typer.Option([], "--include", help="glob on module names to convert (repeatable)"),
    exclude: List[str] = typer.Option([], "--exclude", help="glob on module names to leave dense (repeatable)"),
    method: str = typer.Option("hooi", help="hooi | hosvd | tensorly (reference)"),
    mode: str = typer.Option("auto", help="execution mode saved with the model: auto | fused | factorized | sandwich | spatial_first | temporal_first"),
    arch: ArchOption = None,
    model: ModelOption = None,
    model_kwargs: ModelKwargsOption = None,
    trust_pickle: TrustPickleOption = False,
    non_strict: NonStrictOption = False,
    input_shape: InputShapeOption = None,
    input_dtype: str = typer.Option("float32", "--input-dtype", help="parity clip dtype (e.g. uint8)"),
    input_container: str = typer.Option(
        "list", "--input-container", help="how several --input-shape pathways are passed: list | tuple"
    ),
    pathway_strides: PathwayStridesOption = None,
    input_layout: InputLayoutOption = None,
    calibrate: Optional[Path] = typer.Option(
        None, "--calibrate", metavar="DIR",
        help="data-aware conversion: fit atoms to each layer's output on clips from the videos under DIR",
    ),
    calibrate_clips: int = typer.Option(32, "--calibrate-clips", help="clips to calibrate on (with --calibrate)"),
    no_normalize: NoNormalizeOption = False,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output folder (default <stem>-stjfd/)"),
    force: bool = typer.Option(False, "--force", help="replace an existing converted folder (never anything else)"),
    as_json: JsonOption = False,
) -> None:
    """Factorise every Conv3d of a model into temporal atoms, spatial atoms and joint coefficients."""
    from ..models import parse_model_kwargs
    from ..workflows import convert_checkpoint

    config = ConvertConfig(
        spatial_atoms=atoms,
        temporal_atoms=temporal_atoms,
        energy=energy,
        budget=budget,
        budget_of=budget_of,
        full_rank=full_rank,
        include=tuple(include),
        exclude=tuple(exclude),
        method=method,
        mode=mode,
    )
    kwargs = parse_model_kwargs(model_kwargs)
    shape = input_shape_value(input_shape)
    layout = check_input_layout(input_layout) if input_layout is not None else None
    if calibrate_clips < 1:
        raise ConfigError(f"--calibrate-clips must be ≥ 1, got {calibrate_clips}", "e.g. --calibrate-clips 32")
    show = not as_json and render.stderr.is_terminal
    with render.layer_progress(show) as progress, render.phase_progress(show and calibrate is not None) as phases:
        result = convert_checkpoint(
            checkpoint,
            config,
            output=output,
            arch=arch,
            model=model,
            model_kwargs=kwargs,
            trust_pickle=trust_pickle,
            strict=not non_strict,
            input_shape=shape,
            input_dtype=input_dtype,
            input_container=check_container(input_container),
            pathway_strides=_strides_for(shape, pathway_strides),
            input_layout=layout,
            calibrate=calibrate,
            calibrate_clips=calibrate_clips,
            normalize=not no_normalize,
            overwrite=force,
            command=command_line(),
            progress=progress,
            calibration_progress=phases,
        )
    _render_convert(result, as_json)


@app.command()
@guarded
def demo(
    atoms: int = typer.Option(6, "--atoms", help="spatial atoms per layer"),
    temporal_atoms: Optional[int] = typer.Option(
        None, "--temporal-atoms", help="temporal atoms per layer (default min(L, 3); L−1 for L×1×1 kernels)"
    ),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="keep the converted model and run here"),
    force: bool = typer.Option(False, "--force", help="replace an earlier demo's outputs in -o"),
    as_json: JsonOption = False,
) -> None:
    """Convert the bundled sample model, compare accuracy, fine-tune briefly and reload (CPU, < 1 min)."""
    from ..workflows import demo as run_demo
    from .cmd_finetune import _TrainingView

    show_bars = not as_json and render.stderr.is_terminal
    with tempfile.TemporaryDirectory(prefix="stjfd-demo-") as scratch:
        folder = Path(output) if output is not None else Path(scratch)
        with render.layer_progress(show_bars) as progress, _TrainingView(bars=show_bars, lines=False) as view:
            result = run_demo(
                folder, atoms=atoms, temporal_atoms=temporal_atoms, progress=progress, callbacks=[view],
                command=command_line(), force=force,
            )
        if as_json:
            render.print_json(result.to_dict())
        else:
            _render_demo(result, keep=output is not None)
    if not result.reload.identical:
        raise typer.Exit(1)


def _render_demo(result: Any, keep: bool) -> None:
    out = render.stdout
    info, convert, report = result.sample_model, result.convert, result.convert.report
    out.print(
        f"[bold]sample model[/]: {escape(info['architecture']['name'])} ({info['parameters']:,} parameters), "
        f"bundled with stjfd; classes: {', '.join(info['classes'])}"
    )
    out.print(render.conversion_table(report))
    for line in render.totals_lines(report):
        out.print(line)
    agreement = result.agreement
    out.print(
        f"[bold]parity[/] on {agreement['clips']} held-out clips: top-1 agreement "
        f"{agreement['top1_agree']}/{agreement['clips']}, relative L2 diff of the logits {agreement['rel_l2']:.3e}"
    )
    for note in report.notes + convert.notes:
        out.print(f"[dim]note:[/] {escape(note)}")
    reload = result.reload
    status = "[green]bit-identical[/]" if reload.identical else f"[red]differs by {reload.max_abs:.3e}[/]"
    out.print(f"[bold]reload[/]: saved {escape(str(reload.directory))}/, reloaded → outputs {status}")
    ft = result.finetune
    out.print(
        f"[bold]accuracy[/] on {result.test_clips} held-out clips: original {result.original.top1:.1%}, "
        f"converted {result.converted.top1:.1%} ({report.ratio:.3f}× the parameters), "
        f"fine-tuned [bold]{result.finetuned.top1:.1%}[/]"
    )
    stages = " → ".join(
        f"{s.stage} {'×'.join(map(str, s.input_shape[2:]))}" + (f" {s.val_top1:.1%}" if s.val_top1 is not None else "")
        for s in ft.stages
    )
    out.print(
        f"[bold]fine-tuning[/]: alternating schedule on {result.train_clips} other clips, {ft.steps} steps in "
        f"{ft.seconds:.1f} s; held-out top-1 after each stage (clip T×H×W):"
    )
    out.print(f"  {stages}")
    if keep:
        out.print(f"[bold green]kept[/] {escape(str(reload.directory))}/ and the fine-tuning run {escape(str(ft.run_dir))}/")
    else:
        out.print("[dim]the demo folder is temporary; pass -o DIR to keep it[/]")
    if report.config.temporal_atoms is None and report.config.spatial_atoms == 6:
        out.print("[dim]try `stjfd demo --temporal-atoms 2 --atoms 4`: a smaller model that fine-tuning has to repair[/]")


def main() -> None:
    """Console-script entry point."""
    _register_commands()
    app()


def _register_commands() -> None:
    """Import the command modules; each registers its commands on ``app``."""
    import importlib
    import pkgutil

    from .. import cli

    for info in pkgutil.iter_modules(cli.__path__):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{cli.__name__}.{info.name}")


_register_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
