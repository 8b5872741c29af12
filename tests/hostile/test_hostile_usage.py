"""Usage mistakes (unknown options or commands, values of the wrong type, missing arguments) are one line too."""

from __future__ import annotations

from pathlib import Path

import pytest

from hostile_checks import refused

CASES = [
    (["export", "model", "-o", "x.onnx"], ["No such option: -o", "stjfd export --help"]),
    (["convrt", "model.pth"], ["No such command", "convert"]),
    (["convert", "--atoms", "abc"], ["--atoms", "integer", "stjfd convert --help"]),
    (["export"], ["Missing argument", "stjfd export --help"]),
    (["predict", "model.onnx"], ["Missing argument", "video"]),
    (["finetune", "model", "data", "--lr", "fast"], ["--lr", "stjfd finetune --help"]),
    (["report", "--steps", "1.5"], ["--steps", "integer"]),
    (["swap", "folder", "--temporal-dilation"], ["--temporal-dilation", "requires an argument"]),
]


@pytest.mark.parametrize("args, fragments", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    refused(tmp_path, args, *fragments, cwd=tmp_path)


# Input adapters (#12 item 1): a bad value is named before any file is read (the paths here do not exist).
ADAPTER_CASES = [
    (["plan", "folder", "--input-layout", "BHWTC"], ["--input-layout 'BHWTC'", "BTHWC"]),
    (["report", "folder", "--input-dtype", "int16"], ["--input-dtype 'int16'", "uint8"]),
    (["export", "folder", "--onnx", "m.onnx", "--input-layout", "NCHW"], ["--input-layout 'NCHW'", "BCTHW"]),
    (["predict", "m.onnx", "v.mp4", "--size", "12x"], ["--size", "HEIGHTxWIDTH"]),
    (["predict", "m.onnx", "v.mp4", "--resize-mode", "squash"], ["--resize-mode 'squash'", "stretch"]),
    (["evaluate", "folder", "data", "--input-layout", "x"], ["--input-layout 'x'"]),
    (["evaluate", "folder", "data", "--size", "0x4"], ["--size", "positive"]),
    (["compare", "a.pth", "folder", "clips", "--resize-mode", "fill"], ["--resize-mode 'fill'"]),
    (["compare", "a.pth", "folder", "clips", "--input-dtype", "f16"], ["--input-dtype 'f16'"]),
    (["finetune", "folder", "data", "-o", "run", "--resize-mode", "fill"], ["--resize-mode 'fill'"]),
    (["finetune", "folder", "data", "-o", "run", "--input-layout", "CTHWB"], ["--input-layout 'CTHWB'"]),
    (["finetune", "folder", "data", "-o", "run", "--no-normalize", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"],
     ["--no-normalize", "--mean"]),
    (["finetune", "run", "--resume", "--resize-mode", "stretch"], ["--resize-mode", "cannot be changed when resuming"]),
]


@pytest.mark.parametrize("args, fragments", ADAPTER_CASES, ids=[" ".join(a) for a, _ in ADAPTER_CASES])
def test_bad_input_adapter_values_are_one_line(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    refused(tmp_path, args, *fragments, cwd=tmp_path)
