"""Execution planning: cost model, measured plans, auto mode, derived-weight cache, `stjfd plan`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from stjfd_convert import ConvertConfig, DecomposedConv3d, convert_model, load_converted, set_mode
from stjfd_convert.cli.main import app
from stjfd_convert.functional.conv import ConvGeometry
from stjfd_convert.functional.cost import FORMS, cheapest_form, form_cost
from stjfd_convert.models import ArchSpec
from stjfd_convert.planner import (
    MEASURE_MARGIN,
    apply_plan,
    choose_measured_form,
    plan_model,
    save_plan,
    trace_layer_inputs,
)
from stjfd_convert.saved_model import MANIFEST_FILE, save_converted

REL_FP32 = 1e-5
SEED = 0


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_mac_counts_by_hand() -> None:
    geom = ConvGeometry.create(4, 6, (3, 3, 3), stride=1, padding=1)
    b, t, h, w = 2, 5, 7, 7
    out = b * 6 * t * h * w
    assert form_cost("dense", geom, 2, 4, b, t, h, w).macs == out * 4 * 27
    fact = form_cost("factorized", geom, 2, 4, b, t, h, w)
    assert fact.dense_macs == out * 4 * 2 * 4
    assert fact.depthwise_macs == b * 4 * 2 * t * h * w * 3 + b * 4 * 2 * 4 * t * h * w * 9
    sand = form_cost("sandwich", geom, 2, 4, b, t, h, w)
    assert sand.dense_macs == b * 6 * 4 * t * h * w * 4 * 2
    assert form_cost("spatial_first", geom, 2, 4, b, t, h, w).dense_macs == out * 4 * 4 * 3
    assert form_cost("temporal_first", geom, 2, 4, b, t, h, w).dense_macs == out * 4 * 2 * 9


def test_cost_model_picks_obvious_forms() -> None:
    # Few atoms on a wide, deep layer: a factorised form needs ~50x fewer MACs.
    deep = ConvGeometry.create(512, 512, (3, 7, 7), padding=(1, 3, 3))
    assert cheapest_form(deep, 1, 1, 1, 2, 7, 7) != "fused"
    # Full-rank atoms on a 3-channel stem: every factorised form does more work than fused.
    stem = ConvGeometry.create(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
    assert cheapest_form(stem, 3, 49, 1, 16, 112, 112) == "fused"


def _layer(c_in: int, c_out: int, kernel, m_t: int, m_s: int, **kw) -> DecomposedConv3d:
    torch.manual_seed(SEED)
    return DecomposedConv3d(c_in, c_out, kernel, num_temporal_atoms=m_t, num_spatial_atoms=m_s, **kw).eval()


class FakeTimer:
    """A plan timer returning fixed seconds per form, keyed by the input shape a layer sees."""

    def __init__(self, times: dict[tuple[int, ...], dict[str, float]]) -> None:
        self.times = times
        self.calls: list[tuple[DecomposedConv3d, tuple[str, ...], torch.Tensor, int]] = []

    def __call__(self, layer, forms, x, repeats) -> dict[str, float]:
        self.calls.append((layer, tuple(forms), x, repeats))
        return dict(self.times[tuple(x.shape)])


def _two_layer_model() -> nn.Sequential:
    return nn.Sequential(
        _layer(3, 2, (3, 3, 3), 3, 9, padding=1, stride=(1, 4, 4)),
        nn.Identity(),
        _layer(2, 8, (1, 7, 7), 1, 1, padding=(0, 3, 3)),
    )


TWO_LAYER_SHAPE = (1, 3, 4, 16, 16)
FIRST_INPUT, SECOND_INPUT = (1, 3, 4, 16, 16), (1, 2, 4, 4, 4)


def _times(fastest: str, seconds: float, others: float = 1.0) -> dict[str, float]:
    return {form: seconds if form == fastest else others for form in FORMS}


def test_measured_plan_picks_the_form_with_the_lowest_measured_time() -> None:
    model = _two_layer_model()
    times = {FIRST_INPUT: _times("fused", 0.1), SECOND_INPUT: _times("sandwich", 0.2)}
    timer = FakeTimer(times)
    plan = plan_model(model, TWO_LAYER_SHAPE, measure=True, repeats=7, timer=timer)
    assert plan.measured is True
    assert plan.modes == {"0": "fused", "2": "sandwich"}
    measured = {choice.name: choice.measured for choice in plan.layers}
    assert measured == {"0": times[FIRST_INPUT], "2": times[SECOND_INPUT]}
    # The timer saw a private eval-mode copy of each layer, every form, the traced input and the repeats.
    assert [tuple(x.shape) for _, _, x, _ in timer.calls] == [FIRST_INPUT, SECOND_INPUT]
    for (probe, forms, x, repeats), original in zip(timer.calls, (model[0], model[2])):
        assert probe is not original and not probe.training and isinstance(probe, DecomposedConv3d)
        assert set(forms) == set(FORMS) and repeats == 7 and x.dtype == torch.float32
    assert all(m.mode == "fused" for m in model.modules() if isinstance(m, DecomposedConv3d))  # untouched
    # The choice is what apply_plan stores and what auto mode then runs.
    apply_plan(model, plan)
    assert model[0].form_for(torch.empty(FIRST_INPUT)) == "fused"
    assert model[2].form_for(torch.empty(SECOND_INPUT)) == "sandwich"


@pytest.mark.parametrize(
    ("fastest", "ratio", "chosen"),
    [("factorized", 0.5, "factorized"), ("factorized", MEASURE_MARGIN, "factorized"),
     ("factorized", 0.99, "fused"), ("fused", 0.5, "fused")],
)
def test_measured_plan_keeps_fused_unless_beaten_by_the_margin(fastest: str, ratio: float, chosen: str) -> None:
    # fused takes 1 s; the fastest form takes ``ratio`` s; every other form 2 s.
    seconds = {form: 2.0 for form in FORMS} | {"fused": 1.0, fastest: ratio}
    timer = FakeTimer({FIRST_INPUT: seconds, SECOND_INPUT: seconds})
    plan = plan_model(_two_layer_model(), TWO_LAYER_SHAPE, measure=True, timer=timer)
    assert plan.modes == {"0": chosen, "2": chosen}
    assert choose_measured_form(seconds) == chosen


def test_measured_plan_always_times_fused_and_only_the_forms_asked_for() -> None:
    timer = FakeTimer({FIRST_INPUT: _times("sandwich", 0.1), SECOND_INPUT: _times("sandwich", 0.1)})
    plan = plan_model(_two_layer_model(), TWO_LAYER_SHAPE, measure=True, forms=("sandwich",), timer=timer)
    assert all(forms == ("fused", "sandwich") for _, forms, _, _ in timer.calls)
    assert plan.modes == {"0": "sandwich", "2": "sandwich"}
    # Without measure the cost model decides and the timer is never called.
    unused = FakeTimer({})
    assert plan_model(_two_layer_model(), TWO_LAYER_SHAPE, timer=unused).measured is False
    assert unused.calls == []


def test_measured_plan_runs_the_real_timer() -> None:
    # The wall-clock timer: every form gets a finite positive time. Which is faster is not asserted
    # (a busy machine can invert close calls); the fake-timer tests above cover the choice.
    plan = plan_model(_two_layer_model(), TWO_LAYER_SHAPE, measure=True, repeats=1)
    for choice in plan.layers:
        assert set(choice.measured) == set(FORMS)
        assert all(0 < seconds < float("inf") for seconds in choice.measured.values())
        assert choice.form == choose_measured_form(choice.measured)


def test_auto_matches_fused_and_follows_plan() -> None:
    torch.manual_seed(SEED)
    original = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 32, 3, padding=1, stride=2))
    converted, _ = convert_model(original, ConvertConfig(temporal_atoms=2, spatial_atoms=4, mode="auto"))
    x = torch.randn(2, 3, 6, 16, 16)
    with torch.no_grad():
        fused = set_mode(converted, "fused")(x)
        set_mode(converted, "auto")
        shapes = trace_layer_inputs(converted, x.shape)
        assert shapes == {"0": (2, 3, 6, 16, 16), "2": (2, 16, 6, 16, 16)}
        plan = plan_model(converted, x.shape)
        forced = plan
        for choice in forced.layers:
            choice.form = "sandwich"
        apply_plan(converted, forced)
        assert all(m.form_for(x if n == "0" else torch.empty(2, 16, 6, 16, 16)) == "sandwich"
                   for n, m in converted.named_modules() if isinstance(m, DecomposedConv3d))
        auto = converted(x)
    assert _rel(auto, fused) <= REL_FP32


def test_derived_weight_cache_tracks_parameter_updates() -> None:
    layer = _layer(4, 6, 3, 2, 4, padding=1)
    x = torch.randn(1, 4, 5, 8, 8)
    with torch.no_grad():
        first = layer(x)
        cached = layer._derived_cache["fused/False"][1]
        layer(x)
        assert layer._derived_cache["fused/False"][1] is cached  # reused while parameters are unchanged
    # A training step changes the parameters: the next no-grad forward must rebuild.
    layer.train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().sum().backward()
    opt.step()
    layer.eval()
    with torch.no_grad():
        second = layer(x)
        expected = nn.functional.conv3d(x, layer.weight, layer.bias, padding=1)
    assert not torch.equal(first, second)
    assert _rel(second, expected) <= REL_FP32
    # With gradients needed, nothing cached is used: gradients reach the atoms.
    layer.zero_grad()
    layer(x).sum().backward()
    assert layer.temporal_atoms.grad is not None and layer.temporal_atoms.grad.abs().sum() > 0


def _tiny_dir(tmp_path) -> tuple:
    source = tmp_path / "plannet.py"
    source.write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 16, 3, padding=1))\n"
    )
    torch.manual_seed(SEED)
    spec = ArchSpec("callable", f"{source}:build", {})
    from stjfd_convert.models import build_model

    model = build_model(spec)
    converted, _ = convert_model(model, ConvertConfig(temporal_atoms=2, spatial_atoms=4))
    out = save_converted(converted, tmp_path / "conv", spec, input_shape=(1, 3, 4, 12, 12))
    return out, converted


def test_save_plan_roundtrip(tmp_path) -> None:
    out, converted = _tiny_dir(tmp_path)
    plan = plan_model(converted, (1, 3, 4, 12, 12), measure=True, repeats=2)
    save_plan(out, plan)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["plans"][0]["forms"] == plan.modes
    loaded = load_converted(out, trust_code=True).model
    x = torch.randn(1, 3, 4, 12, 12)
    for name, module in loaded.named_modules():
        if isinstance(module, DecomposedConv3d):
            assert module.mode == "auto"
            assert module.plan == {"cpu/float32/1x%s" % "x".join(map(str, dict(
                (c.name, c.input_shape) for c in plan.layers)[name][1:])): plan.modes[name]}
    with torch.no_grad():
        assert _rel(loaded(x), set_mode(converted, "fused")(x)) <= REL_FP32


def test_plan_cli(tmp_path) -> None:
    out, _ = _tiny_dir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(out), "--repeats", "2", "--json", "--trust-code"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["measured"] is True and len(data["layers"]) == 2
    result = runner.invoke(app, ["plan", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("form", FORMS)
def test_forms_accept_every_mode_name(form: str) -> None:
    layer = _layer(4, 6, 3, 2, 4, padding=1)
    layer.mode = form
    assert layer.form_for(torch.empty(1, 4, 3, 5, 5)) == form
