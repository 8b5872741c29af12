"""The hostile suite's own check: a refused command leaves the disk as it was (see hostile_checks)."""

from __future__ import annotations

from pathlib import Path

from hostile_checks import refused


def test_missing_checkpoint_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    refused(tmp_path, ["convert", tmp_path / "absent.pth", "-o", tmp_path / "out"], "absent.pth")
