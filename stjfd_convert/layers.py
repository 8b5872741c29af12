"""``DecomposedConv3d``: a Conv3d stored as temporal atoms, spatial atoms and joint coefficients.

The factorised *parameters* are kept apart from how the layer is *executed* (``mode``):

- ``fused``: rebuild the dense weight and run one conv3d — same cost as the original layer;
- ``factorized``: the paper's three convs (temporal atoms → spatial atoms → 1×1×1 coefficients);
- ``sandwich``: temporal atoms → 1×1×1 coefficients to O·m_s channels → grouped spatial conv;
- ``spatial_first``: spatial atoms (depthwise) → one dense (L,1,1) conv with A·Ψ folded in;
- ``temporal_first``: temporal atoms (depthwise) → one dense (1,Kh,Kw) conv with A·Φ folded in;
- ``auto``: per input shape, the form chosen by the execution plan (``planner.py``: measured) or,
  without one, by the cost model in ``functional/cost.py``.

All forms give the same result to float rounding (see ``functional/conv.py``). Weights derived
from the parameters (the fused W, the folded A·Ψ / A·Φ) are cached while no gradient is needed
and rebuilt as soon as a parameter changes, so ``fused`` costs the same as the original conv. Without
gradients the per-call Python work is kept to what ``nn.Conv3d`` does: a cache check on the
parameters' version counters and storage, plan lookups by a key cached per ``(shape, dtype, device)``,
and one ``F.conv3d`` with padding arguments worked out once
(``benchmarks/bench_overhead.py``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import EXECUTION_FORMS, EXECUTION_MODES
from .errors import ConfigError
from .functional.conv import (
    ConvGeometry,
    atoms_first_conv3d,
    fused_conv3d,
    pad_amounts,
    pad_mode,
    reconstruct_weight,
    sandwich_conv3d,
    spatial_first_conv3d,
    spatial_first_weight,
    temporal_first_conv3d,
    temporal_first_weight,
)
from .functional.cost import cheapest_form
from .functional.decompose import JointDecomposition, decompose, decomposed_params

FORMS = EXECUTION_FORMS
MODES = EXECUTION_MODES


def plan_key(x: Tensor) -> str:
    """Key of an execution-plan entry: device type, dtype and full input shape."""
    return f"{x.device.type}/{str(x.dtype).removeprefix('torch.')}/{'x'.join(str(s) for s in x.shape)}"


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


def default_temporal_atoms(length: int) -> int:
    """Paper default: min(L, 3) temporal atoms."""
    return min(length, 3)


def default_spatial_atoms(taps: int) -> int:
    """Paper default: 6 spatial atoms (all taps when a kernel has fewer)."""
    return min(taps, 6)


def default_atoms(length: int, taps: int, temporal: int | None = None, spatial: int | None = None) -> tuple[int, int]:
    """``(m_t, m_s)`` for a kernel with ``length`` temporal and ``taps`` spatial taps.

    An explicit ``temporal``/``spatial`` count wins (clipped to the kernel). The others take the paper's
    defaults, min(L, 3) and min(K·K, 6), except where those would keep every tap of the kernel — a
    separable temporal conv (L×1×1, as in (2+1)D, S3D, SlowFast) or a small spatial one — which would
    save nothing: then the longer of the defaulted modes keeps one atom fewer than its taps
    (3×1×1 → 2 temporal atoms), so the layer is compressed rather than left dense.
    """
    m_t = default_temporal_atoms(length) if temporal is None else min(temporal, length)
    m_s = default_spatial_atoms(taps) if spatial is None else min(spatial, taps)
    if (m_t, m_s) == (length, taps) and length * taps > 1:
        spatial_free, temporal_free = spatial is None and taps > 1, temporal is None and length > 1
        if spatial_free and (taps >= length or not temporal_free):
            m_s = taps - 1
        elif temporal_free:
            m_t = length - 1
    return m_t, m_s


def _autocast_off(device_type: str) -> Any:
    """A region without autocast on ``device_type`` (a no-op where autocast does not exist, e.g. meta)."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class DecomposedConv3d(nn.Module):
    """Conv3d with weight ``W[o,i,t,s] = Σ_pq A[o,i,p,q] Ψ[t,p] Φ[s,q]``.

    Parameters: ``temporal_atoms`` Ψ [L, m_t], ``spatial_atoms`` Φ [Kh·Kw, m_s], ``coefficients``
    A [c_out, c_in/groups, m_t, m_s] and an optional ``bias`` [c_out]. Input [B, c_in, T, H, W].
    Keeps every ``nn.Conv3d`` attribute (stride, padding incl. 'same'/'valid', dilation, groups,
    padding_mode) so it is a drop-in replacement.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        num_temporal_atoms: int | None = None,
        num_spatial_atoms: int | None = None,
        mode: str = "fused",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        geometry = ConvGeometry.create(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self.geometry = geometry
        length, taps = geometry.temporal_taps, geometry.spatial_taps
        d_t, d_s = default_atoms(length, taps, num_temporal_atoms, num_spatial_atoms)
        m_t = d_t if num_temporal_atoms is None else int(num_temporal_atoms)
        m_s = d_s if num_spatial_atoms is None else int(num_spatial_atoms)
        if not 1 <= m_t <= length:
            raise ConfigError(f"num_temporal_atoms must be in 1..{length} for kernel {geometry.kernel_size}, got {m_t}")
        if not 1 <= m_s <= taps:
            raise ConfigError(f"num_spatial_atoms must be in 1..{taps} for kernel {geometry.kernel_size}, got {m_s}")
        self.num_temporal_atoms = m_t
        self.num_spatial_atoms = m_s
        self.mode = mode
        factory = {"device": device, "dtype": dtype}
        self.temporal_atoms = nn.Parameter(torch.empty(length, m_t, **factory))
        self.spatial_atoms = nn.Parameter(torch.empty(taps, m_s, **factory))
        self.coefficients = nn.Parameter(torch.empty(out_channels, geometry.in_per_group, m_t, m_s, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reconstruction_error: float | None = None
        # Execution plan for mode="auto": plan_key(x) → form (filled by planner.apply_plan / the manifest).
        self.plan: dict[str, str] = {}
        # What ``auto`` derives from an input without looking at the plan, so that editing the plan (in place
        # or by assigning a new one) is followed at once: (shape, dtype, device) → plan_key, and plan_key →
        # the cost model's form.
        self._plan_keys: dict[tuple, str] = {}
        self._auto_choices: dict[str, str] = {}
        self._derived_cache: dict[str, tuple[tuple, Tensor]] = {}
        # (F.pad amounts or None, pad mode, conv padding) of the fused conv, for the geometry they were made for.
        self._fused_padding: tuple[ConvGeometry, list[int] | None, str, tuple[int, int, int]] | None = None
        self.reset_parameters()

    # --- nn.Conv3d-compatible attributes -------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.geometry.in_channels

    @property
    def out_channels(self) -> int:
        return self.geometry.out_channels

    @property
    def kernel_size(self) -> tuple[int, int, int]:
        return self.geometry.kernel_size

    @property
    def stride(self) -> tuple[int, int, int]:
        return self.geometry.stride

    @property
    def padding(self) -> str | tuple[int, int, int]:
        return self.geometry.padding

    @property
    def dilation(self) -> tuple[int, int, int]:
        return self.geometry.dilation

    @property
    def groups(self) -> int:
        return self.geometry.groups

    @property
    def padding_mode(self) -> str:
        return self.geometry.padding_mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ConfigError(f"unknown execution mode {value!r}", f"use one of {', '.join(MODES)}")
        self._mode = value

    @property
    def weight(self) -> Tensor:
        """The dense weight [c_out, c_in/groups, L, Kh, Kw] (differentiable)."""
        return reconstruct_weight(self.coefficients, self.temporal_atoms, self.spatial_atoms, self.kernel_size)

    # --- construction ---------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Random orthonormal atoms and Kaiming-uniform coefficients (as nn.Conv3d would for W)."""
        if self.coefficients.is_meta:
            return  # shapes only (``from_decomposition`` fills real values)
        with torch.no_grad():
            for atoms in (self.temporal_atoms, self.spatial_atoms):
                q, _ = torch.linalg.qr(torch.randn(atoms.shape[0], atoms.shape[0], dtype=torch.float64))
                atoms.copy_(q[:, : atoms.shape[1]].to(atoms.dtype))
            fan_in = self.geometry.in_per_group * self.geometry.temporal_taps * self.geometry.spatial_taps
            bound = 1.0 / math.sqrt(fan_in)
            # With orthonormal atoms ‖A‖ ≈ ‖W‖, so this matches nn.Conv3d's default weight scale.
            nn.init.uniform_(self.coefficients, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_decomposition(
        cls, conv: nn.Conv3d, decomposition: JointDecomposition, *, mode: str = "fused"
    ) -> "DecomposedConv3d":
        """Wrap an existing decomposition of ``conv.weight`` (copies ``conv``'s geometry and bias)."""
        m_t = decomposition.temporal_atoms.shape[1]
        m_s = decomposition.spatial_atoms.shape[1]
        geometry = ConvGeometry.from_conv(conv)
        layer = cls(
            **_geometry_kwargs(geometry),
            bias=conv.bias is not None,
            num_temporal_atoms=m_t,
            num_spatial_atoms=m_s,
            mode=mode,
            device="meta",
            dtype=conv.weight.dtype,
        ).to_empty(device=conv.weight.device)
        with torch.no_grad():
            layer.temporal_atoms.copy_(decomposition.temporal_atoms)
            layer.spatial_atoms.copy_(decomposition.spatial_atoms)
            layer.coefficients.copy_(decomposition.coefficients)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)  # type: ignore[union-attr]
        layer.reconstruction_error = decomposition.rel_error
        layer.train(conv.training)
        return layer

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv3d,
        temporal_atoms: int | None = None,
        spatial_atoms: int | None = None,
        *,
        method: str = "hooi",
        mode: str = "fused",
    ) -> "DecomposedConv3d":
        """Decompose ``conv`` into m_t temporal and m_s spatial atoms (defaults: :func:`default_atoms`).

        ``reconstruction_error`` holds ‖W − Ŵ‖/‖W‖. Full rank (m_t = L, m_s = S) is exact.
        """
        if not isinstance(conv, nn.Conv3d):
            raise ConfigError(f"from_conv expects an nn.Conv3d, got {type(conv).__name__}")
        geometry = ConvGeometry.from_conv(conv)
        d_t, d_s = default_atoms(geometry.temporal_taps, geometry.spatial_taps, temporal_atoms, spatial_atoms)
        m_t = d_t if temporal_atoms is None else temporal_atoms
        m_s = d_s if spatial_atoms is None else spatial_atoms
        decomposition = decompose(conv.weight, m_t, m_s, method=method)
        return cls.from_decomposition(conv, decomposition, mode=mode)

    @classmethod
    def from_geometry(
        cls, geometry: ConvGeometry, *, bias: bool, num_temporal_atoms: int, num_spatial_atoms: int, mode: str = "fused"
    ) -> "DecomposedConv3d":
        """An uninitialised-shape twin for loading saved parameters (see ``io.load_converted``)."""
        return cls(
            **_geometry_kwargs(geometry),
            bias=bias,
            num_temporal_atoms=num_temporal_atoms,
            num_spatial_atoms=num_spatial_atoms,
            mode=mode,
        )

    def to_conv3d(self) -> nn.Conv3d:
        """A plain ``nn.Conv3d`` with the reconstructed weight (same geometry and bias)."""
        g = self.geometry
        conv = nn.Conv3d(
            g.in_channels,
            g.out_channels,
            g.kernel_size,
            g.stride,
            g.padding,
            g.dilation,
            g.groups,
            self.bias is not None,
            g.padding_mode,
            device=self.coefficients.device,
            dtype=self.coefficients.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)  # type: ignore[union-attr]
        conv.train(self.training)
        return conv

    # --- bookkeeping -------------------------------------------------------------------------------
    def num_weight_params(self) -> int:
        """Atoms + coefficients (bias excluded)."""
        g = self.geometry
        return decomposed_params(
            g.out_channels, g.in_per_group, g.temporal_taps, g.spatial_taps, self.num_temporal_atoms, self.num_spatial_atoms
        )

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable geometry + atoms, enough to rebuild the module (manifest entry)."""
        return {
            **self.geometry.to_dict(),
            "bias": self.bias is not None,
            "temporal_atoms": self.num_temporal_atoms,
            "spatial_atoms": self.num_spatial_atoms,
            "mode": self.mode,
            **({"plan": dict(self.plan)} if self.plan else {}),
        }

    @classmethod
    def from_description(cls, data: dict[str, Any]) -> "DecomposedConv3d":
        """Inverse of ``describe``: a module with the right parameter shapes."""
        layer = cls.from_geometry(
            ConvGeometry.from_dict(data),
            bias=bool(data["bias"]),
            num_temporal_atoms=int(data["temporal_atoms"]),
            num_spatial_atoms=int(data["spatial_atoms"]),
            mode=data.get("mode", "fused"),
        )
        plan = data.get("plan") or {}
        for key, form in plan.items():
            if form not in FORMS:
                raise ConfigError(f"execution plan entry {key!r} names unknown form {form!r}")
        layer.plan = dict(plan)
        return layer

    # --- execution ---------------------------------------------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> "DecomposedConv3d":
        # .to() / .half() / .cuda() may swap the parameters' storage without touching their version
        # counters: drop what was derived from the old values.
        self._derived_cache.clear()
        return super()._apply(fn, recurse)

    def _derived_key(self) -> tuple:
        """What the derived weights depend on: the parameters' version counters and storage."""
        params = self._parameters
        a, psi, phi = params["coefficients"], params["temporal_atoms"], params["spatial_atoms"]
        return (a._version, psi._version, phi._version, a.data_ptr(), psi.data_ptr(), phi.data_ptr(), a.dtype)

    def _needs_graph(self) -> bool:
        """Whether a derived weight must carry an autograd graph back to the parameters."""
        if not torch.is_grad_enabled():
            return False
        params = self._parameters
        return (params["coefficients"].requires_grad or params["temporal_atoms"].requires_grad
                or params["spatial_atoms"].requires_grad)

    def _derived(self, name: str, build) -> Tensor:
        """A weight derived from the parameters, cached while no autograd graph is needed."""
        if _is_compiling():
            # torch.compile traces the rebuild into its graph (a cache keyed on storage pointers and
            # version counters would break the graph); the compiled code then owns the caching question.
            return build()
        if self._needs_graph():
            # Recompute in backward instead of keeping the dense intermediates (A·Φᵀ, …): training
            # then saves only the derived weight the conv itself needs, as a dense layer would.
            return checkpoint(build, use_reentrant=False)
        return self._cached(name, build)

    def _cached(self, name: str, build) -> Tensor:
        """``build()`` without autograd, kept until the parameters change (keyed by their versions)."""
        key = self._derived_key()
        # Inference-mode tensors may not be used where autograd records, so they get their own slot.
        slot = f"{name}/{torch.is_inference_mode_enabled()}"
        cached = self._derived_cache.get(slot)
        if cached is not None and cached[0] == key:
            return cached[1]
        # Built in the parameters' dtype even under autocast: the cache outlives the autocast region (a
        # bf16 W cached while training under --amp broke the fp32 evaluation after it); autocast still
        # casts it for the conv inside the region.
        with torch.no_grad(), _autocast_off(self.coefficients.device.type):
            value = build()
        self._derived_cache[slot] = (key, value)
        return value

    def form_for(self, x: Tensor) -> str:
        """The concrete form ``forward`` uses for input ``x`` (resolves ``auto``)."""
        if self._mode != "auto":
            return self._mode
        if _is_compiling():
            # Traced once per input shape: a string key and dict lookups dynamo follows as constants.
            return self.plan.get(plan_key(x)) or self._cheapest_form(x)
        shape_key = (x.shape, x.dtype, x.device)
        key = self._plan_keys.get(shape_key)
        if key is None:
            key = self._plan_keys[shape_key] = plan_key(x)
        form = self.plan.get(key) or self._auto_choices.get(key)
        if form is None:
            form = self._auto_choices[key] = self._cheapest_form(x)
        return form

    def _cheapest_form(self, x: Tensor) -> str:
        batch, _, t, h, w = x.shape
        return cheapest_form(
            self.geometry, self.num_temporal_atoms, self.num_spatial_atoms, batch, t, h, w, x.device.type
        )

    def _fused_eval(self, x: Tensor) -> Tensor:
        """Fused conv without an autograd graph to the parameters: the cached W, one ``F.conv3d``."""
        # The cache of _cached, inlined: this is the per-call path of every eval forward, and the closure and
        # slot string _cached takes cost 1–2 µs a call (benchmarks/bench_overhead.py), as much as the rest.
        key = self._derived_key()
        slot = "fused/True" if torch.is_inference_mode_enabled() else "fused/False"
        cached = self._derived_cache.get(slot)
        if cached is None or cached[0] != key:
            with torch.no_grad(), _autocast_off(x.device.type):  # see _cached
                cached = (key, self.weight)
            self._derived_cache[slot] = cached
        weight = cached[1]
        g = self.geometry
        padding = self._fused_padding
        if padding is None or padding[0] is not g:
            explicit, conv_pad, need_pad = pad_amounts(g, (0, 1, 2))
            padding = self._fused_padding = (g, explicit if need_pad else None, pad_mode(g), conv_pad)
        if padding[1] is not None:
            x = F.pad(x, padding[1], mode=padding[2])
        return F.conv3d(x, weight, self._parameters.get("bias"), g.stride, padding[3], g.dilation, g.groups)

    def forward(self, x: Tensor) -> Tensor:
        """[B, c_in, T, H, W] → [B, c_out, T', H', W'] with the current ``mode``."""
        form = self.form_for(x) if self._mode == "auto" else self._mode
        if form == "fused":
            if not _is_compiling() and not self._needs_graph():
                return self._fused_eval(x)
            return fused_conv3d(x, self._derived("fused", lambda: self.weight), self.bias, self.geometry)
        if form == "factorized":
            return atoms_first_conv3d(
                x, self.coefficients, self.temporal_atoms, self.spatial_atoms, self.bias, self.geometry
            )
        if form == "sandwich":
            return sandwich_conv3d(
                x, self.coefficients, self.temporal_atoms, self.spatial_atoms, self.bias, self.geometry
            )
        if form == "spatial_first":
            mixed = self._derived("spatial_first", lambda: spatial_first_weight(self.coefficients, self.temporal_atoms))
            return spatial_first_conv3d(x, self.spatial_atoms, mixed, self.bias, self.geometry)
        mixed = self._derived(
            "temporal_first", lambda: temporal_first_weight(self.coefficients, self.spatial_atoms, self.kernel_size)
        )
        return temporal_first_conv3d(x, self.temporal_atoms, mixed, self.bias, self.geometry)

    def extra_repr(self) -> str:
        g = self.geometry
        text = (
            f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, "
            f"atoms=({self.num_temporal_atoms}, {self.num_spatial_atoms}), mode={self._mode!r}"
        )
        if g.padding not in ((0, 0, 0), "valid"):
            text += f", padding={g.padding!r}"
        if g.dilation != (1, 1, 1):
            text += f", dilation={g.dilation}"
        if g.groups != 1:
            text += f", groups={g.groups}"
        if g.padding_mode != "zeros":
            text += f", padding_mode={g.padding_mode!r}"
        if self.bias is None:
            text += ", bias=False"
        return text


def _geometry_kwargs(geometry: ConvGeometry) -> dict[str, Any]:
    return {
        "in_channels": geometry.in_channels,
        "out_channels": geometry.out_channels,
        "kernel_size": geometry.kernel_size,
        "stride": geometry.stride,
        "padding": geometry.padding,
        "dilation": geometry.dilation,
        "groups": geometry.groups,
        "padding_mode": geometry.padding_mode,
    }
