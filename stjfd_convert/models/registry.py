"""Architecture specs (:class:`ArchSpec`) and the registry of torchvision video models."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchvision.models import video as tv_video

from stjfd_convert.errors import (
    ArchitectureError,
    ConfigError,
    ConvertedModelError,
)

ARCH_KINDS = ("torchvision", "callable", "pickle")



def _json_copy(value: Any, what: str) -> Any:
    """A deep copy of ``value`` through JSON; raises ConfigError if it is not JSON-serialisable."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{what} must be JSON-serialisable (it is recorded in the manifest): {exc}",
            hint='use plain numbers, strings, lists and objects, e.g. {"num_classes": 10}',
        ) from None


@dataclass(frozen=True)
class ArchSpec:
    """How to rebuild a model's architecture; recorded in the converted model's manifest.

    ``kind`` is ``"torchvision"`` (``name`` is a key of :data:`TORCHVISION_VIDEO_ARCHS`),
    ``"callable"`` (``name`` is ``module.path:attr`` or ``path/to/file.py:attr``) or ``"pickle"``
    (``name`` is the qualified class name of a whole pickled module; it cannot be rebuilt).
    ``kwargs`` are passed to the builder and are kept as a plain, JSON-serialisable dict.
    """

    kind: str
    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in ARCH_KINDS:
            raise ArchitectureError(
                f"unknown architecture kind {self.kind!r}",
                hint=f"expected one of: {', '.join(ARCH_KINDS)}",
            )
        if not isinstance(self.name, str) or not self.name:
            raise ArchitectureError("architecture name must be a non-empty string")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise ArchitectureError("architecture kwargs must be a mapping with string keys")
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict ``{"kind", "name", "kwargs"}``."""
        return {"kind": self.kind, "name": self.name, "kwargs": copy.deepcopy(dict(self.kwargs))}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArchSpec:
        """Inverse of :meth:`to_dict`; raises ConvertedModelError on a malformed dict."""
        hint = "the manifest was edited or is damaged; re-run the conversion"
        if not isinstance(d, Mapping):
            raise ConvertedModelError(
                f"architecture spec must be an object, got {type(d).__name__}", hint=hint
            )
        missing = [k for k in ("kind", "name") if k not in d]
        if missing:
            raise ConvertedModelError(
                f"architecture spec lacks {', '.join(missing)}", hint=hint
            )
        kind, name, kwargs = d["kind"], d["name"], d.get("kwargs", {})
        if not isinstance(kind, str) or not isinstance(name, str):
            raise ConvertedModelError("architecture spec kind and name must be strings", hint=hint)
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise ConvertedModelError(
                f"architecture spec kwargs must be an object, got {type(kwargs).__name__}", hint=hint
            )
        return cls(kind=kind, name=name, kwargs=dict(kwargs))

    def loader_options(
        self, model_kwargs: Mapping[str, Any] | None = None
    ) -> tuple[str | None, str | None, dict[str, Any] | None]:
        """``(arch, model, model_kwargs)`` that load a checkpoint of this architecture with ``load_model``
        (``model_kwargs`` given win over the recorded ones); a pickled architecture gives no builder."""
        kwargs = dict(model_kwargs) if model_kwargs else (dict(self.kwargs) if self.kwargs else None)
        if self.kind == "torchvision":
            return self.name, None, kwargs
        if self.kind == "callable":
            return None, self.name, kwargs
        return None, None, dict(model_kwargs) if model_kwargs else None

    def describe(self) -> str:
        """Short human form, e.g. ``r3d_18(num_classes=10)``."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"


@dataclass(frozen=True)
class ArchInfo:
    """Registry entry for a torchvision video model."""

    name: str
    builder: Callable[..., nn.Module]
    classifier_key: str  # state_dict key of the classifier weight; shape[0] == num_classes
    input_shape: tuple[int, ...]  # default (N, C, T, H, W) for parity checks and benchmarks
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
_KINETICS_STD = (0.22803, 0.22145, 0.216989)
_MVIT_MEAN = (0.45, 0.45, 0.45)
_MVIT_STD = (0.225, 0.225, 0.225)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# Mean/std are those of each model's torchvision weights' ``transforms()``; every model here has
# nn.Conv3d layers (the transformers only in their patch embedding) and runs on ``input_shape``.
TORCHVISION_VIDEO_ARCHS: dict[str, ArchInfo] = {
    info.name: info
    for info in (
        ArchInfo("r3d_18", tv_video.r3d_18, "fc.weight", (1, 3, 16, 112, 112), _KINETICS_MEAN, _KINETICS_STD),
        ArchInfo("mc3_18", tv_video.mc3_18, "fc.weight", (1, 3, 16, 112, 112), _KINETICS_MEAN, _KINETICS_STD),
        ArchInfo(
            "r2plus1d_18", tv_video.r2plus1d_18, "fc.weight", (1, 3, 16, 112, 112), _KINETICS_MEAN, _KINETICS_STD
        ),
        ArchInfo("s3d", tv_video.s3d, "classifier.1.weight", (1, 3, 16, 224, 224), _KINETICS_MEAN, _KINETICS_STD),
        ArchInfo("mvit_v1_b", tv_video.mvit_v1_b, "head.1.weight", (1, 3, 16, 224, 224), _MVIT_MEAN, _MVIT_STD),
        ArchInfo("mvit_v2_s", tv_video.mvit_v2_s, "head.1.weight", (1, 3, 16, 224, 224), _MVIT_MEAN, _MVIT_STD),
        ArchInfo("swin3d_t", tv_video.swin3d_t, "head.weight", (1, 3, 16, 224, 224), _IMAGENET_MEAN, _IMAGENET_STD),
        ArchInfo("swin3d_s", tv_video.swin3d_s, "head.weight", (1, 3, 16, 224, 224), _IMAGENET_MEAN, _IMAGENET_STD),
        ArchInfo("swin3d_b", tv_video.swin3d_b, "head.weight", (1, 3, 16, 224, 224), _IMAGENET_MEAN, _IMAGENET_STD),
    )
}


# ``callable`` builders that a saved manifest may name and that load without --trust-code: stjfd's
# own. torchvision models are ``torchvision`` specs, built from the registry above by name; any other
# callable is user code.
TRUSTED_BUILDERS = frozenset({"stjfd_convert.sample:build_sample_net"})


def is_trusted_builder(name: str) -> bool:
    """True if the ``module:callable`` ``name`` may be called on a manifest's word alone."""
    return name in TRUSTED_BUILDERS


def _known_archs() -> str:
    return ", ".join(TORCHVISION_VIDEO_ARCHS)


def default_input_shape(spec: ArchSpec) -> tuple[int, ...] | None:
    """Known input shape for torchvision archs; None for user models."""
    if spec.kind == "torchvision" and spec.name in TORCHVISION_VIDEO_ARCHS:
        return tuple(TORCHVISION_VIDEO_ARCHS[spec.name].input_shape)
    return None
