"""What a model is fed: one clip [B, C, T, H, W], or one clip per pathway (SlowFast's ``[slow, fast]``).

An *input shape* is either one shape ``(B, C, T, H, W)`` or a tuple of them, one per pathway, fed to the
model as a list (``container="list"``, PyTorchVideo's convention) or a tuple. The CLI writes several shapes
as ``1,3,8,224,224+1,3,32,224,224`` (or repeats ``--input-shape``). Every forward gets a fresh container:
PyTorchVideo's multipathway models assign into the list they are given.

``pathway_strides`` derive the pathways from one decoded clip: pathway i takes every ``strides[i]``-th
frame, so SlowFast (α = 4, slow pathway first) is ``(4, 1)``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where tensors are made, so the CLI can read shapes without it
    import torch
    from torch import Tensor

Shape = tuple[int, ...]
InputShape = Union[Shape, tuple[Shape, ...]]
CONTAINERS = ("list", "tuple")

_SHAPE_HINT = "e.g. --input-shape 1,3,16,112,112, or 1,3,8,224,224+1,3,32,224,224 for a two-pathway model"


def is_multi(shape: Any) -> bool:
    """True for one shape per pathway (a sequence of sequences)."""
    return bool(shape) and isinstance(shape[0], (tuple, list))


def pathway_shapes(shape: InputShape) -> tuple[Shape, ...]:
    """Every pathway's shape; a single clip is one pathway."""
    if is_multi(shape):
        return tuple(tuple(int(v) for v in s) for s in shape)  # type: ignore[union-attr]
    return (tuple(int(v) for v in shape),)  # type: ignore[arg-type]


def normalize_input_shape(shape: Any) -> InputShape:
    """Lists (from JSON) → tuples; one pathway given as a nested sequence stays multi."""
    if is_multi(shape):
        return tuple(tuple(int(v) for v in s) for s in shape)
    return tuple(int(v) for v in shape)


def _parse_one(text: str, whole: str) -> Shape:
    try:
        values = tuple(int(part) for part in re.split(r"[,x×]", text.strip()))
    except ValueError:
        raise ConfigError(f"--input-shape {whole!r} is not a list of integers", _SHAPE_HINT) from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"--input-shape {whole!r} must be positive integers", _SHAPE_HINT)
    return values


def parse_input_shape(text: str | Sequence[str] | Sequence[int]) -> InputShape:
    """``"1,3,16,112,112"`` → one shape; ``"a+b"`` (or a list of such strings, a repeated flag) → one per pathway."""
    if not isinstance(text, str):
        items = list(text)
        if items and all(isinstance(v, int) for v in items):
            return _parse_one(",".join(map(str, items)), str(items))
        text = "+".join(str(v) for v in items)
    parts = [p for p in text.split("+")]
    if any(not p.strip() for p in parts):
        raise ConfigError(f"--input-shape {text!r} has an empty pathway", _SHAPE_HINT)
    shapes = tuple(_parse_one(p, text) for p in parts)
    return shapes if len(shapes) > 1 else shapes[0]


def format_input_shape(shape: InputShape, sep: str = "×") -> str:
    """``1×3×16×112×112``, pathways joined by `` + ``."""
    return " + ".join(sep.join(map(str, s)) for s in pathway_shapes(shape))


def input_shape_to_json(shape: InputShape | None) -> list[int] | list[list[int]] | None:
    if shape is None:
        return None
    if is_multi(shape):
        return [list(s) for s in pathway_shapes(shape)]
    return list(pathway_shapes(shape)[0])


def primary_shape(shape: InputShape) -> Shape:
    """The pathway with the most elements (SlowFast's fast clip): the one stage and sweep sizes follow."""
    return max(pathway_shapes(shape), key=lambda s: (_numel(s), s))


def _numel(shape: Shape) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


def map_pathways(shape: InputShape, fn: Callable[[Shape], Shape]) -> InputShape:
    """``fn`` applied to every pathway's shape, keeping single/multi form."""
    if is_multi(shape):
        return tuple(fn(s) for s in pathway_shapes(shape))
    return fn(pathway_shapes(shape)[0])


def check_clip_shapes(shape: InputShape, what: str = "--input-shape") -> InputShape:
    """Every pathway must be [B, C, T, H, W] with one batch size."""
    shapes = pathway_shapes(shape)
    for s in shapes:
        if len(s) != 5:
            raise ConfigError(f"{what} {format_input_shape(shape, ',')!r} must have 5 entries B,C,T,H,W", _SHAPE_HINT)
    if len({s[0] for s in shapes}) > 1:
        raise ConfigError(f"{what} {format_input_shape(shape, ',')!r}: the pathways disagree on the batch size",
                          "give every pathway the same B")
    return shape


def check_container(container: str) -> str:
    if container not in CONTAINERS:
        raise ConfigError(f"unknown --input-container {container!r}", f"use one of {', '.join(CONTAINERS)}")
    return container


def make_model_input(
    shape: InputShape,
    dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
    container: str = "list",
    device: torch.device | str | None = None,
) -> Tensor | list[Tensor] | tuple[Tensor, ...]:
    """A reproducible model input: N(0,1) for float dtypes (default float32), 0..255 for uint8; one tensor
    per pathway."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    tensors = []
    for index, s in enumerate(pathway_shapes(shape)):
        generator = torch.Generator().manual_seed(seed + index)
        if dtype.is_floating_point:
            t = torch.randn(s, generator=generator, dtype=torch.float32).to(dtype)
        else:
            t = torch.randint(0, 256 if dtype == torch.uint8 else 128, s, generator=generator).to(dtype)
        tensors.append(t if device is None else t.to(device))
    return pack(tensors, multi=is_multi(shape), container=container)


def pack(tensors: Sequence[Tensor], *, multi: bool, container: str = "list") -> Tensor | list[Tensor] | tuple[Tensor, ...]:
    """One tensor, or a fresh list/tuple of them."""
    if not multi:
        return tensors[0]
    return tuple(tensors) if container == "tuple" else list(tensors)


def move_input(x: Any, device: Any, non_blocking: bool = False) -> Any:
    """A model input (a tensor, or a list/tuple of pathway tensors) on ``device``."""
    if isinstance(x, (list, tuple)):
        return type(x)(move_input(t, device, non_blocking) for t in x)
    return x.to(device, non_blocking=non_blocking) if hasattr(x, "to") else x


def fresh(x: Any) -> Any:
    """A new container around the same tensors, so a model that assigns into its input list changes nothing."""
    if isinstance(x, list):
        return list(x)
    return x


def input_tensors(x: Any) -> list[Tensor]:
    """The tensors of a model input (one tensor, or a list/tuple of them)."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def parse_pathway_strides(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"4,1"`` → (4, 1): pathway i takes every strides[i]-th frame of the clip."""
    if text is None or text == "":
        return None
    try:
        values = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        raise ConfigError(f"--pathway-strides {text!r} is not a list of integers", "e.g. --pathway-strides 4,1 (SlowFast, α = 4)") from None
    if len(values) < 2 or any(v < 1 for v in values):
        raise ConfigError(
            f"--pathway-strides {text!r} needs two or more strides ≥ 1", "e.g. --pathway-strides 4,1 (SlowFast, α = 4)"
        )
    return values


def split_pathways(
    clips: Tensor, strides: Sequence[int], *, container: str = "list", time_axis: int = 2
) -> list[Tensor] | tuple[Tensor, ...]:
    """One clip batch [B, C, T, H, W] → one tensor per pathway, pathway i = every strides[i]-th frame."""
    index = [slice(None)] * clips.dim()
    out = []
    for stride in strides:
        index[time_axis] = slice(None, None, stride)
        out.append(clips[tuple(index)])
    return tuple(out) if container == "tuple" else out


def meta_input(shape: InputShape | Sequence[int], dtype: torch.dtype, container: str = "list") -> Any:
    """Empty tensors on the meta device (no memory, no compute) shaped like the model input."""
    import torch

    shape = normalize_input_shape(shape)
    tensors = [torch.empty(s, dtype=dtype, device="meta") for s in pathway_shapes(shape)]
    return pack(tensors, multi=is_multi(shape), container=container)


def recorded_input(manifest: Any) -> tuple[InputShape | None, str, str, tuple[int, ...] | None]:
    """``(shape, dtype, container, pathway_strides)`` a converted folder's manifest records (``input``)."""
    info = (manifest or {}).get("input") or {}
    shape = info.get("shape")
    strides = info.get("pathway_strides")
    return (
        normalize_input_shape(shape) if shape else None,
        str(info.get("dtype") or "float32"),
        str(info.get("container") or "list"),
        tuple(int(s) for s in strides) if strides else None,
    )


def input_record(
    shape: InputShape | Sequence[int] | None,
    dtype: str = "float32",
    container: str = "list",
    pathway_strides: Sequence[int] | None = None,
    layout: str | None = None,
) -> dict[str, Any]:
    """The manifest's ``input`` entry; container and strides only for a multi-pathway input, ``layout``
    (``BTHWC``…, see :mod:`stjfd_convert.layouts`) only when given."""
    record: dict[str, Any] = {"shape": input_shape_to_json(normalize_input_shape(shape)) if shape else None,
                              "dtype": dtype}
    if layout is not None:
        from .layouts import check_input_layout

        record["layout"] = check_input_layout(layout)
    if shape and is_multi(shape):
        record["container"] = container
        if pathway_strides:
            record["pathway_strides"] = list(pathway_strides)
    return record


def resize_input(
    shape: InputShape,
    *,
    batch: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> InputShape:
    """``shape`` with a new batch, clip length or frame size, given for the primary pathway (see
    :func:`primary_shape`); the other pathways keep their ratio to it (SlowFast's slow clip stays T/α)."""
    primary = primary_shape(shape)

    def scaled(value: int, new: int | None, reference: int) -> int:
        return value if new is None else max(1, round(value * new / reference))

    def one(s: Shape) -> Shape:
        b, c, t, h, w = s
        return (
            batch if batch is not None else b, c, scaled(t, frames, primary[2]), scaled(h, height, primary[3]),
            scaled(w, width, primary[4]),
        )

    return map_pathways(shape, one)


def check_pathway_strides(shape: InputShape | None, strides: Sequence[int]) -> tuple[int, ...]:
    """``strides`` must give one stride per pathway of ``shape``, and cutting the longest clip with them must
    give each pathway's length (T_i = ⌈T / stride_i⌉)."""
    strides = tuple(strides)
    if shape is None or not is_multi(shape):
        raise ConfigError("--pathway-strides needs one --input-shape per pathway", _SHAPE_HINT)
    shapes = pathway_shapes(shape)
    if len(strides) != len(shapes):
        raise ConfigError(
            f"--pathway-strides {','.join(map(str, strides))} gives {len(strides)} pathways, --input-shape {len(shapes)}",
            "give one stride per pathway, e.g. 4,1 for SlowFast's [slow, fast]",
        )
    length = max(s[2] * k for s, k in zip(shapes, strides))
    for s, k in zip(shapes, strides):
        if -(-length // k) != s[2]:
            raise ConfigError(
                f"--pathway-strides {','.join(map(str, strides))} do not match the pathway lengths "
                f"{', '.join(str(one[2]) for one in shapes)}: stride {k} over {length} frames gives {-(-length // k)}",
                "pathway i must have ⌈T / stride_i⌉ frames of the longest clip T",
            )
    return strides


class PathwaySplit:
    """A forward pre-hook that feeds a model one tensor per pathway cut from the clip it is called with.

    ``model(clips)`` with ``clips`` [B, C, T, H, W] runs as ``model([clips[:, :, ::k0], clips[:, :, ::k1], …])``,
    so training, BN re-estimation and evaluation, which handle one clip tensor, drive a SlowFast-style
    model unchanged. A class (not a closure) so that a pickled model keeps it.
    """

    def __init__(self, strides: Sequence[int], container: str = "list") -> None:
        self.strides, self.container = tuple(strides), container

    def __call__(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        import torch

        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 5:
            return (split_pathways(args[0], self.strides, container=self.container), *args[1:])
        return None


def attach_pathway_split(model: Any, strides: Sequence[int] | None, container: str = "list") -> Any:
    """Register :class:`PathwaySplit` on ``model`` (once); returns the hook handle, or None without strides."""
    if not strides:
        return None
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, PathwaySplit):
            hook.strides, hook.container = tuple(strides), container
            return None
    return model.register_forward_pre_hook(PathwaySplit(strides, container))


def pathway_input_shape(clip_shape: Sequence[int], strides: Sequence[int] | None) -> InputShape:
    """The model input for clips of ``clip_shape`` [B, C, T, H, W]: the clip itself, or one shape per pathway."""
    clip = tuple(int(v) for v in clip_shape)
    if not strides:
        return clip
    return tuple((*clip[:2], -(-clip[2] // k), *clip[3:]) for k in strides)
