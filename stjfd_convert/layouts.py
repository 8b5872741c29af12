"""How a model takes a clip batch: its axis order (``--input-layout``) and element type (``--input-dtype``).

stjfd's own machinery (stage downsampling, sweeps, what-fits, ONNX dynamic axes) thinks in
``[B, C, T, H, W]``; a model may instead take ``[B, T, H, W, C]`` (frames, RGB last) or ``[B, T, C, H, W]``,
as ``float32`` (normalised) or raw ``uint8`` frames. This module names the layouts, converts shapes between
them, reads what a converted folder's manifest records (``input.layout``, ``input.dtype``), and provides
:class:`ClipLayoutHook`, which lets a model that takes another layout be driven with BCTHW clips.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from .errors import ConfigError
from .inputs import InputShape, map_pathways, normalize_input_shape

if TYPE_CHECKING:
    from torch import nn

#: Batched layouts a model can take; BCTHW is torchvision's and stjfd's own.
INPUT_LAYOUTS = ("BCTHW", "BTHWC", "BTCHW")
DEFAULT_LAYOUT = "BCTHW"
#: The per-clip layout the datasets produce for each batched layout (``data.ClipConfig.layout``).
CLIP_LAYOUTS = {"BCTHW": "CTHW", "BTHWC": "THWC", "BTCHW": "TCHW"}
INPUT_DTYPES = ("float32", "uint8")
#: ONNX metadata's names of the layouts (``stjfd.layout``; N for the batch, as ONNX writes it).
ONNX_LAYOUTS = {"BCTHW": "NCTHW", "BTHWC": "NTHWC", "BTCHW": "NTCHW"}

_LAYOUT_HINT = "use BCTHW (torchvision), BTHWC (frames, RGB last) or BTCHW"


def check_input_layout(value: str, flag: str = "--input-layout") -> str:
    """``value`` as a batched layout name (``BTHWC``); per-clip names (``THWC``) and ONNX's (``NTHWC``) are
    accepted too. Anything else is a ConfigError naming ``flag``."""
    text = str(value).strip().upper()
    if text in INPUT_LAYOUTS:
        return text
    for batched, clip in CLIP_LAYOUTS.items():
        if text in (clip, ONNX_LAYOUTS[batched]):
            return batched
    raise ConfigError(f"unknown {flag} {value!r}", _LAYOUT_HINT)


def check_input_dtype(value: str, flag: str = "--input-dtype") -> str:
    """``float32`` or ``uint8``; anything else is a ConfigError naming ``flag``."""
    text = str(value).strip().lower()
    if text not in INPUT_DTYPES:
        raise ConfigError(
            f"unknown {flag} {value!r}", "use float32 (normalised frames) or uint8 (raw 0-255 frames)"
        )
    return text


def check_given_format(layout: str | None, dtype: str | None) -> tuple[str | None, str | None]:
    """``--input-layout`` and ``--input-dtype`` checked (:func:`check_input_layout`, :func:`check_input_dtype`)
    where given; None stays None (not given: the caller falls back to what is recorded)."""
    return (
        check_input_layout(layout) if layout is not None else None,
        check_input_dtype(dtype) if dtype is not None else None,
    )


def clip_layout(layout: str) -> str:
    """The per-clip layout of a batched one: ``BTHWC`` → ``THWC``."""
    return CLIP_LAYOUTS[check_input_layout(layout)]


def _reorder(shape: InputShape, source: str, target: str) -> InputShape:
    """Every pathway of ``shape`` (axes in ``source`` order) with its axes in ``target`` order."""
    shape = normalize_input_shape(shape)
    if source == target:
        return shape
    _check_rank(shape, source)
    return map_pathways(shape, lambda one: tuple(one[source.index(letter)] for letter in target))


def to_bcthw(shape: InputShape, layout: str) -> InputShape:
    """A model-layout shape (every pathway) as ``(B, C, T, H, W)``."""
    return _reorder(shape, check_input_layout(layout), DEFAULT_LAYOUT)


def from_bcthw(shape: InputShape, layout: str) -> InputShape:
    """A ``(B, C, T, H, W)`` shape (every pathway) in the model's ``layout``."""
    return _reorder(shape, DEFAULT_LAYOUT, check_input_layout(layout))


def _check_rank(shape: InputShape, layout: str) -> None:
    from .inputs import format_input_shape, pathway_shapes

    if any(len(one) != 5 for one in pathway_shapes(shape)):
        raise ConfigError(
            f"--input-shape {format_input_shape(shape, ',')} must have 5 entries in the layout {','.join(layout)}",
            "e.g. --input-shape 1,16,112,112,3 with --input-layout BTHWC",
        )


def recorded_layout(manifest: Mapping[str, Any] | None) -> str | None:
    """The layout a converted folder's manifest records (``input.layout``), or None when it records none."""
    info = (manifest or {}).get("input") or {}
    value = info.get("layout") if isinstance(info, Mapping) else None
    if not value:
        return None
    return check_input_layout(str(value), "input.layout in the manifest")


def recorded_dtype(manifest: Mapping[str, Any] | None) -> str | None:
    """The input dtype a converted folder's manifest records (``input.dtype``), or None."""
    info = (manifest or {}).get("input") or {}
    value = info.get("dtype") if isinstance(info, Mapping) else None
    return check_input_dtype(str(value), "input.dtype in the manifest") if value else None


def resolve_input_format(
    manifest: Mapping[str, Any] | None, layout: str | None = None, dtype: str | None = None
) -> tuple[str, str]:
    """``(layout, dtype)``: each as given (checked), else as the manifest records, else BCTHW / float32."""
    layout = check_input_layout(layout) if layout is not None else (recorded_layout(manifest) or DEFAULT_LAYOUT)
    dtype = check_input_dtype(dtype) if dtype is not None else (recorded_dtype(manifest) or "float32")
    return layout, dtype


def folder_input(
    directory: Any, input_shape: InputShape | None, layout: str | None, dtype: str | None
) -> tuple[InputShape | None, str, str]:
    """For a converted folder: ``(shape in the model's layout, layout, dtype)`` from the options given, else
    from its manifest. A recorded shape is re-laid out when ``layout`` differs from the layout the manifest
    records; a manifest that records none has its shape taken as it is (convert records the shape it was
    given, in the model's own layout)."""
    from .inputs import recorded_input
    from .saved_model import read_manifest

    layout, dtype = check_given_format(layout, dtype)  # bad options first, then the folder
    manifest = read_manifest(directory)
    layout, dtype = resolve_input_format(manifest, layout, dtype)
    if input_shape is not None:
        return normalize_input_shape(input_shape), layout, dtype
    return relaid(recorded_input(manifest)[0], manifest, layout), layout, dtype


def relaid(shape: InputShape | None, manifest: Mapping[str, Any] | None, layout: str) -> InputShape | None:
    """A shape a manifest records, in ``layout``: permuted from the layout the manifest records, unchanged
    when it records none (the shape was given in the model's own layout)."""
    recorded = recorded_layout(manifest)
    if shape is None or recorded is None:
        return shape
    return from_bcthw(to_bcthw(shape, recorded), layout)


class ClipLayoutHook:
    """A forward pre-hook: the model is called with ``[B, C, T, H, W]`` clips (one tensor, or one per pathway)
    and receives them in its own ``layout`` (a permuted view) and, for ``uint8``, as raw frames.

    Float clips become uint8 as ``clamp(64·x + 128, 0, 255)``: noise around mid-grey, which is all the memory
    and timing measurements need. A class (not a closure) so that ``copy.deepcopy`` of the model keeps it.
    """

    def __init__(self, layout: str, dtype: str = "float32") -> None:
        self.layout, self.dtype = check_input_layout(layout), check_input_dtype(dtype)
        self.order = tuple(DEFAULT_LAYOUT.index(letter) for letter in self.layout)

    def _adapt(self, x: Any) -> Any:
        import torch

        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            return x
        x = x.permute(self.order)
        if self.dtype == "uint8" and x.dtype != torch.uint8:
            x = (x * 64 + 128).clamp(0, 255).to(torch.uint8)
        return x

    def __call__(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args:
            return None
        first = args[0]
        if isinstance(first, (list, tuple)):
            adapted: Any = type(first)(self._adapt(t) for t in first)
        else:
            adapted = self._adapt(first)
        return (adapted, *args[1:])


def hooked_input_dtype(model: nn.Module) -> str | None:
    """The dtype (``float32`` | ``uint8``) a :class:`ClipLayoutHook` on ``model`` hands it, or None without one."""
    for hook in getattr(model, "_forward_pre_hooks", {}).values():
        if isinstance(hook, ClipLayoutHook):
            return hook.dtype
    return None


def attach_layout_hook(model: nn.Module, layout: str, dtype: str = "float32") -> Any:
    """Register :class:`ClipLayoutHook` on ``model`` (returns its handle), or None when the model takes
    float BCTHW clips and needs none."""
    layout, dtype = check_input_layout(layout), check_input_dtype(dtype)
    if layout == DEFAULT_LAYOUT and dtype == "float32":
        return None
    return model.register_forward_pre_hook(ClipLayoutHook(layout, dtype))
