"""Reading checkpoint files: state_dicts (``weights_only``), safetensors, pickled modules on request."""

from __future__ import annotations

import hashlib
import os
import pickletools
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stjfd_convert.errors import (
    CheckpointError,
)

# Keys that wrap the real state_dict in training checkpoints, in the order they are tried.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")


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
