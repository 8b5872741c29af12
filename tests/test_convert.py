"""Whole-model conversion, the saved format and parity, through the library API."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from stjfd_convert import DecomposedConv3d
from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model, count_parameters, decomposed_layers, set_mode
from stjfd_convert.errors import ConfigError, ConvertedModelError, ModelError, OutputError
from stjfd_convert.models import ArchSpec
from stjfd_convert.parity import compare_models, flatten_outputs, make_input
from stjfd_convert.saved_model import MANIFEST_FILE, WEIGHTS_FILE, load_converted, save_converted

SEED = 0
FULL_RANK_REL = 1e-5  # float32 model, exact decomposition
MODES = ("fused", "factorized", "sandwich")


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleDict(
            {
                "a": nn.Conv3d(channels, channels, 3, padding=1, bias=False),
                "b": nn.Conv3d(channels, channels, (1, 3, 3), padding=(0, 1, 1)),
            }
        )
        self.extra = nn.ModuleList([nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))])
        self.bn = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs["b"](self.convs["a"](x))
        return torch.relu(self.bn(self.extra[0](y)) + x)


class TinyNet(nn.Module):
    """Nested containers, a 1×1×1 conv, a shared conv, dict output."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)), nn.ReLU())
        self.body = nn.Sequential(Block(8), Block(8))
        self.proj = nn.Conv3d(8, 16, 1)
        self.shared = nn.Conv3d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.proj(self.body(self.stem(x)))
        y = self.shared(torch.relu(self.shared(y)))  # same module used twice
        feats = y.mean(dim=(2, 3, 4))
        return {"logits": self.head(feats), "features": (feats, [y])}


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(SEED)
    model = TinyNet().eval()
    # Non-trivial BN statistics so eval mode is not an identity.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


INPUT = (2, 3, 4, 12, 12)


def test_convert_leaves_input_untouched(tiny: TinyNet) -> None:
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    converted, _ = convert_model(tiny, ConvertConfig())
    assert converted is not tiny
    assert all(isinstance(m, nn.Conv3d) for m in [tiny.stem[0], tiny.body[0].convs["a"], tiny.shared])
    for key, value in tiny.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_convert_walks_nested_containers_and_reports(tiny: TinyNet) -> None:
    converted, report = convert_model(tiny, ConvertConfig(spatial_atoms=4, temporal_atoms=2))
    names = [layer.name for layer in report.layers]
    assert names == [n for n, m in tiny.named_modules() if isinstance(m, nn.Conv3d)]
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["proj"].skipped and "1×1×1" in by_name["proj"].skipped
    assert isinstance(converted.body[1].convs["a"], DecomposedConv3d)
    assert isinstance(converted.body[0].extra[0], DecomposedConv3d)
    # (1,3,3) kernel: one temporal atom only; (3,1,1): one spatial atom only.
    b = by_name["body.0.convs.b"]
    assert (b.temporal_atoms, b.spatial_atoms) == (1, 4)
    e = by_name["body.0.extra.0"]
    assert (e.temporal_atoms, e.spatial_atoms) == (2, 1)
    # Parameter totals are counted from the real modules.
    assert report.params_before == count_parameters(tiny)
    assert report.params_after == count_parameters(converted)
    for layer in report.layers:
        module = converted.get_submodule(layer.name)
        assert layer.params_after == sum(p.numel() for p in module.parameters())


def test_shared_conv_stays_shared(tiny: TinyNet) -> None:
    converted, _ = convert_model(tiny, ConvertConfig())
    assert isinstance(converted.shared, DecomposedConv3d)
    assert sum(1 for _, m in decomposed_layers(converted) if m is converted.shared) == 1


@pytest.mark.parametrize("mode", MODES)
def test_full_rank_matches_original_in_every_mode(tiny: TinyNet, mode: str) -> None:
    converted, report = convert_model(tiny, ConvertConfig(full_rank=True, mode=mode))
    assert all(layer.rel_error == 0.0 for layer in report.decomposed)
    parity = compare_models(tiny, converted, INPUT)
    assert [o.name for o in parity.outputs] == [name for name, _ in flatten_outputs(tiny(make_input(INPUT)))]
    assert len(parity.outputs) == 3  # logits, features tuple, nested list
    assert parity.rel_l2 <= FULL_RANK_REL
    assert parity.top1_agree == parity.top1_total == INPUT[0]


def test_execution_modes_agree_after_truncation(tiny: TinyNet) -> None:
    converted, _ = convert_model(tiny, ConvertConfig(spatial_atoms=3, temporal_atoms=2))
    x = make_input(INPUT, seed=SEED + 1)
    with torch.no_grad():
        reference = set_mode(converted, "fused")(x)["logits"]
        for mode in ("factorized", "sandwich"):
            out = set_mode(converted, mode)(x)["logits"]
            assert torch.allclose(out, reference, rtol=FULL_RANK_REL, atol=FULL_RANK_REL), mode


def test_skip_when_atoms_do_not_save() -> None:
    model = nn.Sequential(nn.Conv3d(2, 8, (3, 1, 1)), nn.Conv3d(8, 8, 3))
    _, report = convert_model(model, ConvertConfig(temporal_atoms=3))
    assert report.layers[0].skipped and "would not save" in report.layers[0].skipped
    assert report.layers[1].decomposed


def test_include_exclude(tiny: TinyNet) -> None:
    _, report = convert_model(tiny, ConvertConfig(include=("body.*",), exclude=("*.extra.*",)))
    status = {layer.name: layer.skipped for layer in report.layers}
    assert status["stem.0"] == "not matched by --include"
    assert status["body.0.extra.0"] == "matched by --exclude"
    assert status["body.1.convs.a"] is None
    with pytest.raises(ConfigError, match="--include"):
        convert_model(tiny, ConvertConfig(include=("nomatch*",)))


def test_atoms_above_every_layer_is_an_error(tiny: TinyNet) -> None:
    with pytest.raises(ConfigError, match="above every layer"):
        convert_model(tiny, ConvertConfig(spatial_atoms=26))
    with pytest.raises(ConfigError, match="above every layer"):
        convert_model(tiny, ConvertConfig(temporal_atoms=4))
    with pytest.raises(ConfigError):
        ConvertConfig(spatial_atoms=0)
    with pytest.raises(ConfigError):
        ConvertConfig(energy=0.9, spatial_atoms=3)


def test_energy_and_budget_policies(tiny: TinyNet) -> None:
    _, full = convert_model(tiny, ConvertConfig(energy=1.0))
    assert all(layer.rel_error is None or layer.rel_error < FULL_RANK_REL for layer in full.layers)
    _, loose = convert_model(tiny, ConvertConfig(energy=0.5))
    assert sum(layer.params_after for layer in loose.layers) < sum(layer.params_after for layer in full.layers)
    ratio = 0.5
    _, budget = convert_model(tiny, ConvertConfig(budget=ratio))
    convs = [layer for layer in budget.layers if layer.kernel_size != (1, 1, 1)]
    dense = sum(layer.params_before for layer in convs)
    # Budget is on weights; biases are unchanged on both sides.
    bias = sum(layer.params_before - layer.in_channels // layer.groups * layer.out_channels
               * layer.kernel_size[0] * layer.kernel_size[1] * layer.kernel_size[2] for layer in convs)
    assert sum(layer.params_after for layer in convs) - bias <= ratio * (dense - bias)


def test_model_without_conv3d() -> None:
    with pytest.raises(ModelError, match="no Conv3d"):
        convert_model(nn.Sequential(nn.Linear(3, 3)))


def test_non_finite_weights() -> None:
    model = nn.Sequential(nn.Conv3d(2, 2, 3))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelError, match="non-finite"):
        convert_model(model)


def test_progress_callback(tiny: TinyNet) -> None:
    events = []
    convert_model(tiny, ConvertConfig(), progress=events.append)
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert events[-1].total == len(events)


# --- saved format -----------------------------------------------------------------------------


def _spec_for_tiny(tmp_path, monkeypatch) -> ArchSpec:
    source = tmp_path / "tinynet_mod.py"
    source.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from test_convert import TinyNet\n"
        "def build(num_classes=5):\n"
        "    return TinyNet(num_classes)\n"
    )
    return ArchSpec("callable", f"{source}:build", {"num_classes": 5})


def test_save_and_load_is_bit_identical(tiny: TinyNet, tmp_path, monkeypatch) -> None:
    spec = _spec_for_tiny(tmp_path, monkeypatch)
    converted, report = convert_model(tiny, ConvertConfig(spatial_atoms=4, mode="sandwich"))
    out = save_converted(converted, tmp_path / "out", spec, input_shape=INPUT, conversion=report.to_dict())
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1
    assert manifest["architecture"]["kwargs"] == {"num_classes": 5}
    assert manifest["layers"]["body.0.convs.a"]["spatial_atoms"] == 4
    assert manifest["layers"]["body.0.convs.a"]["mode"] == "sandwich"
    assert {"stjfd", "torch"} <= set(manifest["versions"])
    loaded = load_converted(out, trust_code=True)
    assert loaded.model.shared is loaded.model.shared  # rebuilt architecture keeps sharing
    x = make_input(INPUT, seed=SEED + 2)
    with torch.no_grad():
        expected = flatten_outputs(converted(x))
        actual = flatten_outputs(loaded.model(x))
    for (name, a), (_, b) in zip(expected, actual):
        assert torch.equal(a, b), name


def test_save_refuses_existing_folder_and_leaves_no_partial(tiny: TinyNet, tmp_path, monkeypatch) -> None:
    spec = _spec_for_tiny(tmp_path, monkeypatch)
    converted, _ = convert_model(tiny)
    target = tmp_path / "out"
    save_converted(converted, target, spec)
    with pytest.raises(OutputError, match="--force"):
        save_converted(converted, target, spec)
    save_converted(converted, target, spec, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_load_converted_errors(tmp_path) -> None:
    with pytest.raises(ConvertedModelError, match="does not exist"):
        load_converted(tmp_path / "missing", trust_code=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertedModelError, match=MANIFEST_FILE):
        load_converted(tmp_path / "empty", trust_code=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ConvertedModelError, match="JSON"):
        load_converted(bad, trust_code=True)
    (bad / MANIFEST_FILE).write_text(json.dumps({"format": "stjfd-converted", "format_version": 99}))
    with pytest.raises(ConvertedModelError, match="upgrade"):
        load_converted(bad, trust_code=True)


def test_uint8_channels_last_model_parity() -> None:
    """Models taking raw uint8 frames [B, T, H, W, C]: parity builds the right input."""

    class FrameNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(3, 4, 3, padding=1)

        def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = frames.permute(0, 4, 1, 2, 3).float() / 255.0
            y = self.conv(x)
            return y.mean(dim=(2, 3, 4)), y

    torch.manual_seed(SEED)
    model = FrameNet().eval()
    converted, _ = convert_model(model, ConvertConfig(full_rank=True))
    parity = compare_models(model, converted, (2, 4, 8, 8, 3), torch.uint8)
    assert parity.input_dtype == "uint8"
    assert len(parity.outputs) == 2
    assert parity.rel_l2 <= FULL_RANK_REL
    with pytest.raises(ConfigError, match="--input-shape"):
        compare_models(model, converted, (2, 3, 4, 8, 8), torch.uint8)
