"""Stopping and resuming: the training state's format and position, RNG state as ``weights_only``-safe
values, the SIGINT/SIGTERM flag, reading a run folder back, the clip and input normalisation a checkpoint's
manifest records, and the errors of a stopped or unresumable run."""

from __future__ import annotations

import json
import random
import signal
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import StjfdError, first_line
from ..formats import CONFIG_FILE, LAST_DIR, RUN_FORMAT, STATE_FILE
from ..models import ArchSpec

STATE_FORMAT = "stjfd-training-state"

STATE_VERSION = 1


class ResumeError(StjfdError):
    """A run folder that cannot be resumed (missing or damaged state)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM / a callback's KeyboardInterrupt: the step finished and ``last/`` was saved
    (``checkpoint`` is None when no run folder was given or nothing could be saved)."""

    def __init__(
        self, message: str, checkpoint: Path | None, position: Mapping[str, int], signal_name: str = "SIGINT"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.checkpoint = checkpoint
        self.position = dict(position)
        self.signal_name = signal_name  # SIGINT, SIGTERM, or KeyboardInterrupt (raised by a callback)


def stopped_at_once(run_dir: str | Path | None) -> TrainingInterrupted:
    """A second Ctrl-C (or one outside the training loop) stops at once, without saving: say what is left
    on disk and whether the run can be resumed."""
    if run_dir is None:
        return TrainingInterrupted("interrupted — nothing was saved (no run folder)", None, {}, "SIGINT")
    run_dir = Path(run_dir)
    last = run_dir / LAST_DIR
    if (last / STATE_FILE).is_file():
        message = (f"interrupted at once, without saving the current step; {last} from the previous checkpoint is "
                   f"intact — resume with: stjfd finetune {run_dir} --resume")
        return TrainingInterrupted(message, last, {}, "SIGINT")
    message = f"interrupted before the first checkpoint of {run_dir}; nothing to resume — start the run again"
    return TrainingInterrupted(message, None, {}, "SIGINT")


@dataclass
class _Position:
    """Where training stands: the next micro-batch to run is ``batch`` of ``epoch`` in stage ``stage``."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    step: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _SignalFlag:
    """SIGINT/SIGTERM set a flag (the loop stops after the current optimizer step); a second SIGINT
    raises KeyboardInterrupt at once. Installed only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - exotic embeddings
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)




def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _manifest_normalization(clip: Mapping[str, Any]) -> dict[str, list[float]]:
    """The input normalisation the model was trained with; frames scaled to 0..1 without mean/std."""
    if clip.get("mean") and clip.get("std"):
        return {"mean": list(clip["mean"]), "std": list(clip["std"])}
    return {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


def _pretrained_normalization(spec: ArchSpec) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` of a torchvision video architecture's pretrained weights; None for other models."""
    from ..data import normalization_for
    from ..models import TORCHVISION_VIDEO_ARCHS

    if spec.kind == "torchvision" and spec.name in TORCHVISION_VIDEO_ARCHS:
        return normalization_for(spec.name)
    return None


def _clip_description(dataset: Dataset | None) -> dict[str, Any] | None:
    config = getattr(dataset, "config", None)
    if config is None or not hasattr(config, "clip_len"):
        return None
    return {
        "clip_len": config.clip_len,
        "size": list(config.size),
        "frame_stride": config.frame_stride,
        "resize": config.resize,
        "mean": list(config.mean) if config.mean else None,
        "std": list(config.std) if config.std else None,
        "clips_per_video": config.clips_per_video,
        "layout": config.layout,
        "dtype": config.dtype,
        "resize_mode": getattr(config, "resize_mode", "crop"),
    }


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ResumeError(f"{run_dir} has no {CONFIG_FILE}; it is not a fine-tuning run folder",
                          "pass the -o folder of an earlier `stjfd finetune`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path} is not readable JSON: {exc}", "the run folder is damaged; start a new run") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise ResumeError(f"{path} is not a stjfd fine-tuning config", "pass the -o folder of `stjfd finetune`")
    return data


def _first_sentence(text: str, limit: int = 120) -> str:
    """The first sentence of ``text``, cut at a word (with "…") if it is still longer than ``limit``."""
    sentence = text.split(". ")[0].rstrip(".").strip() or text.strip()
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0] + " …"


def load_training_state(run_dir: str | Path) -> dict[str, Any]:
    """``last/training_state.pt`` of a run, read with ``torch.load(weights_only=True)``."""
    path = Path(run_dir) / LAST_DIR / STATE_FILE
    if not path.is_file():
        raise ResumeError(
            f"{run_dir} has no {LAST_DIR}/{STATE_FILE}: it stopped before its first checkpoint",
            "start the run again (without --resume)",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        reason = _first_sentence(first_line(exc))
        if not any(c.isalpha() for c in reason):  # e.g. pickle's bare "101"
            reason = f"{type(exc).__name__}: {reason}"
        raise ResumeError(
            f"{path} is damaged and cannot be read ({reason})",
            f"the run cannot be resumed: start a new run (its {LAST_DIR}/ model can be fine-tuned further as is)",
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError(f"{path} is not a stjfd training state", "start a new run")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise ResumeError(f"{path} was written by a newer stjfd", "upgrade stjfd")
    return state
