"""``load_model``: the one entry point the CLI uses to turn a checkpoint into a model."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from stjfd_convert.errors import (
    ArchitectureError,
    ConfigError,
)

from .builders import _build_with_output, _is_file_target, _split_callable_name
from .checkpoints import check_finite, read_checkpoint, sha256_file
from .detect import (
    _plural,
    detect_architecture,
    infer_num_classes,
    load_state_dict_into,
)
from .registry import TORCHVISION_VIDEO_ARCHS, ArchSpec, _json_copy, _known_archs


@dataclass
class LoadedModel:
    """A model ready for conversion, with how to rebuild it and where its weights came from."""

    model: nn.Module
    spec: ArchSpec
    source: Path | None
    sha256: str | None
    notes: list[str] = field(default_factory=list)


def parse_model_kwargs(text: str | None) -> dict[str, Any]:
    """Parse ``--model-kwargs`` (a JSON object) into a dict; empty/None gives ``{}``."""
    hint = 'pass a JSON object, e.g. --model-kwargs \'{"num_classes": 10}\''
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"--model-kwargs is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})", hint=hint
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {type(value).__name__}", hint=hint)
    return value


def _printed_note(spec: ArchSpec, printed: str) -> list[str]:
    lines = [line for line in printed.splitlines() if line.strip()]
    if not lines:
        return []
    first = lines[0].strip()
    if len(first) > 80:
        first = first[:79] + "…"
    return [f"{spec.name} printed {_plural(len(lines), 'line')} while building (hidden): {first!r}"]


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    arch: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
) -> LoadedModel:
    """Build a model and load a checkpoint into it.

    ``arch`` names a torchvision video model, ``model`` a user callable (``module:attr`` or
    ``file.py:attr``); with neither, the architecture is detected from the checkpoint. ``path``
    may be None only with ``arch``/``model`` (a freshly initialised model). A checkpoint holding a
    whole pickled model (``trust_pickle``) is used as is unless ``arch``/``model`` is given.

    One function because the branches share their checks and messages: which loader was used decides
    the hint every later error gives, and splitting it repeated that bookkeeping in each part.
    """
    if arch is not None and model is not None:
        raise ConfigError("--arch and --model cannot be used together", hint="pass only one of them")
    if arch is not None and arch not in TORCHVISION_VIDEO_ARCHS:
        raise ConfigError(
            f"unknown --arch {arch!r}",
            hint=f"known: {_known_archs()}; for other models use --model module:callable",
        )
    if model is not None:
        target, attr = _split_callable_name(model)
        if _is_file_target(target):
            # Record an absolute path so the saved model reloads from any working directory.
            model = f"{Path(target).expanduser().absolute()}:{attr}"
    user_kwargs: dict[str, Any] = _json_copy(dict(model_kwargs or {}), "--model-kwargs")
    if not all(isinstance(k, str) for k in user_kwargs):
        raise ConfigError("--model-kwargs keys must be strings")
    notes: list[str] = []

    if path is None:
        if arch is None and model is None:
            raise ConfigError(
                "no checkpoint given",
                hint="pass a checkpoint file, or --arch NAME / --model module:callable for a "
                "freshly initialised model",
            )
        spec = ArchSpec("torchvision" if arch else "callable", arch or model or "", user_kwargs)
        built, printed = _build_with_output(spec)
        notes += _printed_note(spec, printed)
        notes.append(f"no checkpoint: {spec.describe()} has freshly initialised weights")
        return LoadedModel(built, spec, None, None, notes)

    source = Path(path)
    loaded = read_checkpoint(source, trust_pickle=trust_pickle)
    digest = sha256_file(source)

    if isinstance(loaded, nn.Module):
        state_dict = loaded.state_dict()
        check_finite(state_dict)
        if arch is None and model is None:
            try:
                detection = detect_architecture(state_dict)
            except ArchitectureError:
                cls = type(loaded)
                spec = ArchSpec("pickle", f"{cls.__module__}.{cls.__qualname__}", {})
                notes.append(f"loaded a whole pickled {cls.__qualname__} model from {source.name}")
                return LoadedModel(loaded.eval(), spec, source, digest, notes)
            # A torchvision model saved whole: record it by name so that it can be rebuilt.
            arch = detection.arch
            user_kwargs = {**detection.kwargs, **user_kwargs}
            notes.append(detection.note + " (checkpoint held the whole pickled model)")
    else:
        state_dict = loaded
        check_finite(state_dict)

    if arch is not None:
        kwargs = dict(user_kwargs)
        if "num_classes" not in kwargs:
            num_classes = infer_num_classes(arch, state_dict)
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
        spec = ArchSpec("torchvision", arch, kwargs)
    elif model is not None:
        spec = ArchSpec("callable", model, user_kwargs)
    else:
        detection = detect_architecture(state_dict)
        spec = ArchSpec("torchvision", detection.arch, {**detection.kwargs, **user_kwargs})
        notes.append(detection.note)

    built, printed = _build_with_output(spec)
    notes += _printed_note(spec, printed)
    notes += load_state_dict_into(built, state_dict, strict=strict, name=spec.name)
    return LoadedModel(built.eval(), spec, source, digest, notes)
