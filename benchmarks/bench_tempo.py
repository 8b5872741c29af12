"""Tempo robustness by atom swapping (issue 14): does a model trained at normal speed read slowed video
once its temporal atoms are dilated ×2 or resized to 2L − 1 taps?

    python benchmarks/bench_tempo.py [--train-per-class 40] [--val-per-class 20] [--epochs 6]
        [--recover-epochs 2] [--finetune-epochs 1] [--seed 0] [--threads 2] [--json out.json] [--keep DIR]

The task: 6 classes, {left, right} × {1, 2, 4} px per frame: a bright square (random size, row, start
and colour) crossing a dim noisy background and wrapping around the frame edge, written as PyAV videos of
32 frames at 32×32 with tests/videos.py (the toy clips of ``stjfd_convert.sample``, with speed). The class
depends on speed *and* direction, so tempo matters: played at half speed, 4 px/frame looks like 2 and 2
like 1.

Every step is a stjfd library call:

1. train the sample architecture (``stjfd_convert.sample:build_sample_net``, plain Conv3d) from scratch
   at speed 1 with ``finetune`` (schedule ``joint``, 16-frame centre clips decoded once); convert it
   (default atoms m_t = 3, m_s = 6), recover the conversion's loss with the alternating schedule at
   speed 1 (``--recover-epochs`` per stage, as a user would before shipping) and save the converted
   folder; ``swap_folder`` writes the swapped ones from it;
2. evaluate the validation videos at playback speed 1 and 0.5 (``evaluate_folder(..., playback_speed=)``
   for every saved folder). At 0.5 with the model's 16-frame clip, a clip shows half of the motion a
   speed-1 clip shows (so the 8-frame row at speed 1 is the ceiling there); with 32 frames it shows the
   same motion in twice the frames — tempo alone changed;
3. the converted model with temporal atoms dilated ×2, resized to 2L − 1 = 5 taps (normalisation
   ``sum``, the default, and ``energy``; and the same 5-tap atoms at two other gains, to show why the
   default is what it is), and the plain model with its dense kernels dilated ×2 (no atoms needed);
4. the unswapped, dilated and resized models after one short fine-tune on the training videos at 0.5
   (16-frame clips): one cycle of the alternating schedule — a temporal stage (Φ frozen), then a
   spatial stage (Ψ frozen), ``--finetune-epochs`` each — at full clip size, because the stages' frame
   or clip downsampling would change the very speeds the classes are made of.

Every accuracy is top-1 on the same validation videos; seeds are fixed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from videos import write_video  # noqa: E402

from stjfd_convert.config import ConvertConfig, SwapConfig  # noqa: E402
from stjfd_convert.convert import convert_model  # noqa: E402
from stjfd_convert.data import ClipConfig, ClipDataset, find_sources  # noqa: E402
from stjfd_convert.finetune import FinetuneConfig, evaluate, evaluate_folder, finetune  # noqa: E402
from stjfd_convert.models import ArchSpec  # noqa: E402
from stjfd_convert.sample import COLOUR_MIN, NOISE_MAX, SAMPLE_MODEL_NAME, build_sample_net  # noqa: E402
from stjfd_convert.saved_model import load_converted, save_converted  # noqa: E402
from stjfd_convert.swap import swap_folder  # noqa: E402

SPEEDS = (1, 2, 4)  # pixels per frame
DIRECTIONS = ("left", "right")
CLASSES = [f"{direction}_{speed}px" for direction in DIRECTIONS for speed in SPEEDS]
FRAMES, SIZE, CLIP_LEN = 32, 32, 16
# (playback speed, clip length) of every evaluation.
SETTINGS = {"speed 1": (1.0, CLIP_LEN), "speed 1, 8 frames": (1.0, CLIP_LEN // 2),
            "speed 0.5": (0.5, CLIP_LEN), "speed 0.5, 32 frames": (0.5, 2 * CLIP_LEN)}
SLOW = ("speed 0.5", "speed 0.5, 32 frames")


# --------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------


def moving_square_frames(speed: int, direction: str, seed: int, frames: int = FRAMES, size: int = SIZE) -> np.ndarray:
    """``uint8 [frames, size, size, 3]``: a bright square crossing a dim noisy background ``speed`` px per
    frame to the left or right, wrapping around the frame edge."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, NOISE_MAX, size=(frames, size, size, 3), dtype=np.uint8)
    side = int(rng.integers(size // 5, size // 3 + 1))
    top, start = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size))
    colour = rng.integers(COLOUR_MIN, 256, size=3, dtype=np.uint8)
    sign = 1 if direction == "right" else -1
    for t in range(frames):
        columns = (start + sign * speed * t + np.arange(side)) % size
        out[t, top : top + side][:, columns] = colour
    return out


def write_split(root: Path, per_class: int, seed: int) -> None:
    for c, name in enumerate(CLASSES):
        direction, speed = name.split("_")
        for i in range(per_class):
            clip_seed = int(np.random.SeedSequence([seed, c, i]).generate_state(1)[0])
            write_video(root / name / f"video_{i}.mp4", moving_square_frames(int(speed[:-2]), direction, clip_seed))


class DecodedClips(Dataset):
    """The centre clips of a split, decoded once by stjfd's pipeline (``ClipDataset``) and held in memory."""

    def __init__(self, split: Path, speed: float = 1.0, clip_len: int = CLIP_LEN) -> None:
        sources, classes, _ = find_sources(split, CLASSES)
        source = ClipDataset(sources, classes, ClipConfig(clip_len=clip_len, size=SIZE, playback_speed=speed))
        self.items = [source[i] for i in range(len(source))]
        self.classes, self.config = source.classes, source.config

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.items[index]


# --------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------


def dilate_dense(model: nn.Module, factor: int) -> nn.Module:
    """A copy of a plain model with every Conv3d's temporal dilation × ``factor`` (padding grown to match)."""
    out = copy.deepcopy(model)
    for conv in out.modules():
        if isinstance(conv, nn.Conv3d) and conv.kernel_size[0] > 1:
            growth = conv.dilation[0] * (factor - 1) * (conv.kernel_size[0] - 1)
            conv.dilation = (conv.dilation[0] * factor, *conv.dilation[1:])
            conv.padding = (conv.padding[0] + growth // 2, *conv.padding[1:])
    return out


def scaled_atoms(folder: Path, factor: float) -> nn.Module:
    """The model of ``folder`` with every temporal atom multiplied by ``factor``."""
    model = load_converted(folder).model
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("temporal_atoms"):
                parameter.mul_(factor)
    return model


def train_convert_swap(root: Path, args: argparse.Namespace) -> tuple[nn.Module, dict[str, Path], dict[str, Any]]:
    """Train the plain model at speed 1 (joint schedule), convert, save, and write the swapped folders."""
    plain = build_sample_net(num_classes=len(CLASSES))
    config = FinetuneConfig(
        schedule="joint", cycles=1, epochs_per_stage=max(1, args.epochs // 2), batch_size=16, lr=args.lr,
        device="cpu", seed=args.seed, measure_memory=False, plot=False, log_every=1000,
    )
    train = DecodedClips(root / "train")
    trained = finetune(plain, train, DecodedClips(root / "val"), config)
    spec = ArchSpec("callable", SAMPLE_MODEL_NAME, {"num_classes": len(CLASSES)})
    converted, report = convert_model(plain.eval(), ConvertConfig())
    models = root / "models"
    folders = {"converted_raw": models / "converted-raw", "converted": models / "converted"}
    save_converted(converted, folders["converted_raw"], spec, input_shape=(1, 3, CLIP_LEN, SIZE, SIZE), overwrite=True)
    # The usual stjfd workflow: convert, then recover with the alternating schedule (at speed 1).
    short_finetune(converted, train, args.recover_epochs, args.finetune_lr, args.seed)
    save_converted(converted, folders["converted"], spec, input_shape=(1, 3, CLIP_LEN, SIZE, SIZE), overwrite=True)
    swaps = {
        "dilated": SwapConfig(temporal_dilation=2),
        "resized": SwapConfig(temporal_size=5),
        "resized_energy": SwapConfig(temporal_size=5, normalization="energy"),
    }
    for key, swap in swaps.items():
        folders[key] = swap_folder(folders["converted"], models / key, swap, force=True).output
    info = {"epochs": config.total_epochs, "lr": args.lr, "final_val_top1": trained.stages[-1].val_top1,
            "conversion_ratio": report.ratio, "recover_epochs_per_stage": args.recover_epochs}
    return plain, folders, info


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------

Record = Callable[[str, str, float, nn.Module], None]


def evaluate_all(root: Path, plain: nn.Module, folders: dict[str, Path], record: Record) -> None:
    """Every model without fine-tuning; saved folders through ``evaluate_folder(..., playback_speed=)``."""
    val = root / "val"
    clips = {name: DecodedClips(val, *setting) for name, setting in SETTINGS.items()}
    for name in SETTINGS:
        record("plain (trained at speed 1)", name, evaluate(plain, clips[name], device="cpu").top1, plain)
    dense = dilate_dense(plain, 2)
    for name in SLOW:
        record("plain, dense kernels dilated ×2", name, evaluate(dense, clips[name], device="cpu").top1, dense)
    labels = {"converted_raw": "converted, not fine-tuned", "converted": "converted + recovered at speed 1",
              "dilated": "converted, Ψ dilated ×2",
              "resized": "converted, Ψ resized to 2L−1 = 5 taps (sum)",
              "resized_energy": "converted, Ψ resized to 5 taps (energy)"}
    for key, label in labels.items():
        model = load_converted(folders[key]).model
        for name in SETTINGS if key.startswith("converted") else SLOW:
            speed, clip_len = SETTINGS[name]
            result, _ = evaluate_folder(folders[key], val, playback_speed=speed, clip_len=clip_len, device="cpu")
            assert result.playback_speed == speed
            record(label, name, result.top1, model)
    for gain, label in ((0.5, "× (L−1)/(n−1) = ½"), (1.0, "× 1, not normalised")):
        model = scaled_atoms(folders["resized"], gain / (3 / 5))
        for name in SLOW:
            top1 = evaluate(model, clips[name], device="cpu").top1
            record(f"converted, Ψ resized to 5 taps {label}", name, top1, model)


def short_finetune(model: nn.Module, train: Dataset, epochs: int, lr: float, seed: int) -> nn.Module:
    """One alternating cycle (temporal stage, then spatial stage) at full clip size."""
    config = FinetuneConfig(
        schedule="alternating", cycles=1, epochs_per_stage=epochs, spatial_downsample=1, temporal_downsample=1,
        batch_size=16, lr=lr, device="cpu", seed=seed, measure_memory=False, plot=False, bn_recal_batches=0,
        log_every=1000,
    )
    finetune(model, train, None, config)
    return model


def finetune_all(root: Path, folders: dict[str, Path], args: argparse.Namespace, record: Record) -> None:
    """The unswapped, dilated and resized models after one short fine-tune at playback speed 0.5."""
    train = DecodedClips(root / "train", 0.5)
    clips = {name: DecodedClips(root / "val", *SETTINGS[name]) for name in SLOW}
    labels = {"converted_raw": "converted, not fine-tuned", "converted": "converted + recovered at speed 1",
              "dilated": "converted, Ψ dilated ×2", "resized": "converted, Ψ resized to 5 taps"}
    for key, label in labels.items():
        model = short_finetune(load_converted(folders[key]).model, train, args.finetune_epochs, args.finetune_lr,
                               args.seed)
        for name in SLOW:
            record(f"{label} + short fine-tune at 0.5", name, evaluate(model, clips[name], device="cpu").top1, model)


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    timings: dict[str, float] = {}
    rows: list[dict[str, Any]] = []

    def record(label: str, setting: str, top1: float, model: nn.Module) -> None:
        speed, clip_len = SETTINGS[setting]
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": label, "playback_speed": speed, "clip_len": clip_len, "top1": top1, "parameters": params})
        print(f"| {label} | {speed:g} | {clip_len} | {top1:.1%} | {params:,} |", flush=True)

    def timed(name: str, job: Callable[..., Any], *job_args: Any) -> Any:
        mark = time.perf_counter()
        value = job(*job_args)
        timings[name] = round(time.perf_counter() - mark, 1)
        return value

    timed("videos", lambda: (write_split(root / "train", args.train_per_class, 2 * args.seed),
                             write_split(root / "val", args.val_per_class, 2 * args.seed + 1)))
    plain, folders, training = timed("train_convert_swap", train_convert_swap, root, args)
    print("| model | playback speed | clip frames | top-1 | parameters |\n|---|---:|---:|---:|---:|", flush=True)
    timed("evaluate", evaluate_all, root, plain, folders, record)
    timed("finetune", finetune_all, root, folders, args, record)
    timings["total"] = round(sum(timings.values()), 1)
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in timings.items()), flush=True)
    return {
        "classes": CLASSES,
        "train_videos": args.train_per_class * len(CLASSES),
        "val_videos": args.val_per_class * len(CLASSES),
        "training": training,
        "rows": rows,
        "seconds": timings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__},
        "seed": args.seed,
        "command": " ".join(["python", "benchmarks/bench_tempo.py", *sys.argv[1:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=6, help="joint training epochs at normal speed")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--recover-epochs", type=int, default=2,
                        help="epochs per stage of the fine-tune at speed 1 after conversion")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="epochs per stage of the short fine-tune at 0.5")
    parser.add_argument("--finetune-lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the videos (train 2·seed, val 2·seed + 1) and the training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep the videos and model folders here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="stjfd-tempo-") as scratch:
        results = run(args.keep or Path(scratch), args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
