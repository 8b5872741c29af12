"""How close a converted model stays to its original on real clips: per output, over a folder of videos.

:func:`compare_on_clips` runs both models (eval mode, no grad) on every clip of a dataset and reports, for
each output tensor they return (tensor / tuple / list / dict, matched by position and key):

- ``rel_error``: ‖converted − original‖ / ‖original‖ over all clips;
- ``cosine``: the mean, over clips, of the cosine similarity of the two outputs;
- ``top1_agreement``: for a classifier's [B, K > 1] logits, the share of clips whose arg-max agrees;
- ``events`` (precision, recall, F1): for per-frame probabilities [B, T] (any [B, N] output whose values all
  lie in [0, 1]; small logits do too, so a classifier may get both figures), the onsets of
  ``p ≥ threshold`` in the converted model's output matched one-to-one to the original's within
  ± ``tolerance`` frames.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .errors import ConfigError
from .inputs import fresh
from .parity import flatten_outputs


@dataclass
class EventScores:
    """Onsets of thresholded per-frame probabilities: the converted model's against the original's."""

    original_events: int = 0
    converted_events: int = 0
    matched: int = 0

    @property
    def precision(self) -> float | None:
        return self.matched / self.converted_events if self.converted_events else None

    @property
    def recall(self) -> float | None:
        return self.matched / self.original_events if self.original_events else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None:
            return 1.0 if self.original_events == self.converted_events == 0 else None
        return 2 * p * r / (p + r) if p + r else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1}


@dataclass
class OutputComparison:
    """One output of the two models over all clips."""

    name: str
    shape: tuple[int, ...]  # per clip
    rel_error: float
    cosine: float
    top1_agreement: float | None = None
    events: EventScores | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["events"] = self.events.to_dict() if self.events is not None else None
        return data


@dataclass
class ComparisonResult:
    clips: int
    outputs: list[OutputComparison] = field(default_factory=list)
    threshold: float = 0.5
    tolerance: int = 1
    seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (video, why) left out: unreadable

    def to_dict(self) -> dict[str, Any]:
        return {"clips": self.clips, "threshold": self.threshold, "tolerance": self.tolerance,
                "seconds": self.seconds, "outputs": [o.to_dict() for o in self.outputs],
                "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped]}


def onsets(active: Tensor) -> list[int]:
    """Frame indices where a boolean [T] signal turns on."""
    previous = torch.cat([active.new_zeros(1), active[:-1]])
    return torch.nonzero(active & ~previous).flatten().tolist()


def match_events(reference: list[int], candidate: list[int], tolerance: int) -> int:
    """One-to-one matches of ``candidate`` onsets to ``reference`` onsets within ± ``tolerance`` frames
    (greedy in time order, nearest first: both lists are short and sorted)."""
    used: set[int] = set()
    matched = 0
    for frame in candidate:
        best = None
        for index, ref in enumerate(reference):
            if index not in used and abs(ref - frame) <= tolerance and (
                best is None or abs(ref - frame) < abs(reference[best] - frame)
            ):
                best = index
        if best is not None:
            used.add(best)
            matched += 1
    return matched


class _Running:
    """Accumulates one output's figures clip batch by clip batch."""

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape
        self.diff_sq = self.ref_sq = self.cosine_sum = 0.0
        self.count = self.agree = 0
        self.classifier = len(shape) == 1 and shape[0] > 1
        self.probabilities = True
        self.events = EventScores()

    def add(self, a: Tensor, b: Tensor, threshold: float, tolerance: int) -> None:
        a64, b64 = a.detach().double().flatten(1), b.detach().double().flatten(1)
        self.diff_sq += float(((b64 - a64) ** 2).sum())
        self.ref_sq += float((a64**2).sum())
        self.cosine_sum += float(torch.nn.functional.cosine_similarity(a64, b64, dim=1, eps=1e-12).sum())
        self.count += a64.shape[0]
        if self.classifier:
            self.agree += int((a.argmax(1) == b.argmax(1)).sum())
        self.probabilities = self.probabilities and bool(((a >= 0) & (a <= 1)).all())
        if self.probabilities and a.dim() == 2:
            for ref, cand in zip(a, b):
                r, c = onsets(ref >= threshold), onsets(cand >= threshold)
                self.events.original_events += len(r)
                self.events.converted_events += len(c)
                self.events.matched += match_events(r, c, tolerance)

    def result(self) -> OutputComparison:
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else math.sqrt(self.diff_sq)
        # Which reading fits is the user's to say (small logits lie in [0, 1] too): a [B, K > 1] output gets
        # top-1 agreement, and one whose values all lie in [0, 1] also gets per-frame event scores.
        per_frame = self.probabilities and len(self.shape) == 1
        return OutputComparison(
            self.name, self.shape, rel, self.cosine_sum / max(self.count, 1),
            self.agree / self.count if self.classifier and self.count else None,
            self.events if per_frame else None,
        )


def _check_event_options(threshold: float, tolerance: int) -> None:
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must be between 0 and 1, got {threshold}", "e.g. --threshold 0.5")
    if tolerance < 0:
        raise ConfigError(f"--tolerance must be ≥ 0 frames, got {tolerance}", "e.g. --tolerance 1")


def compare_on_clips(
    original: nn.Module,
    converted: nn.Module,
    batches: Iterable[Any],
    *,
    threshold: float = 0.5,
    tolerance: int = 1,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> ComparisonResult:
    """Run both models on every batch of clips (``clips`` or ``(clips, labels)``) and compare every output."""
    import time

    _check_event_options(threshold, tolerance)
    start = time.perf_counter()
    original, converted = original.eval().to(device), converted.eval().to(device)
    running: list[_Running] | None = None
    clips_seen = 0
    with torch.no_grad():
        for batch in batches:
            clips = batch[0] if isinstance(batch, (tuple, list)) else batch
            clips = clips.to(device)
            a_out, b_out = flatten_outputs(original(fresh(clips))), flatten_outputs(converted(fresh(clips)))
            if [n for n, _ in a_out] != [n for n, _ in b_out] or any(x.shape != y.shape for (_, x), (_, y) in zip(a_out, b_out)):
                raise ConfigError(
                    "the two models return different outputs "
                    f"({', '.join(f'{n} {tuple(t.shape)}' for n, t in a_out[:3])} vs "
                    f"{', '.join(f'{n} {tuple(t.shape)}' for n, t in b_out[:3])})",
                    "compare a converted model with the model it was converted from",
                )
            if running is None:
                running = [_Running(name, tuple(t.shape[1:])) for name, t in a_out]
            for slot, (_, a), (_, b) in zip(running, a_out, b_out):
                slot.add(a, b, threshold, tolerance)
            clips_seen += int(clips.shape[0])
            if progress is not None:
                progress(clips_seen)
    if running is None:
        raise ConfigError("no clips to compare on", "pass a folder holding videos")
    return ComparisonResult(clips_seen, [slot.result() for slot in running], threshold, tolerance,
                            time.perf_counter() - start)


def compare_paths(
    original: str | Any,
    converted: str | Any,
    clips: str | Any,
    *,
    arch: str | None = None,
    model: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    clip_len: int | None = None,
    size: int | tuple[int, int] | None = None,
    mean: Any = None,
    std: Any = None,
    batch_size: int = 4,
    threshold: float = 0.5,
    tolerance: int = 1,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    layout: str | None = None,
    dtype: str | None = None,
    resize_mode: str | None = None,
    normalize: bool = True,
) -> ComparisonResult:
    """``stjfd compare``: ``original`` (a checkpoint — by default with the architecture the converted folder
    records — or a folder) against the ``converted`` folder, on the centre clip of every video under ``clips``
    (recursively). Clip length, frame size, normalisation, ``layout`` (``BTHWC``…), ``dtype`` and
    ``resize_mode`` default to what the converted folder records; ``normalize=False``: no mean/std."""
    from pathlib import Path

    from torch.utils.data import DataLoader

    from .config import check_device
    from .data import check_resize_mode, unlabeled_dataset
    from .finetune.evaluation import _recorded_clip_config
    from .finetune.run import _load_any_model
    from .inputs import attach_pathway_split, recorded_input
    from .layouts import check_given_format
    from .saved_model import is_converted_dir, load_converted

    _check_event_options(threshold, tolerance)
    device = check_device(device)
    layout, dtype = check_given_format(layout, dtype)
    resize_mode = check_resize_mode(resize_mode) if resize_mode is not None else None
    if not Path(original).exists():
        raise ConfigError(f"{original} does not exist", "pass the original checkpoint (or converted folder)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {batch_size}", "e.g. --batch-size 4")
    if not is_converted_dir(Path(converted)):
        raise ConfigError(f"{converted} is not a converted-model folder", "pass the folder `stjfd convert` wrote")
    if not Path(clips).is_dir():
        raise ConfigError(f"{clips} is not a folder of videos", "pass the folder holding the held-out clips")
    student = load_converted(converted, trust_pickle=trust_pickle, trust_code=trust_code, model=model)
    spec = student.spec
    if arch is None and model is None and not is_converted_dir(Path(original)):
        arch, model, model_kwargs = spec.loader_options(model_kwargs)
    teacher, _, _ = _load_any_model(original, arch=arch, model=model, model_kwargs=model_kwargs,
                                    trust_pickle=trust_pickle, trust_code=trust_code)
    clip = ((student.manifest.get("finetune") or {}).get("clip") or {}) if isinstance(student.manifest.get("finetune"), dict) else {}
    config = _recorded_clip_config(converted, student, clip, clip_len=clip_len, size=size, frame_stride=None,
                                   clips_per_video=None, mean=mean, std=std, layout=layout, dtype=dtype,
                                   resize_mode=resize_mode, normalize=normalize)
    dataset = unlabeled_dataset(
        clips, clip_len=config.clip_len, size=config.size, frame_stride=config.frame_stride, train=False,
        mean=config.mean, std=config.std, layout=config.layout, dtype=config.dtype, resize_mode=config.resize_mode,
    )
    _, _, container, strides = recorded_input(student.manifest)
    for net in (teacher, student.model):
        attach_pathway_split(net, strides, container)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    result = compare_on_clips(teacher, student.model, loader, threshold=threshold, tolerance=tolerance, device=device,
                              progress=progress)
    result.skipped = [(str(path), reason) for path, reason in dataset.skipped]
    return result
