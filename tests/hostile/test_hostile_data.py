"""Hostile data and options for `stjfd finetune` and `stjfd evaluate` (and the messages of issue #15 item 6).

Each refused case builds its bad input under ``tmp_path`` and checks, through :func:`hostile_checks.refused`,
one ``error: <what> — <fix>`` line naming the problem and the disk exactly as it was. The few cases that
run (a full disk during a checkpoint, a second Ctrl-C, a run without validation) check what is left on
disk instead. Everything is a 4-frame 16×16 video and a one-conv model on the CPU.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cli_helpers import assert_one_error_line, run_cli
from hostile_checks import refused
from videos import make_video_dataset, moving_shape_frames, write_corrupt_video, write_video

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.data import find_sources
from stjfd_convert.models import ArchSpec
from stjfd_convert.saved_model import load_converted, save_converted

CLIP_LEN, SIZE = 4, 16
TINY_SOURCE = """
from torch import nn


def build(num_classes=3, width=4):
    return nn.Sequential(
        nn.Conv3d(3, width, 3, padding=1), nn.BatchNorm3d(width), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        nn.Linear(width, num_classes),
    )
"""
# A frame size no video may declare (data.decode.MAX_FRAME_SIDE is 8192).
ABSURD_SIDE = 16000
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _tiny_net() -> nn.Module:
    namespace: dict = {}
    exec(TINY_SOURCE, namespace)
    torch.manual_seed(0)
    return namespace["build"]()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted 3-class model (outside every test's tmp_path: an input, never written)."""
    folder = tmp_path_factory.mktemp("hostile-model")
    module = folder / "tinynet.py"
    module.write_text(TINY_SOURCE)
    converted, _ = convert_model(_tiny_net(), ConvertConfig(spatial_atoms=2, temporal_atoms=2))
    return save_converted(converted, folder / "conv", ArchSpec("callable", f"{module}:build", {}))


def _dataset(root: Path, val: bool = True) -> Path:
    make_video_dataset(root / "train", per_class=2, T=CLIP_LEN, H=SIZE, W=SIZE, seed=1)
    if val:
        make_video_dataset(root / "val", per_class=1, T=CLIP_LEN, H=SIZE, W=SIZE, seed=2)
    return root


def _replace_videos(root: Path, write) -> None:
    """Every video under ``root`` replaced by what ``write(path)`` puts there."""
    for path in sorted(root.rglob("*.mp4")):
        write(path)


def _absurd_header(path: Path) -> None:
    """A raw-video (y4m) stream that declares ABSURD_SIDE² frames, in a file with a video extension."""
    header = f"YUV4MPEG2 W{ABSURD_SIDE} H{ABSURD_SIDE} F25:1 Ip A1:1 C420jpeg\nFRAME\n".encode()
    path.write_bytes(header + bytes(1024))


def ft(model: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return ["finetune", model, data, "-o", out, "--clip-len", CLIP_LEN, "--size", SIZE, "--batch-size", 2,
            "--workers", 0, "--no-plot", "--trust-code", "--lr", "0.01", *extra]


def ev(model: Path, data: Path, *extra: object) -> list[object]:
    return ["evaluate", model, data, "--clip-len", CLIP_LEN, "--size", SIZE, "--workers", 0, "--trust-code", *extra]


# --------------------------------------------------------------------------------------------
# finetune: videos nobody can read
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (lambda p: p.write_bytes(b""), ("none of its", "the file is empty (0 bytes)")),
        (lambda p: write_corrupt_video(p, "truncated", T=CLIP_LEN, H=SIZE, W=SIZE), ("none of its", "invalid data")),
        (lambda p: write_corrupt_video(p, "random"), ("none of its", "invalid data")),
        (_absurd_header, ("none of its", f"{ABSURD_SIDE}×{ABSURD_SIDE}")),
    ],
    ids=["empty", "truncated", "random-bytes", "absurd-frame-size"],
)
def test_finetune_on_unreadable_videos(model_dir: Path, tmp_path: Path, damage, fragments) -> None:
    data = _dataset(tmp_path / "data")
    _replace_videos(data / "train", damage)
    line = refused(tmp_path, ft(model_dir, data, tmp_path / "run"), *fragments)
    assert "Errno" not in line


def test_finetune_one_class(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_video_dataset(data / "train", classes=("blink",), per_class=4, T=CLIP_LEN, H=SIZE, W=SIZE)
    refused(tmp_path, ft(model_dir, data, tmp_path / "run", "--val-split", "0.25"), "only one class", "two class")


def test_finetune_empty_class_folder(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    (data / "train" / "zzz_empty").mkdir()
    refused(tmp_path, ft(model_dir, data, tmp_path / "run"), "zzz_empty", "no readable training videos")


def test_finetune_class_whose_videos_are_all_empty(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    _replace_videos(data / "train" / "blink", lambda p: p.write_bytes(b""))
    refused(tmp_path, ft(model_dir, data, tmp_path / "run"), "class blink", "no readable training videos")


@pytest.mark.skipif(IS_ROOT or sys.platform == "win32", reason="root reads any file; needs POSIX permissions")
def test_finetune_unreadable_files(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    _replace_videos(data / "train", lambda p: p.chmod(0))
    try:
        refused(tmp_path, ft(model_dir, data, tmp_path / "run"), "none of its", "permission denied")
    finally:
        _replace_videos(data / "train", lambda p: p.chmod(0o644))


def test_symlink_loops_and_links_to_other_classes_add_nothing(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", val=False)
    (data / "train" / "blink" / "loop").symlink_to("..", target_is_directory=True)
    (data / "train" / "blink" / "self").symlink_to(".", target_is_directory=True)
    (data / "train" / "blink" / "other").symlink_to("../left_right", target_is_directory=True)
    sources, classes, _ = find_sources(data / "train")
    assert classes == ["blink", "left_right", "top_bottom"]
    assert len(sources) == 6  # 2 per class: a loop (or a link to another class) would add dozens, mislabelled
    assert sorted(s.label for s in sources) == [0, 0, 1, 1, 2, 2]


def test_finetune_dataset_that_is_only_a_symlink_loop(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / "train" / name).mkdir(parents=True)
        (data / "train" / name / "loop").symlink_to("..", target_is_directory=True)
    refused(tmp_path, ft(model_dir, data, tmp_path / "run"), "no videos")


# --------------------------------------------------------------------------------------------
# finetune: options out of range, outputs that cannot be written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, flag",
    [
        ("--clip-len", "0", "--clip-len"),
        ("--batch-size", "0", "--batch-size"),
        ("--val-split", "1.5", "--val-split"),
        ("--lr", "-1", "--lr"),
        ("--epochs-per-stage", "0", "--epochs-per-stage"),
        ("-s", "0", "--spatial-downsample"),
        ("-r", "0", "--temporal-downsample"),
    ],
)
def test_finetune_option_out_of_range(model_dir: Path, tmp_path: Path, option: str, value: str, flag: str) -> None:
    data = _dataset(tmp_path / "data", val=option != "--val-split")
    refused(tmp_path, ft(model_dir, data, tmp_path / "run", option, value), flag)


def test_finetune_output_is_an_existing_file(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    (tmp_path / "run").write_text("my notes\n")
    refused(tmp_path, ft(model_dir, data, tmp_path / "run"), "run", "already exists")


def test_finetune_output_below_a_file(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    (tmp_path / "notes.txt").write_text("my notes\n")
    refused(tmp_path, ft(model_dir, data, tmp_path / "notes.txt" / "run"), "cannot write")


@pytest.mark.skipif(IS_ROOT or sys.platform == "win32", reason="root writes anywhere; needs POSIX permissions")
def test_finetune_output_in_a_read_only_folder(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(tmp_path, ft(model_dir, data, locked / "run"), "cannot write", "permission denied")
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------------------------
# finetune: runs that fail or stop half-way
# --------------------------------------------------------------------------------------------


def test_disk_full_during_second_checkpoint_keeps_the_first(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stjfd_convert.saved_model as saved_model

    data = _dataset(tmp_path / "data", val=False)  # no val: each epoch writes last/ only
    real = saved_model.write_converted_files
    calls = []

    def full_disk(model, manifest, folder):
        calls.append(folder)
        real(model, manifest, folder)  # the staging folder is half written when the disk fills up
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saved_model, "write_converted_files", full_disk)
    run = tmp_path / "run"
    outcome = run_cli(ft(model_dir, data, run, "--json"))
    line = assert_one_error_line(outcome, "disk is full", "intact", "--resume")
    assert str(run / "last") in line
    assert len(calls) == 2
    state = torch.load(run / "last" / "training_state.pt", weights_only=True)
    assert state["position"]["epoch"] == 1  # the first epoch's checkpoint, untouched
    assert load_converted(run / "last", trust_code=True).model is not None
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no staging folder left


def test_second_ctrl_c_says_how_to_resume(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stjfd_convert.finetune import trainer

    data = _dataset(tmp_path / "data", val=False)
    real = trainer._Trainer.end_epoch
    epochs = []

    def interrupted(self, plan, epoch):
        epochs.append(epoch)
        if len(epochs) == 2:
            raise KeyboardInterrupt  # what a second Ctrl-C raises from the signal handler
        return real(self, plan, epoch)

    monkeypatch.setattr(trainer._Trainer, "end_epoch", interrupted)
    run = tmp_path / "run"
    outcome = run_cli(ft(model_dir, data, run, "--json"))
    line = assert_one_error_line(outcome, "interrupted", "intact", f"stjfd finetune {run} --resume", exit_code=130)
    assert line != "error: interrupted"
    assert (run / "last" / "training_state.pt").is_file()


def test_ctrl_c_before_the_first_checkpoint_says_nothing_to_resume(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stjfd_convert.finetune import trainer

    data = _dataset(tmp_path / "data", val=False)

    def interrupted(self, plan, epoch):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer._Trainer, "end_epoch", interrupted)
    refused(tmp_path, ft(model_dir, data, tmp_path / "run", "--json"), "nothing to resume", "start the run again",
            exit_code=130)


def test_run_without_validation_does_not_list_best(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", val=False)
    outcome = run_cli(ft(model_dir, data, tmp_path / "run"))
    assert outcome.exit_code == 0, outcome.output
    saved = [line for line in outcome.stdout.splitlines() if line.startswith("saved")]
    assert len(saved) == 1 and "last/" in saved[0] and "best/" not in saved[0], outcome.stdout
    assert "best/ is not written" in outcome.stdout
    assert not (tmp_path / "run" / "best").exists()


def test_corrupt_training_state_message_is_whole(model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "last").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"format": "stjfd-finetune-run"}))
    torch.save({"x": torch.zeros(3)}, run / "last" / "training_state.pt")
    data = (run / "last" / "training_state.pt").read_bytes()
    (run / "last" / "training_state.pt").write_bytes(data[: len(data) // 3])
    line = refused(tmp_path, ["finetune", run, "--resume"], "damaged", "start a new run")
    assert "is —" not in line and "file is " not in line.split(" — ")[0][-20:]


def test_manifest_builder_not_importable_names_the_manifest(tmp_path: Path) -> None:
    package = tmp_path / "project" / "hostile15pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(TINY_SOURCE)
    converted, _ = convert_model(_tiny_net(), ConvertConfig(spatial_atoms=2, temporal_atoms=2))
    folder = save_converted(converted, tmp_path / "conv", ArchSpec("callable", "hostile15pkg.nets:build", {}))
    data = _dataset(tmp_path / "data")
    line = refused(tmp_path, ev(folder, data), "model.stjfd.json", "hostile15pkg", "PYTHONPATH", cwd=tmp_path)
    assert "--model" not in line.split(" — ")[0]


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (lambda p: p.write_bytes(b""), ("none of its", "the file is empty (0 bytes)")),
        (_absurd_header, ("none of its", f"{ABSURD_SIDE}×{ABSURD_SIDE}")),
    ],
    ids=["empty", "absurd-frame-size"],
)
def test_evaluate_on_unreadable_videos(model_dir: Path, tmp_path: Path, damage, fragments) -> None:
    data = _dataset(tmp_path / "data")
    _replace_videos(data / "val", damage)
    line = refused(tmp_path, ev(model_dir, data / "val"), *fragments)
    assert "Errno" not in line


def test_evaluate_skips_one_empty_video_and_says_why(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    (data / "val" / "blink" / "empty.mp4").write_bytes(b"")
    outcome = run_cli(ev(model_dir, data / "val", "--json"))
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert result["clips"] == 3
    assert [s["reason"] for s in result["skipped"]] == ["the file is empty (0 bytes)"]


def test_evaluate_one_frame_videos(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i, kind in enumerate(("blink", "left_right", "top_bottom")):
        write_video(data / kind / "one.mp4", moving_shape_frames(i, 1, SIZE, SIZE, seed=i))
    outcome = run_cli(ev(model_dir, data, "--json"))
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["clips"] == 3


@pytest.mark.parametrize(
    "option, value", [("--clips", "0"), ("--batch-size", "0"), ("--clip-len", "0"), ("--workers", "-1")]
)
def test_evaluate_option_out_of_range(model_dir: Path, tmp_path: Path, option: str, value: str) -> None:
    data = _dataset(tmp_path / "data")
    refused(tmp_path, ev(model_dir, data / "val", option, value), option)


def test_evaluate_missing_data(model_dir: Path, tmp_path: Path) -> None:
    refused(tmp_path, ev(model_dir, tmp_path / "nowhere"), "nowhere", "does not exist")


def test_evaluate_more_class_folders_than_outputs(model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_video_dataset(data, classes=4, per_class=1, T=CLIP_LEN, H=SIZE, W=SIZE)
    refused(tmp_path, ev(model_dir, data), "4 class folders", "3 outputs", "--labels")


def test_evaluate_folder_not_among_the_labels(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    labels = tmp_path / "labels.txt"
    labels.write_text("blink\nleft_right\nup_down\n")
    refused(tmp_path, ev(model_dir, data / "val", "--labels", labels), "top_bottom", "not among the model's classes")


@pytest.mark.parametrize(
    "text, fragments",
    [("a\nb\n", ("2 classes", "3 outputs")), ("", ("names no classes",)), ("a\nb\na\n", ("'a'", "more than once"))],
    ids=["too-few", "empty", "repeated"],
)
def test_evaluate_bad_labels_file(model_dir: Path, tmp_path: Path, text: str, fragments: tuple[str, ...]) -> None:
    data = _dataset(tmp_path / "data")
    labels = tmp_path / "labels.txt"
    labels.write_text(text)
    refused(tmp_path, ev(model_dir, data / "val", "--labels", labels), "--labels", *fragments)


def test_evaluate_labels_file_missing(model_dir: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    refused(tmp_path, ev(model_dir, data / "val", "--labels", tmp_path / "labels.txt"), "labels.txt", "does not exist")


# --------------------------------------------------------------------------------------------
# messages that named the wrong thing (issue #15 item 6)
# --------------------------------------------------------------------------------------------


def test_predict_on_a_file_that_is_not_onnx(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    video = write_video(tmp_path / "clip.mp4", moving_shape_frames(0, CLIP_LEN, SIZE, SIZE))
    line = refused(tmp_path, ["predict", model_dir / "model.safetensors", video], "stjfd export --onnx")
    assert "--opset" not in line


@pytest.mark.parametrize("which", ["model", "video"])
def test_predict_folder_as_model_or_video(model_dir: Path, tmp_path: Path, which: str) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not really")
    args = ["predict", folder, onnx] if which == "model" else ["predict", onnx, folder]
    line = refused(tmp_path, args, "is a folder")
    assert "does not exist" not in line


def test_temporal_atoms_hint_names_a_possible_value(tmp_path: Path) -> None:
    from cli_helpers import write_tiny

    tiny = write_tiny(tmp_path / "in")
    line = refused(tmp_path, ["convert", *tiny.args(), "--temporal-atoms", "0", "-o", tmp_path / "out"],
                   "--temporal-atoms")
    assert "e.g. --temporal-atoms 6" not in line


def test_export_runs_hint_names_only_real_flags(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    line = refused(tmp_path, ["export", model_dir, "--onnx", tmp_path / "m.onnx", "--runs", "-1", "--trust-code"],
                   "--runs")
    assert "--warmup" not in line


def test_missing_onnxruntime_hint_names_the_flags_in_use(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    line = refused(tmp_path, ["export", model_dir, "--onnx", tmp_path / "m.onnx", "--runs", "0", "--trust-code"],
                   "onnxruntime", "--no-validate")
    assert "--runs 0" not in line
    video = write_video(tmp_path / "clip.mp4", moving_shape_frames(0, CLIP_LEN, SIZE, SIZE))
    (tmp_path / "m2.onnx").write_bytes(b"x")
    line = refused(tmp_path, ["predict", tmp_path / "m2.onnx", video], "onnxruntime")
    assert "--no-validate" not in line and "--runs" not in line


def test_export_of_a_model_without_decomposed_layers_says_so_once(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    module = tmp_path / "plain.py"
    module.write_text(TINY_SOURCE)
    folder = save_converted(_tiny_net(), tmp_path / "plain", ArchSpec("callable", f"{module}:build", {}))
    outcome = run_cli(["export", folder, "--onnx", tmp_path / "plain.onnx", "--no-validate", "--runs", "0",
                       "--trust-code", "--input-shape", f"1,3,{CLIP_LEN},{SIZE},{SIZE}"])
    assert outcome.exit_code == 0, outcome.output
    assert "no decomposed layers; no decomposed layers" not in outcome.output
    assert "no decomposed layers" in outcome.output


def test_predict_normalisation_hint_offers_plain_0_to_1(tmp_path: Path) -> None:
    from stjfd_convert.export.predict import _clip_normalization
    from stjfd_convert.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _clip_normalization({}, None, None, tmp_path / "m.onnx")
    assert "--mean 0,0,0 --std 1,1,1" in info.value.one_line()


def test_sample_model_converts_with_its_training_normalisation(tmp_path: Path) -> None:
    from stjfd_convert.sample import SAMPLE_CLASSES, SAMPLE_MODEL_NAME, sample_model_files
    from stjfd_convert.workflows import convert_checkpoint

    result = convert_checkpoint(
        sample_model_files().weights, ConvertConfig(), model=SAMPLE_MODEL_NAME, input_shape=(1, 3, 16, 64, 64),
        output=tmp_path / "conv", parity=False,
    )
    manifest = json.loads((result.output / "model.stjfd.json").read_text())
    assert manifest["classes"] == list(SAMPLE_CLASSES)
    assert manifest["normalization"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    assert np.isfinite(manifest["parameters"])
