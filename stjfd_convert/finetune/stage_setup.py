"""The stages of a run: which parameters train (optimizer state carried over by name), the DDP wrap,
each stage's summary, the clips the model sees, and the memory of the stage's first step.

:class:`_StageSetup` is the second of the trainer's mixins (``_RunFolder`` ← ``_StageSetup`` ←
``_Trainer``).
"""

from __future__ import annotations

import contextlib
import gc
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..memory import storage_key
from ..stages import disable_stage_safe_pooling, enable_stage_safe_pooling, set_trainable
from .checkpoint import _clip_description
from .events import StageEnd, StageStarted
from .metrics import _fmt, _fmt_bytes
from .results import StageSummary
from .run_folder import _RunFolder
from .schedule import StagePlan
from .stage_memory import _SavedBytes, _state_bytes
from .surgery import _make_optimizer


class _StageSetup(_RunFolder):
    """Stage set-up and bookkeeping of the trainer (mixin)."""

    # The trainer's attributes this mixin uses besides _RunFolder's (set in _Trainer.__init__).
    local_batch: int
    ddp: nn.Module | None
    forward_model: nn.Module
    stage_measured: bool
    _counter: _SavedBytes | None
    _input_shape: list[int]
    adapted_pools: set[str] | frozenset[str] = frozenset()  # filled by the stage's StageSafePool wrappers

    # ---- stages ------------------------------------------------------------------------------------

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
        # A stage's smaller clips must not break fixed-size pooling heads; full-size clips run them unchanged.
        self.adapted_pools = enable_stage_safe_pooling(self.model) if plan.stage != "joint" else set()
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
        summary["adapted_pools"] = sorted(set(summary.get("adapted_pools") or ()) | self.adapted_pools)

    def end_stage(self, plan: StagePlan) -> StageSummary:
        result = StageSummary.from_dict(self.stage_summaries[plan.index])
        disable_stage_safe_pooling(self.model)
        self._write_record({"type": "stage", **result.to_dict(), "step": self.position.step})
        if result.adapted_pools:
            self._log(
                f"stage {plan.index + 1} ({plan.label}): pooling run over the whole downsampled input in "
                f"{', '.join(result.adapted_pools)} (its kernel is larger than the stage's clips)"
            )
        self._log(
            f"stage {plan.index + 1} ({plan.label}) done: val top-1 {_fmt(result.val_top1)}, "
            f"peak memory {_fmt_bytes(result.peak_memory_bytes)}"
        )
        self.emit(StageEnd(result))
        self.ddp = None
        self.forward_model = self.model
        return result

    # ---- what the model sees and what the first step costs -----------------------------------------

    def _stage_clips(self, clips: Tensor, stage: str) -> Tensor:
        from ..data import downsample_clip

        layout = getattr(getattr(self.train_dataset, "config", None), "layout", "CTHW")  # uint8 THWC clips too
        if stage == "temporal" and self.config.spatial_downsample > 1:
            return downsample_clip(
                clips, spatial=self.config.spatial_downsample, mode=self.config.downsample_mode, layout=layout
            )
        if stage == "spatial" and self.config.temporal_downsample > 1:
            return downsample_clip(clips, temporal=self.config.temporal_downsample, layout=layout)
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
