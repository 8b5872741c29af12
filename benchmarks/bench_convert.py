"""Decomposition speed and error: stjfd's Gram-matrix HOOI vs tensorly's partial_tucker on r3d_18.

    python benchmarks/bench_convert.py [--atoms 6] [--temporal-atoms 3] [--repeats 3] [--json out.json]

Both run on the same seeded, randomly initialised torchvision r3d_18 in one process; timings are
the median of ``--repeats`` whole-model conversions (tensorly: one run, it is slow).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torchvision

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model


def timed_convert(model: torch.nn.Module, config: ConvertConfig, repeats: int) -> tuple[float, list, object]:
    times = []
    report = None
    for _ in range(repeats):
        start = time.perf_counter()
        _, report = convert_model(model, config)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", type=int, default=6)
    parser.add_argument("--temporal-atoms", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tensorly-repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18().eval()
    convert_model(model, ConvertConfig(spatial_atoms=args.atoms))  # warm-up (LAPACK/BLAS init)

    ours_cfg = ConvertConfig(spatial_atoms=args.atoms, temporal_atoms=args.temporal_atoms)
    ref_cfg = ConvertConfig(spatial_atoms=args.atoms, temporal_atoms=args.temporal_atoms, method="tensorly")
    ours_s, ours_all, ours = timed_convert(model, ours_cfg, args.repeats)
    ref_s, ref_all, ref = timed_convert(model, ref_cfg, args.tensorly_repeats)

    print(f"machine: {platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    print(f"r3d_18, atoms m_s={args.atoms}, m_t={args.temporal_atoms or 'min(L,3)'}")
    print(f"{'layer':<22} {'kernel':>8} {'ranks':>6} {'err stjfd':>11} {'err tensorly':>13} {'diff':>10}")
    worst = -1.0
    for a, b in zip(ours.layers, ref.layers):
        if a.skipped:
            continue
        diff = a.rel_error - b.rel_error
        worst = max(worst, diff)
        kernel = "x".join(map(str, a.kernel_size))
        print(f"{a.name:<22} {kernel:>8} {a.temporal_atoms}x{a.spatial_atoms:<4} {a.rel_error:11.6f} "
              f"{b.rel_error:13.6f} {diff:10.2e}")
    print(f"whole model, stjfd hooi:        {ours_s:.3f} s (median of {len(ours_all)}: "
          f"{', '.join(f'{t:.3f}' for t in ours_all)})")
    print(f"whole model, tensorly partial_tucker: {ref_s:.3f} s")
    print(f"speed-up tensorly/stjfd: {ref_s / ours_s:.1f}x; worst error difference (stjfd - tensorly): {worst:.2e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "stjfd_seconds": ours_s,
                    "tensorly_seconds": ref_s,
                    "ratio": ref_s / ours_s,
                    "worst_error_diff": worst,
                    "threads": torch.get_num_threads(),
                },
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
