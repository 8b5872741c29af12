"""The pluggable training loss: ``loss_fn(LossContext) -> Tensor`` (or ``(Tensor, {name: float})``).

The context carries the stage's clips *and* the full-size clips and the model being trained, so a
distillation loss holding a teacher slots in here without changes to the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import StjfdError


class NonFiniteLossError(StjfdError):
    """The training loss became NaN/Inf; the run folder keeps the last good checkpoint."""


@dataclass
class LossContext:
    """Everything a training loss may need for one micro-batch.

    ``clips`` is what the model saw (downsampled for the stage), ``full_clips`` the full-size batch
    (e.g. for a teacher), ``labels`` may be −1 for unlabeled clips, ``model`` is the unwrapped model.
    """

    outputs: Tensor
    labels: Tensor
    clips: Tensor
    full_clips: Tensor
    model: nn.Module
    stage: str
    epoch: int
    step: int


LossOutput = Union[Tensor, tuple[Tensor, Mapping[str, float]]]

LossFn = Callable[[LossContext], LossOutput]


class ClassificationLoss:
    """Cross-entropy with label smoothing; clips labelled −1 (unlabeled) are ignored."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)

    def __call__(self, ctx: LossContext) -> Tensor:
        return F.cross_entropy(
            ctx.outputs.float(), ctx.labels, label_smoothing=self.label_smoothing, ignore_index=-1
        )
