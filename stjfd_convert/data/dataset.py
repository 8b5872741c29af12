""":class:`ClipDataset`: probing at build time, seeded per-sample randomness, skips gathered from workers."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import ConfigError
from .decode import (
    _decode_video,
    _probe,
    _read_errors,
    _read_frame_folder,
    _resize_frames,
    describe_read_error,
    temporal_indices,
)
from .options import ClipConfig, DataError
from .sources import VideoSource

PROBES = ("none", "metadata", "decode")

# Give up (DataError) after this many consecutive samples fail to load: the data, not one file, is broken.
MAX_CONSECUTIVE_FAILURES = 32


def _remove_skip_dir(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


class ClipDataset(Dataset):
    """Clips from videos / frame folders; items are ``(clip, label)`` (see :mod:`stjfd_convert.data`).

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
                return describe_read_error(exc, source.path)

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
                reason = describe_read_error(exc, self.sources[candidate].path)
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


def check_clip_fits(dataset: ClipDataset, *, refuse: bool = True) -> str | None:
    """Videos of ``dataset`` shorter than a clip. With ``refuse``, a clip far longer than every video
    (``--clip-len 1000`` on 32-frame videos: each clip would loop its video many times, and accuracy or
    training on such clips means nothing) is a ConfigError. Otherwise returns a warning when some videos
    are shorter than a clip (their frames are looped), else None; videos of unknown length are not judged."""
    lengths = [s.num_frames for s in dataset.sources if s.num_frames is not None]
    config = dataset.config
    short = sum(1 for n in lengths if n < config.span)
    if not short:
        return None
    longest = max(lengths)
    if refuse and len(lengths) == len(dataset.sources) and 2 * longest < config.span:
        clip = (f"a clip of {config.clip_len} frames spans {config.span}" if config.span != config.clip_len
                else f"a clip spans {config.span}")
        raise ConfigError(
            f"{dataset.name}: {clip} frames, but the longest video has {longest}: every clip would repeat its "
            f"video's frames {config.span / longest:.0f}×",
            f"pass --clip-len {max(1, longest // config.frame_stride)} or less, or use videos at least {config.span} "
            "frames long",
        )
    longest_note = f" (the longest has {longest})" if short == len(dataset.sources) else ""
    return (
        f"{short} of {len(dataset.sources)} videos in {dataset.name} have fewer frames than the {config.span} a clip "
        f"spans{longest_note}: their frames were repeated (looped) to fill the clip"
    )
