"""Reading frames: PyAV videos (seek, decode only what a clip needs), frame folders, resizing, clip indices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .options import ClipConfig, DataError
from .sources import VideoSource, _frame_files


class _LoadFailure(Exception):
    """A sample that cannot be read; the message is the reason recorded in ``skipped``."""


# The largest frame a video may declare (8K UHD is 7680×4320): a header claiming more is refused when the
# dataset is indexed instead of decoded into gigabytes.
MAX_FRAME_SIDE = 8192
MAX_FRAME_PIXELS = MAX_FRAME_SIDE * MAX_FRAME_SIDE


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


def describe_read_error(exc: BaseException, path: Path) -> str:
    """Why ``path`` could not be read, in one line: an empty file says so; an FFmpeg or OS error gives its
    reason without the errno and the path (``[Errno 1094995529] … 'x.mp4'`` → ``Invalid data found …``)."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            return "the file is empty (0 bytes)"
    except OSError:
        pass
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _target_size(height: int, width: int, config: ClipConfig) -> tuple[int, int]:
    """(height, width) after resizing so the short side is ``config.short_side`` and the crop fits
    (``resize_mode="stretch"``: exactly ``config.size``)."""
    crop_h, crop_w = config.size
    if config.resize_mode == "stretch":
        return crop_h, crop_w
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
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        container.close()
        raise _LoadFailure("video stream has no frame size")
    if width * height > MAX_FRAME_PIXELS:
        container.close()
        raise _LoadFailure(
            f"its stream declares {width}×{height} frames, more than the {MAX_FRAME_SIDE}×{MAX_FRAME_SIDE} pixels "
            "stjfd decodes (a damaged or hostile header; one such frame would need gigabytes)"
        )
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
    clip's span is looped: indices wrap around ``num_frames`` (eval clips then start at frame 0). Within a
    clip, frames follow ``config.offsets``: every ``frame_stride``-th frame, resampled by ``playback_speed``
    (0.5 repeats each frame, 2 skips every other one).
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
    offsets = np.asarray(config.offsets, dtype=np.int64)
    return (starts[:, None] + offsets[None, :]) % num_frames
