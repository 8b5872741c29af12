"""Clip loading throughput of stjfd's data pipeline (PyAV decoding, clip sampling, crop, normalise).

    python benchmarks/bench_data.py [--videos 64] [--frames 64] [--width 320] [--height 240]
        [--clip-len 16] [--size 112] [--workers 0 2] [--batch-size 8] [--epochs 3] [--json out.json]

Writes ``--videos`` synthetic videos (moving squares over noise; libx264 at crf 23 with the encoder's
default keyframe interval unless ``--gop-size``, or the fallback encoder of tests/videos.py) into a temporary folder, builds the
training dataset (random temporal offset + random crop + flip, r3d_18 normalisation) and times whole
epochs of ``make_loader(..., shuffle=True)`` per worker count. The first epoch includes worker start-up;
clips/s is the median over the later epochs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from videos import encoder_for, moving_shape_frames, write_video  # noqa: E402

from stjfd_convert.data import build_datasets, make_loader  # noqa: E402


def make_videos(root: Path, count: int, frames: int, height: int, width: int, ext: str, gop_size: int | None) -> float:
    start = time.perf_counter()
    codec, _ = encoder_for(ext)
    options = {"crf": "23", "preset": "veryfast"} if codec == "libx264" else None
    for i in range(count):
        label = i % 3
        write_video(
            root / f"class_{label}" / f"video_{i}{ext}",
            moving_shape_frames(label, frames, height, width, seed=i),
            options=options,
            gop_size=gop_size,
        )
    return time.perf_counter() - start


def time_loader(dataset, batch_size: int, workers: int, epochs: int) -> dict:
    loader = make_loader(dataset, batch_size, shuffle=True, workers=workers, seed=0)
    epoch_seconds, clips = [], 0
    for _ in range(epochs):
        start = time.perf_counter()
        clips = 0
        for batch, _ in loader:
            clips += batch.shape[0]
        epoch_seconds.append(time.perf_counter() - start)
    steady = epoch_seconds[1:] or epoch_seconds
    return {
        "workers": workers,
        "clips_per_epoch": clips,
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "clips_per_s": round(clips / statistics.median(steady), 1),
        "first_epoch_clips_per_s": round(clips / epoch_seconds[0], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--ext", default=".mp4")
    parser.add_argument("--gop-size", type=int, default=None, help="keyframe interval (default: the encoder's)")
    parser.add_argument("--clip-len", type=int, default=16)
    parser.add_argument("--frame-stride", type=int, default=1)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="stjfd-bench-data-") as tmp:
        root = Path(tmp)
        write_s = make_videos(root, args.videos, args.frames, args.height, args.width, args.ext, args.gop_size)
        start = time.perf_counter()
        train, _, _ = build_datasets(
            root, clip_len=args.clip_len, size=args.size, frame_stride=args.frame_stride, arch="r3d_18", seed=0
        )
        probe_s = time.perf_counter() - start
        results = {
            "setup": {
                "videos": args.videos,
                "frames": args.frames,
                "resolution": f"{args.width}x{args.height}",
                "encoder": encoder_for(args.ext)[0],
                "gop_size": args.gop_size,
                "clip_len": args.clip_len,
                "frame_stride": args.frame_stride,
                "size": args.size,
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "torch_threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
            "write_videos_s": round(write_s, 2),
            "index_and_probe_s": round(probe_s, 3),
            "loaders": [time_loader(train, args.batch_size, w, args.epochs) for w in args.workers],
        }
    print(f"{args.videos} videos {args.width}x{args.height}x{args.frames} ({results['setup']['encoder']}), "
          f"clip {args.clip_len}x{args.size}², batch {args.batch_size}; probe {results['index_and_probe_s']} s")
    for row in results["loaders"]:
        print(f"workers={row['workers']}: {row['clips_per_s']} clips/s "
              f"(first epoch {row['first_epoch_clips_per_s']} clips/s; epochs {row['epoch_seconds']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
