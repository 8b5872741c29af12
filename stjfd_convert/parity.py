"""Numerical parity between two models on one fixed input: every output tensor is compared."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .errors import MODEL_INPUT_ERRORS, ConfigError, first_line
from .inputs import InputShape, fresh, input_tensors, make_model_input, normalize_input_shape

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
}


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,3,16,112,112"`` → (1, 3, 16, 112, 112); every entry must be a positive int."""
    if not isinstance(text, str):
        values = tuple(int(v) for v in text)
    else:
        try:
            values = tuple(int(part) for part in re.split(r"[,x×]", text.strip()))
        except ValueError:
            raise ConfigError(
                f"--input-shape {text!r} is not a list of integers", "e.g. --input-shape 1,3,16,112,112"
            ) from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"--input-shape {text!r} must be positive integers", "e.g. --input-shape 1,3,16,112,112")
    return values


def parse_dtype(name: str) -> torch.dtype:
    """``"uint8"`` → torch.uint8 (names listed in ``DTYPES``)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"--input-dtype {name!r} is not supported", f"use one of {', '.join(DTYPES)}") from None


def make_input(shape: Sequence[int], dtype: torch.dtype = torch.float32, *, seed: int = 0) -> Tensor:
    """A reproducible clip: N(0,1) for float dtypes, uniform 0..255 (or the dtype's range) for ints."""
    return make_model_input(tuple(int(v) for v in shape), dtype, seed=seed)  # type: ignore[return-value]


def flatten_outputs(output: Any, prefix: str = "output") -> list[tuple[str, Tensor]]:
    """Every tensor in a (nested) tensor / tuple / list / dict output, with a readable path."""
    if isinstance(output, Tensor):
        return [(prefix, output)]
    if isinstance(output, dict):
        items: list[tuple[str, Tensor]] = []
        for key, value in output.items():
            items += flatten_outputs(value, f"{prefix}[{key!r}]")
        return items
    if isinstance(output, (tuple, list)):
        items = []
        for index, value in enumerate(output):
            items += flatten_outputs(value, f"{prefix}[{index}]")
        return items
    return []


@dataclass
class OutputDiff:
    """Difference of one output tensor: max |a−b| and ‖a−b‖/‖a‖."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_l2: float


@dataclass
class ParityResult:
    input_shape: InputShape  # one clip's shape, or one per pathway
    input_dtype: str
    outputs: list[OutputDiff] = field(default_factory=list)
    top1_agree: int | None = None  # clips whose argmax agrees (classifier-like outputs only)
    top1_total: int | None = None

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def rel_l2(self) -> float:
        return max((o.rel_l2 for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["max_abs"] = self.max_abs
        data["rel_l2"] = self.rel_l2
        return data


def describe_input(x: Any) -> str:
    """``1×3×16×112×112 float32`` for a tensor; pathways joined by `` + `` for a list/tuple input."""
    tensors = input_tensors(x)
    shapes = " + ".join("×".join(map(str, t.shape)) for t in tensors)
    return f"{shapes} {str(tensors[0].dtype).removeprefix('torch.')}" if tensors else "an empty input"


# A forward keeps its input and several activations at least as large alive at once: an input needing more
# than this share of the available memory cannot be run, and trying would only thrash or be killed.
INPUT_MEMORY_SHARE = 1 / 4
_SMALLER_SHAPE = "pass a smaller --input-shape (batch 1 and the clip the model takes, e.g. 1,3,16,112,112)"


def available_memory() -> int | None:
    """Bytes of memory still available to allocate here (``MemAvailable`` on Linux), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_input_memory(shape: Any, dtype: torch.dtype = torch.float32) -> None:
    """Refuse (before allocating it) an input that leaves no room to run a model on it: ``--input-shape
    64,3,64,448,448`` is 9.8 GB of float32 before the first activation."""
    shapes = tuple(shape) if shape and isinstance(shape[0], (tuple, list)) else (tuple(shape),)  # one per pathway
    numel = 0
    for one in shapes:
        n = 1
        for v in one:
            n *= int(v)
        numel += n
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = numel * (4 + (itemsize if dtype != torch.float32 else 0))  # drawn in float32, then cast
    available = available_memory()
    if available is None or needed <= available * INPUT_MEMORY_SHARE:
        return
    text = "+".join(",".join(map(str, one)) for one in shapes)
    raise ConfigError(
        f"--input-shape {text}: the input alone takes {needed / 2**30:.1f} GiB and running a model on it several "
        f"times that, but {available / 2**30:.1f} GiB of memory is available",
        _SMALLER_SHAPE,
    )


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def model_input_error(exc: BaseException, x: Any) -> ConfigError:
    """The one line for a model that fails on the input it was given (every model-running path uses it)."""
    first = first_line(exc)
    if _out_of_memory(exc):
        return ConfigError(f"the model ran out of memory on an input of {describe_input(x)}", _SMALLER_SHAPE)
    hint = "pass the input the model expects with --input-shape (and --input-dtype)"
    if not isinstance(x, (list, tuple)):
        hint += "; a model with several inputs takes one shape per pathway, e.g. 1,3,8,224,224+1,3,32,224,224"
    else:
        hint += "; a model that takes one clip takes one shape (a repeated --input-shape means several pathways)"
    return ConfigError(f"the model failed on an input of {describe_input(x)}: {first[:200]}", hint)


def run_model(model: nn.Module, x: Any) -> Any:
    """Forward in eval/no-grad on a fresh input container; a failure becomes a ConfigError that points at
    --input-shape."""
    try:
        with torch.inference_mode():
            return model(fresh(x))
    except MODEL_INPUT_ERRORS as exc:
        raise model_input_error(exc, x) from None


def compare_models(
    reference: nn.Module,
    candidate: nn.Module,
    input_shape: InputShape | Sequence[int],
    input_dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    container: str = "list",
) -> ParityResult:
    """Run both models (eval mode) on one seeded input and compare every output tensor.

    ``input_shape``: one clip's shape, or one per pathway (fed as a ``container``; see :mod:`inputs`).
    """
    input_shape = normalize_input_shape(input_shape)
    check_input_memory(input_shape, input_dtype)
    x = make_model_input(input_shape, input_dtype, seed=seed, container=container)
    was_training = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        expected = flatten_outputs(run_model(reference, x))
        actual = flatten_outputs(run_model(candidate, x))
    finally:
        reference.train(was_training[0])
        candidate.train(was_training[1])
    result = ParityResult(input_shape, str(input_dtype).removeprefix("torch."))
    for (name, a), (_, b) in zip(expected, actual):
        a64, b64 = a.detach().double(), b.detach().double()
        diff = (a64 - b64).abs()
        norm = float(a64.norm())
        result.outputs.append(
            OutputDiff(
                name,
                tuple(a.shape),
                float(diff.max()) if diff.numel() else 0.0,
                float((a64 - b64).norm()) / norm if norm > 0 else float(diff.norm()),
            )
        )
        if result.top1_total is None and a.dim() == 2 and a.shape[1] > 1 and a.is_floating_point():
            result.top1_agree = int((a.argmax(1) == b.argmax(1)).sum())
            result.top1_total = a.shape[0]
    return result
