"""Atom swapping (``stjfd swap``): a decomposed layer's atoms dilated or resized, its coefficients kept.

The atoms Ψ [L, m_t] and Φ [Kh·Kw, m_s] are shared by every filter of a layer and stored apart from the
coefficients A [c_out, c_in/g, m_t, m_s], so they can be replaced by atoms of the same count but another
extent while A stays as trained (Miao et al. 2021, "atom swapping"):

- **temporal dilation ×d** changes the layer's geometry only: ``dilation[0] ×= d``. Every execution form
  (``functional/conv.py``), the ONNX export modules and the cost model read the dilation from the
  geometry, so all of them run the dilated temporal-atom conv and agree to float rounding. Since
  W[o,i,t,s] = Σ A Ψ[t,p] Φ[s,q] is linear in Ψ and a dilation acts on the tap axis alone, dilating the
  temporal atoms is *exactly* dilating the rebuilt dense kernel in time.
- **resizing** to n taps interpolates each atom (``functional/resample.py``: linear with aligned ends,
  taps scaled by L/n so the mean tap — a constant atom's response to a static clip — is kept; or
  ``normalization="energy"``: each atom keeps its L2 norm). The kernel size changes, A does not.

Padding: the output size must not change, so each changed axis's padding grows (or shrinks) by half the
change of the kernel's extent ``dilation·(k − 1)`` on each side — which keeps the kernel centred on the
same frame and the output length equal for any stride. ``padding='same'`` stays ``'same'``. A change
that is odd (e.g. a 2-tap kernel dilated ×2, or 3 taps resized to 4) would need asymmetric padding,
which a Conv3d cannot hold: that part of the swap is skipped for the layer, with the reason. So are
layers whose temporal kernel is 1 (nothing to dilate or interpolate), spatial kernels with a 1-tap axis,
sizes smaller than the number of atoms, and padding that would have to become negative.

The result is an ordinary converted model; :func:`swap_folder` writes it as an ordinary converted folder
whose manifest's ``swaps`` list records every swap applied to it (with the per-layer changes).
"""

from __future__ import annotations

import copy
import datetime as _dt
import fnmatch
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .atomic import check_output
from .config import SwapConfig
from .convert import replace_modules
from .errors import ConfigError, ModelError, SwapError
from .functional.conv import ConvGeometry
from .functional.resample import resample_spatial_atoms, resample_temporal_atoms
from .inputs import InputShape, format_input_shape, input_shape_to_json, make_model_input, recorded_input
from .layers import DecomposedConv3d
from .models import model_source_paths
from .parity import parse_dtype, run_model
from .saved_model import load_converted, save_converted

Padding = str | tuple[int, int, int]

# Manifest fields that build_manifest writes afresh; every other field of the source manifest is kept.
_REGENERATED = frozenset(
    {"format", "format_version", "architecture", "layers", "source", "input", "parameters", "versions", "command",
     "created", "conversion"}
)


@dataclass
class LayerSwap:
    """What a swap did to one decomposed layer: geometry before/after, applied parts, skipped parts.

    ``temporal_energy``/``spatial_energy``: ‖new atoms‖²/‖old atoms‖² (Frobenius), None when unchanged.
    """

    name: str
    kernel_before: tuple[int, int, int]
    kernel_after: tuple[int, int, int]
    dilation_before: tuple[int, int, int]
    dilation_after: tuple[int, int, int]
    padding_before: Padding
    padding_after: Padding
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    temporal_energy: float | None = None
    spatial_energy: float | None = None

    @property
    def swapped(self) -> bool:
        return bool(self.applied)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("kernel_before", "kernel_after", "dilation_before", "dilation_after", "padding_before",
                    "padding_after"):
            data[key] = data[key] if isinstance(data[key], str) else list(data[key])
        return data


@dataclass
class SwapReport:
    """Every decomposed layer the swap considered (selected by include/exclude), in module order."""

    config: SwapConfig
    layers: list[LayerSwap]
    notes: list[str] = field(default_factory=list)

    @property
    def swapped(self) -> list[LayerSwap]:
        return [layer for layer in self.layers if layer.swapped]

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(layer, reason)``: one per layer and part of the swap that did not apply."""
        return [(layer.name, reason) for layer in self.layers for reason in layer.skipped]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
            "swapped": len(self.swapped),
            "skipped": [{"layer": name, "reason": reason} for name, reason in self.skipped],
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------


def keep_output_padding(
    geometry: ConvGeometry, axis: int, kernel: int, dilation: int
) -> tuple[Padding | None, str | None]:
    """The padding that keeps ``geometry``'s output size along ``axis`` (0 = T, 1 = H, 2 = W) when that
    axis gets ``kernel`` taps at ``dilation``: ``(padding, None)``, or ``(None, reason)`` if no Conv3d
    padding can (odd change of extent, or negative padding)."""
    if geometry.padding == "same":
        return "same", None
    delta = dilation * (kernel - 1) - geometry.dilation[axis] * (geometry.kernel_size[axis] - 1)
    pads = [before for before, _ in geometry.pads]  # explicit int padding is symmetric ('valid' = 0)
    if delta % 2:
        return None, (
            f"keeping the output size would need asymmetric padding (the kernel's extent changes by {delta} "
            f"{'frame' if axis == 0 else 'pixel'}{'s' if abs(delta) != 1 else ''}, an odd number)"
        )
    pads[axis] += delta // 2
    if pads[axis] < 0:
        return None, f"keeping the output size would need negative padding ({pads[axis]})"
    return tuple(pads), None  # type: ignore[return-value]


def _temporal_change(
    layer: DecomposedConv3d, config: SwapConfig
) -> tuple[int, int, Padding | None, str | None]:
    """New (taps, dilation, padding) of the temporal axis, or a reason why the layer cannot take it."""
    g = layer.geometry
    length = g.temporal_taps
    taps = config.temporal_size if config.temporal_size is not None else length
    dilation = g.dilation[0] * (config.temporal_dilation or 1)
    if length == 1:
        return taps, dilation, None, "its temporal kernel is 1: there is no temporal atom to dilate or resize"
    if taps < layer.num_temporal_atoms:
        return taps, dilation, None, f"its {layer.num_temporal_atoms} temporal atoms do not fit in {taps} taps"
    padding, reason = keep_output_padding(g, 0, taps, dilation)
    return taps, dilation, padding, reason


def _spatial_change(
    layer: DecomposedConv3d, geometry: ConvGeometry, size: tuple[int, int]
) -> tuple[Padding | None, str | None]:
    """The padding for spatial atoms of ``size``, or a reason why the layer cannot take them."""
    kh, kw = geometry.kernel_size[1:]
    if 1 in (kh, kw):
        return None, f"its spatial kernel is {kh}×{kw}: a 1-tap axis has no shape to interpolate"
    if size[0] * size[1] < layer.num_spatial_atoms:
        return None, f"its {layer.num_spatial_atoms} spatial atoms do not fit in {size[0]}×{size[1]} taps"
    for axis, taps in ((1, size[0]), (2, size[1])):
        padding, reason = keep_output_padding(geometry, axis, taps, geometry.dilation[axis])
        if padding is None:
            return None, reason
        geometry = replace(geometry, padding=padding)
    return geometry.padding, None


def _energy(new: torch.Tensor, old: torch.Tensor) -> float:
    before = float(old.detach().double().square().sum())
    return float(new.detach().double().square().sum()) / before if before > 0 else float("nan")


def swap_layer(layer: DecomposedConv3d, config: SwapConfig, name: str = "") -> tuple[DecomposedConv3d, LayerSwap]:
    """A new layer with ``config``'s swaps applied to ``layer`` (left untouched), and what was done.

    Shapes: Ψ [L, m_t] → [n, m_t] (``temporal_size`` n), Φ [Kh·Kw, m_s] → [nh·nw, m_s] (``spatial_size``);
    A [c_out, c_in/g, m_t, m_s] and the bias are copied. Parts that do not apply to this layer are listed
    in ``LayerSwap.skipped`` and leave that part unchanged; the layer's stored execution plan is dropped
    when anything changed (its forms were chosen for the old atoms).
    """
    g = layer.geometry
    record = LayerSwap(name, g.kernel_size, g.kernel_size, g.dilation, g.dilation, g.padding, g.padding)
    geometry = g
    temporal, spatial = layer.temporal_atoms.detach(), layer.spatial_atoms.detach()
    if config.temporal:
        taps, dilation, padding, reason = _temporal_change(layer, config)
        if reason is not None:
            record.skipped.append(reason)
        else:
            geometry = replace(
                g, kernel_size=(taps, *g.kernel_size[1:]), padding=padding, dilation=(dilation, *g.dilation[1:])
            )
            temporal = resample_temporal_atoms(temporal, taps, config.normalization)
            record.temporal_energy = _energy(temporal, layer.temporal_atoms)
            if config.temporal_size is not None:
                record.applied.append(f"temporal atoms {g.temporal_taps} → {taps} taps")
            if config.temporal_dilation is not None:
                record.applied.append(f"temporal dilation {g.dilation[0]} → {dilation}")
    if config.spatial_size is not None:
        size = tuple(config.spatial_size)  # type: ignore[arg-type]
        padding, reason = _spatial_change(layer, geometry, size)  # type: ignore[arg-type]
        if reason is not None:
            record.skipped.append(reason)
        else:
            geometry = replace(geometry, kernel_size=(geometry.kernel_size[0], *size), padding=padding)
            spatial = resample_spatial_atoms(spatial, g.kernel_size[1:], size, config.normalization)
            record.spatial_energy = _energy(spatial, layer.spatial_atoms)
            record.applied.append(f"spatial atoms {g.kernel_size[1]}×{g.kernel_size[2]} → {size[0]}×{size[1]}")
    if not record.applied:
        return layer, record
    new = _rebuilt(layer, geometry, temporal, spatial)
    ng = new.geometry
    record.kernel_after, record.dilation_after, record.padding_after = ng.kernel_size, ng.dilation, ng.padding
    return new, record


def _rebuilt(
    layer: DecomposedConv3d, geometry: ConvGeometry, temporal: torch.Tensor, spatial: torch.Tensor
) -> DecomposedConv3d:
    """``layer``'s coefficients and bias with new geometry and atoms (same device, dtype, mode, flags)."""
    new = DecomposedConv3d.from_geometry(
        geometry,
        bias=layer.bias is not None,
        num_temporal_atoms=layer.num_temporal_atoms,
        num_spatial_atoms=layer.num_spatial_atoms,
        mode=layer.mode,
    ).to(device=layer.coefficients.device, dtype=layer.coefficients.dtype)
    pairs = [(new.temporal_atoms, temporal, layer.temporal_atoms), (new.spatial_atoms, spatial, layer.spatial_atoms),
             (new.coefficients, layer.coefficients, layer.coefficients)]
    if layer.bias is not None:
        pairs.append((new.bias, layer.bias, layer.bias))  # type: ignore[arg-type]
    with torch.no_grad():
        for target, value, old in pairs:
            target.copy_(value)
            target.requires_grad_(old.requires_grad)
    new.train(layer.training)
    return new


# --------------------------------------------------------------------------------------------
# A model
# --------------------------------------------------------------------------------------------


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def swap_atoms(model: nn.Module, config: SwapConfig) -> tuple[nn.Module, SwapReport]:
    """A copy of ``model`` with ``config``'s swaps applied to its decomposed layers (``model`` untouched).

    Raises :class:`ModelError` when the model has no DecomposedConv3d, :class:`ConfigError` when
    ``include`` selects none, and :class:`SwapError` when no selected layer could take any part of the swap
    (the first reasons are named). Layers that could not take a part are listed in ``report.skipped``.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, DecomposedConv3d)]
    if not layers:
        raise ModelError("the model has no decomposed layers to swap atoms in", "convert it first: stjfd convert")
    selected = [
        (name, layer) for name, layer in layers
        if (not config.include or _matches(name, config.include)) and not _matches(name, config.exclude)
    ]
    if not selected:
        examples = ", ".join(name for name, _ in layers[:3])
        raise ConfigError("--include/--exclude select no decomposed layer", f"decomposed layers look like: {examples}")
    work = copy.deepcopy(model)
    records: dict[str, LayerSwap] = {}
    chosen = {name for name, _ in selected}

    def build(name: str, module: nn.Module) -> nn.Module | None:
        if not isinstance(module, DecomposedConv3d) or name not in chosen:
            return None
        new, records[name] = swap_layer(module, config, name)
        return new if new is not module else None

    work = replace_modules(work, build)
    report = SwapReport(config, [records[name] for name, _ in selected if name in records])
    if not report.swapped:
        name, reason = report.skipped[0]
        count = len(report.layers)
        which = "the selected layer was" if count == 1 else f"all {count} selected layers were"
        raise SwapError(f"nothing was swapped: {which} skipped (first, {name}: {reason})",
                        "choose other sizes, or --include layers whose kernels allow the swap")
    return work, report


# --------------------------------------------------------------------------------------------
# A converted folder
# --------------------------------------------------------------------------------------------


@dataclass
class SwapResult:
    """What :func:`swap_folder` did: the report, where it read and wrote, the output shape it checked."""

    source: Path
    output: Path
    report: SwapReport
    input_shape: InputShape | None
    output_shape: tuple[int, ...] | None
    parameters_before: int
    parameters_after: int
    notes: list[str] = field(default_factory=list)
    model: nn.Module | None = None  # the swapped model (not serialised)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            **self.report.to_dict(),
            "input_shape": input_shape_to_json(self.input_shape),
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "notes": self.report.notes + self.notes,
        }


def _check_output_shape(
    before: nn.Module, after: nn.Module, shape: InputShape | None, dtype: str, container: str = "list"
) -> tuple[int, ...] | None:
    """Run both models on a clip of ``shape``: the swap must leave the output shape (and finiteness) alone."""
    if not shape:
        return None
    x = make_model_input(shape, parse_dtype(dtype), container=container)
    reference = run_model(before, x)
    clip = format_input_shape(shape)
    try:
        swapped = run_model(after, x)
    except ConfigError as exc:
        raise SwapError(
            f"the swapped model cannot run the recorded {clip} clip: {exc.message}",
            "reflect padding must stay smaller than the input: choose a smaller size, or --exclude that layer",
        ) from None
    if not isinstance(swapped, torch.Tensor) or not isinstance(reference, torch.Tensor):
        return None
    if swapped.shape != reference.shape or not torch.isfinite(swapped).all():
        raise SwapError(
            f"the swapped model gives output {tuple(swapped.shape)} (expected {tuple(reference.shape)}, finite) "
            f"on a {clip} clip",
            "report this with the command you ran",
        )
    return tuple(swapped.shape)


def _swap_record(source: Path, report: SwapReport, command: str | None) -> dict[str, Any]:
    return {
        **report.config.to_dict(),
        "from": str(source.resolve()),
        "command": command,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "layers": {layer.name: layer.to_dict() for layer in report.swapped},
        "skipped": [{"layer": name, "reason": reason} for name, reason in report.skipped],
    }


def swap_folder(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: SwapConfig,
    *,
    force: bool = False,
    trust_code: bool = False,
    trust_pickle: bool = False,
    model: str | None = None,
    command: str | None = None,
) -> SwapResult:
    """Swap atoms in the converted folder ``source`` (from convert, or a run's ``best/``/``last/``) and
    save the result as an ordinary converted folder ``output``.

    ``output`` is checked against the output-safety policy before any work (never ``source`` or a folder
    holding it; ``force`` replaces only a converted folder). The new manifest keeps the source's fields
    (fine-tuning classes and clip options, normalisation, conversion record) and appends this swap to
    ``swaps``; stored execution plans are dropped (measured for the old atoms: run ``stjfd plan`` again).
    """
    source = Path(source)
    inputs = [source, *model_source_paths(model)]
    target = check_output(output, "converted", force=force, inputs=inputs)
    loaded = load_converted(source, trust_code=trust_code, trust_pickle=trust_pickle, model=model)
    swapped, report = swap_atoms(loaded.model, config)
    manifest = loaded.manifest
    shape, dtype, container, strides = recorded_input(manifest)
    output_shape = _check_output_shape(loaded.model, swapped, shape, dtype, container)
    notes = []
    extra = {k: v for k, v in manifest.items() if k not in _REGENERATED and k != "plans"}
    if manifest.get("plans"):
        notes.append(
            f"the stored execution plans were measured for the old atoms and are dropped: run `stjfd plan {output}`"
        )
    extra["swaps"] = [*(manifest.get("swaps") or []), _swap_record(source, report, command)]
    old_source = manifest.get("source") or {}
    save_converted(
        swapped, target, loaded.spec, overwrite=force, inputs=inputs,
        source=old_source.get("path"), sha256=old_source.get("sha256"), input_shape=shape, input_dtype=dtype,
        input_container=container, pathway_strides=strides, command=command, conversion=manifest.get("conversion"),
        extra=extra,
    )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return SwapResult(
        source=source, output=Path(output), report=report, input_shape=shape,
        output_shape=output_shape, parameters_before=count(loaded.model), parameters_after=count(swapped),
        notes=notes, model=swapped,
    )
