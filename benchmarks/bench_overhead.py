"""Per-call overhead of a DecomposedConv3d in eval mode, against an nn.Conv3d with the same weight.

    python benchmarks/bench_overhead.py [--calls 200] [--rounds 41] [--shape 1,4,2,4,4] [--threads 1]
                                        [--device cpu|cuda] [--json out.json]

The input is tiny, so the convolution itself costs a few µs and what is left is the Python work around
it: plan lookup, derived-weight cache checks, mode dispatch. Every variant runs ``--calls`` calls per
round (eval mode, ``torch.no_grad``), variants interleaved within each round in a rotating order, so
machine noise hits them alike. Figures are µs per call: the median over rounds, the spread of the
per-round figures (p25–p75) and, per variant, the median of its paired per-round difference to
``nn.Conv3d``. The ``nn.Conv3d (A/A)`` row times the same conv twice: its difference is the noise floor.
On CUDA the clock stops after a synchronize at the end of each round, so tiny kernels measure launch
(host) time, which is where per-call overhead shows on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stjfd_convert import DecomposedConv3d
from stjfd_convert.layers import plan_key


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def variants_for(shape: tuple[int, ...], device: str) -> tuple[dict[str, Callable[[], object]], torch.Tensor, dict]:
    """The callables to time, the input, and what the auto layers resolved to."""
    torch.manual_seed(0)
    channels = shape[1]
    source = nn.Conv3d(channels, channels, 3, padding=1)
    fused = DecomposedConv3d.from_conv(source, mode="fused").to(device).eval()
    conv = fused.to_conv3d().eval()  # the same (reconstructed) weight as the decomposed layer
    x = torch.randn(shape, device=device)
    planned = DecomposedConv3d.from_conv(source, mode="auto").to(device).eval()
    planned.plan[plan_key(x)] = "fused"
    costed = DecomposedConv3d.from_conv(source, mode="auto").to(device).eval()
    weight, bias = conv.weight, conv.bias
    variants: dict[str, Callable[[], object]] = {
        "nn.Conv3d": lambda: conv(x),
        "nn.Conv3d (A/A)": lambda: conv(x),
        "F.conv3d (no module)": lambda: F.conv3d(x, weight, bias, 1, 1),
        "DecomposedConv3d fused": lambda: fused(x),
        "DecomposedConv3d auto (plan: fused)": lambda: planned(x),
        "DecomposedConv3d auto (cost model)": lambda: costed(x),
    }
    with torch.no_grad():  # same weight values, same kernels (TF32 on CUDA is why the tolerance is loose)
        assert torch.allclose(fused(x), conv(x), atol=1e-5 if device == "cpu" else 1e-3)
    resolved = {"auto (plan)": planned.form_for(x), "auto (cost model)": costed.form_for(x)}
    return variants, x, resolved


def measure(variants: dict[str, Callable[[], object]], calls: int, rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of every variant, one figure per round (rounds interleave the variants)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    names = list(variants)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for fn in variants.values():  # warm-up: caches filled, kernels chosen
            for _ in range(calls):
                fn()
        sync()
        for index in range(rounds):
            shift = index % len(names)  # rotate the order so no variant always runs first
            for name in names[shift:] + names[:shift]:
                fn = variants[name]
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                sync()
                per_round[name].append((time.perf_counter() - start) / calls)
    return per_round


def summarise(per_round: dict[str, list[float]], baseline: str = "nn.Conv3d") -> dict[str, dict[str, float]]:
    base = per_round[baseline]
    summary = {}
    for name, values in per_round.items():
        paired = [v - b for v, b in zip(values, base)]
        summary[name] = {
            "median_us": statistics.median(values) * 1e6,
            "p25_us": _quantile(values, 0.25) * 1e6,
            "p75_us": _quantile(values, 0.75) * 1e6,
            "minus_conv_median_us": statistics.median(paired) * 1e6,
            "minus_conv_p25_us": _quantile(paired, 0.25) * 1e6,
            "minus_conv_p75_us": _quantile(paired, 0.75) * 1e6,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per variant per round")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--shape", default="1,4,2,4,4", help="input B,C,T,H,W (a 3x3x3 conv, C→C, padding 1)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: least scheduling noise)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    variants, _, resolved = variants_for(shape, args.device)
    gpu = f" gpu={torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"machine: {platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}{gpu}; input {shape}, {args.calls} calls x {args.rounds} interleaved rounds, "
          f"eval + no_grad; auto resolves to {resolved}")
    per_round = measure(variants, args.calls, args.rounds, args.device)
    summary = summarise(per_round)
    print("\n| variant | µs/call median | p25–p75 | minus nn.Conv3d, paired median | p25–p75 |")
    print("|---|---:|---:|---:|---:|")
    for name, row in summary.items():
        print(f"| {name} | {row['median_us']:.2f} | {row['p25_us']:.2f}–{row['p75_us']:.2f} | "
              f"{row['minus_conv_median_us']:+.2f} | {row['minus_conv_p25_us']:+.2f}–{row['minus_conv_p75_us']:+.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": shape, "device": args.device, "calls": args.calls, "rounds": args.rounds,
                       "resolved": resolved, "summary": summary}, handle, indent=2)


if __name__ == "__main__":
    main()
