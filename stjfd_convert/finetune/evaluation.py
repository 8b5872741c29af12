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

from ..config import check_device
from ..errors import ConfigError
from ..inputs import attach_pathway_split, move_input, recorded_input
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
                model(move_input(clips, device, non_blocking=True))  # a tensor, or one per pathway
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
                if logits.ndim != 2 or logits.shape[1] != num_classes:
                    raise ConfigError(
                        f"the model gives {tuple(logits.shape[1:])} scores per clip but {num_classes} classes are "
                        "evaluated",
                        "evaluate on the classes the model was trained for (pass --labels FILE naming its outputs)",
                    )
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
    labels: str | Path | None = None,
    layout: str | None = None,
    dtype: str | None = None,
    resize_mode: str | None = None,
    normalize: bool = True,
) -> tuple[EvalResult, list[tuple[str, str]]]:
    """Evaluate a saved model folder (``runs/x/best``, or any converted model) on a labelled split.

    Clip options default to those recorded by fine-tuning in the manifest. Class folders (or list labels)
    are matched to the model's outputs by name: the names come from ``labels`` (a file, one class name per
    output line), else the run's (fine-tuning records them), else the manifest's ``classes`` (convert
    records them for the bundled sample model); a folder that is not one of them is refused. A model that
    records no names takes the folder names in sorted order as outputs 0, 1, … (``result.class_note`` says
    so; more folders than outputs are refused). ``data`` is a split (class folders or list file), or a
    root holding ``val/``.
    ``playback_speed`` resamples each clip's frames as if the videos played that many times as fast (0.5:
    slowed 2×; ``data.ClipConfig``) and is recorded in the result. ``layout`` (``BTHWC``…), ``dtype``,
    ``resize_mode`` and ``normalize`` override what the folder records. Returns the result and the skipped
    (path, reason) pairs.
    """
    from ..data import ClipDataset, DataError, check_playback_speed, check_resize_mode, find_sources
    from ..data.dataset import check_clip_fits
    from ..layouts import check_given_format
    from ..saved_model import load_converted

    playback_speed = check_playback_speed(playback_speed)
    layout, dtype = check_given_format(layout, dtype)
    resize_mode = check_resize_mode(resize_mode) if resize_mode is not None else None
    check_device(device)  # before the model and the data are loaded
    for flag, value, least in (("--clip-len", clip_len, 1), ("--frame-stride", frame_stride, 1),
                               ("--clips", clips_per_video, 1), ("--batch-size", batch_size, 1),
                               ("--workers", workers, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be ≥ {least}, got {value}", f"e.g. {flag} {max(least, 2)}")
    loaded = load_converted(model_dir, trust_pickle=trust_pickle, trust_code=trust_code)
    _, _, container, strides = recorded_input(loaded.manifest)
    attach_pathway_split(loaded.model, strides, container)  # a multi-pathway model: its pathways from each clip
    recorded = (loaded.manifest.get("finetune") or {}) if isinstance(loaded.manifest.get("finetune"), dict) else {}
    config = _recorded_clip_config(
        model_dir, loaded, recorded.get("clip") or {}, clip_len=clip_len, size=size, frame_stride=frame_stride,
        clips_per_video=clips_per_video, mean=mean, std=std, layout=layout, dtype=dtype, resize_mode=resize_mode,
        normalize=normalize,
    )
    config = replace(config, playback_speed=playback_speed)
    split = Path(data)
    classes, classes_from = _model_classes(loaded.manifest, labels)
    if split.is_dir() and (split / "val").is_dir() and not (classes and "val" in classes):
        split = split / "val"
    outputs = _outputs(loaded.model)
    classes, classes_from, note = _match_classes(split, classes, classes_from, outputs)
    sources, found_classes, skipped = find_sources(split, classes)
    if not sources:
        raise DataError(f"{split} has no videos to evaluate", "pass a folder of class folders or a list file")
    if classes is None and split.is_file():
        # A list file's labels: integers index the outputs, names are taken in sorted order.
        classes_from = "list indices" if found_classes == [str(i) for i in range(len(found_classes))] else "assumed"
        if outputs is not None and len(found_classes) > outputs:
            raise ConfigError(
                f"{split} has {len(found_classes)} classes but the model has {outputs} outputs",
                "evaluate on the classes the model was trained for, or pass --labels FILE naming its outputs",
            )
        if classes_from == "assumed":
            note = _assumed_note(found_classes, "the list file's class names")
        found_classes = _padded(found_classes, outputs)
    dataset = ClipDataset(sources, found_classes, config, name=str(split))
    # Videos shorter than a clip (one-frame videos, or --clip-len 1000 on 32 frames) are looped, with a warning.
    short_videos = check_clip_fits(dataset, refuse=False)
    result = evaluate(
        loaded.model, dataset, classes=found_classes, batch_size=batch_size, workers=workers, device=device,
        amp=amp, progress=progress,
    )
    result.playback_speed = playback_speed
    result.warnings = [short_videos] if short_videos else []
    result.classes_from, result.class_note = classes_from, note
    return result, [(str(p), r) for p, r in dataset.skipped]


_ORIGINS = {"labels": "the --labels file", "run": "the fine-tuning run", "manifest": "the model's manifest"}


def _read_labels(path: str | Path) -> list[str]:
    """Class names, one per line in output order (blank lines ignored)."""
    path = Path(path)
    hint = "pass a text file with one class name per line, in the order of the model's outputs"
    if not path.is_file():
        raise ConfigError(f"--labels {path} {'is a folder' if path.is_dir() else 'does not exist'}", hint)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --labels {path}: {exc.strerror or exc}", hint) from None
    if not names:
        raise ConfigError(f"--labels {path} names no classes", hint)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--labels {path} names {', '.join(map(repr, repeated[:3]))} more than once", hint)
    return names


def _model_classes(manifest: Mapping[str, Any], labels: str | Path | None) -> tuple[list[str] | None, str]:
    """The model's class names in output order and where they come from (None, "assumed": unknown)."""
    if labels is not None:
        return _read_labels(labels), "labels"
    recorded = manifest.get("finetune")
    for names, origin in ((recorded.get("classes") if isinstance(recorded, dict) else None, "run"),
                          (manifest.get("classes"), "manifest")):
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return list(names), origin
    return None, "assumed"


def _outputs(model: nn.Module) -> int | None:
    last = _last_linear(model)
    return None if last is None else last[1].out_features


def _padded(names: Sequence[str], outputs: int | None) -> list[str]:
    """``names``, then the label ``output i`` for each output no class maps to (every prediction gets a column)."""
    return [*names, *(f"output {i}" for i in range(len(names), outputs or 0))]


def _assumed_note(names: Sequence[str], what: str) -> str:
    shown = ", ".join(f"{n}→{i}" for i, n in enumerate(names[:6])) + (", …" if len(names) > 6 else "")
    return (f"the model records no class names, so {what} were taken in sorted order as its outputs ({shown}); "
            "pass --labels FILE (one class name per output) to match them by name")


def _match_classes(
    split: Path, classes: list[str] | None, origin: str, outputs: int | None
) -> tuple[list[str] | None, str, str | None]:
    """``(classes for find_sources, where they came from, a note when the order is assumed)``; refuses class
    folders that are not among the model's classes, or more of them than it has outputs."""
    hint = "name the class folders after the model's classes, or pass --labels FILE naming its outputs in order"
    if classes is not None:
        if outputs is not None and len(classes) != outputs:
            raise ConfigError(
                f"{_ORIGINS[origin]} names {len(classes)} classes but the model has {outputs} outputs",
                "pass --labels FILE with one class name per output, in output order",
            )
        if split.is_dir():
            unknown = [p.name for p in sorted(split.iterdir()) if p.is_dir() and not p.name.startswith(".")
                       and p.name not in classes]
            if unknown:
                known = ", ".join(classes[:6]) + (", …" if len(classes) > 6 else "")
                raise ConfigError(
                    f"class folder{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:3])}"
                    f"{' …' if len(unknown) > 3 else ''} in {split} {'are' if len(unknown) > 1 else 'is'} not among "
                    f"the model's classes ({known}; from {_ORIGINS[origin]})", hint,
                )
        return classes, origin, None
    if not split.is_dir():
        return None, origin, None  # a list file (handled once read) or a missing path (find_sources says so)
    folders = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        return None, origin, None
    if all(name.isdigit() and str(int(name)) == name for name in folders):
        count = max(int(name) for name in folders) + 1
        if outputs is not None and count > outputs:
            raise ConfigError(f"class folder {count - 1} in {split} is past the model's {outputs} outputs", hint)
        note = "the model records no class names, so class folder N was taken as output N"
        return [str(i) for i in range(max(count, outputs or 0))], "folder numbers", note
    if outputs is not None and len(folders) > outputs:
        raise ConfigError(f"{split} has {len(folders)} class folders but the model has {outputs} outputs", hint)
    return _padded(folders, outputs), "assumed", _assumed_note(folders, "the class folders")


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
    layout: str | None = None,
    dtype: str | None = None,
    resize_mode: str | None = None,
    normalize: bool = True,
) -> ClipConfig:
    """The evaluation clips of a saved model (``loaded``): each option as given, else as fine-tuning
    recorded it (``clip``), else from the manifest (its input shape, ``input.layout``, ``input.dtype``);
    normalisation else the torchvision architecture's (none with ``normalize=False``). ``layout`` is the
    batched ``--input-layout`` (``BTHWC``) or a per-clip one (``THWC``)."""
    from ..data import ClipConfig
    from ..layouts import CLIP_LAYOUTS, check_input_layout, recorded_layout, resolve_input_format, to_bcthw

    if not normalize and (mean is not None or std is not None):
        raise ConfigError("--no-normalize and --mean/--std contradict each other", "drop one of them")
    manifest_layout, manifest_dtype = resolve_input_format(loaded.manifest)
    if layout is None and clip.get("layout"):
        layout = str(clip["layout"])
    layout = check_input_layout(layout) if layout is not None else manifest_layout
    dtype = dtype or (str(clip["dtype"]) if clip.get("dtype") else manifest_dtype)
    clip_len = clip_len or clip.get("clip_len")
    if size is None and clip.get("size"):
        size = tuple(clip["size"])
    if clip_len is None or size is None:
        shape = (loaded.manifest.get("input") or {}).get("shape")
        if shape and len(shape) == 5 and all(isinstance(v, int) for v in shape):
            # The manifest's shape is in the layout it records, else in the model's own (the one resolved here).
            _, _, frames, height, width = to_bcthw(tuple(shape), recorded_layout(loaded.manifest) or layout)
            clip_len = clip_len or frames
            size = size or (height, width)
    if clip_len is None or size is None:
        raise ConfigError(f"{model_dir} records no clip size", "pass --clip-len and --size")
    if not normalize:
        mean = std = None
    elif mean is None and std is None:
        mean, std = clip.get("mean"), clip.get("std")
        recorded = loaded.manifest.get("normalization")  # what convert recorded (e.g. the sample model's 0/1)
        if mean is None and isinstance(recorded, dict) and recorded.get("mean") and recorded.get("std"):
            mean, std = recorded["mean"], recorded["std"]
        if mean is None:
            mean, std = _pretrained_normalization(loaded.spec) or (mean, std)
    return ClipConfig(
        clip_len=int(clip_len), size=size if isinstance(size, int) else tuple(int(s) for s in size),
        frame_stride=int(frame_stride or clip.get("frame_stride") or 1), resize=clip.get("resize"), train=False,
        clips_per_video=int(clips_per_video or clip.get("clips_per_video") or 1),
        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
        layout=CLIP_LAYOUTS[layout], dtype=dtype, resize_mode=resize_mode or str(clip.get("resize_mode") or "crop"),
    )
