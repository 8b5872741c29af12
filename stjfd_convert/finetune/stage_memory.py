"""Memory of a stage on CPU: the bytes autograd saves for backward on its first step, plus parameters,
buffers, gradients and optimizer state (each storage counted once)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..memory import storage_key


class _SavedBytes:
    """saved_tensors_hooks that sum the bytes of every storage autograd keeps, each storage once."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.saved: dict[int, int] = {}

    def pack(self, tensor: Tensor) -> Tensor:
        key = storage_key(tensor)
        if key and key not in self.exclude and key not in self.saved:
            self.saved[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.saved.values())


def _tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    seen: set[int] = set()
    grads = 0
    for p in params:
        if p.grad is not None and storage_key(p.grad) not in seen:
            seen.add(storage_key(p.grad))
            grads += p.grad.untyped_storage().nbytes()
    return {
        "param_bytes": sum(_tensor_bytes(p) for p in params),
        "buffer_bytes": sum(_tensor_bytes(b) for b in model.buffers()),
        "grad_bytes": grads,
        "optimizer_bytes": sum(
            _tensor_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)
        ),
    }
