"""Distributed runs (torchrun), samplers, devices, determinism and mixed precision."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from ..config import check_device
from ..errors import ConfigError
from .config import FinetuneConfig


class ShardedShuffleSampler(Sampler[int]):
    """Shuffled global batches of ``global_batch`` samples, each split evenly across ``world_size`` ranks.

    The permutation depends on ``(seed, epoch)`` only, so rank r's k-th batch is the r-th slice of the
    k-th batch a single process would draw: DDP then sees exactly the single-process global batches.
    Incomplete global batches are dropped. ``skip_batches`` (reset by the caller) resumes mid-epoch.
    """

    def __init__(self, length: int, global_batch: int, *, seed: int = 0, world_size: int = 1, rank: int = 0) -> None:
        if global_batch % world_size:
            raise ConfigError(
                f"batch size {global_batch} is not divisible by the {world_size} processes",
                f"use a multiple of {world_size}",
            )
        self.length = length
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self.skip_batches = 0

    @property
    def batches(self) -> int:
        return self.length // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch, 0xC0FFEE]).permutation(self.length)
        for batch in range(self.skip_batches, self.batches):
            start = batch * self.global_batch + self.rank * self.local_batch
            yield from order[start : start + self.local_batch].tolist()

    def __len__(self) -> int:
        return max(0, self.batches - self.skip_batches) * self.local_batch


class _ShardSampler(Sampler[int]):
    """Evaluation shard: indices ``rank, rank + W, …`` in order (no padding, no duplicates)."""

    def __init__(self, length: int, world_size: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class _Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    created: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _resolve_device(request: str, local_rank: int) -> torch.device:
    request = check_device(request)  # auto resolved; an unknown or absent device is a ConfigError
    if request == "cuda":
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device(request)


def _init_distributed(device_request: str) -> _Dist:
    world = _env_world_size()
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    created = False
    if not dist.is_initialized():
        wants_cuda = device_request.startswith("cuda") or (device_request == "auto" and torch.cuda.is_available())
        backend = "nccl" if wants_cuda else "gloo"
        if wants_cuda:
            torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        dist.init_process_group(backend=backend)
        created = True
    return _Dist(dist.get_world_size(), dist.get_rank(), local_rank, created)


@contextlib.contextmanager
def _deterministic(enabled: bool, device: torch.device) -> Iterator[None]:
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.benchmark = previous_benchmark


def _amp_settings(config: FinetuneConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler)."""
    if not config.amp:
        return None, False
    if device.type == "cpu":
        if config.amp_dtype == "float16":
            raise ConfigError("--amp-dtype float16 is not supported on CPU", "use bfloat16 (the CPU default)")
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                nn.functional.conv3d(torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1))
        except RuntimeError as exc:  # pragma: no cover - depends on the CPU build
            raise ConfigError(f"bf16 autocast is not supported on this CPU: {exc}", "drop --amp") from None
        return torch.bfloat16, False
    if config.amp_dtype == "bfloat16":
        if not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU does not support bfloat16", "use --amp-dtype float16")
        return torch.bfloat16, False
    return torch.float16, True


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _current_dist() -> _Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return _Dist(dist.get_world_size(), rank, int(os.environ.get("LOCAL_RANK", rank)))
    return _Dist()
