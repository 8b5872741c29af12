"""``DecomposedConv3d``: the three execution modes against each other and against ``nn.Conv3d``.

Two kinds of reference:

- full rank ``from_conv`` (m_t = L, m_s = Kh·Kw) must reproduce the *original* conv; the
  decomposition then uses identity atoms, which alone would be a weak test, so
- layers with random orthonormal (and, for the folded 1×1 atoms, arbitrary) atoms, at full and
  truncated ranks, are compared with ``layer.to_conv3d()``, a plain ``nn.Conv3d`` holding the
  reconstructed weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from stjfd_convert.errors import ConfigError
from stjfd_convert.functional.conv import reconstruct_weight
from stjfd_convert.layers import MODES, DecomposedConv3d
from tolerances import ATOL_FP32, ATOL_FP64, REL_FP32, REL_FP64, RTOL_FP64

# PyTorch warns that 'same' with an even kernel may copy the input; that is the point of the case.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

SEED = 0
IN_CHANNELS = 4
OUT_CHANNELS = 6
FRAMES = 7
SIZE = 9  # H = W
TRUNCATED_TEMPORAL = 2  # m_t for truncated layers (capped at L)
TRUNCATED_SPATIAL = 4  # m_s for truncated layers (capped at Kh·Kw)

KERNELS = [(3, 3, 3), (1, 3, 3), (3, 1, 1), (3, 7, 7), (5, 3, 3), (1, 1, 1)]
REL_TOL = {torch.float64: REL_FP64, torch.float32: REL_FP32}
DTYPES = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, computed in float64."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def truncated_ranks(kernel: tuple[int, int, int]) -> tuple[int, int]:
    return min(TRUNCATED_TEMPORAL, kernel[0]), min(TRUNCATED_SPATIAL, kernel[1] * kernel[2])


@dataclass
class Case:
    """One conv geometry plus the input it runs on."""

    name: str
    conv: dict[str, Any] = field(default_factory=dict)  # nn.Conv3d kwargs except the channels
    in_channels: int = IN_CHANNELS
    out_channels: int = OUT_CHANNELS
    batch: int = 1
    frames: int = FRAMES
    size: int = SIZE
    channels_last: bool = False

    @property
    def kernel(self) -> tuple[int, int, int]:
        k = self.conv.get("kernel_size", 3)
        return (k, k, k) if isinstance(k, int) else tuple(k)

    def conv_kwargs(self) -> dict[str, Any]:
        return {"kernel_size": 3, **self.conv}

    def make_conv(self, dtype: torch.dtype) -> nn.Conv3d:
        return nn.Conv3d(self.in_channels, self.out_channels, dtype=dtype, **self.conv_kwargs())

    def make_layer(self, dtype: torch.dtype, m_t: int, m_s: int, mode: str = "fused") -> DecomposedConv3d:
        return DecomposedConv3d(
            self.in_channels,
            self.out_channels,
            num_temporal_atoms=m_t,
            num_spatial_atoms=m_s,
            mode=mode,
            dtype=dtype,
            **self.conv_kwargs(),
        )

    def make_input(self, dtype: torch.dtype) -> torch.Tensor:
        x = torch.randn(self.batch, self.in_channels, self.frames, self.size, self.size, dtype=dtype)
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last_3d)
        return x


GEOMETRY_CASES = [
    Case("stride2_pad1", {"stride": 2, "padding": 1}),
    Case("stride_122_pad_tuple", {"stride": (1, 2, 2), "padding": (1, 0, 2)}),
    Case("stride_212_k377", {"kernel_size": (3, 7, 7), "stride": (2, 1, 2), "padding": (0, 3, 1)}),
    Case("dilation_211", {"dilation": (2, 1, 1), "padding": (2, 1, 1)}),
    Case("dilation_122_same", {"dilation": (1, 2, 2), "padding": "same"}),
    Case("same_k377", {"kernel_size": (3, 7, 7), "padding": "same"}),
    Case("same_even_kernel", {"kernel_size": (2, 4, 4), "padding": "same"}),  # asymmetric pads
    Case("valid", {"padding": "valid"}),
    Case("valid_k533_stride2", {"kernel_size": (5, 3, 3), "padding": "valid", "stride": 2}),
    Case("reflect_pad1", {"padding": 1, "padding_mode": "reflect"}),
    Case("reflect_same_dilation", {"padding": "same", "dilation": (1, 2, 2), "padding_mode": "reflect"}),
    Case("replicate_stride_122", {"padding": (1, 2, 2), "stride": (1, 2, 2), "padding_mode": "replicate"}),
    Case("replicate_same_k533", {"kernel_size": (5, 3, 3), "padding": "same", "padding_mode": "replicate"}),
    Case("circular_stride2", {"padding": 1, "stride": 2, "padding_mode": "circular"}),
    Case("circular_dilation_211", {"padding": (2, 1, 0), "dilation": (2, 1, 1), "padding_mode": "circular"}),
    Case("groups2", {"padding": 1, "groups": 2}),
    Case("groups2_stride_reflect", {"padding": 1, "stride": (1, 2, 2), "groups": 2, "padding_mode": "reflect"}),
    Case("depthwise", {"padding": 1, "groups": IN_CHANNELS}, out_channels=IN_CHANNELS),
    Case("depthwise_multiplier", {"padding": 1, "groups": IN_CHANNELS}, out_channels=2 * IN_CHANNELS),
    Case("no_bias", {"padding": 1, "bias": False}),
    Case("batch3", {"padding": 1}, batch=3),
    Case("channels_last", {"padding": 1}, channels_last=True),
    Case(
        "kitchen_sink",
        {
            "kernel_size": (3, 3, 3),
            "stride": (2, 1, 2),
            "padding": (1, 2, 1),
            "dilation": (1, 2, 1),
            "groups": 2,
            "bias": False,
            "padding_mode": "reflect",
        },
        batch=3,
        channels_last=True,
    ),
    # Degenerate kernels: the 1×1 atom of the trivial axis is folded into the coefficients unless
    # that axis has a stride or padding (functional/conv.py, _needs_temporal/_spatial_conv).
    Case("k133_fold", {"kernel_size": (1, 3, 3), "padding": (0, 1, 1)}),
    Case("k133_temporal_stride", {"kernel_size": (1, 3, 3), "stride": (2, 1, 1)}),
    Case("k133_temporal_pad_reflect", {"kernel_size": (1, 3, 3), "padding": 1, "padding_mode": "reflect"}),
    Case("k133_stride2_groups2", {"kernel_size": (1, 3, 3), "stride": 2, "padding": (0, 1, 1), "groups": 2}),
    Case("k311_fold", {"kernel_size": (3, 1, 1), "padding": (1, 0, 0)}),
    Case("k311_spatial_stride", {"kernel_size": (3, 1, 1), "stride": (1, 2, 2)}),
    Case("k311_spatial_pad_circular", {"kernel_size": (3, 1, 1), "padding": 1, "padding_mode": "circular"}),
    Case("k311_same_replicate", {"kernel_size": (3, 1, 1), "padding": "same", "padding_mode": "replicate"}),
    Case("k111_stride2", {"kernel_size": 1, "stride": 2}),
    Case("k111_pad_replicate", {"kernel_size": 1, "padding": 1, "padding_mode": "replicate"}),
    Case(
        "k111_depthwise_cl", {"kernel_size": 1, "groups": IN_CHANNELS}, out_channels=IN_CHANNELS, batch=3, channels_last=True
    ),
]
GEOMETRY_IDS = [case.name for case in GEOMETRY_CASES]
KERNEL_CASES = [Case(f"k{''.join(map(str, k))}", {"kernel_size": k, "padding": "same"}) for k in KERNELS]
KERNEL_IDS = [case.name for case in KERNEL_CASES]
ALL_CASES = KERNEL_CASES + GEOMETRY_CASES
ALL_IDS = KERNEL_IDS + GEOMETRY_IDS


def check_from_conv_full_rank(case: Case, mode: str, dtype: torch.dtype) -> None:
    conv = case.make_conv(dtype)
    length, kh, kw = case.kernel
    layer = DecomposedConv3d.from_conv(conv, temporal_atoms=length, spatial_atoms=kh * kw, mode=mode)
    x = case.make_input(dtype)
    with torch.no_grad():
        expected = conv(x)
        actual = layer(x)
    assert actual.dtype == dtype
    assert rel_error(actual, expected) <= REL_TOL[dtype]


def check_random_layer(case: Case, mode: str, dtype: torch.dtype, m_t: int, m_s: int) -> None:
    layer = case.make_layer(dtype, m_t, m_s, mode=mode)
    reference = layer.to_conv3d()
    x = case.make_input(dtype)
    with torch.no_grad():
        expected = reference(x)
        actual = layer(x)
    assert actual.dtype == dtype
    assert rel_error(actual, expected) <= REL_TOL[dtype]


# --- 1. agreement with nn.Conv3d: kernels × modes, then geometry cases × modes -----------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
def test_full_rank_from_conv_matches_original_kernels(case, mode, dtype):
    check_from_conv_full_rank(case, mode, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=GEOMETRY_IDS)
def test_full_rank_from_conv_matches_original_geometry(case, mode, dtype):
    check_from_conv_full_rank(case, mode, dtype)


@pytest.mark.parametrize("rank", ["full", "truncated"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=KERNEL_IDS)
def test_random_atoms_match_to_conv3d_kernels(case, mode, dtype, rank):
    length, kh, kw = case.kernel
    m_t, m_s = (length, kh * kw) if rank == "full" else truncated_ranks(case.kernel)
    check_random_layer(case, mode, dtype, m_t, m_s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=GEOMETRY_IDS)
def test_random_atoms_match_to_conv3d_geometry(case, mode, dtype):
    check_random_layer(case, mode, dtype, *truncated_ranks(case.kernel))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_modes_agree_with_each_other(case, dtype):
    layer = case.make_layer(dtype, *truncated_ranks(case.kernel))
    x = case.make_input(dtype)
    outputs = {}
    with torch.no_grad():
        for mode in MODES:
            layer.mode = mode
            outputs[mode] = layer(x)
    for mode in MODES[1:]:
        assert rel_error(outputs[mode], outputs[MODES[0]]) <= REL_TOL[dtype], mode


def test_random_atoms_are_not_identity():
    """Guards the strength of the tests above: reset_parameters draws non-trivial orthonormal atoms."""
    layer = DecomposedConv3d(IN_CHANNELS, OUT_CHANNELS, 3, num_temporal_atoms=3, num_spatial_atoms=9, dtype=torch.float64)
    for atoms in (layer.temporal_atoms, layer.spatial_atoms):
        eye = torch.eye(atoms.shape[1], dtype=atoms.dtype)
        torch.testing.assert_close(atoms.t() @ atoms, eye, atol=ATOL_FP64, rtol=RTOL_FP64)
        assert not torch.allclose(atoms, eye, atol=ATOL_FP32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "case",
    [case for case in GEOMETRY_CASES if case.name.startswith(("k133", "k311", "k111"))],
    ids=lambda case: case.name,
)
def test_degenerate_kernels_with_non_unit_atoms(case, mode):
    """The folded 1×1 atom must enter as a scale, not be assumed ±1 (orthonormal init only gives ±1)."""
    dtype = torch.float64
    layer = case.make_layer(dtype, *truncated_ranks(case.kernel), mode=mode)
    with torch.no_grad():
        layer.temporal_atoms.mul_(torch.rand_like(layer.temporal_atoms) + 0.5)
        layer.spatial_atoms.mul_(-(torch.rand_like(layer.spatial_atoms) + 0.5))
    x = case.make_input(dtype)
    with torch.no_grad():
        assert rel_error(layer(x), layer.to_conv3d()(x)) <= REL_FP64


# --- 2. float64 gradcheck -----------------------------------------------------------------------------

GRADCHECK_CASES = [
    pytest.param(
        dict(in_channels=2, out_channels=2, kernel_size=(2, 2, 3), num_temporal_atoms=1, num_spatial_atoms=4),
        (1, 2, 3, 4, 4),
        id="plain",
    ),
    pytest.param(
        dict(
            in_channels=2,
            out_channels=4,
            kernel_size=(3, 2, 2),
            stride=(1, 2, 2),
            padding=(1, 1, 0),
            groups=2,
            padding_mode="reflect",
            num_temporal_atoms=2,
            num_spatial_atoms=3,
        ),
        (1, 2, 3, 4, 4),
        id="stride_pad_groups_reflect",
    ),
    pytest.param(
        dict(in_channels=2, out_channels=2, kernel_size=(1, 2, 2), padding=(0, 1, 1), num_temporal_atoms=1, num_spatial_atoms=2),
        (1, 2, 2, 3, 3),
        id="k1KK_folded",
    ),
    pytest.param(
        dict(in_channels=2, out_channels=2, kernel_size=(2, 1, 1), stride=(1, 2, 2), num_temporal_atoms=1, num_spatial_atoms=1),
        (1, 2, 3, 3, 3),
        id="kL11_spatial_stride",
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kwargs, input_shape", GRADCHECK_CASES)
def test_gradcheck_float64(kwargs, input_shape, mode):
    layer = DecomposedConv3d(**kwargs, mode=mode, dtype=torch.float64)
    names = ["temporal_atoms", "spatial_atoms", "coefficients", "bias"]
    params = [getattr(layer, name).detach().clone().requires_grad_(True) for name in names]
    x = torch.randn(*input_shape, dtype=torch.float64, requires_grad=True)

    def run(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params))


# --- 3. parameters, construction, bookkeeping ---------------------------------------------------------


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_weight_matches_independent_reconstruction(case):
    layer = case.make_layer(torch.float64, *truncated_ranks(case.kernel))
    length, kh, kw = case.kernel
    expected = torch.einsum("oipq,tp,sq->oits", layer.coefficients, layer.temporal_atoms, layer.spatial_atoms)
    expected = expected.reshape(layer.out_channels, layer.in_channels // layer.groups, length, kh, kw)
    torch.testing.assert_close(layer.weight, expected, atol=ATOL_FP64, rtol=RTOL_FP64)
    direct = reconstruct_weight(layer.coefficients, layer.temporal_atoms, layer.spatial_atoms, layer.kernel_size)
    torch.testing.assert_close(layer.weight, direct, atol=0.0, rtol=0.0)
    assert layer.weight.requires_grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_to_conv3d(case, training):
    layer = case.make_layer(torch.float64, *truncated_ranks(case.kernel))
    layer.train(training)
    conv = layer.to_conv3d()
    assert type(conv) is nn.Conv3d
    assert conv.training is training
    assert conv.weight.dtype == torch.float64
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "padding_mode"):
        assert getattr(conv, attribute) == getattr(layer, attribute), attribute
    assert conv.padding == layer.padding
    torch.testing.assert_close(conv.weight, layer.weight.detach(), atol=0.0, rtol=0.0)
    if layer.bias is None:
        assert conv.bias is None
    else:
        torch.testing.assert_close(conv.bias, layer.bias.detach(), atol=0.0, rtol=0.0)
    # A copy, not a view: editing the conv leaves the layer alone.
    with torch.no_grad():
        conv.weight.zero_()
    assert torch.count_nonzero(layer.weight) > 0


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_from_conv_keeps_geometry_bias_and_training_flag(case, training):
    conv = case.make_conv(torch.float64)
    conv.train(training)
    layer = DecomposedConv3d.from_conv(conv)
    assert layer.training is training
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "padding_mode"):
        assert getattr(layer, attribute) == getattr(conv, attribute), attribute
    assert layer.padding == conv.padding
    if conv.bias is None:
        assert layer.bias is None
    else:
        assert layer.bias is not None and layer.bias is not conv.bias
        torch.testing.assert_close(layer.bias, conv.bias, atol=0.0, rtol=0.0)
    assert layer.coefficients.dtype == conv.weight.dtype
    assert layer.reconstruction_error is not None and 0.0 <= layer.reconstruction_error <= 1.0
    # The source conv is left untouched and independent of the new layer.
    with torch.no_grad():
        layer.coefficients.zero_()
    assert torch.count_nonzero(conv.weight) > 0


def test_from_conv_default_atoms_follow_paper():
    conv = nn.Conv3d(IN_CHANNELS, OUT_CHANNELS, (5, 3, 3))
    layer = DecomposedConv3d.from_conv(conv)
    assert (layer.num_temporal_atoms, layer.num_spatial_atoms) == (3, 6)
    assert tuple(layer.temporal_atoms.shape) == (5, 3)
    assert tuple(layer.spatial_atoms.shape) == (9, 6)
    assert tuple(layer.coefficients.shape) == (OUT_CHANNELS, IN_CHANNELS, 3, 6)


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_describe_round_trip(case):
    layer = case.make_layer(torch.float32, *truncated_ranks(case.kernel), mode="sandwich")
    description = json.loads(json.dumps(layer.describe()))  # must survive JSON
    twin = DecomposedConv3d.from_description(description)
    assert twin.geometry == layer.geometry
    assert twin.mode == layer.mode
    assert (twin.num_temporal_atoms, twin.num_spatial_atoms) == (layer.num_temporal_atoms, layer.num_spatial_atoms)
    own = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    other = {name: tuple(p.shape) for name, p in twin.named_parameters()}
    assert own == other
    twin.load_state_dict(layer.state_dict())
    x = case.make_input(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), atol=0.0, rtol=0.0)


@pytest.mark.parametrize("bad", ["nope", "auto_", "FUSED", ""])
def test_mode_setter_rejects_unknown_modes(bad):
    layer = DecomposedConv3d(IN_CHANNELS, OUT_CHANNELS, 3)
    with pytest.raises(ConfigError):
        layer.mode = bad
    assert layer.mode == "fused"
    with pytest.raises(ConfigError):
        DecomposedConv3d(IN_CHANNELS, OUT_CHANNELS, 3, mode=bad)


@pytest.mark.parametrize("mode", MODES)
def test_mode_setter_accepts_known_modes(mode):
    layer = DecomposedConv3d(IN_CHANNELS, OUT_CHANNELS, 3)
    layer.mode = mode
    assert layer.mode == mode
    assert layer.describe()["mode"] == mode


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: "k" + "".join(map(str, k)))
def test_from_conv_rejects_atoms_out_of_range(kernel):
    conv = nn.Conv3d(IN_CHANNELS, OUT_CHANNELS, kernel)
    length, taps = kernel[0], kernel[1] * kernel[2]
    for m_t, m_s in [(0, 1), (1, 0), (length + 1, 1), (1, taps + 1), (-1, 1)]:
        with pytest.raises(ConfigError):
            DecomposedConv3d.from_conv(conv, temporal_atoms=m_t, spatial_atoms=m_s)
        with pytest.raises(ConfigError):
            DecomposedConv3d(IN_CHANNELS, OUT_CHANNELS, kernel, num_temporal_atoms=m_t, num_spatial_atoms=m_s)


def test_from_conv_rejects_other_modules():
    with pytest.raises(ConfigError):
        DecomposedConv3d.from_conv(nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, 3))


@pytest.mark.parametrize("mode", MODES)
def test_bias_gradient_flows(mode):
    case = Case("grad", {"padding": 1, "stride": (1, 2, 2)}, batch=3)
    layer = case.make_layer(torch.float64, 2, 4, mode=mode)
    reference = layer.to_conv3d()
    x = case.make_input(torch.float64)
    weights = torch.randn_like(reference(x))
    (layer(x) * weights).sum().backward()
    (reference(x) * weights).sum().backward()
    assert layer.bias.grad is not None
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, atol=ATOL_FP64, rtol=RTOL_FP64)
    torch.testing.assert_close(layer.bias.grad, weights.sum(dim=(0, 2, 3, 4)), atol=ATOL_FP64, rtol=RTOL_FP64)


@pytest.mark.parametrize("case", ALL_CASES, ids=ALL_IDS)
def test_parameter_gradients_agree_across_modes(case):
    dtype = torch.float64
    layer = case.make_layer(dtype, *truncated_ranks(case.kernel))
    x = case.make_input(dtype)
    with torch.no_grad():
        weights = torch.randn_like(layer(x))
    grads = {}
    for mode in MODES:
        layer.mode = mode
        layer.zero_grad(set_to_none=True)
        (layer(x) * weights).sum().backward()
        grads[mode] = {name: p.grad.clone() for name, p in layer.named_parameters()}
    for mode in MODES[1:]:
        for name, grad in grads[mode].items():
            assert rel_error(grad, grads[MODES[0]][name]) <= REL_FP64, (mode, name)


def test_num_weight_params():
    layer = DecomposedConv3d(IN_CHANNELS, OUT_CHANNELS, (3, 5, 5), groups=2, num_temporal_atoms=2, num_spatial_atoms=6)
    expected = OUT_CHANNELS * (IN_CHANNELS // 2) * 2 * 6 + 3 * 2 + 25 * 6
    assert layer.num_weight_params() == expected
    atoms_and_coefficients = sum(p.numel() for name, p in layer.named_parameters() if name != "bias")
    assert layer.num_weight_params() == atoms_and_coefficients
