"""Atom swapping (issue 14): ``stjfd swap`` (dilate / resize atoms) and ``--playback-speed``.

1. the resampling maths (``functional/resample.py``) and the options (``SwapConfig``);
2. single layers: identity swaps, every execution form against fused in float64 (and gradcheck), the
   identities "dilated atoms = dilated dense kernel" and "resized atoms = the dense kernel resized",
   a dilated model on a slowed clip = the original model on the clip, skips with their reasons;
3. the cost model, the planner and the ONNX export of swapped layers;
4. converted folders: ``swap_folder`` and ``stjfd swap`` (reload, plan, export, report, errors);
5. ``--playback-speed``: clip index sampling, ``stjfd predict`` and ``stjfd evaluate`` on generated videos.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli_helpers import assert_no_output, assert_one_error_line, run_cli
from stjfd_convert.config import ConvertConfig, SwapConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.data import ClipConfig, temporal_indices
from stjfd_convert.errors import ConfigError, ModelError, SwapError
from stjfd_convert.export import DEFAULT_ATOL as EXPORT_ATOL
from stjfd_convert.export import export_onnx
from stjfd_convert.functional.cost import form_cost
from stjfd_convert.functional.resample import (
    dilate_taps,
    interpolation_matrix,
    resample_spatial_atoms,
    resample_temporal_atoms,
)
from stjfd_convert.layers import FORMS, DecomposedConv3d
from stjfd_convert.planner import plan_model
from stjfd_convert.sample import SAMPLE_MODEL_NAME, sample_model_files
from stjfd_convert.saved_model import MANIFEST_FILE, load_converted
from stjfd_convert.swap import swap_atoms, swap_folder, swap_layer
from stjfd_convert.workflows import convert_checkpoint
from tolerances import ATOL_FP32, ATOL_FP64, RTOL_FP64

SEED = 0
IN_CHANNELS, OUT_CHANNELS = 4, 6
INPUT_SHAPE = (2, IN_CHANNELS, 8, 9, 10)  # [B, C, T, H, W] of the single-layer tests

GEOMETRIES = {
    "3x3x3-pad1": dict(kernel_size=3, padding=1),
    "temporal-stride2-reflect": dict(kernel_size=3, stride=(2, 1, 2), padding=(1, 1, 0), padding_mode="reflect"),
    "same-groups-replicate": dict(kernel_size=3, padding="same", groups=2, padding_mode="replicate"),
    "valid-circular-nobias": dict(kernel_size=3, padding=0, padding_mode="circular", bias=False),
    "5x3x3-dilated": dict(kernel_size=(5, 3, 3), dilation=(2, 1, 1), padding=(4, 1, 1)),
    "3x1x1": dict(kernel_size=(3, 1, 1), padding=(1, 0, 0)),
}
SWAPS = {
    "dilate2": SwapConfig(temporal_dilation=2),
    "dilate3": SwapConfig(temporal_dilation=3),
    "t5": SwapConfig(temporal_size=5),
    "t5-energy": SwapConfig(temporal_size=5, normalization="energy"),
    "s5": SwapConfig(spatial_size=5),
    "t5-d2-s5": SwapConfig(temporal_dilation=2, temporal_size=5, spatial_size=5),
}

# The bundled sample model at a small clip (fast on two cores); its builder is trusted by name.
SAMPLE_SHAPE = (1, 3, 8, 32, 32)


def make_layer(
    geometry: dict[str, Any], dtype: torch.dtype = torch.float64, m_t: int = 2, m_s: int = 4
) -> DecomposedConv3d:
    kernel = geometry["kernel_size"]
    kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
    return DecomposedConv3d(
        IN_CHANNELS, OUT_CHANNELS, **geometry, num_temporal_atoms=min(m_t, kernel[0]),
        num_spatial_atoms=min(m_s, kernel[1] * kernel[2]), dtype=dtype,
    )


def run_form(layer: DecomposedConv3d, form: str, x: torch.Tensor) -> torch.Tensor:
    previous = layer.mode
    layer.mode = form
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        layer.mode = previous


# --------------------------------------------------------------------------------------------
# 1. Resampling maths and options
# --------------------------------------------------------------------------------------------


def test_three_taps_to_five_keep_the_old_taps_fill_midpoints_and_keep_the_mean_tap() -> None:
    atoms = torch.tensor([[1.0, 0.0], [2.0, 1.0], [4.0, -1.0]], dtype=torch.float64)
    resized = resample_temporal_atoms(atoms, 5)
    # Linear interpolation at the ×2-dilation positions, scaled by 3/5 so the mean tap is kept.
    expected = 0.6 * torch.tensor([[1.0, 0.0], [1.5, 0.5], [2.0, 1.0], [3.0, 0.0], [4.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(resized, expected, atol=ATOL_FP64, rtol=RTOL_FP64)
    constant = torch.ones(3, 1, dtype=torch.float64)
    for size in (1, 2, 5, 9):  # a constant atom (a static clip's response) keeps its sum at every size
        torch.testing.assert_close(resample_temporal_atoms(constant, size).sum(0), constant.sum(0), atol=ATOL_FP64,
                                   rtol=RTOL_FP64)
    # One tap: the centre sample, times L. Energy normalisation keeps every atom's L2 norm instead.
    torch.testing.assert_close(resample_temporal_atoms(atoms, 1)[0], 3 * atoms[1], atol=ATOL_FP64, rtol=RTOL_FP64)
    kept = resample_temporal_atoms(atoms, 5, "energy")
    torch.testing.assert_close(kept.norm(dim=0), atoms.norm(dim=0), atol=ATOL_FP64, rtol=RTOL_FP64)
    torch.testing.assert_close(kept / kept.norm(dim=0), resized / resized.norm(dim=0), atol=ATOL_FP64, rtol=RTOL_FP64)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_resampling_to_the_own_size_is_an_exact_copy(size: int) -> None:
    atoms = torch.randn(size, 2, dtype=torch.float64)
    assert torch.equal(resample_temporal_atoms(atoms, size), atoms)
    assert torch.equal(interpolation_matrix(size, size), torch.eye(size, dtype=torch.float64))
    spatial = torch.randn(size * 3, 4)
    assert torch.equal(resample_spatial_atoms(spatial, (size, 3), (size, 3)), spatial)


def test_spatial_resampling_is_separable_bilinear() -> None:
    rows, cols = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    atom = torch.outer(rows, cols).reshape(9, 1)
    resized = resample_spatial_atoms(atom, (3, 3), (5, 4))
    expected = torch.outer(resample_temporal_atoms(rows[:, None], 5)[:, 0],
                           resample_temporal_atoms(cols[:, None], 4)[:, 0])
    torch.testing.assert_close(resized.reshape(5, 4), expected, atol=ATOL_FP64, rtol=RTOL_FP64)


def test_resampling_stays_on_the_atoms_device() -> None:
    # The interpolation matrices are built on the CPU; a GPU model's atoms must not meet them there.
    # (The meta device stands in for CUDA on machines without one.)
    temporal = resample_temporal_atoms(torch.empty(3, 2, device="meta"), 5)
    spatial = resample_spatial_atoms(torch.empty(9, 4, device="meta"), (3, 3), (5, 5), "energy")
    assert (temporal.device.type, tuple(temporal.shape)) == ("meta", (5, 2))
    assert (spatial.device.type, tuple(spatial.shape)) == ("meta", (25, 4))


def test_a_one_tap_atom_has_no_shape_to_interpolate() -> None:
    with pytest.raises(ValueError, match="1-tap"):
        interpolation_matrix(1, 3)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(temporal_dilation=0), "--temporal-dilation"),
        (dict(temporal_dilation=-2), "--temporal-dilation"),
        (dict(temporal_dilation=True), "--temporal-dilation"),
        (dict(temporal_size=0), "--temporal-size"),
        (dict(spatial_size=0), "--spatial-size"),
        (dict(spatial_size=(3, 0)), "--spatial-size"),
        (dict(), "nothing to swap"),
        (dict(temporal_size=5, normalization="loudness"), "normalization"),
    ],
)
def test_nonsense_swap_options_are_refused_with_a_hint(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        SwapConfig(**kwargs)
    assert info.value.hint


# --------------------------------------------------------------------------------------------
# 2. Single layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_dilation_1_and_the_own_sizes_are_the_identity(geometry: dict[str, Any]) -> None:
    layer = make_layer(geometry)
    length, kh, kw = layer.kernel_size
    x = torch.randn(INPUT_SHAPE, dtype=torch.float64)
    configs = [SwapConfig(temporal_dilation=1), SwapConfig(temporal_size=length), SwapConfig(spatial_size=(kh, kw))]
    for config in configs:
        new, record = swap_layer(layer, config)
        assert new.geometry == layer.geometry or not record.swapped
        for name, value in layer.named_parameters():
            assert torch.equal(dict(new.named_parameters())[name], value), name
        for form in FORMS:
            assert torch.equal(run_form(new, form, x), run_form(layer, form, x)), (config, form)


@pytest.mark.parametrize("swap", SWAPS.values(), ids=SWAPS.keys())
@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_every_form_agrees_after_a_swap_and_the_output_size_is_kept(geometry: dict[str, Any], swap: SwapConfig) -> None:
    layer = make_layer(geometry)
    new, record = swap_layer(layer, swap)
    if not record.swapped:  # e.g. spatial atoms of a (3,1,1) kernel: skipped, with the reason
        assert record.skipped and new is layer
        return
    x = torch.randn(INPUT_SHAPE, dtype=torch.float64)
    reference = new.to_conv3d()(x).detach()  # nn.Conv3d with the swapped geometry and rebuilt kernel
    assert reference.shape == run_form(layer, "fused", x).shape
    for form in FORMS:
        torch.testing.assert_close(run_form(new, form, x), reference, atol=ATOL_FP64, rtol=RTOL_FP64, msg=form)
    assert layer.kernel_size == make_layer(geometry).kernel_size  # the input layer is untouched


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64_of_a_dilated_and_resized_layer(form: str) -> None:
    layer = DecomposedConv3d(2, 2, 3, stride=(2, 1, 1), padding=1, num_temporal_atoms=2, num_spatial_atoms=3,
                             dtype=torch.float64)
    new, _ = swap_layer(layer, SwapConfig(temporal_dilation=2, temporal_size=5, spatial_size=5))
    new.mode = form
    names = ["temporal_atoms", "spatial_atoms", "coefficients", "bias"]
    params = [getattr(new, name).detach().clone().requires_grad_(True) for name in names]
    x = torch.randn(1, 2, 6, 4, 4, dtype=torch.float64, requires_grad=True)

    def run(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(new, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params))


@pytest.mark.parametrize("dilation", [2, 3])
@pytest.mark.parametrize("geometry", ["3x3x3-pad1", "temporal-stride2-reflect", "5x3x3-dilated"])
def test_dilated_temporal_atoms_equal_the_dilated_dense_kernel(geometry: str, dilation: int) -> None:
    layer = make_layer(GEOMETRIES[geometry])
    new, _ = swap_layer(layer, SwapConfig(temporal_dilation=dilation))
    x = torch.randn(INPUT_SHAPE, dtype=torch.float64)
    g = new.geometry
    # The rebuilt dense kernel with (dilation − 1) zeros between its temporal taps, run at dilation 1 …
    dense = layer.weight.detach()
    zeros_between = dilate_taps(dense.permute(2, 0, 1, 3, 4).reshape(layer.kernel_size[0], -1), g.dilation[0])
    dense_dilated = zeros_between.reshape(-1, *dense.shape[:2], *dense.shape[3:]).permute(1, 2, 0, 3, 4)
    padded = F.pad(x, [p for pair in reversed(g.pads) for p in pair], mode="constant" if g.padding_mode == "zeros"
                   else g.padding_mode)
    expected = F.conv3d(padded, dense_dilated, layer.bias, g.stride, 0, (1, *g.dilation[1:]))
    # … and the temporal atoms with zeros between their taps (a resized layer at dilation 1).
    stretched = DecomposedConv3d.from_geometry(
        replace(g, kernel_size=(dense_dilated.shape[2], *g.kernel_size[1:]), dilation=(1, *g.dilation[1:])),
        bias=True, num_temporal_atoms=layer.num_temporal_atoms, num_spatial_atoms=layer.num_spatial_atoms,
    ).double()
    with torch.no_grad():
        stretched.temporal_atoms.copy_(dilate_taps(layer.temporal_atoms, g.dilation[0]))
        for name in ("spatial_atoms", "coefficients", "bias"):
            getattr(stretched, name).copy_(getattr(layer, name))
    for form in FORMS:
        torch.testing.assert_close(run_form(new, form, x), expected, atol=ATOL_FP64, rtol=RTOL_FP64, msg=form)
    torch.testing.assert_close(run_form(stretched, "factorized", x), expected, atol=ATOL_FP64, rtol=RTOL_FP64)
    assert torch.equal(new.weight, layer.weight)  # the kernel is the same; only its dilation changed


def test_resized_atoms_equal_the_dense_kernel_resized_with_many_more_parameters() -> None:
    layer = make_layer(GEOMETRIES["3x3x3-pad1"])
    new, record = swap_layer(layer, SwapConfig(temporal_size=5))
    resized_dense = torch.einsum("nt,oithw->oinhw", interpolation_matrix(3, 5) * 3 / 5, layer.weight.detach())
    torch.testing.assert_close(new.weight.detach(), resized_dense, atol=ATOL_FP64, rtol=RTOL_FP64)
    # The handle: the swap touches L·m_t shared numbers; resizing the dense kernel grows every filter.
    grown_atoms = new.num_weight_params() - layer.num_weight_params()
    grown_dense = resized_dense.numel() - layer.weight.numel()
    assert grown_atoms == (5 - 3) * layer.num_temporal_atoms
    assert grown_dense == OUT_CHANNELS * IN_CHANNELS * (5 - 3) * 9
    assert record.applied == ["temporal atoms 3 → 5 taps"] and record.padding_after == (2, 1, 1)


def _stride1_net() -> nn.Module:
    return nn.Sequential(OrderedDict(
        stem=nn.Conv3d(3, 6, 3, padding=1), relu1=nn.ReLU(),
        mid=nn.Conv3d(6, 6, (3, 3, 3), padding=(1, 1, 1)), relu2=nn.ReLU(),
        spatial=nn.Conv3d(6, 6, (1, 3, 3), padding=(0, 1, 1)), relu3=nn.ReLU(),
        pool=nn.AdaptiveAvgPool3d(1), flat=nn.Flatten(), fc=nn.Linear(6, 3),
    )).double().eval()


def test_a_dilated_model_reads_a_slowed_clip_exactly_as_the_original_reads_the_clip() -> None:
    converted, _ = convert_model(_stride1_net(), ConvertConfig(temporal_atoms=2, spatial_atoms=4))
    dilated, report = swap_atoms(converted, SwapConfig(temporal_dilation=2))
    assert [(name, "temporal kernel is 1" in reason) for name, reason in report.skipped] == [("spatial", True)]
    clip = torch.randn(2, 3, 6, 8, 8, dtype=torch.float64)
    # Playback speed 0.5 repeats every frame: exactly what the data pipeline's index sampling does.
    offsets = ClipConfig(clip_len=12, size=8, playback_speed=0.5).offsets
    assert offsets == [k // 2 for k in range(12)]
    slowed = clip[:, :, offsets]
    with torch.no_grad():
        torch.testing.assert_close(dilated(slowed), converted(clip), atol=ATOL_FP64, rtol=RTOL_FP64)
        assert not torch.allclose(converted(slowed), converted(clip), atol=ATOL_FP32)  # tempo matters undilated


@pytest.mark.parametrize(
    "geometry, m_t, config, fragment",
    [
        (dict(kernel_size=(1, 3, 3), padding=(0, 1, 1)), 1, SwapConfig(temporal_dilation=2), "temporal kernel is 1"),
        (dict(kernel_size=3, padding=1), 3, SwapConfig(temporal_size=2), "3 temporal atoms do not fit in 2 taps"),
        (dict(kernel_size=3, padding=1), 2, SwapConfig(temporal_size=4), "asymmetric padding"),
        (dict(kernel_size=(2, 3, 3), padding=(0, 1, 1)), 2, SwapConfig(temporal_dilation=2), "asymmetric padding"),
        (dict(kernel_size=3, padding=0), 1, SwapConfig(temporal_size=1), "negative padding"),
        (dict(kernel_size=(3, 1, 1), padding=(1, 0, 0)), 2, SwapConfig(spatial_size=3), "1-tap axis"),
        (dict(kernel_size=3, padding=1), 2, SwapConfig(spatial_size=1), "4 spatial atoms do not fit in 1×1"),
    ],
)
def test_swaps_that_make_no_sense_for_a_layer_are_skipped_with_the_reason(
    geometry: dict[str, Any], m_t: int, config: SwapConfig, fragment: str
) -> None:
    layer = make_layer(geometry, m_t=m_t)
    new, record = swap_layer(layer, config, "conv")
    assert new is layer and not record.swapped
    assert len(record.skipped) == 1 and fragment in record.skipped[0], record.skipped


def test_same_padding_stays_same_and_a_1_frame_kernel_still_takes_spatial_swaps() -> None:
    layer = make_layer(dict(kernel_size=(2, 3, 3), padding="same"))
    new, record = swap_layer(layer, SwapConfig(temporal_dilation=2))
    assert record.swapped and new.padding == "same" and new.dilation == (2, 1, 1)
    flat = make_layer(dict(kernel_size=(1, 3, 3), padding=(0, 1, 1)), m_t=1)
    new, record = swap_layer(flat, SwapConfig(temporal_dilation=2, spatial_size=5))
    assert record.applied == ["spatial atoms 3×3 → 5×5"] and len(record.skipped) == 1
    assert new.kernel_size == (1, 5, 5) and new.padding == (0, 2, 2)


def test_swap_atoms_selects_layers_leaves_its_input_and_refuses_nothing_to_do() -> None:
    converted, _ = convert_model(_stride1_net(), ConvertConfig(temporal_atoms=2, spatial_atoms=4))
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    swapped, report = swap_atoms(converted, SwapConfig(temporal_size=5, include=("stem", "mid"), exclude=("mid",)))
    assert [layer.name for layer in report.swapped] == ["stem"]
    assert swapped.stem.kernel_size == (5, 3, 3) and swapped.mid.kernel_size == (3, 3, 3)
    assert converted.stem.kernel_size == (3, 3, 3)
    assert all(torch.equal(before[k], v) for k, v in converted.state_dict().items())
    with pytest.raises(ConfigError, match="select no decomposed layer"):
        swap_atoms(converted, SwapConfig(temporal_size=5, include=("layer9*",)))
    with pytest.raises(SwapError, match="nothing was swapped") as info:
        swap_atoms(converted, SwapConfig(temporal_dilation=2, include=("spatial",)))
    assert "temporal kernel is 1" in info.value.message and info.value.hint
    with pytest.raises(ModelError, match="no decomposed layers"):
        swap_atoms(_stride1_net(), SwapConfig(temporal_dilation=2))


# --------------------------------------------------------------------------------------------
# 3. Cost model, planner, ONNX export
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swap", SWAPS.values(), ids=SWAPS.keys())
def test_the_cost_model_sees_the_swapped_geometry(swap: SwapConfig) -> None:
    layer = make_layer(GEOMETRIES["temporal-stride2-reflect"])
    new, _ = swap_layer(layer, swap)
    x = torch.randn(INPUT_SHAPE, dtype=torch.float64)
    out = run_form(new, "fused", x)
    for form in FORMS:
        cost = form_cost(form, new.geometry, new.num_temporal_atoms, new.num_spatial_atoms, *INPUT_SHAPE[:1],
                         *INPUT_SHAPE[2:])
        assert cost.output_elements == out.numel(), form
    # The planner traces, costs and applies a plan to the swapped model; auto then runs exactly.
    model = nn.Sequential(new).float()
    plan = plan_model(model, INPUT_SHAPE, measure=False)
    assert [choice.name for choice in plan.layers] == ["0"]
    new.mode = "auto"
    torch.testing.assert_close(run_form(new, "auto", x.float()), out.float(), atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("swap", ["dilate2", "t5-d2-s5"])
def test_every_form_of_a_swapped_layer_exports_to_onnx_and_validates(swap: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    layer = make_layer(GEOMETRIES["temporal-stride2-reflect"], dtype=torch.float32)
    new, _ = swap_layer(layer, SWAPS[swap])
    model = nn.Sequential(new)
    for form in FORMS:
        result = export_onnx(model, tmp_path / f"{form}.onnx", mode=form, input_shape=INPUT_SHAPE, runs=0, opset=13)
        assert result.validation is not None and result.validation.passed, result.validation.summary()
        assert result.validation.max_abs <= EXPORT_ATOL


# --------------------------------------------------------------------------------------------
# 4. Converted folders and the CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample model converted at its defaults (a trusted builder: no --trust-code needed)."""
    folder = tmp_path_factory.mktemp("sample")
    result = convert_checkpoint(
        sample_model_files().weights, ConvertConfig(), model=SAMPLE_MODEL_NAME, model_kwargs={"num_classes": 3},
        input_shape=SAMPLE_SHAPE, output=folder / "sample-stjfd",
    )
    assert result.output is not None
    return result.output


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STJFD_DEBUG", raising=False)


def test_a_swapped_folder_reloads_bit_identically_and_records_the_swap(sample_dir: Path, tmp_path: Path) -> None:
    result = swap_folder(sample_dir, tmp_path / "slow2x", SwapConfig(temporal_dilation=2), command="test")
    assert result.output_shape == (1, 3) and len(result.report.swapped) == 7
    reloaded = load_converted(result.output)
    x = torch.randn(SAMPLE_SHAPE)
    with torch.no_grad():
        assert torch.equal(reloaded.model(x), result.model(x))
    manifest = reloaded.manifest
    (record,) = manifest["swaps"]
    assert record["temporal_dilation"] == 2 and record["from"] == str(sample_dir.resolve())
    stem = manifest["layers"]["stem.0"]
    assert stem["dilation"] == [2, 1, 1] and stem["padding"] == [2, 3, 3]
    assert manifest["input"]["shape"] == list(SAMPLE_SHAPE)
    # A second swap appends its record; the source's conversion record is kept.
    again = swap_folder(result.output, tmp_path / "slow2x-t5", SwapConfig(temporal_size=5))
    manifest = load_converted(again.output).manifest
    assert [bool(s["temporal_dilation"]) for s in manifest["swaps"]] == [True, False]
    assert manifest["conversion"] == json.loads((sample_dir / MANIFEST_FILE).read_text())["conversion"]
    assert manifest["layers"]["layer1.conv1.0"]["kernel_size"] == [5, 3, 3]


def test_cli_swap_then_plan_export_and_report_accept_the_folder(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t5"
    outcome = run_cli(["swap", sample_dir, "--temporal-size", 5, "--spatial-size", 5, "--include", "layer*", "-o", out,
                       "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["swapped"] == 6 and data["output_shape"] == [1, 3]
    assert data["parameters_after"] > data["parameters_before"]
    outcome = run_cli(["plan", out, "--repeats", 1, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert len(json.loads(outcome.stdout)["layers"]) == 7
    # Plans measured for the old atoms do not travel with a swap.
    again = run_cli(["swap", out, "--temporal-dilation", 2, "-o", tmp_path / "t5-d2", "--json"])
    assert again.exit_code == 0, again.output
    assert any("plans" in note and "stjfd plan" in note for note in json.loads(again.stdout)["notes"])
    manifest = load_converted(tmp_path / "t5-d2").manifest
    assert "plans" not in manifest and not any("plan" in entry for entry in manifest["layers"].values())
    outcome = run_cli(["report", out, "--input-shape", "2,3,8,32,32", "--no-training", "--json"])
    assert outcome.exit_code == 0, outcome.output
    pytest.importorskip("onnxruntime")
    outcome = run_cli(["export", out, "--onnx", tmp_path / "t5.onnx", "--runs", 0, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["validation"]["passed"] is True


def test_cli_finetune_and_evaluate_accept_a_swapped_folder(sample_dir: Path, tmp_path: Path) -> None:
    from videos import make_video_dataset

    data = tmp_path / "data"
    for split, seed in (("train", 0), ("val", 1)):
        make_video_dataset(data / split, per_class=2, T=12, H=32, W=32, seed=seed)
    slow2x = swap_folder(sample_dir, tmp_path / "slow2x", SwapConfig(temporal_dilation=2)).output
    run = tmp_path / "run"
    outcome = run_cli(["finetune", slow2x, data, "--clip-len", SAMPLE_SHAPE[2], "--size", SAMPLE_SHAPE[3],
                       "--batch-size", 3, "--workers", 0, "--mean", "0,0,0", "--std", "1,1,1", "--device", "cpu",
                       "-o", run, "--json"])
    assert outcome.exit_code == 0, outcome.output
    best = load_converted(run / "best")
    assert best.manifest["layers"]["stem.0"]["dilation"] == [2, 1, 1]  # the swap survives training
    outcome = run_cli(["evaluate", run / "best", data, "--playback-speed", 0.5, "--workers", 0, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["playback_speed"] == 0.5
    # A run's best/ is a converted folder like any other: it swaps again (and its clip options travel).
    again = swap_folder(run / "best", tmp_path / "best-t5", SwapConfig(temporal_size=5))
    assert load_converted(again.output).manifest["finetune"]["clip"]["clip_len"] == SAMPLE_SHAPE[2]


def test_cli_swap_human_output_names_skips(sample_dir: Path, tmp_path: Path) -> None:
    outcome = run_cli(["swap", sample_dir, "--temporal-dilation", 2, "--spatial-size", 4, "-o", tmp_path / "mixed"])
    assert outcome.exit_code == 0, outcome.output
    skipped = [line for line in outcome.stdout.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 7 and all("asymmetric padding" in line for line in skipped)  # 7×7/3×3 → 4×4: odd change
    assert "saved" in outcome.stdout


@pytest.mark.parametrize(
    "options, fragments",
    [
        (["--temporal-dilation", 0], ["--temporal-dilation", "≥ 1"]),
        (["--temporal-size", 0], ["--temporal-size"]),
        (["--spatial-size", -1], ["--spatial-size"]),
        ([], ["nothing to swap"]),
        (["--temporal-size", 4], ["nothing was swapped", "asymmetric"]),
        (["--temporal-size", 5, "--include", "nope*"], ["select no decomposed layer"]),
        (["--temporal-size", 5, "--normalization", "loud"], ["normalization"]),
    ],
)
def test_cli_bad_swaps_give_one_line_and_exit_2(
    sample_dir: Path, tmp_path: Path, options: list[Any], fragments: list[str]
) -> None:
    out = tmp_path / "bad"
    assert_one_error_line(run_cli(["swap", sample_dir, *options, "-o", out]), *fragments)
    assert_no_output(out)


def test_cli_swap_output_safety(sample_dir: Path, tmp_path: Path) -> None:
    assert_one_error_line(run_cli(["swap", sample_dir, "--temporal-dilation", 2]), "-o")
    assert_one_error_line(run_cli(["swap", tmp_path / "missing", "--temporal-dilation", 2, "-o", tmp_path / "x"]),
                          "does not exist")
    assert_one_error_line(run_cli(["swap", sample_dir, "--temporal-dilation", 2, "-o", sample_dir]))
    out = tmp_path / "twice"
    assert run_cli(["swap", sample_dir, "--temporal-dilation", 2, "-o", out]).exit_code == 0
    assert_one_error_line(run_cli(["swap", sample_dir, "--temporal-dilation", 3, "-o", out]), "--force")
    assert run_cli(["swap", sample_dir, "--temporal-dilation", 3, "-o", out, "--force"]).exit_code == 0
    assert load_converted(out).manifest["layers"]["stem.0"]["dilation"] == [3, 1, 1]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    assert_one_error_line(run_cli(["swap", sample_dir, "--temporal-dilation", 2, "-o", plain, "--force"]))
    assert (plain / "notes.txt").read_text() == "mine"


def test_cli_swap_needs_trust_for_a_user_builder(tmp_path: Path) -> None:
    from cli_helpers import TINY_INPUT_SHAPE, write_tiny

    files = write_tiny(tmp_path / "inputs")
    converted = tmp_path / "tiny-stjfd"
    assert run_cli(["convert", *files.args(), "-o", converted]).exit_code == 0
    out = tmp_path / "tiny-slow"
    assert_one_error_line(run_cli(["swap", converted, "--temporal-dilation", 2, "-o", out]), "--trust-code")
    assert_no_output(out)
    outcome = run_cli(["swap", converted, "--temporal-dilation", 2, "-o", out, "--trust-code", "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert [s["layer"] for s in data["skipped"]] == ["spatial"] and data["swapped"] == 1
    assert data["input_shape"] == [int(v) for v in TINY_INPUT_SHAPE.split(",")]


# --------------------------------------------------------------------------------------------
# 5. Playback speed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "speed, offsets",
    [(1.0, [0, 1, 2, 3, 4, 5]), (0.5, [0, 0, 1, 1, 2, 2]), (2.0, [0, 2, 4, 6, 8, 10]), (1 / 3, [0, 0, 0, 1, 1, 1])],
)
def test_playback_speed_resamples_the_clip_frames(speed: float, offsets: list[int]) -> None:
    config = ClipConfig(clip_len=6, size=8, playback_speed=speed)
    assert config.offsets == offsets and config.span == offsets[-1] + 1
    (row,) = temporal_indices(40, config)
    start = (40 - config.span) // 2  # the centre clip stays centred
    assert row.tolist() == [start + o for o in offsets]
    strided = ClipConfig(clip_len=4, size=8, frame_stride=2, playback_speed=0.5)
    assert strided.offsets == [0, 1, 2, 3]


@pytest.mark.parametrize("speed", [0, -1, float("nan"), float("inf")])
def test_a_nonsense_playback_speed_is_refused(speed: float) -> None:
    with pytest.raises(ConfigError, match="--playback-speed"):
        ClipConfig(clip_len=4, size=8, playback_speed=speed)


@pytest.fixture(scope="module")
def shape_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of moving-shape videos (tests/videos.py), long enough for a sped-up clip."""
    from videos import make_video_dataset

    root = tmp_path_factory.mktemp("videos") / "val"
    make_video_dataset(root, per_class=2, T=24, H=32, W=32)
    return root


def _expected_eval(folder: Path, split: Path, speed: float) -> Any:
    from stjfd_convert.data import ClipDataset, find_sources
    from stjfd_convert.finetune import evaluate

    loaded = load_converted(folder)
    # evaluate matches class folders to the model's outputs by the class names its manifest records.
    sources, classes, _ = find_sources(split, loaded.manifest.get("classes"))
    config = ClipConfig(clip_len=SAMPLE_SHAPE[2], size=SAMPLE_SHAPE[3:], playback_speed=speed)
    return evaluate(loaded.model, ClipDataset(sources, classes, config), device="cpu")


def test_cli_evaluate_playback_speed_on_generated_videos(sample_dir: Path, shape_videos: Path, tmp_path: Path) -> None:
    slow2x = swap_folder(sample_dir, tmp_path / "slow2x", SwapConfig(temporal_dilation=2)).output
    losses = {}
    for folder in (sample_dir, slow2x):
        for speed in (1.0, 0.5, 2.0):
            outcome = run_cli(["evaluate", folder, shape_videos, "--playback-speed", speed, "--workers", 0, "--json"])
            assert outcome.exit_code == 0, outcome.output
            data = json.loads(outcome.stdout)
            assert data["playback_speed"] == speed and data["clips"] == 6
            expected = _expected_eval(folder, shape_videos, speed)
            assert data["loss"] == pytest.approx(expected.loss, abs=ATOL_FP32) and data["top1"] == expected.top1
            losses[folder.name, speed] = data["loss"]
    assert losses[sample_dir.name, 0.5] != losses[sample_dir.name, 1.0]  # the clips really were resampled
    human = run_cli(["evaluate", slow2x, shape_videos, "--playback-speed", 0.5, "--workers", 0])
    assert human.exit_code == 0 and "at playback speed 0.5" in human.stdout
    for bad in ("0", "-1", "nan"):
        assert_one_error_line(run_cli(["evaluate", sample_dir, shape_videos, "--playback-speed", bad]),
                              "--playback-speed")


def test_cli_predict_playback_speed(sample_dir: Path, shape_videos: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from stjfd_convert.data import ClipDataset, VideoSource

    onnx_file = tmp_path / "sample.onnx"
    outcome = run_cli(["export", sample_dir, "--onnx", onnx_file, "--mean", "0,0,0", "--std", "1,1,1", "--runs", 0,
                       "--json"])
    assert outcome.exit_code == 0, outcome.output
    video = sorted(shape_videos.rglob("*.mp4"))[0]
    outcome = run_cli(["predict", onnx_file, video, "--playback-speed", 0.5, "--top-k", 3, "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["playback_speed"] == 0.5
    config = ClipConfig(clip_len=SAMPLE_SHAPE[2], size=SAMPLE_SHAPE[3:], playback_speed=0.5)
    clip, _ = ClipDataset([VideoSource(video, -1)], ["video"], config)[0]
    with torch.no_grad():
        logits = load_converted(sample_dir).model(clip[None])[0]
    top = sorted(range(3), key=lambda i: -float(logits[i]))
    assert [t["index"] for t in data["top"]] == top
    assert [t["logit"] for t in data["top"]] == pytest.approx([float(logits[i]) for i in top], abs=EXPORT_ATOL)
    assert_one_error_line(run_cli(["predict", onnx_file, video, "--playback-speed", 0]), "--playback-speed")
