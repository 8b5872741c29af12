"""Building an architecture from its spec: torchvision builders by name, user callables by import."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import io
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stjfd_convert.errors import (
    ArchitectureError,
)

from .registry import TORCHVISION_VIDEO_ARCHS, ArchSpec, _known_archs

_MODEL_HINT = "check --model, format module.path:callable or path/to/file.py:callable"


@contextlib.contextmanager
def _isolated_call() -> Iterator[io.StringIO]:
    """Run user code without touching global RNG state or our stdout/stderr (``--json`` output)."""
    # Forking CUDA RNG state would initialise CUDA; only do it where CUDA is already in use.
    devices: list[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = list(range(torch.cuda.device_count()))
    buffer = io.StringIO()
    with torch.random.fork_rng(devices=devices), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(
        buffer
    ):
        yield buffer


@contextlib.contextmanager
def _sys_path_prepended(directory: str) -> Iterator[None]:
    """Make ``directory`` importable while user code is imported and called (like uvicorn's app dir)."""
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(directory)


def _split_callable_name(name: str) -> tuple[str, str]:
    target, sep, attr = name.rpartition(":")
    if not sep or not target or not attr:
        raise ArchitectureError(f"--model {name!r} does not name a callable", hint=_MODEL_HINT)
    return target, attr


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def model_source_paths(model: str | None) -> list[Path]:
    """The file a ``--model path/to/file.py:callable`` names (an input no output may replace)."""
    if not model:
        return []
    target = model.rpartition(":")[0]
    return [Path(target).expanduser()] if target and _is_file_target(target) else []


def _import_file(target: str, full_name: str) -> Any:
    path = Path(target).expanduser()
    if not path.is_file():
        error = ArchitectureError(f"--model {full_name!r}: file {target} does not exist", hint=_MODEL_HINT)
        error.missing = f"file {target}"  # type: ignore[attr-defined]  # read by saved_model for a manifest's builder
        raise error
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"_stjfd_user_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ArchitectureError(f"--model {full_name!r}: cannot import {target} as Python", hint=_MODEL_HINT)
    module = importlib.util.module_from_spec(spec)
    # Registered before running so that dataclasses and pickling inside the file can find it.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _import_target(target: str, full_name: str) -> Any:
    try:
        if _is_file_target(target):
            return _import_file(target, full_name)
        return importlib.import_module(target)
    except ArchitectureError:
        raise
    except ModuleNotFoundError as exc:
        if not _is_file_target(target) and exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            error = ArchitectureError(
                f"--model {full_name!r}: no module named {exc.name!r}",
                hint=f"{_MODEL_HINT}; the module must be importable from the current directory",
            )
            error.missing = f"module {exc.name!r}"  # type: ignore[attr-defined]  # see saved_model.rebuild_skeleton
            raise error from None
        raise ArchitectureError(
            f"importing {target} for --model failed: ModuleNotFoundError: {exc}",
            hint="install the package it needs, or fix its imports",
        ) from None
    except (Exception, SystemExit) as exc:
        raise ArchitectureError(
            f"importing {target} for --model failed: {type(exc).__name__}: {exc}",
            hint="fix the error in that module",
        ) from None


def _resolve_callable(name: str) -> Callable[..., Any]:
    target, attr = _split_callable_name(name)
    with _sys_path_prepended(os.getcwd()), _isolated_call():
        module = _import_target(target, name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(
                n
                for n, v in vars(module).items()
                if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
            )[:8]
            listing = f"; callables there: {', '.join(public)}" if public else ""
            raise ArchitectureError(
                f"--model {name!r}: {target} has no attribute {attr!r}", hint=f"{_MODEL_HINT}{listing}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ArchitectureError(
            f"--model {name!r}: {attr} is a {type(obj).__name__}, not a callable", hint=_MODEL_HINT
        )
    return obj


def _build_with_output(spec: ArchSpec) -> tuple[nn.Module, str]:
    """Build ``spec`` and return the model (eval mode) with whatever the builder printed."""
    kwargs = dict(spec.kwargs)
    if spec.kind == "pickle":
        raise ArchitectureError(
            f"{spec.name} was loaded from a pickled model and cannot be rebuilt from its name",
            hint="load it from the original checkpoint with --trust-pickle, or use --arch/--model",
        )
    if spec.kind == "torchvision":
        info = TORCHVISION_VIDEO_ARCHS.get(spec.name)
        if info is None:
            raise ArchitectureError(
                f"unknown torchvision video architecture {spec.name!r}", hint=f"known: {_known_archs()}"
            )
        if "weights" in kwargs:
            raise ArchitectureError(
                "'weights' cannot be passed as a model keyword: stjfd never downloads weights",
                hint="pass a checkpoint file instead",
            )
        builder: Callable[..., Any] = functools.partial(info.builder, weights=None)
        call_text = f"{spec.name}(**{kwargs!r})"
        hint = "check --model-kwargs against the torchvision builder's arguments"
    else:
        builder = _resolve_callable(spec.name)
        call_text = f"{spec.name}(**{kwargs!r})"
        hint = "fix the constructor or --model-kwargs"
    with _sys_path_prepended(os.getcwd()), _isolated_call() as captured:
        try:
            model = builder(**kwargs)
        except (Exception, SystemExit) as exc:
            raise ArchitectureError(
                f"building {call_text} failed: {type(exc).__name__}: {exc}", hint=hint
            ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"{call_text} returned {type(model).__name__}, not a torch.nn.Module",
            hint="the callable must return the model instance",
        )
    return model.eval(), captured.getvalue()


def build_model(spec: ArchSpec) -> nn.Module:
    """Build the architecture named by ``spec`` with fresh (random) weights, in eval mode.

    torchvision models are built with ``weights=None`` (nothing is downloaded). User callables
    run with global RNG state preserved and their stdout/stderr swallowed.
    """
    return _build_with_output(spec)[0]
