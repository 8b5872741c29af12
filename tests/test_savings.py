"""Honest savings: defaults that compress separable kernels, --budget-of, and the low-savings warning."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import assert_one_error_line, run_cli
from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import LOW_SAVINGS, convert_model, count_parameters
from stjfd_convert.errors import ConfigError
from stjfd_convert.layers import DecomposedConv3d, default_atoms

SEED = 0


@pytest.mark.parametrize(
    ("length", "taps", "temporal", "spatial", "expected"),
    [
        (3, 9, None, None, (3, 6)),  # the paper's default for a full 3×3×3 kernel
        (1, 9, None, None, (1, 6)),  # (1,3,3): spatial atoms already save
        (3, 1, None, None, (2, 1)),  # (3,1,1) of (2+1)D / S3D / SlowFast: min(L, 3) would keep all 3 taps
        (5, 1, None, None, (3, 1)),  # (5,1,1): min(L, 3) already saves
        (2, 1, None, None, (1, 1)),
        (1, 4, None, None, (1, 3)),  # (1,2,2): 4 taps < 6
        (2, 4, None, None, (2, 3)),  # both modes full: the one with more taps gives one up
        (1, 1, None, None, (1, 1)),  # 1×1×1 is never decomposed anyway
        (3, 1, 3, None, (3, 1)),  # an explicit choice wins, even when it saves nothing
        (2, 4, None, 4, (1, 4)),  # explicit spatial → the free temporal mode gives one up
        (3, 9, 7, 20, (3, 9)),  # explicit values are clipped to the kernel
    ],
)
def test_default_atoms(length: int, taps: int, temporal: int | None, spatial: int | None, expected: tuple) -> None:
    assert default_atoms(length, taps, temporal, spatial) == expected


def _r2plus1d_block() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv3d(3, 16, (1, 3, 3), padding=(0, 1, 1)),
        nn.ReLU(),
        nn.Conv3d(16, 16, (3, 1, 1), padding=(1, 0, 0)),
        nn.ReLU(),
        nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1)),
        nn.Conv3d(16, 16, (3, 1, 1), padding=(1, 0, 0)),
    )


def test_separable_temporal_convs_are_decomposed_by_default() -> None:
    model = _r2plus1d_block()
    converted, report = convert_model(model, ConvertConfig())
    temporal = [layer for layer in report.layers if layer.kernel_size == (3, 1, 1)]
    assert temporal and all(layer.decomposed for layer in temporal)
    assert {(layer.temporal_atoms, layer.spatial_atoms) for layer in temporal} == {(2, 1)}
    assert all(layer.params_after < layer.params_before for layer in temporal)
    assert isinstance(converted[2], DecomposedConv3d) and converted[2].num_temporal_atoms == 2
    # The constructor and from_conv follow the same defaults.
    assert DecomposedConv3d(4, 4, (3, 1, 1)).num_temporal_atoms == 2
    assert DecomposedConv3d.from_conv(model[2]).num_temporal_atoms == 2
    # The user's explicit choice still wins: three atoms of a 3-tap kernel save nothing, so it stays dense.
    _, explicit = convert_model(model, ConvertConfig(temporal_atoms=3))
    assert all("would not save" in (layer.skipped or "") for layer in explicit.layers if layer.kernel_size == (3, 1, 1))


@pytest.mark.slow
def test_r2plus1d_18_decomposes_its_temporal_convs_by_default() -> None:
    from torchvision.models.video import r2plus1d_18

    torch.manual_seed(SEED)
    _, report = convert_model(r2plus1d_18(), ConvertConfig())
    temporal = [layer for layer in report.layers if layer.kernel_size[1:] == (1, 1) and layer.kernel_size[0] > 1]
    assert temporal and all(layer.decomposed for layer in temporal)
    assert report.warnings == []


def _pointwise_depthwise_net() -> nn.Module:
    """An X3D/CSN-like block: most parameters pointwise, the 3×3×3 kernels depthwise, a linear head."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv3d(3, 64, 1),
        nn.Conv3d(64, 64, 3, padding=1, groups=64),
        nn.Conv3d(64, 64, 1),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def test_low_savings_warning_says_why() -> None:
    model = _pointwise_depthwise_net()
    _, report = convert_model(model, ConvertConfig())
    assert 1 - report.ratio < LOW_SAVINGS
    assert report.touchable_params == 64 * 27 + 64  # the depthwise conv, bias included
    assert report.touchable_share == pytest.approx(report.touchable_params / count_parameters(model))
    (warning,) = report.warnings
    assert "saves only" in warning and "pointwise" in warning and "depthwise" in warning
    assert "outside Conv3d" in warning
    totals = report.to_dict()["totals"]
    assert totals["touchable_share"] == pytest.approx(report.touchable_share)
    assert report.to_dict()["warnings"] == [warning]


def test_no_warning_when_conversion_saves() -> None:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Conv3d(8, 16, 3), nn.Conv3d(16, 16, 3))
    _, report = convert_model(model, ConvertConfig())
    assert 1 - report.ratio >= LOW_SAVINGS and report.warnings == []
    assert report.touchable_share == pytest.approx(1.0)


def _conv_and_head() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv3d(8, 32, 3), nn.Conv3d(32, 32, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(32, 200)
    )


def test_budget_of_convs_and_of_model() -> None:
    model = _conv_and_head()
    total = count_parameters(model)
    _, convs = convert_model(model, ConvertConfig(budget=0.5))
    _, whole = convert_model(model, ConvertConfig(budget=0.5, budget_of="model"))
    assert whole.params_after <= 0.5 * total  # a share of the whole model …
    assert convs.params_after > 0.5 * total  # … is more than the same share of its convs
    assert whole.config.to_dict()["budget_of"] == "model"


def test_unreachable_model_budget_names_the_smallest_share() -> None:
    with pytest.raises(ConfigError) as caught:
        convert_model(_conv_and_head(), ConvertConfig(budget=0.05, budget_of="model"))
    assert "out of reach" in caught.value.message and "--budget-of convs" in caught.value.hint


def test_budget_of_needs_budget() -> None:
    with pytest.raises(ConfigError, match="only with --budget"):
        ConvertConfig(budget_of="model")
    with pytest.raises(ConfigError, match="unknown --budget-of"):
        ConvertConfig(budget=0.5, budget_of="layers")


NET_SOURCE = textwrap.dedent(
    """
    from torch import nn

    def build():
        return nn.Sequential(
            nn.Conv3d(3, 64, 1), nn.Conv3d(64, 64, 3, padding=1, groups=64), nn.Conv3d(64, 64, 1),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, 10),
        )
    """
)


def test_cli_prints_the_warning_and_the_touchable_share(tmp_path: Path) -> None:
    (tmp_path / "dwnet.py").write_text(NET_SOURCE)
    out = tmp_path / "conv"
    args = ["convert", "--model", f"{tmp_path / 'dwnet.py'}:build", "--input-shape", "1,3,4,8,8", "-o", out]
    outcome = run_cli(args)
    assert outcome.exit_code == 0, outcome.output
    assert "warning: conversion saves only" in " ".join(outcome.output.split())
    assert "atoms can touch" in outcome.output
    as_json = run_cli([*args, "--force", "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["warnings"] and data["totals"]["touchable_share"] < 1


def test_cli_rejects_an_unknown_budget_scope(tmp_path: Path) -> None:
    outcome = run_cli(["convert", "--arch", "r3d_18", "--budget", "0.5", "--budget-of", "layers", "-o", tmp_path / "o"])
    assert_one_error_line(outcome, "--budget-of")
