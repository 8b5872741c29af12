"""Numerical parity between two models on one fixed input: every output tensor is compared."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .errors import MODEL_INPUT_ERRORS, ConfigError, first_line

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
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(dtype)
    high = 256 if dtype == torch.uint8 else 128
    return torch.randint(0, high, tuple(shape), generator=generator).to(dtype)


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
    input_shape: tuple[int, ...]
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


def run_model(model: nn.Module, x: Tensor) -> Any:
    """Forward in eval/no-grad; a failure becomes a ConfigError that points at --input-shape."""
    try:
        with torch.inference_mode():
            return model(x)
    except MODEL_INPUT_ERRORS as exc:
        first = first_line(exc)
        raise ConfigError(
            f"the model failed on an input of shape {tuple(x.shape)} ({x.dtype}): {first[:200]}",
            "pass the input the model expects with --input-shape (and --input-dtype)",
        ) from None


def compare_models(
    reference: nn.Module,
    candidate: nn.Module,
    input_shape: Sequence[int],
    input_dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
) -> ParityResult:
    """Run both models (eval mode) on one seeded input and compare every output tensor."""
    x = make_input(input_shape, input_dtype, seed=seed)
    was_training = (reference.training, candidate.training)
    reference.eval()
    candidate.eval()
    try:
        expected = flatten_outputs(run_model(reference, x))
        actual = flatten_outputs(run_model(candidate, x))
    finally:
        reference.train(was_training[0])
        candidate.train(was_training[1])
    result = ParityResult(tuple(input_shape), str(input_dtype).removeprefix("torch."))
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
