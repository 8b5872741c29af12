"""Input adapters (#12 item 1): --input-layout / --input-dtype on plan, report, export and predict with the
manifest as default, --size HxW with --resize-mode crop|stretch, and --no-normalize.

Everything runs on a tiny model that takes raw uint8 frames [B, T, H, W, 3] at a non-square 32×48, made here
from its source text, and on tiny videos written by tests/videos.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import assert_one_error_line, run_cli
from videos import indexed_frames, moving_shape_frames, write_video

from stjfd_convert.data import ClipConfig, ClipDataset, VideoSource
from stjfd_convert.layouts import ClipLayoutHook, folder_input, from_bcthw, resolve_input_format, to_bcthw
from stjfd_convert.saved_model import load_converted, read_manifest, save_converted

SEED = 0
ATOL_FP32 = 1e-5  # float32 rounding of the same arithmetic
ATOL_ORT = 1e-4  # onnxruntime vs PyTorch (export's own default tolerance)
T, H, W = 8, 32, 48  # non-square frames
SHAPE_BTHWC = (1, T, H, W, 3)

FRAMES_SOURCE = '''
import torch
from torch import nn


class Frames(nn.Module):
    """Raw uint8 frames [B, T, H, W, 3] in (nothing else: every command must feed it those), class logits out."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU()
        )
        self.head = nn.Linear(6, 3)

    def forward(self, frames):
        if frames.dtype != torch.uint8 or frames.shape[-1] != 3:
            raise TypeError(f"Frames takes uint8 [B, T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        x = frames.permute(0, 4, 1, 2, 3).float() / 255
        return self.head(self.body(x).mean(dim=(2, 3, 4)))


def build():
    return Frames()
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``plain``: converted with convert's options only (no layout recorded); ``conv``: the same model saved
    with ``save_converted(input_layout="BTHWC")``; a video; the model file."""
    root = tmp_path_factory.mktemp("adapters")
    (root / "frames.py").write_text(FRAMES_SOURCE)
    namespace: dict = {}
    exec(FRAMES_SOURCE, namespace)
    torch.manual_seed(SEED)
    torch.save(namespace["build"]().state_dict(), root / "frames.pth")
    model = f"{root / 'frames.py'}:build"
    shape = ",".join(map(str, SHAPE_BTHWC))
    outcome = run_cli(["convert", root / "frames.pth", "--model", model, "--input-shape", shape,
                       "--input-dtype", "uint8", "--atoms", 4, "-o", root / "plain", "--json"])
    assert outcome.exit_code == 0, outcome.output
    loaded = load_converted(root / "plain", trust_code=True)
    save_converted(loaded.model, root / "conv", loaded.spec, input_shape=SHAPE_BTHWC, input_dtype="uint8",
                   input_layout="BTHWC")
    write_video(root / "clip.mp4", moving_shape_frames(0, 12, 36, 52, seed=SEED))
    return {"root": root, "plain": root / "plain", "conv": root / "conv", "video": root / "clip.mp4", "model": Path(model)}


# --------------------------------------------------------------------------------------------
# The manifest records the layout; later commands take it as their default
# --------------------------------------------------------------------------------------------


def test_manifest_records_the_layout_only_when_given(toy: dict[str, Path]) -> None:
    assert read_manifest(toy["conv"])["input"] == {"shape": list(SHAPE_BTHWC), "dtype": "uint8", "layout": "BTHWC"}
    assert "layout" not in read_manifest(toy["plain"])["input"]  # default behaviour unchanged
    assert resolve_input_format(read_manifest(toy["conv"])) == ("BTHWC", "uint8")
    assert resolve_input_format(read_manifest(toy["plain"])) == ("BCTHW", "uint8")
    assert resolve_input_format(read_manifest(toy["conv"]), "btchw", "float32") == ("BTCHW", "float32")  # given wins
    # A recorded shape follows a layout given on the command line.
    assert folder_input(toy["conv"], None, "BCTHW", None) == ((1, 3, T, H, W), "BCTHW", "uint8")


def test_shapes_and_the_layout_hook_are_permutations() -> None:
    assert to_bcthw(SHAPE_BTHWC, "BTHWC") == (1, 3, T, H, W)
    assert from_bcthw((1, 3, T, H, W), "BTCHW") == (1, T, 3, H, W)
    assert to_bcthw(((1, 2, 8, 8, 3), (1, 8, 8, 8, 3)), "BTHWC") == ((1, 3, 2, 8, 8), (1, 3, 8, 8, 8))
    clip = torch.rand(2, 3, T, H, W)
    hook = ClipLayoutHook("BTHWC")
    (adapted,) = hook(None, (clip,))
    assert torch.equal(adapted, clip.permute(0, 2, 3, 4, 1))
    (raw,) = ClipLayoutHook("BTHWC", "uint8")(None, (clip,))
    assert raw.dtype == torch.uint8 and raw.shape == (2, T, H, W, 3)


# --------------------------------------------------------------------------------------------
# plan, report, export + onnxruntime, predict on the uint8 BTHWC model, end to end from the CLI
# --------------------------------------------------------------------------------------------


def test_plan_times_the_recorded_uint8_channels_last_clip(toy: dict[str, Path]) -> None:
    outcome = run_cli(["plan", toy["conv"], "--trust-code", "--repeats", 1, "--dry-run", "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["input_layout"] == "BTHWC" and data["input_dtype"] == "uint8"
    assert data["input_shape"] == list(SHAPE_BTHWC)
    assert data["layers"] and data["layers"][0]["input_shape"] == [1, 3, T, H, W]  # what the first conv sees


def test_report_downsamples_time_height_and_width_of_a_channels_last_clip(toy: dict[str, Path]) -> None:
    outcome = run_cli(["report", toy["conv"], "--trust-code", "--steps", 1, "--device", "cpu", "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["input_shape"] == [1, 3, T, H, W]  # the report's B×C×T×H×W
    assert data["settings"]["input_layout"] == "BTHWC" and data["settings"]["input_dtype"] == "uint8"
    clips = {row["key"]: row["input_shape"] for row in data["training"]}
    assert clips["joint"] == [1, 3, T, H, W]
    assert clips["temporal"] == [1, 3, T, H // 2, W // 2]  # frames shrunk, every frame kept
    assert clips["spatial"] == [1, 3, T // 2, H, W]  # every 2nd frame, full frames
    assert any("BTHWC uint8" in note for note in data["notes"])
    # The clip is measured as the raw frames it is: one byte per value.
    for side in ("original", "converted"):
        assert data["inference"][side]["input_bytes"] == 3 * T * H * W
    # Given explicitly on a folder that records nothing, the same report.
    outcome = run_cli(["report", toy["plain"], "--trust-code", "--steps", 1, "--device", "cpu", "--no-training",
                       "--input-layout", "BTHWC", "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["input_shape"] == [1, 3, T, H, W]


def test_export_places_dynamic_axes_by_layout_and_predict_feeds_raw_frames(toy: dict[str, Path], tmp_path: Path) -> None:
    import onnxruntime as ort

    onnx = tmp_path / "frames.onnx"
    outcome = run_cli(["export", toy["conv"], "--onnx", onnx, "--trust-code", "--dynamic", "batch,time", "--clips", 3,
                       "--runs", 1, "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["validation"]["passed"] and data["input_shape"] == list(SHAPE_BTHWC)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    assert graph_input.type == "tensor(uint8)"
    assert graph_input.shape == ["batch", "time", H, W, 3]  # batch and time where BTHWC keeps them
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["stjfd.layout"] == "NTHWC" and meta["stjfd.input_dtype"] == "uint8"

    outcome = run_cli(["predict", onnx, toy["video"], "--json"])
    assert outcome.exit_code == 0, outcome.output
    prediction = json.loads(outcome.stdout)
    assert prediction["input_shape"] == list(SHAPE_BTHWC)
    assert prediction["input_layout"] == "BTHWC" and prediction["input_dtype"] == "uint8"
    assert prediction["normalization"] is None
    # The logits are the PyTorch model's on the same centre clip decoded as uint8 [T, H, W, 3].
    config = ClipConfig(clip_len=T, size=(H, W), layout="THWC", dtype="uint8")
    clip, _ = ClipDataset([VideoSource(toy["video"], -1)], ["v"], config, probe="none")[0]
    with torch.no_grad():
        logits = load_converted(toy["conv"], trust_code=True).model(clip.unsqueeze(0))[0]
    top = prediction["top"][0]
    assert top["index"] == int(logits.argmax())
    assert top["logit"] == pytest.approx(float(logits.max()), abs=ATOL_ORT)

    # --size sets the dynamic axes only; fixed ones are refused, as is a dtype the graph does not take.
    assert_one_error_line(run_cli(["predict", onnx, toy["video"], "--size", "16x16"]), "--size 16x16", "32x48")
    assert_one_error_line(run_cli(["predict", onnx, toy["video"], "--input-dtype", "float32"]),
                          "--input-dtype float32", "uint8")


def test_export_layout_given_on_a_folder_that_records_none(toy: dict[str, Path], tmp_path: Path) -> None:
    onnx = tmp_path / "plain.onnx"
    outcome = run_cli(["export", toy["plain"], "--onnx", onnx, "--trust-code", "--input-layout", "BTHWC", "--dynamic",
                       "height,width", "--clips", 3, "--runs", 0, "--json"])
    assert outcome.exit_code == 0, outcome.output
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, T, "height", "width", 3]
    outcome = run_cli(["predict", onnx, toy["video"], "--size", "24x40", "--resize-mode", "stretch", "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["input_shape"] == [1, T, 24, 40, 3]


def test_forms_are_planned_on_the_raw_frames_the_model_takes(toy: dict[str, Path], tmp_path: Path) -> None:
    """``export --mode auto --measure`` and ``deploy(input_shape=…)`` trace the layers by running the model, which
    refuses anything but uint8 frames: they must feed it those."""
    from stjfd_convert import deploy

    onnx = tmp_path / "measured.onnx"
    outcome = run_cli(["export", toy["conv"], "--onnx", onnx, "--trust-code", "--mode", "auto", "--measure",
                       "--measure-repeats", 1, "--clips", 1, "--runs", 0, "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["validation"]["passed"] and "measured in onnxruntime" in data["plan_source"]

    model = load_converted(toy["conv"], trust_code=True).model.eval()
    deployed = deploy(model, input_shape=SHAPE_BTHWC, input_dtype=torch.uint8)
    frames = torch.randint(0, 256, SHAPE_BTHWC, generator=torch.Generator().manual_seed(SEED), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(deployed(frames), model(frames), atol=ATOL_FP32, rtol=0)


# --------------------------------------------------------------------------------------------
# --size HxW with --resize-mode crop | stretch, and --no-normalize
# --------------------------------------------------------------------------------------------


def _decoded(video: Path, **options: object) -> torch.Tensor:
    config = ClipConfig(clip_len=4, layout="THWC", dtype="uint8", **options)  # type: ignore[arg-type]
    clip, _ = ClipDataset([VideoSource(video, -1)], ["v"], config, probe="none")[0]
    return clip


def test_stretch_resizes_the_whole_frame_and_crop_cuts_it(tmp_path: Path) -> None:
    video = write_video(tmp_path / "indexed.mkv", indexed_frames(6, 32, 32))  # lossless: exact frames back
    full = _decoded(video, size=(32, 32), resize=32)  # no resize, no crop: the frames as decoded
    stretched = _decoded(video, size=(24, 48), resize_mode="stretch")
    cropped = _decoded(video, size=(24, 48))
    assert stretched.shape == cropped.shape == (4, 24, 48, 3)
    nchw = full.permute(0, 3, 1, 2).float()
    expected = F.interpolate(nchw, size=(24, 48), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(stretched.permute(0, 3, 1, 2).float(), expected.round(), atol=1.0)  # uint8 rounding only
    # Blue rises top→bottom: stretch keeps the whole range, crop (a 48×48 resize cut to 24 rows) only the middle.
    blue_span = lambda clip: int(clip[0, -1, 0, 2]) - int(clip[0, 0, 0, 2])  # noqa: E731
    assert blue_span(stretched) > 1.5 * blue_span(cropped)


def test_no_normalize_gives_frames_scaled_to_one(tmp_path: Path) -> None:
    """Evaluation clips of a folder that records a normalisation: with it by default, 0..1 frames without."""
    from stjfd_convert.finetune.evaluation import _recorded_clip_config

    video = write_video(tmp_path / "indexed.mkv", indexed_frames(6, 32, 32))
    loaded = load_converted(_float_folder(tmp_path), trust_code=True)
    recorded = _recorded_clip_config(tmp_path, loaded, {}, clip_len=None, size=None, frame_stride=None,
                                     clips_per_video=None, mean=None, std=None)
    assert recorded.mean == (0.5, 0.5, 0.5) and recorded.std == (0.25, 0.25, 0.25)
    plain = _recorded_clip_config(tmp_path, loaded, {}, clip_len=None, size=None, frame_stride=None,
                                  clips_per_video=None, mean=None, std=None, normalize=False)
    assert plain.mean is None and plain.std is None
    raw = _decoded(video, size=(32, 32)).float()  # the same clip as raw uint8 frames
    values, _ = ClipDataset([VideoSource(video, -1)], ["v"], plain, probe="none")[0]  # CTHW float
    assert torch.allclose(values.permute(1, 2, 3, 0), raw / 255, atol=ATOL_FP32)
    normalised, _ = ClipDataset([VideoSource(video, -1)], ["v"], recorded, probe="none")[0]
    assert torch.allclose(normalised, (values - 0.5) / 0.25, atol=ATOL_FP32)


def _float_folder(root: Path) -> Path:
    """A float BCTHW model's folder that records a normalisation (mean 0.5, std 0.25) and a 4×32×32 clip."""
    from torch import nn

    from stjfd_convert.models import ArchSpec

    folder = root / "float"
    torch.manual_seed(SEED)
    net = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    (root / "net.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Conv3d(3, 4, 3, "
                                 "padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))\n")
    save_converted(net, folder, ArchSpec("callable", f"{root / 'net.py'}:build"), input_shape=(1, 3, 4, 32, 32),
                   extra={"normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    return folder


def test_predict_no_normalize_feeds_zero_to_one_frames(tmp_path: Path) -> None:
    folder = _float_folder(tmp_path)
    video = write_video(tmp_path / "v.mp4", moving_shape_frames(1, 8, 32, 32, seed=SEED))
    onnx = tmp_path / "float.onnx"
    assert run_cli(["export", folder, "--onnx", onnx, "--trust-code", "--runs", 0, "--clips", 1]).exit_code == 0
    outcome = run_cli(["predict", onnx, video, "--no-normalize", "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["normalization"] == {"mean": [0.0] * 3, "std": [1.0] * 3} and "no-normalize" in data["normalization_source"]
    assert json.loads(run_cli(["predict", onnx, video, "--json"]).stdout)["normalization"]["mean"] == [0.5] * 3
    config = ClipConfig(clip_len=4, size=(32, 32))
    clip, _ = ClipDataset([VideoSource(video, -1)], ["v"], config, probe="none")[0]
    with torch.no_grad():
        logits = load_converted(folder, trust_code=True).model(clip.unsqueeze(0))[0]
    assert data["top"][0]["logit"] == pytest.approx(float(logits.max()), abs=ATOL_ORT)
    assert_one_error_line(run_cli(["predict", onnx, video, "--no-normalize", "--mean", "0,0,0", "--std", "1,1,1"]),
                          "--no-normalize", "--mean")


# --------------------------------------------------------------------------------------------
# evaluate / compare / finetune read them from the folder and accept them explicitly
# --------------------------------------------------------------------------------------------


def test_compare_reads_layout_and_size_from_a_converted_folder(toy: dict[str, Path], tmp_path: Path) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    write_video(clips / "a.mp4", moving_shape_frames(2, 12, 36, 52, seed=SEED))
    original = toy["root"] / "frames.pth"
    outcome = run_cli(["compare", original, toy["conv"], clips, "--model", toy["model"], "--json"])
    assert outcome.exit_code == 0, outcome.output  # uint8 [1, 8, 32, 48, 3] from the manifest alone
    outcome = run_cli(["compare", original, toy["plain"], clips, "--model", toy["model"], "--input-layout", "BTHWC",
                       "--size", "32x48", "--clip-len", T, "--resize-mode", "stretch", "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["clips"] == 1


def test_finetune_records_stretch_and_no_normalize_for_evaluate(toy: dict[str, Path], tmp_path: Path) -> None:
    from videos import make_video_dataset

    data = tmp_path / "data"
    make_video_dataset(data, per_class=2, T=10, H=36, W=52, seed=SEED)
    run = tmp_path / "run"
    outcome = run_cli(["finetune", toy["conv"], data, "--model", toy["model"], "--clip-len", T, "--size", f"{H}x{W}",
                       "--resize-mode", "stretch", "--no-normalize", "--val-split", "0.5", "--batch-size", 2,
                       "--workers", 0, "--device", "cpu", "--bn-recal-batches", 0, "--no-plot", "-o", run, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert [s["input_shape"] for s in json.loads(outcome.stdout)["stages"]][0] == [2, T, H // 2, W // 2, 3]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["resize_mode"] == "stretch" and config["data"]["normalize"] is False
    assert config["data"]["layout"] == "THWC" and config["data"]["dtype"] == "uint8"  # from the manifest
    best = read_manifest(run / "last")
    assert best["input"] == {"shape": list(SHAPE_BTHWC), "dtype": "uint8", "layout": "BTHWC"}
    assert best["finetune"]["clip"]["resize_mode"] == "stretch"
    outcome = run_cli(["evaluate", run / "last", data, "--trust-code", "--json"])
    assert outcome.exit_code == 0, outcome.output


def test_finetune_no_flip_never_mirrors_training_clips(toy: dict[str, Path], tmp_path: Path) -> None:
    """``--no-flip`` is recorded in the run, so the training clips it (and a resume) builds are never mirrored:
    green rises left→right in every clip. The same data with flipping on mirrors some of them."""
    from stjfd_convert.finetune.run import _build_data

    data = tmp_path / "data"
    for label in ("a", "b", "c"):  # the toy predicts three classes
        for index in range(2):
            write_video(data / label / f"v{index}.mp4", indexed_frames(12, H + 4, W + 4))
    run = tmp_path / "run"
    outcome = run_cli(["finetune", toy["conv"], data, "--model", toy["model"], "--clip-len", T, "--size", f"{H}x{W}",
                       "--no-flip", "--val-split", "0.5", "--batch-size", 2, "--workers", 0, "--device", "cpu",
                       "--bn-recal-batches", 0, "--no-plot", "-o", run, "--json"])
    assert outcome.exit_code == 0, outcome.output
    recorded = json.loads((run / "config.json").read_text())["data"]
    assert recorded["flip"] is False

    def mirrored(record: dict) -> set[bool]:
        train, _, _ = _build_data(record, None, SEED, None)
        seen = set()
        for epoch in range(4):
            train.set_epoch(epoch)
            for index in range(len(train)):
                green = train[index][0][0, 0, :, 1].int()  # THWC uint8: first frame, top row, green
                seen.add(bool(green[0] > green[-1]))
        return seen

    assert mirrored(recorded) == {False}
    assert mirrored({**recorded, "flip": True}) == {True, False}
    assert_one_error_line(run_cli(["finetune", run, "--resume", "--no-flip", "--trust-code"]), "--no-flip", "resum")


def test_bad_adapter_values_on_a_folder_are_one_line(toy: dict[str, Path], tmp_path: Path) -> None:
    assert_one_error_line(run_cli(["plan", toy["conv"], "--input-layout", "BHWTC"]), "--input-layout", "BTHWC")
    assert_one_error_line(run_cli(["report", toy["conv"], "--input-dtype", "int16"]), "--input-dtype", "uint8")
    assert_one_error_line(run_cli(["report", toy["conv"], "--trust-code", "--input-shape", "1,8,32,48",
                                   "--input-layout", "BTHWC"]), "--input-shape", "5 entries")
    assert_one_error_line(run_cli(["evaluate", toy["conv"], tmp_path, "--resize-mode", "fill"]), "--resize-mode")
    assert not list(tmp_path.iterdir())
    np.testing.assert_equal(read_manifest(toy["conv"])["input"]["layout"], "BTHWC")
