"""Multi-input (multi-pathway) models: SlowFast-style ``[slow, fast]`` lists through every command."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_error_line, run_cli
from stjfd_convert.errors import ConfigError
from stjfd_convert.inputs import (
    check_pathway_strides,
    format_input_shape,
    make_model_input,
    parse_input_shape,
    parse_pathway_strides,
    pathway_input_shape,
    resize_input,
    split_pathways,
)
from stjfd_convert.stages import stage_clip_shape
from videos import make_video_dataset, moving_shape_frames, write_video

SEED = 0
SLOW, FAST = (1, 3, 2, 16, 16), (1, 3, 8, 16, 16)
SHAPE_ARG = "1,3,2,16,16+1,3,8,16,16"
STRIDES = "4,1"  # the slow pathway takes every 4th frame of the fast clip

# A SlowFast-like two-pathway classifier. Like PyTorchVideo's multipathway models it assigns into the
# list it is given, so every forward must get a fresh list.
NET_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TwoPathway(nn.Module):
        def __init__(self, num_classes=3):
            super().__init__()
            self.slow = nn.Sequential(
                nn.Conv3d(3, 8, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1)
            )
            self.fast = nn.Sequential(
                nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, (3, 1, 1), padding=(1, 0, 0))
            )
            self.pool = nn.AdaptiveAvgPool3d(1)
            self.fc = nn.Linear(12, num_classes)

        def forward(self, x):
            x[0] = self.slow(x[0])
            x[1] = self.fast(x[1])
            return self.fc(torch.cat([self.pool(t).flatten(1) for t in x], 1))


    def build(num_classes=3):
        return TwoPathway(num_classes)
    """
)


def test_parse_and_format_input_shapes() -> None:
    assert parse_input_shape("1,3,16,112,112") == (1, 3, 16, 112, 112)
    assert parse_input_shape(SHAPE_ARG) == (SLOW, FAST)
    assert parse_input_shape(["1,3,2,16,16", "1,3,8,16,16"]) == (SLOW, FAST)  # the flag repeated
    assert format_input_shape((SLOW, FAST)) == "1×3×2×16×16 + 1×3×8×16×16"
    for bad in ("1,3,,16", "1,3,16+", "1,-3,16,4,4", "a,b"):
        with pytest.raises(ConfigError):
            parse_input_shape(bad)


def test_model_inputs_are_fresh_lists_of_seeded_tensors() -> None:
    first, second = make_model_input((SLOW, FAST), seed=SEED), make_model_input((SLOW, FAST), seed=SEED)
    assert isinstance(first, list) and [tuple(t.shape) for t in first] == [SLOW, FAST]
    assert first is not second and all(torch.equal(a, b) for a, b in zip(first, second))
    assert isinstance(make_model_input((SLOW, FAST), container="tuple"), tuple)


def test_sizes_follow_the_primary_pathway() -> None:
    assert resize_input((SLOW, FAST), frames=16, batch=2) == ((2, 3, 4, 16, 16), (2, 3, 16, 16, 16))
    assert stage_clip_shape((SLOW, FAST), "spatial", 2, 2) == ((1, 3, 1, 16, 16), (1, 3, 4, 16, 16))
    assert stage_clip_shape((SLOW, FAST), "temporal", 2, 2) == ((1, 3, 2, 8, 8), (1, 3, 8, 8, 8))


def test_pathway_strides_cut_one_clip_into_the_pathways() -> None:
    clip = torch.arange(8.0).reshape(1, 1, 8, 1, 1).expand(1, 3, 8, 16, 16)
    slow, fast = split_pathways(clip, (4, 1))
    assert slow[0, 0, :, 0, 0].tolist() == [0.0, 4.0] and torch.equal(fast, clip)
    assert pathway_input_shape(clip.shape, (4, 1)) == (SLOW, FAST)
    assert check_pathway_strides((SLOW, FAST), parse_pathway_strides(STRIDES)) == (4, 1)
    with pytest.raises(ConfigError, match="do not match"):
        check_pathway_strides((SLOW, FAST), (3, 1))
    with pytest.raises(ConfigError, match="one stride per pathway"):
        check_pathway_strides((SLOW, FAST), (4, 2, 1))
    with pytest.raises(ConfigError):
        parse_pathway_strides("4")


@pytest.fixture(scope="module")
def two_pathway(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("twopath")
    (root / "twopath.py").write_text(NET_SOURCE)
    converted = root / "conv"
    outcome = run_cli(["convert", "--model", f"{root / 'twopath.py'}:build", "--input-shape", SHAPE_ARG,
                       "--pathway-strides", STRIDES, "-o", converted, "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = root / "data"
    for split, seed in (("train", 0), ("val", 1)):
        make_video_dataset(data / split, per_class=2, T=12, H=20, W=20, seed=seed)
    video = root / "clip.mp4"
    write_video(video, moving_shape_frames(0, 20, 32, 32))
    return {"root": root, "conv": converted, "data": data, "video": video, "result": outcome.stdout}


def test_convert_checks_parity_on_the_pathway_list_and_records_it(two_pathway: dict[str, Path]) -> None:
    result = json.loads(two_pathway["result"])
    assert result["parity"]["input_shape"] == [list(SLOW), list(FAST)]
    assert result["parity"]["top1_total"] == 1
    manifest = json.loads((two_pathway["conv"] / "model.stjfd.json").read_text())
    assert manifest["input"] == {"shape": [list(SLOW), list(FAST)], "dtype": "float32", "container": "list",
                                 "pathway_strides": [4, 1]}


def test_one_shape_for_a_two_pathway_model_says_how_to_give_several(two_pathway: dict[str, Path]) -> None:
    root = two_pathway["root"]
    outcome = run_cli(["convert", "--model", f"{root / 'twopath.py'}:build", "--input-shape", "1,3,8,16,16",
                       "-o", root / "single"])
    assert_one_error_line(outcome, "the model failed on an input of 1×3×8×16×16", "one shape per pathway")
    assert not (root / "single").exists()


def test_plan_and_report_run_the_pathways(two_pathway: dict[str, Path]) -> None:
    conv = two_pathway["conv"]
    outcome = run_cli(["plan", conv, "--trust-code", "--repeats", 1, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["input_shape"] == [list(SLOW), list(FAST)]
    outcome = run_cli(["report", conv, "--trust-code", "--steps", 1, "--memory-budget", "64MiB", "--json"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.stdout)
    rows = {row["key"]: row for row in report["training"]}
    spatial = next(row for row in rows.values() if row["stage"] == "spatial")
    assert spatial["input_shape"] == [[1, 3, 1, 16, 16], [1, 3, 4, 16, 16]]  # both pathways at T/r
    assert report["what_fits"]["answers"]


def test_export_writes_one_onnx_input_per_pathway_and_predict_cuts_them(two_pathway: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    onnx_path = two_pathway["root"] / "twopath.onnx"
    outcome = run_cli(["export", two_pathway["conv"], "--onnx", onnx_path, "--trust-code", "--runs", 1,
                       "--dynamic", "batch,time", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--json"])
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    assert result["validation"]["passed"] and len(result["validation"]["input_shapes"]) == 3
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["clip_0", "clip_1"]
    assert session.get_modelmeta().custom_metadata_map["stjfd.pathway_strides"] == "4,1"
    outcome = run_cli(["predict", onnx_path, two_pathway["video"], "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["num_classes"] == 3
    outcome = run_cli(["predict", onnx_path, two_pathway["video"], "--pathway-strides", "4,2,1"])
    assert_one_error_line(outcome, "--pathway-strides", "takes 2")


def test_finetune_alternates_on_pathways_and_evaluate_reads_them_back(
    two_pathway: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    outcome = run_cli(["finetune", two_pathway["conv"], two_pathway["data"], "--trust-code", "--clip-len", 8,
                       "--size", 16, "--batch-size", 3, "--workers", 0, "--mean", "0,0,0", "--std", "1,1,1",
                       "--device", "cpu", "-o", run, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert [s["stage"] for s in json.loads(outcome.stdout)["stages"]] == ["temporal", "spatial"]
    config = json.loads((run / "config.json").read_text())
    assert config["finetune"]["pathway_strides"] == [4, 1]  # taken from the converted folder
    manifest = json.loads((run / "best" / "model.stjfd.json").read_text())
    assert manifest["input"]["shape"] == [list(SLOW), list(FAST)] and manifest["input"]["pathway_strides"] == [4, 1]
    outcome = run_cli(["evaluate", run / "best", two_pathway["data"], "--trust-code", "--workers", 0, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["clips"] == 6


@pytest.mark.slow
@pytest.mark.matrix  # PyTorchVideo is optional (the zoo extra); ~8 min on 2 cores
def test_pytorchvideo_slowfast_r50_converts_reports_finetunes_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("pytorchvideo")
    pytest.importorskip("onnxruntime")
    kwargs = json.dumps({"model_num_class": 3, "head_pool_kernel_sizes": [[2, 2, 2], [8, 2, 2]]})
    model = ["--model", "pytorchvideo.models.slowfast:create_slowfast", "--model-kwargs", kwargs]
    conv = tmp_path / "slowfast"
    outcome = run_cli(["convert", *model, "--input-shape", "1,3,2,64,64+1,3,8,64,64", "--pathway-strides", "4,1",
                       "-o", conv, "--json"])
    assert outcome.exit_code == 0, outcome.output
    trust = ["--model", "pytorchvideo.models.slowfast:create_slowfast"]
    outcome = run_cli(["report", conv, *trust, "--steps", 1, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert any(row["stage"] == "temporal" for row in json.loads(outcome.stdout)["training"])
    data = tmp_path / "data"
    for split, seed in (("train", 0), ("val", 1)):
        make_video_dataset(data / split, per_class=1, T=10, H=72, W=72, seed=seed)
    outcome = run_cli(["finetune", conv, data, *trust, "--clip-len", 8, "--size", 64, "--batch-size", 3,
                       "--workers", 0, "--mean", "0,0,0", "--std", "1,1,1", "--device", "cpu", "-o", tmp_path / "run",
                       "--json"])
    assert outcome.exit_code == 0, outcome.output
    outcome = run_cli(["export", conv, *trust, "--onnx", tmp_path / "sf.onnx", "--runs", 0, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["validation"]["passed"]
