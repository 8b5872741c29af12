"""The three exact ways to run a jointly decomposed Conv3d, as pure functions.

Shapes (``O`` = out channels, ``I`` = in channels per group, ``L`` temporal taps, ``S = Kh·Kw``):

- ``coefficients``    [O, I, m_t, m_s]
- ``temporal_atoms``  [L, m_t]
- ``spatial_atoms``   [S, m_s]
- ``x``               [B, C_in, T, H, W]  →  output [B, O, T', H', W']

Stride, padding and dilation split per axis: the temporal ones go to the temporal-atom conv and the
spatial ones to the spatial-atom conv. Padding (zeros, reflect, replicate, circular) is an index
gather along one axis, so it commutes with a conv acting along another axis; every form below is
exactly the original convolution up to float rounding (DESIGN.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
Pair = tuple[int, int]


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise ConfigError(f"{name} must be an int or 3 ints, got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a Conv3d except its weights.

    ``padding`` keeps what the user gave (ints, tuple, ``'same'``, ``'valid'``);
    ``pads`` is the resolved ``(before, after)`` amount per axis (T, H, W).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)
    padding: str | tuple[int, int, int] = (0, 0, 0)
    dilation: tuple[int, int, int] = (1, 1, 1)
    groups: int = 1
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        if self.padding_mode not in PADDING_MODES:
            raise ConfigError(
                f"padding_mode {self.padding_mode!r} is not supported", f"use one of {', '.join(PADDING_MODES)}"
            )
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ConfigError(
                f"channels {self.in_channels}→{self.out_channels} are not divisible by groups={self.groups}"
            )
        if isinstance(self.padding, str) and self.padding not in ("same", "valid"):
            raise ConfigError(f"padding {self.padding!r} is not supported", "use ints, 'same' or 'valid'")
        if self.padding == "same" and self.stride != (1, 1, 1):
            raise ConfigError("padding='same' needs stride 1 (as in nn.Conv3d)", "give explicit padding for strided convs")

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv3d) -> "ConvGeometry":
        """Read the geometry of an ``nn.Conv3d``."""
        padding = conv.padding if isinstance(conv.padding, str) else _triple(conv.padding, "padding")
        return cls(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=_triple(conv.kernel_size, "kernel_size"),
            stride=_triple(conv.stride, "stride"),
            padding=padding,
            dilation=_triple(conv.dilation, "dilation"),
            groups=conv.groups,
            padding_mode=conv.padding_mode,
        )

    @classmethod
    def create(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> "ConvGeometry":
        """Build from ``nn.Conv3d``-style arguments (ints or triples)."""
        return cls(
            in_channels=int(in_channels),
            out_channels=int(out_channels),
            kernel_size=_triple(kernel_size, "kernel_size"),
            stride=_triple(stride, "stride"),
            padding=padding if isinstance(padding, str) else _triple(padding, "padding"),
            dilation=_triple(dilation, "dilation"),
            groups=int(groups),
            padding_mode=padding_mode,
        )

    @property
    def temporal_taps(self) -> int:
        return self.kernel_size[0]

    @property
    def spatial_taps(self) -> int:
        return self.kernel_size[1] * self.kernel_size[2]

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def pads(self) -> tuple[Pair, Pair, Pair]:
        """Resolved ``(before, after)`` padding for the T, H and W axes."""
        if self.padding == "valid":
            return ((0, 0), (0, 0), (0, 0))
        if self.padding == "same":
            out = []
            for k, d in zip(self.kernel_size, self.dilation):
                total = d * (k - 1)
                out.append((total // 2, total - total // 2))  # same split as torch.nn.Conv3d
            return tuple(out)  # type: ignore[return-value]
        return tuple((p, p) for p in self.padding)  # type: ignore[union-attr,return-value]

    def output_size(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Output (T', H', W') for an input of (T, H, W)."""
        out = []
        for n, k, s, d, (pb, pa) in zip((t, h, w), self.kernel_size, self.stride, self.dilation, self.pads):
            out.append((n + pb + pa - d * (k - 1) - 1) // s + 1)
        return tuple(out)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        """JSON-serialisable description (for the manifest)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ConvGeometry":
        return cls.create(
            data["in_channels"],
            data["out_channels"],
            data["kernel_size"],
            data.get("stride", 1),
            data.get("padding", 0),
            data.get("dilation", 1),
            data.get("groups", 1),
            data.get("padding_mode", "zeros"),
        )


def pad_amounts(geom: ConvGeometry, axes: Sequence[int]) -> tuple[list[int], tuple[int, int, int], bool]:
    """How to pad kernel axes ``axes`` (0=T, 1=H, 2=W) of a [B, C, T, H, W] input.

    Returns the explicit ``F.pad`` amounts (W, H, T order), the symmetric zero padding left to the
    conv (no copy), and whether an explicit ``F.pad`` is needed at all.
    """
    pads = geom.pads
    conv_pad = [0, 0, 0]
    explicit = [0] * 6  # F.pad order: W before/after, H before/after, T before/after
    need_pad = False
    for axis in axes:
        before, after = pads[axis]
        if before == 0 and after == 0:
            continue
        if geom.padding_mode == "zeros" and before == after:
            conv_pad[axis] = before
        else:
            explicit[2 * (2 - axis)] = before
            explicit[2 * (2 - axis) + 1] = after
            need_pad = True
    return explicit, tuple(conv_pad), need_pad  # type: ignore[return-value]


def pad_mode(geom: ConvGeometry) -> str:
    """``F.pad`` mode for the geometry's padding_mode."""
    return "constant" if geom.padding_mode == "zeros" else geom.padding_mode


def _pad_axes(x: Tensor, geom: ConvGeometry, axes: Sequence[int]) -> tuple[Tensor, tuple[int, int, int]]:
    """Pad ``x`` along the given kernel axes; returns it with the padding still left to the conv."""
    explicit, conv_pad, need_pad = pad_amounts(geom, axes)
    if need_pad:
        x = F.pad(x, explicit, mode=pad_mode(geom))
    return x, conv_pad


def reconstruct_weight(coefficients: Tensor, temporal_atoms: Tensor, spatial_atoms: Tensor, kernel_size: Sequence[int]) -> Tensor:
    """Dense weight ``W[o,i,t,s] = Σ_pq A[o,i,p,q] Ψ[t,p] Φ[s,q]`` as [O, I, L, Kh, Kw].

    Two matmuls instead of one einsum (einsum was 4× slower for 512 channels).
    """
    out_c, in_c, m_t, m_s = coefficients.shape
    length = temporal_atoms.shape[0]
    spatial = spatial_atoms.shape[0]
    a = coefficients.reshape(out_c * in_c, m_t, m_s)
    right = torch.matmul(a, spatial_atoms.t())  # [N, m_t, S]
    # [L, m_t] @ [m_t, N·S] as one GEMM, then bring L back behind N.
    left = temporal_atoms @ right.transpose(0, 1).reshape(m_t, -1)  # [L, N·S]
    weight = left.reshape(length, out_c * in_c, spatial).transpose(0, 1)
    # Contiguous: convolution backends would otherwise copy the weight on every call.
    return weight.reshape(out_c, in_c, length, kernel_size[1], kernel_size[2]).contiguous()


def fused_conv3d(x: Tensor, weight: Tensor, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """One dense conv3d with ``weight`` [O, I, L, Kh, Kw]; same cost as the original layer."""
    x, conv_pad = _pad_axes(x, geom, (0, 1, 2))
    return F.conv3d(x, weight, bias, geom.stride, conv_pad, geom.dilation, geom.groups)


def temporal_atom_conv(x: Tensor, temporal_atoms: Tensor, geom: ConvGeometry) -> Tensor:
    """Depthwise temporal conv: [B, C, T, H, W] → [B, C·m_t, T', H, W] (channel index c·m_t + p)."""
    channels = x.shape[1]
    length, m_t = temporal_atoms.shape
    weight = temporal_atoms.t().reshape(1, m_t, 1, length, 1, 1).expand(channels, -1, -1, -1, -1, -1)
    weight = weight.reshape(channels * m_t, 1, length, 1, 1)
    x, conv_pad = _pad_axes(x, geom, (0,))
    return F.conv3d(
        x, weight, None, (geom.stride[0], 1, 1), (conv_pad[0], 0, 0), (geom.dilation[0], 1, 1), channels
    )


def spatial_atom_weight(spatial_atoms: Tensor, kernel_size: Sequence[int], repeat: int) -> Tensor:
    """Spatial atoms as a grouped conv weight [repeat·m_s, 1, 1, Kh, Kw]."""
    m_s = spatial_atoms.shape[1]
    weight = spatial_atoms.t().reshape(1, m_s, 1, 1, kernel_size[1], kernel_size[2])
    return weight.expand(repeat, -1, -1, -1, -1, -1).reshape(repeat * m_s, 1, 1, kernel_size[1], kernel_size[2])


def _needs_temporal_conv(temporal_atoms: Tensor, geom: ConvGeometry) -> bool:
    # A (1,K,K) kernel with stride 1 and no temporal padding: Ψ is a 1×1 scalar, folded into A instead.
    return not (temporal_atoms.shape == (1, 1) and geom.stride[0] == 1 and geom.pads[0] == (0, 0))


def _needs_spatial_conv(spatial_atoms: Tensor, geom: ConvGeometry) -> bool:
    return not (spatial_atoms.shape == (1, 1) and geom.stride[1:] == (1, 1) and geom.pads[1:] == ((0, 0), (0, 0)))


def atoms_first_conv3d(
    x: Tensor,
    coefficients: Tensor,
    temporal_atoms: Tensor,
    spatial_atoms: Tensor,
    bias: Tensor | None,
    geom: ConvGeometry,
) -> Tensor:
    """The paper's three layers: temporal-atom conv → spatial-atom conv → 1×1×1 coefficient conv.

    Intermediates: [B, C·m_t, T', H, W] then [B, C·m_t·m_s, T', H', W'].
    """
    out_c, in_c, m_t, m_s = coefficients.shape
    if _needs_temporal_conv(temporal_atoms, geom):
        x = temporal_atom_conv(x, temporal_atoms, geom)
    else:
        coefficients = coefficients * temporal_atoms[0, 0]
    if _needs_spatial_conv(spatial_atoms, geom):
        channels = x.shape[1]
        weight = spatial_atom_weight(spatial_atoms, geom.kernel_size, channels)
        x, conv_pad = _pad_axes(x, geom, (1, 2))
        x = F.conv3d(x, weight, None, (1, *geom.stride[1:]), conv_pad, (1, *geom.dilation[1:]), channels)
    else:
        coefficients = coefficients * spatial_atoms[0, 0]
    weight = coefficients.reshape(out_c, in_c * m_t * m_s, 1, 1, 1)
    return F.conv3d(x, weight, bias, 1, 0, 1, geom.groups)


def sandwich_conv3d(
    x: Tensor,
    coefficients: Tensor,
    temporal_atoms: Tensor,
    spatial_atoms: Tensor,
    bias: Tensor | None,
    geom: ConvGeometry,
) -> Tensor:
    """Temporal-atom conv → 1×1×1 coefficient conv to O·m_s channels → spatial conv with groups=O.

    Intermediates: [B, C·m_t, T', H, W] then [B, O·m_s, T', H, W]; smaller than atoms-first when
    O·m_s < C·m_t·m_s.
    """
    out_c, in_c, m_t, m_s = coefficients.shape
    if _needs_temporal_conv(temporal_atoms, geom):
        x = temporal_atom_conv(x, temporal_atoms, geom)
    else:
        coefficients = coefficients * temporal_atoms[0, 0]
    spatial = _needs_spatial_conv(spatial_atoms, geom)
    if not spatial:
        coefficients = coefficients * spatial_atoms[0, 0]
    weight = coefficients.permute(0, 3, 1, 2).reshape(out_c * m_s, in_c * m_t, 1, 1, 1)
    x = F.conv3d(x, weight, None if spatial else bias, 1, 0, 1, geom.groups)
    if not spatial:
        return x
    x, conv_pad = _pad_axes(x, geom, (1, 2))
    weight = spatial_atoms.t().reshape(1, m_s, 1, geom.kernel_size[1], geom.kernel_size[2])
    weight = weight.expand(out_c, -1, -1, -1, -1)
    return F.conv3d(x, weight, bias, (1, *geom.stride[1:]), conv_pad, (1, *geom.dilation[1:]), out_c)


def spatial_first_weight(coefficients: Tensor, temporal_atoms: Tensor) -> Tensor:
    """Dense temporal weight [O, I·m_s, L, 1, 1] with w[o, i·m_s+q, t] = Σ_p A[o,i,p,q] Ψ[t,p]."""
    out_c, in_c, m_t, m_s = coefficients.shape
    length = temporal_atoms.shape[0]
    mixed = coefficients.transpose(2, 3).reshape(-1, m_t) @ temporal_atoms.t()  # [O·I·m_s, L]
    return mixed.reshape(out_c, in_c * m_s, length, 1, 1)


def temporal_first_weight(coefficients: Tensor, spatial_atoms: Tensor, kernel_size: Sequence[int]) -> Tensor:
    """Dense spatial weight [O, I·m_t, 1, Kh, Kw] with w[o, i·m_t+p, s] = Σ_q A[o,i,p,q] Φ[s,q]."""
    out_c, in_c, m_t, m_s = coefficients.shape
    mixed = coefficients.reshape(-1, m_s) @ spatial_atoms.t()  # [O·I·m_t, S]
    return mixed.reshape(out_c, in_c * m_t, 1, kernel_size[1], kernel_size[2])


def spatial_first_conv3d(
    x: Tensor,
    spatial_atoms: Tensor,
    mixed_weight: Tensor,
    bias: Tensor | None,
    geom: ConvGeometry,
) -> Tensor:
    """Spatial-atom depthwise conv (C → C·m_s) then one dense (L,1,1) conv with A·Ψ folded in.

    ``mixed_weight`` is ``spatial_first_weight(A, Ψ)``. MACs of the dense part are m_s/S of the
    original conv, in a GEMM-friendly conv; intermediate [B, C·m_s, T, H', W'].
    """
    channels = x.shape[1]
    if _needs_spatial_conv(spatial_atoms, geom):
        weight = spatial_atom_weight(spatial_atoms, geom.kernel_size, channels)
        x, conv_pad = _pad_axes(x, geom, (1, 2))
        x = F.conv3d(x, weight, None, (1, *geom.stride[1:]), conv_pad, (1, *geom.dilation[1:]), channels)
    else:
        mixed_weight = mixed_weight * spatial_atoms[0, 0]
    x, conv_pad = _pad_axes(x, geom, (0,))
    return F.conv3d(x, mixed_weight, bias, (geom.stride[0], 1, 1), conv_pad, (geom.dilation[0], 1, 1), geom.groups)


def temporal_first_conv3d(
    x: Tensor,
    temporal_atoms: Tensor,
    mixed_weight: Tensor,
    bias: Tensor | None,
    geom: ConvGeometry,
) -> Tensor:
    """Temporal-atom depthwise conv (C → C·m_t) then one dense (1,Kh,Kw) conv with A·Φ folded in.

    ``mixed_weight`` is ``temporal_first_weight(A, Φ)``; dense MACs are m_t/L of the original.
    """
    if _needs_temporal_conv(temporal_atoms, geom):
        x = temporal_atom_conv(x, temporal_atoms, geom)
    else:
        mixed_weight = mixed_weight * temporal_atoms[0, 0]
    x, conv_pad = _pad_axes(x, geom, (1, 2))
    return F.conv3d(x, mixed_weight, bias, (1, *geom.stride[1:]), conv_pad, (1, *geom.dilation[1:]), geom.groups)
