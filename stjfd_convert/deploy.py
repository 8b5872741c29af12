"""A converted model as plain modules, for deployment: no plan lookups, no caches, nothing stjfd-specific.

:func:`deploy` replaces every :class:`~stjfd_convert.layers.DecomposedConv3d` by what its execution form
computes — an ``nn.Conv3d`` (the fused weight) where fused runs, a small ``nn.Sequential`` of convolutions
(atom convs, then the coefficient conv) where a factorised form runs — the same modules ``stjfd export``
traces. The result has the converted model's outputs (to float rounding), holds no trainable parameters,
and can be scripted, compiled or captured in a CUDA graph like any dense model.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .convert import decomposed_layers
from .errors import ConfigError
from .export.modules import _export_friendly, resolve_forms
from .inputs import InputShape
from .layers import FORMS


def deploy(
    model: nn.Module,
    plan: Any = None,
    *,
    input_shape: InputShape | Sequence[int] | None = None,
    container: str = "list",
    input_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A copy of ``model`` (converted) whose decomposed layers are plain modules; ``model`` is untouched.

    The form of each layer comes from, first match wins: ``plan`` (an :class:`~stjfd_convert.planner.
    ExecutionPlan` or a ``{layer name: form}`` mapping); with ``input_shape`` [B, C, T, H, W] (or one per
    pathway), the layer's own fixed mode, or for ``auto`` its stored plan for that shape, else the cost
    model (as ``stjfd export --mode auto`` chooses); without either, fixed modes, and fused for ``auto``
    layers (whose choice depends on the input they will see). ``input_dtype``: the model input's
    (``torch.uint8`` for a model fed raw frames), used to trace ``input_shape``. Returned in eval mode.
    """
    work = copy.deepcopy(model).eval()
    layers = dict(decomposed_layers(work))
    if plan is not None:
        forms = dict(plan.modes if hasattr(plan, "modes") else plan)
        unknown = sorted(set(forms) - set(layers))
        if unknown:
            raise ConfigError(f"the plan names layers the model does not have: {', '.join(unknown[:3])}",
                              "pass the plan made for this model")
        bad = sorted({form for form in forms.values() if form not in FORMS})
        if bad:
            raise ConfigError(f"unknown execution forms in the plan: {', '.join(bad)}", f"use {', '.join(FORMS)}")
    elif input_shape is not None:
        fixed = {name: layer.mode for name, layer in layers.items() if layer.mode != "auto"}
        forms, _ = resolve_forms(work, "auto", input_shape, None, container, input_dtype=input_dtype)
        forms.update(fixed)
    else:
        forms = {name: ("fused" if layer.mode == "auto" else layer.mode) for name, layer in layers.items()}
    deployed = _export_friendly(work, _complete(forms, layers))
    for parameter in deployed.parameters():
        parameter.requires_grad_(False)
    return deployed.eval()


def _complete(forms: Mapping[str, str], layers: Mapping[str, Any]) -> dict[str, str]:
    """Every decomposed layer gets a form; those the plan does not name run fused."""
    return {name: forms.get(name, "fused") for name in layers}
