"""Inference speed of a converted r3d_18 in every execution form, side by side with the original.

    python benchmarks/bench_inference.py [--batches 1,8] [--atoms 3x6,2x4] [--runs 10] [--json out.json]
    python benchmarks/bench_inference.py --calibrate      # refit the CPU cost model from measurements

All variants live in one process and are timed round-robin (one run of each per round, after a
warm-up round) so machine noise hits them alike; figures are medians, printed as ratios to the
original model. ``auto (cost model)`` uses the built-in cost model; ``auto (measured plan)`` first
runs ``planner.plan_model(measure=True)`` for the same input (what ``stjfd plan`` stores).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision

from stjfd_convert import ConvertConfig, convert_model, set_mode
from stjfd_convert.functional.cost import FORMS
from stjfd_convert.planner import ExecutionPlan, apply_plan, fit_device_costs, plan_model


def _parse_atoms(text: str) -> list[tuple[int, int]]:
    pairs = []
    for part in text.split(","):
        m_t, m_s = part.lower().split("x")
        pairs.append((int(m_t), int(m_s)))
    return pairs


def time_round_robin(variants: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median seconds per variant over ``runs`` interleaved rounds (after one warm-up round)."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()
        for _ in range(runs):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench(batch: int, atoms: tuple[int, int], runs: int, forms: list[str]) -> dict[str, float]:
    torch.manual_seed(0)
    original = torchvision.models.video.r3d_18().eval()
    converted, _ = convert_model(original, ConvertConfig(temporal_atoms=atoms[0], spatial_atoms=atoms[1]))
    shape = (batch, 3, 16, 112, 112)
    x = torch.randn(shape)
    models = {"original": original}
    for form in forms:
        models[form] = set_mode(convert_model(original, ConvertConfig(
            temporal_atoms=atoms[0], spatial_atoms=atoms[1], mode=form))[0], form)
    models["auto (cost model)"] = set_mode(converted, "auto")
    measured, _ = convert_model(original, ConvertConfig(temporal_atoms=atoms[0], spatial_atoms=atoms[1]))
    plan = plan_model(measured, shape, measure=True, repeats=3)
    models["auto (measured plan)"] = apply_plan(measured, plan)
    variants = {name: (lambda m=m: m(x)) for name, m in models.items()}
    times = time_round_robin(variants, runs)
    chosen = {}
    for choice in plan.layers:
        chosen[choice.form] = chosen.get(choice.form, 0) + 1
    times["_measured_plan_forms"] = chosen  # type: ignore[assignment]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--atoms", default="3x6,2x4")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--forms", default=",".join(FORMS), help="forms to time besides auto")
    parser.add_argument("--calibrate", action="store_true", help="fit the CPU cost model instead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} threads={torch.get_num_threads()} torch={torch.__version__}; "
          f"r3d_18 input 16x112x112, medians of {args.runs} interleaved runs")

    if args.calibrate:
        torch.manual_seed(0)
        original = torchvision.models.video.r3d_18().eval()
        layers = []
        for atoms in _parse_atoms(args.atoms):
            converted, _ = convert_model(original, ConvertConfig(temporal_atoms=atoms[0], spatial_atoms=atoms[1]))
            layers += plan_model(converted, (1, 3, 16, 112, 112), measure=True, repeats=3).layers
        costs = fit_device_costs(ExecutionPlan((1, 3, 16, 112, 112), "cpu", "float32", True, layers))
        print(f"fitted CPU costs: {costs}")
        return

    results = {}
    for atoms in _parse_atoms(args.atoms):
        for batch in (int(b) for b in args.batches.split(",")):
            times = bench(batch, atoms, args.runs, args.forms.split(","))
            forms = times.pop("_measured_plan_forms")
            base = times["original"]
            print(f"\natoms {atoms[0]}x{atoms[1]}, batch {batch} (measured plan uses: {forms})")
            for name, seconds in times.items():
                print(f"  {name:<22} {seconds * 1000:9.1f} ms   {seconds / base:5.2f}x original")
            results[f"{atoms[0]}x{atoms[1]}/b{batch}"] = {"seconds": times, "plan_forms": forms}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
