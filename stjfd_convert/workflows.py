"""End-to-end jobs behind the CLI commands: each is one library call returning a result object."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .atomic import check_writable_target
from .errors import OutputError
from .config import ConvertConfig
from .convert import ConversionReport, ProgressCallback, convert_model
from .models import TORCHVISION_VIDEO_ARCHS, ArchSpec, load_model
from .parity import ParityResult, compare_models, parse_dtype
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


def default_input_shape(spec: ArchSpec) -> tuple[int, ...] | None:
    """Known input shape for torchvision archs; None for user models."""
    if spec.kind == "torchvision" and spec.name in TORCHVISION_VIDEO_ARCHS:
        return tuple(TORCHVISION_VIDEO_ARCHS[spec.name].input_shape)
    return None


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
    input_shape: Sequence[int] | None = None,
    input_dtype: str = "float32",
    parity: bool = True,
    save: bool = True,
    overwrite: bool = False,
    command: str | None = None,
    progress: ProgressCallback | None = None,
) -> ConvertResult:
    """Load a checkpoint, decompose its Conv3d layers, check parity and save the converted folder.

    The output folder is probed before any work and written atomically at the end.
    """
    start = time.perf_counter()
    dtype = parse_dtype(input_dtype)
    target = None
    if save:
        target = Path(output) if output is not None else default_output_dir(checkpoint, arch or model)
        check_writable_target(target, overwrite=overwrite)
        if checkpoint is not None and overwrite:
            resolved = Path(target).resolve()
            source = Path(checkpoint).resolve()
            if resolved == source or resolved in source.parents:
                raise OutputError(
                    f"--force would replace {target}, which holds the checkpoint {checkpoint}",
                    "choose another -o",
                )
    loaded = load_model(
        checkpoint, arch=arch, model=model, model_kwargs=model_kwargs, trust_pickle=trust_pickle, strict=strict
    )
    original = loaded.model.eval()
    converted, report = convert_model(original, config, progress=progress)
    shape = tuple(input_shape) if input_shape else default_input_shape(loaded.spec)
    notes = list(loaded.notes)
    parity_result = None
    if shape is not None:
        _record_forms(converted, report, shape, dtype)
    if parity and shape is not None:
        parity_result = compare_models(original, converted, shape, dtype)
    elif parity:
        notes.append("parity not checked: pass --input-shape (and --input-dtype) for this model")
    if save and target is not None:
        save_converted(
            converted,
            target,
            loaded.spec,
            overwrite=overwrite,
            source=str(loaded.source.resolve()) if loaded.source else None,
            sha256=loaded.sha256,
            input_shape=shape,
            input_dtype=input_dtype,
            command=command,
            conversion={
                **report.to_dict(),
                "parity": parity_result.to_dict() if parity_result else None,
            },
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


def _record_forms(model: nn.Module, report: ConversionReport, shape: Sequence[int], dtype: torch.dtype) -> None:
    """Fill each decomposed layer's ``form``: the planner's (cost-model) choice for ``shape``."""
    from .planner import plan_model

    fixed = {layer.name: layer for layer in report.layers if layer.decomposed}
    if report.config.mode != "auto":
        for layer in fixed.values():
            layer.form = report.config.mode
        return
    plan = plan_model(model, shape, input_dtype=dtype)
    for name, form in plan.modes.items():
        if name in fixed:
            fixed[name].form = form


def plan_converted(
    directory: str | os.PathLike[str],
    input_shape: Sequence[int] | None = None,
    *,
    device: str = "cpu",
    repeats: int = 5,
    input_dtype: str = "float32",
    save: bool = True,
    progress: Any = None,
) -> tuple[Any, Path | None]:
    """Measure every form of every layer of a converted folder and store the plan in its manifest."""
    from .planner import plan_model, save_plan

    loaded = load_converted(directory)
    shape = tuple(input_shape) if input_shape else None
    if shape is None:
        recorded = loaded.manifest.get("input", {}).get("shape")
        shape = tuple(recorded) if recorded else default_input_shape(loaded.spec)
    if shape is None:
        from .errors import ConfigError

        raise ConfigError("the input shape of this model is unknown", "pass --input-shape, e.g. 1,3,16,112,112")
    model = loaded.model.to(device)
    plan = plan_model(
        model, shape, device=device, input_dtype=parse_dtype(input_dtype), measure=True, repeats=repeats,
        progress=progress,
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
    reloaded = load_converted(result.output)
    shape = result.parity.input_shape if result.parity else default_input_shape(result.spec)
    if shape is None:
        return ReloadCheck(result.output, True, 0.0)
    check = compare_models(result.model, reloaded.model, shape, parse_dtype(input_dtype))
    return ReloadCheck(result.output, check.max_abs == 0.0, check.max_abs)


def demo(
    directory: str | os.PathLike[str], *, atoms: int = 6, seed: int = 0, progress: ProgressCallback | None = None
) -> tuple[ConvertResult, ReloadCheck]:
    """Convert a seeded, freshly initialised torchvision r3d_18 into ``directory/r3d_18-stjfd``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        result = convert_checkpoint(
            None,
            ConvertConfig(spatial_atoms=atoms),
            arch="r3d_18",
            output=Path(directory) / "r3d_18-stjfd",
            overwrite=True,
            command=f"stjfd demo --atoms {atoms}",
            progress=progress,
        )
    return result, verify_reload(result)
