"""``stjfd export --onnx`` and ``stjfd predict``: verified ONNX export of converted models (issue #5).

The r3d_18 cases use one randomly initialised r3d_18 converted at --atoms 6 (module fixture); every
other case uses tiny models so that the file stays fast on two shared cores.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import video as tv_video

from cli_helpers import assert_no_output, assert_one_error_line, leftovers, run_cli, write_tiny
from stjfd_convert.config import ConvertConfig
from stjfd_convert.export import (
    DEFAULT_ATOL,
    FP16_ATOL,
    ORT_DEVICE,
    ExportValidationError,
    densify,
    export_onnx,
    max_opset,
    plan_onnxruntime,
    predict,
)
from stjfd_convert.export import graph as export_graph  # the module that reads PROTOBUF_LIMIT
from stjfd_convert.layers import FORMS, DecomposedConv3d
from stjfd_convert.models import TORCHVISION_VIDEO_ARCHS
from stjfd_convert.parity import make_input
from stjfd_convert.planner import MEASURE_MARGIN, choose_measured_form, layer_plan_key, plan_model
from stjfd_convert.saved_model import MANIFEST_FILE, load_converted
from stjfd_convert.workflows import convert_checkpoint

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# The issue's acceptance tolerance for ORT vs PyTorch (float32): DEFAULT_ATOL must not be looser.
ISSUE_ATOL = 1e-4
# File sizes may differ from "parameters × 4 bytes" / from the convert report's ratio by this share
# (graph structure, BatchNorm folded into convs, the classifier).
SIZE_SLACK = 0.02
FLOAT32_BYTES = 4
# With fp16 weights the file holds about half the bytes of the float32 one (a little more: graph, casts).
FP16_SIZE_RANGE = (0.45, 0.6)
# PyTorch dense vs decomposed forms of one model (float32 rounding only).
FORM_ATOL = 1e-5

TINY_SHAPE = (1, 3, 4, 8, 8)
TINY_PREDICT_SHAPE = (1, 3, 4, 16, 16)
TINY_CLASSES = 4  # the CLI helpers' tiny model
TINY_MEAN = (0.4, 0.45, 0.5)
TINY_STD = (0.25, 0.2, 0.22)
R3D18_SHAPE = (1, 3, 16, 112, 112)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STJFD_DEBUG", raising=False)


def export_json(*args: Any, exit_code: int = 0) -> dict[str, Any]:
    outcome = run_cli(["export", *map(str, args), "--trust-code", "--json"])
    assert outcome.exit_code == exit_code, outcome.output
    return json.loads(outcome.stdout)


def metadata(path: Path) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r3d18(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A seeded random r3d_18 checkpoint and its conversion at --atoms 6."""
    folder = tmp_path_factory.mktemp("r3d18")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        original = tv_video.r3d_18().eval()
    checkpoint = folder / "r3d18.pth"
    torch.save(original.state_dict(), checkpoint)
    result = convert_checkpoint(
        checkpoint, ConvertConfig(spatial_atoms=6), arch="r3d_18", output=folder / "r3d18-stjfd", parity=False
    )
    return {
        "checkpoint": checkpoint,
        "dir": result.output,
        "ratio": result.report.ratio,
        "params_after": sum(p.numel() for p in result.model.parameters()),
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI tests' tiny model (stem 3×3×3, spatial 1×3×3, proj 1×1×1) converted at 4 spatial atoms."""
    folder = tmp_path_factory.mktemp("tiny")
    files = write_tiny(folder / "inputs")
    result = convert_checkpoint(
        files.checkpoint,
        ConvertConfig(spatial_atoms=4),
        model=files.model_arg,
        input_shape=TINY_SHAPE,
        output=folder / "tiny-stjfd",
    )
    return result.output


# --------------------------------------------------------------------------------------------
# r3d_18: all three modes, dynamic axes, size against the convert report
# --------------------------------------------------------------------------------------------


def test_default_tolerance_is_the_issues() -> None:
    assert DEFAULT_ATOL <= ISSUE_ATOL


@pytest.mark.parametrize("mode", [pytest.param("fused", marks=pytest.mark.slow), "auto"])
def test_r3d18_exports_and_validates(r3d18: dict[str, Any], tmp_path: Path, mode: str) -> None:
    target = tmp_path / f"{mode}.onnx"
    args = [r3d18["dir"], "--onnx", target, "--atol", ISSUE_ATOL, "--runs", 1, "--threads", 2]
    if mode == "fused":
        args += ["--mode", "fused"]  # "auto" is the default and must not need the flag
    data = export_json(*args)
    assert data["checker_passed"] is True
    validation = data["validation"]
    assert validation["passed"] is True and validation["atol"] == ISSUE_ATOL
    assert validation["input_shapes"] == [list(R3D18_SHAPE)] * 3
    assert validation["max_abs"] <= ISSUE_ATOL
    assert target.is_file() and leftovers(target) == []
    assert data["file_bytes"] == target.stat().st_size and data["files"] == [target.name]
    assert data["latency_ms"] > 0 and data["latency_runs"] == 1
    assert len(data["forms"]) == 17
    if mode == "fused":
        assert set(data["forms"].values()) == {"fused"}
    else:
        converted = load_converted(r3d18["dir"], trust_code=True).model
        assert data["forms"] == plan_model(converted, R3D18_SHAPE, measure=False).modes
        assert "cost model" in data["plan_source"]
    meta = metadata(target)
    info = TORCHVISION_VIDEO_ARCHS["r3d_18"]
    assert [float(v) for v in meta["stjfd.mean"].split(",")] == pytest.approx(info.mean)
    assert [float(v) for v in meta["stjfd.std"].split(",")] == pytest.approx(info.std)
    assert meta["stjfd.input_shape"] == ",".join(map(str, R3D18_SHAPE))


def test_r3d18_factorized_dynamic_axes_and_size(r3d18: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "factorized.onnx"
    data = export_json(
        r3d18["dir"], "--onnx", target, "--mode", "factorized", "--opset", 18, "--dynamic", "batch,time",
        "--atol", ISSUE_ATOL, "--runs", 1, "--threads", 2,
    )
    validation = data["validation"]
    assert validation["passed"] is True
    # Three clips: the export shape, then batch 2 and half the clip length (the dynamic axes).
    assert validation["input_shapes"] == [[1, 3, 16, 112, 112], [2, 3, 16, 112, 112], [1, 3, 8, 112, 112]]
    assert all(c["ok"] for c in validation["checks"]) and len(validation["checks"]) == 3
    assert data["dynamic_axes"] == ["batch", "time"] and data["opset"] == 18
    assert set(data["forms"].values()) == {"factorized"}

    # A clean graph: BatchNorm folded into the Convs, each atom set stored once and expanded in the graph.
    ops = {node.op_type for node in onnx.load(str(target)).graph.node}
    assert "BatchNormalization" not in ops and {"Conv", "Expand"} <= ops
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    batch, _, time_axis, height, width = session.get_inputs()[0].shape
    assert isinstance(batch, str) and isinstance(time_axis, str) and (height, width) == (112, 112)

    # Atoms + coefficients only: the file is the converted parameters in float32.
    assert abs(data["file_bytes"] / (r3d18["params_after"] * FLOAT32_BYTES) - 1) < SIZE_SLACK
    assert abs(data["parameters"] / r3d18["params_after"] - 1) < SIZE_SLACK

    # The unconverted original, from its checkpoint: the factorized file is smaller by the report's ratio.
    original = tmp_path / "orig.onnx"
    orig = export_json(r3d18["checkpoint"], "--arch", "r3d_18", "--onnx", original, "--clips", 1, "--runs", 0)
    assert orig["validation"]["passed"] is True and orig["forms"] == {}
    assert abs((data["file_bytes"] / orig["file_bytes"]) / r3d18["ratio"] - 1) < SIZE_SLACK


@pytest.mark.slow
def test_r3d18_compare_and_fp16(r3d18: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "fact16.onnx"
    data = export_json(
        r3d18["dir"], "--onnx", target, "--mode", "factorized", "--fp16", "--compare", "--runs", 2, "--threads", 2
    )
    assert data["validation"]["passed"] and data["validation"]["atol"] == FP16_ATOL
    assert data["original"]["latency_ms"] > 0 and data["latency_ms"] > 0
    assert abs(data["ratios_to_original"]["file_bytes"] / r3d18["ratio"] - 1) < SIZE_SLACK


# --------------------------------------------------------------------------------------------
# Every form, every geometry (single layers)
# --------------------------------------------------------------------------------------------

GEOMETRIES = {
    "3x3x3-pad": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "strided-reflect": dict(
        in_channels=4, out_channels=6, kernel_size=3, stride=(2, 2, 1), padding=(1, 0, 2), padding_mode="reflect"
    ),
    "1x3x3-same-groups": dict(
        in_channels=4, out_channels=6, kernel_size=(1, 3, 3), padding="same", groups=2, padding_mode="replicate"
    ),
    "3x1x1-dilated": dict(in_channels=4, out_channels=6, kernel_size=(3, 1, 1), dilation=(2, 1, 1), padding=(2, 0, 0)),
    "circular-nobias": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular", bias=False),
}


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_every_form_exports_exactly(geometry: dict[str, Any], tmp_path: Path) -> None:
    kernel = geometry["kernel_size"]
    kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
    layer = DecomposedConv3d(
        **geometry, num_temporal_atoms=min(kernel[0], 2), num_spatial_atoms=min(kernel[1] * kernel[2], 4)
    )
    model = nn.Sequential(layer)
    stored = {}
    for form in FORMS:
        result = export_onnx(
            model, tmp_path / f"{form}.onnx", mode=form, input_shape=(2, 4, 6, 9, 10),
            dynamic_axes="batch,time,height,width", runs=0, opset=13,
        )
        assert result.validation is not None and result.validation.passed, result.validation.summary()
        assert len(result.validation.input_shapes) == 5  # base + one per dynamic axis
        stored[form] = result.stats.parameters
    assert layer.mode == "fused"  # the input model is left untouched
    # Factorized stores atoms + coefficients (+ bias), never an expanded copy of them.
    assert stored["factorized"] <= sum(p.numel() for p in layer.parameters())
    assert stored["factorized"] <= min(stored.values())


def test_densify_replaces_decomposed_layers_and_leaves_the_input(tiny_dir: Path) -> None:
    model = load_converted(tiny_dir, trust_code=True).model
    dense = densify(model)
    assert not any(isinstance(m, DecomposedConv3d) for m in dense.modules())
    assert any(isinstance(m, DecomposedConv3d) for m in model.modules())
    x = make_input(TINY_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x), atol=FORM_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# auto: stored plan, cost model
# --------------------------------------------------------------------------------------------


def test_auto_uses_the_stored_measured_plan(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "planned"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    forms = {"stem": "sandwich", "spatial": "temporal_first"}
    manifest["plans"] = [
        {"input_shape": list(TINY_SHAPE), "device": "cpu", "dtype": "float32", "measured": False,
         "forms": {"stem": "fused", "spatial": "fused"}},
        {"input_shape": list(TINY_SHAPE), "device": "cpu", "dtype": "float32", "measured": True, "forms": forms},
    ]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    target = tmp_path / "auto.onnx"
    data = export_json(folder, "--onnx", target, "--runs", 0, "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2")
    assert data["forms"] == forms and "measured" in data["plan_source"]
    assert data["validation"]["passed"]
    assert json.loads(metadata(target)["stjfd.forms"]) == forms

    # Another input shape has no stored plan: the cost model decides.
    other = (2, 3, 4, 12, 12)
    data = export_json(folder, "--onnx", target, "--runs", 0, "--input-shape", ",".join(map(str, other)), "--force")
    assert data["forms"] == plan_model(load_converted(folder, trust_code=True).model, other, measure=False).modes
    assert "cost model" in data["plan_source"]


def test_auto_follows_a_plan_held_in_memory(tiny_dir: Path, tmp_path: Path) -> None:
    from stjfd_convert.planner import apply_plan

    model = load_converted(tiny_dir, trust_code=True).model
    plan = plan_model(model, TINY_SHAPE, measure=False)
    for choice in plan.layers:
        choice.form = "spatial_first"
    apply_plan(model, plan, mode="auto")
    result = export_onnx(model, tmp_path / "m.onnx", input_shape=TINY_SHAPE, runs=0)
    assert result.forms == {"stem": "spatial_first", "spatial": "spatial_first"}
    assert result.plan_source == "the layers' own execution plan"
    assert result.validation is not None and result.validation.passed
    assert all(m.mode == "auto" for m in model.modules() if isinstance(m, DecomposedConv3d))  # input untouched


# --------------------------------------------------------------------------------------------
# auto --measure: the plan measured in onnxruntime
# --------------------------------------------------------------------------------------------

# Two layers of different input shapes: "strided" (3 → 2 channels, spatial stride 4) sees the model
# input, "wide" (a 7×7 kernel kept as 1 × 1 atoms, 2 → 64 channels) sees the strided output. Which
# form onnxruntime runs faster is not asserted (on a busy 2-core machine the wall clock inverts close
# calls, issue 15): the choice is tested with fixed per-form times (FakeSessionTimer), the real timing
# only for running and giving finite positive times.
PLAN_SHAPE = (1, 3, 4, 32, 32)
STRIDED_INPUT, WIDE_INPUT = PLAN_SHAPE, (1, 2, 4, 8, 8)


def two_layer_model() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        strided = DecomposedConv3d(3, 2, 3, stride=(1, 4, 4), padding=1, num_temporal_atoms=3, num_spatial_atoms=9)
        wide = DecomposedConv3d(2, 64, (1, 7, 7), padding=(0, 3, 3), num_temporal_atoms=1, num_spatial_atoms=1)
    return nn.Sequential(OrderedDict(strided=strided, relu=nn.ReLU(), wide=wide)).eval()


class FakeSessionTimer:
    """A ``plan_onnxruntime`` timer returning fixed seconds per form, keyed by the layer's input shape."""

    def __init__(self, times: dict[tuple[int, ...], dict[str, float]]) -> None:
        self.times = times
        self.calls: list[tuple[dict[str, Any], tuple[int, ...], int, int]] = []

    def __call__(self, sessions: Any, feed_shape: Any, repeats: int, warmup: int) -> dict[str, float]:
        self.calls.append((dict(sessions), tuple(feed_shape), repeats, warmup))
        return dict(self.times[tuple(feed_shape)])


def fake_times(fastest: str, seconds: float, others: float = 1.0) -> dict[str, float]:
    return {form: seconds if form == fastest else others for form in FORMS}


def test_plan_onnxruntime_picks_and_stores_the_lowest_time(tmp_path: Path) -> None:
    from stjfd_convert.planner import apply_plan

    model = two_layer_model()
    times = {STRIDED_INPUT: fake_times("fused", 0.1), WIDE_INPUT: fake_times("sandwich", 0.2)}
    timer = FakeSessionTimer(times)
    plan = plan_onnxruntime(model, PLAN_SHAPE, threads=1, repeats=4, warmup=2, timer=timer)
    assert (plan.device, plan.dtype, plan.measured) == (ORT_DEVICE, "float32", True)
    assert plan.input_shape == PLAN_SHAPE
    assert plan.modes == {"strided": "fused", "wide": "sandwich"}
    choices = {choice.name: choice for choice in plan.layers}
    assert choices["strided"].measured == times[STRIDED_INPUT] and choices["wide"].measured == times[WIDE_INPUT]
    assert (choices["strided"].input_shape, choices["wide"].input_shape) == (STRIDED_INPUT, WIDE_INPUT)
    # The timer got one onnxruntime session per form (fused always included), each on that layer
    # alone at the shape it sees, and the repeats/warm-up asked for.
    assert [feed_shape for _, feed_shape, _, _ in timer.calls] == [STRIDED_INPUT, WIDE_INPUT]
    for sessions, feed_shape, repeats, warmup in timer.calls:
        assert set(sessions) == set(FORMS) and (repeats, warmup) == (4, 2)
        assert all(list(s.get_inputs()[0].shape) == list(feed_shape) for s in sessions.values())
    assert all(m.mode == "fused" for m in model.modules() if isinstance(m, DecomposedConv3d))  # untouched

    # A plan held in memory under its onnxruntime key wins over a CPU one for the same input.
    cpu_plan = plan_model(model, PLAN_SHAPE, measure=False)
    for choice in cpu_plan.layers:
        choice.form = "temporal_first"
    apply_plan(model, cpu_plan, mode="auto")
    apply_plan(model, plan, mode="auto")
    result = export_onnx(model, tmp_path / "m.onnx", input_shape=PLAN_SHAPE, runs=0, clips=1)
    assert result.forms == plan.modes and result.plan_source == "the layers' own execution plan"
    assert result.validation is not None and result.validation.passed


@pytest.mark.parametrize(
    ("ratio", "chosen"), [(0.5, "factorized"), (MEASURE_MARGIN, "factorized"), (0.99, "fused")]
)
def test_plan_onnxruntime_keeps_fused_unless_beaten_by_the_margin(ratio: float, chosen: str) -> None:
    # fused takes 1 s, factorized ``ratio`` s; only the forms asked for (and fused) are timed.
    seconds = {"fused": 1.0, "factorized": ratio}
    timer = FakeSessionTimer({STRIDED_INPUT: seconds, WIDE_INPUT: seconds})
    plan = plan_onnxruntime(two_layer_model(), PLAN_SHAPE, forms=("factorized",), threads=1, timer=timer)
    assert all(list(sessions) == ["fused", "factorized"] for sessions, _, _, _ in timer.calls)
    assert plan.modes == {"strided": chosen, "wide": chosen}
    assert choose_measured_form(seconds) == chosen


def test_plan_onnxruntime_runs_the_real_timer() -> None:
    # The wall-clock timer: every form gets a finite positive time. Which is faster is not asserted.
    plan = plan_onnxruntime(two_layer_model(), PLAN_SHAPE, threads=1, repeats=1)
    for choice in plan.layers:
        assert set(choice.measured) == set(FORMS)
        assert all(0 < seconds < float("inf") for seconds in choice.measured.values())
        assert choice.form == choose_measured_form(choice.measured)


def test_measured_plan_is_stored_and_reused(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "measured"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    target = tmp_path / "auto.onnx"
    data = export_json(folder, "--onnx", target, "--measure", "--measure-repeats", 2, "--threads", 1, "--runs", 0)
    assert data["validation"]["passed"]
    plan = data["measured_plan"]
    assert plan["device"] == ORT_DEVICE and plan["measured"] is True and plan["input_shape"] == list(TINY_SHAPE)
    assert data["forms"] == {c["name"]: c["form"] for c in plan["layers"]}
    assert "measured in onnxruntime now" in data["plan_source"]
    assert data["plan_saved"] == str(folder / MANIFEST_FILE)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    stored = [p for p in manifest["plans"] if p["device"] == ORT_DEVICE]
    assert len(stored) == 1 and stored[0]["forms"] == data["forms"] and stored[0]["measured"] is True
    for choice in plan["layers"]:
        key = layer_plan_key(choice["input_shape"], ORT_DEVICE, "float32")
        assert manifest["layers"][choice["name"]]["plan"][key] == choice["form"]
    load_converted(folder, trust_code=True)  # the onnxruntime keys load (and never match a PyTorch tensor's)

    # A later auto export reuses the stored onnxruntime plan, ahead of a measured CPU plan.
    # (Distinct forms, written into the stored plan, make "reused" observable.)
    forms = {"stem": "sandwich", "spatial": "temporal_first"}
    stored[0]["forms"] = forms
    manifest["plans"].append({"input_shape": list(TINY_SHAPE), "device": "cpu", "dtype": "float32", "measured": True,
                              "forms": {"stem": "factorized", "spatial": "factorized"}})
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    again = export_json(folder, "--onnx", target, "--runs", 0, "--force")
    assert again["forms"] == forms and "onnxruntime-measured" in again["plan_source"]
    assert again["measured_plan"] is None and again["validation"]["passed"]
    assert json.loads(metadata(target)["stjfd.forms"]) == forms

    # Measuring again replaces the stored onnxruntime plan rather than adding one.
    export_json(folder, "--onnx", target, "--measure", "--measure-repeats", 1, "--runs", 0, "--no-validate", "--force")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert len([p for p in manifest["plans"] if p["device"] == ORT_DEVICE]) == 1


def test_measure_needs_auto(tiny_dir: Path, tmp_path: Path) -> None:
    outcome = run_cli(["export", tiny_dir, "--trust-code", "--onnx", tmp_path / "m.onnx", "--mode", "fused", "--measure"])
    assert outcome.exit_code == 2
    assert_one_error_line(outcome, "--measure")
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------------------------
# fp16, external data, --compare, failing validation
# --------------------------------------------------------------------------------------------


def test_fp16_halves_the_file_and_keeps_float_inputs(tiny_dir: Path, tmp_path: Path) -> None:
    full = export_json(tiny_dir, "--onnx", tmp_path / "f32.onnx", "--mode", "factorized", "--runs", 0)
    half = export_json(tiny_dir, "--onnx", tmp_path / "f16.onnx", "--mode", "factorized", "--runs", 0, "--fp16")
    assert half["validation"]["passed"] and half["validation"]["atol"] == FP16_ATOL
    assert half["parameters"] == full["parameters"]
    # Tiny models have a relatively large graph; compare the weight bytes of the initializers.
    weights = {}
    for name in ("f32", "f16"):
        proto = onnx.load(str(tmp_path / f"{name}.onnx"))
        weights[name] = sum(len(i.raw_data) for i in proto.graph.initializer)
    low, high = FP16_SIZE_RANGE
    assert low <= weights["f16"] / weights["f32"] <= high
    session = ort.InferenceSession(str(tmp_path / "f16.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(float)"


def test_external_data_above_the_protobuf_limit(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the limit is tiny so that the real external-data path runs on a small model.
    monkeypatch.setattr(export_graph, "PROTOBUF_LIMIT", 1024)
    monkeypatch.setattr(export_graph, "EXTERNAL_DATA_MARGIN", 0)
    target = tmp_path / "big.onnx"
    result = export_onnx(tiny_dir, target, mode="fused", runs=1, trust_code=True)
    data_file = tmp_path / "big.onnx.data"
    assert result.external_data and data_file.is_file()
    assert result.stats.files == ["big.onnx", "big.onnx.data"]
    assert result.stats.file_bytes == target.stat().st_size + data_file.stat().st_size
    assert result.validation is not None and result.validation.passed
    assert leftovers(target) == []
    # A later export under the limit removes the stale data file.
    monkeypatch.undo()
    export_onnx(tiny_dir, target, mode="fused", runs=0, validate=False, trust_code=True, force=True)
    assert not data_file.exists()


def test_compare_reports_the_dense_original(tiny_dir: Path, tmp_path: Path) -> None:
    data = export_json(tiny_dir, "--onnx", tmp_path / "m.onnx", "--mode", "factorized", "--compare", "--runs", 3)
    original = data["original"]
    assert original["latency_runs"] == 3 and data["latency_runs"] == 3
    assert data["ratios_to_original"]["file_bytes"] == pytest.approx(data["file_bytes"] / original["file_bytes"])
    outcome = run_cli(["export", tiny_dir, "--trust-code", "--onnx", tmp_path / "m.onnx", "--compare", "--runs", 2,
                       "--force"])
    assert outcome.exit_code == 0, outcome.output
    for text in ("onnx.checker", "PASS", "file size", "parameters", "ORT latency", "vs the dense original", "ratio"):
        assert text in outcome.stdout


def test_failed_validation_lists_every_mismatch_and_leaves_no_file(tiny_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "bad.onnx"
    # fp16 weights cannot match float32 PyTorch to 1e-9: every output of every clip mismatches.
    outcome = run_cli(["export", tiny_dir, "--trust-code", "--onnx", target, "--fp16", "--atol", "1e-9", "--dynamic", "batch", "--json"])
    assert outcome.exit_code == 1, outcome.output
    data = json.loads(outcome.stdout)
    assert data["validation"]["passed"] is False and data["path"] is None
    assert data["validation"]["mismatches"] == len(data["validation"]["checks"]) == 3
    assert "1.0e-09" in outcome.stderr and "3 of 3 outputs mismatch" in outcome.stderr
    assert "clip 0" in outcome.stderr and "clip 1" in outcome.stderr and "clip 2" in outcome.stderr
    assert_no_output(target)

    outcome = run_cli(["export", tiny_dir, "--trust-code", "--onnx", target, "--fp16", "--atol", "1e-9", "--keep-invalid"])
    assert outcome.exit_code == 1 and target.is_file() and leftovers(target) == []
    assert "FAIL" in outcome.stdout

    with pytest.raises(ExportValidationError) as caught:
        export_onnx(tiny_dir, tmp_path / "lib.onnx", fp16=True, atol=1e-9, runs=0, trust_code=True)
    assert caught.value.exit_code == 1 and not caught.value.result.validation.passed


# --------------------------------------------------------------------------------------------
# Errors: one line, exit 2, no file
# --------------------------------------------------------------------------------------------


def test_not_a_converted_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    target = tmp_path / "m.onnx"
    assert_one_error_line(run_cli(["export", empty, "--onnx", target]), MANIFEST_FILE)
    assert_no_output(target)
    assert_one_error_line(run_cli(["export", tmp_path / "missing.pth", "--arch", "r3d_18", "--onnx", target]), "does not exist")
    assert_no_output(target)


def test_unwritable_output(tiny_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert_one_error_line(run_cli(["export", tiny_dir, "--trust-code", "--onnx", blocker / "m.onnx"]), "cannot write")
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    assert_one_error_line(run_cli(["export", tiny_dir, "--trust-code", "--onnx", folder]), "folder")


@pytest.mark.parametrize("opset", [9, 10, max_opset() + 1])
def test_unsupported_opset(tiny_dir: Path, tmp_path: Path, opset: int) -> None:
    target = tmp_path / "m.onnx"
    line = assert_one_error_line(run_cli(["export", tiny_dir, "--trust-code", "--onnx", target, "--opset", opset]), "opset")
    assert str(max_opset()) in line
    assert_no_output(target)


def test_bad_dynamic_axis_and_mode(tiny_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    assert_one_error_line(run_cli(["export", tiny_dir, "--trust-code", "--onnx", target, "--dynamic", "batch,depth"]), "depth")
    assert_one_error_line(run_cli(["export", tiny_dir, "--trust-code", "--onnx", target, "--mode", "turbo"]), "turbo")
    assert_no_output(target)


def test_onnxruntime_missing(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    target = tmp_path / "m.onnx"
    assert_one_error_line(run_cli(["export", tiny_dir, "--trust-code", "--onnx", target]), "onnxruntime", "pip install")
    assert_no_output(target)


def test_module_without_input_shape(tmp_path: Path) -> None:
    from stjfd_convert.errors import ConfigError

    with pytest.raises(ConfigError, match="input-shape"):
        export_onnx(nn.Sequential(nn.Conv3d(3, 4, 3)), tmp_path / "m.onnx")
    assert_no_output(tmp_path / "m.onnx")


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_onnx(tiny_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "tiny.onnx"
    export_json(
        tiny_dir, "--onnx", target, "--mode", "factorized", "--input-shape", ",".join(map(str, TINY_PREDICT_SHAPE)),
        "--mean", ",".join(map(str, TINY_MEAN)), "--std", ",".join(map(str, TINY_STD)), "--runs", 0,
    )
    return target


@pytest.fixture
def video(tmp_path: Path) -> Path:
    from videos import moving_shape_frames, write_video

    return write_video(tmp_path / "clip.mp4", moving_shape_frames(0, T=12, H=32, W=40, seed=3))


def test_predict_top_k_with_labels(tiny_onnx: Path, tiny_dir: Path, video: Path, tmp_path: Path) -> None:
    from stjfd_convert.data import ClipConfig, ClipDataset, VideoSource

    labels = tmp_path / "labels.txt"
    labels.write_text("walking\nrunning\njumping\nsitting\n")
    outcome = run_cli(["predict", tiny_onnx, video, "--labels", labels, "--top-k", 3, "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["input_shape"] == list(TINY_PREDICT_SHAPE) and data["num_classes"] == 4
    assert data["normalization_source"] == "ONNX metadata"
    assert data["normalization"]["mean"] == pytest.approx(TINY_MEAN)
    top = data["top"]
    assert [t["rank"] for t in top] == [1, 2, 3]
    assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
    names = labels.read_text().split()
    assert all(t["label"] == names[t["index"]] for t in top)

    # The same clip through the PyTorch model gives the same ranking.
    config = ClipConfig(clip_len=4, size=(16, 16), mean=TINY_MEAN, std=TINY_STD)
    clip, _ = ClipDataset([VideoSource(video, -1)], ["video"], config)[0]
    with torch.no_grad():
        logits = load_converted(tiny_dir, trust_code=True).model(clip.unsqueeze(0))[0]
    assert [t["index"] for t in top] == logits.argsort(descending=True)[:3].tolist()
    assert [t["logit"] for t in top] == pytest.approx(logits.sort(descending=True).values[:3].tolist(), abs=FORM_ATOL)

    table = run_cli(["predict", tiny_onnx, video])
    assert table.exit_code == 0 and "probability" in table.stdout and "clip.mp4" in table.stdout


def test_predict_errors(tiny_onnx: Path, tiny_dir: Path, video: Path, tmp_path: Path) -> None:
    labels = tmp_path / "short.txt"
    labels.write_text("a\nb\n")
    assert_one_error_line(run_cli(["predict", tiny_onnx, video, "--labels", labels]), "2 labels", "4 classes")
    assert_one_error_line(run_cli(["predict", tiny_onnx, tmp_path / "nope.mp4"]), "does not exist")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 512)
    assert_one_error_line(run_cli(["predict", tiny_onnx, broken]), "broken.mp4")
    # A model exported without normalisation stats needs --mean/--std.
    bare = tmp_path / "bare.onnx"
    export_json(tiny_dir, "--onnx", bare, "--input-shape", ",".join(map(str, TINY_PREDICT_SHAPE)), "--runs", 0)
    assert_one_error_line(run_cli(["predict", bare, video]), "--mean")
    outcome = run_cli(["predict", bare, video, "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", "--json"])
    assert outcome.exit_code == 0 and json.loads(outcome.stdout)["normalization_source"] == "--mean/--std"


def test_predict_library_uses_dynamic_axes_export_shape(tiny_dir: Path, video: Path, tmp_path: Path) -> None:
    target = tmp_path / "dyn.onnx"
    export_onnx(
        tiny_dir, target, dynamic_axes="batch,time,height,width", input_shape=TINY_PREDICT_SHAPE, mean=TINY_MEAN,
        std=TINY_STD, runs=0,
        trust_code=True,
    )
    prediction = predict(target, video, top_k=10)
    assert prediction.input_shape == TINY_PREDICT_SHAPE
    assert len(prediction.top) == 4  # top-k is capped at the number of classes
    assert sum(t["probability"] for t in prediction.top) == pytest.approx(1.0)
    assert np.all(np.isfinite([t["logit"] for t in prediction.top]))


def test_normalisation_recorded_by_finetune_reaches_the_onnx_metadata(tiny_dir: Path, tmp_path: Path) -> None:
    """A fine-tuned folder's manifest says how its inputs were normalised; export carries it over."""
    folder = tmp_path / "finetuned"
    shutil.copytree(tiny_dir, folder)
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["normalization"] = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    manifest_path.write_text(json.dumps(manifest))
    target = tmp_path / "ft.onnx"
    export_json(folder, "--onnx", target, "--mode", "fused", "--input-shape", ",".join(map(str, TINY_SHAPE)), "--runs", 0)
    meta = metadata(target)
    assert [float(v) for v in meta["stjfd.mean"].split(",")] == [0.0, 0.0, 0.0]
    assert [float(v) for v in meta["stjfd.std"].split(",")] == [1.0, 1.0, 1.0]


def test_class_names_of_a_finetuned_folder_reach_predict(tiny_dir: Path, tmp_path: Path, video: Path) -> None:
    """Without --labels, predict names the classes a fine-tuning run recorded in the manifest."""
    folder = tmp_path / "named"
    shutil.copytree(tiny_dir, folder)
    manifest_path = folder / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    names = [f"class_{i}" for i in range(TINY_CLASSES)]
    manifest["finetune"] = {"classes": names}
    manifest["normalization"] = {"mean": list(TINY_MEAN), "std": list(TINY_STD)}
    manifest_path.write_text(json.dumps(manifest))
    target = tmp_path / "named.onnx"
    export_json(folder, "--onnx", target, "--mode", "fused", "--input-shape", ",".join(map(str, TINY_PREDICT_SHAPE)), "--runs", 0)
    assert json.loads(metadata(target)["stjfd.classes"]) == names
    outcome = run_cli(["predict", target, video, "--json"])
    assert outcome.exit_code == 0, outcome.output
    top = json.loads(outcome.stdout)["top"]
    assert all(entry["label"] in names for entry in top), top
