"""Data-aware decomposition: choose atoms and coefficients for the layer's *output*, not its weight.

A conv's output is ``y = Σ_{i,t,s} W[o,i,t,s] · x[i,t,s]`` over the input patch ``x`` under each output
position. Its error under a kernel error ``E = W − Ŵ`` is ``E[y²] = Σ_o e_oᵀ C e_o`` with ``C`` the
second moment of the patches. ``C`` over (channel, tap) is far too large to keep, so it is modelled as

    C[(i,t,s), (j,u,r)] ≈ δ_ij · d_i · K[(t,s), (u,r)]

— channels independent, each with its own energy ``d_i``, sharing one tap covariance ``K`` [L·S, L·S]
(both gathered in one pass by :mod:`stjfd_convert.calibrate`). Under that model:

1. **Atoms.** ``K`` is approximated by the Kronecker product of its marginals ``K_t ⊗ K_s``; HOOI on the
   whitened kernel ``√d_i · K_t^{1/2} W K_s^{1/2}`` maximises the kept *output* energy, and the atoms are
   mapped back (``K_t^{-1/2} Ψ'``) and re-orthonormalised (only their span matters).
2. **Coefficients.** With the atoms fixed, each kernel row ``w_n`` [L·S] gets the coefficients that
   minimise ``(w_n − B a)ᵀ K (w_n − B a)`` exactly under the full ``K``, ``B = Ψ ⊗ Φ``:
   ``a = (BᵀKB)⁻¹ BᵀK w_n`` — one small solve shared by every row.

A ridge ``RIDGE`` (share of the mean tap energy) keeps the whitening invertible where calibration data
never reached a tap (e.g. padding-only taps of a short clip): such taps still count, a little. Full rank
stays exact (``B`` is then invertible).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError
from .decompose import JointDecomposition, _check_ranks, decompose, kernel_view

RIDGE = 1e-2  # share of the mean tap energy added to every tap's variance


@dataclass(frozen=True)
class LayerStatistics:
    """Second-moment statistics of one conv's input patches.

    ``tap_gram`` [L·S, L·S]: Σ over sampled output positions and input channels of ``x xᵀ`` (taps
    ordered t-major, like ``weight.reshape(O, I, L·S)``); ``channel_energy`` [C_in]: Σ of ``x²`` per input
    channel over the same patches; ``patches``: the number of (position, channel) rows summed.
    """

    tap_gram: Tensor
    channel_energy: Tensor
    patches: int


def _sqrt_and_inverse(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric square root and its inverse of a positive-definite matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(torch.finfo(matrix.dtype).tiny)
    root = values.sqrt()
    return (vectors * root) @ vectors.t(), (vectors / root) @ vectors.t()


def _regularised(gram: Tensor) -> Tensor:
    """``gram`` normalised to unit mean diagonal, plus ``RIDGE`` on the diagonal."""
    size = gram.shape[0]
    scale = float(torch.diagonal(gram).mean())
    if scale <= 0.0:
        return torch.eye(size, dtype=gram.dtype)
    return gram / scale + RIDGE * torch.eye(size, dtype=gram.dtype)


def tap_metric(stats: LayerStatistics, length: int, taps: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(K, K_t, K_s)``: the regularised tap covariance [L·S, L·S] and its temporal [L, L] and spatial
    [S, S] marginals, float64."""
    if stats.tap_gram.shape != (length * taps, length * taps):
        raise ConfigError(
            f"calibration statistics cover {stats.tap_gram.shape[0]} taps, the kernel has {length * taps}",
            "gather statistics on the same model you convert",
        )
    full = _regularised(stats.tap_gram.to(torch.float64))
    blocks = full.reshape(length, taps, length, taps)
    temporal = _regularised(torch.einsum("tsus->tu", blocks))
    spatial = _regularised(torch.einsum("tstr->sr", blocks))
    return full, temporal, spatial


def row_weights(stats: LayerStatistics, out_channels: int, in_per_group: int, groups: int) -> Tensor:
    """Energy ``d_i`` of the input channel each kernel row (o, i) reads, normalised to mean 1. [O·I/g]"""
    energy = stats.channel_energy.to(torch.float64)
    if energy.numel() != in_per_group * groups:
        raise ConfigError(
            f"calibration statistics cover {energy.numel()} input channels, the layer has {in_per_group * groups}",
            "gather statistics on the same model you convert",
        )
    per_group_out = out_channels // groups
    group_of_out = torch.arange(out_channels) // per_group_out  # [O]
    channel = group_of_out[:, None] * in_per_group + torch.arange(in_per_group)[None, :]  # [O, I/g]
    weights = energy[channel.reshape(-1)]
    mean = float(weights.mean())
    return weights / mean if mean > 0 else torch.ones_like(weights)


def whitened_kernel(weight: Tensor, stats: LayerStatistics, groups: int = 1) -> Tensor:
    """The kernel in the output metric, ``√d_i · K_t^{1/2} W K_s^{1/2}``, shaped like ``weight`` (float64).

    Its plain energy (and the energy its truncations keep) approximates the layer's output energy, so the
    rank policies (``--energy``, ``--budget``) can rank on it unchanged.
    """
    return _whitening(weight, stats, groups)[0]


def _whitening(weight: Tensor, stats: LayerStatistics, groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(whitened kernel, K, K_t^{-1/2}, K_s^{-1/2}, d)``: :func:`whitened_kernel` and what it is made of."""
    out_c, in_c, length, kh, kw = weight.shape
    w3 = kernel_view(weight)
    full, k_t, k_s = tap_metric(stats, length, kh * kw)
    root_t, inv_t = _sqrt_and_inverse(k_t)
    root_s, inv_s = _sqrt_and_inverse(k_s)
    d = row_weights(stats, out_c, in_c, groups)
    whitened = (d.sqrt()[:, None, None] * (root_t @ w3 @ root_s)).reshape(out_c, in_c, length, kh, kw)
    return whitened, full, inv_t, inv_s, d


def calibrated_decompose(
    weight: Tensor,
    temporal_atoms: int,
    spatial_atoms: int,
    stats: LayerStatistics,
    *,
    groups: int = 1,
    method: str = "hooi",
) -> tuple[JointDecomposition, float]:
    """Decompose ``weight`` [O, I, L, Kh, Kw] for its output under ``stats``.

    Returns the decomposition (``rel_error`` is still the *weight* error ‖W − Ŵ‖/‖W‖, atoms orthonormal)
    and the modelled relative output error ``√(Σ d_i eᵀKe / Σ d_i wᵀKw)``.
    """
    _check_ranks(weight, temporal_atoms, spatial_atoms)
    out_c, in_c, length, kh, kw = weight.shape
    taps = kh * kw
    w3 = kernel_view(weight)  # [N, L, S]
    whitened, full, inv_t, inv_s, d = _whitening(weight, stats, groups)
    fit = decompose(whitened, temporal_atoms, spatial_atoms, method=method)
    temporal = torch.linalg.qr(inv_t @ fit.temporal_atoms.to(torch.float64)).Q  # [L, m_t]
    spatial = torch.linalg.qr(inv_s @ fit.spatial_atoms.to(torch.float64)).Q  # [S, m_s]
    # [L·S, m_t·m_s]: column (p, q) is Ψ[:, p] ⊗ Φ[:, q] (torch.kron fails on some single-column shapes).
    basis = (temporal[:, None, :, None] * spatial[None, :, None, :]).reshape(length * taps, -1)
    projector = torch.linalg.solve(basis.t() @ full @ basis, basis.t() @ full)  # [m_t·m_s, L·S]
    rows = w3.reshape(w3.shape[0], length * taps)
    coefficients = rows @ projector.t()  # [N, m_t·m_s]
    error = rows - coefficients @ basis.t()
    total = float(rows.square().sum())
    weight_error = (float(error.square().sum()) / total) ** 0.5 if total > 0 else 0.0
    output_total = float((d * ((rows @ full) * rows).sum(1)).sum())
    output_error = float((d * ((error @ full) * error).sum(1)).sum())
    modelled = (output_error / output_total) ** 0.5 if output_total > 0 else 0.0
    dtype, device = weight.dtype, weight.device
    decomposition = JointDecomposition(
        coefficients=coefficients.reshape(out_c, in_c, temporal_atoms, spatial_atoms).to(dtype=dtype, device=device),
        temporal_atoms=temporal.to(dtype=dtype, device=device),
        spatial_atoms=spatial.to(dtype=dtype, device=device),
        rel_error=weight_error,
        iterations=fit.iterations,
    )
    return decomposition, modelled


__all__ = ["RIDGE", "LayerStatistics", "calibrated_decompose", "row_weights", "tap_metric", "whitened_kernel"]
