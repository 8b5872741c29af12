"""Measured memory of training and inference (DESIGN.md §3: measure memory, don't estimate it).

Training (``measure_training_step``): one instrumented step records every tensor autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``; each storage counted once, keyed by its
``untyped_storage().data_ptr()``) and splits them into

- *weights*: parameters, buffers and tensors computed only from them (the fused layers' rebuilt
  weights, the expanded atom kernels of the factorized forms) — these do not scale with the clip;
- *activations*: everything else — these scale with batch × frames × pixels.

Parameters, their gradients and the optimizer state are read from the real tensors after the
step. On CUDA ``torch.cuda.max_memory_allocated`` of a plain step is reported as well. On the
``meta`` device the same autograd graph runs with tensors that have sizes but no data: the byte
counts are those of CPU (checked by the tests) at no arithmetic cost, which lets ``search_max_size``
probe sizes far above the machine's RAM.

Inference (``measure_inference_peak``): every storage an op creates is tracked (a
``TorchDispatchMode``) until its last tensor is freed; the peak of the live bytes is the activation
memory at inference (parameters excluded, the input clip included).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .errors import ConfigError, ModelError, first_line
from .inputs import (
    InputShape,
    format_input_shape,
    fresh,
    input_shape_to_json,
    input_tensors,
    make_model_input,
    meta_input,
    normalize_input_shape,
)
from .parity import flatten_outputs
from .stages import enable_activation_checkpointing, enable_stage_safe_pooling, set_trainable

OPTIMIZERS = ("sgd", "adamw")
INPUT_SEED = 0


class MeasurementError(ModelError):
    """A measurement could not run: ``reason`` is ``"too_small"`` (the model rejects the clip),
    ``"out_of_memory"`` or ``"failed"``."""

    def __init__(self, message: str, hint: str | None = None, *, reason: str = "failed") -> None:
        super().__init__(message, hint)
        self.reason = reason


def storage_key(tensor: Tensor) -> int:
    """Identity of the memory behind ``tensor`` (shared by all its views).

    ``data_ptr`` of the untyped storage on real devices; on ``meta`` (no data) the storage object.
    """
    storage = tensor.untyped_storage()
    return storage._cdata if tensor.device.type == "meta" else storage.data_ptr()


def _storage_bytes(tensor: Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def _tensor_bytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class _ParameterDerived(TorchFunctionMode):
    """Marks every tensor computed only from parameters/buffers (e.g. a rebuilt conv weight).

    Derived tensors are kept referenced until the mode ends so that their memory cannot be reused
    by an activation that would then be mistaken for a weight.
    """

    def __init__(self, roots: Iterable[Tensor]) -> None:
        super().__init__()
        self.keys = {storage_key(t) for t in roots}
        self.keys.discard(0)
        self._keep: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if inputs and all(storage_key(t) in self.keys for t in inputs):
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    self.keys.add(storage_key(t))
                    self._keep.append(t)
        return out

    def __exit__(self, *exc: Any) -> Any:
        self._keep.clear()
        return super().__exit__(*exc)


@dataclass
class TrainingMemory:
    """One training step at ``input_shape``: memory by kind (bytes) and step time.

    ``saved_*``: tensors autograd keeps for backward; ``saved_weight_alias_bytes`` is the part of
    ``saved_weight_bytes`` that *is* a parameter/buffer (no extra memory: already in
    ``param_bytes``/``buffer_bytes``). ``total_bytes`` counts every storage once.
    """

    input_shape: InputShape
    stage: str
    optimizer: str
    checkpointing: bool
    checkpointed_blocks: int
    trainable_params: int
    frozen_params: int
    saved_activation_bytes: int
    saved_weight_bytes: int
    saved_weight_alias_bytes: int
    param_bytes: int
    buffer_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    total_bytes: int
    step_seconds_median: float | None
    device: str
    peak_cuda_bytes: int | None = None
    step_seconds: list[float] = field(default_factory=list)
    adapted_pools: list[str] = field(default_factory=list)  # fixed pools run over the whole (downsampled) input
    peak_live_bytes: int | None = None  # live bytes at the peak of a whole step, transients included

    @property
    def saved_bytes(self) -> int:
        """Everything saved for backward (activations + weights), each storage once."""
        return self.saved_activation_bytes + self.saved_weight_bytes

    @property
    def fixed_bytes(self) -> int:
        """What does not scale with the clip: total minus saved activations."""
        return self.total_bytes - self.saved_activation_bytes

    @property
    def budget_bytes(self) -> int:
        """The figure compared with a memory budget: the CUDA peak when measured, else the live peak of a
        whole step (transients included), else ``total_bytes``."""
        if self.peak_cuda_bytes is not None:
            return self.peak_cuda_bytes
        return self.peak_live_bytes if self.peak_live_bytes is not None else self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = input_shape_to_json(self.input_shape)
        data["saved_bytes"] = self.saved_bytes
        data["fixed_bytes"] = self.fixed_bytes
        return data


def default_loss(output: Any, *, seed: int = INPUT_SEED) -> Tensor:
    """Cross-entropy against seeded random labels for a [N, K] output, else the sum of squares."""
    tensors = [t for _, t in flatten_outputs(output) if t.is_floating_point()]
    if not tensors:
        raise MeasurementError("the model returned no floating-point tensor to train on", "pass loss_fn=")
    if len(tensors) == 1 and tensors[0].dim() == 2:
        logits = tensors[0]
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=generator).to(logits.device)
        return nn.functional.cross_entropy(logits, labels)
    return sum(t.float().pow(2).sum() for t in tensors)  # type: ignore[return-value]


def _make_optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # Small learning rates: the step must run, not learn; foreach=False keeps the per-parameter
    # update path that also runs on the meta device.
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9, foreach=False)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, foreach=False)
    raise ConfigError(f"unknown optimizer {name!r}", f"use one of {', '.join(OPTIMIZERS)}")


def _classify_error(exc: BaseException, shape: InputShape, stage: str = "joint") -> MeasurementError:
    text = first_line(exc)
    shape_text = format_input_shape(shape)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return MeasurementError(f"{shape_text}: out of memory", "use a smaller clip or batch", reason="out_of_memory")
    if stage == "temporal":
        hint = "the temporal stage's frames are downsampled by s: use a smaller -s (1 keeps full frames) or --schedule joint"
    elif stage == "spatial":
        hint = "the spatial stage's clips are downsampled by r: use a smaller -r (1 keeps every frame) or --schedule joint"
    else:
        hint = "use a larger --input-shape (the model may need a minimum clip length or frame size)"
    where = f"the {stage} stage's " if stage != "joint" else "a "
    return MeasurementError(
        f"the model cannot train on {where}{shape_text} clip: {text[:200]}", hint, reason="too_small"
    )


def _resolve_device(device: str | torch.device) -> torch.device:
    from .config import check_device

    if str(device) == "meta":  # sizes without arithmetic: the report's searches and sweeps
        return torch.device("meta")
    return torch.device(check_device(device))


def _clip_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the clip to measure ``model`` on: uint8 where a :class:`~stjfd_convert.layouts.ClipLayoutHook`
    hands the model raw frames (the clip then holds one byte per value, as the model's real input does), else
    the model's floating dtype."""
    from .layouts import hooked_input_dtype

    if hooked_input_dtype(model) == "uint8":
        return torch.uint8
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _make_clip(shape: InputShape, device: torch.device, dtype: torch.dtype, container: str = "list") -> Any:
    """The model input (one clip, or one per pathway) on ``device``: empty on meta, elsewhere seeded N(0,1)
    (float) or 0..255 (uint8)."""
    if device.type == "meta":
        return meta_input(shape, dtype, container)
    return make_model_input(shape, dtype, seed=INPUT_SEED, container=container, device=device)


def _input_bytes(clip: Any) -> int:
    return sum(_tensor_bytes(t) for t in input_tensors(clip))


def measure_training_step(
    model: nn.Module,
    input_shape: InputShape | Sequence[int],
    *,
    stage: str = "joint",
    container: str = "list",
    optimizer: str = "sgd",
    checkpointing: bool = False,
    device: str | torch.device = "cpu",
    steps: int = 3,
    loss_fn: Callable[[Any], Tensor] | None = None,
) -> TrainingMemory:
    """Measure one training step of a copy of ``model`` on a clip of ``input_shape`` (as fed: use
    ``stages.stage_clip_shape`` for a stage's downsampled clip).

    The copy is put in train mode, ``stage`` decides which parameters train (only those go to the
    optimizer), ``checkpointing`` wraps each residual block. One instrumented step measures the
    saved tensors, gradients and optimizer state; then ``steps`` plain steps are timed (the median
    is reported; on CUDA the first of them also gives ``max_memory_allocated``). ``model`` is
    left untouched.

    One function because every figure comes from the same instrumented step: the saved-tensor hooks,
    the parameter, gradient and optimizer byte counts and the timing must see exactly one forward and
    backward, set up and torn down together.
    """
    device = _resolve_device(device)
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
    shape = normalize_input_shape(input_shape)
    work = copy.deepcopy(model).to(device).train()
    trainable = set_trainable(work, stage)
    adapted = enable_stage_safe_pooling(work) if stage != "joint" else set()
    blocks = enable_activation_checkpointing(work) if checkpointing else 0
    opt = _make_optimizer(optimizer, trainable)
    clip = _make_clip(shape, device, _clip_dtype(work), container)
    loss_fn = loss_fn or default_loss
    params = list(work.parameters())
    buffers = [b for b in work.buffers()]
    weight_roots = params + buffers
    alias_keys = {storage_key(t) for t in weight_roots}

    saved: dict[int, tuple[int, bool]] = {}  # storage key → (bytes, is a weight)
    derived = _ParameterDerived(weight_roots)

    def pack(tensor: Tensor) -> Tensor:
        key = storage_key(tensor)
        if key not in saved:
            saved[key] = (_storage_bytes(tensor), key in derived.keys)
        return tensor

    def one_step(instrumented: bool) -> None:
        opt.zero_grad(set_to_none=True)
        if instrumented:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), derived:
                loss = loss_fn(work(fresh(clip)))
        else:
            loss = loss_fn(work(fresh(clip)))
        loss.backward()
        opt.step()

    try:
        one_step(instrumented=True)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise _classify_error(exc, shape, stage) from None

    activation = sum(n for n, weight in saved.values() if not weight)
    weight = sum(n for n, is_weight in saved.values() if is_weight)
    alias = sum(n for key, (n, is_weight) in saved.items() if is_weight and key in alias_keys)
    param_bytes = sum(_tensor_bytes(p) for p in params)
    buffer_bytes = sum(_tensor_bytes(b) for b in buffers)
    grad_bytes = sum(_tensor_bytes(p.grad) for p in params if p.grad is not None)
    optimizer_bytes = sum(
        _tensor_bytes(value) for state in opt.state.values() for value in state.values() if isinstance(value, Tensor)
    )
    trainable_count = sum(p.numel() for p in trainable)

    # The peak of live bytes over a whole steady-state step (forward, backward, optimizer), transients
    # included: what a device must hold at once. Parameters, buffers, the clip and the optimizer state
    # exist before the step (the baseline); everything ops create during it is counted until freed.
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, Tensor)]
    existing = [*params, *buffers, *input_tensors(clip), *state]
    tracker = _LiveTensors(
        {storage_key(t) for t in existing}, param_bytes + buffer_bytes + _input_bytes(clip) + optimizer_bytes
    )
    try:
        with tracker:
            one_step(instrumented=False)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise _classify_error(exc, shape, stage) from None
    peak_live = tracker.peak

    times: list[float] = []
    peak_cuda = None
    if device.type != "meta":
        for index in range(max(0, steps)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                if index == 0:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
            tick = time.perf_counter()
            try:
                one_step(instrumented=False)
            except (RuntimeError, ValueError) as exc:
                raise _classify_error(exc, shape, stage) from None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                if index == 0:
                    peak_cuda = int(torch.cuda.max_memory_allocated(device))
            times.append(time.perf_counter() - tick)

    return TrainingMemory(
        input_shape=shape,
        stage=stage,
        optimizer=optimizer,
        checkpointing=checkpointing,
        checkpointed_blocks=blocks,
        trainable_params=trainable_count,
        frozen_params=sum(p.numel() for p in params) - trainable_count,
        saved_activation_bytes=activation,
        saved_weight_bytes=weight,
        saved_weight_alias_bytes=alias,
        param_bytes=param_bytes,
        buffer_bytes=buffer_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes,
        total_bytes=activation + (weight - alias) + param_bytes + buffer_bytes + grad_bytes + optimizer_bytes,
        step_seconds_median=statistics.median(times) if times else None,
        device=str(device),
        peak_cuda_bytes=peak_cuda,
        step_seconds=times,
        adapted_pools=sorted(adapted),
        peak_live_bytes=peak_live,
    )


# --------------------------------------------------------------------------------------------
# Inference: peak of live tensors
# --------------------------------------------------------------------------------------------


class _LiveTensors(TorchDispatchMode):
    """Running sum of the bytes of storages created by ops and not yet freed; keeps the peak."""

    def __init__(self, excluded: set[int], baseline: int) -> None:
        super().__init__()
        self.excluded = excluded
        self.live: dict[int, list[int]] = {}  # key → [bytes, live tensor count]
        self.current = baseline
        self.peak = baseline

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor):
                continue
            key = storage_key(tensor)
            if key in self.excluded or key == 0:
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [_storage_bytes(tensor), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


@dataclass
class InferenceMemory:
    """Peak bytes of live tensors during one no-grad forward (parameters excluded, input included)."""

    input_shape: InputShape
    peak_bytes: int
    input_bytes: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_shape": input_shape_to_json(self.input_shape)}


def measure_inference_peak(
    model: nn.Module, input_shape: InputShape | Sequence[int], *, device: str | torch.device = "cpu",
    container: str = "list",
) -> InferenceMemory:
    """Peak live activation bytes of an eval-mode, no-grad forward of a copy of ``model``.

    Parameters, buffers and weights that layers cache from them (filled by a warm-up forward) are
    excluded; the input clip is included.
    """
    device = _resolve_device(device)
    shape = normalize_input_shape(input_shape)
    work = copy.deepcopy(model).to(device).eval()
    clip = _make_clip(shape, device, _clip_dtype(work), container)
    excluded = {storage_key(t) for t in [*work.parameters(), *work.buffers(), *input_tensors(clip)]}
    tracker = _LiveTensors(excluded, baseline=_input_bytes(clip))
    try:
        with torch.no_grad():
            # Warm-up: layers cache the weights they derive from their parameters (e.g. the fused W);
            # those are weights, not activations, and exist before the measured forward starts.
            work(fresh(clip))
            with tracker:
                output = work(fresh(clip))
                del output
    except (RuntimeError, ValueError, IndexError) as exc:
        raise _classify_error(exc, shape) from None
    return InferenceMemory(shape, tracker.peak, _input_bytes(clip), str(device))


# --------------------------------------------------------------------------------------------
# Largest size within a budget: linear fit, then verified by measurement
# --------------------------------------------------------------------------------------------


@dataclass
class SizeSearch:
    """The largest ``size`` (frames or batch) whose measured bytes stay within ``budget_bytes``.

    ``samples`` were measured to fit bytes ≈ intercept + slope·size; ``predicted`` is that fit's
    answer; ``answer`` was then verified by measuring it (``answer_bytes`` ≤ budget) and one step
    above (``above_bytes`` > budget, None when the measurement itself failed, e.g. out of memory).
    ``answer`` 0: even the smallest runnable size (``minimum``) is over budget.
    """

    budget_bytes: int
    minimum: int
    samples: list[tuple[int, int]]
    intercept: float
    slope: float
    predicted: int | None
    answer: int
    answer_bytes: int | None
    above: int
    above_bytes: int | None
    measured: dict[int, int | None]
    capped: bool = False

    @property
    def prediction_error(self) -> int | None:
        """answer − predicted (0: the linear model was exact)."""
        return None if self.predicted is None else self.answer - self.predicted

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = [list(s) for s in self.samples]
        data["measured"] = {str(k): v for k, v in sorted(self.measured.items())}
        data["prediction_error"] = self.prediction_error
        return data


def fit_line(points: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares intercept and slope of bytes against size."""
    if len(points) == 1:
        return float(points[0][1]), 0.0
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def search_max_size(
    measure: Callable[[int], int],
    budget_bytes: int,
    *,
    smallest: int = 1,
    probe_limit: int = 64,
    samples: Sequence[int] | None = None,
    maximum: int = 1 << 16,
) -> SizeSearch:
    """Largest size with ``measure(size) ≤ budget_bytes`` (``measure`` is assumed to grow with size).

    1. the smallest runnable size: ``smallest``, ``smallest+1``, … (a ``MeasurementError`` with
       reason ``too_small`` moves on; up to ``probe_limit`` tries);
    2. ``samples`` (default: minimum, 2×, 4×) are measured and fitted by a line;
    3. the line's answer is measured together with one step above; when either disagrees the
       search gallops/bisects on measurements until a fitting size sits next to a failing one.
    Out-of-memory failures count as over budget.

    One function because the predicted start, the gallop and the bisection share one cache of
    measurements, whose samples and verification the returned SizeSearch reports.
    """
    measured: dict[int, int | None] = {}  # None: out of memory

    def over(size: int) -> bool:
        value = measured_at(size)
        return value is None or value > budget_bytes

    def measured_at(size: int) -> int | None:
        if size not in measured:
            try:
                measured[size] = int(measure(size))
            except MeasurementError as exc:
                if exc.reason != "out_of_memory":
                    raise
                measured[size] = None
        return measured[size]

    minimum = None
    last_error: MeasurementError | None = None
    for size in range(smallest, smallest + probe_limit):
        try:
            measured_at(size)
        except MeasurementError as exc:
            if exc.reason != "too_small":
                raise
            last_error = exc
            continue
        minimum = size
        break
    if minimum is None:
        assert last_error is not None
        raise MeasurementError(
            f"no size from {smallest} to {smallest + probe_limit - 1} runs: {last_error.message}", last_error.hint,
            reason="too_small",
        )

    if over(minimum):
        return SizeSearch(budget_bytes, minimum, [], 0.0, 0.0, None, 0, None, minimum, measured[minimum], measured)

    sizes = sorted({s for s in (samples or (minimum, 2 * minimum, 4 * minimum)) if s >= minimum} | {minimum})
    if len(sizes) < 2:
        sizes.append(minimum + 1)
    points = [(s, measured_at(s)) for s in sizes]
    fitted = [(s, b) for s, b in points if b is not None]
    intercept, slope = fit_line(fitted)
    if slope > 0:
        predicted = int(math.floor((budget_bytes - intercept) / slope))
    else:
        predicted = maximum
    predicted = max(minimum, min(maximum, predicted))

    # Establish lo (fits) < hi (over budget) around the prediction, then bisect.
    if not over(predicted):
        lo, step = predicted, 1
        hi = predicted + 1
        while hi <= maximum and not over(hi):
            lo, step = hi, step * 2
            hi = min(maximum + 1, lo + step)
        capped = hi > maximum
    else:
        hi, step = predicted, 1
        lo = max(minimum, predicted - 1)
        while lo > minimum and over(lo):
            hi, step = lo, step * 2
            lo = max(minimum, hi - step)
        capped = False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if over(mid):
            hi = mid
        else:
            lo = mid
    if not capped:
        measured_at(lo + 1)
    return SizeSearch(
        budget_bytes=budget_bytes,
        minimum=minimum,
        samples=[(s, b) for s, b in fitted],
        intercept=intercept,
        slope=slope,
        predicted=predicted,
        answer=lo,
        answer_bytes=measured[lo],
        above=lo + 1,
        above_bytes=measured.get(lo + 1),
        measured=measured,
        capped=capped,
    )
