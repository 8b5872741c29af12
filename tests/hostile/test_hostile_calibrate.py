"""Hostile `convert --calibrate` options (issue #12): one error line, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import TINY_INPUT_SHAPE, write_tiny
from hostile_checks import refused
from videos import make_video_dataset


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--calibrate", "missing"], ["--calibrate", "not a folder"]),
        (["--calibrate", "empty"], ["no video"]),
        (["--calibrate", "clips", "--calibrate-clips", 0], ["--calibrate-clips", "≥ 1"]),
        (["--calibrate", "clips", "--input-layout", "BTHWC"], ["channels", "--input-layout BCTHW"]),
        (["--calibrate", "clips", "--input-layout", "XYZ"], ["--input-layout"]),
    ],
    ids=["missing-folder", "empty-folder", "zero-clips", "layout-mismatch", "unknown-layout"],
)
def test_bad_calibration_options_are_refused_and_write_nothing(
    tmp_path: Path, options: list, fragments: list[str]
) -> None:
    tiny = write_tiny(tmp_path / "tiny")
    make_video_dataset(tmp_path / "clips", per_class=1, T=8, H=16, W=16)
    (tmp_path / "empty").mkdir()
    resolved = [tmp_path / o if o in ("missing", "empty", "clips") else o for o in options]
    shape = TINY_INPUT_SHAPE
    refused(tmp_path, ["convert", tiny.checkpoint, "--model", tiny.model_arg, "--input-shape", shape, *resolved,
                       "-o", tmp_path / "out"], *fragments)


def test_output_inside_the_calibration_videos_is_refused(tmp_path: Path) -> None:
    tiny = write_tiny(tmp_path / "tiny")
    make_video_dataset(tmp_path / "clips", per_class=1, T=8, H=16, W=16)
    refused(tmp_path, ["convert", tiny.checkpoint, "--model", tiny.model_arg, "--input-shape", TINY_INPUT_SHAPE,
                       "--calibrate", tmp_path / "clips", "-o", tmp_path / "clips" / "conv"], "clips")
