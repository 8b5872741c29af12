"""deploy(): a converted model as plain modules, and torch.compile through DecomposedConv3d."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stjfd_convert import DecomposedConv3d, deploy
from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model, set_mode
from stjfd_convert.errors import ConfigError
from stjfd_convert.layers import FORMS
from stjfd_convert.parity import make_input
from stjfd_convert.planner import plan_model
from tolerances import ATOL_FP32

SEED = 0
SHAPE = (2, 3, 6, 16, 16)


def _net() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv3d(3, 8, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        nn.Conv3d(8, 8, 3, padding=1, groups=2, padding_mode="replicate"),
        nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0)),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


@pytest.fixture(scope="module")
def converted() -> nn.Module:
    model, _ = convert_model(_net(), ConvertConfig(spatial_atoms=4, temporal_atoms=2))
    return model.eval()


@pytest.mark.parametrize("form", FORMS)
def test_deployed_model_matches_the_converted_one_in_every_form(converted: nn.Module, form: str) -> None:
    model = set_mode(converted, form)
    x = make_input(SHAPE, seed=SEED)
    deployed = deploy(model)
    assert not any(isinstance(m, DecomposedConv3d) for m in deployed.modules())
    assert all(not p.requires_grad for p in deployed.parameters()) and not deployed.training
    kinds = {type(deployed[i]) for i in (0, 3, 4)}
    assert kinds == ({nn.Conv3d} if form == "fused" else {nn.Sequential})
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=ATOL_FP32)
    assert any(isinstance(m, DecomposedConv3d) for m in model.modules())  # the input is left alone


def test_deploy_follows_a_plan_or_the_input_shape(converted: nn.Module) -> None:
    model = set_mode(converted, "auto")
    x = make_input(SHAPE, seed=SEED)
    plan = plan_model(model, SHAPE)
    by_plan = deploy(model, plan)
    for name, form in plan.modes.items():
        module = by_plan.get_submodule(name)
        assert isinstance(module, nn.Conv3d) if form == "fused" else isinstance(module, nn.Sequential)
    by_shape = deploy(model, input_shape=SHAPE)
    with torch.no_grad():
        reference = model(x)
        assert torch.allclose(by_plan(x), reference, atol=ATOL_FP32)
        assert torch.allclose(by_shape(x), reference, atol=ATOL_FP32)
    assert isinstance(deploy(model)[0], nn.Conv3d)  # auto without a shape: fused
    with pytest.raises(ConfigError, match="layers the model does not have"):
        deploy(model, {"nope": "fused"})
    with pytest.raises(ConfigError, match="unknown execution forms"):
        deploy(model, {"0": "winograd"})


def test_deployed_model_exports_with_torch_export(converted: nn.Module) -> None:
    deployed = deploy(set_mode(converted, "factorized"))
    x = make_input(SHAPE, seed=SEED)
    program = torch.export.export(deployed, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), deployed(x), atol=ATOL_FP32)


@pytest.mark.parametrize("mode", [*FORMS, "auto"])
@pytest.mark.parametrize("grad", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph_matches_eager(mode: str, grad: bool) -> None:
    """No graph break inside a DecomposedConv3d (the derived-weight cache steps aside under compile).

    ``aot_eager`` runs dynamo and AOTAutograd without needing a C++ compiler, which is what decides
    whether the layer traces as one graph."""
    torch.manual_seed(SEED)
    layer = DecomposedConv3d.from_conv(nn.Conv3d(4, 6, 3, padding=1), mode=mode).train(grad)
    x = make_input((2, 4, 4, 8, 8), seed=SEED)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(grad):
        eager = layer(x)
        out = compiled(x)
    assert torch.allclose(out, eager, atol=ATOL_FP32)
    if grad:
        (grad_eager,) = torch.autograd.grad(eager.sum(), layer.coefficients)
        (grad_compiled,) = torch.autograd.grad(out.sum(), layer.coefficients)
        assert torch.allclose(grad_compiled, grad_eager, atol=ATOL_FP32)
