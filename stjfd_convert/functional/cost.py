"""Operation counts of each execution form of a (decomposed) Conv3d, from its real geometry.

Counts are multiply-accumulates (MACs) and activation elements written, for a batch ``B`` and an
input of ``(T, H, W)`` frames. Every conv is counted as out_elements × (in_channels/groups · taps),
the same rule used for the dense conv, so forms are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

from .conv import ConvGeometry


@dataclass(frozen=True)
class FormCost:
    """Work of one execution form.

    ``dense_macs``: MACs in convs with many input channels per group (GEMM-like, fast per MAC);
    ``depthwise_macs``: MACs in per-channel atom convs (memory-bound, slow per MAC);
    ``intermediate_elements``: elements of intermediate activations written (and read back).
    """

    dense_macs: int
    depthwise_macs: int
    intermediate_elements: int
    output_elements: int
    weight_elements: int = 0  # weights the dense conv reads (CPU backends also re-layout them per call)

    @property
    def macs(self) -> int:
        return self.dense_macs + self.depthwise_macs


def _axis_out(n: int, k: int, s: int, d: int, pads: tuple[int, int]) -> int:
    return (n + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1


def form_cost(
    form: str, geometry: ConvGeometry, m_t: int, m_s: int, batch: int, t: int, h: int, w: int
) -> FormCost:
    """Cost of ``form`` in {dense, fused, factorized, sandwich} for input [batch, C_in, t, h, w].

    ``dense`` is the original Conv3d; ``fused`` runs the same conv on a rebuilt (cached) weight.
    """
    g = geometry
    length, kh, kw = g.kernel_size
    taps = kh * kw
    (pt, ph, pw) = g.pads
    t_out = _axis_out(t, length, g.stride[0], g.dilation[0], pt)
    h_out = _axis_out(h, kh, g.stride[1], g.dilation[1], ph)
    w_out = _axis_out(w, kw, g.stride[2], g.dilation[2], pw)
    c_in, c_out, i_per_group = g.in_channels, g.out_channels, g.in_per_group
    out_elements = batch * c_out * t_out * h_out * w_out
    if form in ("dense", "fused"):
        return FormCost(out_elements * i_per_group * length * taps, 0, 0, out_elements, c_out * i_per_group * length * taps)
    # 1×1 atoms on an axis with no stride/padding are folded into the coefficients (functional/conv.py).
    skip_temporal = length == 1 and m_t == 1 and g.stride[0] == 1 and pt == (0, 0)
    skip_spatial = taps == 1 and m_s == 1 and g.stride[1:] == (1, 1) and (ph, pw) == ((0, 0), (0, 0))
    temporal_out = 0 if skip_temporal else batch * c_in * m_t * t_out * h * w
    temporal_macs = temporal_out * length
    if form == "factorized":
        spatial_out = 0 if skip_spatial else batch * c_in * m_t * m_s * t_out * h_out * w_out
        return FormCost(
            dense_macs=out_elements * i_per_group * m_t * m_s,
            depthwise_macs=temporal_macs + spatial_out * taps,
            intermediate_elements=temporal_out + spatial_out,
            output_elements=out_elements,
            weight_elements=c_out * i_per_group * m_t * m_s,
        )
    if form == "sandwich":
        coefficient_out = 0 if skip_spatial else batch * c_out * m_s * t_out * h * w
        return FormCost(
            dense_macs=(coefficient_out or out_elements) * i_per_group * m_t,
            depthwise_macs=temporal_macs + (0 if skip_spatial else out_elements * m_s * taps),
            intermediate_elements=temporal_out + coefficient_out,
            output_elements=out_elements,
            weight_elements=c_out * i_per_group * m_t * m_s,
        )
    if form == "spatial_first":
        spatial_out = 0 if skip_spatial else batch * c_in * m_s * t * h_out * w_out
        return FormCost(
            dense_macs=out_elements * i_per_group * m_s * length,
            depthwise_macs=spatial_out * taps,
            intermediate_elements=spatial_out,
            output_elements=out_elements,
            weight_elements=c_out * i_per_group * m_s * length,
        )
    if form == "temporal_first":
        return FormCost(
            dense_macs=out_elements * i_per_group * m_t * taps,
            depthwise_macs=temporal_macs,
            intermediate_elements=temporal_out,
            output_elements=out_elements,
            weight_elements=c_out * i_per_group * m_t * taps,
        )
    raise ValueError(f"unknown execution form {form!r}")


FORMS = ("fused", "factorized", "sandwich", "spatial_first", "temporal_first")


@dataclass(frozen=True)
class DeviceCosts:
    """Throughputs of one device class; ``predict_seconds`` = Σ work / rate + per-conv overhead."""

    dense_macs_per_s: float
    depthwise_macs_per_s: float
    bytes_per_s: float
    seconds_per_conv: float
    weight_bytes_per_s: float
    margin: float  # a factorised form must beat fused by this factor to be chosen without measurement


# The margin is the cost model's noise guard: a factorised form must be predicted this much faster than
# fused to be chosen without measurement, so when the model is unsure, fused (= the original conv's cost)
# wins; a measured plan (planner.py) overrides it either way.
DEVICE_COSTS = {
    # Calibrated with benchmarks/bench_inference.py --calibrate on the 2-core CPU machine (BENCHMARKS.md).
    "cpu": DeviceCosts(2.4e11, 7.9e9, 8.5e9, 0.0, 8.5e9, 0.7),
    # NVIDIA H200 (issue #16: torch 2.11, cuDNN, fp32/bf16), fitted to the whole-model r3d_18 ratios measured
    # there — every factorised form 2–15× slower than dense, temporal_first 1.4–3.6×, factorized 1.8–15× —
    # which this profile reproduces (temporal_first 1.3–1.9×, spatial_first 3.0–5.5×, sandwich 5.6–11×,
    # factorized 5.5–16× at atoms 3×6 / 2×4, batch 1–32): cuDNN's depthwise (grouped) conv3d runs ~200× below
    # its dense rate, and each extra conv costs a launch. No r3d_18 layer is predicted faster than 0.75× fused,
    # and the wider guard (0.5) keeps fused unless a measured plan says otherwise. Refit on a lent GPU with
    # benchmarks/gpu_check.sh (bench_inference.py --calibrate --device cuda).
    "cuda": DeviceCosts(3.0e13, 1.5e11, 3.0e12, 4.0e-5, 1.0e12, 0.5),
}


def conv_count(form: str) -> int:
    return {"fused": 1, "dense": 1, "factorized": 3, "sandwich": 3}.get(form, 2)


def predict_seconds(
    form: str, geometry: ConvGeometry, m_t: int, m_s: int, batch: int, t: int, h: int, w: int, device: str = "cpu"
) -> float:
    """Predicted run time of ``form`` from its MACs and bytes moved (float32 activations)."""
    costs = DEVICE_COSTS.get(device, DEVICE_COSTS["cpu"])
    cost = form_cost(form, geometry, m_t, m_s, batch, t, h, w)
    return sum(feature / rate for feature, rate in zip(cost_features(form, cost), _rates(costs)))


def cost_features(form: str, cost: FormCost) -> list[float]:
    """The cost model's regressors: dense MACs, depthwise MACs, activation bytes moved, convs, weight bytes."""
    return [
        float(cost.dense_macs),
        float(cost.depthwise_macs),
        8.0 * cost.intermediate_elements,
        float(conv_count(form)),
        4.0 * cost.weight_elements,
    ]


def _rates(costs: DeviceCosts) -> list[float]:
    return [
        costs.dense_macs_per_s,
        costs.depthwise_macs_per_s,
        costs.bytes_per_s,
        1.0 / costs.seconds_per_conv if costs.seconds_per_conv > 0 else float("inf"),
        costs.weight_bytes_per_s,
    ]


def cheapest_form(
    geometry: ConvGeometry, m_t: int, m_s: int, batch: int, t: int, h: int, w: int, device: str = "cpu"
) -> str:
    """The form the cost model predicts fastest; fused unless another wins by the device's margin.

    A device type without figures of its own (anything but cpu and cuda) runs fused: the CPU figures say
    nothing about it, and fused costs what the original layer costs everywhere.
    """
    if device not in DEVICE_COSTS:
        return "fused"
    fused = predict_seconds("fused", geometry, m_t, m_s, batch, t, h, w, device)
    best, best_time = "fused", fused
    for form in FORMS[1:]:
        seconds = predict_seconds(form, geometry, m_t, m_s, batch, t, h, w, device)
        if seconds < best_time:
            best, best_time = form, seconds
    margin = DEVICE_COSTS[device].margin
    return best if best_time <= margin * fused else "fused"


def dense_conv_macs(geometry: ConvGeometry, batch: int, t: int, h: int, w: int) -> int:
    """MACs of the original Conv3d for input [batch, C_in, t, h, w]."""
    return form_cost("dense", geometry, 1, 1, batch, t, h, w).macs
