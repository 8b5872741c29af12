"""Datasets from a dataset root: train/val splits (or a val_split of one), or an unlabeled folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ConfigError
from .dataset import ClipDataset
from .options import ClipConfig, DataError, normalization_for
from .sources import LIST_EXTENSIONS, VideoSource, find_sources, find_unlabeled_sources, split_sources


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
    resize_mode: str = "crop",
    flip: bool = True,
    train_clips_per_video: int = 1,
    val_clips_per_video: int = 1,
    probe: str = "metadata",
    probe_workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    check_classes: bool = False,
) -> tuple[ClipDataset, ClipDataset | None, list[str]]:
    """``(train_ds, val_ds, classes)`` from a dataset root (see :mod:`stjfd_convert.data` for the layouts).

    ``val_ds`` is ``None`` when the root has no ``val`` split and ``val_split`` is not given.
    Normalisation: explicit ``mean``/``std`` win over ``arch`` (whose pretrained statistics
    :func:`normalization_for` looks up); with neither, frames are scaled to 0..1. ``check_classes``
    (fine-tuning a classifier) refuses fewer than two classes or a class without a readable training video.
    """
    root = Path(root)
    mean_, std_ = _resolve_normalization(mean, std, arch)
    common = dict(
        clip_len=clip_len, size=size, frame_stride=frame_stride, resize=resize, mean=mean_, std=std_,
        layout=layout, dtype=dtype, flip=flip, resize_mode=resize_mode,
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
    if check_classes:
        _check_classes(train_ds, classes, train_entry)
    val_ds = None
    if val_sources is not None:
        val_name = str(val_entry) if val_entry is not None else f"{train_entry} (val_split={val_split})"
        val_ds = ClipDataset(val_sources, classes, val_config, skipped=val_skips, name=val_name, **options)
    return train_ds, val_ds, classes


def _check_classes(train: ClipDataset, classes: Sequence[str], where: Path) -> None:
    """A classifier needs two classes or more, each with a readable training video (an empty class folder
    would be a class the model can never learn)."""
    if len(classes) < 2:
        raise DataError(
            f"{where} has {'only one class' if classes else 'no classes'}"
            + (f" ({classes[0]})" if classes else ""),
            hint="fine-tuning a classifier needs at least two class folders (or labels)",
        )
    counts = [0] * len(classes)
    for source in train.sources:
        if 0 <= source.label < len(counts):
            counts[source.label] += 1
    empty = [name for name, n in zip(classes, counts) if n == 0]
    if empty:
        listed = ", ".join(empty[:3]) + (" …" if len(empty) > 3 else "")
        raise DataError(
            f"{'classes' if len(empty) > 1 else 'class'} {listed} in {where} {'have' if len(empty) > 1 else 'has'} "
            "no readable training videos",
            hint="add videos to those class folders, or remove the empty folders",
        )


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
    resize_mode: str = "crop",
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
        layout=layout, dtype=dtype, flip=flip, train=train, clips_per_video=clips_per_video, resize_mode=resize_mode,
    )
    sources = find_unlabeled_sources(root)
    return ClipDataset(
        sources, [], config, seed=seed, probe=probe, probe_workers=probe_workers, progress=progress, name=str(root)
    )
