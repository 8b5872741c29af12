"""Data-aware conversion (`--calibrate`, issue #12 deliverable 2): statistics, maths, library and CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli_helpers import TINY_INPUT_SHAPE, run_cli, write_tiny
from videos import make_video_dataset

from stjfd_convert.calibrate import calibrate_model, calibration_clips, gather_statistics, sample_patches
from stjfd_convert.cli.render import calibration_line
from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.functional.calibrated import LayerStatistics, calibrated_decompose
from stjfd_convert.functional.decompose import decompose, kernel_view

SEED = 0
ATOL_FP32 = 1e-5
ATOL_FP64 = 1e-9
RTOL_SUM = 1e-4  # sums over thousands of float32 products


def _patch_net() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        nn.Conv3d(8, 8, (3, 3, 3), padding=1), nn.BatchNorm3d(8), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def _correlated_clips(count: int, seed: int = SEED) -> torch.Tensor:
    """Smooth, correlated clips [count, 3, 6, 12, 12] (neighbouring taps see similar values, like video)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, 3, 6, 12, 12, generator=generator)
    return F.avg_pool3d(F.pad(noise, (1, 1, 1, 1, 1, 1), mode="replicate"), 3, stride=1)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv3d(2, 3, 3, padding=1),
        nn.Conv3d(2, 3, (3, 3, 3), stride=(1, 2, 2), padding=(1, 0, 2), dilation=(2, 1, 1)),
        nn.Conv3d(2, 3, 3, padding="same", padding_mode="replicate"),
        nn.Conv3d(4, 4, (2, 3, 3), padding=(0, 1, 1), groups=2),
    ],
    ids=["zeros", "strided-dilated", "same-replicate", "grouped"],
)
def test_sampled_patches_are_exactly_what_the_conv_multiplies(conv: nn.Conv3d) -> None:
    torch.manual_seed(SEED)
    x = torch.randn(2, conv.in_channels, 5, 7, 6)
    patches = sample_patches(conv, x, 10**6, torch.Generator().manual_seed(SEED))  # every position
    output = conv._conv_forward(x, conv.weight, None)  # [B, O, T', H', W']
    assert patches.shape == (output[:, 0].numel(), conv.kernel_size[0] * conv.kernel_size[1] * conv.kernel_size[2],
                             conv.in_channels)
    per_group = conv.in_channels // conv.groups
    outs_per_group = conv.out_channels // conv.groups
    for o in range(conv.out_channels):
        group = o // outs_per_group
        weight = conv.weight[o].reshape(per_group, -1)  # [I/g, L·S]
        channels = patches[:, :, group * per_group:(group + 1) * per_group]  # [P, L·S, I/g]
        expected = output[:, o].sum()
        got = torch.einsum("pki,ik->", channels, weight)
        assert torch.allclose(got, expected, rtol=RTOL_SUM, atol=ATOL_FP32 * output[:, o].numel())


def test_calibrated_decomposition_keeps_full_rank_exact_and_cuts_the_modelled_output_error() -> None:
    torch.manual_seed(SEED)
    weight = torch.randn(8, 6, 3, 3, 3)
    mix = torch.randn(27, 27)
    samples = torch.randn(4000, 27) @ mix
    stats = LayerStatistics((samples.t() @ samples).double(), torch.rand(6, dtype=torch.float64) + 0.1, 4000)
    exact, modelled = calibrated_decompose(weight, 3, 9, stats)
    assert exact.rel_error < ATOL_FP32 and modelled < ATOL_FP32
    gram = stats.tap_gram / stats.tap_gram.diagonal().mean()
    energy = stats.channel_energy.repeat(8)  # row (o, i) reads channel i
    rows = kernel_view(weight).reshape(48, 27)

    def output_error(decomposition) -> float:
        approx = torch.einsum("oipq,tp,sq->oits", *(t.double() for t in (
            decomposition.coefficients, decomposition.temporal_atoms, decomposition.spatial_atoms))).reshape(48, 27)
        error = rows - approx
        return float(((energy * ((error @ gram) * error).sum(1)).sum() / (energy * ((rows @ gram) * rows).sum(1)).sum())
                     ** 0.5)

    for ranks in [(1, 2), (2, 4), (1, 9), (3, 1)]:
        calibrated, _ = calibrated_decompose(weight, *ranks, stats)
        plain = decompose(weight, *ranks)
        assert output_error(calibrated) < output_error(plain)
        for atoms in (calibrated.temporal_atoms, calibrated.spatial_atoms):  # orthonormal, like plain atoms
            assert torch.allclose(atoms.t() @ atoms, torch.eye(atoms.shape[1]), atol=ATOL_FP32)


def test_calibrate_model_beats_plain_on_layers_and_outputs_and_leaves_the_model_alone() -> None:
    model = _patch_net()
    with torch.no_grad():  # BatchNorm statistics of the data, as a trained model would have
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.momentum = None
        model.train()(_correlated_clips(16, seed=1))
        model.eval()
    before = copy.deepcopy(model.state_dict())
    batches = list(_correlated_clips(12).split(4))
    config = ConvertConfig(temporal_atoms=1, spatial_atoms=2)
    converted, report = calibrate_model(model, batches, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = report.decomposed
    assert len(rows) == 2 and all(r.output_error is not None and r.plain_output_error is not None for r in rows)
    assert sum(r.output_error for r in rows) < sum(r.plain_output_error for r in rows)
    assert report.calibration["batchnorm"] == len(batches)
    assert report.calibration["model_output_error"] < report.calibration["plain_model_output_error"]
    plain, _ = convert_model(model, config)
    held_out = _correlated_clips(8, seed=2)
    with torch.no_grad():
        reference = model(held_out)
        error = lambda net: float((net(held_out) - reference).norm() / reference.norm())  # noqa: E731
        assert error(converted) < error(plain)
    # Full rank stays exact with calibration too.
    exact, _ = calibrate_model(model, batches, ConvertConfig(full_rank=True), batchnorm=False)
    with torch.no_grad():
        assert torch.allclose(exact(held_out), reference, atol=ATOL_FP32)


def test_batchnorm_statistics_are_kept_when_re_estimating_them_moves_away_from_the_original() -> None:
    """An original whose BatchNorm statistics were never estimated on this data (here: never at all) is matched
    worse after re-estimating them on the calibration clips: those are then dropped, and the report says so."""
    model = _patch_net()  # default running statistics: mean 0, variance 1
    batches = list(_correlated_clips(12).split(4))
    config = ConvertConfig(temporal_atoms=1, spatial_atoms=2)
    converted, report = calibrate_model(model, batches, config)
    rejected = report.calibration["batchnorm_rejected"]
    assert "batchnorm" not in report.calibration and rejected["batches"] == len(batches)
    assert report.calibration["model_output_error"] < rejected["model_output_error"]
    assert report.calibration["model_output_error"] < report.calibration["plain_model_output_error"]
    for name, module in converted.named_modules():
        if isinstance(module, nn.BatchNorm3d):
            original = dict(model.named_modules())[name]
            assert torch.equal(module.running_mean, original.running_mean)
            assert torch.equal(module.running_var, original.running_var)
    assert "BatchNorm statistics kept" in calibration_line(report)


def test_statistics_count_every_sampled_patch_and_ignore_pointwise_convs() -> None:
    model = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.Conv3d(4, 4, 1)).eval()
    clips = _correlated_clips(2)
    stats = gather_statistics(model, [clips], positions=50)
    assert list(stats) == ["0"]
    assert stats["0"].patches == 50 * 3 and stats["0"].tap_gram.shape == (27, 27)
    assert torch.allclose(stats["0"].tap_gram, stats["0"].tap_gram.t(), atol=ATOL_FP64)


def test_calibration_clips_cut_like_the_input_shape_in_any_layout(tmp_path: Path) -> None:
    make_video_dataset(tmp_path / "clips", per_class=1, T=10, H=20, W=28)  # 3 videos, no labels needed
    batches = calibration_clips(tmp_path / "clips", (1, 6, 8, 12, 3), layout="BTHWC", dtype="uint8", clips=5,
                                batch_size=2)
    shapes = [tuple(b.shape) for b in batches]
    assert batches.clips == 6 and sum(s[0] for s in shapes) == 6  # 2 clips from each of 3 videos
    assert all(s[1:] == (6, 8, 12, 3) for s in shapes) and next(iter(batches)).dtype == torch.uint8
    split = calibration_clips(tmp_path / "clips", [(1, 3, 2, 8, 8), (1, 3, 8, 8, 8)], clips=3, batch_size=3,
                              pathway_strides=(4, 1))
    slow, fast = next(iter(split))
    assert slow.shape == (3, 3, 2, 8, 8) and fast.shape == (3, 3, 8, 8, 8)


def test_cli_convert_calibrate_shows_and_records_both_errors(tmp_path: Path) -> None:
    tiny = write_tiny(tmp_path / "tiny")
    make_video_dataset(tmp_path / "clips", per_class=2, T=8, H=16, W=16)
    shape = TINY_INPUT_SHAPE
    args = ["convert", tiny.checkpoint, "--model", tiny.model_arg, "--input-shape", shape, "--atoms", 2,
            "--temporal-atoms", 1, "--calibrate", tmp_path / "clips", "--calibrate-clips", 4]
    outcome = run_cli([*args, "-o", tmp_path / "conv", "--json"])
    assert outcome.exit_code == 0, outcome.output
    result = json.loads(outcome.stdout)
    decomposed = [layer for layer in result["layers"] if layer["decomposed"]]
    assert decomposed and all(layer["output_error"] is not None and layer["plain_output_error"] is not None
                              for layer in decomposed)
    assert result["calibration"]["clips"] == 4 and result["calibration"]["folder"] == str((tmp_path / "clips").resolve())
    manifest = json.loads((tmp_path / "conv" / "model.stjfd.json").read_text())
    assert manifest["conversion"]["calibration"]["clips"] == 4
    text = run_cli([*args, "-o", tmp_path / "conv2"])
    assert text.exit_code == 0, text.output
    assert "output error" in text.stdout and "calibrated on 4 clips" in text.stdout
