"""Distillation: recover a converted model's accuracy from its original, without labels.

:class:`DistillationLoss` is a ``loss_fn`` for :func:`~stjfd_convert.finetune.finetune`: the frozen teacher
(usually the original dense model) sees the same clip the student sees in each stage — downsampled in the
temporal and spatial stages, so the alternating schedule keeps its memory savings — and every tensor the two
models return is matched (tensor / tuple / list / dict, by position and key). Per output the loss is:

- ``kl``: KL divergence of temperature-softened softmaxes (× T²), for a classifier's logits [B, K];
- ``bce``: binary cross-entropy against the teacher's probabilities, for outputs already in [0, 1]
  (a per-frame event model that ends in a sigmoid);
- ``mse``: mean squared error, for anything else (features, regression, logits of other shapes);
- ``auto`` (default) picks per output: ``bce`` when the teacher's values all lie in [0, 1], ``kl`` for a 2-D
  [B, K > 1] output, else ``mse`` — decided on the first batch and kept for the run (``kinds``), so the
  objective does not change as training moves the outputs.

``label_weight`` > 0 mixes in cross-entropy on the first output for clips that have labels (label −1 =
unlabeled, ignored). The teacher never trains: its parameters are frozen and it stays in eval mode (its
BatchNorm statistics do not move) whatever ``train()`` is called on the loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..inputs import PathwaySplit, attach_pathway_split, fresh
from ..parity import flatten_outputs
from .losses import LossContext

DISTILL_LOSSES = ("auto", "mse", "kl", "bce")
_PROBABILITY_EPS = 1e-6  # BCE on probabilities: keep log() finite at exactly 0 or 1


def check_distill_options(kind: str, label_weight: float, temperature: float = 2.0) -> None:
    """``--distill-loss``, ``--distill-weight`` and the temperature, checked before any model is loaded."""
    if kind not in DISTILL_LOSSES:
        raise ConfigError(f"unknown --distill-loss {kind!r}", f"use one of {', '.join(DISTILL_LOSSES)}")
    if not temperature > 0:
        raise ConfigError(f"the distillation temperature must be > 0, got {temperature}", "e.g. 2")
    if not 0.0 <= label_weight <= 1.0:
        raise ConfigError(f"--distill-weight must be in [0, 1], got {label_weight}", "e.g. 0.5, or 0 without labels")


class DistillationLoss(nn.Module):
    """``loss(ctx) -> (loss, {"distill": …, "label": …})`` against a frozen ``teacher`` (see the module doc)."""

    def __init__(
        self,
        teacher: nn.Module,
        kind: str = "auto",
        *,
        temperature: float = 2.0,
        label_weight: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_distill_options(kind, label_weight, temperature)
        self.teacher = teacher
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.teacher.eval()
        self.kind, self.temperature = kind, float(temperature)
        self.kinds: dict[str, str] = {}  # per output name, decided on the first batch and kept (one objective)
        self.label_weight, self.label_smoothing = float(label_weight), float(label_smoothing)

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        self.teacher.eval()  # the teacher never trains, not even its BatchNorm statistics
        return self

    def kind_for(self, teacher_output: Tensor) -> str:
        """The loss one output gets: ``kind``, or under ``auto`` by what the teacher's output looks like."""
        if self.kind != "auto":
            return self.kind
        if teacher_output.is_floating_point() and teacher_output.numel() and bool(
            (teacher_output.min() >= 0) & (teacher_output.max() <= 1)
        ):
            return "bce"
        if teacher_output.dim() == 2 and teacher_output.shape[1] > 1:
            return "kl"
        return "mse"

    def _one(self, name: str, student: Tensor, teacher: Tensor) -> Tensor:
        student, teacher = student.float(), teacher.float()
        kind = self.kinds.setdefault(name, self.kind_for(teacher))
        if kind == "kl":
            t = self.temperature
            flat_s, flat_t = student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)
            return F.kl_div(
                F.log_softmax(flat_s / t, dim=1), F.softmax(flat_t / t, dim=1), reduction="batchmean"
            ) * (t * t)
        if kind == "bce":
            return F.binary_cross_entropy(
                student.clamp(_PROBABILITY_EPS, 1 - _PROBABILITY_EPS), teacher.clamp(0.0, 1.0)
            )
        return F.mse_loss(student, teacher)

    def _sync_pathways(self, model: nn.Module) -> None:
        """A multi-pathway student is fed through a PathwaySplit hook: the teacher gets the same one."""
        for hook in model._forward_pre_hooks.values():
            if isinstance(hook, PathwaySplit):
                attach_pathway_split(self.teacher, hook.strides, hook.container)

    def forward(self, ctx: LossContext) -> tuple[Tensor, dict[str, float]]:
        self._sync_pathways(ctx.model)
        with torch.no_grad(), torch.autocast(ctx.clips.device.type, enabled=False):
            teacher_outputs = flatten_outputs(self.teacher(fresh(ctx.clips)))
        student_outputs = flatten_outputs(ctx.outputs)
        names = ([n for n, _ in student_outputs], [n for n, _ in teacher_outputs])
        if names[0] != names[1] or any(s.shape != t.shape for (_, s), (_, t) in zip(student_outputs, teacher_outputs)):
            raise ConfigError(
                f"the student's outputs {_describe(student_outputs)} do not match the teacher's "
                f"{_describe(teacher_outputs)}",
                "distil from the model this one was converted from (--distill ORIGINAL with its --model)",
            )
        with torch.autocast(ctx.clips.device.type, enabled=False):
            distill = torch.stack(
                [self._one(name, s, t) for (name, s), (_, t) in zip(student_outputs, teacher_outputs)]
            ).mean()
            extras: dict[str, float] = {"distill": float(distill.detach())}
            loss = distill
            labelled = ctx.labels >= 0
            if self.label_weight > 0 and bool(labelled.any()):
                logits = student_outputs[0][1].float()
                label = F.cross_entropy(logits, ctx.labels, ignore_index=-1, label_smoothing=self.label_smoothing)
                loss = (1 - self.label_weight) * distill + self.label_weight * label
                extras["label"] = float(label.detach())
        return loss, extras


def _describe(outputs: list[tuple[str, Any]]) -> str:
    return "(" + ", ".join(f"{name} {tuple(t.shape)}" for name, t in outputs[:4]) + (", …)" if len(outputs) > 4 else ")")
