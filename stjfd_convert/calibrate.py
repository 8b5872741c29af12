"""Data-aware conversion: gather each conv's input statistics on real clips, decompose for the output.

:func:`gather_statistics` runs the original model once over calibration batches with forward pre-hooks
on its Conv3d layers; each hook samples ``positions`` output positions per batch, gathers the input
patches under them and adds their tap Gram matrix and per-channel energy to a float64 accumulator
(:class:`~stjfd_convert.functional.calibrated.LayerStatistics`). Memory is bounded by one batch's
patches per layer (``positions × C_in × L·S`` floats) and the accumulators (``(L·S)² + C_in`` each),
whatever the number of clips.

:func:`calibrate_model` converts with those statistics (:func:`convert_model` ``statistics=``) and, in
a second pass, measures each decomposed layer's relative output error on the same clips — for the
calibrated kernel and for the plain (weight-fitted) decomposition at the same atoms — into the report.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConvertConfig
from .convert import ConversionReport, ProgressCallback, convert_model, decomposed_layers, find_conv3d
from .errors import ConfigError
from .functional.calibrated import LayerStatistics
from .functional.decompose import decompose
from .inputs import move_input
from .layouts import CLIP_LAYOUTS, check_input_layout, clip_layout

POSITIONS = 512  # output positions sampled per layer per batch
CalibrationProgress = Callable[[str, int, int], None]  # (phase, batches done, batches total or 0)


@dataclass
class _Accumulator:
    gram: Tensor
    energy: Tensor
    patches: int = 0

    def result(self) -> LayerStatistics:
        return LayerStatistics(self.gram.clone(), self.energy.clone(), self.patches)


def _padded(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``x`` padded exactly as ``conv`` pads it (zeros or its padding mode; 'same' included)."""
    pad = getattr(conv, "_reversed_padding_repeated_twice", None)
    if pad is None:  # torch always sets it today; tuple padding is all older releases had
        pad = [p for p in reversed(conv.padding) for _ in range(2)]
    if not any(pad):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, list(pad), mode=mode)


def sample_patches(conv: nn.Conv3d, x: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Input patches of ``conv`` under ``count`` random output positions of ``x`` [B, C, T, H, W].

    Returns [P, L·Kh·Kw, C] (taps t-major, like the kernel), float32, P = min(count, positions).
    """
    xp = _padded(conv, x.detach())
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    outputs = [(xp.shape[2 + d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1 for d in range(3)]
    if min(outputs) < 1:
        raise ConfigError(
            f"a calibration clip of {tuple(x.shape[2:])} is smaller than a layer's kernel {tuple(kernel)}",
            "calibrate with clips of the size the model is used at (--input-shape)",
        )
    total = x.shape[0] * outputs[0] * outputs[1] * outputs[2]
    index = torch.randperm(total, generator=generator)[: min(count, total)].to(xp.device)
    b, rest = index // (outputs[0] * outputs[1] * outputs[2]), index % (outputs[0] * outputs[1] * outputs[2])
    t, rest = rest // (outputs[1] * outputs[2]), rest % (outputs[1] * outputs[2])
    h, w = rest // outputs[2], rest % outputs[2]
    taps = [
        torch.arange(kernel[d], device=xp.device) * dilation[d] for d in range(3)
    ]  # offsets of the taps within a patch, per dimension
    grid_t, grid_h, grid_w = torch.meshgrid(*taps, indexing="ij")
    rows_t = t[:, None] * stride[0] + grid_t.reshape(1, -1)
    rows_h = h[:, None] * stride[1] + grid_h.reshape(1, -1)
    rows_w = w[:, None] * stride[2] + grid_w.reshape(1, -1)
    channels_last = xp.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]: one gather picks whole channel vectors
    return channels_last[b[:, None], rows_t, rows_h, rows_w].float()  # [P, L·S, C]


def _statistics_layers(model: nn.Module, names: Iterable[str] | None) -> list[tuple[str, nn.Conv3d]]:
    wanted = set(names) if names is not None else None
    return [
        (name, conv)
        for name, conv in find_conv3d(model)
        if conv.kernel_size != (1, 1, 1) and (wanted is None or name in wanted)
    ]


@contextlib.contextmanager
def _hooks(modules: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    handles = [module.register_forward_pre_hook(hook) for module, hook in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _batches_total(batches: Iterable[Any]) -> int:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return 0


@torch.no_grad()
def gather_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    names: Iterable[str] | None = None,
    positions: int = POSITIONS,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: CalibrationProgress | None = None,
) -> dict[str, LayerStatistics]:
    """Input statistics of every Conv3d (kernel larger than 1×1×1, or those in ``names``) of ``model``.

    ``batches`` yields model inputs (a clip batch, e.g. [B, C, T, H, W], or what the model takes); the
    model runs in eval mode under ``no_grad``, once over them. Returns {layer name: LayerStatistics}.
    """
    if positions < 1:
        raise ConfigError(f"positions must be ≥ 1, got {positions}")
    layers = _statistics_layers(model, names)
    generator = torch.Generator().manual_seed(seed)
    accumulators: dict[str, _Accumulator] = {}

    def hook_for(name: str, conv: nn.Conv3d) -> Callable[..., None]:
        taps = conv.kernel_size[0] * conv.kernel_size[1] * conv.kernel_size[2]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            patches = sample_patches(conv, args[0], positions, generator)  # [P, L·S, C]
            acc = accumulators.get(name)
            if acc is None:
                acc = accumulators[name] = _Accumulator(
                    torch.zeros(taps, taps, dtype=torch.float64), torch.zeros(conv.in_channels, dtype=torch.float64)
                )
            flat = patches.transpose(1, 2).reshape(-1, taps)  # [P·C, L·S]
            acc.gram += (flat.t() @ flat).double().cpu()
            acc.energy += patches.square().sum((0, 1)).double().cpu()
            acc.patches += flat.shape[0]

        return hook

    was_training = model.training
    model.eval()
    total = _batches_total(batches)
    try:
        with _hooks([(conv, hook_for(name, conv)) for name, conv in layers]):
            for done, batch in enumerate(batches, start=1):
                model(move_input(batch, device))
                if progress is not None:
                    progress("statistics", done, total)
    finally:
        model.train(was_training)
    if not accumulators and layers:
        raise ConfigError("no calibration batch reached the model", "pass a folder holding videos")
    return {name: acc.result() for name, acc in accumulators.items()}


@torch.no_grad()
def measure_output_errors(
    model: nn.Module,
    kernels: Mapping[str, Mapping[str, Tensor]],
    batches: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    progress: CalibrationProgress | None = None,
    after: Callable[[Any, Any], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Relative output error ‖conv(x; Ŵ) − conv(x; W)‖ / ‖conv(x; W)‖ (bias excluded) of each candidate
    kernel, on each layer's real input in ``model`` (the original) over ``batches``.

    ``kernels``: {layer name: {label: Ŵ [O, I, L, Kh, Kw]}}. Returns {layer name: {label: error}}.
    ``after(batch, output)`` is called with each batch and the model's output (e.g. to compare models).
    """
    convs = dict(find_conv3d(model))
    sums: dict[str, dict[str, float]] = {name: {label: 0.0 for label in ks} for name, ks in kernels.items()}
    norms: dict[str, float] = {name: 0.0 for name in kernels}

    def hook_for(name: str, conv: nn.Conv3d) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            reference = conv._conv_forward(x, conv.weight, None)
            norms[name] += float(reference.double().square().sum())
            for label, weight in kernels[name].items():
                diff = conv._conv_forward(x, weight.to(x.device, conv.weight.dtype), None) - reference
                sums[name][label] += float(diff.double().square().sum())

        return hook

    was_training = model.training
    model.eval()
    total = _batches_total(batches)
    try:
        with _hooks([(convs[name], hook_for(name, convs[name])) for name in kernels]):
            for done, batch in enumerate(batches, start=1):
                batch = move_input(batch, device)
                output = model(batch)
                if after is not None:
                    after(batch, output)
                if progress is not None:
                    progress("output error", done, total)
    finally:
        model.train(was_training)
    return {
        name: {label: (value / norms[name]) ** 0.5 if norms[name] > 0 else 0.0 for label, value in labels.items()}
        for name, labels in sums.items()
    }


def _plain_twin(
    model: nn.Module, converted: nn.Module, report: ConversionReport, method: str
) -> tuple[nn.Module, dict[str, dict[str, Tensor]]]:
    """The weight-fitted (plain) conversion at the calibrated atoms, and both kernels of every decomposed layer."""
    from .convert import replace_modules
    from .layers import DecomposedConv3d

    rows = {row.name: row for row in report.layers}
    convs = dict(find_conv3d(model))
    kernels: dict[str, dict[str, Tensor]] = {}
    plain_layers: dict[int, nn.Module] = {}
    for name, layer in decomposed_layers(converted):
        row = rows.get(name)
        if row is None or row.temporal_atoms is None or name not in convs:
            continue
        plain = decompose(convs[name].weight, row.temporal_atoms, row.spatial_atoms, method=method)
        row.plain_rel_error = plain.rel_error
        twin = DecomposedConv3d.from_decomposition(convs[name], plain, mode=layer.mode)
        plain_layers[id(layer)] = twin
        kernels[name] = {"calibrated": layer.weight.detach(), "plain": twin.weight.detach()}
    by_name = {
        name: plain_layers[id(layer)] for name, layer in decomposed_layers(converted) if id(layer) in plain_layers
    }
    plain_model = replace_modules(copy.deepcopy(converted), lambda name, _: by_name.get(name))
    originals = dict(model.named_modules())
    for name, module in plain_model.named_modules():
        source = originals.get(name)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(source, type(module)):
            module.load_state_dict(source.state_dict())  # plain keeps the original's BatchNorm statistics
    return plain_model, kernels


def _flat_outputs(output: Any) -> Tensor:
    from .parity import flatten_outputs

    return torch.cat([t.detach().double().flatten() for _, t in flatten_outputs(output)])


def calibrate_model(
    model: nn.Module,
    batches: Iterable[Any],
    config: ConvertConfig | None = None,
    *,
    positions: int = POSITIONS,
    seed: int = 0,
    batchnorm: bool = True,
    device: str | torch.device = "cpu",
    measure: bool = True,
    progress: CalibrationProgress | None = None,
    layer_progress: ProgressCallback | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Convert ``model`` with atoms and coefficients fitted to each layer's output on ``batches``.

    Then, with ``batchnorm``, every BatchNorm's running statistics are re-estimated on ``batches``
    (the converted layers shift the activations BatchNorm normalises; not at full rank, which shifts
    nothing). ``batches`` must be iterable again for each pass (a list of input batches, a DataLoader or
    :class:`CalibrationClips`). With ``measure``, the report's decomposed rows carry ``output_error`` and
    ``plain_rel_error`` / ``plain_output_error`` (the weight-fitted decomposition at the same atoms), and
    ``report.calibration`` the whole model's relative output error, calibrated and plain, on ``batches``;
    re-estimated BatchNorm statistics are then kept only if they lower that error (the original's were
    estimated on other data, or never: ``report.calibration["batchnorm_rejected"]`` says what they gave).
    ``model`` is moved to ``device`` and otherwise left unchanged.
    """
    from .finetune.evaluation import recalibrate_batchnorm

    config = config or ConvertConfig()
    model = model.to(device)
    statistics = gather_statistics(model, batches, positions=positions, seed=seed, device=device, progress=progress)
    converted, report = convert_model(model, config, progress=layer_progress, statistics=statistics)
    total = _batches_total(batches)
    report.calibration = {"positions": positions, "layers": len(statistics), "batches": total}
    exact = config.policy == "full_rank"
    measure = measure and not exact
    # The converted model with the original's BatchNorm statistics, to measure against re-estimated ones.
    original_statistics = copy.deepcopy(converted) if batchnorm and measure else None
    if batchnorm and not exact:
        report.calibration["batchnorm"] = recalibrate_batchnorm(
            converted, batches, device=device,
            progress=(lambda done: progress("batchnorm", done, total)) if progress is not None else None,
        )
    if not measure:
        return converted, report
    plain_model, kernels = _plain_twin(model, converted, report, config.method)
    arms = {"calibrated": converted, "plain": plain_model}
    if original_statistics is not None:
        arms["original_statistics"] = original_statistics
    sums = dict.fromkeys([*arms, "norm"], 0.0)

    def compare_models(batch: Any, reference: Any) -> None:
        expected = _flat_outputs(reference)
        sums["norm"] += float(expected.square().sum())
        for label, net in arms.items():
            sums[label] += float((_flat_outputs(net(batch)) - expected).square().sum())

    errors = measure_output_errors(model, kernels, batches, device=device, progress=progress, after=compare_models)
    rows = {row.name: row for row in report.layers}
    for name, values in errors.items():
        rows[name].output_error = values["calibrated"]
        rows[name].plain_output_error = values["plain"]
    if sums["norm"] > 0:
        error = {label: (sums[label] / sums["norm"]) ** 0.5 for label in arms}
        if original_statistics is not None and error["original_statistics"] < error["calibrated"]:
            # Re-estimating moved the model away from the original: keep the statistics it came with.
            report.calibration["batchnorm_rejected"] = {
                "batches": report.calibration.pop("batchnorm", 0), "model_output_error": error["calibrated"]
            }
            converted, error["calibrated"] = original_statistics, error["original_statistics"]
        report.calibration["model_output_error"] = error["calibrated"]
        report.calibration["plain_model_output_error"] = error["plain"]
    return converted, report


def clip_geometry(
    input_shape: Any, layout: str = "BCTHW", pathway_strides: Sequence[int] | None = None
) -> tuple[int, tuple[int, int]]:
    """``(clip_len, (height, width))`` of the clip one model input is cut from, read from ``input_shape``
    in ``layout``; for several pathways, the full-rate pathway's (``pathway_strides`` required)."""
    from .inputs import is_multi, normalize_input_shape, pathway_shapes

    layout = check_input_layout(layout)
    shape = normalize_input_shape(input_shape)
    shapes = pathway_shapes(shape)
    if is_multi(shape):
        if not pathway_strides:
            raise ConfigError(
                "--calibrate on a model with several inputs needs --pathway-strides",
                "e.g. --pathway-strides 4,1: how each pathway is cut from one decoded clip",
            )
        shapes = (shapes[list(pathway_strides).index(min(pathway_strides))],)
    one = shapes[0]
    axes = CLIP_LAYOUTS[layout]
    if len(one) != 5:
        raise ConfigError(
            f"--calibrate needs a 5-D clip batch shape, got {list(one)}", "e.g. --input-shape 1,3,16,112,112"
        )
    dims = dict(zip(axes, one[1:]))
    if dims["C"] != 3:
        guess = next((name for name, order in CLIP_LAYOUTS.items() if dict(zip(order, one[1:]))["C"] == 3), None)
        raise ConfigError(
            f"--input-shape {','.join(map(str, one))} has {dims['C']} channels where {layout} puts them, "
            "and videos decode to 3 (RGB)",
            f"pass --input-layout {guess}" if guess else "give the shape of an RGB clip batch",
        )
    return dims["T"], (dims["H"], dims["W"])


class CalibrationClips:
    """Re-iterable batches of model inputs cut from every video under a folder (no labels).

    ``clips`` clips in all: the centre clip of evenly spread videos, or several clips per video when the
    folder holds fewer videos than that. Batches are [B, …] in the clip ``layout`` (``CTHW`` etc. per clip).
    """

    def __init__(
        self, dataset: Any, clips: int, batch_size: int, strides: Sequence[int] | None = None, container: str = "list"
    ) -> None:
        from torch.utils.data import Subset

        per_video = dataset.config.clips_per_video
        videos = min(len(dataset), -(-clips // per_video))
        step = len(dataset) / videos
        self.dataset = Subset(dataset, [int(i * step) for i in range(videos)])
        self.per_video, self.batch_size = per_video, batch_size
        self.clips = videos * per_video
        self.strides, self.container = strides, container
        self.time_axis = 1 + dataset.config.layout.index("T")

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        from .inputs import split_pathways

        for clips, _ in DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=0):
            clips = clips.flatten(0, 1) if self.per_video > 1 else clips
            if self.strides:
                clips = split_pathways(clips, self.strides, container=self.container, time_axis=self.time_axis)
            yield clips


def calibration_clips(
    folder: str | Any,
    input_shape: Any,
    *,
    layout: str = "BCTHW",
    dtype: str = "float32",
    clips: int = 32,
    batch_size: int = 4,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pathway_strides: Sequence[int] | None = None,
    container: str = "list",
) -> CalibrationClips:
    """Calibration batches from every video under ``folder`` (recursively), cut and laid out like the
    model's input (``input_shape`` in ``layout``; uint8 raw frames or float 0..1, then ``mean``/``std``)."""
    from pathlib import Path

    from .data import unlabeled_dataset

    if clips < 1:
        raise ConfigError(f"--calibrate-clips must be ≥ 1, got {clips}", "e.g. --calibrate-clips 32")
    if not Path(folder).is_dir():
        raise ConfigError(f"--calibrate {folder} is not a folder", "pass a folder holding videos (read recursively)")
    clip_len, size = clip_geometry(input_shape, layout, pathway_strides)
    dataset = unlabeled_dataset(
        folder, clip_len=clip_len, size=size, train=False, mean=mean, std=std, layout=clip_layout(layout),
        dtype=dtype,
    )
    videos = len(dataset)
    if videos < clips:  # several clips from each video (the folder is read and probed once)
        dataset.config = dataclasses.replace(dataset.config, clips_per_video=-(-clips // videos))
    return CalibrationClips(dataset, clips, batch_size, pathway_strides, container)


__all__ = [
    "POSITIONS",
    "CalibrationClips",
    "calibrate_model",
    "calibration_clips",
    "clip_geometry",
    "gather_statistics",
    "measure_output_errors",
    "sample_patches",
]
