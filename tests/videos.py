"""Tiny synthetic videos and frame folders for tests and benchmarks (written with PyAV).

Everything here is deterministic given its ``seed``. The public API:

- :func:`write_video` — encode ``uint8 [T, H, W, 3]`` frames into mp4 / avi / mkv / webm, choosing an
  encoder that the installed PyAV/FFmpeg provides (:func:`encoder_for` says which);
- :func:`write_frame_folder` — the same frames as numbered images (``frame_1.png, frame_2.png, …``,
  deliberately unpadded so that only a natural sort orders them);
- :func:`moving_shape_frames` — a separable toy task (square moving left→right, top→bottom, blinking);
- :func:`indexed_frames` — frames whose red channel encodes the frame index and whose green/blue
  channels are x/y gradients, to check temporal and spatial crops after decoding
  (:func:`frame_index_of` reads the index back);
- :func:`make_video_dataset`, :func:`make_frame_folder_dataset`, :func:`write_list_file` — whole
  class-folder datasets and ``path,label`` lists;
- :func:`write_corrupt_video` — a truncated real video or random bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from stjfd_convert.sample import SAMPLE_CLASSES, shape_frames

__all__ = [
    "SHAPE_KINDS",
    "INDEX_BASE",
    "INDEX_STEP",
    "encoder_for",
    "frame_index_of",
    "indexed_frames",
    "make_frame_folder_dataset",
    "make_video_dataset",
    "moving_shape_frames",
    "write_corrupt_video",
    "write_frame_folder",
    "write_list_file",
    "write_video",
]

# Preferred encoders per container, best first: near-lossless where the container allows it so that
# decoded frames stay close to the source; later entries are fallbacks for minimal FFmpeg builds.
_ENCODERS: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {
    ".mp4": (
        ("libx264", {"crf": "4", "preset": "ultrafast"}),
        ("mpeg4", {"qscale": "1"}),
    ),
    ".avi": (
        ("mjpeg", {"qscale": "1"}),
        ("mpeg4", {"qscale": "1"}),
    ),
    ".mkv": (
        ("ffv1", {}),
        ("libx264", {"crf": "4", "preset": "ultrafast"}),
        ("mpeg4", {"qscale": "1"}),
    ),
    ".webm": (
        ("libvpx", {"crf": "4", "b": "8M"}),
        ("libvpx-vp9", {"crf": "4", "b": "0"}),
    ),
}

# Pixel formats each encoder is fed (mjpeg wants full-range yuvj).
_PIX_FMT = {"mjpeg": "yuvj420p", "ffv1": "yuv444p"}

# The red channel of frame i in indexed_frames is INDEX_BASE + INDEX_STEP * (i mod INDEX_PERIOD).
INDEX_BASE = 12
INDEX_STEP = 8
INDEX_PERIOD = 29  # 12 + 8 * 28 = 236 ≤ 255

SHAPE_KINDS = SAMPLE_CLASSES


@functools.cache
def _encoder_available(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception:  # av.codec.codec.UnknownCodecError and friends
        return False
    return True


def encoder_for(ext: str) -> tuple[str, dict[str, str]]:
    """The (encoder name, options) used for a container extension such as ``".mp4"``."""
    ext = ext.lower() if ext.startswith(".") else "." + ext.lower()
    for name, options in _ENCODERS.get(ext, ()):
        if _encoder_available(name):
            return name, options
    raise RuntimeError(f"no encoder for {ext} in this PyAV/FFmpeg build (tried {_ENCODERS.get(ext, ())})")


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 25,
    options: dict[str, str] | None = None,
    gop_size: int | None = 8,
) -> Path:
    """Encode ``frames`` (``uint8 [T, H, W, 3]``, H and W even) into ``path``; the suffix picks the container.

    ``options`` replace the encoder options of :func:`encoder_for` (e.g. ``{"crf": "23"}`` for libx264 at
    its usual quality instead of near-lossless). ``gop_size`` puts a keyframe every that many frames (small
    by default so that tests exercise seeking; ``None`` keeps the encoder's default)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even for yuv420 codecs, got {height}×{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec, default_options = encoder_for(path.suffix)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = _PIX_FMT.get(codec, "yuv420p")
        stream.options = dict(default_options if options is None else options)
        if gop_size is not None and codec not in ("mjpeg", "ffv1"):  # intra-only codecs: every frame is a keyframe
            stream.codec_context.gop_size = gop_size
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frame_folder(directory: str | Path, frames: np.ndarray, ext: str = ".png", prefix: str = "frame_") -> Path:
    """Write ``frames`` as ``{prefix}{i+1}{ext}`` (unpadded numbers: ``frame_2`` must sort before ``frame_10``)."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if ext.lower() in (".jpg", ".jpeg") else {}
    for i, array in enumerate(np.asarray(frames, dtype=np.uint8)):
        Image.fromarray(array).save(directory / f"{prefix}{i + 1}{ext}", **options)
    return directory


def moving_shape_frames(kind: int | str, T: int, H: int, W: int, seed: int = 0) -> np.ndarray:
    """A toy clip ``uint8 [T, H, W, 3]``: a bright square that moves left→right (kind 0), top→bottom (1)
    or stays put and blinks (2), over a dim noisy background. Colour, size and path vary with ``seed``.

    The one implementation is :func:`stjfd_convert.sample.shape_frames` (the sample model's toy task);
    this is its fixed-layout form (full sweep, blink on even frames)."""
    return shape_frames(kind, T, H, W, seed)


def indexed_frames(T: int, H: int, W: int) -> np.ndarray:
    """Frames ``uint8 [T, H, W, 3]`` where red = INDEX_BASE + INDEX_STEP·(t mod INDEX_PERIOD) (constant over
    the frame), green rises left→right and blue rises top→bottom (smooth, so codecs keep them well)."""
    red = INDEX_BASE + INDEX_STEP * (np.arange(T) % INDEX_PERIOD)
    green = np.linspace(16, 239, W).round()
    blue = np.linspace(16, 239, H).round()
    frames = np.empty((T, H, W, 3), dtype=np.uint8)
    frames[..., 0] = red[:, None, None]
    frames[..., 1] = green[None, None, :]
    frames[..., 2] = blue[None, :, None]
    return frames


def frame_index_of(red_mean: float | np.ndarray) -> np.ndarray:
    """Inverse of :func:`indexed_frames`' red channel: the frame index (mod INDEX_PERIOD) from mean red in 0..255."""
    return np.rint((np.asarray(red_mean, dtype=np.float64) - INDEX_BASE) / INDEX_STEP).astype(np.int64)


def _seed(seed: int, class_index: int, i: int) -> int:
    return seed * 1000 + class_index * 100 + i


def _class_names(classes: int | Sequence[str]) -> list[str]:
    if isinstance(classes, int):
        return list(SHAPE_KINDS[:classes]) if classes <= len(SHAPE_KINDS) else [f"class_{i}" for i in range(classes)]
    return list(classes)


def make_video_dataset(
    root: str | Path,
    classes: int | Sequence[str] = SHAPE_KINDS,
    per_class: int = 2,
    T: int = 16,
    H: int = 32,
    W: int = 32,
    ext: str = ".mp4",
    seed: int = 0,
    fps: int = 25,
) -> dict[str, list[Path]]:
    """``root/<class>/video_<i><ext>`` with :func:`moving_shape_frames` (class i is shape kind i mod 3).
    Returns ``{class name: [paths]}``."""
    root = Path(root)
    out: dict[str, list[Path]] = {}
    for c, name in enumerate(_class_names(classes)):
        out[name] = [
            write_video(root / name / f"video_{i}{ext}", moving_shape_frames(c, T, H, W, _seed(seed, c, i)), fps)
            for i in range(per_class)
        ]
    return out


def make_frame_folder_dataset(
    root: str | Path,
    classes: int | Sequence[str] = SHAPE_KINDS,
    per_class: int = 2,
    T: int = 16,
    H: int = 32,
    W: int = 32,
    ext: str = ".png",
    seed: int = 0,
) -> dict[str, list[Path]]:
    """``root/<class>/clip_<i>/frame_<t>.<ext>`` with :func:`moving_shape_frames`. Returns ``{class: [dirs]}``."""
    root = Path(root)
    out: dict[str, list[Path]] = {}
    for c, name in enumerate(_class_names(classes)):
        out[name] = [
            write_frame_folder(root / name / f"clip_{i}", moving_shape_frames(c, T, H, W, _seed(seed, c, i)), ext)
            for i in range(per_class)
        ]
    return out


def write_list_file(
    path: str | Path,
    entries: Iterable[tuple[str | Path, str | int]],
    *,
    delimiter: str | None = None,
    header: bool = True,
) -> Path:
    """A ``path,label`` list (tab-separated for ``.tsv``); entry paths are written relative to the file."""
    path = Path(path)
    delimiter = delimiter if delimiter is not None else ("\t" if path.suffix.lower() == ".tsv" else ",")
    lines = [f"path{delimiter}label"] if header else []
    for entry, label in entries:
        entry = Path(entry)
        rel = entry.relative_to(path.parent) if entry.is_absolute() else entry
        lines.append(f"{rel.as_posix()}{delimiter}{label}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_corrupt_video(
    path: str | Path, kind: str = "truncated", seed: int = 0, T: int = 16, H: int = 32, W: int = 32
) -> Path:
    """A broken video at ``path``: ``"truncated"`` (a real video cut to 40 % of its bytes, which loses the
    mp4 index written at the end) or ``"random"`` (random bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "random":
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        write_video(path, moving_shape_frames(0, T, H, W, seed))
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * 0.4)])
    else:
        raise ValueError(f"kind must be 'truncated' or 'random', got {kind!r}")
    return path
