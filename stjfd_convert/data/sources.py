"""Finding the samples of a split: class folders, frame folders, list files, unlabeled folders, val splits."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError
from .options import DataError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
LIST_EXTENSIONS = (".csv", ".tsv", ".txt")
UNLABELED = -1

_FOLDER_HINT = (
    "expected <split>/<class>/<video>.mp4 (or .avi/.mkv/.webm), <split>/<class>/<clip>/<frame>.jpg, "
    "or a list file of 'path,label' rows"
)


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


def _walk_samples(
    directory: Path, label: int, seen: set[str] | None = None, root: Path | None = None
) -> list[VideoSource]:
    """Videos and frame folders under ``directory`` (recursively), in a stable natural order.

    Each real folder is walked once (``seen``: a symlink loop or a second link to a folder adds nothing), and
    a linked folder that lies inside ``root`` (the split, walked anyway) is skipped: a link to another class
    would otherwise give its videos this class's label.
    """
    found: list[VideoSource] = []
    seen = set() if seen is None else seen
    root_real = os.path.realpath(root if root is not None else directory)
    seen.add(os.path.realpath(directory))
    try:
        children = sorted(directory.iterdir(), key=lambda p: natural_key(p.name))
    except OSError:
        return found
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir():
            real = os.path.realpath(child)
            if real in seen or (child.is_symlink() and (real + os.sep).startswith(root_real + os.sep)):
                continue
            if _has_frames(child):
                seen.add(real)
                found.append(VideoSource(child, label, "frames"))
            else:
                found.extend(_walk_samples(child, label, seen, root if root is not None else directory))
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
    seen: set[str] = set()
    for class_dir in class_dirs:
        if class_dir.name not in index:
            raise DataError(
                f"class folder {class_dir} is not one of the training classes",
                hint="val/ must use the class folder names of train/",
            )
        sources.extend(_walk_samples(class_dir, index[class_dir.name], seen, split))
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
