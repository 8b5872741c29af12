"""Loading what to export (a converted folder, a checkpoint or a module) and its input normalisation."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from ..errors import ConfigError
from ..inputs import InputShape, recorded_input
from ..models import TORCHVISION_VIDEO_ARCHS, ArchSpec, load_model
from ..saved_model import is_converted_dir, load_converted


@dataclass
class _Source:
    model: nn.Module
    description: str
    spec: ArchSpec | None
    manifest: dict[str, Any] | None
    input_shape: InputShape | None
    directory: Path | None = None  # a converted folder (where a measured plan is stored)
    container: str = "list"  # how a multi-pathway input is passed (the manifest records it)
    pathway_strides: tuple[int, ...] | None = None  # how predict derives the pathways from one clip


def _load_source(
    model_or_dir: nn.Module | str | os.PathLike[str],
    *,
    arch: str | None,
    model: str | None,
    model_kwargs: Mapping[str, Any] | None,
    trust_pickle: bool,
    trust_code: bool = False,
) -> _Source:
    if isinstance(model_or_dir, nn.Module):
        return _Source(model_or_dir, type(model_or_dir).__name__, None, None, None)
    path = Path(model_or_dir)
    if path.is_dir() or is_converted_dir(path):
        if arch is not None:
            raise ConfigError(
                f"{path} is a converted-model folder; --arch is for checkpoints",
                "drop --arch (the folder's manifest names its architecture)",
            )
        converted = load_converted(path, trust_pickle=trust_pickle, trust_code=trust_code, model=model)
        shape, _, container, strides = recorded_input(converted.manifest)
        spec = converted.spec
        if shape is None:
            from ..models import default_input_shape

            shape = default_input_shape(spec)
        return _Source(converted.model, str(path), spec, converted.manifest, shape, path, container, strides)
    loaded = load_model(path, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle)
    from ..models import default_input_shape

    return _Source(loaded.model.eval(), str(path), loaded.spec, None, default_input_shape(loaded.spec))


def _normalization(
    spec: ArchSpec | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    manifest: Mapping[str, Any] | None = None,
    channels: int | None = None,
) -> dict[str, list[float]] | None:
    """--mean/--std, else what the model was fine-tuned with (manifest), else the arch's known stats.
    Given values must be finite, std > 0, one per input channel (``channels``, when known)."""
    if (mean is None) != (std is None):
        raise ConfigError("give both --mean and --std, or neither", "e.g. --mean 0.43,0.39,0.38 --std 0.23,0.22,0.22")
    if mean is not None and std is not None:
        example = "e.g. --mean 0.45,0.45,0.45 --std 0.225,0.225,0.225"
        if channels is not None and (len(mean) != channels or len(std) != channels):
            raise ConfigError(
                f"--mean has {len(mean)} value{'s' if len(mean) != 1 else ''} and --std {len(std)}, but the model's "
                f"input has {channels} channels",
                f"give one value per input channel ({channels}), {example}",
            )
        if len(mean) != len(std) or not mean:
            raise ConfigError(f"--mean has {len(mean)} and --std {len(std)} values", f"give one value per channel, {example}")
        if not all(math.isfinite(v) for v in (*mean, *std)) or any(s <= 0 for s in std):
            raise ConfigError(
                f"--mean {','.join(map(str, mean))} --std {','.join(map(str, std))}: every value must be finite and "
                "every std > 0", example,
            )
        return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    recorded = (manifest or {}).get("normalization")
    if isinstance(recorded, Mapping) and recorded.get("mean") and recorded.get("std"):
        return {"mean": [float(m) for m in recorded["mean"]], "std": [float(s) for s in recorded["std"]]}
    if spec is not None and spec.kind == "torchvision" and spec.name in TORCHVISION_VIDEO_ARCHS:
        info = TORCHVISION_VIDEO_ARCHS[spec.name]
        return {"mean": list(info.mean), "std": list(info.std)}
    return None
