"""The cost model's CUDA figures: on an H200-class GPU it keeps r3d_18 fused unless a measured plan says otherwise.

Issue #16 measured r3d_18 on an H200: every factorised form 2–15× slower than dense (temporal_first
1.4–3.6×, factorized 1.8–15×), so ``auto`` without a measured plan must run fused there. No GPU is needed:
these are predictions, checked on the real layer geometries of torchvision's r3d_18 (traced on meta).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from torch import nn

from stjfd_convert.functional.conv import ConvGeometry
from stjfd_convert.functional.cost import DEVICE_COSTS, FORMS, cheapest_form, predict_seconds
from stjfd_convert.layers import default_atoms

ATOMS = [(3, 6), (2, 4), (3, 4), (2, 6), (None, None)]  # None: the paper defaults (default_atoms)
BATCHES = [1, 8, 32]
CLIPS = [(16, 112, 112), (8, 112, 112), (32, 112, 112), (16, 160, 160)]


def r3d18_layers(clip: tuple[int, int, int]) -> list[tuple[ConvGeometry, tuple[int, ...]]]:
    """(geometry, input shape at batch 1) of every r3d_18 conv that conversion decomposes (not 1×1×1)."""
    with torch.device("meta"):
        model = torchvision.models.video.r3d_18()
    layers: list[tuple[ConvGeometry, tuple[int, ...]]] = []
    hooks = [
        conv.register_forward_pre_hook(lambda m, args: layers.append((ConvGeometry.from_conv(m), tuple(args[0].shape))))
        for conv in model.modules()
        if isinstance(conv, nn.Conv3d) and conv.kernel_size != (1, 1, 1)
    ]
    model(torch.empty(1, 3, *clip, device="meta"))
    for hook in hooks:
        hook.remove()
    return layers


@pytest.fixture(scope="module")
def geometries() -> dict[tuple[int, int, int], list[tuple[ConvGeometry, tuple[int, ...]]]]:
    return {clip: r3d18_layers(clip) for clip in CLIPS}


def _atoms(geometry: ConvGeometry, atoms: tuple[int | None, int | None]) -> tuple[int, int]:
    m_t, m_s = default_atoms(geometry.temporal_taps, geometry.spatial_taps, *atoms)
    return min(m_t, geometry.temporal_taps), min(m_s, geometry.spatial_taps)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("atoms", ATOMS, ids=lambda a: "x".join(map(str, a)))
def test_cuda_cost_plan_keeps_r3d18_fused(geometries, batch: int, atoms) -> None:
    for clip, layers in geometries.items():
        assert len(layers) == 17  # stem + 16 residual-block convs
        for geometry, (_, _, t, h, w) in layers:
            m_t, m_s = _atoms(geometry, atoms)
            args = (geometry, m_t, m_s, batch, t, h, w)
            assert cheapest_form(*args, "cuda") == "fused", (clip, geometry, atoms, batch)
            fused = predict_seconds("fused", *args, "cuda")
            # Not a near miss either: every factorised form is predicted slower than the guard by a clear gap.
            for form in FORMS[1:]:
                assert predict_seconds(form, *args, "cuda") > 0.75 * fused, (form, geometry, atoms, batch)


@pytest.mark.parametrize("atoms", [(3, 6), (2, 4)])
def test_cuda_figures_reproduce_the_h200_whole_model_ratios(geometries, atoms) -> None:
    """r3d_18 with every layer in one form: slower than fused, in the range the issue measured."""
    ranges = {"temporal_first": (1.2, 3.6), "spatial_first": (1.8, 15.0), "sandwich": (1.8, 15.0),
              "factorized": (1.8, 17.0)}
    for batch in BATCHES:
        totals = dict.fromkeys(FORMS, 0.0)
        for geometry, (_, _, t, h, w) in geometries[(16, 112, 112)]:
            m_t, m_s = _atoms(geometry, atoms)
            for form in FORMS:
                totals[form] += predict_seconds(form, geometry, m_t, m_s, batch, t, h, w, "cuda")
        for form, (low, high) in ranges.items():
            assert low <= totals[form] / totals["fused"] <= high, (form, batch, totals[form] / totals["fused"])


def test_cost_model_never_picks_a_form_predicted_slower_than_fused_beyond_the_guard() -> None:
    """On every device with figures: a non-fused choice is predicted at most ``margin`` × fused."""
    shapes = [(1, 16, 56, 56), (8, 8, 28, 28), (32, 4, 14, 14), (1, 2, 7, 7)]
    kernels = [(3, 3, 3), (1, 3, 3), (3, 1, 1), (3, 7, 7)]
    for device, costs in DEVICE_COSTS.items():
        for channels, kernel, (batch, t, h, w) in itertools.product((16, 128, 512), kernels, shapes):
            geometry = ConvGeometry.create(channels, channels, kernel, padding=tuple(k // 2 for k in kernel))
            for m_t, m_s in {(1, 1), _atoms(geometry, (None, None)), (geometry.temporal_taps, geometry.spatial_taps)}:
                args = (geometry, m_t, m_s, batch, t, h, w)
                form = cheapest_form(*args, device)
                fused = predict_seconds("fused", *args, device)
                assert form == "fused" or predict_seconds(form, *args, device) <= costs.margin * fused


def test_a_device_without_figures_runs_fused() -> None:
    deep = ConvGeometry.create(512, 512, (3, 7, 7), padding=(1, 3, 3))
    assert cheapest_form(deep, 1, 1, 1, 2, 7, 7, "cpu") != "fused"  # CPU figures do pick a factorised form here
    for device in ("mps", "xpu", "meta"):
        assert cheapest_form(deep, 1, 1, 1, 2, 7, 7, device) == "fused"
