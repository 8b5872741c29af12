"""Partial Tucker decomposition of Conv3d kernels over the temporal and spatial modes.

A kernel ``W`` [O, I, L, Kh, Kw] is viewed as ``W[n, t, s]`` with n = (o, i) and s = (kh, kw), and
written as ``W ≈ Σ_pq A[n,p,q] Ψ[t,p] Φ[s,q]`` with orthonormal atoms Ψ [L, m_t] and Φ [S, m_s].
The channel mode is not factorised. The two kernel modes are tiny (L ≤ 7, S ≤ 49), so every mode
subproblem is an ``eigh`` of an L×L or S×S Gram matrix rather than an SVD of a wide unfolding.
All maths runs in float64; results are cast back to the kernel's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .conv import reconstruct_weight

METHODS = ("hooi", "hosvd", "tensorly")


@dataclass(frozen=True)
class JointDecomposition:
    """Result of decomposing one kernel.

    coefficients [O, I, m_t, m_s], temporal_atoms [L, m_t], spatial_atoms [S, m_s];
    ``rel_error`` = ‖W − Ŵ‖ / ‖W‖ (0 for an all-zero kernel); ``iterations`` HOOI sweeps run.
    """

    coefficients: Tensor
    temporal_atoms: Tensor
    spatial_atoms: Tensor
    rel_error: float
    iterations: int


def kernel_view(weight: Tensor) -> Tensor:
    """[O, I, L, Kh, Kw] → [O·I, L, Kh·Kw] in float64."""
    if weight.dim() != 5:
        raise ConfigError(f"expected a 5-D Conv3d weight, got shape {tuple(weight.shape)}")
    out_c, in_c, length, kh, kw = weight.shape
    return weight.detach().to(torch.float64).reshape(out_c * in_c, length, kh * kw)


def leading_eigvecs(gram: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenvectors [n, rank] and all eigenvalues (descending) of a symmetric PSD matrix.

    Signs are fixed (largest-magnitude entry of each vector positive) so results are reproducible.
    """
    values, vectors = torch.linalg.eigh(gram)
    values = values.flip(0).clamp_min(0.0)
    vectors = vectors.flip(1)[:, :rank]
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(rank)])
    signs[signs == 0] = 1.0
    return vectors * signs, values


def _gram_of_columns(matrix: Tensor) -> Tensor:
    """XᵀX for a tall [rows, k] matrix: a k×k Gram from one GEMM, no transposed copy."""
    return matrix.t() @ matrix


def _kernel_layouts(weight: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel as [N, L, S] and as [N, S, L] (both contiguous, float64).

    With both layouts every mode product and Gram below is a plain 2-D GEMM instead of a batch of
    N tiny matmuls.
    """
    w3 = kernel_view(weight)
    return w3, w3.transpose(1, 2).contiguous()


def _temporal_gram(w3_sl: Tensor) -> Tensor:
    """Σ_{n,s} W[n,t,s] W[n,u,s] → [L, L], from the [N, S, L] layout."""
    return _gram_of_columns(w3_sl.reshape(-1, w3_sl.shape[2]))


def _spatial_gram(w3: Tensor) -> Tensor:
    """Σ_{n,t} W[n,t,s] W[n,t,r] → [S, S], from the [N, L, S] layout."""
    return _gram_of_columns(w3.reshape(-1, w3.shape[2]))


def _apply_spatial(w3: Tensor, spatial: Tensor) -> Tensor:
    """W ×_s Φᵀ: [N, L, S] → [N, L, m_s]."""
    n, length, taps = w3.shape
    return (w3.reshape(n * length, taps) @ spatial).reshape(n, length, spatial.shape[1])


def _apply_temporal(w3_sl: Tensor, temporal: Tensor) -> Tensor:
    """W ×_t Ψᵀ: [N, S, L] → [N, S, m_t]."""
    n, taps, length = w3_sl.shape
    return (w3_sl.reshape(n * taps, length) @ temporal).reshape(n, taps, temporal.shape[1])


def _project(w3_sl: Tensor, temporal: Tensor, spatial: Tensor) -> Tensor:
    """A = Ψᵀ W Φ: [N, m_t, m_s]."""
    z = _apply_temporal(w3_sl, temporal).transpose(1, 2).contiguous()  # [N, m_t, S]
    return _apply_spatial(z, spatial)


def mode_spectra(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Squared singular values (descending) of the temporal [L] and spatial [S] unfoldings."""
    w3, w3_sl = _kernel_layouts(weight)
    return (
        torch.linalg.eigvalsh(_temporal_gram(w3_sl)).flip(0).clamp_min(0.0),
        torch.linalg.eigvalsh(_spatial_gram(w3)).flip(0).clamp_min(0.0),
    )


def energy_rank(spectrum: Tensor, share: float) -> int:
    """Smallest rank whose leading squared singular values keep ``share`` of the total."""
    total = float(spectrum.sum())
    if total <= 0.0:
        return 1
    cumulative = torch.cumsum(spectrum, 0) / total
    # A tiny slack so share=1.0 is reachable despite rounding.
    return int(torch.searchsorted(cumulative, torch.tensor(share - 1e-12, dtype=cumulative.dtype)).item()) + 1


def core_energy_table(weight: Tensor) -> Tensor:
    """E[a, b] = energy kept by the HOSVD truncation to (a+1) temporal, (b+1) spatial atoms. [L, S]

    Uses the full HOSVD bases once; any truncation's kept energy is a corner sum of the core energy.
    """
    w3, w3_sl = _kernel_layouts(weight)
    u_t, _ = leading_eigvecs(_temporal_gram(w3_sl), w3.shape[1])
    u_s, _ = leading_eigvecs(_spatial_gram(w3), w3.shape[2])
    per_atom = _project(w3_sl, u_t, u_s).square().sum(0)  # [L, S] core energy per atom pair
    return per_atom.cumsum(0).cumsum(1)


def _relative_error(w3: Tensor, coefficients: Tensor, temporal: Tensor, spatial: Tensor) -> float:
    """‖W − Ψ A Φᵀ‖/‖W‖ for orthonormal atoms.

    Uses ‖W‖² − ‖A‖² (Pythagoras) when the error is large enough for that to be accurate, and an
    explicit reconstruction when cancellation would eat the digits.
    """
    total = float(w3.square().sum())
    if total == 0.0:
        return 0.0
    estimate = max(0.0, 1.0 - float(coefficients.square().sum()) / total)
    if estimate > 1e-6:
        return estimate**0.5
    n = w3.shape[0]
    approx = _apply_spatial(coefficients, spatial.t())  # [N, m_t, S]
    approx = (temporal @ approx.transpose(0, 1).reshape(temporal.shape[1], -1)).reshape(-1, n, w3.shape[2])
    return float(torch.linalg.vector_norm(w3 - approx.transpose(0, 1)) / total**0.5)


def _identity_or_top(gram: Tensor, rank: int) -> Tensor:
    if rank == gram.shape[0]:
        # Full rank: any orthonormal basis is exact; the identity keeps the layer interpretable.
        return torch.eye(rank, dtype=gram.dtype, device=gram.device)
    return leading_eigvecs(gram, rank)[0]


def _is_identity(atoms: Tensor) -> bool:
    return atoms.shape[0] == atoms.shape[1] and bool(torch.equal(atoms, torch.eye(atoms.shape[0], dtype=atoms.dtype)))


def _finish(
    weight: Tensor, w3: Tensor, w3_sl: Tensor, temporal: Tensor, spatial: Tensor, iterations: int
) -> JointDecomposition:
    out_c, in_c = weight.shape[:2]
    if _is_identity(temporal) and _is_identity(spatial):
        coefficients, error = w3, 0.0  # full rank with identity atoms: A = W exactly
    else:
        coefficients = _project(w3_sl, temporal, spatial)
        error = _relative_error(w3, coefficients, temporal, spatial)
    dtype, device = weight.dtype, weight.device
    return JointDecomposition(
        coefficients=coefficients.reshape(out_c, in_c, *coefficients.shape[1:]).to(dtype=dtype, device=device),
        temporal_atoms=temporal.to(dtype=dtype, device=device),
        spatial_atoms=spatial.to(dtype=dtype, device=device),
        rel_error=error,
        iterations=iterations,
    )


def _check_ranks(weight: Tensor, temporal_atoms: int, spatial_atoms: int) -> None:
    length = weight.shape[2]
    taps = weight.shape[3] * weight.shape[4]
    if not 1 <= temporal_atoms <= length:
        raise ConfigError(f"temporal atoms must be in 1..{length} for this kernel, got {temporal_atoms}")
    if not 1 <= spatial_atoms <= taps:
        raise ConfigError(f"spatial atoms must be in 1..{taps} for this kernel, got {spatial_atoms}")


def hosvd(weight: Tensor, temporal_atoms: int, spatial_atoms: int) -> JointDecomposition:
    """Truncated higher-order SVD over the two kernel modes (no iterations)."""
    _check_ranks(weight, temporal_atoms, spatial_atoms)
    w3, w3_sl = _kernel_layouts(weight)
    temporal = _identity_or_top(_temporal_gram(w3_sl), temporal_atoms)
    spatial = _identity_or_top(_spatial_gram(w3), spatial_atoms)
    return _finish(weight, w3, w3_sl, temporal, spatial, 0)


def hooi(
    weight: Tensor, temporal_atoms: int, spatial_atoms: int, *, n_iter_max: int = 100, tol: float = 1e-8
) -> JointDecomposition:
    """HOSVD-initialised higher-order orthogonal iteration.

    Each sweep maximises the kept energy ‖Ψᵀ W Φ‖² over one mode with the other fixed (an eigh of
    an L×L or S×S Gram matrix). Stops when the kept energy improves by less than ``tol``·‖W‖².
    When either mode is at full rank the HOSVD is already optimal.
    """
    _check_ranks(weight, temporal_atoms, spatial_atoms)
    w3, w3_sl = _kernel_layouts(weight)
    n, length, taps = w3.shape
    temporal = _identity_or_top(_temporal_gram(w3_sl), temporal_atoms)
    spatial = _identity_or_top(_spatial_gram(w3), spatial_atoms)
    if temporal_atoms == length or spatial_atoms == taps:
        return _finish(weight, w3, w3_sl, temporal, spatial, 0)
    total = float(w3.square().sum())
    kept_before = -math.inf
    iterations = 0
    for iterations in range(1, n_iter_max + 1):
        y = _apply_spatial(w3, spatial)  # [N, L, m_s]
        temporal = leading_eigvecs(_gram_of_columns(y.transpose(1, 2).reshape(-1, length)), temporal_atoms)[0]
        z = _apply_temporal(w3_sl, temporal)  # [N, S, m_t]
        spatial, values = leading_eigvecs(_gram_of_columns(z.transpose(1, 2).reshape(-1, taps)), spatial_atoms)
        kept = float(values[:spatial_atoms].sum())
        if kept - kept_before <= tol * total:
            break
        kept_before = kept
    return _finish(weight, w3, w3_sl, temporal, spatial, iterations)


def tensorly_partial_tucker(weight: Tensor, temporal_atoms: int, spatial_atoms: int) -> JointDecomposition:
    """Reference implementation: tensorly's ``partial_tucker`` over modes (t, s) of [O, I, L, S]."""
    _check_ranks(weight, temporal_atoms, spatial_atoms)
    import numpy as np
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    out_c, in_c, length, kh, kw = weight.shape
    tensor = weight.detach().to(torch.float64).reshape(out_c, in_c, length, kh * kw).cpu().numpy()
    with tl.backend_context("numpy"):
        result = partial_tucker(tensor, rank=[temporal_atoms, spatial_atoms], modes=[2, 3], init="svd")
    # tensorly ≥0.8 returns ((core, factors), errors); older releases (core, factors).
    first = result[0]
    core, factors = first if isinstance(first, (tuple, list)) and len(first) == 2 and not isinstance(first, np.ndarray) else result
    temporal = torch.from_numpy(np.asarray(factors[0]))
    spatial = torch.from_numpy(np.asarray(factors[1]))
    w3, w3_sl = _kernel_layouts(weight)
    return _finish(weight, w3, w3_sl, temporal, spatial, -1)


def decompose(
    weight: Tensor, temporal_atoms: int, spatial_atoms: int, *, method: str = "hooi", **options
) -> JointDecomposition:
    """Decompose a Conv3d weight [O, I, L, Kh, Kw] with ``method`` in {hooi, hosvd, tensorly}."""
    if method == "hooi":
        return hooi(weight, temporal_atoms, spatial_atoms, **options)
    if method == "hosvd":
        return hosvd(weight, temporal_atoms, spatial_atoms)
    if method == "tensorly":
        return tensorly_partial_tucker(weight, temporal_atoms, spatial_atoms)
    raise ConfigError(f"unknown decomposition method {method!r}", f"use one of {', '.join(METHODS)}")


def decomposed_params(out_channels: int, in_per_group: int, length: int, taps: int, m_t: int, m_s: int) -> int:
    """Weight parameters of a decomposed layer (bias excluded): O·I·m_t·m_s + L·m_t + S·m_s."""
    return out_channels * in_per_group * m_t * m_s + length * m_t + taps * m_s


@dataclass(frozen=True)
class BudgetLayer:
    """What the budget allocator needs to know about one layer."""

    energy_table: Tensor  # [L, S] kept energy per (m_t, m_s) (see ``core_energy_table``)
    params: Callable[[int, int], int]  # decomposed weight params for (m_t, m_s)
    dense_params: int


def _lower_hull(points: list[tuple[int, float, tuple[int, int] | None]]) -> list[tuple[int, float, tuple[int, int] | None]]:
    """Lower convex hull of (cost, loss, ranks) points, by increasing cost."""
    points = sorted(points, key=lambda p: (p[0], p[1]))
    hull: list[tuple[int, float, tuple[int, int] | None]] = []
    for point in points:
        if hull and hull[-1][0] == point[0]:
            continue  # same cost, higher (or equal) loss
        while len(hull) >= 2:
            (c1, l1, _), (c2, l2, _) = hull[-2], hull[-1]
            # Drop the middle point if it lies on or above the segment from hull[-2] to point.
            if (l2 - l1) * (point[0] - c1) >= (point[1] - l1) * (c2 - c1):
                hull.pop()
            else:
                break
        if hull and point[1] >= hull[-1][1]:
            continue  # costs more and loses at least as much: never useful
        hull.append(point)
    return hull


def allocate_budget(layers: Sequence[BudgetLayer], ratio: float) -> list[tuple[int, int] | None]:
    """Ranks (m_t, m_s) per layer — or ``None`` to keep it dense — so that the layers' weight
    parameters total at most ``ratio`` of their dense total, spending error where it is cheapest.

    Error is each layer's relative squared error (so every layer counts alike; BatchNorm follows
    most convs), estimated from the HOSVD core energy. Per layer the useful choices form a lower
    convex hull of (params, error); starting from dense everywhere, the greedy step that adds the
    least error per parameter saved is taken until the budget is met.
    """
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"budget must be in (0, 1], got {ratio}", "e.g. --budget 0.5 keeps half the conv parameters")
    hulls = []
    for layer in layers:
        length, taps = layer.energy_table.shape
        total = float(layer.energy_table[-1, -1]) or 1.0
        points: list[tuple[int, float, tuple[int, int] | None]] = [(layer.dense_params, 0.0, None)]
        for m_t in range(1, length + 1):
            for m_s in range(1, taps + 1):
                params = layer.params(m_t, m_s)
                if params < layer.dense_params:
                    loss = max(0.0, 1.0 - float(layer.energy_table[m_t - 1, m_s - 1]) / total)
                    points.append((params, loss, (m_t, m_s)))
        hull = _lower_hull(points)
        if hull[-1][2] is not None:
            # A lossless truncation dominated the dense point; keep dense as the free starting step
            # so a ratio of 1.0 still leaves every layer dense.
            hull.append((layer.dense_params, 0.0, None))
        hulls.append(hull)
    position = [len(h) - 1 for h in hulls]  # most expensive hull point = dense
    target = ratio * sum(layer.dense_params for layer in layers)
    current = sum(h[p][0] for h, p in zip(hulls, position))
    while current > target:
        best: tuple[float, int] | None = None
        for i, (hull, pos) in enumerate(zip(hulls, position)):
            if pos == 0:
                continue
            saved = hull[pos][0] - hull[pos - 1][0]
            price = (hull[pos - 1][1] - hull[pos][1]) / saved
            if best is None or price < best[0]:
                best = (price, i)
        if best is None:
            raise ConfigError(
                f"budget {ratio} cannot be met even with one atom per mode in every layer",
                "raise --budget or decompose more layers",
            )
        i = best[1]
        current -= hulls[i][position[i]][0] - hulls[i][position[i] - 1][0]
        position[i] -= 1
    return [hull[pos][2] for hull, pos in zip(hulls, position)]


__all__ = [
    "METHODS",
    "BudgetLayer",
    "JointDecomposition",
    "allocate_budget",
    "core_energy_table",
    "decompose",
    "decomposed_params",
    "energy_rank",
    "hooi",
    "hosvd",
    "kernel_view",
    "leading_eigvecs",
    "mode_spectra",
    "reconstruct_weight",
    "tensorly_partial_tucker",
]
