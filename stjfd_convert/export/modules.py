"""The export modules: each decomposed layer as a plain module holding only what its form stores,
and the choice of form per layer (``--mode``, a stored plan, the layers' own plan or the cost model)."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import replace_modules
from ..errors import ConfigError
from ..functional.conv import (
    ConvGeometry,
    pad_amounts,
    pad_mode,
    spatial_first_weight,
    temporal_first_weight,
)
from ..inputs import InputShape, format_input_shape, input_shape_to_json, normalize_input_shape
from ..layers import FORMS, DecomposedConv3d
from .base import EXPORT_MODES, ORT_DEVICE


class _DenseConv(nn.Module):
    """A plain conv with stored weight, the given stride/dilation and the padding of ``axes``
    (explicit ``F.pad`` where conv3d cannot pad: reflect/replicate/circular or asymmetric pads).
    The atom convs below are this conv over repeated atoms."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, geometry: ConvGeometry, axes: Sequence[int], groups: int
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.explicit, self.conv_pad, self.need_pad = pad_amounts(geometry, axes)
        self.mode = pad_mode(geometry)
        self.stride = tuple(geometry.stride[a] if a in axes else 1 for a in range(3))
        self.dilation = tuple(geometry.dilation[a] if a in axes else 1 for a in range(3))
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        if self.need_pad:
            x = F.pad(x, self.explicit, mode=self.mode)
        return F.conv3d(x, self.weight, self.bias, self.stride, self.conv_pad, self.dilation, self.groups)


class _AxisConv(_DenseConv):
    """Shared-weight (depthwise) atom conv along the temporal or the spatial axes.

    Input [B, C, T, H, W] → [B, C·m, T', H', W'] with channel c·m + j, the layout of
    ``functional.conv``. Traced as a plain grouped Conv over C copies of the atoms (a static kernel
    shape, whatever the dynamic axes); ``_share_tiled_weights`` then stores the atoms once.
    """

    def __init__(self, atoms_weight: Tensor, channels: int, geometry: ConvGeometry, temporal: bool) -> None:
        weight = atoms_weight.detach().repeat(channels, 1, 1, 1, 1)
        super().__init__(weight, None, geometry, (0,) if temporal else (1, 2), int(channels))


class _GroupSpatialConv(_DenseConv):
    """Sandwich's last step: a grouped (groups = O) spatial conv whose every group applies Φ.

    Traced over O copies of Φ; ``_share_tiled_weights`` stores Φ once (unless an eval-mode
    BatchNorm after it was fused into the conv, which scales each group differently).
    """

    def __init__(self, spatial_atoms: Tensor, bias: Tensor | None, geometry: ConvGeometry) -> None:
        m_s = spatial_atoms.shape[1]
        kh, kw = geometry.kernel_size[1:]
        block = spatial_atoms.detach().t().reshape(1, m_s, 1, kh, kw)
        weight = block.repeat(geometry.out_channels, 1, 1, 1, 1)
        super().__init__(weight, bias, geometry, (1, 2), geometry.out_channels)


def _skips_temporal(layer: DecomposedConv3d) -> bool:
    # Same rule as functional.conv: a 1-tap, unstrided, unpadded temporal atom is a scalar folded into A.
    g = layer.geometry
    return layer.temporal_atoms.shape == (1, 1) and g.stride[0] == 1 and g.pads[0] == (0, 0)


def _skips_spatial(layer: DecomposedConv3d) -> bool:
    g = layer.geometry
    return layer.spatial_atoms.shape == (1, 1) and g.stride[1:] == (1, 1) and g.pads[1:] == ((0, 0), (0, 0))


def export_module(layer: DecomposedConv3d, form: str) -> nn.Module:
    """An export-friendly module computing ``layer`` in ``form``, holding only what that form stores."""
    if form not in FORMS:
        raise ConfigError(f"unknown execution form {form!r}", f"use one of {', '.join(FORMS)}")
    if form == "fused":
        return layer.to_conv3d().eval()
    g = layer.geometry
    with torch.no_grad():
        coefficients = layer.coefficients.detach()
        temporal, spatial = layer.temporal_atoms.detach(), layer.spatial_atoms.detach()
        out_c, in_c, m_t, m_s = coefficients.shape
        length, kh, kw = g.kernel_size
        bias = None if layer.bias is None else layer.bias.detach()
        steps: list[nn.Module] = []
        skip_t, skip_s = _skips_temporal(layer), _skips_spatial(layer)
        temporal_conv = (
            None if skip_t else _AxisConv(temporal.t().reshape(m_t, 1, length, 1, 1), g.in_channels, g, temporal=True)
        )
        # Factorized runs Φ after Ψ (C·m_t channels); spatial_first runs it on the input (C channels).
        spatial_channels = g.in_channels * (m_t if form == "factorized" and not skip_t else 1)
        spatial_conv = (
            None if skip_s else _AxisConv(spatial.t().reshape(m_s, 1, 1, kh, kw), spatial_channels, g, temporal=False)
        )
        if skip_t:
            coefficients = coefficients * temporal[0, 0]
        if form == "factorized":
            if skip_s:
                coefficients = coefficients * spatial[0, 0]
            steps += [m for m in (temporal_conv, spatial_conv) if m is not None]
            weight = coefficients.reshape(out_c, in_c * m_t * m_s, 1, 1, 1)
            steps.append(_DenseConv(weight, bias, g, (), g.groups))
        elif form == "sandwich":
            if skip_s:
                coefficients = coefficients * spatial[0, 0]
            if temporal_conv is not None:
                steps.append(temporal_conv)
            weight = coefficients.permute(0, 3, 1, 2).reshape(out_c * m_s, in_c * m_t, 1, 1, 1)
            steps.append(_DenseConv(weight, None if not skip_s else bias, g, (), g.groups))
            if not skip_s:
                steps.append(_GroupSpatialConv(spatial, bias, g))
        elif form == "spatial_first":
            mixed = spatial_first_weight(coefficients, temporal if not skip_t else torch.ones_like(temporal))
            if skip_s:
                mixed = mixed * spatial[0, 0]
            elif spatial_conv is not None:
                steps.append(spatial_conv)
            steps.append(_DenseConv(mixed, bias, g, (0,), g.groups))
        else:  # temporal_first
            mixed = temporal_first_weight(coefficients, spatial, g.kernel_size)
            if temporal_conv is not None:
                steps.append(temporal_conv)
            steps.append(_DenseConv(mixed, bias, g, (1, 2), g.groups))
    return nn.Sequential(*steps).eval()


def _export_friendly(model: nn.Module, forms: Mapping[str, str]) -> nn.Module:
    """A copy of ``model`` with each DecomposedConv3d replaced by ``export_module(layer, forms[name])``."""
    work = copy.deepcopy(model)
    return replace_modules(
        work, lambda name, m: export_module(m, forms.get(name, "fused")) if isinstance(m, DecomposedConv3d) else None
    )


def _decomposed_layers(model: nn.Module) -> dict[str, DecomposedConv3d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DecomposedConv3d)}


def _stored_plan(manifest: Mapping[str, Any] | None, input_shape: InputShape) -> dict[str, Any] | None:
    """The manifest's float32 plan for this input shape: one measured in onnxruntime (the runtime
    the export is for) first, then CPU plans, measured ones before cost-model ones."""
    if not manifest:
        return None
    candidates = [
        p
        for p in manifest.get("plans") or []
        if isinstance(p, dict)
        and p.get("input_shape") == input_shape_to_json(input_shape)
        and p.get("device", "cpu") in (ORT_DEVICE, "cpu")
        and p.get("dtype", "float32") == "float32"
        and isinstance(p.get("forms"), dict)
    ]
    candidates.sort(key=lambda p: (p.get("device", "cpu") != ORT_DEVICE, not p.get("measured", False)))
    return candidates[0] if candidates else None


def resolve_forms(
    model: nn.Module,
    mode: str,
    input_shape: InputShape | Sequence[int],
    manifest: Mapping[str, Any] | None = None,
    container: str = "list",
    input_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, str], str]:
    """Set (in place) each DecomposedConv3d of ``model`` to a concrete form; returns the forms and their source.

    ``input_dtype`` is the model input's (``torch.uint8`` for raw frames): the layers' shapes are traced
    by running the model on such an input.

    ``auto``, first match wins: a plan stored in the manifest for ``input_shape`` in float32 (one
    measured in onnxruntime by :func:`plan_onnxruntime` first, then CPU plans, measured preferred);
    plans the layers hold for the shapes they see (``apply_plan(..., mode="auto")``, onnxruntime keys
    before CPU ones); the planner's cost model (``plan_model(measure=False)`` applied with
    ``apply_plan(..., mode="fixed")``).
    """
    if mode not in EXPORT_MODES:
        raise ConfigError(f"unknown --mode {mode!r}", f"use one of {', '.join(EXPORT_MODES)}")
    layers = _decomposed_layers(model)
    if not layers:
        return {}, "no decomposed layers"
    if mode != "auto":
        for layer in layers.values():
            layer.mode = mode
        return {name: mode for name in layers}, f"--mode {mode}"
    input_shape = normalize_input_shape(input_shape)
    stored = _stored_plan(manifest, input_shape)
    if stored is not None:
        forms = {name: stored["forms"].get(name, "fused") for name in layers}
        unknown = sorted({f for f in forms.values() if f not in FORMS})
        if unknown:
            raise ConfigError(f"the stored execution plan names unknown forms {unknown}", "re-run `stjfd plan`")
        for name, layer in layers.items():
            layer.mode = forms[name]
        if stored.get("device") == ORT_DEVICE:
            kind = "onnxruntime-measured"
        else:
            kind = "measured" if stored.get("measured") else "cost-model"
        return forms, f"stored {kind} plan for {format_input_shape(input_shape)}"
    from ..planner import apply_plan, layer_plan_key, plan_model, trace_layer_inputs

    # Plans held by the layers themselves (apply_plan(..., mode="auto") in memory), if they cover this input.
    shapes = trace_layer_inputs(model, input_shape, input_dtype, container=container)
    held = {
        name: layer.plan.get(layer_plan_key(shapes[name], ORT_DEVICE, torch.float32))
        or layer.plan.get(layer_plan_key(shapes[name], "cpu", torch.float32))
        for name, layer in layers.items()
        if name in shapes
    }
    if held and all(form in FORMS for form in held.values()):
        for name, form in held.items():
            layers[name].mode = form  # type: ignore[assignment]
        return _concrete_forms(layers), "the layers' own execution plan"

    plan = plan_model(model, input_shape, measure=False, container=container, input_dtype=input_dtype)
    apply_plan(model, plan, mode="fixed")
    return _concrete_forms(layers), "cost model (no stored plan for this shape)"


def _concrete_forms(layers: Mapping[str, DecomposedConv3d]) -> dict[str, str]:
    """Each layer's form; a layer the input never reaches (still ``auto``) is exported fused."""
    for layer in layers.values():
        if layer.mode not in FORMS:
            layer.mode = "fused"
    return {name: layer.mode for name, layer in layers.items()}
