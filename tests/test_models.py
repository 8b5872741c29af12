"""Tests for stjfd_convert.models: registry, building, checkpoint reading, detection, loading."""

from __future__ import annotations

import hashlib
import pickle
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import video as tv_video

from stjfd_convert.errors import (
    ArchitectureError,
    CheckpointError,
    ConfigError,
    ConvertedModelError,
    StateDictMismatchError,
)
from stjfd_convert.models import (
    TORCHVISION_VIDEO_ARCHS,
    ArchSpec,
    build_model,
    check_finite,
    detect_architecture,
    infer_num_classes,
    load_model,
    load_state_dict_into,
    parse_model_kwargs,
    read_checkpoint,
    sha256_file,
)

USER_MODULE_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def build_net(channels=4, num_classes=3):
        print("building the tiny net")
        torch.manual_seed(0)
        torch.rand(5)
        return nn.Sequential(
            nn.Conv3d(3, channels, 3, padding=1),
            nn.BatchNorm3d(channels),
            nn.ReLU(),
            nn.Conv3d(channels, channels, (3, 1, 1)),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        )

    NOT_CALLABLE = 3

    def returns_int():
        return 3

    def raises():
        raise ValueError("bad config")
    """
)


def tiny_net(channels: int = 4, num_classes: int = 3) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv3d(3, channels, 3, padding=1),
        nn.BatchNorm3d(channels),
        nn.ReLU(),
        nn.Conv3d(channels, channels, (3, 1, 1)),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(channels, num_classes),
    )


def meta_state_dict(arch: str, **kwargs) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = TORCHVISION_VIDEO_ARCHS[arch].builder(weights=None, **kwargs)
    return model.state_dict()


def assert_same_tensors(a, b) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


class WritesMarker:
    """Pickles into a call that creates a file: proof that unpickling ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def r3d_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state_dict = tv_video.r3d_18(weights=None, num_classes=10).state_dict()
    path = tmp_path_factory.mktemp("r3d") / "r3d_18.pth"
    torch.save(state_dict, path)
    return path, state_dict


@pytest.fixture
def tiny_sd() -> dict[str, torch.Tensor]:
    return tiny_net().state_dict()


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "user_nets.py"
    path.write_text(USER_MODULE_SOURCE)
    return path


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> str:
    """A package ``stjfd_test_userpkg.nets`` importable via sys.path; cleaned from sys.modules after."""
    pkg = tmp_path / "pkgroot" / "stjfd_test_userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODULE_SOURCE)
    (pkg / "broken.py").write_text("raise RuntimeError('import-time failure')\n")
    (pkg / "needs_dep.py").write_text("import stjfd_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    yield "stjfd_test_userpkg"
    for name in [n for n in sys.modules if n.startswith("stjfd_test_userpkg")]:
        del sys.modules[name]


# ---------------------------------------------------------------------------- registry / specs


@pytest.mark.parametrize("arch", sorted(TORCHVISION_VIDEO_ARCHS))
def test_registry_entry_builds_on_meta_and_has_conv3d(arch):
    info = TORCHVISION_VIDEO_ARCHS[arch]
    with torch.device("meta"):
        model = info.builder(weights=None)
    assert any(isinstance(m, nn.Conv3d) for m in model.modules())
    state_dict = model.state_dict()
    assert state_dict[info.classifier_key].shape[0] == 400
    assert len(info.input_shape) == 5 and info.input_shape[1] == 3
    assert len(info.mean) == 3 and len(info.std) == 3


@pytest.mark.parametrize("arch", sorted(TORCHVISION_VIDEO_ARCHS))
def test_detection_finds_each_registered_arch(arch):
    detection = detect_architecture(meta_state_dict(arch, num_classes=7))
    assert detection.arch == arch
    assert detection.kwargs == {"num_classes": 7}
    assert detection.candidates[0] == (arch, 1.0)


def test_arch_spec_round_trip_and_validation():
    spec = ArchSpec("callable", "pkg.nets:build", {"channels": 4, "sizes": [1, 2]})
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    assert isinstance(spec.kwargs, dict)
    assert hash(spec) == hash(ArchSpec("callable", "pkg.nets:build", {"channels": 4, "sizes": [1, 2]}))
    assert ArchSpec.from_dict({"kind": "torchvision", "name": "r3d_18"}).kwargs == {}
    with pytest.raises(ConvertedModelError):
        ArchSpec.from_dict({"kind": "torchvision"})
    with pytest.raises(ConvertedModelError):
        ArchSpec.from_dict(["torchvision", "r3d_18"])
    with pytest.raises(ConvertedModelError):
        ArchSpec.from_dict({"kind": "torchvision", "name": "r3d_18", "kwargs": [1]})
    with pytest.raises(ArchitectureError, match="unknown architecture kind"):
        ArchSpec.from_dict({"kind": "onnx", "name": "x"})


def test_build_model_torchvision_is_eval_and_never_takes_weights():
    model = build_model(ArchSpec("torchvision", "r3d_18", {"num_classes": 5}))
    assert not model.training
    assert model.fc.out_features == 5
    with pytest.raises(ArchitectureError, match="never downloads"):
        build_model(ArchSpec("torchvision", "r3d_18", {"weights": "DEFAULT"}))
    with pytest.raises(ArchitectureError, match="unknown torchvision"):
        build_model(ArchSpec("torchvision", "resnet50"))
    with pytest.raises(ArchitectureError, match="building r3d_18"):
        build_model(ArchSpec("torchvision", "r3d_18", {"no_such_argument": 1}))
    with pytest.raises(ArchitectureError, match="--trust-pickle"):
        build_model(ArchSpec("pickle", "torch.nn.modules.container.Sequential"))


# ---------------------------------------------------------------------------- user callables


def test_build_from_file_callable_isolates_rng_and_output(user_file, capsys):
    torch.manual_seed(123)
    before = torch.random.get_rng_state().clone()
    model = build_model(ArchSpec("callable", f"{user_file}:build_net", {"channels": 2}))
    assert torch.equal(torch.random.get_rng_state(), before)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert isinstance(model, nn.Sequential) and not model.training
    assert model[0].out_channels == 2


def test_build_from_dotted_callable(user_package, capsys):
    before = torch.random.get_rng_state().clone()
    model = build_model(ArchSpec("callable", f"{user_package}.nets:build_net", {"num_classes": 6}))
    assert model[-1].out_features == 6
    assert torch.equal(torch.random.get_rng_state(), before)
    assert capsys.readouterr().out == ""


def test_dotted_callable_is_imported_from_cwd(tmp_path, monkeypatch):
    (tmp_path / "stjfd_cwd_nets.py").write_text(USER_MODULE_SOURCE)
    monkeypatch.chdir(tmp_path)
    try:
        model = build_model(ArchSpec("callable", "stjfd_cwd_nets:build_net"))
        assert isinstance(model, nn.Sequential)
    finally:
        sys.modules.pop("stjfd_cwd_nets", None)
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("stjfd_no_such_module_xyz:build", "no module named"),
        ("no_colon_here", "does not name a callable"),
        ("{pkg}.nets:missing", "has no attribute 'missing'"),
        ("{pkg}.nets:NOT_CALLABLE", "not a callable"),
        ("{pkg}.nets:returns_int", "returned int, not a torch.nn.Module"),
        ("{pkg}.nets:raises", r"building .*raises\(\*\*\{\}\) failed: ValueError: bad config"),
        ("{pkg}.broken:build", "RuntimeError: import-time failure"),
        ("{pkg}.needs_dep:build", "stjfd_no_such_dependency"),
        ("{file}:missing", "has no attribute"),
        ("{file}:raises", "ValueError: bad config"),
        ("{missing_file}:build", "does not exist"),
    ],
)
def test_bad_callables_raise_architecture_error(target, match, user_package, user_file, tmp_path, capsys):
    name = target.format(pkg=user_package, file=user_file, missing_file=tmp_path / "nope.py")
    with pytest.raises(ArchitectureError, match=match) as info:
        build_model(ArchSpec("callable", name))
    assert info.value.hint
    assert capsys.readouterr().out == ""


def test_missing_attribute_hint_lists_callables(user_file):
    with pytest.raises(ArchitectureError) as info:
        build_model(ArchSpec("callable", f"{user_file}:nope"))
    assert "build_net" in info.value.hint
    assert "--model" in info.value.hint


# ---------------------------------------------------------------------------- reading checkpoints


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_round_trip_formats(tmp_path, tiny_sd, suffix):
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(tiny_sd, str(path))
    else:
        torch.save(tiny_sd, path)
    assert_same_tensors(read_checkpoint(path), tiny_sd)


def test_safetensors_content_is_sniffed_regardless_of_suffix(tmp_path, tiny_sd):
    path = tmp_path / "weights.bin"
    save_file(tiny_sd, str(path))
    assert_same_tensors(read_checkpoint(path), tiny_sd)


def _wrap(sd, prefix=""):
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize(
    "make",
    [
        lambda sd: {"state_dict": sd},
        lambda sd: {"model": sd},
        lambda sd: {"model_state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1, "state": {}}},
        lambda sd: {"net": sd, "best_acc": 0.5},
        lambda sd: {"module": sd},
        lambda sd: {"checkpoint_version": 2, "state_dict": {"model": sd}},
        lambda sd: _wrap(sd, "module."),
        lambda sd: _wrap(sd, "_orig_mod."),
        lambda sd: _wrap(sd, "module._orig_mod."),
        lambda sd: _wrap(sd, "_orig_mod.module."),
        lambda sd: {"state_dict": _wrap(sd, "module."), "epoch": 7},
    ],
    ids=[
        "state_dict",
        "model",
        "model_state_dict+extras",
        "net",
        "module",
        "nested",
        "ddp",
        "compile",
        "ddp+compile",
        "compile+ddp",
        "wrapped+ddp",
    ],
)
def test_unwraps_training_checkpoints(tmp_path, tiny_sd, make):
    path = tmp_path / "ckpt.pth"
    torch.save(make(tiny_sd), path)
    assert_same_tensors(read_checkpoint(path), tiny_sd)


def test_prefix_kept_unless_shared_by_all_keys(tmp_path, tiny_sd):
    mixed = {("module." + k if i == 0 else k): v for i, (k, v) in enumerate(tiny_sd.items())}
    path = tmp_path / "mixed.pth"
    torch.save(mixed, path)
    assert list(read_checkpoint(path)) == list(mixed)


def test_missing_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory") as info:
        read_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "checkpoint file" in info.value.hint


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.touch()
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_checkpoint(tmp_path, tiny_sd, legacy):
    path = tmp_path / "cut.pth"
    torch.save(tiny_sd, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        read_checkpoint(path, trust_pickle=True)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("trust", [False, True])
def test_random_bytes(tmp_path, suffix, trust):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        read_checkpoint(path, trust_pickle=trust)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("raw_pickle", [False, True], ids=["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, raw_pickle):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.zeros(2), "extra": WritesMarker(marker)}
    if raw_pickle:
        with path.open("wb") as f:
            pickle.dump(payload, f, protocol=4)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="pickled Python objects") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    assert "--trust-pickle" in info.value.hint
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_whole_pickled_module_needs_trust(tmp_path):
    net = tiny_net().train()
    path = tmp_path / "whole.pth"
    torch.save(net, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_checkpoint(path)
    loaded = read_checkpoint(path, trust_pickle=True)
    assert isinstance(loaded, nn.Sequential) and not loaded.training
    assert_same_tensors(loaded.state_dict(), net.state_dict())

    result = load_model(path, trust_pickle=True)
    assert result.spec == ArchSpec("pickle", "torch.nn.modules.container.Sequential", {})
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": net, "epoch": 1}, wrapped)
    assert isinstance(read_checkpoint(wrapped, trust_pickle=True), nn.Sequential)


def test_whole_pickled_torchvision_model_gets_rebuildable_spec(tmp_path):
    torch.manual_seed(0)
    net = tv_video.mc3_18(weights=None, num_classes=4)
    path = tmp_path / "mc3_whole.pt"
    torch.save(net, path)
    result = load_model(path, trust_pickle=True)
    assert result.spec == ArchSpec("torchvision", "mc3_18", {"num_classes": 4})
    assert_same_tensors(result.model.state_dict(), net.state_dict())


def test_no_tensors_or_not_a_dict(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        read_checkpoint(path)


def test_permission_denied(tmp_path, tiny_sd, monkeypatch):
    path = tmp_path / "locked.pth"
    torch.save(tiny_sd, path)
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    # chmod 0 does not stop root (CI containers), so simulate the OS refusing the read.
    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(CheckpointError, match="permission denied") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_sha256_file(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"stjfd" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"stjfd" * 1000).hexdigest()
    with pytest.raises(CheckpointError):
        sha256_file(tmp_path / "missing")


# ---------------------------------------------------------------------------- finiteness


def test_check_finite_names_key_and_counts(tiny_sd):
    check_finite(tiny_sd)
    sd = {k: v.clone() for k, v in tiny_sd.items()}
    sd["0.weight"].view(-1)[:3] = float("nan")
    sd["0.weight"].view(-1)[3] = float("inf")
    sd["3.weight"].view(-1)[0] = float("-inf")
    sd["6.bias"].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError) as info:
        check_finite(sd)
    assert "0.weight has 3 NaN, 1 Inf (and 2 more tensors)" in str(info.value)
    assert "earlier checkpoint" in info.value.hint


def test_load_model_rejects_nan_weights(tmp_path, tiny_sd, user_file):
    tiny_sd["3.weight"].view(-1)[1] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(tiny_sd, path)
    with pytest.raises(CheckpointError, match=r"3\.weight has 1 NaN"):
        load_model(path, model=f"{user_file}:build_net")


# ---------------------------------------------------------------------------- detection


def test_detection_distinguishes_resnet_family():
    for arch in ("r3d_18", "mc3_18", "r2plus1d_18"):
        sd = meta_state_dict(arch, num_classes=10)
        detection = detect_architecture(sd)
        assert detection.arch == arch
        assert detection.kwargs == {"num_classes": 10}
        assert arch in detection.note and "num_classes=10" in detection.note


def test_detection_ignores_num_batches_tracked():
    sd = {k: v for k, v in meta_state_dict("r2plus1d_18").items() if "num_batches_tracked" not in k}
    assert detect_architecture(sd).arch == "r2plus1d_18"


def test_damaged_r2plus1d_is_not_detected_as_r3d():
    sd = dict(meta_state_dict("r2plus1d_18", num_classes=10))
    del sd["fc.bias"]
    with pytest.raises(ArchitectureError) as info:
        detect_architecture(sd)
    text = str(info.value)
    assert "closest: r2plus1d_18 99%" in text
    assert "--arch" in info.value.hint


def test_detection_of_custom_model_fails_with_hint(tiny_sd):
    with pytest.raises(ArchitectureError) as info:
        detect_architecture(tiny_sd)
    assert "--arch" in str(info.value)
    assert "--model" in str(info.value)


def test_detection_with_several_exact_matches(monkeypatch):
    monkeypatch.setitem(
        TORCHVISION_VIDEO_ARCHS, "r3d_18_copy", TORCHVISION_VIDEO_ARCHS["r3d_18"].__class__(
            "r3d_18_copy", *[getattr(TORCHVISION_VIDEO_ARCHS["r3d_18"], f) for f in
                             ("builder", "classifier_key", "input_shape", "mean", "std")]
        )
    )
    with pytest.raises(ArchitectureError, match="several architectures") as info:
        detect_architecture(meta_state_dict("r3d_18"))
    assert "--arch" in info.value.hint


def test_infer_num_classes():
    assert infer_num_classes("s3d", meta_state_dict("s3d", num_classes=12)) == 12
    assert infer_num_classes("r3d_18", {}) is None
    with pytest.raises(ConfigError):
        infer_num_classes("resnet50", {})


# ---------------------------------------------------------------------------- state_dict loading


def test_strict_mismatch_message(tiny_sd):
    sd = dict(tiny_sd)
    del sd["6.weight"], sd["6.bias"], sd["1.running_mean"]
    sd["head.weight"] = torch.zeros(2)
    sd["0.weight"] = torch.zeros(4, 3, 1, 3, 3)
    with pytest.raises(StateDictMismatchError) as info:
        load_state_dict_into(tiny_net(), sd, name="tiny")
    text = str(info.value)
    assert text.startswith("checkpoint does not match tiny: 3 missing keys (")
    assert "1 unexpected (head.weight)" in text
    assert "1 shape mismatch (0.weight: checkpoint [4,3,1,3,3] vs model [4,3,3,3,3])" in text
    assert "--non-strict" in info.value.hint


def test_non_strict_loads_what_matches(tiny_sd):
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_sd.items()}
    del sd["6.bias"]
    sd["extra"] = torch.zeros(1)
    sd["3.weight"] = torch.zeros(1)
    target = tiny_net()
    original = {k: v.clone() for k, v in target.state_dict().items()}
    problems = load_state_dict_into(target, sd, strict=False)
    assert len(problems) == 3
    assert any("6.bias" in p for p in problems) and any("extra" in p for p in problems)
    assert any("3.weight" in p for p in problems)
    loaded = target.state_dict()
    assert torch.equal(loaded["0.weight"], sd["0.weight"])
    assert torch.equal(loaded["3.weight"], original["3.weight"])
    assert torch.equal(loaded["6.bias"], original["6.bias"])


def test_missing_num_batches_tracked_is_fine(tiny_sd):
    sd = {k: v for k, v in tiny_sd.items() if "num_batches_tracked" not in k}
    assert load_state_dict_into(tiny_net(), sd) == []


# ---------------------------------------------------------------------------- load_model


def test_load_model_detects_r3d(r3d_checkpoint):
    path, state_dict = r3d_checkpoint
    result = load_model(path)
    assert result.spec == ArchSpec("torchvision", "r3d_18", {"num_classes": 10})
    assert result.source == path
    assert result.sha256 == sha256_file(path)
    assert any("detected r3d_18 (num_classes=10)" in n for n in result.notes)
    assert not result.model.training
    assert_same_tensors(result.model.state_dict(), state_dict)
    x = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    reference = tv_video.r3d_18(weights=None, num_classes=10)
    reference.load_state_dict(state_dict)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), reference.eval()(x))


def test_load_model_with_arch_infers_num_classes(r3d_checkpoint):
    path, _ = r3d_checkpoint
    result = load_model(path, arch="r3d_18")
    assert result.spec.kwargs == {"num_classes": 10}
    assert result.model.fc.out_features == 10


def test_load_model_wrong_arch_is_strict_mismatch(r3d_checkpoint):
    path, _ = r3d_checkpoint
    with pytest.raises(StateDictMismatchError, match="does not match mc3_18"):
        load_model(path, arch="mc3_18")
    result = load_model(path, arch="mc3_18", strict=False)
    assert any("mis-shaped" in n for n in result.notes)


@pytest.mark.parametrize("form", ["file", "dotted"])
def test_load_model_user_callable(tmp_path, user_file, user_package, form, capsys):
    net = tiny_net(channels=2, num_classes=5)
    ckpt = tmp_path / "tiny.safetensors"
    save_file({"module." + k: v for k, v in net.state_dict().items()}, str(ckpt))
    name = f"{user_file}:build_net" if form == "file" else f"{user_package}.nets:build_net"
    result = load_model(ckpt, model=name, model_kwargs={"channels": 2, "num_classes": 5})
    assert result.spec == ArchSpec("callable", name, {"channels": 2, "num_classes": 5})
    assert_same_tensors(result.model.state_dict(), net.state_dict())
    assert any("printed 1 line" in n for n in result.notes)
    assert capsys.readouterr().out == ""
    with pytest.raises(StateDictMismatchError, match="shape mismatch"):
        load_model(ckpt, model=name)  # default channels=4


def test_load_model_without_checkpoint(user_file):
    result = load_model(model=f"{user_file}:build_net")
    assert result.source is None and result.sha256 is None
    assert any("freshly initialised" in n for n in result.notes)
    assert isinstance(load_model(arch="mc3_18").model, nn.Module)


def test_load_model_config_errors(tmp_path, user_file):
    with pytest.raises(ConfigError, match="cannot be used together"):
        load_model(arch="r3d_18", model=f"{user_file}:build_net")
    with pytest.raises(ConfigError) as info:
        load_model(arch="resnet50")
    assert "r3d_18" in info.value.hint and "swin3d_b" in info.value.hint
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_model()
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        load_model(arch="r3d_18", model_kwargs={"num_classes": object()})


def test_parse_model_kwargs():
    assert parse_model_kwargs(None) == {}
    assert parse_model_kwargs("  ") == {}
    assert parse_model_kwargs('{"num_classes": 10, "dropout": 0.5}') == {"num_classes": 10, "dropout": 0.5}
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        parse_model_kwargs("{num_classes: 10}")
    assert "JSON object" in info.value.hint
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        parse_model_kwargs("[1, 2]")
