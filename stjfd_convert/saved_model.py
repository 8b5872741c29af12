"""The converted-model folder: ``model.safetensors`` + ``model.stjfd.json`` (DESIGN.md §5).

The manifest records how to rebuild the architecture (``ArchSpec``), which modules are
``DecomposedConv3d`` and their geometry/atoms, where the weights came from and which versions
wrote them. ``load_converted`` needs no user code beyond what the architecture spec names.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import __version__
from .atomic import atomic_directory, give_default_mode
from .convert import replace_modules
from .errors import ArchitectureError, ConfigError, ConvertedModelError, StjfdError
from .formats import CONVERTED_FORMAT, MANIFEST_FILE, PICKLE_FILE, WEIGHTS_FILE
from .inputs import InputShape, input_record
from .layers import DecomposedConv3d
from .models import ArchSpec, build_model, is_trusted_builder

FORMAT = CONVERTED_FORMAT
FORMAT_VERSION = 1


def _versions() -> dict[str, str]:
    versions = {"stjfd": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    return versions


def decomposed_layer_table(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Manifest entries for every DecomposedConv3d, keyed by qualified module name."""
    table = {}
    for name, module in model.named_modules():
        if isinstance(module, DecomposedConv3d):
            entry = module.describe()
            if module.reconstruction_error is not None:
                entry["rel_error"] = module.reconstruction_error
            table[name] = entry
    return table


def build_manifest(
    model: nn.Module,
    spec: ArchSpec,
    *,
    source: str | Path | None = None,
    sha256: str | None = None,
    input_shape: InputShape | Sequence[int] | None = None,
    input_dtype: str = "float32",
    command: str | None = None,
    conversion: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    input_container: str = "list",
    pathway_strides: Sequence[int] | None = None,
    input_layout: str | None = None,
) -> dict[str, Any]:
    """The JSON manifest for ``model`` (a converted model built from ``spec``); ``input_layout`` (``BCTHW`` |
    ``BTHWC`` | ``BTCHW``, recorded as ``input.layout``) tells later commands how the model takes a clip."""
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": spec.to_dict(),
        "layers": decomposed_layer_table(model),
        "source": {"path": str(source) if source is not None else None, "sha256": sha256},
        "input": input_record(input_shape, input_dtype, input_container, pathway_strides, input_layout),
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": _versions(),
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if conversion is not None:
        manifest["conversion"] = dict(conversion)
    if extra:
        manifest.update(extra)
    return manifest


def write_converted_files(model: nn.Module, manifest: Mapping[str, Any], folder: Path) -> None:
    """Write weights (+ a pickled skeleton for pickle-only architectures) and the manifest into ``folder``."""
    from safetensors.torch import save_model

    save_model(model, str(folder / WEIGHTS_FILE))
    give_default_mode(folder / WEIGHTS_FILE)  # safetensors writes 0600, the manifest beside it gets 0644
    if manifest["architecture"]["kind"] == "pickle":
        torch.save(model, folder / PICKLE_FILE)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def save_converted(
    model: nn.Module,
    directory: str | Path,
    spec: ArchSpec,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
    input_layout: str | None = None,
    **manifest_fields: Any,
) -> Path:
    """Save a converted model atomically into ``directory``; returns the folder.

    ``overwrite`` replaces an existing converted folder (never anything else, never one of ``inputs``:
    :mod:`stjfd_convert.atomic`). ``manifest_fields`` go to ``build_manifest`` (source, sha256,
    input_shape, input_dtype, command, …); ``input_layout`` (``BTHWC``…) is recorded as ``input.layout``
    so that later commands take it as their ``--input-layout`` default (None: not recorded, BCTHW).
    """
    manifest = build_manifest(model, spec, input_layout=input_layout, **manifest_fields)
    with atomic_directory(directory, "converted", force=overwrite, inputs=inputs) as staging:
        write_converted_files(model, manifest, staging)
    return Path(directory)


def is_converted_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder holding a stjfd manifest."""
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``model.stjfd.json``."""
    directory = Path(directory)
    if not directory.exists():
        raise ConvertedModelError(f"{directory} does not exist", "pass the folder written by `stjfd convert`")
    if not directory.is_dir():
        raise ConvertedModelError(
            f"{directory} is not a converted-model folder", "pass the folder written by `stjfd convert`"
        )
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ConvertedModelError(
            f"{directory} has no {MANIFEST_FILE}", "pass the folder written by `stjfd convert` (or convert first)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertedModelError(f"{path} is not readable JSON: {exc}", "re-run `stjfd convert`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConvertedModelError(f"{path} is not a stjfd manifest", "re-run `stjfd convert`")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConvertedModelError(
            f"{path} has format version {version!r}; this stjfd reads up to {FORMAT_VERSION}", "upgrade stjfd"
        )
    if not isinstance(manifest.get("layers"), dict) or not isinstance(manifest.get("architecture"), dict):
        raise ConvertedModelError(f"{path} lacks 'layers' or 'architecture'", "re-run `stjfd convert`")
    return manifest


@dataclass
class ConvertedModel:
    """A loaded converted model with its manifest."""

    model: nn.Module
    manifest: dict[str, Any]
    directory: Path

    @property
    def spec(self) -> ArchSpec:
        return ArchSpec.from_dict(self.manifest["architecture"])


def check_builder_trusted(spec: ArchSpec, *, trust_code: bool, model: str | None, directory: Path | None) -> None:
    """Refuse to import/call a builder named by a manifest (data from disk) unless the user opted in.

    torchvision's registry and stjfd's own builders are allowed by name; any other callable needs
    ``trust_code`` or the same ``--model`` given again on the command line.
    """
    if model is not None and spec.kind == "callable" and model != spec.name:
        raise ConfigError(
            f"--model {model!r} differs from the builder {spec.name!r} that {directory or 'the folder'} was saved with",
            f"drop --model, or pass --model {spec.name}",
        )
    if spec.kind != "callable" or trust_code or model == spec.name or is_trusted_builder(spec.name):
        return
    raise ConvertedModelError(
        f"{directory or 'the folder'} names the builder {spec.name!r}: loading it would import and run that code",
        f"if you trust this folder and that code, pass --trust-code (or --model {spec.name})",
    )


def rebuild_skeleton(
    manifest: Mapping[str, Any],
    *,
    trust_pickle: bool = False,
    trust_code: bool = False,
    model: str | None = None,
    directory: Path | None = None,
) -> nn.Module:
    """The converted architecture with correctly shaped (not yet loaded) parameters.

    Builders named by the manifest run only when :func:`check_builder_trusted` allows it.
    """
    spec = ArchSpec.from_dict(manifest["architecture"])
    check_builder_trusted(spec, trust_code=trust_code, model=model, directory=directory)
    if spec.kind == "pickle":
        if directory is None or not (directory / PICKLE_FILE).is_file():
            raise ConvertedModelError(f"the pickled architecture {PICKLE_FILE} is missing", "re-run `stjfd convert`")
        if not trust_pickle:
            raise ConvertedModelError(
                f"{directory} stores its architecture as a pickled module, which can run code when loaded",
                "if you trust it, pass --trust-pickle",
            )
        return torch.load(directory / PICKLE_FILE, map_location="cpu", weights_only=False)
    try:
        net = build_model(spec)
    except ArchitectureError as exc:
        missing = getattr(exc, "missing", None)
        if model is not None or missing is None:
            raise
        where = f"{directory}/{MANIFEST_FILE}" if directory is not None else "the manifest"
        hint = (
            "put the file back at that path (the manifest records it), or convert the checkpoint again"
            if missing.startswith("file")
            else "the builder's module must be importable: run from the folder it was converted in, or add that "
            "folder to PYTHONPATH"
        )
        raise ConvertedModelError(
            f"{where} names the builder {spec.name!r}, but its {missing} cannot be found from {Path.cwd()}", hint
        ) from None
    replacements: dict[int, nn.Module] = {}
    for name, entry in manifest["layers"].items():
        try:
            original = net.get_submodule(name)
        except AttributeError:
            raise ConvertedModelError(
                f"manifest layer {name!r} does not exist in {spec.describe()}",
                "the architecture changed since conversion; re-run `stjfd convert`",
            ) from None
        try:
            layer = DecomposedConv3d.from_description(entry)
        except (KeyError, TypeError, ValueError, StjfdError) as exc:
            raise ConvertedModelError(f"manifest entry for {name!r} is invalid: {exc}", "re-run `stjfd convert`") from None
        if isinstance(original, nn.Conv3d) and (original.in_channels, original.out_channels) != (
            layer.in_channels,
            layer.out_channels,
        ):
            raise ConvertedModelError(
                f"manifest layer {name!r} has {layer.in_channels}→{layer.out_channels} channels but the model has "
                f"{original.in_channels}→{original.out_channels}",
                "the architecture changed since conversion; re-run `stjfd convert`",
            )
        replacements[id(original)] = layer
    return replace_modules(net, lambda _, module: replacements.get(id(module)))


def load_converted(
    directory: str | Path,
    *,
    trust_pickle: bool = False,
    trust_code: bool = False,
    model: str | None = None,
    device: str | torch.device = "cpu",
) -> ConvertedModel:
    """Rebuild a converted model from its folder (eval mode); outputs are bit-identical to the saved one.

    The folder is data: a builder its manifest names is imported and called only if it is torchvision's
    or stjfd's own, or with ``trust_code=True``, or when ``model`` (the user's ``--model``) names it again;
    a pickled architecture only with ``trust_pickle=True``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ConvertedModelError(f"{directory} has no {WEIGHTS_FILE}", "re-run `stjfd convert`")
    net = rebuild_skeleton(manifest, trust_pickle=trust_pickle, trust_code=trust_code, model=model, directory=directory)
    for name, entry in manifest["layers"].items():
        module = net.get_submodule(name)
        if isinstance(module, DecomposedConv3d):
            module.reconstruction_error = entry.get("rel_error")
    try:
        missing, unexpected = load_model(net, str(weights), strict=False, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ConvertedModelError(f"{weights} cannot be loaded: {exc}", "re-run `stjfd convert`") from None
    # num_batches_tracked may be absent in user models' state; anything else missing is an error.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ConvertedModelError(
            f"{weights} does not match the manifest: {len(missing)} missing, {len(unexpected)} unexpected tensors "
            f"(e.g. {', '.join((missing + unexpected)[:3])})",
            "re-run `stjfd convert`",
        )
    _check_finite(net, weights)
    return ConvertedModel(net.to(device).eval(), manifest, directory)


def _check_finite(net: nn.Module, weights: Path) -> None:
    """A NaN or Inf in the loaded weights would give NaN outputs and a meaningless plan, report or export."""
    for key, value in net.state_dict().items():
        if not value.is_floating_point() or value.device.type == "meta" or bool(torch.isfinite(value).all()):
            continue
        kinds = " and ".join(k for k, bad in (("NaN", torch.isnan(value).any()), ("Inf", torch.isinf(value).any())) if bad)
        raise ConvertedModelError(
            f"{weights.name}: {key} holds {kinds} (in {weights.parent})",
            "the folder is corrupt or its training diverged: reconvert the checkpoint with `stjfd convert` "
            "(or use an earlier checkpoint of the run)",
        )
