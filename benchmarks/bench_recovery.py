"""Recovering a converted model's accuracy without labels (issue #12): plain vs ``--calibrate`` vs ``--distill``.

    python benchmarks/bench_recovery.py [--models sample,event] [--calibrate on|off] [--work DIR]
        [--json out.json] [--threads 2] [--tiny]  (and the tuning options below, defaults = the chosen settings)

Two models, every step through the real command line (``python -m stjfd_convert …`` in a subprocess, each
timed: wall seconds, and the CPU seconds the process used, user + system):

- **sample**: the bundled sample model (``stjfd_convert.sample``, 3 classes, 16 × 64² float clips in 0..1)
  converted aggressively (``--atoms 2 --temporal-atoms 2``: plain conversion loses far more than 10 points).
  Videos are written with PyAV from :func:`stjfd_convert.sample.shape_frames` (``vary=True``):
  unlabeled distillation clips (nested folders, no classes) and, from another seed, labelled held-out clips
  in class folders. Accuracy is ``stjfd evaluate`` top-1 against the true labels; agreement is ``stjfd
  compare``'s top-1 agreement with the original. The original's row is the full-rank conversion (exact).
- **event**: :mod:`event_model` (beside this file) — a 3D CNN on uint8 ``[B, T, H, W, 3]`` frames returning
  ``(clip logits, {"aux": per-frame event probabilities})`` — trained here by ``event_model.py`` (seeded,
  about a CPU minute, nothing downloaded), converted with ``--atoms 2 --temporal-atoms 2`` (event F1 against the truth 0.99 → 0.77; at one temporal atom
  distillation stalls below F1 0.8). Its rows give
  ``stjfd compare``'s event F1 against the original's events (onsets, ±1 frame) and top-1 agreement of the
  clip head, and — computed here on the same decoded held-out clips — event F1 and clip top-1 against the
  generator's ground truth.

Arms: **plain** ``stjfd convert``; **calibrate** ``stjfd convert … --calibrate DISTILL_DIR`` (data-aware
atoms, BatchNorm re-estimated on the same unlabeled clips; skipped with ``--calibrate off``);
**distill** ``stjfd finetune PLAIN DISTILL_DIR --unlabeled --distill source`` (no labels; the distillation
clips are not the evaluated ones; both stages at the native clip size, ``-s 1 -r 1``: with the stages'
downsampling the sample model stalled at 97.9 % and the event model at F1 0.59). The distill arm's time is the fine-tuning command alone (its starting
point is the plain arm's output). Targets (issue #12): distillation within ``ACCURACY_TOLERANCE`` of the
original's top-1 (sample) / event F1 against the original's events ≥ ``EVENT_F1_TARGET`` (event), in at most
``WALL_LIMIT_S`` seconds on 2 CPU cores. Child processes get ``OMP_NUM_THREADS=--threads``; on a shared
machine wall time is inflated, the CPU seconds are not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent / "tests"))

import event_model  # noqa: E402
from videos import write_video  # noqa: E402

from stjfd_convert.sample import (  # noqa: E402
    SAMPLE_CLASSES,
    SAMPLE_CLIP_LEN,
    SAMPLE_MODEL_NAME,
    SAMPLE_SIZE,
    sample_model_files,
    shape_frames,
    split_seed,
)

ACCURACY_TOLERANCE = 0.01  # distillation's top-1 may trail the original's by at most 1 point
EVENT_F1_TARGET = 0.97  # event F1 of the distilled model against the original's events
WALL_LIMIT_S = 600.0  # distillation's wall time on 2 CPU cores
EVENT_MODEL = f"{BENCH_DIR / 'event_model.py'}:build_event_net"
SEED = 0


# --------------------------------------------------------------------------------------------
# Running the CLI
# --------------------------------------------------------------------------------------------


class Cli:
    """``python -m stjfd_convert ARGS`` with a fixed thread count; each call timed (wall and CPU seconds).

    Runs in ``log``'s folder, not the caller's: ``python -m`` puts the working directory first on
    ``sys.path``, so from a source checkout it would import the checkout's ``stjfd_convert`` (which has
    no ``sample_models`` inside it) instead of the installed package the bench found the sample model in.
    """

    def __init__(self, threads: int, log: Path) -> None:
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log = log.resolve()

    def __call__(self, *args: object, json_out: bool = True) -> tuple[Any, float, float]:
        argv = [sys.executable, "-m", "stjfd_convert", *(str(a) for a in args)] + (["--json"] if json_out else [])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.log.parent)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        with self.log.open("a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv[1:])}\n# rc {done.returncode}, {wall:.1f} s wall, {cpu:.1f} s CPU\n"
                      f"{done.stderr[-4000:]}\n")
        if done.returncode != 0:
            raise RuntimeError(f"`stjfd {' '.join(argv[3:])}` failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return (json.loads(done.stdout) if json_out else done.stdout), wall, cpu

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _clip_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_sample_videos(root: Path, n: int, seed: int, labelled: bool) -> Path:
    """``n`` toy clips (classes cycling) as mp4: ``root/<class>/`` when labelled, else nested ``root/part<k>/``."""
    for i in range(n):
        kind = i % len(SAMPLE_CLASSES)
        frames = shape_frames(kind, SAMPLE_CLIP_LEN, SAMPLE_SIZE, SAMPLE_SIZE, _clip_seed(seed, i), vary=True)
        folder = SAMPLE_CLASSES[kind] if labelled else f"part{i % 4}"
        write_video(root / folder / f"clip_{i:04d}.mp4", frames)
    return root


def write_event_videos(root: Path, n: int, seed: int) -> Path:
    """``n`` event clips as mp4 in nested folders, with ``truth.json`` (per file: event mask and class)."""
    truth = {}
    for i in range(n):
        frames, mask, label = event_model.event_clip(event_model.clip_seed(seed, i))
        path = write_video(root / f"part{i % 4}" / f"clip_{i:04d}.mp4", frames)
        truth[path.relative_to(root).as_posix()] = {"mask": mask.astype(int).tolist(), "label": label}
    (root / "truth.json").write_text(json.dumps(truth), encoding="utf-8")
    return root


def event_truth_scores(model_dir: Path | None, checkpoint: Path | None, heldout: Path) -> dict[str, Any]:
    """Event F1 and clip top-1 of a model against the generator's ground truth, on the held-out videos
    decoded by the loaders the CLI uses (centre clip, centre crop, raw uint8 THWC)."""
    from stjfd_convert.data import unlabeled_dataset
    from stjfd_convert.saved_model import load_converted

    if model_dir is not None:
        model = load_converted(model_dir, trust_code=True).model
    else:
        model = event_model.build_event_net()
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    truth = json.loads((heldout / "truth.json").read_text(encoding="utf-8"))
    dataset = unlabeled_dataset(heldout, clip_len=event_model.CLIP_LEN, size=event_model.SIZE, train=False,
                                layout="THWC", dtype="uint8")
    keys = [Path(s.path).relative_to(heldout).as_posix() for s in dataset.sources]
    clips = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        outputs = [model(clips[i : i + 16]) for i in range(0, len(clips), 16)]
    logits = torch.cat([o[0] for o in outputs])
    probabilities = torch.cat([o[1]["aux"] for o in outputs])
    masks = np.array([truth[k]["mask"] for k in keys], dtype=bool)
    labels = torch.tensor([truth[k]["label"] for k in keys])
    return {"top1": float((logits.argmax(1) == labels).float().mean()),
            "events": event_model.event_scores(probabilities, masks)}


# --------------------------------------------------------------------------------------------
# The arms
# --------------------------------------------------------------------------------------------


def _output(result: dict[str, Any], name_part: str) -> dict[str, Any]:
    return next(o for o in result["outputs"] if name_part in o["name"])


def _conversion_arms(calibrate: bool, clips_dir: Path, clips: int) -> list[tuple[str, list[Any]]]:
    """The convert arms: plain, and with --calibrate on the distillation clips (no labels either way)."""
    arms: list[tuple[str, list[Any]]] = [("plain", [])]
    if calibrate:
        arms.append(("calibrate", ["--calibrate", clips_dir, "--calibrate-clips", clips]))
    return arms


def _calibration(converted: dict[str, Any]) -> dict[str, Any] | None:
    """What ``convert --json`` says of calibration: the whole model's output error on the calibration clips,
    calibrated and plain, and whether the re-estimated BatchNorm statistics were kept."""
    info = converted.get("calibration")
    if not info:
        return None
    return {
        "model_output_error": info.get("model_output_error"),
        "plain_model_output_error": info.get("plain_model_output_error"),
        "batchnorm": ("re-estimated" if info.get("batchnorm")
                      else "original's" if "batchnorm_rejected" in info else None),
        "re_estimated_model_output_error": (info.get("batchnorm_rejected") or {}).get("model_output_error"),
    }


def run_sample(cli: Cli, work: Path, args: argparse.Namespace, calibrate: bool) -> list[dict[str, Any]]:
    weights = sample_model_files().weights
    distill_dir = write_sample_videos(work / "distill_clips", args.distill_clips, split_seed(SEED, "recovery-distill"),
                                      labelled=False)
    heldout = write_sample_videos(work / "heldout", args.heldout_clips, split_seed(SEED, "recovery-heldout"),
                                  labelled=True)
    labels = work / "labels.txt"
    labels.write_text("\n".join(SAMPLE_CLASSES) + "\n", encoding="utf-8")  # output order = class index
    model = ["--model", SAMPLE_MODEL_NAME, "--input-shape", f"1,3,{SAMPLE_CLIP_LEN},{SAMPLE_SIZE},{SAMPLE_SIZE}"]
    atoms = ["--atoms", args.sample_atoms, "--temporal-atoms", args.sample_temporal_atoms]

    def evaluate(folder: Path) -> float:
        result, _, _ = cli("evaluate", folder, heldout, "--labels", labels, "--device", "cpu", "--workers", 0)
        return float(result["top1"])

    def agreement(folder: Path) -> float:
        result, _, _ = cli("compare", weights, folder, heldout, "--device", "cpu")
        return float(result["outputs"][0]["top1_agreement"])

    rows = []
    cli("convert", weights, *model, "--full-rank", "-o", work / "full_rank")
    rows.append({"arm": "original", "top1": evaluate(work / "full_rank"), "agreement": 1.0, "wall_s": None,
                 "cpu_s": None})
    arms = _conversion_arms(calibrate, distill_dir, args.calibrate_clips)
    for arm, extra in arms:
        folder = work / arm
        converted, wall, cpu = cli("convert", weights, *model, *atoms, *extra, "-o", folder)
        rows.append({"arm": arm, "top1": evaluate(folder), "agreement": agreement(folder), "wall_s": wall,
                     "cpu_s": cpu, "calibration": _calibration(converted)})
    run = work / "distill"
    _, wall, cpu = cli("finetune", work / "plain", distill_dir, "--unlabeled", "--distill", "source",
                       "--clip-len", SAMPLE_CLIP_LEN, "--size", SAMPLE_SIZE, "--mean", "0,0,0", "--std", "1,1,1",
                       *_distill_options(args), "-o", run)
    rows.append({"arm": "distill", "top1": evaluate(run / "last"), "agreement": agreement(run / "last"),
                 "wall_s": wall, "cpu_s": cpu})
    return rows


def run_event(cli: Cli, work: Path, args: argparse.Namespace, calibrate: bool) -> list[dict[str, Any]]:
    checkpoint = work / "event_model.pth"
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, str(BENCH_DIR / "event_model.py"), str(checkpoint), "--clips",
                    str(args.event_train_clips), "--epochs", str(args.event_epochs), "--threads", str(args.threads)],
                   check=True, capture_output=True, env=cli.env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    train_wall = time.perf_counter() - start
    train_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    distill_dir = write_event_videos(work / "distill_clips", args.distill_clips, split_seed(SEED, "event-distill"))
    heldout = write_event_videos(work / "heldout", args.heldout_clips, split_seed(SEED, "event-heldout"))
    clip, size = event_model.CLIP_LEN, event_model.SIZE
    model = ["--model", EVENT_MODEL, "--input-shape", f"1,{clip},{size},{size},3", "--input-dtype", "uint8",
             "--input-layout", "BTHWC"]
    layout = ["--input-layout", "BTHWC", "--input-dtype", "uint8"]
    compare_layout = layout
    atoms = ["--atoms", args.event_atoms, "--temporal-atoms", args.event_temporal_atoms]

    def row(arm: str, folder: Path | None, wall: float | None, cpu: float | None) -> dict[str, Any]:
        truth = event_truth_scores(folder, checkpoint if folder is None else None, heldout)
        record = {"arm": arm, "top1": truth["top1"], "event_f1_truth": truth["events"]["f1"], "wall_s": wall,
                  "cpu_s": cpu, "truth_events": truth["events"]}
        if folder is None:
            record.update(agreement=1.0, event_f1_original=1.0)
            return record
        try:
            result, _, _ = cli("compare", checkpoint, folder, heldout, "--model", EVENT_MODEL, *compare_layout,
                               "--clip-len", clip, "--size", size, "--device", "cpu")
        except RuntimeError as error:
            # A stjfd whose convert records no input layout (and whose compare takes none) cannot compare a
            # plain BTHWC conversion; a fine-tuned run records its layout. Kept as a gap, not a crash.
            record.update(agreement=None, event_f1_original=None, compare_error=str(error).splitlines()[-1])
            return record
        record.update(agreement=_output(result, "output[0]")["top1_agreement"],
                      event_f1_original=_output(result, "aux")["events"]["f1"],
                      compare_events=_output(result, "aux")["events"])
        return record

    rows = [row("original", None, None, None) | {"train_wall_s": train_wall, "train_cpu_s": train_cpu}]
    arms = _conversion_arms(calibrate, distill_dir, args.calibrate_clips)
    for arm, extra in arms:
        folder = work / arm
        converted, wall, cpu = cli("convert", checkpoint, *model, *atoms, *extra, "-o", folder)
        rows.append({**row(arm, folder, wall, cpu), "calibration": _calibration(converted)})
    run = work / "distill"
    _, wall, cpu = cli("finetune", work / "plain", distill_dir, "--model", EVENT_MODEL, "--unlabeled", "--distill",
                       "source", *layout, "--clip-len", clip, "--size", size, *_distill_options(args), "-o", run)
    rows.append(row("distill", run / "last", wall, cpu))
    return rows


def _distill_options(args: argparse.Namespace) -> list[object]:
    return ["--cycles", args.cycles, "--epochs-per-stage", args.epochs_per_stage, "--batch-size", args.batch_size,
            "--optimizer", args.optimizer, "--lr", args.lr, "-s", args.spatial_downsample,
            "-r", args.temporal_downsample, "--workers", 0, "--device", "cpu", "--seed", SEED, "--no-plot"]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| model | arm | top-1 vs labels | top-1 agreement | event F1 vs truth | event F1 vs original "
             "| wall s | CPU s |", "|---|---|---|---|---|---|---|---|"]
    for name, model in results["models"].items():
        arms = {row["arm"]: row for row in model["rows"]}
        for arm in ("original", "plain", "calibrate", "distill"):
            row = arms.get(arm)
            if row is None:  # the calibrate arm with --calibrate off
                event = "skipped" if name == "event" else "—"
                lines.append(f"| {name} | {arm} | skipped | skipped | {event} | {event} | — | — |")
                continue
            lines.append(
                f"| {name} | {arm} | {_fmt(row['top1'])} | {_fmt(row['agreement'])} | "
                f"{_fmt(row.get('event_f1_truth'))} | {_fmt(row.get('event_f1_original'))} | "
                f"{_fmt(row['wall_s'], 1)} | {_fmt(row['cpu_s'], 1)} |"
            )
    return "\n".join(lines)


def check_targets(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    arms = {row["arm"]: row for row in rows}
    distill, original = arms["distill"], arms["original"]
    if name == "sample":
        quality = distill["top1"] >= original["top1"] - ACCURACY_TOLERANCE
        what = f"top-1 {distill['top1']:.3f} vs original {original['top1']:.3f} (−{ACCURACY_TOLERANCE} allowed)"
    else:
        quality = (distill["event_f1_original"] or 0.0) >= EVENT_F1_TARGET
        what = f"event F1 vs original {_fmt(distill['event_f1_original'])} (≥ {EVENT_F1_TARGET})"
    targets = {"quality": bool(quality), "quality_detail": what, "wall": distill["wall_s"] <= WALL_LIMIT_S,
               "wall_detail": f"{distill['wall_s']:.0f} s wall (≤ {WALL_LIMIT_S:.0f})"}
    if "calibrate" in arms:
        key = "top1" if name == "sample" else "event_f1_original"
        targets["calibrate_beats_plain"] = bool((arms["calibrate"][key] or 0) > (arms["plain"][key] or 0))
    return targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sample,event", help="comma-separated: sample, event")
    parser.add_argument("--calibrate", choices=("on", "off"), default="on", help="run the --calibrate arm")
    parser.add_argument("--work", type=Path, help="keep every file here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every command")
    parser.add_argument("--tiny", action="store_true", help="a few clips and one short cycle: checks the pipeline")
    tuning = parser.add_argument_group("settings (defaults: the ones BENCHMARKS.md reports)")
    tuning.add_argument("--distill-clips", type=int, default=480, help="unlabeled clips to distil on")
    tuning.add_argument("--heldout-clips", type=int, default=240, help="held-out clips evaluated")
    tuning.add_argument("--calibrate-clips", type=int, default=64)
    tuning.add_argument("--sample-atoms", type=int, default=2)
    tuning.add_argument("--sample-temporal-atoms", type=int, default=2)
    tuning.add_argument("--event-atoms", type=int, default=2)
    tuning.add_argument("--event-temporal-atoms", type=int, default=2)
    tuning.add_argument("--event-train-clips", type=int, default=384, help="the event model's training clips")
    tuning.add_argument("--event-epochs", type=int, default=5)
    tuning.add_argument("--cycles", type=int, default=2)
    tuning.add_argument("--epochs-per-stage", type=int, default=1)
    tuning.add_argument("--batch-size", type=int, default=16)
    tuning.add_argument("--optimizer", default="adamw")
    tuning.add_argument("--lr", type=float, default=0.002)
    tuning.add_argument("-s", "--spatial-downsample", type=int, default=1)
    tuning.add_argument("-r", "--temporal-downsample", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tiny:
        args.distill_clips, args.heldout_clips, args.calibrate_clips = 6, 6, 4
        args.event_train_clips, args.event_epochs, args.cycles, args.batch_size = 32, 1, 1, 3
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every model's arms; returns (and with ``--json`` writes) the results."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"sample", "event"}
    if unknown:
        raise SystemExit(f"unknown --models {sorted(unknown)}: use sample, event")
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench_recovery_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cli = Cli(args.threads, work / "commands.log")
    calibrate = args.calibrate == "on"
    results: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "load_average_start": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "calibrate": {"run": calibrate},
        "targets": {"accuracy_tolerance": ACCURACY_TOLERANCE, "event_f1": EVENT_F1_TARGET, "wall_s": WALL_LIMIT_S},
        "models": {},
    }
    try:
        for name in models:
            folder = work / name
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            rows = (run_sample if name == "sample" else run_event)(cli, folder, args, calibrate)
            results["models"][name] = {"rows": rows, "targets": check_targets(name, rows)}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = run(args)
    print(markdown_table(results))
    for name, model in results["models"].items():
        targets = model["targets"]
        print(f"{name}: distillation {targets['quality_detail']}: {'met' if targets['quality'] else 'MISSED'}; "
              f"{targets['wall_detail']}: {'met' if targets['wall'] else 'MISSED'}"
              + (f"; calibrate beats plain: {targets['calibrate_beats_plain']}" if "calibrate_beats_plain" in targets
                 else ""))
        for row in model["rows"]:
            info = row.get("calibration")
            if info and info["model_output_error"] is not None:
                rejected = info["re_estimated_model_output_error"]
                print(f"{name}: calibrated model output error {info['model_output_error']:.4f} "
                      f"(plain {info['plain_model_output_error']:.4f}) on the calibration clips, BatchNorm statistics: "
                      f"{info['batchnorm']}" + (f" (re-estimated: {rejected:.4f})" if rejected is not None else ""))
    if not results["calibrate"]["run"]:
        print("calibrate arm: skipped (--calibrate off)")
    return results


if __name__ == "__main__":
    main()
