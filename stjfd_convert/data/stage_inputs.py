"""Stage inputs for the alternating schedule: clips downsampled in space (temporal stage) or time (spatial stage)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .options import _LAYOUT_HINT, LAYOUTS

_TO_BCTHW = {"CTHW": (0, 1, 2, 3, 4), "TCHW": (0, 2, 1, 3, 4), "THWC": (0, 4, 1, 2, 3)}


def downsample_clip(
    clips: Tensor, *, spatial: int = 1, temporal: int = 1, mode: str = "area", layout: str = "CTHW"
) -> Tensor:
    """Stage inputs for the alternating schedule from a batch ``[B, C, T, H, W]`` (or one clip without B).

    Temporal stage: ``spatial=s`` keeps every frame and shrinks H, W to ``H // s``, ``W // s`` (``"area"``:
    box average; ``"bilinear"``: antialiased bilinear). Spatial stage: ``temporal=r`` keeps every r-th
    frame (``ceil(T / r)`` frames) at full resolution. Other layouts via ``layout``; uint8 input is
    resampled in float and rounded back.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}", hint=_LAYOUT_HINT)
    for name, factor in (("spatial", spatial), ("temporal", temporal)):
        if not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"{name} downsampling factor must be an integer ≥ 1, got {factor!r}")
    if mode not in ("area", "bilinear"):
        raise ConfigError(f"unknown downsampling mode {mode!r}", hint="mode must be 'area' or 'bilinear'")
    if clips.ndim not in (4, 5):
        raise ConfigError(f"expected a clip batch [B, {', '.join(layout)}] or one clip, got shape {tuple(clips.shape)}")
    single = clips.ndim == 4
    x = clips.unsqueeze(0) if single else clips
    order = _TO_BCTHW[layout]
    x = x.permute(order)  # [B, C, T, H, W]
    if temporal > 1:
        x = x[:, :, ::temporal]
    if spatial > 1:
        batch, channels, frames, height, width = x.shape
        out_h, out_w = max(1, height // spatial), max(1, width // spatial)
        source_dtype = x.dtype
        y = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        if not y.is_floating_point():
            y = y.to(torch.float32)
        if mode == "area":
            y = F.interpolate(y, size=(out_h, out_w), mode="area")
        else:
            y = F.interpolate(y, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
        if not source_dtype.is_floating_point:
            info = torch.iinfo(source_dtype)
            y = y.round_().clamp_(info.min, info.max).to(source_dtype)
        x = y.reshape(batch, frames, channels, out_h, out_w).transpose(1, 2)
    inverse = tuple(order.index(i) for i in range(5))
    x = x.permute(inverse).contiguous()
    return x[0] if single else x
