"""BatchNorm re-estimation at full resolution and evaluation (top-1/top-5, loss, per-class, confusion)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .checkpoint import _pretrained_normalization
from .config import FinetuneConfig
from .distributed import _amp_settings, _autocast, _current_dist, _Dist, _resolve_device, _ShardSampler
from .results import EvalResult
from .surgery import _last_linear

if TYPE_CHECKING:  # types only: data and saved_model are imported when evaluate_folder runs
    from ..data import ClipConfig
    from ..saved_model import ConvertedModel


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Re-estimate every BatchNorm's running mean/var from ``batches`` (full-resolution clips).

    Running statistics are reset and accumulated as a cumulative average (``momentum=None``) with only
    the BatchNorm layers in train mode (dropout etc. stay in eval) under ``no_grad``; momentum and every
    module's train/eval flag are restored. Only the running statistics (and ``num_batches_tracked``)
    change. Returns the number of batches used (0: no BatchNorm or no batches, nothing changed).
    """
    norms = _batch_norms(model)
    if not norms:
        return 0
    device = torch.device(device) if device is not None else next(model.parameters()).device
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    count = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad(), _autocast(device, autocast_dtype):
            for clips in batches:
                model(clips.to(device, non_blocking=True))
                count += 1
                if progress is not None:
                    progress(count)
        if count == 0:
            for m, (mean, var, tracked) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in flags.items():
            m.training = training
    return count


def _forward_clips(model: nn.Module, clips: Tensor) -> Tensor:
    """Logits of ``[B, C, T, H, W]`` or ``[B, K, C, T, H, W]`` (K clips per video: logits averaged)."""
    if clips.ndim == 6:
        batch, k = clips.shape[:2]
        logits = model(clips.flatten(0, 1))
        return logits.reshape(batch, k, -1).mean(1)
    return model(clips)


@dataclass
class _EvalSums:
    loss_sum: float
    count: int
    top1: int
    top5: int
    confusion: Tensor  # int64 [C, C]


def _evaluate_batches(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    dist: _Dist,
    progress: Callable[[int], None] | None = None,
) -> _EvalSums:
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss_sum, count, top1, top5
    try:
        with torch.no_grad():
            for index, (clips, labels) in enumerate(batches, 1):
                clips = clips.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                with _autocast(device, autocast_dtype):
                    logits = _forward_clips(model, clips)
                logits = logits.float()
                keep = labels >= 0
                if keep.any():
                    logits, labels = logits[keep], labels[keep]
                    sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
                    sums[1] += labels.numel()
                    topk = logits.topk(k, dim=1).indices
                    sums[2] += (topk[:, 0] == labels).sum()
                    sums[3] += (topk == labels[:, None]).any(1).sum()
                    confusion.index_put_(
                        (labels, topk[:, 0]), torch.ones_like(labels, dtype=torch.float64), accumulate=True
                    )
                if progress is not None:
                    progress(index)
    finally:
        model.train(was_training)
    dist.all_reduce(sums)
    dist.all_reduce(confusion)
    return _EvalSums(float(sums[0]), int(sums[1]), int(sums[2]), int(sums[3]), confusion.round().long().cpu())


def _eval_result(sums: _EvalSums, classes: Sequence[str], seconds: float) -> EvalResult:
    n = max(1, sums.count)
    confusion = sums.confusion
    per_class = []
    for i, name in enumerate(classes):
        total = int(confusion[i].sum())
        correct = int(confusion[i, i])
        per_class.append(
            {"class": name, "correct": correct, "total": total, "accuracy": correct / total if total else None}
        )
    return EvalResult(
        classes=list(classes),
        clips=sums.count,
        loss=sums.loss_sum / n if sums.count else float("nan"),
        top1=sums.top1 / n,
        top5=sums.top5 / n,
        top5_k=min(5, len(classes)),
        per_class=per_class,
        confusion=confusion.tolist(),
        seconds=seconds,
    )


def _num_classes(model: nn.Module, classes: Sequence[str] | None) -> int:
    if classes:
        return len(classes)
    last = _last_linear(model)
    if last is None:
        raise ConfigError("cannot tell the number of classes", "pass classes=[…]")
    return last[1].out_features


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    classes: Sequence[str] | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str | torch.device = "auto",
    amp: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Top-1/top-5 accuracy, mean cross-entropy, per-class accuracy and the confusion matrix of ``model``
    on ``dataset`` (items ``(clip, label)``; a clip ``[K, C, T, H, W]`` averages K logits). The model is
    moved to ``device`` and left in eval mode. Distributed when a process group is initialised."""
    from ..data import make_loader

    dist = _current_dist()
    device = _resolve_device(str(device), dist.local_rank)
    classes = list(classes if classes is not None else getattr(dataset, "classes", []) or [])
    num_classes = _num_classes(model, classes)
    if not classes:
        classes = [str(i) for i in range(num_classes)]
    autocast_dtype, _ = _amp_settings(FinetuneConfig(amp=amp), device)
    sampler = _ShardSampler(len(dataset), dist.world_size, dist.rank)
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers, device=device, sampler=sampler)
    model.to(device)
    start = time.perf_counter()
    total = len(loader)
    sums = _evaluate_batches(
        model, loader, num_classes, device, autocast_dtype, dist,
        (lambda done: progress(done, total)) if progress else None,
    )
    model.eval()
    return _eval_result(sums, classes, time.perf_counter() - start)


def evaluate_folder(
    model_dir: str | Path,
    data: str | Path,
    *,
    clip_len: int | None = None,
    size: int | tuple[int, int] | None = None,
    frame_stride: int | None = None,
    clips_per_video: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str = "auto",
    amp: bool = False,
    trust_pickle: bool = False,
    trust_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
    playback_speed: float = 1.0,
) -> tuple[EvalResult, list[tuple[str, str]]]:
    """Evaluate a saved model folder (``runs/x/best``, or any converted model) on a labelled split.

    Clip options default to those recorded by fine-tuning in the manifest; classes are the run's (else
    the split's folder names). ``data`` is a split (class folders or list file), or a root holding ``val/``.
    ``playback_speed`` resamples each clip's frames as if the videos played that many times as fast (0.5:
    slowed 2×; ``data.ClipConfig``) and is recorded in the result. Returns the result and the skipped
    (path, reason) pairs.
    """
    from ..data import ClipDataset, DataError, check_playback_speed, find_sources
    from ..saved_model import load_converted

    playback_speed = check_playback_speed(playback_speed)
    loaded = load_converted(model_dir, trust_pickle=trust_pickle, trust_code=trust_code)
    recorded = (loaded.manifest.get("finetune") or {}) if isinstance(loaded.manifest.get("finetune"), dict) else {}
    classes = recorded.get("classes")
    config = _recorded_clip_config(
        model_dir, loaded, recorded.get("clip") or {}, clip_len=clip_len, size=size, frame_stride=frame_stride,
        clips_per_video=clips_per_video, mean=mean, std=std,
    )
    config = replace(config, playback_speed=playback_speed)
    split = Path(data)
    if split.is_dir() and (split / "val").is_dir() and not (classes and "val" in classes):
        split = split / "val"
    sources, found_classes, skipped = find_sources(split, classes)
    if not sources:
        raise DataError(f"{split} has no videos to evaluate", "pass a folder of class folders or a list file")
    dataset = ClipDataset(sources, found_classes, config, name=str(split))
    result = evaluate(
        loaded.model, dataset, classes=found_classes, batch_size=batch_size, workers=workers, device=device,
        amp=amp, progress=progress,
    )
    result.playback_speed = playback_speed
    return result, [(str(p), r) for p, r in dataset.skipped]


def _recorded_clip_config(
    model_dir: str | Path,
    loaded: ConvertedModel,
    clip: Mapping[str, Any],
    *,
    clip_len: int | None,
    size: int | tuple[int, int] | None,
    frame_stride: int | None,
    clips_per_video: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> ClipConfig:
    """The evaluation clips of a saved model (``loaded``): each option as given, else as fine-tuning
    recorded it (``clip``), else from the manifest's input shape; normalisation else the torchvision
    architecture's."""
    from ..data import ClipConfig

    clip_len = clip_len or clip.get("clip_len")
    if size is None and clip.get("size"):
        size = tuple(clip["size"])
    if clip_len is None or size is None:
        shape = (loaded.manifest.get("input") or {}).get("shape")
        if shape and len(shape) == 5:
            clip_len = clip_len or shape[2]
            size = size or (shape[3], shape[4])
    if clip_len is None or size is None:
        raise ConfigError(f"{model_dir} records no clip size", "pass --clip-len and --size")
    if mean is None and std is None:
        mean, std = clip.get("mean"), clip.get("std")
        if mean is None:
            mean, std = _pretrained_normalization(loaded.spec) or (mean, std)
    return ClipConfig(
        clip_len=int(clip_len), size=size if isinstance(size, int) else tuple(int(s) for s in size),
        frame_stride=int(frame_stride or clip.get("frame_stride") or 1), resize=clip.get("resize"), train=False,
        clips_per_video=int(clips_per_video or clip.get("clips_per_video") or 1),
        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
    )
