"""End-to-end smoke on the installed CLI, in real processes: decode real videos (PyAV), convert, fine-tune a
few steps with the alternating schedule, export to ONNX (validated in onnxruntime) and predict a video.

.ci/run runs this file alone on the oldest supported Python (the full suite runs on the newest), so it
must stay self-contained and quick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import TINY_INPUT_SHAPE, write_tiny
from videos import make_video_dataset, moving_shape_frames, write_video

CLIP_LEN, SIZE = 8, 32
CLASSES = ("left_right", "top_bottom", "blink")


def stjfd(*args: object, cwd: Path) -> dict:
    """``stjfd ARGS --json`` in a fresh process; returns the parsed result."""
    env = {k: v for k, v in os.environ.items() if k != "STJFD_DEBUG"}
    env.update(NO_COLOR="1", TERM="dumb", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "stjfd_convert", *map(str, args), "--json"], cwd=cwd, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"stjfd {' '.join(map(str, args))}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def test_decode_convert_finetune_export_predict(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    tiny = write_tiny(tmp_path / "inputs")
    data = tmp_path / "data"
    make_video_dataset(data / "train", classes=CLASSES, per_class=2, T=CLIP_LEN, H=SIZE, W=SIZE, seed=1)
    make_video_dataset(data / "val", classes=CLASSES, per_class=1, T=CLIP_LEN, H=SIZE, W=SIZE, seed=2)

    converted = stjfd("convert", tiny.checkpoint, "--model", tiny.model_arg, "--input-shape", TINY_INPUT_SHAPE,
                      "--atoms", "4", "--temporal-atoms", "2", "-o", tmp_path / "conv", cwd=tmp_path)
    assert converted["parity"] is not None

    run = stjfd("finetune", tmp_path / "conv", data, "--trust-code", "--clip-len", CLIP_LEN, "--size", SIZE,
                "--batch-size", "3", "--workers", "1", "--optimizer", "adamw", "--lr", "0.01",
                "--bn-recal-batches", "1", "--no-plot", "-o", tmp_path / "run", cwd=tmp_path)
    assert [s["stage"] for s in run["stages"]] == ["temporal", "spatial"]
    assert run["steps"] == 4 and run["final"]["clips"] == len(CLASSES) and not run["skipped"]

    target = tmp_path / "model.onnx"
    exported = stjfd("export", tmp_path / "run" / "best", "--trust-code", "--onnx", target, "--runs", "0",
                     cwd=tmp_path)
    assert exported["validation"]["passed"] and target.is_file()

    video = write_video(tmp_path / "clip.mp4", moving_shape_frames(0, T=12, H=SIZE, W=SIZE, seed=3))
    predicted = stjfd("predict", target, video, "--top-k", "2", cwd=tmp_path)
    assert [t["rank"] for t in predicted["top"]] == [1, 2]
    assert {t["label"] for t in predicted["top"]} <= set(CLASSES)
