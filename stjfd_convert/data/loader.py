"""Loading: the epoch-seeded sampler, worker setup, and :class:`ClipLoader` (advances epochs itself)."""

from __future__ import annotations

import atexit
import gc
import random
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError, StjfdError


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


# Loaders whose worker processes may be alive. The workers ignore SIGTERM (see _worker_init), so the
# multiprocessing exit hook, which terminates daemonic children and then joins them, would wait forever
# for the workers of a loader that an error left referenced; this hook (registered after that one, so run
# before it) stops them first.
_LIVE_LOADERS: "weakref.WeakSet[ClipLoader]" = weakref.WeakSet()


def _shutdown_workers(loader: DataLoader) -> None:
    iterator = getattr(loader, "_iterator", None)
    loader._iterator = None  # type: ignore[attr-defined]  # the next pass starts fresh workers
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


@atexit.register
def _shutdown_all_workers() -> None:
    for loader in list(_LIVE_LOADERS):
        _shutdown_workers(loader)


def _worker_error(exc: BaseException) -> BaseException:
    """The error a DataLoader worker raised, as it was raised there. PyTorch re-raises a worker's exception
    as ``type(exc)("Caught … in DataLoader worker process N. Original Traceback …")``; for stjfd's own errors
    that would be a flattened traceback on one line, so their last line (``module.Type: message — hint``)
    is turned back into the error."""
    text = exc.message if isinstance(exc, StjfdError) else ""
    if not (isinstance(exc, StjfdError) and text.startswith("Caught ") and "DataLoader worker" in text):
        return exc
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    if not lines:
        return exc
    exc.message, exc.hint = lines[-1][len(prefix):], None
    exc.args = (exc.message,)
    return exc


class _WorkerPass:
    """One pass of a loader with workers: on an error the workers are stopped and a worker's stjfd error
    is raised as itself (see :func:`_worker_error`)."""

    def __init__(self, loader: DataLoader, iterator: Iterator[Any]) -> None:
        self._loader = loader
        self._iterator = iterator

    def __iter__(self) -> "_WorkerPass":
        return self

    def __len__(self) -> int:
        return len(self._iterator)  # type: ignore[arg-type]

    def __next__(self) -> Any:
        try:
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException as exc:
            _shutdown_workers(self._loader)
            raise _worker_error(exc) from None


class ClipLoader(DataLoader):
    """A DataLoader that advances the epoch of its dataset and sampler on every pass.

    The first pass is epoch 0 (or the epoch given to :meth:`set_epoch`, e.g. when resuming), the next
    one epoch + 1, and so on; training augmentation and shuffling differ per epoch yet replay exactly.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._next_epoch = 0
        if self.num_workers > 0:
            _LIVE_LOADERS.add(self)

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
            return _WorkerPass(self, super().__iter__())
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
