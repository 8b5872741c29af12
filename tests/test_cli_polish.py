"""Rough edges of the command line (issue #15 item 7): narrow terminals, help text, file modes, size notes,
closed pipes, progress of ``plan``."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import typer.main
from rich.console import Console
from torch import nn

from cli_helpers import TINY_DECOMPOSABLE, run_cli, tiny_reference_model, write_tiny
from stjfd_convert.cli import cmd_finetune, cmd_report, render
from stjfd_convert.cli.main import app
from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import ConversionReport, LayerReport, convert_model
from stjfd_convert.formats import MANIFEST_FILE, WEIGHTS_FILE
from stjfd_convert.functional.cost import FORMS
from stjfd_convert.layers import DecomposedConv3d
from stjfd_convert.models import ArchSpec
from stjfd_convert.planner import plan_model
from stjfd_convert.saved_model import save_converted

TERMINAL = 80  # the width every table must stay readable at

# r3d_18's Conv3d names (the longest, a skipped 1×1×1 downsample, included) and numbers of its size.
R3D_LAYERS = [
    ("stem.0", (3, 7, 7), 3, 64, 28_224, 3_759, 9.04e-01, "spatial_first"),
    ("layer1.0.conv1.0", (3, 3, 3), 64, 64, 110_592, 73_791, 5.67e-01, "temporal_first"),
    ("layer3.0.conv2.0", (3, 3, 3), 256, 256, 1_769_472, 1_179_711, 5.75e-01, "sandwich"),
    ("layer4.0.downsample.0", (1, 1, 1), 256, 512, 131_072, 131_072, None, None),
    ("layer4.1.conv2.0", (3, 3, 3), 512, 512, 7_077_888, 4_718_655, 5.81e-01, "factorized"),
]


def _rendered(table, width: int = TERMINAL) -> str:
    console = Console(width=width, record=True, color_system=None, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    console.file.close()
    return console.export_text()


def _assert_readable(text: str, tokens: list[str], width: int = TERMINAL) -> None:
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= width, text
    missing = [token for token in tokens if token not in text]
    assert not missing, f"cut or folded: {missing}\n{text}"


def _r3d_report() -> ConversionReport:
    layers = []
    for name, kernel, c_in, c_out, before, after, error, form in R3D_LAYERS:
        layer = LayerReport(name, kernel, c_in, c_out, 1, (1, 1, 1), before, after, form=form)
        if error is None:
            layer.skipped = "1×1×1 kernel: nothing to decompose"
        else:
            layer.temporal_atoms, layer.spatial_atoms, layer.rel_error = 3, 6, error
        layers.append(layer)
    return ConversionReport(layers, 1, 1, 1, 1, 0.0, ConvertConfig())


def test_conversion_table_keeps_every_layer_name_and_number_whole_at_80_columns() -> None:
    report = _r3d_report()
    tokens = []
    for layer in report.layers:
        tokens += [layer.name, f"{layer.params_before:,}"]
        if layer.decomposed:
            tokens += [f"{layer.params_after:,}", f"{layer.ratio:.3f}", f"{layer.rel_error:.2e}", layer.form]
    text = _rendered(render.conversion_table(report))
    _assert_readable(text, tokens)
    # Side by side still (not one block per row): each decomposed layer's name shares a line with its error.
    for layer in report.decomposed:
        assert any(layer.name in line and f"{layer.rel_error:.2e}" in line for line in text.splitlines()), text


def test_fit_table_is_unchanged_when_it_fits_and_becomes_blocks_when_columns_cannot_fit() -> None:
    table = render.FitTable(title="t")
    for column in ("name", "a", "b"):
        table.add_column(column)
    table.add_row("layer1.0.conv1.0", "1,234,567", "5.67e-01")
    assert "┃" in _rendered(table)  # wide enough: drawn as usual, with its borders
    wide = render.FitTable(title="t")
    numbers = [f"{index},234,567.{index}" for index in range(12)]
    for index in range(len(numbers)):
        wide.add_column(f"column {index}", justify="right")
    wide.add_row(*numbers)
    text = _rendered(wide)
    _assert_readable(text, numbers)
    assert "column 11" in text


def test_report_layer_table_keeps_names_and_numbers_whole_at_80_columns() -> None:
    rows = [
        SimpleNamespace(
            name=name, kernel_size=kernel, atoms=(3, 6) if error else None, mode="auto" if error else None,
            form=form, params_original=before, params_converted=after, macs_original=before * 4_567,
            macs_converted=after * 4_567, output_bytes=before * 13,
        )
        for name, kernel, _, _, before, after, error, form in R3D_LAYERS
    ]
    text = _rendered(cmd_report._layer_table(SimpleNamespace(layers=rows)))
    tokens = []
    for row in rows:
        tokens += [row.name, f"{row.params_original:,}", f"{row.params_converted:,}"]
        tokens += [cmd_report._gmacs(row.macs_original), cmd_report._gmacs(row.macs_converted)]
        tokens += [cmd_report._mib(row.output_bytes)]
    _assert_readable(text, tokens)


def test_finetune_stage_table_keeps_numbers_whole_at_80_columns() -> None:
    summaries = [
        SimpleNamespace(
            val_top5_k=5, first_epoch=2 * index, last_epoch=2 * index + 1, index=index, cycle=0, stage=stage,
            input_shape=(8, 3, 16, 112, 112), trainable_params=1_234_567, frozen_params=31_000_123,
            train_loss=1.23456, train_top1=0.8123, val_loss=1.34567, val_top1=0.7456, val_top5=0.9567,
            peak_memory_bytes=12_345 * 2**20, clips_per_s=123.4,
        )
        for index, stage in enumerate(("temporal", "spatial"))
    ]
    text = _rendered(cmd_finetune.stage_table(summaries, "stages"))
    tokens = ["8×3×16×112×112", "1,234,567", "31,000,123", "1.2346", "81.2%", "1.3457", "74.6%", "95.7%"]
    _assert_readable(text, [*tokens, "12,345.0", "123.4", "temporal", "spatial"])


def _option_names(command: str) -> list[str]:
    params = typer.main.get_command(app).commands[command].params
    return [name for param in params if param.param_type_name == "option" for name in (*param.opts, *param.secondary_opts)]


def _assert_help_whole(text: str, command: str) -> None:
    assert "<bool>" not in text, text
    for name in _option_names(command):
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} cut or missing:\n{text}"
    assert max(len(line) for line in text.splitlines()) <= TERMINAL, text


def test_finetune_help_shows_whole_option_names_and_bare_flags_at_80_columns(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TYPER_USE_RICH")}
    env.update(COLUMNS=str(TERMINAL), NO_COLOR="1", TERM="xterm")
    proc = subprocess.run(
        [sys.executable, "-m", "stjfd_convert", "finetune", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    _assert_help_whole(proc.stdout, "finetune")
    assert re.search(r"^\s*--resume\s+continue", proc.stdout, re.M), proc.stdout  # a flag takes no value


@pytest.mark.parametrize("command", ["convert", "demo", "export", "predict", "evaluate", "plan", "report", "swap"])
def test_every_help_shows_whole_option_names_at_80_columns(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(TERMINAL))
    outcome = run_cli([command, "--help"])
    assert outcome.exit_code == 0, outcome.output
    _assert_help_whole(outcome.stdout, command)


def test_weights_file_gets_the_same_umask_respecting_mode_as_the_manifest(tmp_path) -> None:
    converted, _ = convert_model(nn.Sequential(nn.Conv3d(3, 4, 3)), ConvertConfig(full_rank=True))
    previous = os.umask(0o027)
    try:
        folder = save_converted(converted, tmp_path / "out", ArchSpec("callable", "tinynet.py:build"))
    finally:
        os.umask(previous)
    modes = {name: (folder / name).stat().st_mode & 0o777 for name in (WEIGHTS_FILE, MANIFEST_FILE)}
    assert modes == {WEIGHTS_FILE: 0o640, MANIFEST_FILE: 0o640}


def test_output_into_a_closed_pipe_ends_quietly(tmp_path) -> None:
    """``stjfd convert … --json | head -0``: the reader is gone before the first write."""
    tiny = write_tiny(tmp_path / "tiny")
    env = {k: v for k, v in os.environ.items() if k not in ("STJFD_DEBUG", "PYTHONWARNINGS")}
    env.update(OMP_NUM_THREADS="1")
    args = ["convert", *tiny.args(), "-o", str(tmp_path / "out"), "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "stjfd_convert", *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait() == 141, stderr  # 128 + SIGPIPE, as a shell reports a writer whose reader left
    assert "Error" not in stderr and "error" not in stderr, stderr


def test_the_planner_reports_progress_once_per_layer() -> None:
    model = nn.Sequential(
        DecomposedConv3d(3, 4, 3, padding=1), nn.ReLU(), DecomposedConv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
    ).eval()
    calls = []
    plan_model(
        model, (1, 3, 3, 6, 6), measure=True, repeats=1, timer=lambda layer, forms, x, repeats: dict.fromkeys(forms, 1.0),
        progress=lambda done, total, name: calls.append((done, total, name)),
    )
    assert calls == [(1, 2, "0"), (2, 2, "2")]


def test_plan_shows_progress_per_layer_on_a_terminal(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = write_tiny(tmp_path / "tiny")
    converted, _ = convert_model(tiny_reference_model(), ConvertConfig(temporal_atoms=2, spatial_atoms=4))
    spec = ArchSpec("callable", f"{tiny.module}:build")
    folder = save_converted(converted, tmp_path / "conv", spec, input_shape=(1, 3, 4, 8, 8))
    shown = []

    @contextlib.contextmanager
    def bar(enabled: bool, description: str):
        assert enabled and description == "measuring"
        yield lambda event: shown.append((event.index, event.total, event.name))

    monkeypatch.setattr(render.stderr, "_force_terminal", True)
    monkeypatch.setattr(render, "layer_progress", bar)
    outcome = run_cli(["plan", folder, "--repeats", "1", "--dry-run", "--trust-code"])
    assert outcome.exit_code == 0, outcome.output
    assert shown == [(index, 2, name) for index, name in enumerate(TINY_DECOMPOSABLE, start=1)]
    assert all(f"{form} ms" in outcome.stdout for form in FORMS)


@pytest.mark.parametrize(("mode", "explained"), [("fused", True), ("factorized", False)])
def test_export_notes_its_size_against_the_converted_model(tmp_path, mode: str, explained: bool) -> None:
    pytest.importorskip("onnxruntime")
    from stjfd_convert.export import export_onnx

    converted, _ = convert_model(tiny_reference_model(), ConvertConfig(temporal_atoms=1, spatial_atoms=2))
    weights = sum(p.numel() for p in converted.parameters())
    result = export_onnx(converted.eval(), tmp_path / "m.onnx", mode=mode, input_shape=(1, 3, 4, 8, 8), runs=0, clips=1)
    note = next(note for note in result.notes if note.startswith("ONNX file"))
    assert f"{result.stats.parameters:,} weights; the converted model:" in note and f"MB, {weights:,} weights" in note
    # fused stores each layer's dense weight (more than its atoms); factorized the atoms and coefficients.
    assert (result.stats.parameters > weights) is explained
    assert ("store a weight rebuilt from their atoms" in note) is explained, note
