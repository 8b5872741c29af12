"""`stjfd report`: parameter/MAC accounting, training-stage mechanics, measured memory, what fits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from cli_helpers import TINY_INPUT_SHAPE, assert_one_error_line, run_cli, write_tiny
from stjfd_convert.convert import convert_model
from stjfd_convert.errors import ConfigError
from stjfd_convert.functional.conv import ConvGeometry
from stjfd_convert.functional.cost import form_cost
from stjfd_convert.layers import DecomposedConv3d
from stjfd_convert.memory import (
    MeasurementError,
    measure_inference_peak,
    measure_training_step,
    search_max_size,
)
from stjfd_convert.report import densify, layer_table, memory_report, parse_bytes, what_fits
from stjfd_convert.stages import (
    STAGES,
    checkpoint_candidates,
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    set_trainable,
    stage_clip_shape,
)
from tolerances import ATOL_FP32

# Measured stage activations may differ from the analytic 1/s², 1/r by this share (the per-channel
# BatchNorm statistics saved for backward do not scale with the clip).
ANALYTIC_TOL = 0.15
# Meta-device and CPU measurements of live inference bytes may differ by a few scalar tensors.
META_CPU_TOL = 0.01

CLIP = (2, 3, 8, 16, 16)


class ToyBlock(nn.Module):
    """A residual block (class name ends in "Block", as torchvision's BasicBlock)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = DecomposedConv3d(channels, channels, 3, padding=1, bias=False, num_spatial_atoms=4)
        self.bn1 = nn.BatchNorm3d(channels)
        self.relu = nn.ReLU()
        self.conv2 = DecomposedConv3d(channels, channels, 3, padding=1, bias=False, num_spatial_atoms=4)
        self.bn2 = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class ToyNet(nn.Module):
    """Stride-free, so every activation is exactly proportional to T·H·W."""

    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = DecomposedConv3d(3, channels, 3, padding=1, num_spatial_atoms=4)
        self.blocks = nn.Sequential(ToyBlock(channels), ToyBlock(channels))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


def _dense_toy() -> nn.Module:
    return densify(ToyNet())


# --------------------------------------------------------------------------------------------
# stages.py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_set_trainable_freezes_exactly_the_stage_atoms(stage: str) -> None:
    model = ToyNet()
    trainable = set_trainable(model, stage)
    frozen = {"joint": None, "temporal": "spatial_atoms", "spatial": "temporal_atoms"}[stage]
    for name, parameter in model.named_parameters():
        expected = frozen is None or not name.endswith(frozen)
        assert parameter.requires_grad == expected, name
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    # Switching stage re-enables what the previous one froze.
    set_trainable(model, "joint")
    assert all(p.requires_grad for p in model.parameters())


def test_set_trainable_plain_model_trains_everything() -> None:
    model = _dense_toy()
    for stage in STAGES:
        assert len(set_trainable(model, stage)) == len(list(model.parameters()))
    with pytest.raises(ConfigError):
        set_trainable(model, "both")


def test_stage_clip_shape() -> None:
    assert stage_clip_shape(CLIP, "joint") == CLIP
    assert stage_clip_shape(CLIP, "temporal", 2, 2) == (2, 3, 8, 8, 8)
    assert stage_clip_shape(CLIP, "spatial", 2, 4) == (2, 3, 2, 16, 16)
    with pytest.raises(ConfigError):
        stage_clip_shape((2, 3, 8, 16), "joint")
    with pytest.raises(ConfigError):
        stage_clip_shape(CLIP, "temporal", 0, 2)


def test_checkpoint_candidates() -> None:
    assert [name for name, _ in checkpoint_candidates(ToyNet())] == ["blocks.0", "blocks.1"]
    r3d = torchvision.models.video.r3d_18()
    assert enable_activation_checkpointing(r3d) == 8  # 4 stages × 2 BasicBlocks
    assert enable_activation_checkpointing(r3d) == 8  # idempotent
    assert disable_activation_checkpointing(r3d) == 8
    stages = nn.Sequential(nn.Conv3d(3, 4, 1), nn.Sequential(nn.Conv3d(4, 4, 1), nn.Conv3d(4, 4, 1)))
    generic = nn.Module()
    generic.body = stages
    assert [name for name, _ in checkpoint_candidates(generic)] == ["body.0", "body.1"]


def test_checkpointing_keeps_outputs_gradients_and_bn_statistics() -> None:
    plain = ToyNet().train()
    wrapped = copy.deepcopy(plain)
    assert enable_activation_checkpointing(wrapped) == 2
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    clip = torch.randn(CLIP)
    outputs = []
    for model in (plain, wrapped):
        out = model(clip)
        out.pow(2).sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL_FP32, rtol=0)
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=ATOL_FP32, rtol=1e-5, msg=name)
    for (name, a), (_, b) in zip(plain.named_buffers(), wrapped.named_buffers()):
        torch.testing.assert_close(b, a, atol=ATOL_FP32, rtol=0, msg=name)  # BN updated once, not twice
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(clip), plain.eval()(clip), atol=ATOL_FP32, rtol=0)


# --------------------------------------------------------------------------------------------
# memory.py
# --------------------------------------------------------------------------------------------


def test_stage_activations_follow_the_analytic_ratios() -> None:
    model = ToyNet()
    joint = measure_training_step(model, CLIP, stage="joint", steps=1)
    temporal = measure_training_step(model, stage_clip_shape(CLIP, "temporal", 2, 2), stage="temporal", steps=1)
    spatial = measure_training_step(model, stage_clip_shape(CLIP, "spatial", 2, 2), stage="spatial", steps=1)
    ratio_t = temporal.saved_activation_bytes / (joint.saved_activation_bytes / 4)
    ratio_s = spatial.saved_activation_bytes / (joint.saved_activation_bytes / 2)
    assert abs(ratio_t - 1) < ANALYTIC_TOL, ratio_t
    assert abs(ratio_s - 1) < ANALYTIC_TOL, ratio_s
    # What does not scale with the clip: the saved weights are the same rebuilt kernels.
    assert joint.saved_weight_bytes > 0
    assert joint.step_seconds_median is not None and len(joint.step_seconds) == 1


def test_frozen_atoms_get_no_gradient_or_optimizer_state() -> None:
    model = ToyNet()
    numel = sum(p.numel() for p in model.parameters())
    spatial_atoms = sum(m.spatial_atoms.numel() for m in model.modules() if isinstance(m, DecomposedConv3d))
    temporal = measure_training_step(model, CLIP, stage="temporal", steps=0)
    assert temporal.trainable_params == numel - spatial_atoms
    assert temporal.frozen_params == spatial_atoms
    assert temporal.param_bytes == numel * 4
    assert temporal.grad_bytes == temporal.trainable_params * 4
    assert temporal.optimizer_bytes == temporal.trainable_params * 4  # SGD momentum
    adamw = measure_training_step(model, CLIP, stage="joint", optimizer="adamw", steps=0)
    trainable = len(list(model.parameters()))
    assert adamw.optimizer_bytes == 2 * numel * 4 + trainable * 4  # exp_avg, exp_avg_sq, step scalars
    assert all(p.requires_grad for p in model.parameters())  # the model itself is untouched


def test_checkpointing_reduces_saved_activations() -> None:
    model = ToyNet()
    plain = measure_training_step(model, CLIP, steps=0)
    wrapped = measure_training_step(model, CLIP, checkpointing=True, steps=0)
    assert wrapped.checkpointed_blocks == 2
    assert wrapped.saved_activation_bytes < 0.6 * plain.saved_activation_bytes
    assert wrapped.total_bytes < plain.total_bytes


def test_dense_weights_saved_for_backward_are_the_parameters() -> None:
    model = _dense_toy()
    memory = measure_training_step(model, CLIP, steps=0)
    conv_weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, (nn.Conv3d, nn.Linear)))
    # Conv/linear weights and BN affine/running tensors alias the parameters and buffers.
    assert memory.saved_weight_alias_bytes == memory.saved_weight_bytes
    assert memory.saved_weight_bytes >= conv_weights
    assert memory.total_bytes == (
        memory.saved_activation_bytes + memory.param_bytes + memory.buffer_bytes + memory.grad_bytes
        + memory.optimizer_bytes
    )


def test_meta_device_measures_the_same_bytes_as_cpu() -> None:
    model = ToyNet()
    for checkpointing in (False, True):
        cpu = measure_training_step(model, CLIP, stage="spatial", checkpointing=checkpointing, steps=0)
        meta = measure_training_step(model, CLIP, stage="spatial", checkpointing=checkpointing, device="meta")
        assert meta.to_dict() | {"device": "cpu", "step_seconds_median": None} == cpu.to_dict() | {
            "step_seconds_median": None
        }
    cpu_peak = measure_inference_peak(model, CLIP).peak_bytes
    meta_peak = measure_inference_peak(model, CLIP, device="meta").peak_bytes
    assert abs(meta_peak - cpu_peak) <= META_CPU_TOL * cpu_peak


def test_inference_peak_of_a_single_conv() -> None:
    conv = nn.Conv3d(3, 8, 3, padding=1)
    peak = measure_inference_peak(conv, CLIP)
    clip_bytes = 2 * 3 * 8 * 16 * 16 * 4
    assert peak.input_bytes == clip_bytes
    assert peak.peak_bytes >= clip_bytes + clip_bytes * 8 // 3  # input + output alive together


def test_too_small_clip_is_reported() -> None:
    with pytest.raises(MeasurementError) as info:
        measure_training_step(nn.Conv3d(3, 4, (3, 1, 1)), (1, 3, 2, 4, 4), steps=0)
    assert info.value.reason == "too_small"


# --------------------------------------------------------------------------------------------
# Size search and what fits
# --------------------------------------------------------------------------------------------


def test_search_max_size_linear_and_verified() -> None:
    def measure(n: int) -> int:
        if n < 3:
            raise MeasurementError("too short", reason="too_small")
        return 100 + 10 * n

    search = search_max_size(measure, 1000)
    assert search.minimum == 3
    assert search.answer == 90 and search.predicted == 90
    assert search.answer_bytes == 1000 and search.above_bytes == 1010


def test_search_max_size_corrects_a_wrong_prediction() -> None:
    def measure(n: int) -> int:  # convex: the line through small samples over-predicts
        return n * n

    search = search_max_size(measure, 10_000, samples=(1, 2, 4))
    assert search.answer == 100
    assert search.measured[100] <= 10_000 < search.measured[101]
    assert search.predicted != search.answer
    nothing = search_max_size(measure, 0)
    assert nothing.answer == 0


def test_what_fits_answers_are_verified_by_measurement() -> None:
    model = ToyNet()
    models = {"converted": model, "original": densify(model)}
    # What fits is decided on the live peak of a whole step (budget_bytes), transients included.
    budget = measure_training_step(model, (1, 3, 12, 16, 16), steps=0).budget_bytes
    fits = what_fits(models, budget, 16, batch=1, frames=4, device="meta")  # verified on CPU below
    keys = [a.key for a in fits.answers]
    assert keys == ["original_joint", "joint", "checkpointing", "alternating", "alternating_checkpointing"]
    answers = {a.key: a for a in fits.answers}
    assert answers["joint"].clip.answer == 12
    for answer in fits.answers:
        for stage, searches in answer.by_stage.items():
            clip = searches["frames"]
            schedule_model = models["original" if answer.key.startswith("original") else "converted"]
            ckpt = answer.key.endswith("checkpointing")
            at = measure_training_step(
                schedule_model, stage_clip_shape((1, 3, clip.answer, 16, 16), stage), stage=stage,
                checkpointing=ckpt, steps=0,
            )
            above = measure_training_step(
                schedule_model, stage_clip_shape((1, 3, clip.answer + 1, 16, 16), stage), stage=stage,
                checkpointing=ckpt, steps=0,
            )
            assert at.budget_bytes <= budget < above.budget_bytes, (answer.key, stage)
    # Checkpointing and the stages let longer clips fit; the alternating answer is its worst stage.
    assert answers["checkpointing"].clip.answer > answers["joint"].clip.answer
    assert answers["alternating_checkpointing"].clip.answer >= answers["alternating"].clip.answer
    alternating = answers["alternating"]
    assert alternating.clip.answer == min(s["frames"].answer for s in alternating.by_stage.values())
    assert alternating.batch.answer >= 1


# --------------------------------------------------------------------------------------------
# report.py accounting
# --------------------------------------------------------------------------------------------


def test_densify_rebuilds_dense_twin() -> None:
    model = ToyNet().eval()
    dense = densify(model)
    assert not any(isinstance(m, DecomposedConv3d) for m in dense.modules())
    assert sum(isinstance(m, DecomposedConv3d) for m in model.modules()) == 5
    clip = torch.randn(CLIP)
    with torch.no_grad():
        torch.testing.assert_close(dense(clip), model(clip), atol=ATOL_FP32, rtol=0)


def test_parameter_counts_are_those_of_the_real_modules() -> None:
    torch.manual_seed(0)
    original = torchvision.models.video.r3d_18().eval()
    from stjfd_convert.config import ConvertConfig

    converted, _ = convert_model(original, ConvertConfig(spatial_atoms=6))
    rows, totals = layer_table(converted, original, (1, 3, 8, 32, 32))
    assert totals.params_original == sum(p.numel() for p in original.parameters())
    assert totals.params_converted == sum(p.numel() for p in converted.parameters())
    assert totals.bytes_converted("fp16") == 2 * totals.params_converted
    assert totals.bytes_original("int8") == totals.params_original
    modules = dict(converted.named_modules())
    originals = dict(original.named_modules())
    for row in rows:
        assert row.params_converted == sum(p.numel() for p in modules[row.name].parameters())
        assert row.params_original == sum(p.numel() for p in originals[row.name].parameters())
    assert totals.decomposed_layers == sum(isinstance(m, DecomposedConv3d) for m in converted.modules())


class FourLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Conv3d(4, 4, 3, padding=1)
        self.fused = DecomposedConv3d(4, 6, 3, padding=1, num_temporal_atoms=2, num_spatial_atoms=3, mode="fused")
        self.factorized = DecomposedConv3d(
            6, 6, 3, padding=1, num_temporal_atoms=2, num_spatial_atoms=3, mode="factorized"
        )
        self.sandwich = DecomposedConv3d(6, 6, 3, padding=1, num_temporal_atoms=2, num_spatial_atoms=3, mode="sandwich")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sandwich(self.factorized(self.fused(self.dense(x))))


def test_macs_match_a_hand_count_for_each_form() -> None:
    # One clip of 4 frames of 8×8, 3×3×3 kernels with padding 1: every output has T·H·W = 256 sites.
    sites = 4 * 8 * 8
    hand = {
        "dense": 4 * sites * 4 * 27,  # c_out · sites · c_in · 27 taps
        "fused": 6 * sites * 4 * 27,  # same cost as a dense 4→6 conv
        # temporal atoms: c_in·m_t maps × 3 taps; spatial atoms: c_in·m_t·m_s maps × 9 taps;
        # coefficients: c_out maps × c_in·m_t·m_s inputs.
        "factorized": 6 * 2 * sites * 3 + 6 * 2 * 3 * sites * 9 + 6 * sites * 6 * 2 * 3,
        # temporal atoms; coefficients to c_out·m_s maps × c_in·m_t inputs; grouped spatial m_s × 9.
        "sandwich": 6 * 2 * sites * 3 + 6 * 3 * sites * 6 * 2 + 6 * sites * 3 * 9,
    }
    model = FourLayers()
    rows, totals = layer_table(model, densify(model), (1, 4, 4, 8, 8))
    by_name = {row.name: row for row in rows}
    assert by_name["dense"].macs_converted == by_name["dense"].macs_original == hand["dense"]
    for name in ("fused", "factorized", "sandwich"):
        assert by_name[name].form == name
        assert by_name[name].macs_converted == hand[name], name
    assert by_name["fused"].macs_original == hand["fused"]
    geometry = ConvGeometry.create(6, 6, 3, padding=1)
    assert form_cost("sandwich", geometry, 2, 3, 1, 4, 8, 8).macs == hand["sandwich"]
    assert totals.macs_converted == sum(hand.values())


def test_parse_bytes() -> None:
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("8G") == 8 * 2**30
    assert parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1.5 KiB") == 1536
    for bad in ("8XB", "GiB", "-1GiB", "0"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_memory_report_on_a_toy_model() -> None:
    model = ToyNet()
    report = memory_report(model, CLIP, steps=1, memory_budget="40MiB", sweep_frames=(4, 8))
    keys = [s.key for s in report.training]
    assert keys == [
        "original_joint", "original_checkpointing", "joint", "checkpointing",
        "temporal", "spatial", "temporal_checkpointing", "spatial_checkpointing",
    ]
    for key in ("temporal", "spatial", "temporal_checkpointing", "spatial_checkpointing"):
        ratio = report.schedule(key).analytic_ratio
        assert ratio is not None and abs(ratio - 1) < ANALYTIC_TOL, (key, ratio)
    combined = report.schedule("temporal_checkpointing").memory.total_bytes
    assert combined < report.schedule("checkpointing").memory.total_bytes
    assert combined < report.schedule("temporal").memory.total_bytes
    assert [p.frames for p in report.sweep] == [4, 8]
    assert report.fits is not None and report.fits.cross_check["meta_bytes"] == report.fits.cross_check["cpu_bytes"]
    json.dumps(report.to_dict())


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

FAST = ["--input-shape", TINY_INPUT_SHAPE, "--steps", "1"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("report")
    files = write_tiny(folder)
    converted = folder / "tiny-stjfd"
    outcome = run_cli(["convert", *files.args(), "-o", converted])
    assert outcome.exit_code == 0, outcome.output
    return files, converted


def test_cli_report_on_converted_dir_writes_json_markdown_plot(tiny_files, tmp_path) -> None:
    _, converted = tiny_files
    markdown, plot = tmp_path / "r.md", tmp_path / "r.png"
    outcome = run_cli(
        ["report", converted, *FAST, "--memory-budget", "64MiB", "--json", "--markdown", markdown, "--plot", plot,
         "--trust-code"]
    )
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["totals"]["params_converted"] < data["totals"]["params_original"]
    assert len(data["training"]) == 8
    assert {a["key"] for a in data["what_fits"]["answers"]} >= {"joint", "alternating"}
    assert markdown.read_text().startswith("# stjfd memory report")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_report_on_checkpoint_renders_tables(tiny_files) -> None:
    files, _ = tiny_files
    outcome = run_cli(["report", files.checkpoint, "--model", files.model_arg, *FAST, "--atoms", "4"])
    assert outcome.exit_code == 0, outcome.output
    for fragment in ("Model: original vs converted", "Training memory", "temporal stage", "least training memory"):
        assert fragment in outcome.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["missing-folder"], "does not exist"),
        (["{converted}", "--memory-budget", "8XB"], "memory-budget"),
        (["{converted}", "--input-shape", "1,3,x"], "input-shape"),
        (["{converted}", "--input-shape", "1,3,4"], "input-shape"),
    ],
)
def test_cli_report_bad_input_is_one_error_line(tiny_files, tmp_path, monkeypatch, args, fragment) -> None:
    _, converted = tiny_files
    monkeypatch.chdir(tmp_path)
    outcome = run_cli(["report", *[a.format(converted=converted) for a in args]])
    assert_one_error_line(outcome, fragment)
