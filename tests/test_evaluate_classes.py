"""`stjfd evaluate` matches class folders to the model's outputs by name (issue #15 item 3).

The bundled sample model's classes are left_right, top_bottom, blink, in that order; class folders sort
as blink, left_right, top_bottom. Evaluating it by folder order scored a correct model 0 %. The model is
converted at full rank (exact), so it scores what the checked-in model scores on its own toy task.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli
from videos import write_video

from stjfd_convert.config import ConvertConfig
from stjfd_convert.finetune import evaluate_folder
from stjfd_convert.sample import SAMPLE_CLASSES, SAMPLE_CLIP_LEN, SAMPLE_MODEL_NAME, SAMPLE_SIZE, sample_model_files
from stjfd_convert.sample import shape_frames
from stjfd_convert.workflows import convert_checkpoint

# The sample model scores 100 % on its validation clips (sample_model.json: val_top1 1.0); these six
# seeded clips are all classified right by it, so any mis-mapping of folders to outputs shows as < 1.
ALL_RIGHT = 1.0
PER_CLASS = 2


@pytest.fixture(scope="module")
def sample_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sample-eval")
    result = convert_checkpoint(
        sample_model_files().weights, ConvertConfig(full_rank=True), model=SAMPLE_MODEL_NAME,
        input_shape=(1, 3, SAMPLE_CLIP_LEN, SAMPLE_SIZE, SAMPLE_SIZE), output=root / "conv", parity=False,
    )
    data = root / "data"
    for kind in SAMPLE_CLASSES:
        for i in range(PER_CLASS):
            write_video(data / kind / f"v{i}.mp4", shape_frames(kind, SAMPLE_CLIP_LEN, SAMPLE_SIZE, SAMPLE_SIZE, i, vary=True))
    return result.output, data


def _without_classes(conv: Path, target: Path) -> Path:
    """A copy of the converted folder whose manifest records no class names (as convert wrote before)."""
    target.mkdir()
    manifest = json.loads((conv / "model.stjfd.json").read_text())
    manifest.pop("classes")
    (target / "model.stjfd.json").write_text(json.dumps(manifest))
    (target / "model.safetensors").write_bytes((conv / "model.safetensors").read_bytes())
    return target


def test_sample_model_scores_by_class_name(sample_setup: tuple[Path, Path]) -> None:
    conv, data = sample_setup
    assert json.loads((conv / "model.stjfd.json").read_text())["classes"] == list(SAMPLE_CLASSES)
    result, skipped = evaluate_folder(conv, data, workers=0, device="cpu")
    assert skipped == []
    assert result.classes == list(SAMPLE_CLASSES) and result.classes_from == "manifest"
    assert result.top1 == ALL_RIGHT
    assert result.class_note is None


def test_unknown_class_names_are_assumed_and_said(sample_setup: tuple[Path, Path], tmp_path: Path) -> None:
    conv, data = sample_setup
    bare = _without_classes(conv, tmp_path / "bare")
    result, _ = evaluate_folder(bare, data, workers=0, device="cpu")
    assert result.classes_from == "assumed" and result.classes == sorted(SAMPLE_CLASSES)
    assert "blink→0" in result.class_note and "--labels" in result.class_note
    outcome = run_cli(["evaluate", bare, data, "--workers", "0", "--device", "cpu"])
    assert outcome.exit_code == 0, outcome.output
    notes = [line for line in (outcome.stderr or outcome.stdout).splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "sorted order" in notes[0]


def test_labels_file_matches_folders_by_name(sample_setup: tuple[Path, Path], tmp_path: Path) -> None:
    conv, data = sample_setup
    bare = _without_classes(conv, tmp_path / "bare")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(SAMPLE_CLASSES) + "\n")
    outcome = run_cli(["evaluate", bare, data, "--workers", "0", "--device", "cpu", "--labels", labels, "--json"])
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert result["classes_from"] == "labels" and result["class_note"] is None
    assert result["top1"] == ALL_RIGHT


def test_subset_of_classes_keeps_every_output(sample_setup: tuple[Path, Path], tmp_path: Path) -> None:
    conv, data = sample_setup
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "blink").symlink_to(data / "blink", target_is_directory=True)
    result, _ = evaluate_folder(conv, subset, workers=0, device="cpu")
    assert result.classes == list(SAMPLE_CLASSES) and result.clips == PER_CLASS
    assert result.top1 == ALL_RIGHT
