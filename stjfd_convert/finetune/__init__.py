"""Fine-tuning with the paper's alternating temporal/spatial schedule (DESIGN.md §3).

A run is a list of *stages*. ``schedule="alternating"`` gives ``cycles`` × (temporal stage → spatial
stage), each ``epochs_per_stage`` epochs:

- temporal stage: every frame of the clip, frames downsampled by ``spatial_downsample`` (s); the spatial
  atoms Φ are frozen (``requires_grad=False`` and absent from the optimizer), so Ψ, the coefficients A and
  every other parameter (BN, classifier, biases, dense convs) train;
- spatial stage: full-resolution frames, clips temporally downsampled by ``temporal_downsample`` (r);
  the temporal atoms Ψ are frozen.

``schedule="joint"`` is the baseline the paper compares with: every parameter at full size, for the same
number of epochs (one joint stage of 2 · ``epochs_per_stage`` epochs per cycle). A plain, unconverted
model trains everything in every stage.

After each epoch of a downsampled stage the BatchNorm statistics are re-estimated at full resolution
(:func:`recalibrate_batchnorm`, ``bn_recal_batches``) and the model is evaluated at full resolution
(:func:`evaluate`: top-1/top-5, loss, per-class accuracy, confusion matrix).

The training loss is pluggable: ``loss_fn(LossContext) -> Tensor`` (or ``(Tensor, {name: float})`` to
log extra terms). The context carries the outputs, labels, the stage's clips *and* the full-size clips,
and the model being trained, so a distillation loss holding a teacher slots in without changes here
(an ``nn.Module`` loss is moved to the training device).

Run folder (``run_dir``): ``config.json``, ``metrics.jsonl`` (one JSON object per line: ``step``,
``epoch``, ``stage``, ``skipped``, ``interrupted``, ``resumed``, ``error`` records), ``run.log``,
``training_curve.png``, ``last/`` after every epoch and ``best/`` by validation top-1 — both loadable
with :func:`~stjfd_convert.saved_model.load_converted` — and ``last/training_state.pt``: optimizer
state (by parameter name), LR-schedule position, GradScaler, RNG states (torch, CUDA, numpy, python,
stored as tensors/ints so ``torch.load(weights_only=True)`` reads it) and the stage/epoch/batch/step
position, so :func:`resume` continues exactly (bit-identical on CPU with the same seed).

SIGINT/SIGTERM (main thread only) finish the current optimizer step, save ``last/`` and raise
:class:`TrainingInterrupted` (a ``KeyboardInterrupt``); a second Ctrl-C stops at once. A non-finite loss
raises :class:`NonFiniteLossError` and keeps the last good checkpoint.

Distributed (torchrun): when ``WORLD_SIZE`` > 1 the process group is initialised from the environment
(gloo on CPU, nccl on CUDA). ``batch_size`` is the *global* batch: every global batch is the one a
single process would draw, split evenly across ranks (:class:`ShardedShuffleSampler`), and DDP averages
the per-rank mean gradients, so a run without BatchNorm matches a single-process run up to float
rounding. Metrics are summed across ranks; only rank 0 writes files and emits callbacks.

Memory per stage (``measure_memory``): CPU = bytes autograd saves for backward on the stage's first
step (each storage once; parameters and buffers that are saved count once, as parameters) + parameters
+ buffers + gradients + optimizer state after the step; CUDA additionally
``torch.cuda.max_memory_allocated`` over the stage, which is then the reported peak.

Nothing here prints; progress goes to ``callbacks`` (callables receiving the event dataclasses below).

The package, by what each part does (imports flow one way, top to bottom; nothing imports this
``__init__``):

- ``config``: :class:`FinetuneConfig` and the choices it accepts.
- ``schedule``: :class:`StagePlan`, :func:`stage_plan`, :func:`lr_at`.
- ``losses``: :class:`LossContext`, :class:`ClassificationLoss`, the ``LossFn`` protocol (distillation
  lands here), :class:`NonFiniteLossError`.
- ``results``, ``events``: the result dataclasses and the events callbacks receive.
- ``distributed``: samplers, the process group, devices, determinism, AMP.
- ``checkpoint``: the training state's format and position, RNG state, the SIGINT/SIGTERM flag,
  reading a run folder back, :class:`ResumeError`, :class:`TrainingInterrupted`.
- ``stage_memory``: the saved-for-backward byte counter of a stage's first step.
- ``surgery``: :func:`adapt_classifier`, parameter groups, the optimizer.
- ``metrics``: metrics.jsonl (:func:`read_metrics`) and :func:`plot_training_curve`.
- ``evaluation``: :func:`recalibrate_batchnorm`, :func:`evaluate`, :func:`evaluate_folder`.
- ``run_folder`` ← ``stage_setup`` ← ``trainer``: the trainer of one run (rank-aware), as two mixins
  (its files and checkpoints; its stages' set-up) and the training loop.
- ``run``: :func:`finetune`, :func:`resume`, :func:`finetune_paths`.
"""

from __future__ import annotations

from .checkpoint import ResumeError, TrainingInterrupted, load_training_state, read_run_config, stopped_at_once
from .config import FinetuneConfig
from .distill import DISTILL_LOSSES, DistillationLoss
from .distributed import ShardedShuffleSampler
from .evaluation import evaluate, evaluate_folder, recalibrate_batchnorm
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
from .losses import ClassificationLoss, LossContext, LossFn, LossOutput, NonFiniteLossError
from .metrics import plot_training_curve, read_metrics
from .results import EvalResult, FinetuneResult, StageSummary
from .run import finetune, finetune_paths, resume
from .schedule import StagePlan, lr_at, stage_plan
from .surgery import adapt_classifier

__all__ = [
    "DISTILL_LOSSES",
    "DistillationLoss",
    "BatchEnd",
    "Callback",
    "CheckpointSaved",
    "ClassificationLoss",
    "EpochEnd",
    "EvalResult",
    "FinetuneConfig",
    "FinetuneResult",
    "LossContext",
    "LossFn",
    "LossOutput",
    "NonFiniteLossError",
    "PhaseProgress",
    "ResumeError",
    "RunStarted",
    "ShardedShuffleSampler",
    "SkippedFiles",
    "StageEnd",
    "StagePlan",
    "StageStarted",
    "StageSummary",
    "TrainingInterrupted",
    "adapt_classifier",
    "evaluate",
    "evaluate_folder",
    "finetune",
    "finetune_paths",
    "load_training_state",
    "lr_at",
    "plot_training_curve",
    "read_metrics",
    "read_run_config",
    "recalibrate_batchnorm",
    "resume",
    "stage_plan",
    "stopped_at_once",
]
