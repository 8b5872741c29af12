"""Model surgery and the optimizer: a new classifier head for another number of classes, parameter groups
(no weight decay on biases and norms)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, StjfdError
from ..models import ArchSpec
from .config import FinetuneConfig

# Seed offset for a classifier head that has to be re-created for a new number of classes.
HEAD_SEED_OFFSET = 7919


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def adapt_classifier(
    model: nn.Module, spec: ArchSpec, num_classes: int, *, seed: int = 0
) -> tuple[ArchSpec, str | None]:
    """Give ``model`` a fresh ``num_classes``-way head (its last ``nn.Linear``) when it has another number
    of outputs, in place; returns the architecture spec to record (``num_classes`` set) and a note."""
    from ..models import build_model

    last = _last_linear(model)
    if last is None or last[1].out_features == num_classes:
        return spec, None
    name, linear = last
    hint = "fine-tune a model built for the dataset's classes (e.g. convert with --model-kwargs '{\"num_classes\": N}')"
    if spec.kind == "pickle":
        raise ConfigError(
            f"the model predicts {linear.out_features} classes but the dataset has {num_classes}", hint
        )
    new_spec = ArchSpec(spec.kind, spec.name, {**spec.kwargs, "num_classes": num_classes})
    try:
        skeleton = build_model(new_spec)
    except StjfdError:
        raise ConfigError(
            f"the model predicts {linear.out_features} classes but the dataset has {num_classes}, and "
            f"{spec.name} cannot be built with num_classes={num_classes}",
            hint,
        ) from None
    try:
        twin = skeleton.get_submodule(name)
    except AttributeError:
        twin = None
    if not isinstance(twin, nn.Linear) or twin.out_features != num_classes or twin.in_features != linear.in_features:
        raise ConfigError(
            f"the model predicts {linear.out_features} classes but the dataset has {num_classes}, and "
            f"num_classes={num_classes} does not resize its last layer {name}",
            hint,
        )
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed + HEAD_SEED_OFFSET)
    head = nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None, dtype=linear.weight.dtype)
    torch.set_rng_state(generator_state)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, head.to(linear.weight.device))
    return new_spec, f"replaced the {linear.out_features}-way classifier {name} by a new {num_classes}-way one"


def _param_groups(params: Sequence[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _make_optimizer(config: FinetuneConfig, params: Sequence[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    groups = _param_groups(params, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
