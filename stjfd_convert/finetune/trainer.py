"""The trainer: stages, epochs, micro-batches, checkpoints and interruption of one run (rank-aware)."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..atomic import atomic_directory, atomic_file
from ..formats import BEST_DIR, CONFIG_FILE, CURVE_FILE, LAST_DIR, LOG_FILE, METRICS_FILE, RUN_FORMAT, STATE_FILE
from ..errors import ConfigError
from ..memory import storage_key
from ..models import ArchSpec
from ..stages import disable_activation_checkpointing, enable_activation_checkpointing, set_trainable
from .checkpoint import (
    STATE_FORMAT,
    STATE_VERSION,
    TrainingInterrupted,
    _clip_description,
    _manifest_normalization,
    _rng_state,
    _seed_everything,
    _set_rng_state,
)
from .config import FinetuneConfig
from .distributed import (
    ShardedShuffleSampler,
    _amp_settings,
    _autocast,
    _deterministic,
    _Dist,
    _resolve_device,
    _ShardSampler,
)
from .evaluation import _batch_norms, _eval_result, _evaluate_batches, _num_classes, recalibrate_batchnorm
from .events import (
    BatchEnd,
    Callback,
    CheckpointSaved,
    EpochEnd,
    PhaseProgress,
    RunStarted,
    SkippedFiles,
    StageEnd,
    StageStarted,
)
from .losses import ClassificationLoss, LossContext, LossFn, NonFiniteLossError
from .metrics import _clean, _fmt, _fmt_bytes, _json_default, plot_training_curve, read_metrics
from .results import EvalResult, FinetuneResult, StageSummary
from .schedule import StagePlan, lr_at, stage_plan
from .stage_memory import _SavedBytes, _state_bytes
from .surgery import _make_optimizer


# BN re-estimation draws its batches from the training loader under epochs of their own, so that it
# never replays (or shifts) the augmentation of a training epoch.
RECAL_EPOCH_OFFSET = 1_000_000


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


class _Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        val_dataset: Dataset | None,
        config: FinetuneConfig,
        *,
        callbacks: Sequence[Callback],
        loss_fn: LossFn | None,
        run_dir: Path | None,
        spec: ArchSpec | None,
        classes: Sequence[str] | None,
        overwrite: bool,
        run_info: Mapping[str, Any] | None,
        state: Mapping[str, Any] | None,
        dist: _Dist,
        inputs: Sequence[str | Path] = (),
        datasets: Sequence[str | Path] = (),
    ) -> None:
        from ..data import make_loader

        self.config = config
        self.dist = dist
        self.device = _resolve_device(config.device, self.dist.local_rank)
        self.autocast_dtype, use_scaler = _amp_settings(config, self.device)
        self.callbacks = list(callbacks) if self.dist.main else []
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else ClassificationLoss(config.label_smoothing)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.spec = spec
        self.model = model
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.classes = list(classes if classes is not None else getattr(train_dataset, "classes", []) or [])
        self.num_classes = _num_classes(model, self.classes)
        if not self.classes:
            self.classes = [str(i) for i in range(self.num_classes)]
        self.run_info = dict(run_info or {})
        self.plans = stage_plan(config)
        self.notes: list[str] = []
        if val_dataset is None or len(val_dataset) == 0:
            self.notes.append(
                "no validation set: nothing was evaluated and best/ is not written (add val/ or --val-split)"
            )

        if len(train_dataset) < config.batch_size:
            raise ConfigError(
                f"the training set has {len(train_dataset)} clips, fewer than one batch of {config.batch_size}",
                "lower --batch-size or add training videos",
            )
        self.sampler = ShardedShuffleSampler(
            len(train_dataset), config.batch_size, seed=config.seed, world_size=self.dist.world_size,
            rank=self.dist.rank,
        )
        self.local_batch = self.sampler.local_batch
        self.train_loader = make_loader(
            train_dataset, self.local_batch, shuffle=False, workers=config.workers, seed=config.seed,
            device=self.device, sampler=self.sampler, drop_last=False,
        )
        self.val_loader = None
        if val_dataset is not None and len(val_dataset) > 0:
            eval_batch = config.eval_batch_size or self.local_batch
            self.val_loader = make_loader(
                val_dataset, eval_batch, shuffle=False, workers=config.workers, seed=config.seed,
                device=self.device, sampler=_ShardSampler(len(val_dataset), self.dist.world_size, self.dist.rank),
            )
        self.batches_per_epoch = self.sampler.batches
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = self.steps_per_epoch * config.total_epochs
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.has_bn = bool(_batch_norms(model))

        # Progress state (restored from a saved state when resuming).
        self.position = _Position()
        self.history: list[dict[str, Any]] = []
        self.stage_summaries: dict[int, dict[str, Any]] = {}
        self.best_top1: float | None = None
        self.best_epoch: int | None = None
        self.optimizer_state: dict[str, dict[str, Any]] = {}
        self.epoch_sums = [0.0, 0, 0]  # loss sum, labelled clips, correct
        self.log_sums = [0.0, 0]  # loss sum, micro-batches since the last step record
        self.skipped_seen: set[tuple[str, str]] = set()
        self.skipped: list[tuple[str, str, str]] = []
        self.final: EvalResult | None = None
        self.rng_at_boundary: dict[str, Any] | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.ddp: nn.Module | None = None
        self.forward_model: nn.Module = model
        self._counter: _SavedBytes | None = None
        self._input_shape: list[int] = []
        self.stage_measured = False
        self.epoch_seconds = 0.0
        self.epoch_clips = 0
        self.resumed = state is not None
        if state is not None:
            self._load_state(state)
        self.model.to(self.device)
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.to(self.device)
        self.overwrite = overwrite
        self.inputs, self.datasets = list(inputs), list(datasets)
        self.created_run_dir = False  # by this process: removed again if the run fails before any checkpoint
        self.checkpoints_saved = 0

    # ---- callbacks, files -----------------------------------------------------------------------

    def emit(self, event: Any) -> None:
        for callback in self.callbacks:
            callback(event)

    def _write_record(self, record: Mapping[str, Any]) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_clean(dict(record)), default=_json_default) + "\n")

    def _log(self, text: str) -> None:
        if self.run_dir is None or not self.dist.main:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp} {text}\n")

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

    # ---- state ---------------------------------------------------------------------------------

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
            shape = [1, 3, clip["clip_len"], *clip["size"]] if clip else None
            manifest = build_manifest(
                self.model, spec, input_shape=shape, command=self.run_info.get("command"),
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
            finally:
                if wrapped:
                    enable_activation_checkpointing(self.model)
        self.dist.barrier()
        self.checkpoints_saved += 1
        self.emit(CheckpointSaved(kind, target, epoch))
        return target

    # ---- stages ----------------------------------------------------------------------------------

    def _stage_input_shape(self, plan: StagePlan) -> tuple[int, ...]:
        clip = _clip_description(self.train_dataset)
        if clip is None:
            return ()
        from ..stages import stage_clip_shape

        shape = (self.local_batch, 3, clip["clip_len"], *clip["size"])
        if plan.stage == "temporal":
            return stage_clip_shape(shape, "temporal", self.config.spatial_downsample, 1)
        if plan.stage == "spatial":
            t = math.ceil(shape[2] / self.config.temporal_downsample)  # downsample_clip keeps ceil(T / r) frames
            return (*shape[:2], t, *shape[3:])
        return shape

    def start_stage(self, plan: StagePlan) -> None:
        # Optimizer state of parameters that keep training carries over; that of newly frozen ones is dropped.
        self.optimizer_state = self.optimizer_state_by_name()
        self.optimizer = None
        if self.ddp is not None:
            # The previous stage's DDP reducer hooks the parameters; it must be gone before the next wrap.
            self.ddp = self.forward_model = None
            gc.collect()
        trainable = set(map(id, set_trainable(self.model, plan.stage)))
        named = [(n, p) for n, p in self.model.named_parameters() if id(p) in trainable]
        frozen = [n for n, p in self.model.named_parameters() if id(p) not in trainable]
        self.optimizer = _make_optimizer(self.config, named)
        for name, param in named:
            saved = self.optimizer_state.get(name)
            if saved:
                self.optimizer.state[param] = {
                    k: (v.to(self.device) if isinstance(v, Tensor) and k != "step" else v) for k, v in saved.items()
                }
        frozen_set = set(frozen)
        active = {n for n, _ in named}
        self.optimizer_state = {k: v for k, v in self.optimizer_state.items() if k not in frozen_set | active}
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.forward_model = self.ddp if self.ddp is not None else self.model
        self.stage_measured = bool(self.stage_summaries.get(plan.index, {}).get("memory"))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        summary = self.stage_summaries.setdefault(
            plan.index,
            StageSummary(
                plan.index, plan.cycle, plan.stage, plan.first_epoch, plan.last_epoch,
                list(self._stage_input_shape(plan)),
                sum(p.numel() for _, p in named), sum(self.model.get_parameter(n).numel() for n in frozen),
            ).to_dict(),
        )
        summary.setdefault("seconds", 0.0)
        self.emit(StageStarted(plan, tuple(summary["input_shape"]), [n for n, _ in named], frozen,
                               summary["trainable_params"], summary["frozen_params"]))

    def _update_stage_summary(self, plan: StagePlan, seconds: float) -> None:
        """Fold the stage's epoch records into its summary (before ``last/`` is saved, so a resumed run
        reports finished stages in full)."""
        summary = self.stage_summaries[plan.index]
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
            memory = summary.setdefault("memory", {})
            memory["cuda_peak_bytes"] = max(peak, memory.get("cuda_peak_bytes") or 0)
            summary["peak_memory_bytes"] = memory["cuda_peak_bytes"]
        records = [r for r in self.history if r.get("stage_index") == plan.index]
        if records:
            last = records[-1]
            for key in ("val_loss", "val_top1", "val_top5", "val_top5_k"):
                summary[key] = last.get(key)
            losses = [r["train_loss"] for r in records if r.get("train_loss") is not None]
            summary["train_loss"] = sum(losses) / len(losses) if losses else None
            tops = [r["train_top1"] for r in records if r.get("train_top1") is not None]
            summary["train_top1"] = tops[-1] if tops else None
            rates = [r["clips_per_s"] for r in records if r.get("clips_per_s")]
            summary["clips_per_s"] = sum(rates) / len(rates) if rates else None
        summary["seconds"] = float(summary.get("seconds") or 0.0) + seconds

    def end_stage(self, plan: StagePlan) -> StageSummary:
        result = StageSummary.from_dict(self.stage_summaries[plan.index])
        self._write_record({"type": "stage", **result.to_dict(), "step": self.position.step})
        self._log(
            f"stage {plan.index + 1} ({plan.label}) done: val top-1 {_fmt(result.val_top1)}, "
            f"peak memory {_fmt_bytes(result.peak_memory_bytes)}"
        )
        self.emit(StageEnd(result))
        self.ddp = None
        self.forward_model = self.model
        return result

    # ---- one micro-batch -------------------------------------------------------------------------

    def _stage_clips(self, clips: Tensor, stage: str) -> Tensor:
        from ..data import downsample_clip

        if stage == "temporal" and self.config.spatial_downsample > 1:
            return downsample_clip(clips, spatial=self.config.spatial_downsample, mode=self.config.downsample_mode)
        if stage == "spatial" and self.config.temporal_downsample > 1:
            return downsample_clip(clips, temporal=self.config.temporal_downsample)
        return clips

    def _measure_first_step(self, plan: StagePlan) -> contextlib.AbstractContextManager[Any]:
        if not self.config.measure_memory or self.stage_measured:
            return contextlib.nullcontext(None)
        exclude = {storage_key(t) for t in [*self.model.parameters(), *self.model.buffers()]}
        counter = _SavedBytes(exclude)
        self._counter = counter
        return torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t)

    def _record_memory(self, plan: StagePlan) -> None:
        counter = self._counter
        if counter is None:
            return
        self._counter = None
        self.stage_measured = True
        memory = {"saved_bytes": counter.bytes, **_state_bytes(self.model, self.optimizer), "device": self.device.type}
        memory["cpu_accounting_bytes"] = (
            memory["saved_bytes"] + memory["param_bytes"] + memory["buffer_bytes"] + memory["grad_bytes"]
            + memory["optimizer_bytes"]
        )
        summary = self.stage_summaries[plan.index]
        summary["input_shape"] = self._input_shape  # what the model really saw (also for datasets without a ClipConfig)
        summary["memory"] = memory
        summary["peak_memory_bytes"] = memory["cpu_accounting_bytes"]

    # ---- epochs --------------------------------------------------------------------------------

    def _agree(self, local: bool) -> bool:
        """True on every rank when any rank says so (one flag, all-reduced)."""
        if not self.dist.enabled:
            return local
        flag = torch.tensor([1.0 if local else 0.0], dtype=torch.float64, device=self.device)
        return bool(self.dist.all_reduce(flag, "max")[0] > 0)

    def train_epoch(self, plan: StagePlan, epoch: int, flag: _SignalFlag) -> str:
        """Run (the rest of) one epoch. Returns ``"done"``, ``"stop"`` (stop requested on the last batch:
        finish the epoch, then stop) or ``"interrupted"`` (stopped at an optimizer-step boundary inside the
        epoch; ``self.position`` and the saved sums/RNG describe that boundary)."""
        config = self.config
        skip = self.position.batch if self.position.epoch == epoch else 0
        if skip == 0:
            self.epoch_sums = [0.0, 0, 0]
        self.sampler.skip_batches = skip
        self.train_loader.set_epoch(epoch)
        batches = self.batches_per_epoch
        model = self.model
        model.train()
        boundary = _Position(plan.index, epoch, skip, self.position.step)
        if self.rng_at_boundary is None:
            self.rng_at_boundary = _rng_state(self.device)
        boundary_sums = (list(self.epoch_sums), list(self.log_sums))
        callback_stop = False
        stop = False
        rate = 0.0
        tick = epoch_start = time.perf_counter()
        clips_done = 0
        self.optimizer.zero_grad(set_to_none=True)
        batch = skip
        try:
            for clips, labels in self.train_loader:
                batch += 1
                group_start = ((batch - 1) // config.grad_accum) * config.grad_accum
                group_size = min(config.grad_accum, batches - group_start)
                is_boundary = batch == group_start + group_size
                stage_clips = self._stage_clips(clips, plan.stage).to(self.device, non_blocking=True)
                self._input_shape = list(stage_clips.shape)
                labels = labels.to(self.device, non_blocking=True)
                no_sync = self.ddp is not None and not is_boundary
                with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
                    with self._measure_first_step(plan):
                        with _autocast(self.device, self.autocast_dtype):
                            outputs = self.forward_model(stage_clips)
                            ctx = LossContext(
                                outputs, labels, stage_clips, clips, model, plan.stage, epoch, self.position.step
                            )
                            value = self.loss_fn(ctx)
                        loss, extras = value if isinstance(value, tuple) else (value, {})
                        loss = loss.float()
                    keep = labels >= 0
                    hits = outputs.detach().argmax(1)[keep] == labels[keep]
                    correct = float(hits.sum()) if hits.numel() else 0.0
                    detached = float(loss.detach())
                    finite = math.isfinite(detached)
                    local_stop = flag.requested or callback_stop
                    stats = torch.tensor(
                        [detached if finite else 0.0, 1.0, float(keep.sum()), correct, 0.0 if finite else 1.0,
                         1.0 if local_stop else 0.0],
                        dtype=torch.float64, device=self.device,
                    )
                    self.dist.all_reduce(stats)
                    if stats[4] > 0:
                        self._raise_non_finite(plan, epoch, batch, detached)
                    scaled = loss / group_size
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                mean_loss = float(stats[0] / stats[1])
                self.epoch_sums[0] += mean_loss * float(stats[2])
                self.epoch_sums[1] += int(stats[2])
                self.epoch_sums[2] += int(stats[3])
                self.log_sums[0] += mean_loss
                self.log_sums[1] += 1
                lr = lr_at(self.position.step, self.total_steps, self.steps_per_epoch, config)
                if is_boundary:
                    self._optimizer_step(lr, plan)
                    self.position.step += 1
                    if self.position.step % config.log_every == 0 or batch == batches:
                        self._step_record(plan, epoch, batch, batches, lr, extras)
                    boundary = _Position(plan.index, epoch, batch, self.position.step)
                    self.rng_at_boundary = _rng_state(self.device)
                    boundary_sums = (list(self.epoch_sums), list(self.log_sums))
                clips_done += stage_clips.shape[0] * self.dist.world_size
                now = time.perf_counter()
                instant = stage_clips.shape[0] * self.dist.world_size / max(now - tick, 1e-9)
                tick = now
                rate = instant if rate == 0.0 else 0.8 * rate + 0.2 * instant
                try:
                    self.emit(
                        BatchEnd(plan, epoch, batch, batches, self.position.step, is_boundary, mean_loss, lr, rate)
                    )
                except KeyboardInterrupt:
                    callback_stop = True
                # Every rank must stop at the same boundary: under DDP only the all-reduced flag counts
                # (a request seen after this batch's reduction is honoured at the next boundary).
                stop = bool(stats[5] > 0) if self.dist.enabled else (flag.requested or callback_stop)
                if stop and is_boundary:
                    break
        finally:
            self.sampler.skip_batches = 0
        self.epoch_seconds = time.perf_counter() - epoch_start
        self.epoch_clips = clips_done
        if stop and batch < batches:
            self.position = boundary
            self.epoch_sums, self.log_sums = boundary_sums
            return "interrupted"
        return "stop" if stop else "done"

    def _optimizer_step(self, lr: float, plan: StagePlan) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            if self.config.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self._trainable(), self.config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self._trainable(), self.config.grad_clip)
            self.optimizer.step()
        self._record_memory(plan)  # gradients and optimizer state both exist only now
        self.optimizer.zero_grad(set_to_none=True)

    def _trainable(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _step_record(
        self, plan: StagePlan, epoch: int, batch: int, batches: int, lr: float, extras: Mapping[str, Any]
    ) -> None:
        loss = self.log_sums[0] / max(1, self.log_sums[1])
        self.log_sums = [0.0, 0]
        record = {
            "type": "step", "step": self.position.step, "epoch": epoch, "epoch_progress": epoch + batch / batches,
            "cycle": plan.cycle, "stage": plan.stage, "loss": loss, "lr": lr,
        }
        for key, value in extras.items():
            record[f"loss_{key}"] = float(value)
        self._write_record(record)

    def _raise_non_finite(self, plan: StagePlan, epoch: int, batch: int, loss: float) -> None:
        last = f"{self.run_dir / LAST_DIR}" if self.run_dir is not None and (self.run_dir / LAST_DIR).is_dir() else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        message = (
            f"the training loss became non-finite ({loss}) in stage {plan.index + 1} "
            f"({plan.label}), epoch {epoch + 1}, batch {batch}; {kept}"
        )
        self._write_record({"type": "error", "message": message, "step": self.position.step})
        self._log(message)
        raise NonFiniteLossError(message, "lower --lr, add --grad-clip, or check the data for broken clips")

    def recalibrate(self, plan: StagePlan, epoch: int) -> int:
        """BN statistics at full resolution after a downsampled stage's epoch; averaged across ranks."""
        if plan.stage == "joint" or not self.has_bn or self.config.bn_recal_batches == 0:
            return 0
        total = min(self.config.bn_recal_batches, self.batches_per_epoch)
        self.train_loader.set_epoch(RECAL_EPOCH_OFFSET + epoch)

        def batches() -> Iterator[Tensor]:
            for index, (clips, _) in enumerate(self.train_loader):
                if index >= total:
                    break
                yield clips

        used = recalibrate_batchnorm(
            self.model, batches(), device=self.device, autocast_dtype=self.autocast_dtype,
            progress=lambda done: self.emit(PhaseProgress("bn_recal", epoch, done, total)),
        )
        if self.dist.enabled:
            for norm in _batch_norms(self.model):
                for buffer in (norm.running_mean, norm.running_var):
                    self.dist.all_reduce(buffer)
                    buffer.div_(self.dist.world_size)
        return used

    def validate(self, epoch: int) -> EvalResult | None:
        if self.val_loader is None:
            return None
        start = time.perf_counter()
        total = len(self.val_loader)
        sums = _evaluate_batches(
            self.model, self.val_loader, self.num_classes, self.device, self.autocast_dtype, self.dist,
            lambda done: self.emit(PhaseProgress("eval", epoch, done, total)),
        )
        return _eval_result(sums, self.classes, time.perf_counter() - start)

    def end_epoch(self, plan: StagePlan, epoch: int) -> None:
        recal = self.recalibrate(plan, epoch)
        result = self.validate(epoch)
        self.final = result
        self.position = _Position(plan.index + (1 if epoch == plan.last_epoch else 0), epoch + 1, 0, self.position.step)
        labelled = self.epoch_sums[1]
        record: dict[str, Any] = {
            "type": "epoch",
            "epoch": epoch,
            "stage_index": plan.index,
            "cycle": plan.cycle,
            "stage": plan.stage,
            "step": self.position.step,
            "lr": lr_at(max(0, self.position.step - 1), self.total_steps, self.steps_per_epoch, self.config),
            "train_loss": self.epoch_sums[0] / labelled if labelled else None,
            "train_top1": self.epoch_sums[2] / labelled if labelled else None,
            "val_loss": result.loss if result else None,
            "val_top1": result.top1 if result else None,
            "val_top5": result.top5 if result else None,
            "val_top5_k": result.top5_k if result else None,
            "bn_recal_batches": recal,
            "seconds": self.epoch_seconds,
            "clips_per_s": self.epoch_clips / self.epoch_seconds if self.epoch_seconds > 0 else None,
            "peak_memory_bytes": self.stage_summaries[plan.index].get("peak_memory_bytes"),
        }
        self.history.append(_clean(record))
        self._update_stage_summary(plan, self.epoch_seconds)
        self._write_record(record)
        self.emit(EpochEnd(dict(record)))
        self._check_skipped()
        improved = result is not None and (self.best_top1 is None or result.top1 > self.best_top1)
        if improved:
            self.best_top1, self.best_epoch = result.top1, epoch
        self.epoch_sums = [0.0, 0, 0]
        self.rng_at_boundary = _rng_state(self.device)
        extra = {"val_top1": record["val_top1"], "val_top5": record["val_top5"], "stage": plan.stage}
        state = self._state(self.position, self.rng_at_boundary, self.epoch_sums, self.log_sums)
        self.save_checkpoint(LAST_DIR, state, epoch, extra)
        if improved:
            self.save_checkpoint(BEST_DIR, None, epoch, extra)
        self._log(
            f"epoch {epoch + 1}/{self.config.total_epochs} ({plan.label}): train loss {_fmt(record['train_loss'])}, "
            f"val top-1 {_fmt(record['val_top1'])}"
        )

    def plot(self) -> None:
        if self.run_dir is None or not self.dist.main or not self.config.plot:
            return
        title = f"{self.run_dir.name}: {self.config.schedule} schedule"
        if self.config.schedule == "alternating":
            title += f" (s={self.config.spatial_downsample}, r={self.config.temporal_downsample})"
        plot_training_curve(read_metrics(self.run_dir), self.run_dir / CURVE_FILE, title=title)

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        """Train from the current position; a resumed run that had finished returns at once, touching nothing."""
        start = time.perf_counter()
        if self.resumed and self.position.stage >= len(self.plans):
            self.notes.append("the run had already finished: nothing was trained and no file was changed")
            stages = [StageSummary.from_dict(self.stage_summaries[p.index]) for p in self.plans
                      if p.index in self.stage_summaries]
            return self._result(start, stages, changed=False)
        try:
            return self._run(start)
        except TrainingInterrupted:
            raise
        except BaseException:
            self._remove_empty_run()
            raise

    def _remove_empty_run(self) -> None:
        """A run that fails before its first checkpoint leaves nothing: its folder is removed, so the
        rerun needs no --force. Only a folder this process created, and only while it holds no checkpoint."""
        if not (self.created_run_dir and self.checkpoints_saved == 0 and self.dist.main and self.run_dir is not None):
            return
        if not any((self.run_dir / name).exists() for name in (LAST_DIR, BEST_DIR)):
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.notes.append(f"removed {self.run_dir}: the run failed before its first checkpoint")

    def _result(self, start: float, stages: list[StageSummary], *, changed: bool = True) -> FinetuneResult:
        return FinetuneResult(
            run_dir=self.run_dir, config=self.config, classes=self.classes, stages=stages,
            epochs=list(self.history), best_top1=self.best_top1, best_epoch=self.best_epoch, final=self.final,
            skipped=list(self.skipped), world_size=self.dist.world_size, device=str(self.device),
            steps=self.position.step, seconds=time.perf_counter() - start, notes=self.notes, changed=changed,
            saved=self._saved_entries(),
        )

    def _saved_entries(self) -> list[str]:
        if self.run_dir is None:
            return []
        names = [f"{LAST_DIR}/", f"{BEST_DIR}/", METRICS_FILE, CONFIG_FILE, LOG_FILE, CURVE_FILE]
        return [name for name in names if (self.run_dir / name.rstrip("/")).exists()]

    def _run(self, start: float) -> FinetuneResult:
        resumed_from = self.position.to_dict() if self.resumed else None
        if self.resumed:
            self._truncate_metrics()
            self._write_record({"type": "resumed", **self.position.to_dict()})
            self._log(
                f"resumed at stage {self.position.stage + 1}, epoch {self.position.epoch + 1}, "
                f"batch {self.position.batch}"
            )
        else:
            self.create_run_dir()
        self.emit(RunStarted(self.plans, self.config.total_epochs, self.batches_per_epoch, self.steps_per_epoch,
                             len(self.train_dataset), len(self.val_dataset) if self.val_dataset is not None else 0,
                             self.dist.world_size, str(self.device), resumed_from, self.run_dir))
        self._check_skipped()
        if self.config.checkpoint_activations:
            enable_activation_checkpointing(self.model)
        if self.resumed and self.rng_at_boundary is not None:
            _set_rng_state(self.rng_at_boundary, self.device)
        else:
            _seed_everything(self.config.seed)
            self.rng_at_boundary = None
        stage_results: list[StageSummary] = [
            StageSummary.from_dict(self.stage_summaries[p.index]) for p in self.plans[: self.position.stage]
            if p.index in self.stage_summaries
        ]
        try:
            with _SignalFlag() as flag, _deterministic(self.config.deterministic, self.device):
                for plan in self.plans[self.position.stage :]:
                    self.start_stage(plan)
                    for epoch in range(max(plan.first_epoch, self.position.epoch), plan.last_epoch + 1):
                        if self.position.epoch != epoch:
                            self.position = _Position(plan.index, epoch, 0, self.position.step)
                        outcome = self.train_epoch(plan, epoch, flag)
                        if outcome == "interrupted":
                            self._interrupt(flag)
                        self.end_epoch(plan, epoch)
                        if self._agree(outcome == "stop" or flag.requested):
                            if epoch == plan.last_epoch:
                                stage_results.append(self.end_stage(plan))
                            self._interrupt(flag, saved=True)
                    stage_results.append(self.end_stage(plan))
                    self.plot()
        finally:
            if self.config.checkpoint_activations:
                disable_activation_checkpointing(self.model)
            self.model.eval()
        self._log("finished")
        return self._result(start, stage_results)

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

    def _truncate_metrics(self) -> None:
        """Drop records written after the saved position (a crash between a record and the checkpoint)."""
        if self.run_dir is None or not self.dist.main:
            return
        path = self.run_dir / METRICS_FILE
        keep = [r for r in read_metrics(self.run_dir) if int(r.get("step", 0)) <= self.position.step]
        with atomic_file(path, "internal") as staging:
            staging.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in keep), encoding="utf-8")
