"""Partial Tucker decomposition of Conv3d kernels: exactness, optimality, rank choice, budgets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stjfd_convert.errors import ConfigError
from stjfd_convert.functional.decompose import (
    BudgetLayer,
    allocate_budget,
    core_energy_table,
    decompose,
    decomposed_params,
    energy_rank,
    hooi,
    hosvd,
    kernel_view,
    mode_spectra,
    tensorly_partial_tucker,
)
from tolerances import ATOL_FP32, ATOL_FP64, REL_FP32, REL_FP64, RTOL_FP64, TENSORLY_SLACK

# tensorly's own chatter on full-rank and all-zero inputs; our results are checked directly.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Trying to compute SVD with n_eigenvecs:UserWarning"),
    pytest.mark.filterwarnings("ignore:invalid value encountered in scalar divide:RuntimeWarning"),
]

SEED = 0
NOISE = 0.05  # relative noise level added to the structured (low-rank) kernels
METHODS = ["hooi", "hosvd", "tensorly"]

SHAPES = [(32, 16, 3, 3, 3), (16, 8, 5, 3, 3), (8, 3, 3, 7, 7)]
SHAPE_IDS = ["x".join(map(str, shape)) for shape in SHAPES]
# Truncated ranks (m_t, m_s) per shape, from tiny to almost full.
RANKS = {
    (32, 16, 3, 3, 3): [(1, 1), (2, 4), (3, 6), (2, 8)],
    (16, 8, 5, 3, 3): [(1, 3), (3, 6), (4, 8), (2, 2)],
    (8, 3, 3, 7, 7): [(1, 6), (2, 10), (3, 20), (2, 48)],
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


def orthonormal(rows: int, cols: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64))
    return q[:, :cols].to(dtype)


def compose(coefficients: torch.Tensor, temporal: torch.Tensor, spatial: torch.Tensor, kernel: tuple[int, int, int]):
    """W[o,i,t,s] = Σ A[o,i,p,q] Ψ[t,p] Φ[s,q], written independently of the library (einsum)."""
    out_c, in_c = coefficients.shape[:2]
    weight = torch.einsum("oipq,tp,sq->oits", coefficients, temporal, spatial)
    return weight.reshape(out_c, in_c, *kernel)


def low_rank_kernel(shape, m_t: int, m_s: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    out_c, in_c, length, kh, kw = shape
    coefficients = torch.randn(out_c, in_c, m_t, m_s, dtype=torch.float64)
    weight = compose(coefficients, orthonormal(length, m_t), orthonormal(kh * kw, m_s), (length, kh, kw))
    return weight.to(dtype)


def noisy_low_rank_kernel(shape, m_t: int, m_s: int) -> torch.Tensor:
    weight = low_rank_kernel(shape, m_t, m_s)
    noise = torch.randn(shape, dtype=torch.float64)
    return weight + NOISE * noise * weight.norm() / noise.norm()


def smooth_kernel(shape) -> torch.Tensor:
    """Spatially smooth filters (a random mix of low-order polynomials over the taps) plus noise."""
    out_c, in_c, length, kh, kw = shape
    t = torch.linspace(-1, 1, length, dtype=torch.float64)
    h = torch.linspace(-1, 1, kh, dtype=torch.float64)
    w = torch.linspace(-1, 1, kw, dtype=torch.float64)
    basis = torch.stack(
        [torch.ones(length, kh, kw, dtype=torch.float64)]
        + [g for g in torch.meshgrid(t, h, w, indexing="ij")]
        + [g.square() for g in torch.meshgrid(t, h, w, indexing="ij")]
    )
    weight = torch.einsum("oib,bthw->oithw", torch.randn(out_c, in_c, basis.shape[0], dtype=torch.float64), basis)
    noise = torch.randn(shape, dtype=torch.float64)
    return weight + NOISE * noise * weight.norm() / noise.norm()


def sample_kernels(shape):
    """Random, low-rank + noise, and smooth (structured) kernels of one shape."""
    return {
        "random": torch.randn(shape, dtype=torch.float64),
        "low_rank_noise": noisy_low_rank_kernel(shape, min(2, shape[2]), min(4, shape[3] * shape[4])),
        "smooth": smooth_kernel(shape),
    }


def independent_rel_error(weight: torch.Tensor, result) -> float:
    kernel = tuple(weight.shape[2:])
    approx = compose(result.coefficients.double(), result.temporal_atoms.double(), result.spatial_atoms.double(), kernel)
    weight = weight.double()
    return float((weight - approx).norm() / weight.norm())


def budget_layer(weight: torch.Tensor) -> BudgetLayer:
    out_c, in_c, length, kh, kw = weight.shape
    return BudgetLayer(
        energy_table=core_energy_table(weight),
        params=lambda m_t, m_s: decomposed_params(out_c, in_c, length, kh * kw, m_t, m_s),
        dense_params=out_c * in_c * length * kh * kw,
    )


def params_of(layer: BudgetLayer, choice) -> int:
    return layer.dense_params if choice is None else layer.params(*choice)


# --- exactness ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES + [(4, 2, 1, 3, 3), (4, 2, 3, 1, 1), (2, 2, 1, 1, 1)])
def test_full_rank_is_exact(shape, method):
    weight = torch.randn(shape, dtype=torch.float64)
    length, taps = shape[2], shape[3] * shape[4]
    result = decompose(weight, length, taps, method=method)
    assert result.rel_error <= REL_FP64
    assert independent_rel_error(weight, result) <= REL_FP64
    assert tuple(result.coefficients.shape) == (shape[0], shape[1], length, taps)


@pytest.mark.parametrize("method", ["hooi", "hosvd"])
@pytest.mark.parametrize("one_full_mode", ["temporal", "spatial"])
def test_one_full_mode_is_optimal(method, one_full_mode):
    """With one mode at full rank, the best error is the discarded tail of the other mode's spectrum."""
    shape = (16, 8, 5, 3, 3)
    weight = torch.randn(shape, dtype=torch.float64)
    temporal_spectrum, spatial_spectrum = mode_spectra(weight)
    if one_full_mode == "temporal":
        ranks, tail = (5, 4), spatial_spectrum[4:]
    else:
        ranks, tail = (2, 9), temporal_spectrum[2:]
    result = decompose(weight, *ranks, method=method)
    expected = math.sqrt(float(tail.sum() / weight.square().sum()))
    assert abs(result.rel_error - expected) <= RTOL_FP64 * expected


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_exact_low_rank_kernel_is_recovered(shape):
    length, taps = shape[2], shape[3] * shape[4]
    for m_t, m_s in RANKS[shape]:
        weight = low_rank_kernel(shape, m_t, m_s)
        for method in METHODS:
            result = decompose(weight, m_t, m_s, method=method)
            assert result.rel_error <= REL_FP64, (method, m_t, m_s)
            assert independent_rel_error(weight, result) <= REL_FP64, (method, m_t, m_s)
        # Over-estimating the rank loses nothing either.
        result = hooi(weight, min(m_t + 1, length), min(m_s + 1, taps))
        assert result.rel_error <= REL_FP64


# --- optimality ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "low_rank_noise", "smooth"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_hooi_not_worse_than_hosvd_or_tensorly(shape, kind):
    weight = sample_kernels(shape)[kind]
    for m_t, m_s in RANKS[shape]:
        ours = hooi(weight, m_t, m_s).rel_error
        assert ours <= hosvd(weight, m_t, m_s).rel_error + REL_FP64, (m_t, m_s)
        assert ours <= tensorly_partial_tucker(weight, m_t, m_s).rel_error + TENSORLY_SLACK, (m_t, m_s)


def test_hooi_improves_on_hosvd_somewhere():
    """Guards the comparison above: on a random kernel HOOI strictly beats the HOSVD start."""
    weight = torch.randn(32, 16, 3, 3, 3, dtype=torch.float64)
    result = hooi(weight, 2, 4)
    assert result.iterations >= 1
    assert result.rel_error < hosvd(weight, 2, 4).rel_error - REL_FP64


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rel_error_matches_independent_computation(shape, method):
    weight = torch.randn(shape, dtype=torch.float64)
    for m_t, m_s in RANKS[shape]:
        result = decompose(weight, m_t, m_s, method=method)
        expected = independent_rel_error(weight, result)
        assert 0.0 < expected < 1.0
        assert abs(result.rel_error - expected) <= RTOL_FP64 * expected


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_atoms_orthonormal_and_coefficients_are_projection(shape, method):
    weight = torch.randn(shape, dtype=torch.float64)
    length, taps = shape[2], shape[3] * shape[4]
    for m_t, m_s in RANKS[shape] + [(length, taps)]:
        result = decompose(weight, m_t, m_s, method=method)
        psi, phi = result.temporal_atoms, result.spatial_atoms
        assert tuple(psi.shape) == (length, m_t) and tuple(phi.shape) == (taps, m_s)
        torch.testing.assert_close(psi.t() @ psi, torch.eye(m_t, dtype=psi.dtype), atol=ATOL_FP64, rtol=RTOL_FP64)
        torch.testing.assert_close(phi.t() @ phi, torch.eye(m_s, dtype=phi.dtype), atol=ATOL_FP64, rtol=RTOL_FP64)
        projection = torch.einsum("oits,tp,sq->oipq", weight.reshape(*shape[:3], taps), psi, phi)
        torch.testing.assert_close(result.coefficients, projection, atol=ATOL_FP64, rtol=RTOL_FP64)


def test_decomposition_is_deterministic():
    weight = torch.randn(16, 8, 5, 3, 3, dtype=torch.float64)
    first, second = hooi(weight, 2, 4), hooi(weight.clone(), 2, 4)
    for a, b in [(first.temporal_atoms, second.temporal_atoms), (first.spatial_atoms, second.spatial_atoms)]:
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)


# --- rank selection -----------------------------------------------------------------------------------

SPECTRUM = [4.0, 3.0, 2.0, 1.0]  # cumulative shares 0.4, 0.7, 0.9, 1.0


@pytest.mark.parametrize(
    "spectrum, share, expected",
    [
        (SPECTRUM, 0.0, 1),
        (SPECTRUM, 0.3, 1),
        (SPECTRUM, 0.4, 1),
        (SPECTRUM, 0.41, 2),
        (SPECTRUM, 0.7, 2),
        (SPECTRUM, 0.71, 3),
        (SPECTRUM, 0.9, 3),
        (SPECTRUM, 0.95, 4),
        (SPECTRUM, 1.0, 4),
        ([5.0, 5.0, 0.0, 0.0], 1.0, 2),  # trailing zeros are never needed
        ([0.7, 0.6, 0.3, 0.1, 0.01], 1.0, 5),  # cumulative share ends at 0.9999999999999999
        ([1.0], 1.0, 1),
        ([10.0, 1e-3, 1e-3], 0.99, 1),
        ([1.0] * 49, 0.5, 25),
        ([0.0, 0.0, 0.0], 0.5, 1),  # zero spectrum
        ([0.0, 0.0, 0.0], 1.0, 1),
    ],
)
def test_energy_rank_hand_made(spectrum, share, expected):
    assert energy_rank(torch.tensor(spectrum, dtype=torch.float64), share) == expected


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    spectrum=st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=12).map(
        lambda v: sorted(v, reverse=True)
    ),
    share=st.floats(min_value=0.0, max_value=1.0),
)
def test_energy_rank_is_smallest_rank_reaching_share(spectrum, share):
    values = torch.tensor(spectrum, dtype=torch.float64)
    total = float(values.sum())
    rank = energy_rank(values, share)
    assert 1 <= rank <= len(spectrum)
    if total > 0:
        kept = torch.cumsum(values, 0) / total
        assert float(kept[rank - 1]) >= share - REL_FP64
        if rank > 1:
            assert float(kept[rank - 2]) < share


@pytest.mark.parametrize("shape", SHAPES + [(4, 2, 1, 3, 3), (4, 2, 3, 1, 1)])
def test_core_energy_table(shape):
    weight = smooth_kernel(shape)
    table = core_energy_table(weight)
    length, taps = shape[2], shape[3] * shape[4]
    assert tuple(table.shape) == (length, taps)
    total = float(weight.square().sum())
    assert abs(float(table[-1, -1]) - total) <= RTOL_FP64 * total
    assert bool((table.diff(dim=0) >= -ATOL_FP64 * total).all())
    assert bool((table.diff(dim=1) >= -ATOL_FP64 * total).all())
    assert bool((table >= 0).all())
    # Each entry is the energy the HOSVD truncation to those ranks keeps: ‖W‖²(1 − rel_error²).
    for m_t, m_s in [(1, 1), (length, 1), (1, taps), ((length + 1) // 2, (taps + 1) // 2)]:
        kept = total * (1.0 - hosvd(weight, m_t, m_s).rel_error ** 2)
        assert abs(float(table[m_t - 1, m_s - 1]) - kept) <= RTOL_FP64 * total * 10


# --- parameter budget ---------------------------------------------------------------------------------


def budget_layers():
    return [budget_layer(torch.randn(shape, dtype=torch.float64)) for shape in SHAPES] + [
        budget_layer(smooth_kernel((16, 16, 3, 3, 3))),
        budget_layer(noisy_low_rank_kernel((16, 8, 5, 3, 3), 2, 3)),
    ]


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.35, 0.5, 0.8, 0.95])
def test_allocate_budget_meets_budget(ratio):
    layers = budget_layers()
    choices = allocate_budget(layers, ratio)
    assert len(choices) == len(layers)
    dense = sum(layer.dense_params for layer in layers)
    assert sum(params_of(layer, choice) for layer, choice in zip(layers, choices)) <= ratio * dense
    for layer, choice in zip(layers, choices):
        if choice is not None:
            m_t, m_s = choice
            length, taps = layer.energy_table.shape
            assert 1 <= m_t <= length and 1 <= m_s <= taps
            assert layer.params(m_t, m_s) < layer.dense_params


def test_allocate_budget_tighter_budget_never_keeps_more():
    layers = budget_layers()
    previous = math.inf
    for ratio in [0.9, 0.7, 0.5, 0.3, 0.1]:
        total = sum(params_of(layer, choice) for layer, choice in zip(layers, allocate_budget(layers, ratio)))
        assert total <= previous
        previous = total


@pytest.mark.parametrize("order", ["low_rank_first", "noise_first"])
@pytest.mark.parametrize("noisy", [False, True], ids=["exact_low_rank", "low_rank_plus_noise"])
def test_allocate_budget_cuts_cheaper_layer_first(order, noisy):
    shape = (16, 16, 3, 3, 3)
    true_ranks = (1, 2)
    make = noisy_low_rank_kernel if noisy else low_rank_kernel
    low_rank = budget_layer(make(shape, *true_ranks))
    noise = budget_layer(torch.randn(shape, dtype=torch.float64))
    layers = [low_rank, noise] if order == "low_rank_first" else [noise, low_rank]
    dense = sum(layer.dense_params for layer in layers)
    # Halfway between "all dense" and "only the low-rank layer cut to its true ranks": something must
    # be cut, and cutting the low-rank layer alone is enough.
    only_low_rank_cut = (noise.dense_params + low_rank.params(*true_ranks)) / dense
    ratio = (1.0 + only_low_rank_cut) / 2
    names = ["low_rank", "noise"] if order == "low_rank_first" else ["noise", "low_rank"]
    choices = dict(zip(names, allocate_budget(layers, ratio)))
    assert choices["noise"] is None
    assert choices["low_rank"] is not None
    m_t, m_s = choices["low_rank"]
    assert m_t >= true_ranks[0] and m_s >= true_ranks[1]  # cut without losing anything


def test_allocate_budget_keeps_dense_at_ratio_one():
    layers = budget_layers()
    assert allocate_budget(layers, 1.0) == [None] * len(layers)


def test_allocate_budget_keeps_exactly_low_rank_layer_dense_at_ratio_one():
    """ratio=1.0 means "no compression": every layer stays dense, even one that could be cut for free."""
    shape = (16, 16, 3, 3, 3)
    layers = [budget_layer(low_rank_kernel(shape, 1, 2)), budget_layer(torch.randn(shape, dtype=torch.float64))]
    assert allocate_budget(layers, 1.0) == [None, None]


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.0 + REL_FP32, 2.0, float("nan")])
def test_allocate_budget_rejects_bad_ratio(ratio):
    with pytest.raises(ConfigError):
        allocate_budget(budget_layers(), ratio)


def test_allocate_budget_unreachable_raises():
    layers = [budget_layer(torch.randn(2, 1, 3, 3, 3, dtype=torch.float64))]
    smallest = min(layers[0].params(1, 1), layers[0].dense_params)
    with pytest.raises(ConfigError):
        allocate_budget(layers, 0.5 * smallest / layers[0].dense_params)


# --- errors, dtypes, degenerate input -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["nope", "HOOI", "", "tucker"])
def test_unknown_method_raises(method):
    with pytest.raises(ConfigError):
        decompose(torch.randn(4, 2, 3, 3, 3), 2, 4, method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ranks", [(0, 1), (1, 0), (4, 1), (1, 10), (-1, 2)])
def test_ranks_out_of_range_raise(method, ranks):
    with pytest.raises(ConfigError):
        decompose(torch.randn(4, 2, 3, 3, 3), *ranks, method=method)


def test_non_5d_weight_raises():
    with pytest.raises(ConfigError):
        kernel_view(torch.randn(4, 2, 3, 3))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_preserved(method, dtype):
    weight = torch.randn(16, 8, 3, 3, 3, dtype=dtype)
    result = decompose(weight, 2, 4, method=method)
    for tensor in (result.coefficients, result.temporal_atoms, result.spatial_atoms):
        assert tensor.dtype == dtype
        assert tensor.device == weight.device
    assert isinstance(result.rel_error, float)
    tolerance = REL_FP32 if dtype == torch.float32 else REL_FP64
    assert abs(independent_rel_error(weight, result) - result.rel_error) <= tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["hooi", "hosvd"])
def test_device_preserved_cuda(method):
    weight = torch.randn(16, 8, 3, 3, 3, device="cuda")
    result = decompose(weight, 2, 4, method=method)
    for tensor in (result.coefficients, result.temporal_atoms, result.spatial_atoms):
        assert tensor.device == weight.device and tensor.dtype == weight.dtype


def test_float32_input_is_not_modified_and_matches_float64():
    weight = torch.randn(16, 8, 5, 3, 3)
    original = weight.clone()
    single = hooi(weight, 2, 4)
    double = hooi(weight.double(), 2, 4)
    torch.testing.assert_close(weight, original, atol=0.0, rtol=0.0)
    assert abs(single.rel_error - double.rel_error) <= REL_FP32
    torch.testing.assert_close(single.temporal_atoms.double(), double.temporal_atoms, atol=ATOL_FP32, rtol=0.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ranks", [(1, 1), (2, 4), (3, 9)])
def test_all_zero_kernel(method, ranks):
    weight = torch.zeros(4, 2, 3, 3, 3)
    result = decompose(weight, *ranks, method=method)
    assert result.rel_error == 0.0
    for tensor in (result.coefficients, result.temporal_atoms, result.spatial_atoms):
        assert bool(torch.isfinite(tensor).all())
    assert bool((result.coefficients == 0).all())
    table = core_energy_table(weight)
    assert bool(torch.isfinite(table).all()) and float(table[-1, -1]) == 0.0


# --- property test ------------------------------------------------------------------------------------


@st.composite
def shapes_and_ranks(draw):
    shape = (
        draw(st.integers(1, 6)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
    )
    m_t = draw(st.integers(1, shape[2]))
    m_s = draw(st.integers(1, shape[3] * shape[4]))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, m_t, m_s, seed


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(shapes_and_ranks())
def test_property_hooi_error_bounded_and_not_worse_than_hosvd(case):
    shape, m_t, m_s, seed = case
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, dtype=torch.float64, generator=generator)
    ours = hooi(weight, m_t, m_s)
    assert 0.0 <= ours.rel_error <= 1.0
    assert ours.rel_error <= hosvd(weight, m_t, m_s).rel_error + REL_FP64
    assert abs(ours.rel_error - independent_rel_error(weight, ours)) <= REL_FP64
