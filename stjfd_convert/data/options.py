"""How a clip is cut and turned into a tensor (:class:`ClipConfig`), normalisation, and :class:`DataError`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from ..errors import ConfigError, StjfdError
from ..models import TORCHVISION_VIDEO_ARCHS

LAYOUTS = ("CTHW", "TCHW", "THWC")
DTYPES = ("float32", "uint8")
#: crop: short side resized, then a crop of ``size``; stretch: the whole frame resized to exactly ``size``.
RESIZE_MODES = ("crop", "stretch")

# Short side before cropping, relative to the crop: torchvision's video recipes resize to 128 and crop 112.
RESIZE_RATIO = 128 / 112

_LAYOUT_HINT = f"layout must be one of {', '.join(LAYOUTS)}"


class DataError(StjfdError):
    """A dataset that cannot be read: no usable videos, a malformed list, unknown classes."""


def check_playback_speed(speed: float) -> float:
    """``speed`` as a float if it is a finite number > 0, else ``ConfigError`` (``--playback-speed``)."""
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not math.isfinite(speed) or speed <= 0:
        raise ConfigError(
            f"--playback-speed must be a positive number, got {speed!r}", "e.g. 0.5 (slowed 2×) or 2 (sped up 2×)"
        )
    return float(speed)


def check_resize_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`RESIZE_MODES`, else ``ConfigError`` (``--resize-mode``)."""
    text = str(mode).strip().lower()
    if text not in RESIZE_MODES:
        raise ConfigError(
            f"unknown --resize-mode {mode!r}",
            "use crop (resize the short side, then crop) or stretch (whole frame, no crop)",
        )
    return text


@dataclass(frozen=True)
class ClipConfig:
    """How a clip is cut from a video and turned into a tensor.

    ``size`` is the crop (``int`` for square, or ``(height, width)``); frames are first resized so that
    the short side is ``resize`` (default ``round(min(size) · 128/112)``) and the crop fits. ``train``
    selects a random temporal offset, a random crop and (``flip``) a random horizontal flip; otherwise the
    centre clip and centre crop. ``playback_speed`` f resamples the clip's frames as if the video were
    played f times as fast: clip frame k is video frame ``start + ⌊k · frame_stride · f⌋`` (nearest earlier
    frame, no blending), so 0.5 shows each frame twice (slowed 2×) and 2 skips every other one (sped up
    2×) — tempo robustness without re-encoding videos. ``resize_mode="stretch"`` resizes the whole frame to
    exactly ``size`` instead (aspect ratio not kept, nothing cropped, no random crop; ``resize`` unused).
    ``mean``/``std`` (0..1 scale, per RGB channel) normalise float output;
    without them frames are scaled to 0..1. ``dtype="uint8"`` returns raw frames (no normalisation).
    """

    clip_len: int
    size: tuple[int, int]
    frame_stride: int = 1
    resize: int | None = None
    train: bool = False
    flip: bool = True
    clips_per_video: int = 1
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    layout: str = "CTHW"
    dtype: str = "float32"
    playback_speed: float = 1.0
    resize_mode: str = "crop"

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
            raise ConfigError(f"size must be a positive int or (height, width), got {self.size!r}")
        object.__setattr__(self, "size", size)
        for name in ("clip_len", "frame_stride", "clips_per_video"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < 1):
            raise ConfigError(f"resize must be a positive short-side length, got {self.resize!r}")
        object.__setattr__(self, "playback_speed", check_playback_speed(self.playback_speed))
        object.__setattr__(self, "resize_mode", check_resize_mode(self.resize_mode))
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}", hint=_LAYOUT_HINT)
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}", hint=f"dtype must be one of {', '.join(DTYPES)}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("give both mean and std, or neither", hint="e.g. normalization_for('r3d_18')")
        if self.mean is not None:
            mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
            if len(mean) != 3 or len(std) != 3:
                raise ConfigError(f"mean and std need 3 values (RGB), got {self.mean!r} and {self.std!r}")
            if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
                raise ConfigError(f"std must be positive and finite, mean finite; got {mean} and {std}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)

    @property
    def short_side(self) -> int:
        """The short side frames are resized to before cropping."""
        return self.resize if self.resize is not None else round(min(self.size) * RESIZE_RATIO)

    @property
    def offsets(self) -> list[int]:
        """Video frame of each clip frame relative to the clip's start: ``⌊k · frame_stride · playback_speed⌋``.

        Exact rational arithmetic (the speed as a fraction with denominator ≤ 10⁶), so 1/3 or 0.1 never
        lose a frame to float rounding.
        """
        speed = Fraction(self.playback_speed).limit_denominator(10**6)
        step = speed * self.frame_stride
        return [math.floor(k * step) for k in range(self.clip_len)]

    @property
    def span(self) -> int:
        """Frames covered by one clip: ``⌊(clip_len − 1) · frame_stride · playback_speed⌋ + 1``
        (``(clip_len − 1) · frame_stride + 1`` at normal speed)."""
        return self.offsets[-1] + 1


def normalization_for(arch: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` of a torchvision video model's pretrained weights, e.g. ``normalization_for("r3d_18")``."""
    info = TORCHVISION_VIDEO_ARCHS.get(arch)
    if info is None:
        raise ConfigError(
            f"no known normalisation for architecture {arch!r}",
            hint=f"pass mean and std explicitly, or one of: {', '.join(TORCHVISION_VIDEO_ARCHS)}",
        )
    return tuple(info.mean), tuple(info.std)
