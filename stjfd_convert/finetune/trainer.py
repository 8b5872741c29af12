"""The trainer: the epochs and micro-batches of a run's stages, evaluation after each epoch, and the run
from start (or a resumed position) to its result, on every rank of a process group. Its files live in
``run_folder`` and its stage set-up in ``stage_setup`` (the mixins it builds on).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..formats import BEST_DIR, LAST_DIR
from ..models import ArchSpec
from ..parity import flatten_outputs
from ..stages import disable_activation_checkpointing, enable_activation_checkpointing
from .checkpoint import (
    TrainingInterrupted,
    _Position,
    _rng_state,
    _seed_everything,
    _set_rng_state,
    _SignalFlag,
    stopped_at_once,
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
from .events import BatchEnd, Callback, EpochEnd, PhaseProgress, RunStarted
from .losses import ClassificationLoss, LossContext, LossFn, NonFiniteLossError
from .metrics import _clean, _fmt
from .results import EvalResult, FinetuneResult, StageSummary
from .schedule import StagePlan, lr_at, stage_plan
from .stage_memory import _SavedBytes
from .stage_setup import _StageSetup

# BN re-estimation draws its batches from the training loader under epochs of their own, so that it
# never replays (or shifts) the augmentation of a training epoch.
RECAL_EPOCH_OFFSET = 1_000_000


class _Trainer(_StageSetup):
    """One fine-tuning run: the stages, epochs and micro-batches, on every rank of a process group."""

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
        self._build_loaders()
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.has_bn = bool(_batch_norms(model))
        self._init_progress()
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

    def _build_loaders(self) -> None:
        """The training sampler and loader (this rank's share of every global batch), the validation
        loader (this rank's shard), and the batches and optimizer steps per epoch."""
        from ..data import make_loader

        config, train_dataset, val_dataset = self.config, self.train_dataset, self.val_dataset
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

    def _init_progress(self) -> None:
        """The progress of a new run (``_load_state`` then restores a saved one) and the per-stage state."""
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
        self.forward_model: nn.Module = self.model
        self._counter: _SavedBytes | None = None
        self._input_shape: list[int] = []
        self.stage_measured = False
        self.epoch_seconds = 0.0
        self.epoch_clips = 0

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
        self.model.train()
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
                stats, extras, seen = self._micro_batch(
                    plan, epoch, batch, clips, labels, group_size, is_boundary, flag, callback_stop
                )
                mean_loss = self._add_to_sums(stats)
                lr = lr_at(self.position.step, self.total_steps, self.steps_per_epoch, config)
                if is_boundary:
                    self._optimizer_step(lr, plan)
                    self.position.step += 1
                    if self.position.step % config.log_every == 0 or batch == batches:
                        self._step_record(plan, epoch, batch, batches, lr, extras)
                    boundary = _Position(plan.index, epoch, batch, self.position.step)
                    self.rng_at_boundary = _rng_state(self.device)
                    boundary_sums = (list(self.epoch_sums), list(self.log_sums))
                clips_done += seen * self.dist.world_size
                now = time.perf_counter()
                instant = seen * self.dist.world_size / max(now - tick, 1e-9)
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

    def _micro_batch(
        self, plan: StagePlan, epoch: int, batch: int, clips: Tensor, labels: Tensor, group_size: int,
        is_boundary: bool, flag: _SignalFlag, callback_stop: bool,
    ) -> tuple[Tensor, Mapping[str, Any], int]:
        """Forward, loss and backward of micro-batch ``batch`` (gradients accumulate over the ``group_size``
        micro-batches of one optimizer step; DDP syncs them on the last). Returns the all-reduced sums
        ``[loss, ranks, labelled clips, correct, non-finite ranks, ranks asking to stop]``, the loss's extra
        terms and the number of clips this rank ran. A stop request is read after the forward pass, so
        that it enters this batch's all-reduce on every rank."""
        stage_clips = self._stage_clips(clips, plan.stage).to(self.device, non_blocking=True)
        self._input_shape = list(stage_clips.shape)
        labels = labels.to(self.device, non_blocking=True)
        no_sync = self.ddp is not None and not is_boundary
        with self.ddp.no_sync() if no_sync else contextlib.nullcontext():
            with self._measure_first_step(plan):
                with _autocast(self.device, self.autocast_dtype):
                    outputs = self.forward_model(stage_clips)
                    ctx = LossContext(
                        outputs, labels, stage_clips, clips, self.model, plan.stage, epoch, self.position.step
                    )
                    value = self.loss_fn(ctx)
                loss, extras = value if isinstance(value, tuple) else (value, {})
                loss = loss.float()
            keep = labels >= 0
            correct = 0.0
            if bool(keep.any()):  # unlabeled clips (distillation) have no accuracy; the first output is the logits
                logits = outputs if isinstance(outputs, Tensor) else flatten_outputs(outputs)[0][1]
                correct = float((logits.detach().argmax(1)[keep] == labels[keep]).sum())
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
        return stats, extras, stage_clips.shape[0]

    def _add_to_sums(self, stats: Tensor) -> float:
        """Add a micro-batch's all-reduced sums to the epoch's and the step log's; returns its mean loss."""
        mean_loss = float(stats[0] / stats[1])
        self.epoch_sums[0] += mean_loss * float(stats[2])
        self.epoch_sums[1] += int(stats[2])
        self.epoch_sums[2] += int(stats[3])
        self.log_sums[0] += mean_loss
        self.log_sums[1] += 1
        return mean_loss

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

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        """Train from the current position; a resumed run that had finished returns at once, touching nothing."""
        start = time.perf_counter()
        if self.resumed and self.position.stage >= len(self.plans):
            self.notes.append("the run had already finished: nothing was trained and no file was changed")
            return self._result(start, self._summaries(self.plans), changed=False)
        try:
            return self._run(start)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; last/ is whatever was saved before
            self._remove_empty_run()
            raise stopped_at_once(self.run_dir) from None
        except BaseException:
            self._remove_empty_run()
            raise

    def _summaries(self, plans: Sequence[StagePlan]) -> list[StageSummary]:
        """The summaries of those of ``plans`` that have started (when resuming: the finished ones)."""
        return [StageSummary.from_dict(self.stage_summaries[p.index]) for p in plans if p.index in self.stage_summaries]

    def _result(self, start: float, stages: list[StageSummary], *, changed: bool = True) -> FinetuneResult:
        return FinetuneResult(
            run_dir=self.run_dir, config=self.config, classes=self.classes, stages=stages,
            epochs=list(self.history), best_top1=self.best_top1, best_epoch=self.best_epoch, final=self.final,
            skipped=list(self.skipped), world_size=self.dist.world_size, device=str(self.device),
            steps=self.position.step, seconds=time.perf_counter() - start, notes=self.notes, changed=changed,
            saved=self._saved_entries(),
        )

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
        stage_results = self._summaries(self.plans[: self.position.stage])
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

