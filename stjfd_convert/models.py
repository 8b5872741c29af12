"""Model registry and checkpoint loading.

Three ways to name an architecture (:class:`ArchSpec`): a torchvision video model (``r3d_18``), a
user callable (``mypkg.nets:build_net`` or ``path/to/file.py:build_net``), or a whole pickled
``nn.Module``. Checkpoints are read with ``weights_only=True`` first so that an untrusted file cannot
run code; every failure becomes a :class:`~stjfd_convert.errors.StjfdError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickletools
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import video as tv_video

from stjfd_convert.errors import (
    ArchitectureError,
    CheckpointError,
    ConfigError,
    ConvertedModelError,
    StateDictMismatchError,
)

__all__ = [
    "ArchInfo",
    "ArchSpec",
    "Detection",
    "LoadedModel",
    "TORCHVISION_VIDEO_ARCHS",
    "build_model",
    "check_finite",
    "detect_architecture",
    "infer_num_classes",
    "is_trusted_builder",
    "load_model",
    "load_state_dict_into",
    "model_source_paths",
    "parse_model_kwargs",
    "read_checkpoint",
    "sha256_file",
]

ARCH_KINDS = ("torchvision", "callable", "pickle")

# Keys that wrap the real state_dict in training checkpoints, in the order they are tried.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")

_MODEL_HINT = "check --model, format module.path:callable or path/to/file.py:callable"


# --------------------------------------------------------------------------------------------
# Specs and the torchvision registry
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------


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
        raise ArchitectureError(f"--model {full_name!r}: file {target} does not exist", hint=_MODEL_HINT)
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
            raise ArchitectureError(
                f"--model {full_name!r}: no module named {exc.name!r}",
                hint=f"{_MODEL_HINT}; the module must be importable from the current directory",
            ) from None
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


# --------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="check the path")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory",
            hint="pass the checkpoint file itself (a converted-model directory is read by the "
            "commands that take one, e.g. stjfd export, finetune, report or plan)",
        )
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except PermissionError:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: permission denied", hint="check the file's permissions"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    if size == 0:
        raise CheckpointError(
            f"checkpoint {path} is empty (0 bytes)",
            hint="the file was not written completely; save or copy it again",
        )


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    path = Path(path)
    _check_readable_file(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    # torch's messages are paragraphs; the first sentence is the useful part.
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if len(first) > limit:
        first = first[: limit - 1] + "…"
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _corrupt(path: Path, exc: BaseException | str) -> CheckpointError:
    reason = exc if isinstance(exc, str) else _short(exc)
    return CheckpointError(
        f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt?): {reason}",
        hint="re-download or re-save the checkpoint",
    )


def _looks_like_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _pickle_has_objects(path: Path) -> bool:
    """Whether the file's first pickle parses and imports globals, inspected without running it."""
    try:
        with path.open("rb") as f:
            for opcode, _arg, _pos in pickletools.genops(f):
                if opcode.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"):
                    return True
    except Exception:
        return False
    return False


def _is_unsafe_pickle_error(path: Path, exc: BaseException) -> tuple[bool, str | None]:
    text = str(exc)
    if "Weights only load failed" not in text:
        return False, None
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return True, match.group(1)
    if "Unsupported global" in text or "allowed global" in text:
        return True, None
    # "Unsupported operand" is also what random bytes give: look at the stream itself.
    return _pickle_has_objects(path), None


def _load_raw(path: Path, trust_pickle: bool) -> Any:
    if _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise _corrupt(path, exc) from None
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it was not written with; the error path covers it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, KeyboardInterrupt):
        raise
    except PermissionError:
        raise CheckpointError(
            f"checkpoint {path} cannot be read: permission denied", hint="check the file's permissions"
        ) from None
    except Exception as exc:
        unsafe, global_name = _is_unsafe_pickle_error(path, exc)
        if not unsafe:
            detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
            if detail:
                raise _corrupt(path, f"neither a zip archive nor a pickle ({detail.group(1).strip()})") from None
            raise _corrupt(path, exc) from None
        if not trust_pickle:
            what = f" ({global_name})" if global_name else ""
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects{what} that could run code when loaded",
                hint="if you trust its source, rerun with --trust-pickle",
            ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (MemoryError, KeyboardInterrupt):
        raise
    except ModuleNotFoundError as exc:
        raise CheckpointError(
            f"checkpoint {path} needs module {exc.name!r} to unpickle",
            hint="make that module importable, or save a state_dict instead of the whole model",
        ) from None
    except Exception as exc:
        raise _corrupt(path, exc) from None


def _unwrap_module(module: nn.Module) -> nn.Module:
    """Strip DataParallel/DDP and torch.compile wrappers from a whole pickled model."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
            continue
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
            continue
        return module


def _strip_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed and state_dict:
        changed = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def read_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, Tensor] | nn.Module:
    """Read a checkpoint file into a flat ``{key: tensor}`` state_dict, or a whole module.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. Files holding pickled Python objects are refused unless
    ``trust_pickle``. Training wrappers (``{"state_dict": ...}``, ``{"model": ...}``, …) are
    unwrapped and ``module.`` / ``_orig_mod.`` key prefixes stripped.
    """
    path = Path(path)
    _check_readable_file(path)
    obj = _load_raw(path, trust_pickle)

    while True:
        if isinstance(obj, nn.Module):
            return _unwrap_module(obj).eval()
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict or model",
                hint="save model.state_dict() with torch.save or safetensors",
            )
        inner = next(
            (obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], (Mapping, nn.Module))),
            None,
        )
        if inner is None:
            break
        obj = inner

    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(
            f"checkpoint {path} holds no tensors",
            hint="pass a checkpoint saved from model.state_dict() or the whole model",
        )
    return _strip_prefixes(tensors)


def check_finite(state_dict: Mapping[str, Tensor]) -> None:
    """Raise CheckpointError if any floating-point tensor holds NaN or Inf."""
    bad: list[tuple[str, int, int]] = []
    for key, value in state_dict.items():
        if not isinstance(value, Tensor) or not (value.is_floating_point() or value.is_complex()):
            continue
        if value.device.type == "meta":
            continue
        finite = torch.isfinite(value)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(value).sum())
        bad.append((key, nan, int((~finite).sum()) - nan))
    if not bad:
        return
    key, nan, inf = bad[0]
    counts = ", ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if part)
    more = f" (and {len(bad) - 1} more tensor{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    raise CheckpointError(
        f"weights are not finite: {key} has {counts}{more}",
        hint="the checkpoint is corrupt or training diverged; use an earlier checkpoint",
    )


# --------------------------------------------------------------------------------------------
# Architecture detection and state_dict loading
# --------------------------------------------------------------------------------------------


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


def _summarise(cmp: _Comparison) -> list[str]:
    parts = []
    if cmp.missing:
        parts.append(f"{_plural(len(cmp.missing), 'missing key')} ({_fmt_keys(cmp.missing)})")
    if cmp.unexpected:
        parts.append(f"{len(cmp.unexpected)} unexpected ({_fmt_keys(cmp.unexpected)})")
    if cmp.mismatched:
        shown = ", ".join(
            f"{k}: checkpoint {_fmt_shape(c)} vs model {_fmt_shape(m)}" for k, c, m in cmp.mismatched[:2]
        )
        more = ", …" if len(cmp.mismatched) > 2 else ""
        parts.append(f"{_plural(len(cmp.mismatched), 'shape mismatch', 'shape mismatches')} ({shown}{more})")
    return parts


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
        detail = "; ".join(_summarise(best))
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
    parts = _summarise(cmp)
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
    problems: list[str] = []
    if cmp.missing:
        problems.append(
            f"{_plural(len(cmp.missing), 'key')} missing from the checkpoint, left at initial values: "
            f"{_fmt_keys(cmp.missing)}"
        )
    if cmp.unexpected:
        problems.append(f"{_plural(len(cmp.unexpected), 'unexpected key')} ignored: {_fmt_keys(cmp.unexpected)}")
    if cmp.mismatched:
        shown = ", ".join(
            f"{k} (checkpoint {_fmt_shape(c)} vs model {_fmt_shape(m)})" for k, c, m in cmp.mismatched[:3]
        )
        more = ", …" if len(cmp.mismatched) > 3 else ""
        problems.append(f"{_plural(len(cmp.mismatched), 'mis-shaped key')} skipped: {shown}{more}")
    return problems


# --------------------------------------------------------------------------------------------
# The one entry point the CLI uses
# --------------------------------------------------------------------------------------------


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
