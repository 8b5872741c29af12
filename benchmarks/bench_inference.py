"""Inference speed of a converted r3d_18 in every execution form, side by side with the original.

    python benchmarks/bench_inference.py [--batches 1,8] [--atoms 3x6,2x4] [--runs 10] [--json out.json]
                                         [--device cpu|cuda] [--dtype float32|bfloat16] [--forms ...]
    python benchmarks/bench_inference.py --calibrate [--device cuda]   # refit the cost model's figures

All variants live in one process and are timed round-robin (one run of each per round, after a
warm-up round) so machine noise hits them alike; figures are medians, printed as ratios to the
original model. ``original (A/A)`` is the original timed a second time: its ratio is the noise figure.
``auto (cost model)`` uses the built-in cost model; ``auto (measured plan)`` first runs
``planner.plan_model(measure=True)`` for the same input (what ``stjfd plan`` stores). On CUDA every run
ends in a synchronize and cuDNN autotuning is on.
"""

from __future__ import annotations

import argparse
import copy
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


def time_round_robin(variants: dict[str, Callable[[], object]], runs: int, device: str = "cpu") -> dict[str, float]:
    """Median seconds per variant over ``runs`` interleaved rounds (after one warm-up round)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()
        sync()
        for _ in range(runs):
            for name, fn in variants.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench(batch: int, atoms: tuple[int, int], runs: int, forms: list[str], device: str = "cpu",
          dtype: torch.dtype = torch.float32, repeats: int = 3) -> dict[str, object]:
    torch.manual_seed(0)
    original = torchvision.models.video.r3d_18().eval()
    converted, _ = convert_model(original, ConvertConfig(temporal_atoms=atoms[0], spatial_atoms=atoms[1]))
    shape = (batch, 3, 16, 112, 112)
    x = torch.randn(shape, device=device, dtype=dtype)
    models = {"original": original}
    for form in forms:
        models[form] = set_mode(copy.deepcopy(converted), form)
    models["auto (cost model)"] = set_mode(copy.deepcopy(converted), "auto")
    measured = copy.deepcopy(converted)
    plan = plan_model(measured, shape, measure=True, repeats=repeats, device=device, dtype=dtype)
    models["auto (measured plan)"] = apply_plan(measured, plan)
    models = {name: m.to(device=device, dtype=dtype) for name, m in models.items()}
    variants = {name: (lambda m=m: m(x)) for name, m in models.items()}
    variants["original (A/A)"] = lambda: models["original"](x)
    times: dict[str, object] = dict(time_round_robin(variants, runs, device))
    chosen: dict[str, int] = {}
    for choice in plan.layers:
        chosen[choice.form] = chosen.get(choice.form, 0) + 1
    cost_forms: dict[str, int] = {}
    probe = models["auto (cost model)"]
    seen: dict[str, str] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module, args) -> None:  # must return None: a value would replace the layer's input
            seen.setdefault(name, module.form_for(args[0]))

        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in probe.named_modules() if hasattr(m, "form_for")]
    with torch.no_grad():
        probe(x)
    for hook in hooks:
        hook.remove()
    for form in seen.values():
        cost_forms[form] = cost_forms.get(form, 0) + 1
    times["_measured_plan_forms"] = chosen
    times["_cost_model_forms"] = cost_forms
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--atoms", default="3x6,2x4")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per form when planning")
    parser.add_argument("--forms", default=",".join(FORMS), help="forms to time besides auto ('' for none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--calibrate", action="store_true", help="fit the device's cost-model figures instead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    gpu = f" gpu={torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    print(f"machine: {platform.machine()} threads={torch.get_num_threads()} torch={torch.__version__}{gpu} "
          f"{args.dtype}; r3d_18 input 16x112x112, medians of {args.runs} interleaved runs")

    if args.calibrate:
        torch.manual_seed(0)
        original = torchvision.models.video.r3d_18().eval()
        layers = []
        for batch in (int(b) for b in args.batches.split(",")):
            for atoms in _parse_atoms(args.atoms):
                converted, _ = convert_model(original, ConvertConfig(temporal_atoms=atoms[0], spatial_atoms=atoms[1]))
                layers += plan_model(converted, (batch, 3, 16, 112, 112), measure=True, repeats=args.repeats,
                                     device=args.device, dtype=dtype).layers
        kind = torch.device(args.device).type
        costs = fit_device_costs(ExecutionPlan((1, 3, 16, 112, 112), kind, args.dtype, True, layers))
        print(f"fitted {kind} costs: {costs}")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"device": kind, "dtype": args.dtype, "costs": costs.__dict__,
                           "layers": [layer.__dict__ for layer in layers]}, handle, indent=2, default=str)
        return

    results = {}
    forms = [f for f in args.forms.split(",") if f]
    for atoms in _parse_atoms(args.atoms):
        for batch in (int(b) for b in args.batches.split(",")):
            times = bench(batch, atoms, args.runs, forms, args.device, dtype, args.repeats)
            plan_forms = times.pop("_measured_plan_forms")
            cost_forms = times.pop("_cost_model_forms")
            base = times["original"]
            print(f"\natoms {atoms[0]}x{atoms[1]}, batch {batch} (measured plan uses: {plan_forms}; "
                  f"cost model uses: {cost_forms})")
            for name, seconds in times.items():
                print(f"  {name:<22} {seconds * 1000:9.2f} ms   {seconds / base:5.2f}x original")
            results[f"{atoms[0]}x{atoms[1]}/b{batch}"] = {
                "seconds": times, "ratios": {name: seconds / base for name, seconds in times.items()},
                "plan_forms": plan_forms, "cost_model_forms": cost_forms,
            }
            if args.json:  # after every row, so a run cut short keeps what it measured
                with open(args.json, "w") as handle:
                    json.dump({"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                               "runs": args.runs, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
