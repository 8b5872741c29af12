"""Training-stage mechanics of the paper's alternating schedule (DESIGN.md §3), shared by ``report``
and ``finetune``.

- ``joint``: every parameter trains on full-size clips.
- ``temporal``: frames spatially downsampled by ``s``; the spatial atoms Φ are frozen, so only the
  temporal atoms Ψ, the coefficients A and every non-decomposed parameter (BN, classifier, 1×1×1
  convs) train.
- ``spatial``: clips temporally downsampled by ``r``; the temporal atoms Ψ are frozen.

Activation checkpointing (recompute each residual block in backward) is orthogonal and combines
with every stage.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .inputs import InputShape, is_multi, map_pathways
from .layers import DecomposedConv3d

STAGES = ("joint", "temporal", "spatial")

# The atoms a stage leaves frozen.
_FROZEN_ATOMS = {"joint": None, "temporal": "spatial_atoms", "spatial": "temporal_atoms"}


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ConfigError(f"unknown training stage {stage!r}", f"use one of {', '.join(STAGES)}")
    return stage


def set_trainable(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for ``stage`` (in place) and return the parameters that train.

    Every parameter is first made trainable, then the stage's frozen atoms of every
    ``DecomposedConv3d`` are switched off. Pass only the returned list to the optimizer: frozen
    atoms then get neither gradients nor optimizer state. A model without ``DecomposedConv3d``
    trains everything in every stage.
    """
    frozen_name = _FROZEN_ATOMS[check_stage(stage)]
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    if frozen_name is not None:
        for module in model.modules():
            if isinstance(module, DecomposedConv3d):
                getattr(module, frozen_name).requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def stage_clip_shape(
    shape: InputShape | Sequence[int], stage: str, spatial_downsample: int = 2, temporal_downsample: int = 2
) -> InputShape:
    """The clip a stage trains on: [B, C, T, H/s, W/s] (temporal), [B, C, T/r, H, W] (spatial).

    Sizes are floored and kept ≥ 1; ``joint`` returns ``shape`` unchanged. A multi-pathway input has
    every pathway downsampled alike.
    """
    if is_multi(shape):
        return map_pathways(
            shape, lambda one: stage_clip_shape(one, stage, spatial_downsample, temporal_downsample)  # type: ignore[arg-type,return-value]
        )
    check_stage(stage)
    shape = tuple(int(v) for v in shape)  # type: ignore[union-attr]
    if len(shape) != 5 or any(v <= 0 for v in shape):
        raise ConfigError(f"clip shape {shape} is not [B, C, T, H, W] with positive sizes", "e.g. 1,3,16,112,112")
    if spatial_downsample < 1 or temporal_downsample < 1:
        raise ConfigError(
            f"downsampling factors must be ≥ 1 (got s={spatial_downsample}, r={temporal_downsample})",
            "e.g. --spatial-downsample 2 --temporal-downsample 2",
        )
    batch, channels, frames, height, width = shape
    if stage == "temporal":
        return (batch, channels, frames, max(1, height // spatial_downsample), max(1, width // spatial_downsample))
    if stage == "spatial":
        # Every r-th frame, as data.downsample_clip takes it: ceil(T / r) frames.
        return (batch, channels, -(-frames // temporal_downsample), height, width)
    return shape


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------


class _RestoreNormStatistics:
    """Recompute context: undo the second running-statistics update of the block's BatchNorms.

    A checkpointed block runs its forward twice in training (forward, then recompute in backward);
    without this the BN running mean/var would move twice per step.
    """

    def __init__(self, block: nn.Module) -> None:
        self.norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        self.saved: list[dict[str, torch.Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [
            {name: buffer.clone() for name, buffer in norm.named_buffers(recurse=False) if buffer is not None}
            for norm in self.norms
        ]

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for norm, buffers in zip(self.norms, self.saved):
                for name, value in buffers.items():
                    getattr(norm, name).copy_(value)
        self.saved = []


class CheckpointedForward:
    """Replaces a module's ``forward`` (instance attribute) so that it runs under
    ``torch.utils.checkpoint`` (non-reentrant). Parameter names and the state_dict are unchanged."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def _contexts(self) -> tuple[contextlib.AbstractContextManager[Any], _RestoreNormStatistics]:
        return contextlib.nullcontext(), _RestoreNormStatistics(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        forward = type(self.module).forward.__get__(self.module)
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=self._contexts, **kwargs)


def _is_block(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith("Block") or name.endswith("Bottleneck")


def checkpoint_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that ``enable_activation_checkpointing`` wraps, outermost only.

    Residual blocks (class name ending in ``Block``/``Bottleneck``: torchvision's VideoResNet
    BasicBlock/Bottleneck); without any, the children of the model's top-level ``nn.Sequential``
    stages; failing that, when the model itself is an ``nn.Sequential``, its children that hold
    parameters.
    """
    blocks: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}.{name}" if prefix else name
            if _is_block(child):
                blocks.append((qualified, child))
            else:
                visit(qualified, child)

    visit("", model)
    if blocks:
        return blocks
    stages: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            stages += [(f"{name}.{sub}", block) for sub, block in child.named_children()]
    if not stages and isinstance(model, nn.Sequential):
        stages = [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]
    return stages


def _iter_wrapped(model: nn.Module) -> Iterator[nn.Module]:
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), CheckpointedForward):
            yield module


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each residual block's activations in backward instead of keeping them (in place).

    Only the block inputs stay saved; outputs, gradients and BN running statistics are unchanged.
    Returns how many modules are checkpointed (calling it twice wraps nothing twice).
    """
    for _, module in checkpoint_candidates(model):
        if not isinstance(module.__dict__.get("forward"), CheckpointedForward):
            module.forward = CheckpointedForward(module)  # type: ignore[method-assign]
    return sum(1 for _ in _iter_wrapped(model))


def disable_activation_checkpointing(model: nn.Module) -> int:
    """Undo ``enable_activation_checkpointing``; returns how many modules were unwrapped."""
    wrapped = list(_iter_wrapped(model))
    for module in wrapped:
        del module.forward
    return len(wrapped)


# --------------------------------------------------------------------------------------------
# Stage-safe pooling: fixed-kernel pools on downsampled clips
# --------------------------------------------------------------------------------------------

_FIXED_POOLS = (nn.AvgPool3d, nn.MaxPool3d)


class StageSafePool:
    """Replaces a fixed-kernel pool's ``forward`` (instance attribute): when the kernel would exceed the
    padded input along an axis — a head's global ``AvgPool3d(T, H/32, W/32)`` fed a stage's downsampled
    clip — that axis is pooled over the whole input (kernel clipped to it, padding to half the kernel), as
    an adaptive pool would. Inputs the kernel fits (every full-resolution clip) run the pool unchanged,
    so evaluation, BN re-estimation and export see the original layer. ``adapted`` records the pools that
    were clipped, by name."""

    def __init__(self, module: nn.Module, name: str, adapted: set[str]) -> None:
        self.module, self.name, self.adapted = module, name, adapted

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        forward = type(module).forward.__get__(module)
        kernel = _triple(module.kernel_size)
        padding = _triple(module.padding)
        dilation = _triple(getattr(module, "dilation", 1))
        sizes = tuple(x.shape[-3:])
        span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
        if all(s <= n + 2 * p for s, n, p in zip(span, sizes, padding)):
            return forward(x)
        new_kernel = tuple(k if s <= n + 2 * p else n for k, s, n, p in zip(kernel, span, sizes, padding))
        new_padding = tuple(p if k == nk else 0 for k, nk, p in zip(kernel, new_kernel, padding))
        new_dilation = tuple(d if k == nk else 1 for k, nk, d in zip(kernel, new_kernel, dilation))
        saved = (module.kernel_size, module.padding, getattr(module, "dilation", None))
        self.adapted.add(self.name)
        try:
            module.kernel_size, module.padding = new_kernel, new_padding
            if isinstance(module, nn.MaxPool3d):
                module.dilation = new_dilation
            return forward(x)
        finally:
            module.kernel_size, module.padding = saved[0], saved[1]
            if isinstance(module, nn.MaxPool3d):
                module.dilation = saved[2]


def _triple(value: Any) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * 3  # type: ignore[return-value]


def enable_stage_safe_pooling(model: nn.Module) -> set[str]:
    """Wrap every ``AvgPool3d``/``MaxPool3d`` of ``model`` in :class:`StageSafePool` (in place, idempotent).

    Returns the set the wrappers fill with the names of pools they had to clip; read it after a stage.
    """
    adapted: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _FIXED_POOLS):
            current = module.__dict__.get("forward")
            if isinstance(current, StageSafePool):
                adapted = current.adapted
    for name, module in model.named_modules():
        if isinstance(module, _FIXED_POOLS) and not isinstance(module.__dict__.get("forward"), StageSafePool):
            module.forward = StageSafePool(module, name, adapted)  # type: ignore[method-assign]
    return adapted


def disable_stage_safe_pooling(model: nn.Module) -> int:
    """Undo :func:`enable_stage_safe_pooling`; returns how many pools were unwrapped."""
    wrapped = [m for m in model.modules() if isinstance(m.__dict__.get("forward"), StageSafePool)]
    for module in wrapped:
        del module.forward
    return len(wrapped)
