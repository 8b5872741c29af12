"""ONNX Runtime latency and file size: original r3d_18 vs its fused / factorized / auto exports.

    python benchmarks/bench_export.py [--atoms 3,6 2,4] [--runs 15] [--warmup 3] [--threads 2]
                                      [--shape 1,3,16,112,112] [--opset 17] [--plan-repeats 6]
                                      [--json out.json]

One seeded, randomly initialised torchvision r3d_18 is converted at each ``m_t,m_s`` pair (in memory)
and exported with ``export_onnx`` (each export validated against PyTorch on one clip) as ``fused``,
``factorized``, ``auto`` (the PyTorch cost model's plan) and ``auto (ORT-measured plan)``
(``measure=True``: ``plan_onnxruntime`` times every form of every layer in onnxruntime with the same
thread count, ``--plan-repeats`` rounds, and the export follows that plan). Then every
variant gets its own onnxruntime CPU session, a warm-up, and ``--runs`` timed runs taken round-robin
(one run of each variant in turn), so that load from others on a shared CPU hits all variants alike;
the figure is the median. Ratios are to the original (dense) model's export.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.export import export_onnx, ort_session
from stjfd_convert.parity import make_input, parse_shape

#: (label, export_onnx mode, measure)
MODES = (("fused", "fused", False), ("factorized", "factorized", False), ("auto", "auto", False),
         ("auto (ORT-measured plan)", "auto", True))


def parse_pair(text: str) -> tuple[int, int]:
    m_t, m_s = (int(v) for v in text.split(","))
    return m_t, m_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atoms", nargs="+", type=parse_pair, default=[(3, 6), (2, 4)], help="m_t,m_s pairs")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--shape", type=parse_shape, default=(1, 3, 16, 112, 112))
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--plan-repeats", type=int, default=6, help="plan_onnxruntime rounds for the measured auto")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    original = torchvision.models.video.r3d_18().eval()
    variants: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="stjfd-bench-export-") as scratch:
        folder = Path(scratch)
        start = time.perf_counter()
        result = export_onnx(original, folder / "original.onnx", input_shape=args.shape, opset=args.opset, clips=1, runs=0)
        variants.append({"name": "original", "atoms": None, "mode": "dense", "result": result})
        for m_t, m_s in args.atoms:
            converted, report = convert_model(original, ConvertConfig(spatial_atoms=m_s, temporal_atoms=m_t))
            for label, mode, measure in MODES:
                path = folder / f"r3d18-{m_t}x{m_s}-{mode}{'-measured' if measure else ''}.onnx"
                result = export_onnx(
                    converted, path, mode=mode, measure=measure, measure_repeats=args.plan_repeats,
                    threads=args.threads, input_shape=args.shape, opset=args.opset, clips=1, runs=0,
                )
                if measure:
                    print(f"({m_t},{m_s}) onnxruntime plan measured in {result.plan_seconds:.0f} s")
                variants.append(
                    {"name": f"({m_t},{m_s}) {label}", "atoms": [m_t, m_s], "mode": label, "result": result,
                     "report_ratio": report.ratio, "plan_seconds": result.plan_seconds if measure else None}
                )
        export_seconds = time.perf_counter() - start

        sessions = [ort_session(v["result"].path, args.threads) for v in variants]
        feed_name = sessions[0].get_inputs()[0].name
        feed = {feed_name: make_input(args.shape, torch.float32, seed=7).numpy()}
        for session in sessions:
            for _ in range(args.warmup):
                session.run(None, feed)
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(args.runs):
            for index, session in enumerate(sessions):
                begin = time.perf_counter()
                session.run(None, feed)
                times[index].append(time.perf_counter() - begin)

    base = variants[0]["result"].stats
    base_ms = statistics.median(times[0]) * 1e3
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}; onnxruntime CPU, {args.threads} threads; "
        f"torch {torch.__version__}; input {'×'.join(map(str, args.shape))} float32; "
        f"median of {args.runs} round-robin runs after {args.warmup} warm-up; exports took {export_seconds:.0f} s"
    )
    header = (f"{'variant':<34} {'file MB':>9} {'×orig':>7} {'params':>12} {'×orig':>7} {'ORT ms':>9} {'×orig':>7} "
              f"{'p25–p75 ms':>15}  forms")
    print(header)
    print("-" * len(header))
    rows = []
    for variant, samples in zip(variants, times):
        stats = variant["result"].stats
        ms = sorted(t * 1e3 for t in samples)
        median = statistics.median(ms)
        q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [median, median, median]
        counts = variant["result"].form_counts
        forms = ", ".join(f"{n} {f}" for f, n in sorted(counts.items())) or "dense"
        row = {
            "variant": variant["name"],
            "atoms": variant["atoms"],
            "mode": variant["mode"],
            "file_bytes": stats.file_bytes,
            "file_ratio": stats.file_bytes / base.file_bytes,
            "parameters": stats.parameters,
            "param_ratio": stats.parameters / base.parameters,
            "latency_ms": median,
            "latency_ratio": median / base_ms,
            "latency_p25_p75_ms": [q[0], q[2]],
            "latency_all_ms": ms,
            "forms": counts,
            "report_ratio": variant.get("report_ratio"),
            "plan_seconds": variant.get("plan_seconds"),
            "forms_per_layer": variant["result"].forms,
            "validation_max_abs": variant["result"].validation.max_abs if variant["result"].validation else None,
        }
        rows.append(row)
        print(
            f"{row['variant']:<34} {stats.file_bytes / 2**20:>9.2f} {row['file_ratio']:>7.3f} {stats.parameters:>12,} "
            f"{row['param_ratio']:>7.3f} {median:>9.1f} {row['latency_ratio']:>7.3f} {q[0]:>7.1f}–{q[2]:<7.1f}  {forms}"
        )
    print("convert-report parameter ratios: " + ", ".join(
        f"({v['atoms'][0]},{v['atoms'][1]}) {v['report_ratio']:.4f}" for v in variants if v["mode"] == "factorized"
    ))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "json"},
                                               "rows": rows}, indent=2, default=list) + "\n")


if __name__ == "__main__":
    main()
