"""Eval-mode per-call work of DecomposedConv3d: one F.conv3d on the cached weight, nothing rebuilt per call.

Counts calls (monkeypatched functions), never wall-clock time: ``benchmarks/bench_overhead.py`` measures
the µs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stjfd_convert import layers as layers_module
from stjfd_convert.layers import DecomposedConv3d, plan_key

SEED = 0


class Counter:
    """Wraps a function, recording the arguments of every call."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list[tuple] = []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self.fn(*args, **kwargs)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, Counter]:
    counters = {
        "conv3d": Counter(F.conv3d),
        "pad": Counter(F.pad),
        "reconstruct": Counter(layers_module.reconstruct_weight),
        "cheapest_form": Counter(layers_module.cheapest_form),
        "plan_key": Counter(layers_module.plan_key),
        "pad_amounts": Counter(layers_module.pad_amounts),
    }
    monkeypatch.setattr(torch.nn.functional, "conv3d", counters["conv3d"])
    monkeypatch.setattr(torch.nn.functional, "pad", counters["pad"])
    monkeypatch.setattr(layers_module, "reconstruct_weight", counters["reconstruct"])
    for name in ("cheapest_form", "plan_key", "pad_amounts"):
        monkeypatch.setattr(layers_module, name, counters[name])
    return counters


def _layer(mode: str, **kwargs) -> DecomposedConv3d:
    torch.manual_seed(SEED)
    return DecomposedConv3d.from_conv(nn.Conv3d(4, 6, 3, padding=1, **kwargs), mode=mode).eval()


def _reset(counters: dict[str, Counter]) -> None:
    for counter in counters.values():
        counter.calls.clear()


@pytest.mark.parametrize("mode", ["fused", "auto (plan)", "auto (cost model)"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_eval_fused_path_is_one_conv3d_on_the_cached_weight(counted: dict[str, Counter], mode: str, context: str) -> None:
    layer = _layer("fused" if mode == "fused" else "auto")
    x = torch.randn(2, 4, 3, 6, 6)
    if mode == "auto (plan)":
        layer.plan[plan_key(x)] = "fused"
    expected = F.conv3d(x, layer.weight.detach(), layer.bias.detach(), padding=1)
    guard = torch.no_grad if context == "no_grad" else torch.inference_mode
    _reset(counted)
    with guard():
        layer(x)  # first call: builds and caches the fused weight, resolves the form
        assert len(counted["reconstruct"].calls) == 1
        cached = layer._derived_cache[f"fused/{context == 'inference_mode'}"][1]
        _reset(counted)
        for _ in range(5):
            out = layer(x)
    assert len(counted["conv3d"].calls) == 5
    assert all(call[1] is cached for call in counted["conv3d"].calls)  # the cached W, not a rebuilt one
    assert counted["reconstruct"].calls == [] and counted["pad"].calls == []
    # auto resolved once (no plan key string, no cost model per call); padding worked out once.
    assert counted["cheapest_form"].calls == [] and counted["plan_key"].calls == []
    assert counted["pad_amounts"].calls == []
    assert layer.form_for(x) == "fused"
    assert torch.allclose(out, expected, atol=1e-5)


def test_explicit_padding_is_worked_out_once_and_still_applied(counted: dict[str, Counter]) -> None:
    layer = _layer("fused", padding_mode="replicate")
    x = torch.randn(1, 4, 3, 5, 5)
    reference = nn.Conv3d(4, 6, 3, padding=1, padding_mode="replicate")
    with torch.no_grad():
        reference.weight.copy_(layer.weight)
        reference.bias.copy_(layer.bias)
        layer(x)
        _reset(counted)
        out = layer(x)
        expected = reference(x)
    assert len(counted["pad"].calls) == 2 and len(counted["conv3d"].calls) == 2  # one each: ours, the reference
    assert torch.allclose(out, expected, atol=1e-5)


def test_cached_weight_follows_parameter_changes(counted: dict[str, Counter]) -> None:
    layer = _layer("fused")
    x = torch.randn(1, 4, 3, 5, 5)
    with torch.no_grad():
        before = layer(x)
        layer.coefficients.mul_(2.0)  # in place: the version counter moves
        after = layer(x)
        assert len(counted["reconstruct"].calls) == 2
        assert torch.allclose(after - layer.bias.view(1, -1, 1, 1, 1),
                              2 * (before - layer.bias.view(1, -1, 1, 1, 1)), atol=1e-5)
        layer.spatial_atoms.data = layer.spatial_atoms.data.flip(0)  # storage swapped behind autograd's back
        flipped = layer(x)
        assert len(counted["reconstruct"].calls) == 3
        assert torch.allclose(flipped, F.conv3d(x, layer.weight, layer.bias, padding=1), atol=1e-5)
        layer.double()  # .to()/.double(): nothing derived from the float32 values survives
        assert layer._derived_cache == {}
        assert layer(x.double()).dtype == torch.float64


def test_auto_follows_a_plan_edited_after_it_resolved() -> None:
    layer = _layer("auto")
    x = torch.randn(1, 4, 3, 5, 5)
    with torch.no_grad():
        fused = layer(x)
        assert layer.form_for(x) == "fused"
        layer.plan[plan_key(x)] = "sandwich"  # in place, as planner.apply_plan does
        assert layer.form_for(x) == "sandwich"
        assert torch.allclose(layer(x), fused, atol=1e-5)
        layer.plan = {plan_key(x): "spatial_first"}  # a new plan
        assert layer.form_for(x) == "spatial_first"
        del layer.plan[plan_key(x)]
        assert layer.form_for(x) == "fused"  # back to the cost model's choice
    assert dict(layer.plan) == {} and layer.describe()["mode"] == "auto"


def test_training_still_rebuilds_with_a_graph(counted: dict[str, Counter]) -> None:
    layer = _layer("fused").train()
    x = torch.randn(1, 4, 3, 5, 5)
    layer(x).sum().backward()
    assert layer.coefficients.grad is not None and layer.temporal_atoms.grad.abs().sum() > 0
    assert layer._derived_cache == {}  # nothing cached while gradients are needed
