"""Resampling atoms to another number of taps (the maths behind ``swap.py``), as pure functions.

An atom is read as the samples of a piecewise-linear function over its taps. Resizing it from ``old``
to ``new`` taps samples that function at ``new`` evenly spaced points spanning the *same* support
(first and last taps aligned, PyTorch's ``align_corners=True``): new tap ``j`` sits at old position
``j·(old − 1)/(new − 1)`` (``new = 1``: the centre). Growing 3 taps to 5 therefore keeps the 3 old taps at
positions 0, 2, 4 and puts their midpoints in between — the positions a ×2 dilation uses, with the gaps
filled in instead of left at zero — so the atom is stretched in time by ``(new − 1)/(old − 1)``.

Normalisation (``normalization``), because an atom with more taps sums more input frames:

- ``"sum"`` (default): the taps are multiplied by ``old/new``, so the mean tap is kept and with it the
  sum of a constant atom — the layer's response to a static clip, which BatchNorm statistics and the
  following layers were trained on. For smooth atoms the sum is kept approximately (3 → 5 taps: each
  old tap's total weight becomes 0.9, 1.2, 0.9 of what it was). The squared L2 norm of the atoms (their
  energy) shrinks to about ``old/new`` or a little less (0.48 for three orthonormal 3-tap atoms resized
  to 5; ``LayerSwap.temporal_energy`` records it per layer): about the same energy spread over more taps.
- ``"energy"``: each resized atom is rescaled to its original L2 norm (what HOSVD atoms, orthonormal,
  have): comparable atom by atom, but a 3 → 5 stretched atom then answers a static clip ~1.3× as strongly.

Measured (``benchmarks/bench_tempo.py``, BENCHMARKS.md: 3 → 5 taps, a model read at half speed, seeds
0/1/2): ``"sum"`` 70.8/71.7/35.8 % top-1, ``"energy"`` 39.2/43.3/48.3 %, no normalisation 30.8/31.7/47.5 %,
the trapezoid integral (taps × ``(old − 1)/(new − 1)`` = ½, which under-weights the end taps)
16.7/30.8/33.3 % (chance: 16.7 %). ``"sum"`` is the best on average, none is reliable without
retraining. Shrinking (``new < old``) does not low-pass first, so it aliases fast atoms; it is the blunt
direction.

Shapes: temporal atoms ``[L, m_t]`` → ``[n, m_t]``; spatial atoms ``[Kh·Kw, m_s]`` (row-major ``h·Kw + w``)
→ ``[nh·nw, m_s]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

RESIZE_NORMALIZATIONS = ("sum", "energy")


def interpolation_matrix(old: int, new: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``R [new, old]`` with ``resized = R @ atoms``: linear interpolation with aligned ends (no gain);
    ``new = 1`` samples the centre. ``old = new`` is the identity; ``old = 1`` with ``new > 1`` has no
    shape to interpolate (ValueError)."""
    if old < 1 or new < 1:
        raise ValueError(f"tap counts must be ≥ 1, got {old} → {new}")
    if old == new:
        return torch.eye(new, dtype=dtype)
    if old == 1:
        raise ValueError("a 1-tap atom has no shape to interpolate")
    spacing = (old - 1) / (new - 1) if new > 1 else 0.0
    matrix = torch.zeros(new, old, dtype=torch.float64)
    for j in range(new):
        position = j * spacing if new > 1 else (old - 1) / 2
        left = min(int(position), old - 2)
        fraction = position - left
        matrix[j, left] += 1.0 - fraction
        matrix[j, left + 1] += fraction
    return matrix.to(dtype)


def resize_gain(old: int, new: int) -> float:
    """The ``"sum"`` normalisation's factor for ``old`` → ``new`` taps along one axis: ``old/new``."""
    return old / new


def _normalized(resized: Tensor, atoms: Tensor, gain: float, normalization: str) -> Tensor:
    if normalization not in RESIZE_NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {', '.join(RESIZE_NORMALIZATIONS)}")
    if normalization == "sum":
        return resized * gain
    before = torch.linalg.vector_norm(atoms, dim=0)
    after = torch.linalg.vector_norm(resized, dim=0)
    # An atom that interpolates to zero (e.g. [1, 0, -1] shrunk to its centre) stays zero.
    safe = torch.where(after > 0, after, torch.ones_like(after))
    return resized * torch.where(after > 0, before / safe, torch.zeros_like(after))


def resample_temporal_atoms(atoms: Tensor, size: int, normalization: str = "sum") -> Tensor:
    """Temporal atoms ``[L, m_t]`` resampled to ``[size, m_t]`` (see the module docstring).

    ``size = L`` returns an exact copy.
    """
    length = atoms.shape[0]
    if size == length:
        return atoms.detach().clone()
    resized = interpolation_matrix(length, size).to(atoms.device) @ atoms.detach().double()
    return _normalized(resized, atoms.detach().double(), resize_gain(length, size), normalization).to(atoms.dtype)


def resample_spatial_atoms(
    atoms: Tensor, kernel: Sequence[int], size: Sequence[int], normalization: str = "sum"
) -> Tensor:
    """Spatial atoms ``[Kh·Kw, m_s]`` of a ``(Kh, Kw)`` kernel resampled to ``[nh·nw, m_s]`` for ``size = (nh, nw)``.

    Bilinear: the separable product of the two axes' interpolation matrices (``R_h ⊗ R_w``); the ``"sum"``
    gain is ``Kh·Kw/(nh·nw)``. ``size = kernel`` returns an exact copy.
    """
    kh, kw = (int(k) for k in kernel)
    nh, nw = (int(n) for n in size)
    if (nh, nw) == (kh, kw):
        return atoms.detach().clone()
    matrix = torch.kron(interpolation_matrix(kh, nh), interpolation_matrix(kw, nw)).to(atoms.device)
    resized = matrix @ atoms.detach().double()
    gain = resize_gain(kh, nh) * resize_gain(kw, nw)
    return _normalized(resized, atoms.detach().double(), gain, normalization).to(atoms.dtype)


def dilate_taps(atoms: Tensor, dilation: int) -> Tensor:
    """Atoms ``[L, m]`` with ``dilation − 1`` zeros inserted between taps: ``[(L − 1)·dilation + 1, m]``.

    A conv with these taps at dilation 1 is the conv with the original taps at ``dilation`` (used by the
    tests as the reference for dilated atoms and for the dilated dense kernel).
    """
    length, count = atoms.shape
    out = atoms.new_zeros((length - 1) * dilation + 1, count)
    out[::dilation] = atoms
    return out
