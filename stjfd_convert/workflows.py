"""End-to-end jobs behind the CLI commands: each is one library call returning a result object."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .atomic import check_output
from .config import ConvertConfig
from .convert import ConversionReport, ProgressCallback, convert_model
from .formats import DEMO_CONVERTED_DIR, DEMO_RUN_DIR
from .inputs import InputShape, normalize_input_shape, recorded_input
from .models import ArchSpec, default_input_shape, load_model, model_source_paths
from .parity import ParityResult, check_input_memory, compare_models, parse_dtype
from .saved_model import load_converted, save_converted


@dataclass
class ConvertResult:
    """What ``convert_checkpoint`` did: the report, the parity check and where it saved."""

    report: ConversionReport
    spec: ArchSpec
    output: Path | None
    parity: ParityResult | None
    notes: list[str] = field(default_factory=list)
    model: nn.Module | None = None  # the converted model (not serialised)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "architecture": self.spec.to_dict(),
            **self.report.to_dict(),
            "parity": self.parity.to_dict() if self.parity else None,
            "notes": self.report.notes + self.notes,
            "total_seconds": self.seconds,
        }


def default_output_dir(checkpoint: str | os.PathLike[str] | None, spec_name: str | None = None) -> Path:
    """``<checkpoint stem>-stjfd`` in the current folder (``<arch>-stjfd`` without a checkpoint)."""
    stem = Path(checkpoint).stem if checkpoint else (spec_name or "model").replace(":", "_").replace("/", "_")
    return Path(f"{stem}-stjfd")


def convert_checkpoint(
    checkpoint: str | os.PathLike[str] | None,
    config: ConvertConfig,
    *,
    output: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    input_shape: InputShape | Sequence[int] | None = None,
    input_dtype: str = "float32",
    input_container: str = "list",
    pathway_strides: Sequence[int] | None = None,
    input_layout: str | None = None,
    calibrate: str | os.PathLike[str] | None = None,
    calibrate_clips: int = 32,
    normalize: bool = True,
    parity: bool = True,
    save: bool = True,
    overwrite: bool = False,
    command: str | None = None,
    progress: ProgressCallback | None = None,
    calibration_progress: Any = None,
) -> ConvertResult:
    """Load a checkpoint, decompose its Conv3d layers, check parity and save the converted folder.

    ``calibrate`` (a folder of videos) makes the conversion data-aware (:func:`stjfd_convert.calibrate.
    calibrate_model` on ``calibrate_clips`` clips cut like ``input_shape`` in ``input_layout``, normalised as
    the architecture expects unless ``normalize`` is false). The output folder is checked against the
    output-safety policy (:mod:`stjfd_convert.atomic`) before any work and written atomically at the end;
    ``overwrite`` replaces only a converted folder.
    """
    start = time.perf_counter()
    dtype = parse_dtype(input_dtype)
    if input_shape:
        check_input_memory(input_shape, dtype)  # a huge --input-shape is refused before any work
    target = None
    inputs = [*([checkpoint] if checkpoint is not None else []), *model_source_paths(model)]
    if save:
        target = Path(output) if output is not None else default_output_dir(checkpoint, arch or model)
        # The calibration videos are a dataset: the output may not replace or sit inside them.
        check_output(target, "converted", force=overwrite, inputs=inputs, datasets=[calibrate] if calibrate else [])
    loaded = load_model(
        checkpoint, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle, strict=strict
    )
    original = loaded.model.eval()
    shape = normalize_input_shape(input_shape) if input_shape else default_input_shape(loaded.spec)
    notes = list(loaded.notes)
    known = _known_classes(loaded.sha256)
    if calibrate is not None:
        converted, report = _calibrated(
            original, config, loaded, calibrate, calibrate_clips, shape, input_layout or "BCTHW", input_dtype,
            pathway_strides, input_container, normalize, progress, calibration_progress, known.get("normalization"),
        )
    else:
        converted, report = convert_model(original, config, progress=progress)
    parity_result = None
    if shape is not None:
        _record_forms(converted, report, shape, dtype, input_container)
    if parity and shape is not None:
        parity_result = compare_models(original, converted, shape, dtype, container=input_container)
    elif parity:
        notes.append("parity not checked: pass --input-shape (and --input-dtype) for this model")
    if save and target is not None:
        save_converted(
            converted,
            target,
            loaded.spec,
            overwrite=overwrite,
            inputs=inputs,
            source=str(loaded.source.resolve()) if loaded.source else None,
            sha256=loaded.sha256,
            input_shape=shape,
            input_dtype=input_dtype,
            input_container=input_container,
            pathway_strides=pathway_strides,
            input_layout=input_layout,
            command=command,
            conversion={
                **report.to_dict(),
                "parity": parity_result.to_dict() if parity_result else None,
            },
            extra=known,
        )
    return ConvertResult(
        report=report,
        spec=loaded.spec,
        output=target,
        parity=parity_result,
        notes=notes,
        model=converted,
        seconds=time.perf_counter() - start,
    )


def _calibrated(
    original: nn.Module,
    config: ConvertConfig,
    loaded: Any,
    folder: str | os.PathLike[str],
    clips: int,
    shape: InputShape | None,
    layout: str,
    dtype: str,
    strides: Sequence[int] | None,
    container: str,
    normalize: bool,
    progress: ProgressCallback | None,
    calibration_progress: Any,
    known_normalization: Mapping[str, Sequence[float]] | None,
) -> tuple[nn.Module, ConversionReport]:
    """``convert_model`` with statistics from the videos under ``folder`` (see ``convert_checkpoint``)."""
    from .calibrate import calibrate_model, calibration_clips
    from .errors import ConfigError
    from .finetune.checkpoint import _pretrained_normalization

    if shape is None:
        raise ConfigError("--calibrate needs the model's input shape", "pass --input-shape, e.g. 1,3,16,112,112")
    mean = std = None
    if normalize and dtype != "uint8":
        if known_normalization:
            mean, std = known_normalization["mean"], known_normalization["std"]
        else:
            mean, std = _pretrained_normalization(loaded.spec) or (None, None)
    batches = calibration_clips(
        folder, shape, layout=layout, dtype=dtype, clips=clips, mean=mean, std=std, pathway_strides=strides,
        container=container,
    )
    converted, report = calibrate_model(
        original, batches, config, progress=calibration_progress, layer_progress=progress
    )
    report.calibration = {
        **(report.calibration or {}),
        "folder": str(Path(folder).resolve()),
        "clips": batches.clips,
        "layout": layout,
        "dtype": dtype,
        "normalization": {"mean": list(mean), "std": list(std)} if mean is not None else None,
    }
    return converted, report


def _known_classes(sha256: str | None) -> dict[str, Any]:
    """``{"classes": [...], "normalization": {...}}`` for a checkpoint stjfd knows (the bundled sample model,
    by its sha256), so that ``stjfd evaluate`` matches class folders to the outputs by name and export and
    predict feed frames as it was trained (0..1, no mean/std); else ``{}``."""
    from .errors import StjfdError
    from .sample import sample_model_files

    try:
        info = sample_model_files().info
    except (StjfdError, OSError, ValueError):
        return {}
    if not sha256 or info.get("sha256") != sha256 or not isinstance(info.get("classes"), list):
        return {}
    known: dict[str, Any] = {"classes": [str(name) for name in info["classes"]]}
    norm = info.get("normalization")
    if isinstance(norm, dict) and norm.get("mean") and norm.get("std"):
        known["normalization"] = {"mean": list(norm["mean"]), "std": list(norm["std"])}
    return known


def _record_forms(
    model: nn.Module, report: ConversionReport, shape: InputShape, dtype: torch.dtype, container: str = "list"
) -> None:
    """Fill each decomposed layer's ``form``: the planner's (cost-model) choice for ``shape``."""
    from .planner import plan_model

    fixed = {layer.name: layer for layer in report.layers if layer.decomposed}
    if report.config.mode != "auto":
        for layer in fixed.values():
            layer.form = report.config.mode
        return
    plan = plan_model(model, shape, input_dtype=dtype, container=container)
    for name, form in plan.modes.items():
        if name in fixed:
            fixed[name].form = form


def plan_converted(
    directory: str | os.PathLike[str],
    input_shape: InputShape | Sequence[int] | None = None,
    *,
    device: str = "cpu",
    repeats: int = 5,
    input_dtype: str | None = None,
    save: bool = True,
    progress: Any = None,
    trust_code: bool = False,
) -> tuple[Any, Path | None]:
    """Measure every form of every layer of a converted folder and store the plan in its manifest.

    ``input_dtype`` defaults to the dtype the folder records (float32 when none). The plan is an update of
    stjfd's own manifest in the folder (written atomically), not a new output.
    """
    from .config import check_device
    from .planner import plan_model, save_plan

    device = check_device(device)  # `--device cuda` without a GPU, `--device tpu`: refused before loading
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        from .errors import ConfigError

        raise ConfigError(f"--repeats must be an integer ≥ 1, got {repeats!r}", "e.g. --repeats 5")
    loaded = load_converted(directory, trust_code=trust_code)
    recorded, recorded_dtype, container, _ = recorded_input(loaded.manifest)
    input_dtype = input_dtype or recorded_dtype
    shape = normalize_input_shape(input_shape) if input_shape else None
    if shape is None:
        shape = recorded or default_input_shape(loaded.spec)
    if shape is None:
        from .errors import ConfigError

        raise ConfigError("the input shape of this model is unknown", "pass --input-shape, e.g. 1,3,16,112,112")
    check_input_memory(shape, parse_dtype(input_dtype))  # a huge --input-shape: refused before it is allocated
    model = loaded.model.to(device)
    plan = plan_model(
        model, shape, device=device, input_dtype=parse_dtype(input_dtype), measure=True, repeats=repeats,
        progress=progress, container=container,
    )
    path = save_plan(directory, plan) if save else None
    return plan, path


@dataclass
class ReloadCheck:
    """A saved folder reloaded and compared with the in-memory converted model."""

    directory: Path
    identical: bool
    max_abs: float


def verify_reload(result: ConvertResult, input_dtype: str = "float32") -> ReloadCheck:
    """Reload ``result.output`` and check that it gives bit-identical outputs on the parity clip."""
    if result.output is None or result.model is None:
        raise ValueError("verify_reload needs a saved ConvertResult")
    # The builder is the one this same command was given (--model), so it is trusted here.
    reloaded = load_converted(result.output, trust_code=True)
    shape = result.parity.input_shape if result.parity else default_input_shape(result.spec)
    if shape is None:
        return ReloadCheck(result.output, True, 0.0)
    _, _, container, _ = recorded_input(reloaded.manifest)
    check = compare_models(result.model, reloaded.model, shape, parse_dtype(input_dtype), container=container)
    return ReloadCheck(result.output, check.max_abs == 0.0, check.max_abs)


# The demo's fixed workload: small enough to finish in well under a minute on two CPU cores.
DEMO_TEST_CLIPS = 150
DEMO_TRAIN_CLIPS = 240
DEMO_CYCLES = 2
DEMO_BATCH_SIZE = 16
DEMO_LR = 0.01


@dataclass
class DemoResult:
    """``stjfd demo``: the bundled sample model converted, reloaded, evaluated and briefly fine-tuned.

    ``original``/``converted``/``finetuned`` are evaluated on the same held-out synthetic clips; the
    fine-tuning uses other clips of the same task and the paper's alternating schedule.
    """

    convert: ConvertResult
    reload: ReloadCheck
    sample_model: dict[str, Any]
    original: Any  # finetune.EvalResult
    converted: Any
    finetuned: Any
    finetune: Any  # finetune.FinetuneResult
    test_clips: int
    train_clips: int
    seed: int
    agreement: dict[str, Any] = field(default_factory=dict)  # original vs converted on the held-out clips
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        stages = [
            {
                "stage": s.stage,
                "cycle": s.cycle,
                "input_shape": list(s.input_shape),
                "trainable_params": s.trainable_params,
                "frozen_params": s.frozen_params,
                "train_top1": s.train_top1,
                "test_top1": s.val_top1,
                "peak_memory_bytes": s.peak_memory_bytes,
                "seconds": s.seconds,
            }
            for s in self.finetune.stages
        ]
        return {
            **self.convert.to_dict(),
            "sample_model": self.sample_model,
            "reload": {"identical": self.reload.identical, "max_abs": self.reload.max_abs},
            "evaluation": {"clips": self.test_clips, "seed": self.seed, "classes": list(self.original.classes)},
            "agreement": dict(self.agreement),
            "accuracy": {
                "original": self.original.top1,
                "converted": self.converted.top1,
                "finetuned": self.finetuned.top1,
            },
            "loss": {
                "original": self.original.loss,
                "converted": self.converted.loss,
                "finetuned": self.finetuned.loss,
            },
            "finetune": {
                "run_dir": str(self.finetune.run_dir) if self.finetune.run_dir else None,
                "schedule": self.finetune.config.schedule,
                "cycles": self.finetune.config.cycles,
                "train_clips": self.train_clips,
                "steps": self.finetune.steps,
                "seconds": self.finetune.seconds,
                "stages": stages,
            },
            "total_seconds": self.seconds,
        }


def demo(
    directory: str | os.PathLike[str],
    *,
    atoms: int = 6,
    temporal_atoms: int | None = None,
    seed: int = 0,
    test_clips: int = DEMO_TEST_CLIPS,
    train_clips: int = DEMO_TRAIN_CLIPS,
    cycles: int = DEMO_CYCLES,
    progress: ProgressCallback | None = None,
    callbacks: Sequence[Any] = (),
    command: str | None = None,
    force: bool = False,
) -> DemoResult:
    """The main job on the bundled sample model (:mod:`stjfd_convert.sample`), end to end.

    Converts ``sample_models/sample_model.safetensors`` into ``directory/sample-stjfd``, checks that the saved
    folder reloads bit-identically, measures top-1 of the original and the converted model on
    ``test_clips`` held-out synthetic clips, then fine-tunes the reloaded converted model with the
    alternating schedule (``cycles`` × temporal + spatial stage on ``train_clips`` other clips, run folder
    ``directory/finetune``) and measures it again. Everything runs on the CPU and is seeded by ``seed``.
    ``callbacks`` receive the fine-tuning events. An existing ``directory`` is filled only if it is
    empty, or with ``force`` if it holds nothing but an earlier demo's outputs.

    Long on purpose: it is the tutorial — one straight sequence of library calls (convert, evaluate,
    fine-tune, reload) that a reader follows top to bottom; splitting it would hide the story.
    """
    from .finetune import FinetuneConfig, evaluate, finetune
    from .sample import SampleClips, sample_model_files, split_seed

    start = time.perf_counter()
    directory = check_output(directory, "demo", force=force)
    files = sample_model_files()
    info = files.info
    spec = ArchSpec.from_dict(info["architecture"])
    shape = tuple(int(s) for s in info["input"]["shape"])
    result = convert_checkpoint(
        files.weights,
        ConvertConfig(spatial_atoms=atoms, temporal_atoms=temporal_atoms),
        model=spec.name,
        model_kwargs=spec.kwargs,
        input_shape=shape,
        output=directory / DEMO_CONVERTED_DIR,
        overwrite=True,
        command=command or f"stjfd demo --atoms {atoms}",
        progress=progress,
    )
    reload = verify_reload(result)

    clip_len, size = shape[2], shape[3]
    test = SampleClips(test_clips, clip_len=clip_len, size=size, seed=split_seed(seed, "demo-test"))
    train = SampleClips(train_clips, clip_len=clip_len, size=size, seed=split_seed(seed, "demo-train"))
    classes = list(info.get("classes") or test.classes)
    original = load_model(files.weights, model=spec.name, model_kwargs=spec.kwargs).model
    scores = {
        name: evaluate(net, test, classes=classes, batch_size=DEMO_BATCH_SIZE, device="cpu")
        for name, net in (("original", original), ("converted", result.model))
    }
    agreement = _prediction_agreement(original, result.model, test.clips, DEMO_BATCH_SIZE)
    student = load_converted(result.output, trust_code=True).model
    config = FinetuneConfig(
        schedule="alternating",
        cycles=cycles,
        epochs_per_stage=1,
        batch_size=DEMO_BATCH_SIZE,
        lr=DEMO_LR,
        device="cpu",
        seed=seed,
        plot=False,
    )
    tuned = finetune(
        student, train, test, config, callbacks=callbacks, run_dir=directory / DEMO_RUN_DIR, spec=result.spec,
        classes=classes, overwrite=True,
    )
    if tuned.final is None:  # pragma: no cover - a validation set is always given
        raise RuntimeError("fine-tuning finished without evaluating")
    sample_info = {
        "weights": str(files.weights),
        "architecture": spec.to_dict(),
        "parameters": info.get("parameters"),
        "classes": classes,
        "trained_val_top1": info.get("val_top1"),
        "trained_with": info.get("command"),
    }
    return DemoResult(
        convert=result, reload=reload, sample_model=sample_info, original=scores["original"],
        converted=scores["converted"], finetuned=tuned.final, finetune=tuned, test_clips=test_clips,
        train_clips=train_clips, seed=seed, agreement=agreement, seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _prediction_agreement(reference: nn.Module, candidate: nn.Module, clips: torch.Tensor, batch: int) -> dict[str, Any]:
    """Top-1 agreement and logit differences of two models on real clips (the parity clip is noise)."""
    reference.eval()
    candidate.eval()
    agree, diff_sq, ref_sq, max_abs = 0, 0.0, 0.0, 0.0
    for chunk in clips.split(batch):
        a, b = reference(chunk).double(), candidate(chunk).double()
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        diff_sq += float((a - b).pow(2).sum())
        ref_sq += float(a.pow(2).sum())
        max_abs = max(max_abs, float((a - b).abs().max()))
    return {
        "clips": len(clips),
        "top1_agree": agree,
        "rel_l2": (diff_sq / ref_sq) ** 0.5 if ref_sq > 0 else diff_sq**0.5,
        "max_abs": max_abs,
    }
