"""Whole-model conversion: find every Conv3d, choose its atoms, decompose, swap in DecomposedConv3d."""

from __future__ import annotations

import copy
import fnmatch
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .config import ConvertConfig
from .errors import ConfigError, ModelError
from .functional.calibrated import LayerStatistics, calibrated_decompose, whitened_kernel
from .functional.conv import ConvGeometry
from .functional.decompose import (
    BudgetLayer,
    allocate_budget,
    core_energy_table,
    decompose,
    decomposed_params,
    energy_rank,
    mode_spectra,
)
from .layers import DecomposedConv3d, default_atoms


@dataclass
class LayerReport:
    """One Conv3d of the model: what was done to it and what it cost."""

    name: str
    kernel_size: tuple[int, int, int]
    in_channels: int
    out_channels: int
    groups: int
    stride: tuple[int, int, int]
    params_before: int
    params_after: int
    temporal_atoms: int | None = None
    spatial_atoms: int | None = None
    rel_error: float | None = None
    skipped: str | None = None  # reason, when the layer was left dense
    seconds: float = 0.0
    form: str | None = None  # execution form chosen for the parity input (mode auto) or the fixed mode
    # Data-aware conversion (``--calibrate``): relative output errors on the calibration clips, and the
    # plain (weight-fitted) decomposition's errors at the same atoms, for comparison.
    output_error: float | None = None
    plain_rel_error: float | None = None
    plain_output_error: float | None = None

    @property
    def decomposed(self) -> bool:
        return self.skipped is None

    @property
    def ratio(self) -> float:
        """params_after / params_before."""
        return self.params_after / self.params_before if self.params_before else 1.0


@dataclass
class ConversionReport:
    """Per-layer rows plus model totals (parameters counted from the real modules)."""

    layers: list[LayerReport]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    seconds: float
    config: ConvertConfig
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None  # how the statistics were gathered, when calibrated

    @property
    def ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def touchable_params(self) -> int:
        """Parameters of the Conv3d layers the method can decompose (kernels larger than 1×1×1)."""
        return sum(layer.params_before for layer in self.layers if layer.kernel_size != (1, 1, 1))

    @property
    def touchable_share(self) -> float:
        """``touchable_params`` as a share of the whole model's parameters."""
        return self.touchable_params / self.params_before if self.params_before else 0.0

    @property
    def decomposed(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.decomposed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {**asdict(layer), "decomposed": layer.decomposed, "ratio": layer.ratio} for layer in self.layers
            ],
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "ratio": self.ratio,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "decomposed_layers": len(self.decomposed),
                "conv3d_layers": len(self.layers),
                "touchable_params": self.touchable_params,
                "touchable_share": self.touchable_share,
            },
            "seconds": self.seconds,
            "config": self.config.to_dict(),
            "calibration": self.calibration,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class LayerEvent:
    """Progress callback payload: layer ``index`` (1-based) of ``total`` finished."""

    index: int
    total: int
    name: str
    report: LayerReport


ProgressCallback = Callable[[LayerEvent], None]


def count_parameters(model: nn.Module) -> int:
    """Σ numel of the model's distinct parameters."""
    return sum(p.numel() for p in model.parameters())


def parameter_bytes(model: nn.Module) -> int:
    """Σ bytes of the model's distinct parameters at their stored dtype."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def find_conv3d(model: nn.Module) -> list[tuple[str, nn.Conv3d]]:
    """Every distinct ``nn.Conv3d`` in ``model`` with its first qualified name, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv3d)]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _dense_weight_params(conv: nn.Conv3d) -> int:
    return conv.weight.numel()


def _layer_params(geometry: ConvGeometry) -> Callable[[int, int], int]:
    def params(m_t: int, m_s: int) -> int:
        return decomposed_params(
            geometry.out_channels, geometry.in_per_group, geometry.temporal_taps, geometry.spatial_taps, m_t, m_s
        )

    return params


def _validate_atoms(config: ConvertConfig, geometries: list[ConvGeometry]) -> None:
    if config.policy != "atoms" or not geometries:
        return
    max_taps = max(g.spatial_taps for g in geometries)
    max_length = max(g.temporal_taps for g in geometries)
    if config.spatial_atoms is not None and config.spatial_atoms > max_taps:
        raise ConfigError(
            f"--atoms {config.spatial_atoms} is above every layer's spatial taps (largest kernel has {max_taps})",
            f"use --atoms ≤ {max_taps}, or --full-rank",
        )
    if config.temporal_atoms is not None and config.temporal_atoms > max_length:
        raise ConfigError(
            f"--temporal-atoms {config.temporal_atoms} is above every layer's temporal taps (longest kernel has {max_length})",
            f"use --temporal-atoms ≤ {max_length}",
        )


def _conv_budget(config: ConvertConfig, layers: list[BudgetLayer], model_params: int) -> float:
    """``--budget`` as a share of the candidate convs' weights (converted from a share of the model)."""
    budget = config.budget or 1.0
    if config.budget_of == "convs":
        return budget
    dense = sum(layer.dense_params for layer in layers)
    smallest = sum(layer.params(1, 1) for layer in layers)
    fixed = model_params - dense  # what conversion cannot touch: 1×1×1 convs, BN, linear heads, …
    reachable = (fixed + smallest) / model_params
    if budget < reachable:
        raise ConfigError(
            f"--budget {budget} of the model is out of reach: {fixed / model_params:.1%} of its parameters are "
            f"outside the decomposable convs, so the smallest it can get is {reachable:.3f}",
            f"use --budget {math.ceil(reachable * 1000) / 1000} or more, or --budget-of convs",
        )
    return min(1.0, (budget * model_params - fixed) / dense)


def _ranking_weight(
    name: str, conv: nn.Conv3d, statistics: Mapping[str, LayerStatistics] | None
) -> torch.Tensor:
    """The kernel the rank policies measure energy on: in the output metric when calibrated."""
    if statistics is not None and name in statistics:
        return whitened_kernel(conv.weight, statistics[name], conv.groups)
    return conv.weight


def _choose_ranks(
    config: ConvertConfig,
    candidates: list[tuple[str, nn.Conv3d, ConvGeometry]],
    model_params: int,
    statistics: Mapping[str, LayerStatistics] | None = None,
) -> dict[str, tuple[int, int] | str]:
    """Ranks per layer name, or the reason it stays dense."""
    choice: dict[str, tuple[int, int] | str] = {}
    if config.policy == "budget":
        budget_layers = [
            BudgetLayer(
                core_energy_table(_ranking_weight(name, conv, statistics)), _layer_params(geom),
                _dense_weight_params(conv),
            )
            for name, conv, geom in candidates
        ]
        share = _conv_budget(config, budget_layers, model_params)
        for (name, _, _), ranks in zip(candidates, allocate_budget(budget_layers, share)):
            choice[name] = ranks if ranks is not None else f"budget {config.budget} keeps it dense"
        return choice
    for name, conv, geom in candidates:
        length, taps = geom.temporal_taps, geom.spatial_taps
        if config.policy == "full_rank":
            ranks = (length, taps)
        elif config.policy == "energy":
            spectrum_t, spectrum_s = mode_spectra(_ranking_weight(name, conv, statistics))
            ranks = (energy_rank(spectrum_t, config.energy or 1.0), energy_rank(spectrum_s, config.energy or 1.0))
        else:
            ranks = default_atoms(length, taps, config.temporal_atoms, config.spatial_atoms)
        after = _layer_params(geom)(*ranks)
        dense = _dense_weight_params(conv)
        if config.policy != "full_rank" and after >= dense:
            choice[name] = f"atoms {ranks[0]}×{ranks[1]} would not save parameters ({after:,} ≥ {dense:,})"
        else:
            choice[name] = ranks
    return choice


def replace_modules(model: nn.Module, build: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace, in place, every submodule for which ``build(name, module)`` returns a module.

    A module registered under several names (shared) is built once and stays shared. Returns the
    model, or the replacement when ``model`` itself is replaced.
    """
    replacements: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if id(module) not in replacements:
            new = build(name, module)
            if new is not None:
                replacements[id(module)] = new
    if id(model) in replacements:
        return replacements[id(model)]
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if name and id(module) in replacements:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, replacements[id(module)])
    return model


def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every DecomposedConv3d replaced by its dense ``to_conv3d()``.

    For a converted model this is the dense architecture the decomposition approximates (same
    outputs to float rounding); ``model`` itself is left untouched.
    """
    return replace_modules(
        copy.deepcopy(model), lambda _, m: m.to_conv3d() if isinstance(m, DecomposedConv3d) else None
    )


def convert_model(
    model: nn.Module,
    config: ConvertConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    statistics: Mapping[str, LayerStatistics] | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Return a copy of ``model`` with its Conv3d layers decomposed, and a per-layer report.

    The input model is left untouched. 1×1×1 convs, layers excluded by ``include``/``exclude`` and
    layers whose atoms would not save parameters stay dense, with the reason in the report.
    ``statistics`` ({layer name: input statistics}, see :func:`stjfd_convert.calibrate.gather_statistics`)
    makes the named layers data-aware: ranks and atoms are chosen for the layer's output.

    Long because each layer passes through one sequence (select, rank, decompose, check, replace,
    record) whose steps feed the same report row; the steps themselves live in decompose/ and planner.
    """
    config = config or ConvertConfig()
    start = time.perf_counter()
    converted = copy.deepcopy(model)
    convs = find_conv3d(converted)
    if not convs:
        raise ModelError(
            f"{type(model).__name__} has no Conv3d layers; nothing to decompose",
            "stjfd converts 3D video CNNs (e.g. torchvision r3d_18); check --arch/--model",
        )
    if config.include:
        selected = [name for name, _ in convs if _matches(name, config.include)]
        if not selected:
            sample = ", ".join(name for name, _ in convs[:5])
            raise ConfigError(
                f"--include {' '.join(config.include)} matches no Conv3d layer", f"Conv3d names look like: {sample}"
            )
    for name, conv in convs:
        # amax propagates NaN and Inf, and is several times cheaper than isfinite().all().
        if not torch.isfinite(conv.weight.detach().abs().amax()):
            raise ModelError(
                f"layer {name} has non-finite weights (NaN/Inf)",
                "the checkpoint is corrupt or training diverged; use an earlier checkpoint",
            )

    reports: dict[str, LayerReport] = {}
    candidates: list[tuple[str, nn.Conv3d, ConvGeometry]] = []
    for name, conv in convs:
        geom = ConvGeometry.from_conv(conv)
        bias = conv.bias.numel() if conv.bias is not None else 0
        report = LayerReport(
            name=name,
            kernel_size=geom.kernel_size,
            in_channels=geom.in_channels,
            out_channels=geom.out_channels,
            groups=geom.groups,
            stride=geom.stride,
            params_before=conv.weight.numel() + bias,
            params_after=conv.weight.numel() + bias,
        )
        reports[name] = report
        if geom.kernel_size == (1, 1, 1):
            report.skipped = "1×1×1 kernel: nothing to decompose"
        elif config.include and not _matches(name, config.include):
            report.skipped = "not matched by --include"
        elif config.exclude and _matches(name, config.exclude):
            report.skipped = "matched by --exclude"
        else:
            candidates.append((name, conv, geom))
    _validate_atoms(config, [geom for _, _, geom in candidates])
    choices = _choose_ranks(config, candidates, count_parameters(model), statistics) if candidates else {}

    replacements: dict[int, nn.Module] = {}
    total = len(convs)
    for index, (name, conv) in enumerate(convs, start=1):
        report = reports[name]
        choice = choices.get(name)
        if isinstance(choice, tuple):
            tick = time.perf_counter()
            stats = statistics.get(name) if statistics is not None and config.policy != "full_rank" else None
            if stats is not None:
                decomposition, _ = calibrated_decompose(
                    conv.weight, choice[0], choice[1], stats, groups=conv.groups, method=config.method
                )
            else:
                decomposition = decompose(conv.weight, choice[0], choice[1], method=config.method)
            layer = DecomposedConv3d.from_decomposition(conv, decomposition, mode=config.mode)
            replacements[id(conv)] = layer
            report.temporal_atoms, report.spatial_atoms = choice
            report.rel_error = decomposition.rel_error
            report.params_after = layer.num_weight_params() + (layer.bias.numel() if layer.bias is not None else 0)
            report.seconds = time.perf_counter() - tick
        elif isinstance(choice, str):
            report.skipped = choice
        if progress is not None:
            progress(LayerEvent(index, total, name, report))

    # Replace every occurrence (a conv registered under several names is shared, keep it shared).
    converted = replace_modules(converted, lambda _, module: replacements.get(id(module)))

    notes = []
    if not replacements:
        notes.append("no layer was decomposed: every Conv3d was skipped (see reasons)")
    result = ConversionReport(
        layers=[reports[name] for name, _ in convs],
        params_before=count_parameters(model),
        params_after=count_parameters(converted),
        bytes_before=parameter_bytes(model),
        bytes_after=parameter_bytes(converted),
        seconds=time.perf_counter() - start,
        config=config,
        notes=notes,
    )
    result.warnings.extend(low_savings_warnings(result))
    return converted, result


LOW_SAVINGS = 0.10  # conversions that save less than this share of the model's parameters get a warning


def low_savings_warnings(report: ConversionReport) -> list[str]:
    """A warning (why, and what would help) when conversion saves < ``LOW_SAVINGS`` of the parameters.

    Where the parameters sit decides what atoms can save: 1×1×1 (pointwise) convs and everything outside
    Conv3d (BatchNorm, linear heads, attention) cannot be decomposed, and a depthwise kernel holds only
    L·K·K weights per channel, so its atoms save a few weights per channel at best.
    """
    total = report.params_before
    saved = 1.0 - report.ratio
    if not total or saved >= LOW_SAVINGS or (report.config.policy == "budget" and report.config.budget == 1.0):
        return []
    if report.config.policy == "full_rank":
        return []
    pointwise = sum(layer.params_before for layer in report.layers if layer.kernel_size == (1, 1, 1))
    grouped = sum(
        layer.params_before
        for layer in report.layers
        if layer.kernel_size != (1, 1, 1) and layer.groups > 1 and layer.in_channels // layer.groups <= 4
    )
    outside = total - sum(layer.params_before for layer in report.layers)
    parts = [
        f"{share:.0%} {what}"
        for share, what in (
            (pointwise / total, "in 1×1×1 (pointwise) convs"),
            (grouped / total, "in depthwise/grouped convs (few weights per channel)"),
            (outside / total, "outside Conv3d layers"),
        )
        if share >= 0.01
    ]
    why = f": {', '.join(parts)}" if parts else ""
    return [
        f"conversion saves only {saved:.1%} of the parameters; atoms can touch {report.touchable_share:.0%} of them"
        f"{why}. Fewer atoms (--atoms 3 --temporal-atoms 1) or --budget 0.5 shrink the touchable part further; "
        "the rest needs another method (pruning, low-rank pointwise or linear layers)"
    ]


def decomposed_layers(model: nn.Module) -> list[tuple[str, DecomposedConv3d]]:
    """Every ``DecomposedConv3d`` in ``model`` with its qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DecomposedConv3d)]


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the execution mode of every DecomposedConv3d in ``model`` (in place); returns ``model``."""
    for _, layer in decomposed_layers(model):
        layer.mode = mode
    return model
