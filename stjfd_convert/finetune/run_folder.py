"""What a run keeps in its folder: config.json, metrics.jsonl and run.log records, ``last/`` (with the
training state) and ``best/``, the training curve; and the interruption that saves ``last/`` before it
raises. Everything that writes runs on rank 0 only.

:class:`_RunFolder` is the first of the trainer's two mixins (``_RunFolder`` ← ``_StageSetup`` ←
``_Trainer``): the files apart from the training loop.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..atomic import _describe_os_error, atomic_directory, atomic_file
from ..errors import OutputError
from ..formats import BEST_DIR, CONFIG_FILE, CURVE_FILE, LAST_DIR, LOG_FILE, METRICS_FILE, RUN_FORMAT, STATE_FILE
from ..inputs import pathway_input_shape
from ..layouts import DEFAULT_LAYOUT, check_input_layout, from_bcthw
from ..models import ArchSpec
from ..stages import disable_activation_checkpointing, enable_activation_checkpointing
from .checkpoint import (
    STATE_FORMAT,
    STATE_VERSION,
    TrainingInterrupted,
    _clip_description,
    _manifest_normalization,
    _Position,
    _rng_state,
    _SignalFlag,
)
from .config import FinetuneConfig
from .distributed import _Dist
from .events import Callback, CheckpointSaved, SkippedFiles
from .metrics import _clean, _json_default, plot_training_curve, read_metrics
from .schedule import StagePlan


class _RunFolder:
    """The trainer's files (mixin): records, log, run folder, training state, checkpoints, interruption."""

    # The trainer's attributes this mixin uses (set in _Trainer.__init__).
    config: FinetuneConfig
    dist: _Dist
    device: torch.device
    callbacks: list[Callback]
    run_dir: Path | None
    spec: ArchSpec | None
    model: nn.Module
    train_dataset: Dataset
    val_dataset: Dataset | None
    classes: list[str]
    run_info: dict[str, Any]
    plans: list[StagePlan]
    notes: list[str]
    overwrite: bool
    inputs: list[str | Path]
    datasets: list[str | Path]
    scaler: torch.amp.GradScaler | None
    optimizer: torch.optim.Optimizer | None
    # Progress (saved in, and restored from, the training state).
    position: _Position
    history: list[dict[str, Any]]
    stage_summaries: dict[int, dict[str, Any]]
    best_top1: float | None
    best_epoch: int | None
    optimizer_state: dict[str, dict[str, Any]]
    epoch_sums: list[Any]
    log_sums: list[Any]
    skipped: list[tuple[str, str, str]]
    skipped_seen: set[tuple[str, str]]
    rng_at_boundary: dict[str, Any] | None
    created_run_dir: bool
    checkpoints_saved: int

    # ---- callbacks, files --------------------------------------------------------------------------

    def emit(self, event: Any) -> None:
        for callback in self.callbacks:
            callback(event)

    def _write_record(self, record: Mapping[str, Any]) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        try:
            with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(_clean(dict(record)), default=_json_default) + "\n")
        except OSError as exc:
            raise self._write_failed(self.run_dir / METRICS_FILE, exc) from None

    def _log(self, text: str) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(f"{stamp} {text}\n")
        except OSError as exc:
            raise self._write_failed(self.run_dir / LOG_FILE, exc) from None

    def create_run_dir(self) -> None:
        if self.run_dir is None:
            return
        if self.dist.main:
            config_json = {
                "format": RUN_FORMAT,
                "version": STATE_VERSION,
                "finetune": self.config.to_dict(),
                "classes": self.classes,
                "world_size": self.dist.world_size,
                **self.run_info,
            }
            with atomic_directory(
                self.run_dir, "run", force=self.overwrite, inputs=self.inputs, datasets=self.datasets
            ) as staging:
                text = json.dumps(_clean(config_json), indent=2, default=_json_default)
                (staging / CONFIG_FILE).write_text(text + "\n")
                (staging / METRICS_FILE).write_text("")
            self.created_run_dir = True
        self.dist.barrier()
        self._log(
            f"started: {len(self.plans)} stages, {self.config.total_epochs} epochs, world size {self.dist.world_size}"
        )

    def _check_skipped(self) -> None:
        new = []
        for split, dataset in (("train", self.train_dataset), ("val", self.val_dataset)):
            for path, reason in getattr(dataset, "skipped", []) if dataset is not None else []:
                key = (split, str(path))
                if key not in self.skipped_seen:
                    self.skipped_seen.add(key)
                    new.append((split, str(path), reason))
        if not new:
            return
        self.skipped.extend(new)
        for split, path, reason in new:
            self._write_record(
                {"type": "skipped", "split": split, "path": path, "reason": reason, "step": self.position.step}
            )
            self._log(f"skipped unreadable {split} sample {path}: {reason}")
        self.emit(SkippedFiles(new))

    # ---- state and checkpoints ---------------------------------------------------------------------

    def _state(
        self, position: _Position, rng: Mapping[str, Any], epoch_sums: Sequence[Any], log_sums: Sequence[Any]
    ) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "position": position.to_dict(),
            "optimizer": self.optimizer_state_by_name(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": dict(rng),
            "epoch_sums": [float(epoch_sums[0]), int(epoch_sums[1]), int(epoch_sums[2])],
            "log_sums": [float(log_sums[0]), int(log_sums[1])],
            "history": _clean(self.history),
            "stages": {str(k): _clean(v) for k, v in self.stage_summaries.items()},
            "best": {"top1": self.best_top1, "epoch": self.best_epoch},
            "skipped": [list(s) for s in self.skipped],
            "world_size": self.dist.world_size,
            "classes": self.classes,
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.position = _Position(**{k: int(v) for k, v in state["position"].items()})
        self.history = list(state.get("history", []))
        self.stage_summaries = {int(k): dict(v) for k, v in state.get("stages", {}).items()}
        best = state.get("best", {})
        self.best_top1, self.best_epoch = best.get("top1"), best.get("epoch")
        self.optimizer_state = {name: dict(value) for name, value in state.get("optimizer", {}).items()}
        self.epoch_sums = list(state.get("epoch_sums", [0.0, 0, 0]))
        self.log_sums = list(state.get("log_sums", [0.0, 0]))
        self.skipped = [tuple(s) for s in state.get("skipped", [])]
        self.skipped_seen = {(s[0], s[1]) for s in self.skipped}
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.rng_at_boundary = state["rng"]
        if int(state.get("world_size", 1)) != self.dist.world_size:
            self.notes.append(
                f"resumed with {self.dist.world_size} processes; the run was saved with {state.get('world_size')} "
                "(same global batches, so the data order is unchanged)"
            )

    def optimizer_state_by_name(self) -> dict[str, dict[str, Any]]:
        """Optimizer state keyed by parameter name (kept across stages for parameters that keep training)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        state = dict(self.optimizer_state)
        if self.optimizer is not None:
            for param, values in self.optimizer.state.items():
                name = names.get(id(param))
                if name is not None:
                    state[name] = {
                        k: (v.detach().clone().cpu() if isinstance(v, Tensor) else v) for k, v in values.items()
                    }
        return state

    def save_checkpoint(
        self, kind: str, state: Mapping[str, Any] | None, epoch: int, extra: Mapping[str, Any]
    ) -> Path | None:
        """Write ``last/`` (with the training state) or ``best/`` atomically (rank 0 only)."""
        if self.run_dir is None:
            return None
        target = self.run_dir / kind
        if self.dist.main:
            from ..saved_model import build_manifest, write_converted_files

            spec = self.spec or ArchSpec("pickle", f"{type(self.model).__module__}.{type(self.model).__qualname__}")
            clip = _clip_description(self.val_dataset if self.val_dataset is not None else self.train_dataset)
            strides = self.config.pathway_strides
            shape = pathway_input_shape([1, 3, clip["clip_len"], *clip["size"]], strides) if clip else None
            layout, dtype = _clip_input_format(clip)
            if shape is not None:
                shape = from_bcthw(shape, layout)  # the manifest's shape is in the model's own layout
            manifest = build_manifest(
                self.model, spec, input_shape=shape, command=self.run_info.get("command"),
                input_container=self.config.input_container, pathway_strides=strides, input_dtype=dtype,
                input_layout=layout if layout != DEFAULT_LAYOUT else None,
                source=self.run_info.get("model", {}).get("source"),
                extra={"finetune": {"run": str(self.run_dir), "epoch": epoch, "step": self.position.step,
                                    "classes": self.classes, "clip": clip, **_clean(dict(extra))},
                       **({"normalization": _manifest_normalization(clip)} if clip else {})},
            )
            wrapped = self.config.checkpoint_activations and spec.kind == "pickle"
            if wrapped:
                disable_activation_checkpointing(self.model)
            try:
                with atomic_directory(target, "converted", force=True) as staging:
                    write_converted_files(self.model, manifest, staging)
                    if state is not None:
                        torch.save(dict(state), staging / STATE_FILE)
            except OSError as exc:  # a full disk, a quota, a folder made read-only: the old checkpoint stays
                raise self._write_failed(target, exc) from None
            finally:
                if wrapped:
                    enable_activation_checkpointing(self.model)
        self.dist.barrier()
        self.checkpoints_saved += 1
        self.emit(CheckpointSaved(kind, target, epoch))
        return target

    def _write_failed(self, target: Path, exc: OSError) -> OutputError:
        """The error for a checkpoint that could not be written: why, what is still on disk, how to go on."""
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = f"the disk is full ({_describe_os_error(exc)})" if full else _describe_os_error(exc)
        run_dir = self.run_dir or target.parent
        fix = "free some space" if full else "make the run folder writable"
        if (run_dir / LAST_DIR / STATE_FILE).is_file():
            kept = f"{run_dir / LAST_DIR} from the previous checkpoint is intact"
            hint = f"{fix}, then resume with: stjfd finetune {run_dir} --resume"
        else:
            kept, hint = "no checkpoint was saved yet", f"{fix}, then start the run again"
        message = f"cannot save {target}: {reason}; {kept}"
        with contextlib.suppress(OSError):  # run.log is on the same disk (not self._log: it lands here again)
            with open(run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        return OutputError(message, hint)

    # ---- the run folder's life ---------------------------------------------------------------------

    def plot(self) -> None:
        if self.run_dir is None or not self.dist.main or not self.config.plot:
            return
        title = f"{self.run_dir.name}: {self.config.schedule} schedule"
        if self.config.schedule == "alternating":
            title += f" (s={self.config.spatial_downsample}, r={self.config.temporal_downsample})"
        plot_training_curve(read_metrics(self.run_dir), self.run_dir / CURVE_FILE, title=title)

    def _truncate_metrics(self) -> None:
        """Drop records written after the saved position (a crash between a record and the checkpoint)."""
        if self.run_dir is None or not self.dist.main:
            return
        path = self.run_dir / METRICS_FILE
        keep = [r for r in read_metrics(self.run_dir) if int(r.get("step", 0)) <= self.position.step]
        with atomic_file(path, "internal") as staging:
            staging.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in keep), encoding="utf-8")

    def _saved_entries(self) -> list[str]:
        return saved_entries(self.run_dir) if self.run_dir is not None else []

    def _remove_empty_run(self) -> None:
        """A run that fails before its first checkpoint leaves nothing: its folder is removed, so the
        rerun needs no --force. Only a folder this process created, and only while it holds no checkpoint."""
        if not (self.created_run_dir and self.checkpoints_saved == 0 and self.dist.main and self.run_dir is not None):
            return
        if not any((self.run_dir / name).exists() for name in (LAST_DIR, BEST_DIR)):
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.notes.append(f"removed {self.run_dir}: the run failed before its first checkpoint")

    def _interrupt(self, flag: _SignalFlag, saved: bool = False) -> None:
        reason = flag.signal_name or "KeyboardInterrupt"
        if not saved:
            rng = self.rng_at_boundary or _rng_state(self.device)
            state = self._state(self.position, rng, self.epoch_sums, self.log_sums)
            self.save_checkpoint(LAST_DIR, state, self.position.epoch, {"interrupted": True})
        target = self.run_dir / LAST_DIR if self.run_dir is not None else None
        self._write_record({"type": "interrupted", "signal": reason, **self.position.to_dict()})
        self._log(f"interrupted ({reason}) at stage {self.position.stage + 1}, epoch {self.position.epoch + 1}, "
                  f"batch {self.position.batch}; saved {target}")
        self.plot()
        where = f"epoch {self.position.epoch + 1}, batch {self.position.batch}, step {self.position.step}"
        message = f"interrupted at {where}"
        if target is not None:
            message += f"; saved {target} — resume with: stjfd finetune {self.run_dir} --resume"
        raise TrainingInterrupted(message, target, self.position.to_dict(), reason)


def saved_entries(run_dir: Path) -> list[str]:
    """What a run folder holds, in the order the CLI lists it: ``last/``, ``best/``, metrics.jsonl…"""
    names = [f"{LAST_DIR}/", f"{BEST_DIR}/", METRICS_FILE, CONFIG_FILE, LOG_FILE, CURVE_FILE]
    return [name for name in names if (run_dir / name.rstrip("/")).exists()]


def _clip_input_format(clip: Mapping[str, Any] | None) -> tuple[str, str]:
    """``(batched layout, dtype)`` of the clips a run trains on (``BTHWC``, ``uint8``), for its manifests."""
    if not clip:
        return DEFAULT_LAYOUT, "float32"
    return check_input_layout(str(clip.get("layout") or "CTHW")), str(clip.get("dtype") or "float32")
