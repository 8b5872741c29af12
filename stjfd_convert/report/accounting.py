"""Per-layer accounting: parameters, bytes per dtype and MACs per clip, counted from the real modules.

Layer inputs are recorded with forward hooks on a meta-device copy; MACs come from
``functional/cost.py``'s ``form_cost`` for the form each layer runs. Also ``parse_bytes`` (sizes
such as ``8GiB``) and the dtype widths the report uses.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import MODEL_INPUT_ERRORS, ConfigError
from ..functional.conv import ConvGeometry
from ..functional.cost import form_cost
from ..inputs import InputShape, meta_input, normalize_input_shape, resize_input
from ..layers import FORMS, DecomposedConv3d
from ..parity import model_input_error

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
MIB = 2**20


_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kb": 10**3, "kib": 2**10,
    "m": 2**20, "mb": 10**6, "mib": 2**20,
    "g": 2**30, "gb": 10**9, "gib": 2**30,
    "t": 2**40, "tb": 10**12, "tib": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``"8GiB"`` → 8·2³⁰, ``"500MB"`` → 5·10⁸, ``"8G"`` → 8·2³⁰ (bare letters are binary)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConfigError(
                f"--memory-budget {text!r} is not a size", "e.g. --memory-budget 8GiB (units B, KB, MB, GB, KiB, MiB, GiB)"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"--memory-budget {text!r} must be positive", "e.g. --memory-budget 8GiB")
    return value


# --------------------------------------------------------------------------------------------
# Per-layer accounting
# --------------------------------------------------------------------------------------------


class ParamBytes:
    """Parameter bytes at each dtype width, for a dataclass with ``params_original``/``params_converted``."""

    params_original: int
    params_converted: int

    def bytes_original(self, dtype: str = "fp32") -> int:
        return self.params_original * DTYPE_BYTES[dtype]

    def bytes_converted(self, dtype: str = "fp32") -> int:
        return self.params_converted * DTYPE_BYTES[dtype]

    def bytes_by_dtype(self) -> dict[str, dict[str, int]]:
        """``bytes_original`` and ``bytes_converted`` at every width in :data:`DTYPE_BYTES` (for ``to_dict``)."""
        return {
            "bytes_original": {d: self.bytes_original(d) for d in DTYPE_BYTES},
            "bytes_converted": {d: self.bytes_converted(d) for d in DTYPE_BYTES},
        }


@dataclass
class LayerMemory(ParamBytes):
    """One Conv3d / DecomposedConv3d / Linear layer: original vs converted, per clip (batch 1).

    ``macs_by_form``: MACs of each execution form (``form_cost``; empty for non-decomposed layers).
    ``form``: the form the layer's ``mode`` runs at this input (``auto`` resolved).
    ``rebuild_macs``: rebuilding the dense weight (fused form), once per parameter change. ``output_bytes`` and
    ``intermediate_bytes`` are fp32 activation sizes (the latter of the layer's own form).
    """

    name: str
    kind: str  # "decomposed" | "conv3d" (left dense) | "linear"
    kernel_size: tuple[int, ...] | None
    in_channels: int
    out_channels: int
    atoms: tuple[int, int] | None
    mode: str | None
    form: str | None
    input_size: tuple[int, ...] | None  # (T, H, W) of the first call, per clip
    calls: int
    params_original: int
    params_converted: int
    macs_original: int
    macs_converted: int
    rebuild_macs: int = 0
    macs_by_form: dict[str, int] = field(default_factory=dict)
    output_bytes: int = 0
    intermediate_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | self.bytes_by_dtype()


@dataclass
class ModelTotals(ParamBytes):
    """Whole-model figures (parameters of every module, not only the layers listed)."""

    params_original: int
    params_converted: int
    macs_original: int
    macs_converted: int
    macs_by_form: dict[str, int]  # whole model with every decomposed layer in that form
    decomposed_layers: int
    conv_layers: int

    @property
    def param_ratio(self) -> float:
        return self.params_converted / self.params_original if self.params_original else 1.0

    @property
    def mac_ratio(self) -> float:
        return self.macs_converted / self.macs_original if self.macs_original else 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self) | self.bytes_by_dtype()
        data["param_ratio"] = self.param_ratio
        data["mac_ratio"] = self.mac_ratio
        return data


def _record_inputs(
    model: nn.Module, clip_shape: InputShape, container: str = "list"
) -> dict[int, list[tuple[tuple[int, ...], tuple[int, ...], str | None]]]:
    """(input shape, output shape, form) of every call of each Conv3d/DecomposedConv3d/Linear.

    Shapes come from a run on the meta device (no arithmetic); the form of a decomposed layer is
    resolved on the real layer (``auto`` depends on the real device and the input shape).
    """
    calls: dict[int, list[tuple[tuple[int, ...], tuple[int, ...], str | None]]] = {}
    work = copy.deepcopy(model).to("meta").eval()
    twins = {id(twin): module for module, twin in zip(model.modules(), work.modules())}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        real = twins[id(module)]
        form = None
        if isinstance(real, DecomposedConv3d):
            probe = real.coefficients
            form = real.form_for(torch.empty(inputs[0].shape, dtype=probe.dtype, device=probe.device))
        calls.setdefault(id(real), []).append((tuple(inputs[0].shape), tuple(output.shape), form))

    handles = [
        twin.register_forward_hook(hook)
        for twin in work.modules()
        if isinstance(twin, (nn.Conv3d, DecomposedConv3d, nn.Linear))
    ]
    x = meta_input(clip_shape, torch.float32, container)
    try:
        with torch.no_grad():
            work(x)
    except MODEL_INPUT_ERRORS as exc:
        raise model_input_error(exc, x) from None
    finally:
        for handle in handles:
            handle.remove()
    return calls


def rebuild_macs(layer: DecomposedConv3d) -> int:
    """MACs of ``reconstruct_weight``: (O·I·m_t × m_s)@(m_s × S), then (L × m_t)@(m_t × O·I·S)."""
    g = layer.geometry
    pairs = g.out_channels * g.in_per_group
    m_t, m_s = layer.num_temporal_atoms, layer.num_spatial_atoms
    return pairs * m_t * m_s * g.spatial_taps + g.temporal_taps * m_t * pairs * g.spatial_taps


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_table(
    converted: nn.Module, original: nn.Module, clip_shape: InputShape | Sequence[int], container: str = "list"
) -> tuple[list[LayerMemory], ModelTotals]:
    """Per-layer rows and totals for ``converted`` against ``original`` (same module names).

    ``clip_shape`` is [B, C, T, H, W] (or one per pathway); MACs and activation bytes are per clip (batch 1).
    """
    clip = resize_input(normalize_input_shape(clip_shape), batch=1)
    calls = _record_inputs(converted, clip, container)
    original_modules = dict(original.named_modules())
    rows: list[LayerMemory] = []
    form_macs = {form: 0 for form in FORMS}
    for name, module in converted.named_modules():
        if not isinstance(module, (nn.Conv3d, DecomposedConv3d, nn.Linear)):
            continue
        twin = original_modules.get(name)
        params_original = _numel(twin) if twin is not None else _numel(module)
        seen = calls.get(id(module), [])
        output_bytes = sum(_prod(o) for _, o, _ in seen) * 4
        if isinstance(module, nn.Linear):
            macs = sum(module.out_features * _prod(i) for i, _, _ in seen)
            rows.append(
                LayerMemory(
                    name, "linear", None, module.in_features, module.out_features, None, None, None,
                    None, len(seen), params_original, _numel(module), macs, macs, output_bytes=output_bytes,
                )
            )
            for form in FORMS:
                form_macs[form] += macs
            continue
        decomposed = isinstance(module, DecomposedConv3d)
        geometry = module.geometry if decomposed else ConvGeometry.from_conv(module)
        input_size = tuple(seen[0][0][2:]) if seen else None
        dense = sum(form_cost("dense", geometry, 1, 1, i[0], *i[2:]).macs for i, _, _ in seen)
        if not decomposed:
            for form in FORMS:
                form_macs[form] += dense
            rows.append(
                LayerMemory(
                    name, "conv3d", geometry.kernel_size, geometry.in_channels, geometry.out_channels, None, None,
                    None, input_size, len(seen), params_original, _numel(module), dense, dense,
                    output_bytes=output_bytes,
                )
            )
            continue
        m_t, m_s = module.num_temporal_atoms, module.num_spatial_atoms
        by_form = {form: 0 for form in FORMS}
        converted_macs = intermediate = 0
        for in_shape, _, used in seen:
            batch, _, t, h, w = in_shape
            for form in FORMS:
                cost = form_cost(form, geometry, m_t, m_s, batch, t, h, w)
                by_form[form] += cost.macs
                if form == used:
                    converted_macs += cost.macs
                    intermediate += cost.intermediate_elements
        for form in FORMS:
            form_macs[form] += by_form[form]
        forms_used = sorted({used for _, _, used in seen if used})
        rows.append(
            LayerMemory(
                name, "decomposed", geometry.kernel_size, geometry.in_channels, geometry.out_channels, (m_t, m_s),
                module.mode, "/".join(forms_used) or None, input_size, len(seen), params_original, _numel(module),
                dense, converted_macs, rebuild_macs(module), by_form, output_bytes, intermediate * 4,
            )
        )
    totals = ModelTotals(
        params_original=_numel(original),
        params_converted=_numel(converted),
        macs_original=sum(r.macs_original for r in rows),
        macs_converted=sum(r.macs_converted for r in rows),
        macs_by_form=form_macs,
        decomposed_layers=sum(1 for r in rows if r.kind == "decomposed"),
        conv_layers=sum(1 for r in rows if r.kind != "linear"),
    )
    return rows, totals


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out

