"""What a run and an evaluation return: :class:`StageSummary`, :class:`EvalResult`, :class:`FinetuneResult`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .config import FinetuneConfig


@dataclass
class StageSummary:
    """Train/val figures and measured peak memory of one stage."""

    index: int
    cycle: int
    stage: str
    first_epoch: int
    last_epoch: int
    input_shape: list[int]
    trainable_params: int
    frozen_params: int
    train_loss: float | None = None
    train_top1: float | None = None
    val_loss: float | None = None
    val_top1: float | None = None
    val_top5: float | None = None
    val_top5_k: int | None = None
    peak_memory_bytes: int | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    clips_per_s: float | None = None
    # Fixed-kernel pools that ran adaptively on this stage's downsampled clips (stages.StageSafePool).
    adapted_pools: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSummary:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class EvalResult:
    """Accuracy of a model on a labelled dataset (full resolution, K clips per video averaged)."""

    classes: list[str]
    clips: int
    loss: float
    top1: float
    top5: float
    top5_k: int
    per_class: list[dict[str, Any]]
    confusion: list[list[int]]  # [true][predicted]
    seconds: float = 0.0
    playback_speed: float = 1.0  # the clips' frames resampled as if played this many times as fast
    # Where the class names (and so which output index each class is) came from: "given", "run" (fine-tuning
    # recorded them), "manifest", "labels" (a --labels file), "list indices" or "assumed" (folder names in
    # sorted order taken as output 0, 1, …: the model records no class names; ``class_note`` says so).
    classes_from: str = "given"
    class_note: str | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. videos shorter than a clip (frames looped)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    run_dir: Path | None
    config: FinetuneConfig
    classes: list[str]
    stages: list[StageSummary]
    epochs: list[dict[str, Any]]
    best_top1: float | None
    best_epoch: int | None
    final: EvalResult | None
    skipped: list[tuple[str, str, str]]
    world_size: int
    device: str
    steps: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    changed: bool = True  # False: a resumed run that had finished (nothing on disk was touched)
    saved: list[str] = field(default_factory=list)  # what the run folder holds: last/, best/, metrics.jsonl…

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "changed": self.changed,
            "saved": self.saved,
            "config": self.config.to_dict(),
            "classes": self.classes,
            "stages": [s.to_dict() for s in self.stages],
            "epochs": self.epochs,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "final": self.final.to_dict() if self.final else None,
            "skipped": [{"split": s, "path": p, "reason": r} for s, p, r in self.skipped],
            "world_size": self.world_size,
            "device": self.device,
            "steps": self.steps,
            "seconds": self.seconds,
            "notes": self.notes,
        }
