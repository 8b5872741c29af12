"""Detecting a torchvision architecture from a state_dict, and loading a state_dict into a model."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stjfd_convert.errors import (
    ArchitectureError,
    ConfigError,
    StateDictMismatchError,
)

from .checkpoints import _short
from .registry import TORCHVISION_VIDEO_ARCHS, _known_archs


def _ignored_key(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _shape_signature(state_dict: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items() if not _ignored_key(k) and hasattr(v, "shape")}


@functools.lru_cache(maxsize=64)
def _meta_signature(arch: str, num_classes: int | None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Key → shape of ``arch`` built on the meta device (no memory, no RNG use)."""
    info = TORCHVISION_VIDEO_ARCHS[arch]
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.device("meta"):
        model = info.builder(weights=None, **kwargs)
    return tuple(_shape_signature(model.state_dict()).items())


def infer_num_classes(arch: str, state_dict: Mapping[str, Any]) -> int | None:
    """Number of classes from the classifier weight of a torchvision arch, if the key is present."""
    info = TORCHVISION_VIDEO_ARCHS.get(arch)
    if info is None:
        raise ConfigError(f"unknown --arch {arch!r}", hint=f"known: {_known_archs()}")
    weight = state_dict.get(info.classifier_key)
    if weight is None or not hasattr(weight, "shape") or len(weight.shape) < 1:
        return None
    return int(weight.shape[0])


@dataclass(frozen=True)
class Detection:
    """Result of :func:`detect_architecture`."""

    arch: str
    kwargs: dict[str, Any]
    candidates: list[tuple[str, float]]  # (name, share of keys matching in name and shape), best first
    note: str  # e.g. "detected r3d_18 (num_classes=10) from 101/101 state_dict keys"


@dataclass(frozen=True)
class _Comparison:
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, checkpoint, model
    matched: int
    total: int

    @property
    def score(self) -> float:
        return self.matched / self.total if self.total else 0.0

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def _compare(checkpoint: Mapping[str, tuple[int, ...]], model: Mapping[str, tuple[int, ...]]) -> _Comparison:
    missing = [k for k in model if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in model]
    mismatched = [(k, checkpoint[k], model[k]) for k in model if k in checkpoint and checkpoint[k] != model[k]]
    both = len(model) - len(missing)
    return _Comparison(
        missing, unexpected, mismatched, both - len(mismatched), len(model) + len(unexpected)
    )


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def _fmt_keys(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (", …" if len(keys) > limit else "")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _describe(cmp: _Comparison, *, loading: bool = False) -> list[str]:
    """One phrase per kind of difference: short for a detection summary, with consequences when ``loading``."""
    parts = []
    if cmp.missing:
        keys = _fmt_keys(cmp.missing)
        count = _plural(len(cmp.missing), "key" if loading else "missing key")
        parts.append(
            f"{count} missing from the checkpoint, left at initial values: {keys}" if loading else f"{count} ({keys})"
        )
    if cmp.unexpected:
        keys = _fmt_keys(cmp.unexpected)
        parts.append(
            f"{_plural(len(cmp.unexpected), 'unexpected key')} ignored: {keys}"
            if loading
            else f"{len(cmp.unexpected)} unexpected ({keys})"
        )
    if cmp.mismatched:
        if loading:
            shown = _fmt_mismatches(cmp, 3, "{key} (checkpoint {checkpoint} vs model {model})")
            parts.append(f"{_plural(len(cmp.mismatched), 'mis-shaped key')} skipped: {shown}")
        else:
            shown = _fmt_mismatches(cmp, 2, "{key}: checkpoint {checkpoint} vs model {model}")
            parts.append(f"{_plural(len(cmp.mismatched), 'shape mismatch', 'shape mismatches')} ({shown})")
    return parts


def _fmt_mismatches(cmp: _Comparison, limit: int, template: str) -> str:
    """The first ``limit`` mis-shaped keys, each written with ``template`` ({key}, {checkpoint}, {model})."""
    shown = ", ".join(
        template.format(key=k, checkpoint=_fmt_shape(c), model=_fmt_shape(m)) for k, c, m in cmp.mismatched[:limit]
    )
    return shown + (", …" if len(cmp.mismatched) > limit else "")


def detect_architecture(state_dict: Mapping[str, Any]) -> Detection:
    """Find the torchvision video architecture whose keys and shapes match ``state_dict`` exactly.

    ``num_classes`` is read from the classifier weight. Raises ArchitectureError when no
    architecture, or more than one, matches exactly.
    """
    signature = _shape_signature(state_dict)
    results: list[tuple[str, int | None, _Comparison]] = []
    for name in TORCHVISION_VIDEO_ARCHS:
        num_classes = infer_num_classes(name, state_dict)
        results.append((name, num_classes, _compare(signature, dict(_meta_signature(name, num_classes)))))
    results.sort(key=lambda r: r[2].score, reverse=True)
    candidates = [(name, cmp.score) for name, _n, cmp in results]
    exact = [(name, n, cmp) for name, n, cmp in results if cmp.exact]

    if len(exact) > 1:
        raise ArchitectureError(
            f"state_dict matches several architectures exactly: {', '.join(n for n, _, _ in exact)}",
            hint="pass --arch to choose",
        )
    if not exact:
        top = ", ".join(f"{name} {score:.0%}" for name, score in candidates[:3])
        best_name, _n, best = results[0]
        detail = "; ".join(_describe(best))
        raise ArchitectureError(
            f"cannot detect the architecture: no torchvision video model matches the checkpoint's "
            f"{len(signature)} keys (closest: {top}; {best_name}: {detail})",
            hint="pass --arch NAME or --model module:callable",
        )
    name, num_classes, cmp = exact[0]
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    classes = f" (num_classes={num_classes})" if num_classes is not None else ""
    note = f"detected {name}{classes} from {cmp.matched}/{cmp.total} state_dict keys"
    return Detection(arch=name, kwargs=kwargs, candidates=candidates, note=note)


def load_state_dict_into(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    name: str | None = None,
) -> list[str]:
    """Load ``state_dict`` into ``model`` after checking keys and shapes.

    ``strict``: any missing, unexpected or mis-shaped key raises StateDictMismatchError (a missing
    ``num_batches_tracked`` is fine). Otherwise whatever matches is loaded and the problems are
    returned as warning strings. ``name`` labels the architecture in messages.
    """
    label = name or type(model).__name__
    model_sd = model.state_dict()
    cmp = _compare(_shape_signature(state_dict), _shape_signature(model_sd))
    parts = _describe(cmp)
    if parts and strict:
        raise StateDictMismatchError(
            f"checkpoint does not match {label}: {', '.join(parts)}",
            hint="pick the right --arch/--model or pass --non-strict",
        )
    bad = {k for k, _c, _m in cmp.mismatched}
    to_load = {k: v for k, v in state_dict.items() if k in model_sd and k not in bad}
    try:
        model.load_state_dict(to_load, strict=False)
    except RuntimeError as exc:
        raise StateDictMismatchError(
            f"checkpoint does not load into {label}: {_short(exc)}",
            hint="pick the right --arch/--model",
        ) from None
    return _describe(cmp, loading=True)
