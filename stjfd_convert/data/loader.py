"""Loading: the epoch-seeded sampler, worker setup, and :class:`ClipLoader` (advances epochs itself)."""

from __future__ import annotations

import gc
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError


class EpochShuffleSampler(Sampler[int]):
    """A random permutation fixed by ``(seed, epoch)``: resuming at epoch e replays epoch e's order."""

    def __init__(self, length: int, seed: int = 0) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 0xC0FFEE])
        return iter(rng.permutation(self.length).tolist())

    def __len__(self) -> int:
        return self.length


def _worker_init(worker_id: int) -> None:
    # Clip randomness is seeded per sample; this only seeds user transforms that use global RNGs,
    # and keeps each worker to one thread so that W workers do not oversubscribe the cores.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    # Ctrl-C and SIGTERM are the main process's to handle (finish the step, save, exit 130 / 143). Both
    # reach every process of the group (the terminal's Ctrl-C; `timeout`, `docker stop`), and a worker
    # they killed would make the main process fail with "DataLoader worker … killed by signal" instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ClipLoader(DataLoader):
    """A DataLoader that advances the epoch of its dataset and sampler on every pass.

    The first pass is epoch 0 (or the epoch given to :meth:`set_epoch`, e.g. when resuming), the next
    one epoch + 1, and so on; training augmentation and shuffling differ per epoch yet replay exactly.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch``."""
        self._next_epoch = int(epoch)

    @property
    def epoch(self) -> int:
        """The epoch of the pass in progress (or of the last one)."""
        return self._next_epoch - 1

    def __iter__(self) -> Iterator[Any]:
        epoch = self._next_epoch
        self._next_epoch += 1
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        sampler = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if self.num_workers > 0:
            # PyAV ≤ 13 leaves every closed container to the cyclic GC (streams and container refer to each
            # other). A worker forked before that GC ran would free the container itself and hang on the
            # decoder threads it did not inherit; collecting here frees them where those threads exist.
            gc.collect()
        return super().__iter__()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int = 0,
    seed: int = 0,
    device: str | torch.device | None = None,
    sampler: Sampler | None = None,
    drop_last: bool | None = None,
    prefetch_factor: int | None = None,
) -> ClipLoader:
    """A :class:`ClipLoader` over ``dataset``: seeded shuffling (:class:`EpochShuffleSampler`) or the given
    ``sampler`` (e.g. ``DistributedSampler``, which then does the shuffling and gets ``set_epoch`` calls),
    ``workers`` worker processes kept alive between epochs, pinned memory when ``device`` is CUDA, and
    ``drop_last`` defaulting to ``shuffle``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer ≥ 1, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"workers must be an integer ≥ 0, got {workers!r}")
    if sampler is None and shuffle:
        sampler = EpochShuffleSampler(len(dataset), seed)
    try:
        device_type = torch.device(device).type if device is not None else "cpu"
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}: {exc}", hint="e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    pin = device_type == "cuda" and torch.cuda.is_available()
    generator = torch.Generator()
    generator.manual_seed(seed)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra.update(persistent_workers=True, worker_init_fn=_worker_init)
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return ClipLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin,
        drop_last=shuffle if drop_last is None else drop_last,
        generator=generator,
        **extra,
    )
