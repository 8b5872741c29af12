"""Video clip datasets for fine-tuning and distillation: folders of videos (PyAV), frame folders, lists.

A *split* is one of

- a folder of class folders, each holding videos (``.mp4 .avi .mkv .webm .mov .m4v``) and/or frame
  folders (sub-folders of ``.jpg``/``.png`` frames, ordered by a natural sort: ``frame_2 < frame_10``);
- a list file (``.csv``, ``.tsv`` or ``.txt``) of ``path,label`` rows: header optional, paths relative to
  the list file, labels given as class names or as integer indices.

A dataset *root* holds ``train`` and ``val`` splits (folders or ``train.csv``/``val.csv``…), or is itself a
single split that :func:`build_datasets` divides with ``val_split`` (stratified by class, fixed by seed).
:func:`unlabeled_dataset` reads every video under a folder, recursively, with label ``-1``.

Each item is ``(clip, label)``. ``clip`` is ``float32 [C, T, H, W]`` normalised with the model's mean/std by
default; ``layout`` picks ``CTHW``/``TCHW``/``THWC`` and ``dtype="uint8"`` gives raw, unnormalised frames.
With ``clips_per_video = K > 1`` the clip gains a leading ``K`` axis (evaluate all K, average the logits).

Decoding seeks to the keyframe before the first needed frame and stops after the last one; only the
needed frames are converted to RGB (and resized by swscale on the way). Videos shorter than a clip are
looped. Unreadable files are dropped when the dataset is built (a cheap PyAV probe of container and stream
metadata) or, when a file only fails while decoding, replaced by the next readable sample (the same one
whichever DataLoader worker meets it) and recorded: :attr:`ClipDataset.skipped` gathers both, from all
worker processes.

Randomness (temporal offset, crop, flip) comes from a generator seeded by ``(seed, epoch, index)``, so a
sample does not depend on the number of workers or on which worker loads it. The loader returned by
:func:`make_loader` advances the epoch on each pass (``loader.set_epoch(e)`` to resume).
"""

from __future__ import annotations

import csv
import gc
import math
import os
import random
import signal
import re
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError, StjfdError
from ..models import TORCHVISION_VIDEO_ARCHS

__all__ = [
    "ClipConfig",
    "ClipDataset",
    "ClipLoader",
    "DataError",
    "EpochShuffleSampler",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "LIST_EXTENSIONS",
    "UNLABELED",
    "VIDEO_EXTENSIONS",
    "VideoSource",
    "build_datasets",
    "downsample_clip",
    "find_sources",
    "find_unlabeled_sources",
    "make_loader",
    "natural_key",
    "normalization_for",
    "split_sources",
    "temporal_indices",
    "unlabeled_dataset",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LIST_EXTENSIONS = (".csv", ".tsv", ".txt")
LAYOUTS = ("CTHW", "TCHW", "THWC")
DTYPES = ("float32", "uint8")
PROBES = ("none", "metadata", "decode")
UNLABELED = -1

# Short side before cropping, relative to the crop: torchvision's video recipes resize to 128 and crop 112.
RESIZE_RATIO = 128 / 112
# Give up (DataError) after this many consecutive samples fail to load: the data, not one file, is broken.
MAX_CONSECUTIVE_FAILURES = 32

_LAYOUT_HINT = f"layout must be one of {', '.join(LAYOUTS)}"
_FOLDER_HINT = (
    "expected <split>/<class>/<video>.mp4 (or .avi/.mkv/.webm), <split>/<class>/<clip>/<frame>.jpg, "
    "or a list file of 'path,label' rows"
)


class DataError(StjfdError):
    """A dataset that cannot be read: no usable videos, a malformed list, unknown classes."""


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipConfig:
    """How a clip is cut from a video and turned into a tensor.

    ``size`` is the crop (``int`` for square, or ``(height, width)``); frames are first resized so that
    the short side is ``resize`` (default ``round(min(size) · 128/112)``) and the crop fits. ``train``
    selects a random temporal offset, a random crop and (``flip``) a random horizontal flip; otherwise the
    centre clip and centre crop. ``mean``/``std`` (0..1 scale, per RGB channel) normalise float output;
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
    def span(self) -> int:
        """Frames covered by one clip: ``(clip_len − 1) · frame_stride + 1``."""
        return (self.clip_len - 1) * self.frame_stride + 1


def normalization_for(arch: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` of a torchvision video model's pretrained weights, e.g. ``normalization_for("r3d_18")``."""
    info = TORCHVISION_VIDEO_ARCHS.get(arch)
    if info is None:
        raise ConfigError(
            f"no known normalisation for architecture {arch!r}",
            hint=f"pass mean and std explicitly, or one of: {', '.join(TORCHVISION_VIDEO_ARCHS)}",
        )
    return tuple(info.mean), tuple(info.std)


# --------------------------------------------------------------------------------------------
# Finding samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoSource:
    """One sample: a video file (``kind="video"``) or a folder of frames (``kind="frames"``)."""

    path: Path
    label: int
    kind: Literal["video", "frames"] = "video"
    num_frames: int | None = None  # filled in by the index-time probe


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``frame_2`` before ``frame_10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in _DIGITS.split(name) if part)


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".")


def _frame_files(directory: Path) -> list[Path]:
    """The image files directly inside ``directory``, naturally sorted."""
    try:
        entries = [e for e in os.scandir(directory) if e.is_file() and not e.name.startswith(".")]
    except OSError:
        return []
    files = [Path(e.path) for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def _has_frames(directory: Path) -> bool:
    try:
        return any(
            e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS for e in os.scandir(directory)
        )
    except OSError:
        return False


def _walk_samples(directory: Path, label: int) -> list[VideoSource]:
    """Videos and frame folders under ``directory`` (recursively), in a stable natural order."""
    found: list[VideoSource] = []
    try:
        children = sorted(directory.iterdir(), key=lambda p: natural_key(p.name))
    except OSError:
        return found
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if _has_frames(child):
                found.append(VideoSource(child, label, "frames"))
            else:
                found.extend(_walk_samples(child, label))
        elif _is_video(child):
            found.append(VideoSource(child, label, "video"))
    return found


def _list_delimiter(path: Path, first_line: str) -> str | None:
    if path.suffix.lower() == ".tsv" or "\t" in first_line:
        return "\t"
    if "," in first_line:
        return ","
    return None  # whitespace-separated, e.g. Kinetics-style "path label" lists


_HEADER_NAMES = {"path", "video", "file", "filename", "filepath", "video_path", "frames", "clip"}


def _read_list(list_file: Path, classes: Sequence[str] | None) -> tuple[list[VideoSource], list[str], list]:
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read list file {list_file}: {exc}", hint="check the path and that it is UTF-8 text"
        ) from None
    lines = [
        (n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise DataError(f"list file {list_file} has no rows", hint="add one 'path,label' row per video")
    delimiter = _list_delimiter(list_file, lines[0][1])
    rows: list[tuple[int, str, str]] = []
    for n, line in lines:
        cells = next(csv.reader([line], delimiter=delimiter)) if delimiter else line.split()
        cells = [c.strip() for c in cells]
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise DataError(
                f"{list_file}:{n}: expected 'path{delimiter or ' '}label', got {line.strip()!r}",
                hint="each row needs a path (relative to the list file) and a class name or index",
            )
        rows.append((n, cells[0], cells[1]))
    if rows[0][1].lower() in _HEADER_NAMES and not (list_file.parent / rows[0][1]).exists():
        rows = rows[1:]
    labels = [label for _, _, label in rows]
    integer_labels = all(re.fullmatch(r"[+-]?\d+", label) for label in labels)
    if classes is None:
        if integer_labels:
            top = max((int(label) for label in labels), default=-1)
            classes = [str(i) for i in range(top + 1)]
        else:
            classes = sorted(set(labels))
    index = {name: i for i, name in enumerate(classes)}
    sources: list[VideoSource] = []
    skipped: list[tuple[Path, str]] = []
    for n, entry, label in rows:
        if integer_labels and label not in index:
            label_index = int(label)
            if not 0 <= label_index < len(classes):
                raise DataError(
                    f"{list_file}:{n}: label {label_index} is outside 0..{len(classes) - 1}",
                    hint="integer labels index the training classes",
                )
        elif label in index:
            label_index = index[label]
        else:
            raise DataError(
                f"{list_file}:{n}: class {label!r} is not one of the training classes",
                hint=f"known classes: {', '.join(classes[:10])}{' …' if len(classes) > 10 else ''}",
            )
        path = Path(entry)
        if not path.is_absolute():
            path = list_file.parent / path
        if path.is_dir():
            sources.append(VideoSource(path, label_index, "frames"))
        elif path.is_file():
            sources.append(VideoSource(path, label_index, "video"))
        else:
            skipped.append((path, "file not found"))
    return sources, list(classes), skipped


def find_sources(
    split: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[VideoSource], list[str], list[tuple[Path, str]]]:
    """The samples of one split: ``(sources, classes, skipped)``.

    ``split`` is a folder of class folders or a list file. ``classes`` (from the training split) fixes
    the label of each class name; without it the classes are the sorted folder names (or list labels).
    Missing list entries are returned in ``skipped``; nothing is opened or probed here.
    """
    split = Path(split)
    if split.is_file():
        if split.suffix.lower() not in LIST_EXTENSIONS:
            raise DataError(f"{split} is not a list file ({', '.join(LIST_EXTENSIONS)})", hint=_FOLDER_HINT)
        return _read_list(split, classes)
    if not split.is_dir():
        raise DataError(f"dataset path {split} does not exist", hint=_FOLDER_HINT)
    class_dirs = sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = [p.name for p in class_dirs]
    index = {name: i for i, name in enumerate(classes)}
    sources: list[VideoSource] = []
    for class_dir in class_dirs:
        if class_dir.name not in index:
            raise DataError(
                f"class folder {class_dir} is not one of the training classes",
                hint="val/ must use the class folder names of train/",
            )
        sources.extend(_walk_samples(class_dir, index[class_dir.name]))
    if not sources:
        loose = [p.name for p in split.iterdir() if _is_video(p)][:3]
        detail = f" (videos directly in it, e.g. {', '.join(loose)}, have no class)" if loose else ""
        raise DataError(f"no videos or frame folders found in class folders of {split}{detail}", hint=_FOLDER_HINT)
    return sources, list(classes), []


def find_unlabeled_sources(root: str | Path) -> list[VideoSource]:
    """Every video and frame folder under ``root``, recursively, with label ``UNLABELED`` (−1)."""
    root = Path(root)
    if root.is_file() and _is_video(root):
        return [VideoSource(root, UNLABELED, "video")]
    if not root.is_dir():
        raise DataError(f"dataset path {root} does not exist", hint="pass a folder of videos")
    sources = [VideoSource(root, UNLABELED, "frames")] if _has_frames(root) else _walk_samples(root, UNLABELED)
    if not sources:
        raise DataError(
            f"no videos ({', '.join(VIDEO_EXTENSIONS)}) or frame folders found under {root}",
            hint="pass a folder that contains videos (searched recursively)",
        )
    return sources


def split_sources(
    sources: Sequence[VideoSource], fraction: float, seed: int = 0
) -> tuple[list[VideoSource], list[VideoSource]]:
    """``(train, val)``: ``round(n·fraction)`` samples of each class go to val (at least one from a class of
    two or more, never all of a class), chosen by ``seed``; both keep the input order."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(
            f"val_split must be between 0 and 1 (exclusive), got {fraction!r}", hint="e.g. --val-split 0.1"
        )
    by_class: dict[int, list[int]] = {}
    for i, source in enumerate(sources):
        by_class.setdefault(source.label, []).append(i)
    rng = np.random.default_rng([seed, 0x5EED])
    val_ids: set[int] = set()
    for label in sorted(by_class):
        members = by_class[label]
        take = min(len(members) - 1, max(1, round(len(members) * fraction))) if len(members) > 1 else 0
        val_ids.update(members[j] for j in rng.permutation(len(members))[:take])
    train = [s for i, s in enumerate(sources) if i not in val_ids]
    val = [s for i, s in enumerate(sources) if i in val_ids]
    return train, val


# --------------------------------------------------------------------------------------------
# Reading frames
# --------------------------------------------------------------------------------------------


class _LoadFailure(Exception):
    """A sample that cannot be read; the message is the reason recorded in ``skipped``."""


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise DataError(
            "reading video files needs PyAV, which is not installed",
            hint="reinstall stjfd (it depends on av) or pip install av; frame folders work without it",
        ) from None
    return av


def _open_options(av: Any) -> dict[str, Any]:
    """Keyword arguments for ``av.open`` that keep videos with non-UTF-8 metadata readable.

    PyAV ≤ 18 decodes every stream's metadata when the file is opened and, by default, raises
    ``UnicodeDecodeError`` on a tag that is not UTF-8 (e.g. a cp1251 title in an old AVI), so such a video
    would be dropped: ``metadata_errors="ignore"`` prevents that. PyAV 19 removed the argument (passing it
    is a ``TypeError``); it decodes metadata with ``surrogateescape``, which never raises.
    """
    return {"metadata_errors": "ignore"} if _pyav_major(av) < 19 else {}


def _pyav_major(av: Any) -> int:
    return int(str(av.__version__).split(".", 1)[0])


def _rgb_converter(av: Any, width: int, height: int) -> Callable[[Any], np.ndarray]:
    """A function turning decoded frames into ``uint8 [height, width, 3]`` RGB arrays.

    It owns its ``VideoReformatter`` (swscale context), made in the calling process. PyAV 19's
    ``frame.to_ndarray(format=...)`` reuses one per thread instead, and a DataLoader worker forked from a
    process that had converted frames inherits it without the swscale threads it waits on: a deadlock.
    In workers swscale runs on one thread (PyAV ≥ 17 defaults to one per core), as decoding does.
    """
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    options: dict[str, Any] = {"format": "rgb24", "width": width, "height": height}
    if torch.utils.data.get_worker_info() is not None and _pyav_major(av) >= 17:
        options["threads"] = 1

    def convert(frame: Any) -> np.ndarray:
        return reformatter.reformat(frame, **options).to_ndarray()

    return convert


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (_LoadFailure, OSError, ValueError, EOFError, IndexError, RuntimeError)
    try:
        import av

        errors += (av.FFmpegError,)
    except ImportError:  # pragma: no cover - without av only frame folders are read
        pass
    return errors


def _target_size(height: int, width: int, config: ClipConfig) -> tuple[int, int]:
    """(height, width) after resizing so the short side is ``config.short_side`` and the crop fits."""
    crop_h, crop_w = config.size
    scale = max(config.short_side / min(height, width), crop_h / height, crop_w / width)
    return max(crop_h, round(height * scale)), max(crop_w, round(width * scale))


def _frame_rate(stream: Any) -> Any:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return rate
    return None


def _video_frame_count(container: Any, stream: Any) -> int | None:
    """Frames in the stream from metadata (exact for mp4/avi, from the duration for mkv/webm)."""
    if stream.frames:
        return int(stream.frames)
    rate = _frame_rate(stream)
    if rate is None:
        return None
    if stream.duration and stream.time_base:
        return max(1, round(float(stream.duration * stream.time_base * rate)))
    if container.duration:
        return max(1, round(container.duration / 1_000_000 * float(rate)))
    return None


def _open_video(path: Path) -> tuple[Any, Any]:
    av = _import_av()
    container = av.open(str(path), **_open_options(av))
    if not container.streams.video:
        container.close()
        raise _LoadFailure("no video stream")
    stream = container.streams.video[0]
    if torch.utils.data.get_worker_info() is not None:
        # DataLoader workers already use the cores; FFmpeg's own decoding threads would oversubscribe them.
        stream.codec_context.thread_count = 1
    if not stream.codec_context.width or not stream.codec_context.height:
        container.close()
        raise _LoadFailure("video stream has no frame size")
    return container, stream


def _count_packets(path: Path) -> int:
    """Exact frame count by demuxing (no decoding); the fallback when metadata has neither count nor duration."""
    container, stream = _open_video(path)
    with container:
        return sum(1 for packet in container.demux(stream) if packet.size)


def _probe(source: VideoSource, mode: str) -> VideoSource:
    """``source`` with ``num_frames`` filled in; raises one of :func:`_read_errors` if it is unusable."""
    if source.kind == "frames":
        files = _frame_files(source.path)
        if not files:
            raise _LoadFailure("frame folder has no .jpg/.png frames")
        if mode == "decode":
            from PIL import Image

            with Image.open(files[0]) as image:
                image.convert("RGB").load()
        return replace(source, num_frames=len(files))
    container, stream = _open_video(source.path)
    with container:
        count = _video_frame_count(container, stream)
        if mode == "decode":
            if next(iter(container.decode(stream)), None) is None:
                raise _LoadFailure("no frame could be decoded")
    if count is None:
        count = _count_packets(source.path)
    if count < 1:
        raise _LoadFailure("video has no frames")
    return replace(source, num_frames=count)


def _decode_video(
    path: Path, num_frames_hint: int | None, pick: Callable[[int], np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Decode the frames that ``pick(num_frames)`` selects (an index array of any shape).

    Returns the distinct frames (``uint8 [N, H, W, 3]``) and the index array mapped to positions in them.
    """
    container, stream = _open_video(path)
    with container:
        num_frames = _video_frame_count(container, stream) or num_frames_hint or _count_packets(path)
        indices = pick(num_frames)
        wanted = np.unique(indices)
        # An unknown time base is falsy: None before PyAV 19, the unset AVRational(0, 1) from 19 on.
        rate, time_base = _frame_rate(stream), stream.time_base
        start_pts = stream.start_time or 0
        # Frames are converted at the stream's size (a mid-stream size change is scaled back to it).
        height, width = stream.codec_context.height, stream.codec_context.width
        to_rgb = _rgb_converter(_import_av(), width, height)
        got: dict[int, np.ndarray] = {}

        def frame_index(frame: Any, ordinal: int, seeked: bool) -> int | None:
            if frame.pts is None or rate is None or not time_base:
                return None if seeked else ordinal
            return round(float((frame.pts - start_pts) * time_base * rate))

        def decode(seek_frame: int) -> bool:
            """Collect wanted frames; False when a seek overshot and decoding must restart from frame 0."""
            seeked = seek_frame > 0
            if seeked:
                target = start_pts + int(seek_frame / rate / time_base)
                container.seek(target, stream=stream, backward=True, any_frame=False)
            last = int(wanted[-1])
            for ordinal, frame in enumerate(container.decode(stream)):
                index = frame_index(frame, ordinal, seeked)
                if index is None or (ordinal == 0 and seeked and index > seek_frame):
                    return False
                if index > last:
                    break
                if index in got or index not in wanted_set:
                    continue
                got[index] = to_rgb(frame)
                if len(got) == len(wanted):
                    break
            return True

        wanted_set = set(int(i) for i in wanted)
        first = int(wanted[0])
        can_seek = first > 0 and rate is not None and bool(time_base)
        if not decode(first if can_seek else 0):
            got.clear()
            container.seek(start_pts, stream=stream, backward=True, any_frame=False)
            decode(0)
    if not got:
        raise _LoadFailure("no frame could be decoded")
    # A video can hold fewer frames than its metadata says: use the nearest decoded frame for the rest.
    have = np.array(sorted(got))
    nearest = have[np.clip(np.searchsorted(have, wanted), 0, len(have) - 1)]
    lower = have[np.clip(np.searchsorted(have, wanted) - 1, 0, len(have) - 1)]
    nearest = np.where(np.abs(lower - wanted) <= np.abs(nearest - wanted), lower, nearest)
    frames = np.stack([got[int(i)] for i in nearest])
    return frames, np.searchsorted(wanted, indices)


def _read_frame_folder(path: Path, pick: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`_decode_video` for a folder of image files (all scaled to the first one's size)."""
    from PIL import Image

    files = _frame_files(path)
    if not files:
        raise _LoadFailure("frame folder has no .jpg/.png frames")
    indices = pick(len(files))
    wanted = np.unique(indices)
    frames: list[np.ndarray] = []
    for i in wanted:
        with Image.open(files[int(i)]) as image:
            image = image.convert("RGB")
            if frames and image.size != (frames[0].shape[1], frames[0].shape[0]):
                image = image.resize((frames[0].shape[1], frames[0].shape[0]), Image.Resampling.BILINEAR)
            frames.append(np.asarray(image))
    return np.stack(frames), np.searchsorted(wanted, indices)


def _resize_frames(frames: np.ndarray, config: ClipConfig) -> Tensor:
    """``uint8 [N, H, W, 3]`` → resized so the short side is ``config.short_side`` and the crop fits.

    One antialiased bilinear resize in torch for every source, so videos and frame folders match.
    """
    height, width = frames.shape[1:3]
    out_h, out_w = _target_size(height, width, config)
    thwc = torch.from_numpy(frames)
    if (out_h, out_w) == (height, width):
        return thwc
    nchw = thwc.permute(0, 3, 1, 2)
    resized = F.interpolate(nchw, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=True)
    return resized.permute(0, 2, 3, 1)


def temporal_indices(num_frames: int, config: ClipConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices ``int64 [K, clip_len]`` (``K = clips_per_video``) of the clips taken from a video.

    Training (``rng`` given, ``config.train``): each clip starts at a random frame. Otherwise K clips start
    evenly from the first to the last possible start (K = 1: the centre clip). A video shorter than the
    clip's span is looped: indices wrap around ``num_frames`` (eval clips then start at frame 0).
    """
    if num_frames < 1:
        raise _LoadFailure("video has no frames")
    clips, span = config.clips_per_video, config.span
    room = num_frames - span
    if config.train and rng is not None:
        starts = rng.integers(0, room + 1 if room >= 0 else num_frames, size=clips)
    elif room < 0:
        starts = np.zeros(clips, dtype=np.int64)
    elif clips == 1:
        starts = np.array([room // 2])
    else:
        starts = np.rint(np.linspace(0, room, clips)).astype(np.int64)
    offsets = np.arange(config.clip_len) * config.frame_stride
    return (starts[:, None] + offsets[None, :]) % num_frames


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def _remove_skip_dir(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


class ClipDataset(Dataset):
    """Clips from videos / frame folders; items are ``(clip, label)`` (see the module docstring).

    ``probe`` checks every sample when the dataset is built: ``"metadata"`` opens each video's container
    and stream (cheap; catches truncated and non-video files), ``"decode"`` also decodes its first frame,
    ``"none"`` leaves all checks to loading. Probing runs ``probe_workers`` threads and reports
    ``progress(done, total)``. Samples that fail are dropped and listed in :attr:`skipped`; if none are
    left, :class:`DataError` says so.
    """

    def __init__(
        self,
        sources: Sequence[VideoSource],
        classes: Sequence[str],
        config: ClipConfig,
        *,
        seed: int = 0,
        probe: str = "metadata",
        probe_workers: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        skipped: Iterable[tuple[Path, str]] = (),
        name: str = "dataset",
    ) -> None:
        if probe not in PROBES:
            raise ConfigError(f"unknown probe {probe!r}", hint=f"probe must be one of {', '.join(PROBES)}")
        self.classes = list(classes)
        self.config = config
        self.seed = int(seed)
        self.name = name
        self._index_skips: list[tuple[Path, str]] = [(Path(p), r) for p, r in skipped]
        sources = list(sources)
        if probe != "none":
            sources = self._probe_all(sources, probe, probe_workers, progress)
        if not sources:
            total = len(self._index_skips)
            first = f"; first: {self._index_skips[0][0]}: {self._index_skips[0][1]}" if total else ""
            raise DataError(
                f"{name}: none of its {total} videos or frame folders can be read{first}",
                hint="check the files (e.g. with ffprobe), re-encode or remove them",
            )
        self.sources: list[VideoSource] = sources
        # The epoch lives in shared memory so that persistent DataLoader workers see set_epoch().
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._load_skips: list[tuple[Path, str]] = []
        self._bad: set[int] = set()
        self._skip_dir = os.path.join(tempfile.gettempdir(), f"stjfd-skips-{uuid.uuid4().hex}")
        weakref.finalize(self, _remove_skip_dir, self._skip_dir, os.getpid())

    def _probe_all(
        self, sources: list[VideoSource], mode: str, workers: int | None, progress: Callable[[int, int], None] | None
    ) -> list[VideoSource]:
        errors = _read_errors()

        def check(source: VideoSource) -> VideoSource | str:
            try:
                return _probe(source, mode)
            except errors as exc:
                return _one_line(exc)

        workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        kept: list[VideoSource] = []
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for done, (source, result) in enumerate(zip(sources, pool.map(check, sources)), 1):
                if isinstance(result, VideoSource):
                    kept.append(result)
                else:
                    self._index_skips.append((source.path, result))
                if progress is not None:
                    progress(done, len(sources))
        return kept

    # ---- epochs and skips -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Choose the random draws of training augmentation (seen by DataLoader workers too)."""
        self._epoch.fill_(int(epoch))

    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """``(path, reason)`` of every sample dropped when indexing or skipped while loading, from this
        process and from all DataLoader workers, each path once."""
        entries = list(self._index_skips) + list(self._load_skips)
        if os.path.isdir(self._skip_dir):
            for log in sorted(Path(self._skip_dir).glob("*.tsv")):
                for line in log.read_text(encoding="utf-8").splitlines():
                    path, _, reason = line.partition("\t")
                    entries.append((Path(path), reason))
        seen: set[Path] = set()
        unique = []
        for path, reason in entries:
            if path not in seen:
                seen.add(path)
                unique.append((path, reason))
        return unique

    def _record_skip(self, index: int, reason: str) -> None:
        path = self.sources[index].path
        self._bad.add(index)
        self._load_skips.append((path, reason))
        try:
            os.makedirs(self._skip_dir, exist_ok=True)
            with open(os.path.join(self._skip_dir, f"{os.getpid()}.tsv"), "a", encoding="utf-8") as log:
                log.write(f"{path}\t{reason}\n")
        except OSError:
            pass  # the skip is still listed by this process

    # ---- items ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.sources]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self.sources)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        epoch = self.epoch
        errors = _read_errors()
        reason = ""
        tries = min(n, MAX_CONSECUTIVE_FAILURES)
        for attempt in range(tries):
            candidate = (index + attempt) % n
            if candidate in self._bad:
                continue
            # Seeded by the requested index, not the candidate: a replacement looks the same in every worker.
            rng = np.random.default_rng([self.seed, epoch, index])
            try:
                return self.load_clip(candidate, rng), self.sources[candidate].label
            except errors as exc:
                reason = _one_line(exc)
                self._record_skip(candidate, reason)
        raise DataError(
            f"{self.name}: {tries} samples in a row, from {self.sources[index].path} on, cannot be read "
            f"(last error: {reason or 'all were skipped before'})",
            hint="check the files (e.g. with ffprobe), re-encode or remove them",
        )

    def load_clip(self, index: int, rng: np.random.Generator | None = None) -> Tensor:
        """The clip tensor of sample ``index``; raises on unreadable data (``__getitem__`` handles that)."""
        config = self.config
        source = self.sources[index]
        train = config.train and rng is not None

        def pick(num_frames: int) -> np.ndarray:
            return temporal_indices(num_frames, config, rng if train else None)

        if source.kind == "frames":
            frames, positions = _read_frame_folder(source.path, pick)
        else:
            frames, positions = _decode_video(source.path, source.num_frames, pick)
        resized = _resize_frames(frames, config)
        clips = [self._to_tensor(resized[torch.from_numpy(row)], rng if train else None) for row in positions]
        return clips[0] if config.clips_per_video == 1 else torch.stack(clips)

    def _to_tensor(self, frames: Tensor, rng: np.random.Generator | None) -> Tensor:
        """Crop, flip, lay out and normalise one clip of resized frames ``uint8 [T, H, W, 3]``."""
        config = self.config
        crop_h, crop_w = config.size
        height, width = frames.shape[1:3]
        if rng is not None:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            flip = config.flip and bool(rng.random() < 0.5)
        else:
            top, left, flip = (height - crop_h) // 2, (width - crop_w) // 2, False
        # numpy, not torch, for this elementwise work: torch's intra-op threads made it ~100× slower on
        # busy machines (and DataLoader workers parallelise across samples anyway).
        thwc = frames.numpy()[:, top : top + crop_h, left : left + crop_w]
        if flip:
            thwc = thwc[:, :, ::-1]
        order = {"THWC": (0, 1, 2, 3), "TCHW": (0, 3, 1, 2), "CTHW": (3, 0, 1, 2)}[config.layout]
        out = np.ascontiguousarray(thwc.transpose(order))
        if config.dtype == "uint8":
            return torch.from_numpy(out)
        mean = config.mean or (0.0, 0.0, 0.0)
        std = config.std or (1.0, 1.0, 1.0)
        shape = [1, 1, 1, 1]
        shape[config.layout.index("C")] = 3
        scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(shape)
        shift = np.array([m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(shape)
        values = out.astype(np.float32)
        values *= scale
        values -= shift
        return torch.from_numpy(values)


# --------------------------------------------------------------------------------------------
# Building datasets
# --------------------------------------------------------------------------------------------


def _split_entry(root: Path, name: str) -> Path | None:
    if (root / name).is_dir():
        return root / name
    for ext in LIST_EXTENSIONS:
        if (root / f"{name}{ext}").is_file():
            return root / f"{name}{ext}"
    return None


def _resolve_normalization(
    mean: Sequence[float] | None, std: Sequence[float] | None, arch: str | None
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    if mean is not None or std is not None:
        return (tuple(mean) if mean is not None else None), (tuple(std) if std is not None else None)
    if arch is not None:
        return normalization_for(arch)
    return None, None


def build_datasets(
    root: str | Path,
    *,
    clip_len: int,
    size: int | tuple[int, int],
    frame_stride: int = 1,
    val_split: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    arch: str | None = None,
    layout: str = "CTHW",
    dtype: str = "float32",
    seed: int = 0,
    resize: int | None = None,
    flip: bool = True,
    train_clips_per_video: int = 1,
    val_clips_per_video: int = 1,
    probe: str = "metadata",
    probe_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ClipDataset, ClipDataset | None, list[str]]:
    """``(train_ds, val_ds, classes)`` from a dataset root (see the module docstring for the layouts).

    ``val_ds`` is ``None`` when the root has no ``val`` split and ``val_split`` is not given.
    Normalisation: explicit ``mean``/``std`` win over ``arch`` (whose pretrained statistics
    :func:`normalization_for` looks up); with neither, frames are scaled to 0..1.
    """
    root = Path(root)
    mean_, std_ = _resolve_normalization(mean, std, arch)
    common = dict(
        clip_len=clip_len, size=size, frame_stride=frame_stride, resize=resize, mean=mean_, std=std_,
        layout=layout, dtype=dtype, flip=flip,
    )
    train_config = ClipConfig(train=True, clips_per_video=train_clips_per_video, **common)
    val_config = ClipConfig(train=False, clips_per_video=val_clips_per_video, **common)

    train_entry = _split_entry(root, "train") if root.is_dir() else None
    val_entry = _split_entry(root, "val") if root.is_dir() else None
    if val_entry is not None and train_entry is None:
        raise DataError(f"{root} has a val split but no train split", hint="add train/ (or train.csv) beside val/")
    if train_entry is None:
        train_entry = root  # the root itself is one split (class folders or a list file)
    if val_entry is not None and val_split is not None:
        raise ConfigError(
            f"{root} already has a val split, and val_split={val_split} was given too",
            hint="drop val_split to use val/, or remove val/ to split train/",
        )
    train_sources, classes, train_skips = find_sources(train_entry)
    val_sources: list[VideoSource] | None = None
    val_skips: list[tuple[Path, str]] = []
    if val_entry is not None:
        val_sources, _, val_skips = find_sources(val_entry, classes)
    elif val_split is not None:
        train_sources, val_sources = split_sources(train_sources, val_split, seed)

    options = dict(seed=seed, probe=probe, probe_workers=probe_workers, progress=progress)
    train_ds = ClipDataset(train_sources, classes, train_config, skipped=train_skips, name=str(train_entry), **options)
    val_ds = None
    if val_sources is not None:
        val_name = str(val_entry) if val_entry is not None else f"{train_entry} (val_split={val_split})"
        val_ds = ClipDataset(val_sources, classes, val_config, skipped=val_skips, name=val_name, **options)
    return train_ds, val_ds, classes


def unlabeled_dataset(
    root: str | Path,
    *,
    clip_len: int,
    size: int | tuple[int, int],
    frame_stride: int = 1,
    train: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    arch: str | None = None,
    layout: str = "CTHW",
    dtype: str = "float32",
    seed: int = 0,
    resize: int | None = None,
    flip: bool = True,
    clips_per_video: int = 1,
    probe: str = "metadata",
    probe_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ClipDataset:
    """Every video under ``root`` (recursively, no class folders) as clips labelled −1 (for distillation)."""
    mean_, std_ = _resolve_normalization(mean, std, arch)
    config = ClipConfig(
        clip_len=clip_len, size=size, frame_stride=frame_stride, resize=resize, mean=mean_, std=std_,
        layout=layout, dtype=dtype, flip=flip, train=train, clips_per_video=clips_per_video,
    )
    sources = find_unlabeled_sources(root)
    return ClipDataset(
        sources, [], config, seed=seed, probe=probe, probe_workers=probe_workers, progress=progress, name=str(root)
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class EpochShuffleSampler(Sampler[int]):
    """A random permutation fixed by ``(seed, epoch)``: resuming at epoch e replays epoch e's order."""

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 0xC0FFEE])
        return iter(rng.permutation(self.length).tolist())

    def __len__(self) -> int:
        return self.length


def _worker_init(worker_id: int) -> None:
    # Clip randomness is seeded per sample; this only seeds user transforms that use global RNGs,
    # and keeps each worker to one thread so that W workers do not oversubscribe the cores.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    # Ctrl-C and SIGTERM are the main process's to handle (finish the step, save, exit 130 / 143). Both
    # reach every process of the group (the terminal's Ctrl-C; `timeout`, `docker stop`), and a worker
    # they killed would make the main process fail with "DataLoader worker … killed by signal" instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ClipLoader(DataLoader):
    """A DataLoader that advances the epoch of its dataset and sampler on every pass.

    The first pass is epoch 0 (or the epoch given to :meth:`set_epoch`, e.g. when resuming), the next
    one epoch + 1, and so on; training augmentation and shuffling differ per epoch yet replay exactly.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``."""
        self._next_epoch = int(epoch)

    @property
    def epoch(self) -> int:
        """The epoch of the pass in progress (or of the last one)."""
        return self._next_epoch - 1

    def __iter__(self) -> Iterator[Any]:
        epoch = self._next_epoch
        self._next_epoch += 1
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        sampler = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if self.num_workers > 0:
            # PyAV ≤ 13 leaves every closed container to the cyclic GC (streams and container refer to each
            # other). A worker forked before that GC ran would free the container itself and hang on the
            # decoder threads it did not inherit; collecting here frees them where those threads exist.
            gc.collect()
        return super().__iter__()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    sampler: Sampler | None = None,
    drop_last: bool | None = None,
    prefetch_factor: int | None = None,
) -> ClipLoader:
    """A :class:`ClipLoader` over ``dataset``: seeded shuffling (:class:`EpochShuffleSampler`) or the given
    ``sampler`` (e.g. ``DistributedSampler``, which then does the shuffling and gets ``set_epoch`` calls),
    ``workers`` worker processes kept alive between epochs, pinned memory when ``device`` is CUDA, and
    ``drop_last`` defaulting to ``shuffle``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an integer ≥ 0, got {workers!r}")
    if sampler is None and shuffle:
        sampler = EpochShuffleSampler(len(dataset), seed)
    try:
        device_type = torch.device(device).type if device is not None else "cpu"
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}", hint="e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    pin = device_type == "cuda" and torch.cuda.is_available()
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra.update(persistent_workers=True, worker_init_fn=_worker_init)
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return ClipLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        drop_last=shuffle if drop_last is None else drop_last,
        generator=generator,
        **extra,
    )


# --------------------------------------------------------------------------------------------
# Stage inputs for the alternating schedule
# --------------------------------------------------------------------------------------------

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
