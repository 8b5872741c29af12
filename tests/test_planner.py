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
from stjfd_convert.planner import apply_plan, plan_model, save_plan, trace_layer_inputs
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


def test_measured_plan_picks_obviously_cheaper_forms() -> None:
    # Layer 0: full rank, 3→2 channels, stride 4 in space: the dense conv is tiny, while every other
    # form adds an atom pass (temporal ones at full resolution) with a 3-27x wider intermediate.
    # Layer 2: 1×1 atoms on a wide 7×7 layer: the factorised forms need ~49× fewer MACs.
    model = nn.Sequential(
        _layer(3, 2, (3, 3, 3), 3, 9, padding=1, stride=(1, 4, 4)),
        nn.Identity(),
        _layer(2, 64, (1, 7, 7), 1, 1, padding=(0, 3, 3)),
    )
    plan = plan_model(model, (1, 3, 8, 160, 160), measure=True, repeats=5)
    forms = plan.modes
    assert forms["0"] == "fused"
    assert forms["2"] != "fused"
    assert all(choice.measured and set(choice.measured) == set(FORMS) for choice in plan.layers)


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
    loaded = load_converted(out).model
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
    result = runner.invoke(app, ["plan", str(out), "--repeats", "2", "--json"])
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
