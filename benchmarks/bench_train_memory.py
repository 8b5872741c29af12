"""Peak training memory of r3d_18 at 16×112×112: joint vs the alternating schedule's stages.

    python benchmarks/bench_train_memory.py [--batch 2] [--frames 16] [--size 112] [-s 2] [-r 2]
                                            [--optimizer sgd] [--steps 1] [--device auto|cpu|cuda]
                                            [--skip-finetune] [--json out.json]

Rows (seeded random weights; the converted model has the paper's default atoms, m_t = min(L, 3), m_s = 6):

- original r3d_18, joint, full clip (the usual fine-tuning);
- converted, joint, full clip (``--schedule joint``);
- converted, temporal stage: full clip length, frames downsampled by s (spatial atoms frozen);
- converted, spatial stage: full resolution, clip downsampled by r (temporal atoms frozen);
- the same with per-block activation checkpointing (``--checkpoint-activations``).

Measurement (DESIGN.md §3) with ``stjfd_convert.memory.measure_training_step``: bytes autograd saves for
backward (each storage once), split into activations and weights, plus parameters, buffers, gradients
and optimizer state; on CUDA also ``torch.cuda.max_memory_allocated`` of a plain step. Unless
``--skip-finetune``, the figure ``finetune`` itself records in metrics.jsonl for each stage is measured
too (one real training step per stage on random clips), as a cross-check of the in-loop accounting.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.memory import measure_training_step
from stjfd_convert.stages import stage_clip_shape

MIB = 2**20


class RandomClips(Dataset):
    """``n`` seeded random clips ``[3, T, H, W]`` with labels (stand-ins for decoded video)."""

    def __init__(self, n: int, frames: int, size: int, classes: int = 400) -> None:
        generator = torch.Generator().manual_seed(0)
        self.clips = torch.randn(n, 3, frames, size, size, generator=generator)
        self.labels = torch.randint(0, classes, (n,), generator=generator).tolist()
        self.classes = [str(i) for i in range(classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.clips[index], self.labels[index]


def stage_shape(full: tuple[int, ...], stage: str, s: int, r: int) -> tuple[int, ...]:
    if stage == "spatial":
        return (full[0], full[1], -(-full[2] // r), full[3], full[4])  # what downsample_clip feeds: ceil(T / r)
    return stage_clip_shape(full, stage, s, r)


def measure_rows(args: argparse.Namespace, device: str, original, converted) -> list[dict]:
    full = (args.batch, 3, args.frames, args.size, args.size)
    plan = [
        ("original", original, "joint", False),
        ("converted", converted, "joint", False),
        ("converted", converted, "temporal", False),
        ("converted", converted, "spatial", False),
        ("original", original, "joint", True),
        ("converted", converted, "temporal", True),
        ("converted", converted, "spatial", True),
    ]
    rows = []
    for name, model, stage, checkpointing in plan:
        shape = stage_shape(full, stage, args.s, args.r)
        tick = time.perf_counter()
        m = measure_training_step(
            model, shape, stage=stage, optimizer=args.optimizer, checkpointing=checkpointing, device=device,
            steps=args.steps,
        )
        row = {
            "model": name, "stage": stage, "checkpointing": checkpointing, "input_shape": list(shape),
            "total_mib": m.total_bytes / MIB, "activation_mib": m.saved_activation_bytes / MIB,
            "live_peak_mib": m.peak_live_bytes / MIB,
            "saved_weight_mib": m.saved_weight_bytes / MIB, "param_mib": m.param_bytes / MIB,
            "grad_mib": m.grad_bytes / MIB, "optimizer_mib": m.optimizer_bytes / MIB,
            "cuda_peak_mib": m.peak_cuda_bytes / MIB if m.peak_cuda_bytes is not None else None,
            "step_s": m.step_seconds_median, "trainable": m.trainable_params, "frozen": m.frozen_params,
            "device": device,
        }
        rows.append(row)
        print(f"  {name:9s} {stage:8s} ckpt={checkpointing!s:5s} {'×'.join(map(str, shape)):16s} "
              f"total {row['total_mib']:7.1f} MiB (activations {row['activation_mib']:6.1f})  "
              f"[{time.perf_counter() - tick:.0f} s]", flush=True)
    return rows


def meta_rows(args: argparse.Namespace, original, converted) -> list[dict]:
    """Byte counts at larger batches on the meta device (same tensor sizes as CPU, no arithmetic)."""
    rows = []
    for batch in args.meta_batches:
        full = (batch, 3, args.frames, args.size, args.size)
        for name, model, stage, checkpointing in (
            ("original", original, "joint", False), ("converted", converted, "joint", False),
            ("converted", converted, "temporal", False), ("converted", converted, "spatial", False),
            ("original", original, "joint", True), ("converted", converted, "temporal", True),
            ("converted", converted, "spatial", True),
        ):
            shape = stage_shape(full, stage, args.s, args.r)
            m = measure_training_step(model, shape, stage=stage, optimizer=args.optimizer,
                                      checkpointing=checkpointing, device="meta", steps=0)
            rows.append({"batch": batch, "model": name, "stage": stage, "checkpointing": checkpointing,
                         "input_shape": list(shape), "total_mib": m.total_bytes / MIB,
                         "live_peak_mib": m.peak_live_bytes / MIB, "activation_mib": m.saved_activation_bytes / MIB})
    return rows


def meta_markdown(rows: list[dict]) -> str:
    lines = ["| batch | model | stage | ckpt | input | total MiB | live peak MiB | activations MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['model']} | {r['stage']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{'×'.join(map(str, r['input_shape']))} | {r['total_mib']:.1f} | {r['live_peak_mib']:.1f} | "
                     f"{r['activation_mib']:.1f} |")
    return "\n".join(lines)


def finetune_rows(args: argparse.Namespace, device: str, converted) -> list[dict]:
    """What ``finetune`` records per stage: one optimizer step per stage on random clips."""
    import copy

    from stjfd_convert.finetune import FinetuneConfig, finetune

    data = RandomClips(args.batch, args.frames, args.size)
    rows = []
    for schedule in ("alternating", "joint"):
        config = FinetuneConfig(
            schedule=schedule, cycles=1, epochs_per_stage=1, batch_size=args.batch,
            spatial_downsample=args.s, temporal_downsample=args.r, optimizer=args.optimizer, weight_decay=0.0,
            bn_recal_batches=0, device=device, plot=False, lr=1e-4,
        )
        with tempfile.TemporaryDirectory() as scratch:
            result = finetune(copy.deepcopy(converted), data, None, config, run_dir=Path(scratch) / "run")
        for summary in result.stages[:2] if schedule == "alternating" else result.stages[:1]:
            rows.append({"stage": summary.stage, "input_shape": summary.input_shape,
                         "peak_mib": summary.peak_memory_bytes / MIB, "memory": summary.memory})
            print(f"  finetune  {summary.stage:8s} {'×'.join(map(str, summary.input_shape)):16s} "
                  f"recorded peak {summary.peak_memory_bytes / MIB:7.1f} MiB", flush=True)
    return rows


def markdown(rows: list[dict], loop: list[dict]) -> str:
    cuda = any(r["cuda_peak_mib"] is not None for r in rows)
    joint = next(r["total_mib"] for r in rows if r["model"] == "converted" and r["stage"] == "joint"
                 and not r["checkpointing"])
    head = ("| model | stage | ckpt | input | total MiB | live peak MiB | vs converted joint | activations MiB "
            "| saved weights MiB | params+grads+opt MiB |" + (" CUDA peak MiB |" if cuda else "") + " step s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fixed = r["param_mib"] + r["grad_mib"] + r["optimizer_mib"]
        lines.append(
            f"| {r['model']} | {r['stage']} | {'yes' if r['checkpointing'] else 'no'} | "
            f"{'×'.join(map(str, r['input_shape']))} | {r['total_mib']:.1f} | {r['live_peak_mib']:.1f} | "
            f"{r['total_mib'] / joint:.2f} | "
            f"{r['activation_mib']:.1f} | {r['saved_weight_mib']:.1f} | {fixed:.1f} |"
            + (f" {r['cuda_peak_mib']:.1f} |" if cuda else "") + f" {r['step_s']:.2f} |"
        )
    if loop:
        lines += ["", "| finetune stage (in-loop record) | input | recorded peak MiB |", "|---|---|---|"]
        lines += [f"| {r['stage']} | {'×'.join(map(str, r['input_shape']))} | {r['peak_mib']:.1f} |" for r in loop]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("-s", type=int, default=2, help="spatial downsampling of the temporal stage")
    parser.add_argument("-r", type=int, default=2, help="temporal downsampling of the spatial stage")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row (median)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--skip-finetune", action="store_true", help="skip the in-loop cross-check")
    parser.add_argument("--meta-batches", type=lambda t: [int(v) for v in t.split(",") if v], default=[8],
                        help="extra batch sizes counted on the meta device (comma list; empty: none)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    devices = ["cpu"] if args.device == "cpu" else (["cuda"] if args.device == "cuda" else ["cpu"])
    if args.device == "auto" and torch.cuda.is_available():
        devices.append("cuda")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, devices {devices}", flush=True)
    torch.manual_seed(0)
    original = torchvision.models.video.r3d_18()
    tick = time.perf_counter()
    converted, report = convert_model(original, ConvertConfig())
    print(f"converted r3d_18: {report.params_before:,} → {report.params_after:,} parameters "
          f"[{time.perf_counter() - tick:.0f} s]", flush=True)
    results = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "devices": {}}
    for device in devices:
        print(f"[{device}] batch {args.batch}, {args.frames}×{args.size}², s={args.s}, r={args.r}", flush=True)
        rows = measure_rows(args, device, original, converted)
        loop = [] if args.skip_finetune else finetune_rows(args, device, converted)
        print(markdown(rows, loop), flush=True)
        results["devices"][device] = {"rows": rows, "finetune": loop}
    if args.meta_batches:
        meta = meta_rows(args, original, converted)
        print(meta_markdown(meta), flush=True)
        results["meta"] = meta
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
