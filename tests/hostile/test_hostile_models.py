"""Hostile models, checkpoints, converted folders and options (issue #15 items 4 and 5).

Every refused case goes through :func:`hostile_checks.refused`: exit code 2, one ``error: <what> — <fix>``
line naming the problem, and the temporary tree exactly as it was (no output, no staging folder). The
inputs are the CLI tests' tiny model (3 Conv3d, 4 classes) and tiny videos (8 frames of 16×16), so every
case runs in about a second.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import TINY_INPUT_SHAPE, TinyFiles, assert_no_output, run_cli, tiny_state_dict, write_tiny
from hostile_checks import refused
from videos import make_video_dataset, moving_shape_frames, write_video

from stjfd_convert import parity
from stjfd_convert.config import ConvertConfig
from stjfd_convert.workflows import convert_checkpoint

CLIP_LEN, SIZE = 4, 8  # the tiny model's clip (TINY_INPUT_SHAPE 1,3,4,8,8)
VIDEO_FRAMES, VIDEO_SIDE = 8, 16
TINY_CLASSES = 4


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STJFD_DEBUG", raising=False)


# --------------------------------------------------------------------------------------------
# Shared inputs (module scope: built once, outside each test's tmp_path, never modified)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile-models")
    tiny = write_tiny(root / "tiny")
    converted = convert_checkpoint(
        tiny.checkpoint, ConvertConfig(spatial_atoms=4), model=tiny.model_arg, input_shape=(1, 3, CLIP_LEN, SIZE, SIZE),
        output=root / "tiny-stjfd",
    ).output
    data = root / "data"
    make_video_dataset(data, per_class=2, T=VIDEO_FRAMES, H=VIDEO_SIDE, W=VIDEO_SIDE)
    return {"root": root, "tiny": tiny, "converted": converted, "data": data}


@pytest.fixture(scope="module")
def onnx_file(inputs: dict[str, Any]) -> Path:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = inputs["root"] / "tiny.onnx"
    outcome = run_cli(["export", inputs["converted"], "--trust-code", "--onnx", path, "--mean", "0,0,0", "--std", "1,1,1",
                       "--runs", "0", "--clips", "1"])
    assert outcome.exit_code == 0, outcome.output
    return path


def _copy_converted(inputs: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(inputs["converted"], tmp_path / "conv"))


def _poison(folder: Path, key_suffix: str, value: float) -> str:
    """Write ``value`` into the first tensor of ``folder``'s weights whose name ends with ``key_suffix``."""
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in sorted(tensors) if k.endswith(key_suffix))
    tensors[key].view(-1)[0] = value
    save_file(tensors, weights)
    return key


def _corrupt_frames(folder: Path) -> list[Path]:
    """Overwrite the frame data (the ``mdat`` box) of every .mp4 under ``folder``: the header (``moov``) still
    opens, every frame fails to decode."""
    videos = sorted(folder.rglob("*.mp4"))
    for path in videos:
        data = bytearray(path.read_bytes())
        at = data.find(b"mdat")
        size = int.from_bytes(data[at - 4 : at], "big")
        data[at + 4 : at - 4 + size] = np.random.default_rng(0).integers(0, 256, size - 8, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
    return videos


# --------------------------------------------------------------------------------------------
# Item 4: devices, outputs that are folders, inputs too large, list inputs, undecodable videos
# --------------------------------------------------------------------------------------------


def _device_args(inputs: dict[str, Any], tmp_path: Path, command: str, device: str) -> list[Any]:
    converted, data = inputs["converted"], inputs["data"]
    if command == "plan":
        return ["plan", converted, "--trust-code", "--device", device, "--dry-run"]
    if command == "report":
        return ["report", converted, "--trust-code", "--steps", "1", "--device", device]
    if command == "evaluate":
        return ["evaluate", converted, data, "--trust-code", "--clip-len", CLIP_LEN, "--size", SIZE, "--workers", "0",
                "--device", device]
    return ["finetune", converted, data, "--trust-code", "-o", tmp_path / "run", "--clip-len", CLIP_LEN, "--size", SIZE,
            "--val-split", "0.5", "--workers", "0", "--device", device]


@pytest.mark.parametrize("command", ["plan", "report", "evaluate", "finetune"])
def test_unknown_device_is_refused(inputs: dict[str, Any], tmp_path: Path, command: str) -> None:
    line = refused(tmp_path, _device_args(inputs, tmp_path, command, "tpu"), "--device", "tpu")
    assert "cpu" in line.split(" — ", 1)[1]
    assert_no_output(tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
@pytest.mark.parametrize("command", ["plan", "evaluate", "finetune"])
def test_cuda_without_a_gpu_is_refused(inputs: dict[str, Any], tmp_path: Path, command: str) -> None:
    refused(tmp_path, _device_args(inputs, tmp_path, command, "cuda"), "--device cuda", "no CUDA device", "--device cpu")


def test_report_plot_to_a_folder_is_refused(inputs: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "plots").mkdir()
    refused(tmp_path, ["report", inputs["converted"], "--trust-code", "--steps", "1", "--plot", tmp_path / "plots"],
            "plots", "folder")


@pytest.mark.parametrize("command", ["convert", "plan", "export", "report"])
def test_huge_input_shape_is_refused_before_allocating(
    inputs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    # 64×3×64×448×448 float32 is 9.2 GiB; with 8 GiB available it is refused before any tensor is made.
    monkeypatch.setattr(parity, "available_memory", lambda: 8 * 2**30)
    allocations: list[tuple[int, ...]] = []
    real_randn = torch.randn

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        shape = tuple(args[0]) if args and isinstance(args[0], (tuple, list, torch.Size)) else ()
        allocations.append(shape)
        if shape and int(np.prod(shape)) > 10**8:  # never really allocate it, even if the check is missing
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (the test refuses to)")
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    tiny: TinyFiles = inputs["tiny"]
    huge = ["--input-shape", "64,3,64,448,448"]
    args = {
        "convert": ["convert", tiny.checkpoint, "--model", tiny.model_arg, *huge, "-o", tmp_path / "out"],
        "plan": ["plan", inputs["converted"], "--trust-code", *huge, "--dry-run"],
        "export": ["export", inputs["converted"], "--trust-code", *huge, "--onnx", tmp_path / "m.onnx"],
        "report": ["report", inputs["converted"], "--trust-code", *huge, "--no-training"],
    }[command]
    refused(tmp_path, args, "--input-shape 64,3,64,448,448", "GiB", "smaller --input-shape")
    assert (64, 3, 64, 448, 448) not in allocations


OOM_SOURCE = '''
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3)

    def forward(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")


def build():
    return Net()
'''

LIST_INPUT_SOURCE = '''
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.slow = nn.Conv3d(3, 4, 3, padding=1)
        self.fast = nn.Conv3d(3, 4, 3, padding=1)

    def forward(self, x):
        slow, fast = x
        return self.slow(slow).mean((2, 3, 4)) + self.fast(fast).mean((2, 3, 4))


def build():
    return Net()
'''


def test_model_out_of_memory_is_named(tmp_path: Path) -> None:
    (tmp_path / "oomnet.py").write_text(OOM_SOURCE)
    refused(tmp_path, ["convert", "--model", f"{tmp_path / 'oomnet.py'}:build", "--input-shape", TINY_INPUT_SHAPE,
                       "-o", tmp_path / "out"], "ran out of memory", "smaller --input-shape")


@pytest.mark.parametrize("command", ["report", "convert", "export"])
def test_model_that_needs_a_list_input(tmp_path: Path, command: str) -> None:
    (tmp_path / "listnet.py").write_text(LIST_INPUT_SOURCE)
    torch.save({"slow.weight": torch.zeros(4, 3, 3, 3, 3), "slow.bias": torch.zeros(4),
                "fast.weight": torch.zeros(4, 3, 3, 3, 3), "fast.bias": torch.zeros(4)}, tmp_path / "list.pth")
    args = [tmp_path / "list.pth", "--model", f"{tmp_path / 'listnet.py'}:build", "--input-shape", TINY_INPUT_SHAPE]
    extra = {"report": ["--steps", "1"], "convert": ["-o", tmp_path / "out"], "export": ["--onnx", tmp_path / "m.onnx"]}
    refused(tmp_path, [command, *args, *extra[command]], "not enough values to unpack", "--input-shape")


@pytest.mark.parametrize("workers", [0, 1])
def test_video_whose_frames_do_not_decode(inputs: dict[str, Any], tmp_path: Path, workers: int) -> None:
    data = Path(shutil.copytree(inputs["data"], tmp_path / "data"))
    _corrupt_frames(data)
    line = refused(tmp_path, ["evaluate", inputs["converted"], data, "--trust-code", "--clip-len", CLIP_LEN, "--size",
                              SIZE, "--workers", workers], ".mp4", "cannot be read", "re-encode")
    assert "Caught" not in line and "worker.py" not in line and "Original Traceback" not in line
    # The worker that failed is stopped: nothing is left for the interpreter's exit to wait on (its workers
    # ignore SIGTERM, so a live one would hang `stjfd` after printing the error).
    assert multiprocessing.active_children() == []


# --------------------------------------------------------------------------------------------
# Item 5: wrong results that used to be accepted silently
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "Inf")])
@pytest.mark.parametrize("command", ["plan", "report", "evaluate", "export"])
def test_nonfinite_weights_in_a_converted_folder(
    inputs: dict[str, Any], tmp_path: Path, command: str, value: float, word: str
) -> None:
    folder = _copy_converted(inputs, tmp_path)
    key = _poison(folder, "coefficients", value)
    args = {
        "plan": ["plan", folder, "--trust-code"],
        "report": ["report", folder, "--trust-code", "--steps", "1"],
        "evaluate": ["evaluate", folder, inputs["data"], "--trust-code", "--clip-len", CLIP_LEN, "--size", SIZE],
        "export": ["export", folder, "--trust-code", "--onnx", tmp_path / "m.onnx"],
    }[command]
    refused(tmp_path, args, f"model.safetensors: {key} holds {word}", "reconvert")


def test_one_class_dataset_is_refused(inputs: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "one"
    make_video_dataset(data, classes=["only"], per_class=3, T=VIDEO_FRAMES, H=VIDEO_SIDE, W=VIDEO_SIDE)
    refused(tmp_path, ["finetune", inputs["converted"], data, "--trust-code", "-o", tmp_path / "run", "--clip-len",
                       CLIP_LEN, "--size", SIZE, "--val-split", "0.34", "--workers", "0"], "only one class", "two")


@pytest.mark.parametrize("count", [2, 5])
def test_predict_labels_must_match_the_classes(onnx_file: Path, inputs: dict[str, Any], tmp_path: Path,
                                               count: int) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class{i}\n" for i in range(count)))
    video = next(inputs["data"].rglob("*.mp4"))
    refused(tmp_path, ["predict", onnx_file, video, "--labels", labels], f"{count} labels",
            f"{TINY_CLASSES} classes", f"exactly {TINY_CLASSES}")


@pytest.mark.parametrize("frames", [1, 2])
def test_predict_warns_when_the_video_is_shorter_than_the_clip(onnx_file: Path, tmp_path: Path, frames: int) -> None:
    video = write_video(tmp_path / f"short{frames}.mp4", moving_shape_frames(0, frames, VIDEO_SIDE, VIDEO_SIDE, 0))
    outcome = run_cli(["predict", onnx_file, video, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["warnings"]
    if outcome.stderr is not None:
        assert f"warning: short{frames}.mp4 has {frames} frame" in outcome.stderr
        assert "repeated" in outcome.stderr and f"the {CLIP_LEN}" in outcome.stderr


def test_predict_of_a_long_enough_video_has_no_warning(onnx_file: Path, inputs: dict[str, Any]) -> None:
    outcome = run_cli(["predict", onnx_file, next(inputs["data"].rglob("*.mp4")), "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["warnings"] == []
    assert "warning" not in (outcome.stderr or "")


def test_evaluate_warns_when_videos_are_shorter_than_the_models_clip(inputs: dict[str, Any], tmp_path: Path) -> None:
    # The clip length comes from the model (4 frames): one-frame videos are looped, and a warning says so.
    data = tmp_path / "short"
    for i, kind in enumerate(("blink", "left_right", "top_bottom")):
        write_video(data / kind / "one.mp4", moving_shape_frames(i, 1, VIDEO_SIDE, VIDEO_SIDE, i))
    outcome = run_cli(["evaluate", inputs["converted"], data, "--trust-code", "--workers", "0", "--json"])
    assert outcome.exit_code == 0, outcome.output
    [warning] = json.loads(outcome.stdout)["warnings"]
    assert "3 of 3 videos" in warning and f"the {CLIP_LEN} a clip spans" in warning and "repeated" in warning
    if outcome.stderr is not None:
        assert outcome.stderr.strip() == f"warning: {warning}"


def test_evaluate_of_long_enough_videos_has_no_warning(inputs: dict[str, Any]) -> None:
    outcome = run_cli(["evaluate", inputs["converted"], inputs["data"], "--trust-code", "--workers", "0", "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["warnings"] == []


def _finetune(inputs: dict[str, Any], tmp_path: Path, *options: Any) -> list[Any]:
    return ["finetune", inputs["converted"], inputs["data"], "--trust-code", "-o", tmp_path / "run", "--size", SIZE,
            "--val-split", "0.5", "--workers", "0", *options]


def test_evaluate_clip_far_longer_than_every_video_warns(inputs: dict[str, Any]) -> None:
    outcome = run_cli(["evaluate", inputs["converted"], inputs["data"], "--trust-code", "--clip-len", "1000", "--size",
                       SIZE, "--workers", "0", "--json"])
    assert outcome.exit_code == 0, outcome.output
    [warning] = json.loads(outcome.stdout)["warnings"]
    assert "6 of 6 videos" in warning and "the 1000 a clip spans" in warning
    assert f"the longest has {VIDEO_FRAMES}" in warning and "repeated" in warning


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--clip-len", "1000"], ["1000 frames", f"longest video has {VIDEO_FRAMES}", "--clip-len"]),
        (["--clip-len", CLIP_LEN, "--temporal-downsample", "100"], ["--temporal-downsample 100", "1 frame", "-r 3"]),
        (["--clip-len", CLIP_LEN, "--spatial-downsample", "100"], ["--spatial-downsample 100", "1 pixel", "-s 4"]),
    ],
)
def test_finetune_clips_that_cannot_be_trained_on(
    inputs: dict[str, Any], tmp_path: Path, options: list[Any], fragments: list[str]
) -> None:
    refused(tmp_path, _finetune(inputs, tmp_path, *options), *fragments)


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--clips", "0"], ["--clips", "≥ 1", "got 0"]),
        (["--clip-len", "0"], ["--clip-len", "≥ 1", "got 0"]),
        (["--frame-stride", "0"], ["--frame-stride", "≥ 1", "got 0"]),
    ],
)
def test_evaluate_zero_clips_or_frames(inputs: dict[str, Any], tmp_path: Path, options: list[str],
                                       fragments: list[str]) -> None:
    base = ["evaluate", inputs["converted"], inputs["data"], "--trust-code", "--size", SIZE]
    if "--clip-len" not in options:
        base += ["--clip-len", CLIP_LEN]
    refused(tmp_path, [*base, *options], *fragments)


@pytest.mark.parametrize(
    "mean, std, fragments",
    [
        ("1,2", "1,1", ["--mean has 2 values", "3 channels"]),
        ("0,0,0", "1,0,1", ["std > 0"]),
        ("nan,0,0", "1,1,1", ["finite"]),
        ("0,0,0", "1,1", ["--std 2"]),
    ],
)
def test_export_normalisation_must_fit_the_input(
    inputs: dict[str, Any], tmp_path: Path, mean: str, std: str, fragments: list[str]
) -> None:
    refused(tmp_path, ["export", inputs["converted"], "--trust-code", "--onnx", tmp_path / "m.onnx", "--mean", mean,
                       "--std", std], *fragments)


def test_predict_normalisation_must_fit_the_input(onnx_file: Path, inputs: dict[str, Any], tmp_path: Path) -> None:
    refused(tmp_path, ["predict", onnx_file, next(inputs["data"].rglob("*.mp4")), "--mean", "1,2", "--std", "1,1"],
            "--mean has 2 values", "3 channels")


# --------------------------------------------------------------------------------------------
# Hostile checkpoints: empty, truncated, random bytes, code on unpickling, lying safetensors headers
# --------------------------------------------------------------------------------------------


def _write_bad_checkpoint(tmp_path: Path, kind: str, suffix: str) -> Path:
    path = tmp_path / f"bad{suffix}"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:  # truncated: a real checkpoint cut in half
        good = tmp_path / f"good{suffix}"
        state = tiny_state_dict()
        if suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in state.items()}, good)
        else:
            torch.save(state, good)
        data = good.read_bytes()
        good.unlink()
        path.write_bytes(data[: len(data) // 2])
    return path


def _checkpoint_args(command: str, checkpoint: Path, tiny: TinyFiles, tmp_path: Path) -> list[Any]:
    base = [command, checkpoint, "--model", tiny.model_arg, "--input-shape", TINY_INPUT_SHAPE]
    return base + {"convert": ["-o", tmp_path / "out"], "report": ["--steps", "1"],
                   "export": ["--onnx", tmp_path / "m.onnx"]}[command]


@pytest.mark.parametrize("command", ["convert", "report", "export"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_broken_checkpoint(inputs: dict[str, Any], tmp_path: Path, command: str, suffix: str, kind: str) -> None:
    checkpoint = _write_bad_checkpoint(tmp_path, kind, suffix)
    refused(tmp_path, _checkpoint_args(command, checkpoint, inputs["tiny"], tmp_path), checkpoint.name)


class _WritesCanary:
    """Unpickling this would run code: it creates ``canary``."""

    def __init__(self, canary: Path) -> None:
        self.canary = str(canary)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.canary!r}, 'w').write('ran')",))


@pytest.mark.parametrize("command", ["convert", "report", "export"])
def test_pickle_that_would_run_code_is_not_unpickled(inputs: dict[str, Any], tmp_path: Path, command: str) -> None:
    canary = tmp_path / "CANARY"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_state_dict(), "payload": _WritesCanary(canary)}, checkpoint)
    refused(tmp_path, _checkpoint_args(command, checkpoint, inputs["tiny"], tmp_path), "evil.pth", "--trust-pickle")
    assert not canary.exists()


def _lying_safetensors(tmp_path: Path, lie: str) -> Path:
    path = tmp_path / f"{lie}.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_state_dict().items()}, path)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if lie == "header-length":  # the header claims to be longer than the whole file
        path.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
        return path
    # offsets past the end: the last tensor's data would lie beyond the file
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start + 10_000, end + 10_000]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    return path


@pytest.mark.parametrize("command", ["convert", "report", "export"])
@pytest.mark.parametrize("lie", ["header-length", "offsets"])
def test_safetensors_with_a_lying_header(inputs: dict[str, Any], tmp_path: Path, command: str, lie: str) -> None:
    checkpoint = _lying_safetensors(tmp_path, lie)
    refused(tmp_path, _checkpoint_args(command, checkpoint, inputs["tiny"], tmp_path), checkpoint.name)


def _bad_state(kind: str) -> dict[str, torch.Tensor]:
    state = tiny_state_dict()
    if kind == "wrong-shape":
        state["spatial.weight"] = torch.zeros(8, 8, 1, 5, 5)
    elif kind == "missing":
        del state["spatial.weight"]
    elif kind == "extra":
        state["surplus.weight"] = torch.zeros(3)
    elif kind == "nan":
        state["stem.weight"][0, 0, 1, 1, 1] = float("nan")
    else:
        state["fc.bias"][1] = float("-inf")
    return state


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("wrong-shape", ["spatial.weight"]),
        ("missing", ["spatial.weight"]),
        ("extra", ["surplus.weight"]),
        ("nan", ["stem.weight", "NaN"]),
        ("inf", ["fc.bias", "Inf"]),
    ],
)
def test_state_dict_that_does_not_fit(inputs: dict[str, Any], tmp_path: Path, kind: str, fragments: list[str]) -> None:
    checkpoint = tmp_path / f"{kind}.pth"
    torch.save(_bad_state(kind), checkpoint)
    refused(tmp_path, _checkpoint_args("convert", checkpoint, inputs["tiny"], tmp_path), *fragments)


# --------------------------------------------------------------------------------------------
# Converted folders whose manifest lies
# --------------------------------------------------------------------------------------------


def _edit_manifest(folder: Path, edit: str) -> None:
    path = folder / "model.stjfd.json"
    manifest = json.loads(path.read_text())
    if edit == "format-version":
        manifest["format_version"] = 99
    elif edit == "shape":
        manifest["layers"]["stem"]["spatial_atoms"] += 1
    else:  # channels
        manifest["layers"]["spatial"]["out_channels"] = 16
    path.write_text(json.dumps(manifest, indent=2))


@pytest.mark.parametrize(
    "edit, fragments",
    [
        ("format-version", ["99", "model.stjfd.json"]),
        ("shape", ["model.safetensors", "stem"]),
        ("channels", ["spatial", "16"]),
    ],
)
@pytest.mark.parametrize("command", ["plan", "export"])
def test_manifest_that_disagrees(
    inputs: dict[str, Any], tmp_path: Path, command: str, edit: str, fragments: list[str]
) -> None:
    folder = _copy_converted(inputs, tmp_path)
    _edit_manifest(folder, edit)
    args = ["plan", folder, "--trust-code"] if command == "plan" else ["export", folder, "--trust-code", "--onnx",
                                                                         tmp_path / "m.onnx"]
    refused(tmp_path, args, *fragments)


# --------------------------------------------------------------------------------------------
# Options out of range
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--atoms", "0"], ["--atoms", "got 0"]),
        (["--atoms", "-1"], ["--atoms", "got -1"]),
        (["--temporal-atoms", "0"], ["--temporal-atoms", "got 0"]),
        (["--budget", "2"], ["--budget", "(0, 1]"]),
        (["--budget", "0"], ["--budget", "(0, 1]"]),
        (["--energy", "1.5"], ["--energy", "(0, 1]"]),
    ],
)
def test_convert_option_out_of_range(inputs: dict[str, Any], tmp_path: Path, options: list[str],
                                     fragments: list[str]) -> None:
    refused(tmp_path, [*_checkpoint_args("convert", inputs["tiny"].checkpoint, inputs["tiny"], tmp_path), *options],
            *fragments)


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--opset", "3"], ["--opset 3", "opset from"]),
        (["--runs", "-1"], ["--runs", "≥ 0"]),
        (["--clips", "0"], ["--clips", "≥ 1"]),
        (["--atol", "-1"], ["--atol", "> 0"]),
        (["--threads", "-2"], ["--threads", "≥ 1"]),
    ],
)
def test_export_option_out_of_range(inputs: dict[str, Any], tmp_path: Path, options: list[str],
                                    fragments: list[str]) -> None:
    refused(tmp_path, ["export", inputs["converted"], "--trust-code", "--onnx", tmp_path / "m.onnx", *options],
            *fragments)


@pytest.mark.parametrize("repeats", ["0", "-3"])
def test_plan_repeats_out_of_range(inputs: dict[str, Any], tmp_path: Path, repeats: str) -> None:
    refused(tmp_path, ["plan", inputs["converted"], "--trust-code", "--repeats", repeats], "--repeats", "≥ 1")


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_report_steps_out_of_range(inputs: dict[str, Any], tmp_path: Path, steps: str) -> None:
    refused(tmp_path, ["report", inputs["converted"], "--trust-code", "--steps", steps], "--steps", "≥ 1")


# --------------------------------------------------------------------------------------------
# Outputs that cannot or must not be written
# --------------------------------------------------------------------------------------------


def _output_args(command: str, inputs: dict[str, Any], target: Path) -> list[Any]:
    tiny: TinyFiles = inputs["tiny"]
    if command == "convert":
        return ["convert", *tiny.args(), "-o", target]
    if command == "export":
        return ["export", inputs["converted"], "--trust-code", "--onnx", target, "--runs", "0", "--clips", "1"]
    return ["report", inputs["converted"], "--trust-code", "--steps", "1", "--markdown", target]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["convert", "export", "report"])
def test_output_in_a_read_only_folder(inputs: dict[str, Any], tmp_path: Path, command: str) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        name = {"convert": "out", "export": "m.onnx", "report": "r.md"}[command]
        refused(tmp_path, _output_args(command, inputs, locked / name), "locked")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("command", ["convert", "export", "report"])
def test_output_is_an_existing_plain_file(inputs: dict[str, Any], tmp_path: Path, command: str, force: bool) -> None:
    target = tmp_path / {"convert": "out", "export": "m.onnx", "report": "r.md"}[command]
    target.write_text("someone's notes\n")
    refused(tmp_path, [*_output_args(command, inputs, target), *(["--force"] if force else [])], target.name)
    assert target.read_text() == "someone's notes\n"
