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
