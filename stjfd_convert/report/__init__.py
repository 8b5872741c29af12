"""``stjfd report``: what a conversion saves, counted from the real modules and measured.

- Parameters and their bytes at fp32/fp16/bf16/int8, per layer and in total (Σ numel of the real
  modules; int8 counts one byte per weight, without quantisation scales).
- MACs per clip from each layer's actual input geometry (recorded with forward hooks) and
  ``functional/cost.py``'s ``form_cost`` for the form the layer runs (``auto`` resolved per input
  shape). Rebuilding a fused weight is a one-off (it is cached while the parameters do not change),
  reported apart and not in the per-clip MACs.
- Inference activation memory: peak of live tensors during a no-grad forward
  (``memory.measure_inference_peak``).
- Training memory per schedule (joint, temporal stage, spatial stage, each with and without
  per-block activation checkpointing), measured with ``memory.measure_training_step``, next to the
  analytic expectation for the stages' activations (1/s², 1/r).
- What fits in a memory budget: the longest clip and the largest batch per schedule, found by a
  linear fit of measurements and verified by measuring the answer and one step above.

Everything here returns dataclasses; terminal rendering lives in ``cli/cmd_report.py``.

The package, by what each part does (imports flow one way: accounting, schedules → fits → core → files):

- ``accounting``: ``parse_bytes``, per-layer rows and totals (``layer_table``), MACs.
- ``schedules``: the training schedules and ``measure_schedules``.
- ``fits``: ``what_fits`` in a memory budget and the ``clip_sweep`` for the plot.
- ``core``: ``memory_report`` (everything above into one ``MemoryReport``) and ``load_report_input``.
- ``files``: ``markdown``, ``write_markdown``, ``write_plot``.
"""

from __future__ import annotations

from ..convert import densify  # re-exported: callers have long imported it from here
from .accounting import (
    DTYPE_BYTES,
    MIB,
    LayerMemory,
    ModelTotals,
    layer_table,
    parse_bytes,
    rebuild_macs,
)
from .core import (
    InferenceComparison,
    MemoryReport,
    ReportInput,
    load_report_input,
    memory_report,
)
from .files import markdown, write_markdown, write_plot
from .fits import FitAnswer, SweepPoint, WhatFits, clip_sweep, what_fits
from .schedules import (
    FIT_SCHEDULES,
    SWEEP_SCHEDULES,
    TRAINING_SCHEDULES,
    Schedule,
    ScheduleMemory,
    measure_schedules,
)

__all__ = [
    "DTYPE_BYTES",
    "FIT_SCHEDULES",
    "MIB",
    "SWEEP_SCHEDULES",
    "TRAINING_SCHEDULES",
    "FitAnswer",
    "InferenceComparison",
    "LayerMemory",
    "MemoryReport",
    "ModelTotals",
    "ReportInput",
    "Schedule",
    "ScheduleMemory",
    "SweepPoint",
    "WhatFits",
    "clip_sweep",
    "densify",
    "layer_table",
    "load_report_input",
    "markdown",
    "measure_schedules",
    "memory_report",
    "parse_bytes",
    "rebuild_macs",
    "what_fits",
    "write_markdown",
    "write_plot",
]
