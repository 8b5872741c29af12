"""Property tests (hypothesis) over random small Conv3d geometries.

Each example draws channels, groups dividing both, a kernel (L, Kh, Kw) with 1s, stride, padding (numbers,
'valid', or 'same' where PyTorch allows it: stride 1), dilation, padding mode, bias and an input just large
enough for the kernel. For every geometry:

1. a full-rank conversion (m_t = L, m_s = Kh·Kw) reproduces the original conv in every execution form;
2. a converted model saved and loaded again has bit-identical parameters and outputs in every form;
3. (fewer examples: exports are slow) its ONNX export passes onnx.checker and onnxruntime's validation.

``derandomize=True`` makes every run draw the same examples; ``deadline=None`` asserts no wall-clock time.
"""

from __future__ import annotations

import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model, decomposed_layers, set_mode
from stjfd_convert.layers import MODES, DecomposedConv3d
from stjfd_convert.models import ArchSpec
from stjfd_convert.saved_model import load_converted, save_converted
from tolerances import REL_FP64

# PyTorch warns that 'same' with an even kernel may copy the input; such kernels are among the examples.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

PROPERTY_SETTINGS = settings(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
EXACT_EXAMPLES = 60
ROUNDTRIP_EXAMPLES = 25
ONNX_EXAMPLES = 5
SEED = 0

BUILDER_SOURCE = textwrap.dedent(
    """
    from torch import nn


    def build(**conv):
        return nn.Sequential(nn.Conv3d(**conv))
    """
)


@dataclass(frozen=True)
class Geometry:
    """One Conv3d (its nn.Conv3d keyword arguments) and the input shape it runs on."""

    conv: dict[str, Any]
    input_shape: tuple[int, int, int, int, int]

    def make_conv(self, dtype: torch.dtype) -> nn.Conv3d:
        torch.manual_seed(SEED)
        return nn.Conv3d(**self.conv, dtype=dtype).eval()

    def make_input(self, dtype: torch.dtype) -> torch.Tensor:
        generator = torch.Generator().manual_seed(SEED + 1)
        return torch.randn(self.input_shape, generator=generator, dtype=torch.float64).to(dtype)

    @property
    def full_rank(self) -> tuple[int, int]:
        length, height, width = self.conv["kernel_size"]
        return length, height * width


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(3))
    dilation = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(3))
    stride = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(3))
    choices = ["numbers", "valid"] + (["same"] if stride == (1, 1, 1) else [])
    padding_kind = draw(st.sampled_from(choices))
    if padding_kind == "numbers":
        padding: str | tuple[int, ...] = tuple(draw(st.integers(0, 2)) for _ in range(3))
    else:
        padding = padding_kind
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "replicate"]))
    bias = draw(st.booleans())
    # The smallest input each axis accepts, plus a little: span of the dilated kernel minus both paddings.
    sizes = []
    for axis in range(3):
        span = dilation[axis] * (kernel[axis] - 1) + 1
        pad = padding[axis] if isinstance(padding, tuple) else 0
        sizes.append(max(1, span - 2 * pad) + draw(st.integers(0, 2)))
    batch = draw(st.integers(1, 2))
    conv = {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": bias,
        "padding_mode": padding_mode,
    }
    return Geometry(conv, (batch, in_channels, *sizes))


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    actual, expected = actual.double(), expected.double()
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected).clamp_min(1e-300))


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``FILE:build`` for a one-conv model; converted folders name it and load it back with trust_code."""
    path = tmp_path_factory.mktemp("builder") / "oneconv.py"
    path.write_text(BUILDER_SOURCE)
    return f"{path}:build"


@settings(PROPERTY_SETTINGS, max_examples=EXACT_EXAMPLES)
@given(geometry=geometries())
def test_full_rank_conversion_is_exact_in_every_execution_form(geometry: Geometry) -> None:
    conv = geometry.make_conv(torch.float64)
    x = geometry.make_input(torch.float64)
    with torch.no_grad():
        expected = conv(x)
        layer = DecomposedConv3d.from_conv(conv, *geometry.full_rank).eval()
        assert layer.reconstruction_error is not None and layer.reconstruction_error <= REL_FP64
        for mode in MODES:
            layer.mode = mode
            assert _rel(layer(x), expected) <= REL_FP64, mode
        # The library's model conversion with --full-rank, too (a 1×1×1 conv stays dense there).
        converted, report = convert_model(nn.Sequential(conv), ConvertConfig(full_rank=True))
        assert [r.decomposed for r in report.layers] == [geometry.conv["kernel_size"] != (1, 1, 1)]
        for mode in MODES:
            assert _rel(set_mode(converted, mode).eval()(x), expected) <= REL_FP64, mode


@settings(PROPERTY_SETTINGS, max_examples=ROUNDTRIP_EXAMPLES)
@given(geometry=geometries(), atoms=st.integers(1, 9))
def test_save_then_load_is_bit_identical(builder: str, geometry: Geometry, atoms: int) -> None:
    conv = geometry.make_conv(torch.float32)
    length, taps = geometry.full_rank
    config = ConvertConfig(full_rank=True) if atoms > taps else ConvertConfig(spatial_atoms=atoms, temporal_atoms=length)
    converted, _ = convert_model(nn.Sequential(conv), config)
    converted.eval()
    x = geometry.make_input(torch.float32)
    spec = ArchSpec("callable", builder, geometry.conv)
    with tempfile.TemporaryDirectory() as folder:
        save_converted(converted, Path(folder) / "model", spec, input_shape=geometry.input_shape)
        loaded = load_converted(Path(folder) / "model", trust_code=True).model
    saved_state, loaded_state = converted.state_dict(), loaded.state_dict()
    assert list(saved_state) == list(loaded_state)
    for key, tensor in saved_state.items():
        assert loaded_state[key].dtype == tensor.dtype and torch.equal(loaded_state[key], tensor), key
    assert [name for name, _ in decomposed_layers(loaded)] == [name for name, _ in decomposed_layers(converted)]
    with torch.no_grad():
        for mode in MODES:
            assert torch.equal(set_mode(loaded, mode)(x), set_mode(converted, mode)(x)), mode


@settings(PROPERTY_SETTINGS, max_examples=ONNX_EXAMPLES)
@given(geometry=geometries(), mode=st.sampled_from(MODES))
def test_small_onnx_exports_validate(geometry: Geometry, mode: str) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from stjfd_convert.export import export_onnx

    converted, _ = convert_model(nn.Sequential(geometry.make_conv(torch.float32)), ConvertConfig(full_rank=True))
    with tempfile.TemporaryDirectory() as folder:
        result = export_onnx(converted.eval(), Path(folder) / "m.onnx", mode=mode, input_shape=geometry.input_shape,
                             runs=0, clips=1)
    assert result.validation is not None and result.validation.passed, result.validation
