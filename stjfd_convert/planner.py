"""Execution planning: which form each DecomposedConv3d runs for a given input, device and dtype.

``plan_model`` traces the input shape every decomposed layer sees, then either asks the cost model
(``functional/cost.py``: MACs and bytes per form) or measures every form on that exact input and
keeps the fastest (``plan_model(timer=...)`` replaces the wall-clock timing, e.g. with fixed times in
tests). ``apply_plan`` stores the choices in the layers (``mode="auto"`` looks them up); ``save_plan``
writes them into a converted folder's manifest so ``load_converted`` restores them.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .atomic import atomic_file
from .errors import ConfigError
from .functional.conv import ConvGeometry
from .functional.cost import FORMS, DeviceCosts, cheapest_form, cost_features, form_cost, predict_seconds
from .inputs import InputShape, input_shape_to_json, make_model_input, meta_input, normalize_input_shape
from .layers import DecomposedConv3d
from .parity import run_model
from .saved_model import MANIFEST_FILE, read_manifest

#: A non-fused form must be at least this much faster in measurement to replace fused (noise guard).
MEASURE_MARGIN = 0.97

#: Times every form of one layer: ``timer(layer, forms, x, repeats) -> {form: seconds}``. ``layer`` is
#: a private eval-mode copy on the plan's device/dtype; ``x`` a random input of its traced shape.
FormTimer = Callable[[DecomposedConv3d, Sequence[str], Tensor, int], dict[str, float]]


@dataclass
class LayerChoice:
    """The form chosen for one layer, with the predicted (and measured) seconds of every form."""

    name: str
    input_shape: tuple[int, ...]
    form: str
    predicted: dict[str, float]
    measured: dict[str, float] | None = None
    macs: dict[str, int] = field(default_factory=dict)
    geometry: dict[str, Any] = field(default_factory=dict)
    atoms: tuple[int, int] = (0, 0)


@dataclass
class ExecutionPlan:
    input_shape: InputShape  # the model input: one clip's shape, or one per pathway
    device: str
    dtype: str
    measured: bool
    layers: list[LayerChoice]

    @property
    def modes(self) -> dict[str, str]:
        return {layer.name: layer.form for layer in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Plan "devices" that are runtimes outside PyTorch (``export.plan_onnxruntime``): their plans pick the
#: forms of an exported graph, and their keys never match a PyTorch tensor's, so eager ``auto`` ignores them.
RUNTIME_DEVICES = ("onnxruntime",)


def layer_plan_key(shape: Sequence[int], device: str, dtype: torch.dtype | str) -> str:
    """Same key as ``layers.plan_key`` for an input of ``shape`` on ``device``/``dtype``
    (``device`` may also be one of :data:`RUNTIME_DEVICES`)."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    kind = device if device in RUNTIME_DEVICES else torch.device(device).type
    return f"{kind}/{name}/{'x'.join(str(s) for s in shape)}"


def trace_layer_inputs(
    model: nn.Module, input_shape: InputShape | Sequence[int], dtype: torch.dtype = torch.float32,
    container: str = "list",
) -> dict[str, tuple[int, ...]]:
    """Input shape [B, C, T, H, W] seen by every DecomposedConv3d for a model input of ``input_shape``
    (one clip, or one per pathway fed as a ``container``).

    Runs the model on the meta device (no compute) and falls back to a real CPU forward for models
    that meta tensors cannot run.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:  # must return None: a value would replace args
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    def run(target: nn.Module, x: Tensor) -> None:
        handles = [
            module.register_forward_pre_hook(recorder(name))
            for name, module in target.named_modules()
            if isinstance(module, DecomposedConv3d)
        ]
        try:
            run_model(target, x)
        finally:
            for handle in handles:
                handle.remove()

    try:
        meta_model = copy.deepcopy(model).to("meta")
        run(meta_model, meta_input(input_shape, dtype, container))
    except Exception:  # noqa: BLE001 - any meta failure means: trace for real
        shapes.clear()
        run(model, make_model_input(normalize_input_shape(input_shape), dtype, container=container))
    return shapes


def _time_forms(layer: DecomposedConv3d, forms: Sequence[str], x: Tensor, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of every form, interleaved round-robin after a warm-up.

    The minimum (not the median) is what a shared, noisy machine can measure reliably: interference
    only ever adds time. Interleaving exposes every form to the same conditions.
    """
    previous = layer.mode
    best = {form: float("inf") for form in forms}
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    try:
        with torch.no_grad():
            for form in forms:
                layer.mode = form
                layer(x)  # warm-up; also fills the derived-weight cache, as in steady-state inference
            for _ in range(repeats):
                for form in forms:
                    layer.mode = form
                    sync()
                    start = time.perf_counter()
                    layer(x)
                    sync()
                    best[form] = min(best[form], time.perf_counter() - start)
    finally:
        layer.mode = previous
    return best


def choose_measured_form(measured: dict[str, float]) -> str:
    """The form with the lowest measured time, unless it beats fused by less than :data:`MEASURE_MARGIN`."""
    best = min(measured, key=measured.__getitem__)
    return best if measured[best] <= MEASURE_MARGIN * measured["fused"] else "fused"


def plan_model(
    model: nn.Module,
    input_shape: InputShape | Sequence[int],
    *,
    container: str = "list",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    input_dtype: torch.dtype | None = None,
    measure: bool = False,
    repeats: int = 5,
    forms: Sequence[str] = FORMS,
    progress: Callable[[int, int, str], None] | None = None,
    timer: FormTimer = _time_forms,
) -> ExecutionPlan:
    """Choose a form per DecomposedConv3d for a model input of ``input_shape``.

    ``measure=False``: the cost model decides. ``measure=True``: ``timer`` times each form on a
    random input of the layer's traced shape (the default: fastest of ``repeats`` interleaved runs
    after a warm-up, on the wall clock) and the fastest is chosen (:func:`choose_measured_form`: a
    non-fused form must beat fused by ``MEASURE_MARGIN``). ``timer`` is never called without ``measure``.
    """
    unknown = [f for f in forms if f not in FORMS]
    if unknown:
        raise ConfigError(f"unknown execution forms {unknown}", f"use {', '.join(FORMS)}")
    if "fused" not in forms:
        forms = ("fused", *forms)
    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available", "use --device cpu")
    input_shape = normalize_input_shape(input_shape)
    shapes = trace_layer_inputs(model, input_shape, input_dtype or dtype, container)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DecomposedConv3d)}
    choices = []
    for index, (name, shape) in enumerate(shapes.items(), start=1):
        layer = layers[name]
        batch, _, t, h, w = shape
        args = (layer.geometry, layer.num_temporal_atoms, layer.num_spatial_atoms, batch, t, h, w)
        predicted = {form: predict_seconds(form, *args, device_type) for form in forms}
        macs = {form: form_cost(form, *args).macs for form in forms}
        measured = None
        if measure:
            probe = copy.deepcopy(layer).to(device=device, dtype=dtype).eval()
            x = torch.randn(shape, device=device, dtype=dtype)
            measured = dict(timer(probe, forms, x, repeats))
            form = choose_measured_form(measured)
        else:
            form = cheapest_form(*args, device_type)
            if form not in forms:
                form = "fused"
        choices.append(
            LayerChoice(
                name,
                tuple(shape),
                form,
                predicted,
                measured,
                macs,
                layer.geometry.to_dict(),
                (layer.num_temporal_atoms, layer.num_spatial_atoms),
            )
        )
        if progress is not None:
            progress(index, len(shapes), name)
    return ExecutionPlan(input_shape, device_type, str(dtype).removeprefix("torch."), measure, choices)


def apply_plan(model: nn.Module, plan: ExecutionPlan, *, mode: str = "auto") -> nn.Module:
    """Store ``plan`` in the layers (in place). ``mode="auto"`` makes them follow it for matching
    inputs; ``mode="fixed"`` sets each layer's mode to its chosen form (for export/tracing)."""
    for choice in plan.layers:
        layer = model.get_submodule(choice.name)
        if not isinstance(layer, DecomposedConv3d):
            raise ConfigError(f"plan layer {choice.name!r} is not a DecomposedConv3d in this model")
        layer.plan[layer_plan_key(choice.input_shape, plan.device, plan.dtype)] = choice.form
        layer.mode = "auto" if mode == "auto" else choice.form
    return model


def save_plan(directory: str | Path, plan: ExecutionPlan) -> Path:
    """Merge ``plan`` into a converted folder's manifest (atomically); layers switch to ``auto``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for choice in plan.layers:
        entry = manifest["layers"].get(choice.name)
        if entry is None:
            raise ConfigError(f"plan layer {choice.name!r} is not in {directory}'s manifest")
        entry.setdefault("plan", {})[layer_plan_key(choice.input_shape, plan.device, plan.dtype)] = choice.form
        entry["mode"] = "auto"
    plans = [p for p in manifest.get("plans", []) if p.get("input_shape") != input_shape_to_json(plan.input_shape)
             or p.get("device") != plan.device or p.get("dtype") != plan.dtype]
    summary = {
        "input_shape": input_shape_to_json(plan.input_shape),
        "device": plan.device,
        "dtype": plan.dtype,
        "measured": plan.measured,
        "forms": plan.modes,
    }
    manifest["plans"] = [*plans, summary]
    path = directory / MANIFEST_FILE
    with atomic_file(path, "internal") as staging:  # stjfd's own manifest, updated in place
        staging.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def fit_device_costs(plan: ExecutionPlan, margin: float = 0.7) -> DeviceCosts:
    """Least-squares fit of the cost model's throughputs to a measured plan's per-layer timings.

    time ≈ dense_macs/R_dense + depthwise_macs/R_dw + bytes/BW + convs·overhead, non-negative
    coefficients (non-negative least squares by active-set elimination).
    """
    import numpy as np

    rows, times = [], []
    for choice in plan.layers:
        if not choice.measured:
            continue
        batch, _, t, h, w = choice.input_shape
        geometry = ConvGeometry.from_dict(choice.geometry)
        for form, seconds in choice.measured.items():
            rows.append(cost_features(form, form_cost(form, geometry, *choice.atoms, batch, t, h, w)))
            times.append(seconds)
    if not rows:
        raise ConfigError("fitting the cost model needs a measured plan", "run plan_model(..., measure=True)")
    a = np.asarray(rows, dtype=np.float64)
    b = np.asarray(times, dtype=np.float64)
    # Relative error matters (small layers count as much as big ones): weight rows by 1/time.
    weights = 1.0 / np.maximum(b, 1e-6)
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active] * weights[:, None], b * weights, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0.0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    rate = [1.0 / c if c > 0 else float("inf") for c in coef]
    return DeviceCosts(
        dense_macs_per_s=float(rate[0]),
        depthwise_macs_per_s=float(rate[1]),
        bytes_per_s=float(rate[2]),
        seconds_per_conv=float(coef[3]),
        weight_bytes_per_s=float(rate[4]),
        margin=margin,
    )

