"""Resampling atoms to another number of taps (the maths behind ``swap.py``), as pure functions.

An atom is read as the samples of a piecewise-linear function over its taps. Resizing it from ``old``
to ``new`` taps samples that function at ``new`` evenly spaced points spanning the *same* support
(first and last taps aligned, PyTorch's ``align_corners=True``): new tap ``j`` sits at old position
``j·(old − 1)/(new − 1)``. Growing 3 taps to 5 therefore keeps the 3 old taps at positions 0, 2, 4 and
puts their midpoints in between — the same positions a ×2 dilation uses, with the gaps filled in
instead of left at zero.

Normalisation (``normalization``):

- ``"integral"`` (default): the taps are multiplied by ``(old − 1)/(new − 1)``, the new tap spacing in
  old taps. The trapezoid integral of the atom — the weight it gives a slowly varying input — is then
  kept (exactly when the grids nest, as for ``new = 2·old − 1``), so a layer reading a clip slowed (or a
  frame enlarged) by ``(new − 1)/(old − 1)`` answers about as the original did to the original clip.
  Each atom's squared L2 norm (its energy) becomes about ``(old − 1)/(new − 1)`` of what it was: the
  same energy spread over proportionally more taps, i.e. the energy per unit of the stretched time is
  kept. ``new = 1`` keeps the trapezoid integral in its single tap.
- ``"energy"``: each resized atom is rescaled to its original L2 norm (what HOSVD atoms, orthonormal,
  have): comparable atom by atom, but a stretched atom then responds ~``sqrt((new − 1)/(old − 1))`` times
  more strongly to slowly varying input.

Shrinking (``new < old``) does not low-pass first, so it aliases fast atoms; it is the blunt direction.

Shapes: temporal atoms ``[L, m_t]`` → ``[n, m_t]``; spatial atoms ``[Kh·Kw, m_s]`` (row-major ``h·Kw + w``)
→ ``[nh·nw, m_s]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

RESIZE_NORMALIZATIONS = ("integral", "energy")


def interpolation_matrix(old: int, new: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``R [new, old]`` with ``resized = R @ atoms``: linear interpolation with aligned ends, times the
    ``"integral"`` gain ``(old − 1)/(new − 1)``; ``new = 1`` gives the trapezoid weights ``[½, 1, …, 1, ½]``.

    ``old = new`` is the identity. ``old = 1`` with ``new > 1`` has no shape to interpolate (ValueError).
    """
    if old < 1 or new < 1:
        raise ValueError(f"tap counts must be ≥ 1, got {old} → {new}")
    if old == new:
        return torch.eye(new, dtype=dtype)
    if old == 1:
        raise ValueError("a 1-tap atom has no shape to interpolate")
    if new == 1:
        weights = torch.ones(1, old, dtype=dtype)
        weights[0, 0] = weights[0, -1] = 0.5
        return weights
    spacing = (old - 1) / (new - 1)
    matrix = torch.zeros(new, old, dtype=torch.float64)
    for j in range(new):
        position = j * spacing
        left = min(int(position), old - 2)
        fraction = position - left
        matrix[j, left] += 1.0 - fraction
        matrix[j, left + 1] += fraction
    return (matrix * spacing).to(dtype)


def _normalized(resized: Tensor, atoms: Tensor, normalization: str) -> Tensor:
    if normalization not in RESIZE_NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; use one of {', '.join(RESIZE_NORMALIZATIONS)}")
    if normalization == "integral":
        return resized
    before = torch.linalg.vector_norm(atoms, dim=0)
    after = torch.linalg.vector_norm(resized, dim=0)
    # An atom that interpolates to zero (e.g. [1, -1] shrunk to its centre) stays zero.
    scale = torch.where(after > 0, before / torch.where(after > 0, after, torch.ones_like(after)), torch.zeros_like(after))
    return resized * scale


def resample_temporal_atoms(atoms: Tensor, size: int, normalization: str = "integral") -> Tensor:
    """Temporal atoms ``[L, m_t]`` resampled to ``[size, m_t]`` (see the module docstring).

    ``size = L`` returns an exact copy.
    """
    length = atoms.shape[0]
    if size == length:
        return atoms.detach().clone()
    matrix = interpolation_matrix(length, size)
    resized = matrix @ atoms.detach().double()
    return _normalized(resized, atoms.detach().double(), normalization).to(atoms.dtype)


def resample_spatial_atoms(
    atoms: Tensor, kernel: Sequence[int], size: Sequence[int], normalization: str = "integral"
) -> Tensor:
    """Spatial atoms ``[Kh·Kw, m_s]`` of a ``(Kh, Kw)`` kernel resampled to ``[nh·nw, m_s]`` for ``size = (nh, nw)``.

    Bilinear: the separable product of the two axes' interpolation matrices (``R_h ⊗ R_w``), so the gain
    is the product of the axes' gains. ``size = kernel`` returns an exact copy.
    """
    kh, kw = (int(k) for k in kernel)
    nh, nw = (int(n) for n in size)
    if (nh, nw) == (kh, kw):
        return atoms.detach().clone()
    matrix = torch.kron(interpolation_matrix(kh, nh), interpolation_matrix(kw, nw))
    resized = matrix @ atoms.detach().double()
    return _normalized(resized, atoms.detach().double(), normalization).to(atoms.dtype)


def dilate_taps(atoms: Tensor, dilation: int) -> Tensor:
    """Atoms ``[L, m]`` with ``dilation − 1`` zeros inserted between taps: ``[(L − 1)·dilation + 1, m]``.

    A conv with these taps at dilation 1 is the conv with the original taps at ``dilation`` (used by the
    tests as the reference for dilated atoms and for the dilated dense kernel).
    """
    length, count = atoms.shape
    out = atoms.new_zeros((length - 1) * dilation + 1, count)
    out[::dilation] = atoms
    return out
