"""Memory report of torchvision r3d_18 (seeded random weights, atoms m_s=6): parameters, MACs,
inference and training memory per schedule at 16×112×112, and what fits in an 8 GiB budget.

    python benchmarks/bench_report.py [--batch 8] [--frames 16] [--size 112] [--steps 2]
                                      [--budget 8GiB] [--device auto|cpu|cuda] [--json out.json]

CPU training figures are saved-tensor bytes + params + grads + optimizer state; on CUDA the table
adds torch.cuda.max_memory_allocated. What-fits searches run on the meta device (exact tensor sizes,
no arithmetic) on CPU machines and on the GPU itself on CUDA machines. Shrink with --batch/--steps
(batch 8 and 2 timed steps take ~6 min on 2 busy CPU cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torchvision

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.report import markdown, memory_report

MIB = 2**20


def run(device: str, args: argparse.Namespace, original: torch.nn.Module, converted: torch.nn.Module) -> dict:
    start = time.perf_counter()
    report = memory_report(
        converted, (args.batch, 3, args.frames, args.size, args.size), original=original, source="r3d_18 (seeded)",
        device=device, steps=args.steps, memory_budget=args.budget, frame_size=args.size,
        optimizer=args.optimizer, progress=lambda text: print(f"  … {text}", flush=True),
    )
    print(markdown(report))
    print(f"[{device}] report took {time.perf_counter() - start:.0f} s")
    return report.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--budget", default="8GiB")
    parser.add_argument("--atoms", type=int, default=6)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--mode", default=None, help="execution mode of the decomposed layers (default: converter's)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    original = torchvision.models.video.r3d_18().eval()
    config = ConvertConfig(spatial_atoms=args.atoms, **({"mode": args.mode} if args.mode else {}))
    converted, _ = convert_model(original, config)
    print(f"machine: {platform.machine()} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"cuda={torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else (
        ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    )
    results = {device: run(device, args, original, converted) for device in devices}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
