"""The entry points: :func:`finetune`, :func:`resume` and :func:`finetune_paths` (the CLI's workflow)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ..atomic import check_output
from ..config import check_device
from ..data.dataset import check_clip_fits
from ..data.options import check_resize_mode
from ..errors import ConfigError
from ..formats import CONFIG_FILE, LAST_DIR
from ..inputs import attach_pathway_split, recorded_input
from ..models import ArchSpec, is_trusted_builder
from .checkpoint import ResumeError, _pretrained_normalization, load_training_state, read_run_config
from .config import FinetuneConfig
from .distributed import _Dist, _init_distributed
from .events import Callback
from .losses import LossFn
from .results import FinetuneResult, StageSummary
from .run_folder import saved_entries
from .schedule import stage_plan
from .surgery import adapt_classifier
from .trainer import _Trainer


def finetune(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset | None = None,
    config: FinetuneConfig | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    run_dir: str | Path | None = None,
    spec: ArchSpec | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    run_info: Mapping[str, Any] | None = None,
    inputs: Sequence[str | Path] = (),
    datasets: Sequence[str | Path] = (),
) -> FinetuneResult:
    """Fine-tune ``model`` (in place; converted or plain) on ``train_dataset`` with ``config``'s schedule.

    Items of the datasets are ``(clip [C, T, H, W], label)`` (``stjfd_convert.data`` datasets); validation
    clips may be ``[K, C, T, H, W]``. With ``run_dir`` the run folder is written (``spec`` — the model's
    :class:`ArchSpec` — makes ``last/``/``best/`` loadable without pickles; ``overwrite`` replaces an existing
    run folder, never anything else, nor one of ``inputs`` or ``datasets``: :mod:`stjfd_convert.atomic`). ``run_info`` adds fields to config.json (the CLI records data options and the model source there
    so that :func:`resume` can rebuild everything). Raises :class:`TrainingInterrupted` on Ctrl-C and
    :class:`NonFiniteLossError` when the loss diverges. The model is returned to eval mode.
    """
    config = config or FinetuneConfig()
    if run_dir is not None and os.environ.get("RANK", "0") == "0":
        check_output(run_dir, "run", force=overwrite, inputs=inputs, datasets=datasets)
    attach_pathway_split(model, config.pathway_strides, config.input_container)
    return _train(
        lambda dist: _Trainer(
            model, train_dataset, val_dataset, config, callbacks=callbacks, loss_fn=loss_fn, run_dir=run_dir,
            spec=spec, classes=classes, overwrite=overwrite, run_info=run_info, state=None, dist=dist,
            inputs=inputs, datasets=datasets,
        ),
        config,
    )


def _finished(run_dir: Path, config: FinetuneConfig, state: Mapping[str, Any]) -> FinetuneResult:
    """The result of resuming a run that had finished: what its training state records; no file touched."""
    best = state.get("best") or {}
    stages = [StageSummary.from_dict(v) for _, v in sorted((int(k), v) for k, v in (state.get("stages") or {}).items())]
    return FinetuneResult(
        run_dir=run_dir, config=config, classes=list(state.get("classes") or []), stages=stages,
        epochs=list(state.get("history") or []), best_top1=best.get("top1"), best_epoch=best.get("epoch"), final=None,
        skipped=[tuple(s) for s in state.get("skipped") or []], world_size=int(state.get("world_size", 1)),
        device="none", steps=int(state["position"]["step"]), seconds=0.0,
        notes=["the run had already finished: nothing was trained and no file was changed"], changed=False,
        saved=saved_entries(run_dir),
    )


def _train(make: Callable[[_Dist], _Trainer], config: FinetuneConfig) -> FinetuneResult:
    """Initialise the process group (torchrun), build the trainer, run it; tear down what we set up."""
    dist = _init_distributed(config.device)
    try:
        return make(dist).run()
    finally:
        if dist.created:
            import torch.distributed as torch_dist

            with contextlib.suppress(Exception):
                torch_dist.destroy_process_group()


def resume(
    run_dir: str | Path,
    train_dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
    *,
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    trust_pickle: bool = False,
    data_root: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    plot: bool | None = None,
    trust_code: bool = False,
    model: str | None = None,
) -> FinetuneResult:
    """Continue the run in ``run_dir`` from ``last/`` exactly where it stopped.

    A run that had finished is left exactly as it is (``result.changed`` is False). ``trust_code``
    (or ``model``, the same builder named again) allows the builder named by the run's manifest
    (see :func:`stjfd_convert.saved_model.load_converted`).

    Without datasets they are rebuilt from the data options recorded in config.json (``data_root``
    overrides a moved dataset root). Same seed on CPU ⇒ the same final weights and metrics as a run that
    was never interrupted. Only ``workers`` and ``plot`` may differ from the original run (neither changes
    the results: clips are seeded per sample).
    """
    from ..saved_model import check_builder_trusted, load_converted, read_manifest

    run_dir = Path(run_dir)
    info = read_run_config(run_dir)
    state = load_training_state(run_dir)
    config = FinetuneConfig.from_dict(state["config"])
    if workers is not None:
        config = replace(config, workers=workers)
    if plot is not None:
        config = replace(config, plot=plot)
    if int(state["position"]["stage"]) >= len(stage_plan(config)):
        # Nothing to do, so no data or model is loaded; the folder's builder is still held to the trust rule.
        spec = ArchSpec.from_dict(read_manifest(run_dir / LAST_DIR)["architecture"])
        check_builder_trusted(spec, trust_code=trust_code, model=model, directory=run_dir / LAST_DIR)
        return _finished(run_dir, config, state)
    loaded = load_converted(run_dir / LAST_DIR, trust_pickle=trust_pickle, trust_code=trust_code, model=model)
    if train_dataset is None:
        data = info.get("data")
        if not data:
            raise ResumeError(
                f"{run_dir}/{CONFIG_FILE} records no dataset: the run was started from Python with its own datasets",
                "resume it from Python: stjfd_convert.finetune.resume(run_dir, train_dataset, val_dataset)",
            )
        train_dataset, val_dataset, _ = _build_data(data, data_root, config.seed, progress)
    classes = list(state.get("classes") or info.get("classes") or [])
    train_classes = list(getattr(train_dataset, "classes", []) or [])
    if train_classes and classes and train_classes != classes:
        raise ResumeError(
            f"the dataset's classes ({', '.join(train_classes[:5])}…) differ from the run's "
            f"({', '.join(classes[:5])}…)",
            "resume with the dataset the run was started on",
        )
    run_info = {k: v for k, v in info.items() if k not in ("format", "version", "finetune", "classes", "world_size")}
    attach_pathway_split(loaded.model, config.pathway_strides, config.input_container)
    if loss_fn is None and info.get("distill"):
        builder = info["distill"].get("model")
        if builder and not (trust_code or model == builder or is_trusted_builder(builder)):
            raise ConfigError(
                f"{run_dir}/{CONFIG_FILE} names the teacher's builder {builder!r}: loading it would run that code",
                f"if you trust this run and that code, pass --trust-code (or --model {builder})",
            )
        loss_fn = _distillation_loss(info["distill"], trust_pickle=trust_pickle, trust_code=True,
                                     label_smoothing=config.label_smoothing)
    return _train(
        lambda dist: _Trainer(
            loaded.model.train(), train_dataset, val_dataset, config, callbacks=callbacks, loss_fn=loss_fn,
            run_dir=run_dir, spec=loaded.spec, classes=classes or None, overwrite=False, run_info=run_info,
            state=state, dist=dist,
        ),
        config,
    )


def _build_data(
    data: Mapping[str, Any], root_override: str | Path | None, seed: int, progress: Callable[[int, int], None] | None
) -> tuple[Dataset, Dataset | None, list[str]]:
    from ..data import build_datasets, unlabeled_dataset

    root = Path(root_override) if root_override is not None else Path(data["root"])
    size = data["size"]
    tensors = {"layout": str(data.get("layout") or "CTHW"), "dtype": str(data.get("dtype") or "float32"),
               "resize_mode": str(data.get("resize_mode") or "crop"), "flip": data.get("flip", True) is not False}
    if data.get("unlabeled"):
        # Every video under the root, no classes, no validation split: a distillation run.
        train = unlabeled_dataset(
            root, clip_len=int(data["clip_len"]), size=tuple(size) if isinstance(size, (list, tuple)) else int(size),
            frame_stride=int(data.get("frame_stride", 1)), mean=data.get("mean"), std=data.get("std"), seed=seed,
            progress=progress, **tensors,
        )
        return train, None, []
    return build_datasets(
        root,
        clip_len=int(data["clip_len"]),
        size=tuple(size) if isinstance(size, (list, tuple)) else int(size),
        frame_stride=int(data.get("frame_stride", 1)),
        val_split=data.get("val_split"),
        mean=data.get("mean"),
        std=data.get("std"),
        seed=seed,
        val_clips_per_video=int(data.get("val_clips_per_video", 1)),
        progress=progress,
        check_classes=True,
        **tensors,
    )


def _load_any_model(
    source: str | Path,
    *,
    arch: str | None,
    model: str | None,
    model_kwargs: Mapping[str, Any] | None,
    trust_pickle: bool,
    trust_code: bool = False,
) -> tuple[nn.Module, ArchSpec, dict[str, Any]]:
    from ..models import load_model
    from ..saved_model import is_converted_dir, load_converted

    source = Path(source)
    if is_converted_dir(source):
        if arch:
            raise ConfigError(f"{source} is a converted-model folder; --arch does not apply", "drop it")
        loaded = load_converted(source, trust_pickle=trust_pickle, trust_code=trust_code, model=model)
        _, _, container, strides = recorded_input(loaded.manifest)
        info: dict[str, Any] = {"source": str(source), "kind": "converted"}
        if strides:
            info.update(pathway_strides=list(strides), input_container=container)
        finetuned = loaded.manifest.get("finetune")
        recorded_classes = (finetuned.get("classes") if isinstance(finetuned, dict) else None) or loaded.manifest.get(
            "classes")  # a run's checkpoint, or a converted folder stjfd knows the classes of
        if isinstance(recorded_classes, list) and recorded_classes:
            info["classes"] = [str(name) for name in recorded_classes]
        return loaded.model, loaded.spec, info
    if source.is_dir():
        raise ConfigError(
            f"{source} is a folder without a converted model (no model.stjfd.json)",
            "pass a folder written by `stjfd convert`, a checkpoint file, or a run folder with --resume",
        )
    if not source.exists():
        raise ConfigError(f"model {source} does not exist", "pass a converted-model folder or a checkpoint file")
    loaded = load_model(source, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle)
    return loaded.model, loaded.spec, {"source": str(source), "kind": "checkpoint", "sha256": loaded.sha256}


def _check_stage_clips(config: FinetuneConfig, clip_len: int, size: int | tuple[int, int]) -> None:
    """The alternating schedule's stage clips must keep ≥ 2 frames (spatial stage: every r-th frame) and
    ≥ 2 pixels a side (temporal stage: frames shrunk s×); -r 100 on 16-frame clips trains on single frames."""
    if config.schedule != "alternating":
        return
    frames = -(-int(clip_len) // config.temporal_downsample)
    if int(clip_len) >= 2 and frames < 2:
        raise ConfigError(
            f"--temporal-downsample {config.temporal_downsample} leaves the spatial stage {frames} frame of each "
            f"{clip_len}-frame clip: that stage would train on still images",
            f"use -r {int(clip_len) - 1} or less (e.g. -r 2), or --schedule joint",
        )
    side = min(size) if isinstance(size, (tuple, list)) else int(size)
    if side >= 2 and side // config.spatial_downsample < 2:
        raise ConfigError(
            f"--spatial-downsample {config.spatial_downsample} shrinks the temporal stage's {side}-pixel frames to "
            f"{max(1, side // config.spatial_downsample)} pixel",
            f"use -s {max(1, side // 2)} or less (e.g. -s 2), or --schedule joint",
        )


def finetune_paths(
    model_source: str | Path,
    data_root: str | Path,
    config: FinetuneConfig,
    *,
    output: str | Path,
    clip_len: int,
    size: int | tuple[int, int],
    frame_stride: int = 1,
    val_split: float | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    val_clips_per_video: int = 1,
    arch: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    trust_code: bool = False,
    overwrite: bool = False,
    command: str | None = None,
    callbacks: Sequence[Callback] = (),
    loss_fn: LossFn | None = None,
    progress: Callable[[int, int], None] | None = None,
    unlabeled: bool = False,
    distill: str | Path | None = None,
    distill_loss: str = "auto",
    distill_weight: float = 0.0,
    layout: str | None = None,
    dtype: str | None = None,
    resize_mode: str = "crop",
    normalize: bool = True,
    flip: bool = True,
) -> FinetuneResult:
    """Load a converted-model folder (or a checkpoint: a plain model), build the datasets, fine-tune.

    ``unlabeled``: every video under ``data_root`` (no class folders, no validation). ``distill``: a teacher
    (a checkpoint or converted folder loaded with the same ``arch``/``model`` options, or ``"source"`` for the
    checkpoint the converted folder was made from) that the model learns to reproduce
    (:class:`~stjfd_convert.finetune.distill.DistillationLoss` with ``distill_loss``; ``distill_weight`` of
    cross-entropy where clips have labels). Without a teacher, unlabeled data has nothing to learn from.
    ``layout`` (``CTHW`` | ``TCHW`` | ``THWC`` per clip, batched as B…) and ``dtype`` (``float32``
    normalised | ``uint8`` raw 0–255) make the clips what the model takes; the stages downsample them alike.
    Both default to what a converted folder's manifest records (``input.layout``, ``input.dtype``), else
    ``CTHW`` / ``float32``. ``resize_mode="stretch"`` resizes whole frames to ``size`` (no crop);
    ``normalize=False`` scales float frames to 0..1 without any mean/std. ``flip=False``: training clips are
    never mirrored (for actions or events where left and right differ).

    Everything that can be wrong with the input is checked before the run folder ``output`` is created.
    The classifier is re-created when the model predicts another number of classes than the dataset has.
    Normalisation defaults to the statistics of the torchvision architecture (if any).
    """
    from ..models import model_source_paths

    check_device(config.device)  # before anything is loaded: `--device cuda` on a machine without a GPU
    _check_stage_clips(config, clip_len, size)
    layout, dtype = _clip_format(model_source, layout, dtype)
    resize_mode = check_resize_mode(resize_mode)
    if not normalize and (mean is not None or std is not None):
        raise ConfigError("--no-normalize and --mean/--std contradict each other", "drop one of them")
    is_main = os.environ.get("RANK", "0") == "0"
    inputs, datasets = [model_source, *model_source_paths(model)], [data_root]
    if unlabeled and distill is None and loss_fn is None:
        raise ConfigError("--unlabeled clips have no labels to learn from", "add --distill ORIGINAL (or --distill source)")
    if distill is not None:
        from .distill import check_distill_options

        check_distill_options(distill_loss, distill_weight)
    teacher = _teacher_source(model_source, distill) if distill is not None else None
    if teacher is not None:
        inputs.append(teacher)  # the teacher is an input too: never replaced by --force
    if is_main:
        check_output(output, "run", force=overwrite, inputs=inputs, datasets=datasets)
    net, spec, source_info = _load_any_model(
        model_source, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle,
        trust_code=trust_code,
    )
    if config.pathway_strides is None and source_info.get("pathway_strides"):
        # The converted folder records how its pathways are cut from one clip (convert --pathway-strides).
        config = replace(config, pathway_strides=tuple(source_info["pathway_strides"]),
                         input_container=source_info.get("input_container", "list"))
    teacher_info = None
    if teacher is not None:
        teacher_arch, teacher_model, teacher_kwargs = arch, model, dict(model_kwargs) if model_kwargs else None
        if arch is None and model is None:
            # A checkpoint teacher without --arch/--model: the architecture the converted folder records
            # (its builder already passed the trust check that loaded the student).
            teacher_arch, teacher_model, teacher_kwargs = spec.loader_options()
        teacher_info = {"teacher": teacher, "loss": distill_loss, "weight": float(distill_weight),
                        "arch": teacher_arch, "model": teacher_model, "model_kwargs": teacher_kwargs}
        loss_fn = _distillation_loss(teacher_info, trust_pickle=trust_pickle, trust_code=trust_code,
                                     label_smoothing=config.label_smoothing)
    if mean is None and std is None and normalize:
        mean, std = _pretrained_normalization(spec) or (None, None)
    data = {
        "root": str(Path(data_root).absolute()),
        "clip_len": clip_len,
        "size": list(size) if isinstance(size, (list, tuple)) else size,
        "frame_stride": frame_stride,
        "val_split": val_split,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "val_clips_per_video": val_clips_per_video,
        **({"unlabeled": True} if unlabeled else {}),
        **({"layout": layout} if layout != "CTHW" else {}),
        **({"dtype": dtype} if dtype != "float32" else {}),
        **({"resize_mode": resize_mode} if resize_mode != "crop" else {}),
        **({"normalize": False} if not normalize else {}),
        **({"flip": False} if not flip else {}),
    }
    train_ds, val_ds, classes = _build_data(data, None, config.seed, progress)
    for dataset in (train_ds, val_ds):
        if dataset is not None:
            check_clip_fits(dataset)  # --clip-len 1000 on 32-frame videos: refused, not trained on looped frames
    note = None
    if classes:  # a distillation run on unlabeled clips keeps the model's own head
        spec, note = adapt_classifier(net, spec, len(classes), seed=config.seed)
    elif source_info.get("classes"):
        classes = source_info["classes"]  # ... and the class names its folder records (evaluate matches by them)
    info = {"data": data, "model": {**source_info, "spec": spec.to_dict()}, "command": command,
            **({"distill": teacher_info} if teacher_info else {})}
    result = finetune(
        net, train_ds, val_ds, config, callbacks=callbacks, loss_fn=loss_fn, run_dir=output, spec=spec,
        classes=classes, overwrite=overwrite, run_info=info, inputs=inputs, datasets=datasets,
    )
    if note:
        result.notes.insert(0, note)
    return result


def _clip_format(model_source: str | Path, layout: str | None, dtype: str | None) -> tuple[str, str]:
    """``(per-clip layout, dtype)``: as given, else as the converted folder ``model_source`` records, else
    ``CTHW`` / ``float32``."""
    from ..layouts import CLIP_LAYOUTS, check_given_format, resolve_input_format
    from ..saved_model import is_converted_dir, read_manifest

    layout, dtype = check_given_format(layout, dtype)  # bad options first, then the folder
    manifest = read_manifest(Path(model_source)) if is_converted_dir(Path(model_source)) else None
    batched, dtype = resolve_input_format(manifest, layout, dtype)
    return CLIP_LAYOUTS[batched], dtype


def _teacher_source(model_source: str | Path, distill: str | Path) -> str:
    """``--distill PATH``, or ``source``: the checkpoint the converted folder ``model_source`` was made from."""
    if str(distill) != "source":
        return str(Path(distill).absolute())
    from ..saved_model import is_converted_dir, read_manifest

    recorded = None
    if is_converted_dir(Path(model_source)):
        recorded = (read_manifest(Path(model_source)).get("source") or {}).get("path")
    if not recorded or not Path(recorded).exists():
        raise ConfigError(
            f"--distill source: {model_source} records no source checkpoint that exists here"
            + (f" ({recorded})" if recorded else ""),
            "pass the original checkpoint: --distill ORIGINAL.pth",
        )
    return str(recorded)


def _distillation_loss(
    info: Mapping[str, Any], *, trust_pickle: bool, trust_code: bool, label_smoothing: float
) -> LossFn:
    """The :class:`DistillationLoss` a run's ``distill`` record describes (also what :func:`resume` rebuilds)."""
    from .distill import DistillationLoss

    teacher, _, _ = _load_any_model(
        info["teacher"], arch=info.get("arch"), model=info.get("model"), model_kwargs=info.get("model_kwargs"),
        trust_pickle=trust_pickle, trust_code=trust_code,
    )
    return DistillationLoss(
        teacher.eval(), info.get("loss", "auto"), label_weight=float(info.get("weight", 0.0)),
        label_smoothing=label_smoothing,
    )
