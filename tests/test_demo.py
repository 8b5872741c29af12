"""The bundled sample model, its training script and ``stjfd demo`` (README's first command)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli
from safetensors.torch import load_file

from stjfd_convert.models import load_model, sha256_file
from stjfd_convert.sample import (
    SAMPLE_CLASSES,
    SAMPLE_MODEL_NAME,
    SampleClips,
    build_sample_net,
    sample_clips,
    sample_model_files,
    shape_frames,
)
from stjfd_convert.saved_model import load_converted

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "sample_models" / "train_sample_model.py"

# The checked-in model must solve its toy task (the training script refuses to write less than this).
SAMPLE_MIN_ACCURACY = 0.9
# Fine-tuning a converted model may cost at most this much held-out top-1 (one clip in 150 ≈ 0.0067).
FINETUNE_ACCURACY_SLACK = 0.02
# At 2 temporal × 4 spatial atoms the sample model keeps under this share of its parameters.
SMALL_ATOMS_MAX_RATIO = 0.35

# sha256 (first 16 hex digits) of clips from tests/videos.py's generator before it moved to
# stjfd_convert.sample: the fixed-layout clips must stay exactly as they were.
LEGACY_CLIPS = {
    (0, 12, 32, 40, 3): "3dd85145e12c3196",
    (1, 8, 24, 24, 0): "8fa7a58ba5e7d6f2",
    (2, 16, 32, 32, 5): "e940002b6027b990",
    ("blink", 7, 20, 30, 11): "2d1aeefa831b04fa",
}


def _load_script():
    spec = importlib.util.spec_from_file_location("train_sample_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# The toy task
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", list(LEGACY_CLIPS))
def test_fixed_layout_clips_unchanged(args: tuple) -> None:
    frames = shape_frames(*args)
    assert frames.dtype.name == "uint8" and frames.shape == (*args[1:4], 3)
    assert hashlib.sha256(frames.tobytes()).hexdigest()[:16] == LEGACY_CLIPS[args]


def test_sample_clips_seeded_and_balanced() -> None:
    clips, labels = sample_clips(7, clip_len=8, size=32, seed=5)
    assert clips.shape == (7, 3, 8, 32, 32) and clips.dtype == torch.float32
    assert 0.0 <= float(clips.min()) and float(clips.max()) <= 1.0
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    again, _ = sample_clips(3, clip_len=8, size=32, seed=5)
    assert torch.equal(again, clips[:3])  # clip i depends on (seed, i) only
    other, _ = sample_clips(3, clip_len=8, size=32, seed=6)
    assert not torch.equal(other, clips[:3])
    dataset = SampleClips(4, clip_len=8, size=32, seed=5)
    clip, label = dataset[3]
    assert len(dataset) == 4 and dataset.classes == list(SAMPLE_CLASSES)
    assert torch.equal(clip, clips[3]) and label == 0


# --------------------------------------------------------------------------------------------
# The checked-in sample model
# --------------------------------------------------------------------------------------------


def test_bundled_sample_model_loads() -> None:
    files = sample_model_files()
    info = files.info
    assert info["architecture"] == {"kind": "callable", "name": SAMPLE_MODEL_NAME, "kwargs": {"num_classes": 3}}
    assert info["classes"] == list(SAMPLE_CLASSES)
    assert info["normalization"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    assert info["val_top1"] >= SAMPLE_MIN_ACCURACY
    assert info["sha256"] == sha256_file(files.weights)
    assert "train_sample_model.py" in info["command"] and info["seed"] == 0
    net = build_sample_net(**info["architecture"]["kwargs"])
    net.load_state_dict(load_file(str(files.weights)), strict=True)
    assert info["parameters"] == sum(p.numel() for p in net.parameters())
    loaded = load_model(files.weights, model=SAMPLE_MODEL_NAME, model_kwargs={"num_classes": 3})
    clip = torch.rand(info["input"]["shape"])
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(clip), net.eval()(clip))


def test_training_script_tiny_budget(tmp_path: Path) -> None:
    script = _load_script()
    code = script.main([
        "-o", str(tmp_path), "--train-clips", "16", "--val-clips", "6", "--epochs", "2", "--batch-size", "8",
        "--min-accuracy", "0",
    ])
    assert code == 0
    info = json.loads((tmp_path / script.INFO_FILE).read_text())
    assert info["training"]["settings"]["train_clips"] == 16 and info["training"]["steps"] == 4
    assert 0.0 <= info["val_top1"] <= 1.0 and "--train-clips 16" in info["command"]
    net = build_sample_net()
    net.load_state_dict(load_file(str(tmp_path / script.WEIGHTS_FILE)), strict=True)
    assert info["sha256"] == sha256_file(tmp_path / script.WEIGHTS_FILE)
    assert sample_model_files().info["sha256"] != info["sha256"]  # the real assets are untouched
    card = (tmp_path / script.CARD_FILE).read_text()
    assert f"top-1 {info['val_top1']:.4f}" in card and info["sha256"] in card and "--train-clips 16" in card


def test_model_card_is_generated_from_the_checked_in_description() -> None:
    """sample_models/MODEL_CARD.md says what sample_model.json says (rewrite it with --card-only)."""
    script = _load_script()
    files = sample_model_files()
    card = (files.info_path.parent / script.CARD_FILE).read_text()
    assert card == script.model_card(files.info)
    for fragment in ("## Data", "## Training", "## Held-out accuracy", "## Provenance", "train_sample_model.py"):
        assert fragment in card


# --------------------------------------------------------------------------------------------
# stjfd demo
# --------------------------------------------------------------------------------------------


def test_demo_json(tmp_path: Path) -> None:
    outcome = run_cli(["demo", "--json", "-o", tmp_path])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.stdout)
    assert report["architecture"]["name"] == SAMPLE_MODEL_NAME
    assert report["reload"] == {"identical": True, "max_abs": 0.0}
    assert report["totals"]["ratio"] < 1 and report["totals"]["decomposed_layers"] > 0
    accuracy = report["accuracy"]
    assert set(accuracy) == {"original", "converted", "finetuned"}
    assert accuracy["original"] >= SAMPLE_MIN_ACCURACY
    assert accuracy["finetuned"] >= accuracy["converted"] - FINETUNE_ACCURACY_SLACK
    assert report["agreement"]["clips"] == report["evaluation"]["clips"]
    stages = report["finetune"]["stages"]
    assert [s["stage"] for s in stages] == ["temporal", "spatial"] * report["finetune"]["cycles"]
    assert all(s["frozen_params"] > 0 for s in stages)
    assert load_converted(tmp_path / "sample-stjfd", trust_code=True).spec.name == SAMPLE_MODEL_NAME
    assert (tmp_path / "finetune" / "best" / "model.safetensors").is_file()


@pytest.mark.slow  # the demo itself runs in test_demo_json; this checks its text at other atoms
def test_demo_text_small_atoms() -> None:
    outcome = run_cli(["demo", "--temporal-atoms", "2", "--atoms", "4"])
    assert outcome.exit_code == 0, outcome.output
    text = outcome.stdout
    for needle in ("sample model", "Conv3d layers", "held-out clips", "bit-identical", "fine-tuned", "temporary"):
        assert needle in text, needle
    ratio = float(text.split("parameters (")[1].split("×")[0])
    assert ratio < SMALL_ATOMS_MAX_RATIO
