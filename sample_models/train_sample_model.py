"""Train the bundled sample model: ``sample_models/sample_model.{safetensors,json}`` and ``MODEL_CARD.md``.

    python sample_models/train_sample_model.py                 # the checked-in run (seed 0, CPU, ~3 min on 2 cores)
    python sample_models/train_sample_model.py -o /tmp/sample  # somewhere else
    python sample_models/train_sample_model.py --card-only     # rewrite MODEL_CARD.md from sample_model.json

The model (:func:`stjfd_convert.sample.build_sample_net`) is trained from scratch on the synthetic
moving-shape task (:func:`stjfd_convert.sample.sample_clips`) with stjfd's own fine-tuning loop
(``schedule="joint"`` on the plain model: every parameter at full size), deterministically on the CPU.
The run stops with an error when held-out accuracy stays below ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUTPUT = Path(__file__).resolve().parent
WEIGHTS_FILE = "sample_model.safetensors"
INFO_FILE = "sample_model.json"
CARD_FILE = "MODEL_CARD.md"
INFO_FORMAT = "stjfd-sample-model"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights (recorded in sample_model.json)."""

    seed: int = 0
    train_clips: int = 480
    val_clips: int = 240
    epochs: int = 4  # the joint schedule runs 2 × epochs_per_stage epochs per cycle
    batch_size: int = 16
    lr: float = 0.05
    weight_decay: float = 1e-4
    threads: int = 2


@dataclass
class TrainOutcome:
    weights: Path
    info_path: Path
    info: dict[str, Any]
    seconds: float


def _epochs_per_stage(epochs: int) -> int:
    if epochs < 2 or epochs % 2:
        raise ValueError(f"epochs must be an even number ≥ 2 (one joint stage is 2 × epochs_per_stage), got {epochs}")
    return epochs // 2


def train_sample_model(
    output: str | Path,
    settings: TrainSettings = TrainSettings(),
    *,
    command: str | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainOutcome:
    """Train ``build_sample_net`` with ``settings`` and write the weights and their description to ``output``."""
    from safetensors.torch import save_file

    from stjfd_convert import __version__ as stjfd_version
    from stjfd_convert.atomic import atomic_file
    from stjfd_convert.finetune import FinetuneConfig, finetune
    from stjfd_convert.models import ArchSpec, sha256_file
    from stjfd_convert.sample import (
        SAMPLE_CLASSES,
        SAMPLE_CLIP_LEN,
        SAMPLE_MODEL_NAME,
        SAMPLE_SIZE,
        SampleClips,
        build_sample_net,
        split_seed,
    )

    start = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        train_seed, val_seed = split_seed(settings.seed, "train"), split_seed(settings.seed, "val")
        train = SampleClips(settings.train_clips, seed=train_seed)
        val = SampleClips(settings.val_clips, seed=val_seed)
        spec = ArchSpec("callable", SAMPLE_MODEL_NAME, {"num_classes": len(SAMPLE_CLASSES)})
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed)
            model = build_sample_net(num_classes=len(SAMPLE_CLASSES))
        config = FinetuneConfig(
            schedule="joint",
            cycles=1,
            epochs_per_stage=_epochs_per_stage(settings.epochs),
            batch_size=settings.batch_size,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            warmup_epochs=0.5,
            device="cpu",
            seed=settings.seed,
            deterministic=True,
            measure_memory=False,
            plot=False,
        )
        result = finetune(model, train, val, config, callbacks=callbacks, classes=list(SAMPLE_CLASSES))
    finally:
        torch.set_num_threads(previous_threads)
    if result.final is None:
        raise RuntimeError("training finished without a validation result")
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    weights, info_path = output / WEIGHTS_FILE, output / INFO_FILE
    with atomic_file(weights, "internal") as staging:
        save_file(state, str(staging), metadata={"format": INFO_FORMAT})
    info = {
        "format": INFO_FORMAT,
        "version": 1,
        "architecture": spec.to_dict(),
        "weights": WEIGHTS_FILE,
        "sha256": sha256_file(weights),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": {
            "shape": [1, 3, SAMPLE_CLIP_LEN, SAMPLE_SIZE, SAMPLE_SIZE],
            "layout": "NCTHW",
            "dtype": "float32",
            "range": [0.0, 1.0],
        },
        "normalization": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "classes": list(SAMPLE_CLASSES),
        "data": {
            "generator": "stjfd_convert.sample:sample_clips",
            "train": {"clips": settings.train_clips, "seed": train_seed},
            "val": {"clips": settings.val_clips, "seed": val_seed},
        },
        "training": {
            "settings": {**settings.__dict__},
            "finetune_config": config.to_dict(),
            "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "torch": torch.__version__,
        },
        "val_top1": result.final.top1,
        "val_loss": result.final.loss,
        "seed": settings.seed,
        "command": command,
        "created": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "stjfd": stjfd_version},
    }
    with atomic_file(info_path, "internal") as staging:
        staging.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    write_model_card(info, output / CARD_FILE)
    return TrainOutcome(weights, info_path, info, time.perf_counter() - start)


def model_card(info: dict[str, Any]) -> str:
    """The model card (Markdown) for the description ``info`` that :func:`train_sample_model` wrote."""
    settings = info["training"]["settings"]
    shape = "×".join(map(str, info["input"]["shape"]))
    versions = info.get("versions") or {"torch": info["training"].get("torch")}
    lines = [
        "# stjfd sample model",
        "",
        "A small r3d-style 3D CNN (`stjfd_convert.sample:build_sample_net`, "
        f"{info['parameters']:,} parameters) that `stjfd demo` converts, evaluates and fine-tunes.",
        "Everything below is generated from `sample_model.json` by `train_sample_model.py`.",
        "",
        "## Data",
        "",
        f"Synthetic moving-shape clips from `{info['data']['generator']}`: classes "
        + ", ".join(f"`{c}`" for c in info["classes"])
        + f"; input {shape} (N×C×T×H×W), float32 in [{info['input']['range'][0]}, {info['input']['range'][1]}], "
        "no mean/std normalisation.",
        f"Training: {info['data']['train']['clips']} clips (seed {info['data']['train']['seed']}); held out: "
        f"{info['data']['val']['clips']} other clips (seed {info['data']['val']['seed']}).",
        "",
        "## Training",
        "",
        "Reproduce with `python sample_models/train_sample_model.py` (these settings are its defaults); recorded "
        f"command: `{info['command']}`. stjfd's own loop (`schedule=\"joint\"`), {settings['epochs']} epochs, batch "
        f"{settings['batch_size']}, lr {settings['lr']}, weight decay {settings['weight_decay']}, seed {settings['seed']}, "
        f"{settings['threads']} CPU threads: {info['training']['steps']} steps in {info['training']['seconds']} s.",
        "",
        "## Held-out accuracy",
        "",
        f"top-1 {info['val_top1']:.4f}, loss {info['val_loss']:.4f} on the {info['data']['val']['clips']} held-out clips.",
        "",
        "## Provenance",
        "",
        f"Trained {info.get('created', 'on an unrecorded date')} with "
        + ", ".join(f"{name} {version}" for name, version in versions.items() if version)
        + f"; weights sha256 `{info['sha256']}`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(info: dict[str, Any], path: Path) -> Path:
    from stjfd_convert.atomic import atomic_file

    with atomic_file(path, "internal") as staging:
        staging.write_text(model_card(info), encoding="utf-8")
    return path


def _epoch_printer(event: Any) -> None:
    from stjfd_convert.finetune import EpochEnd

    if isinstance(event, EpochEnd):
        record = getattr(event, "record", None) or {}
        fields = {k: record.get(k) for k in ("epoch", "train_loss", "train_top1", "val_loss", "val_top1")}
        print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="folder for the two files")
    defaults = TrainSettings()
    for name, value in defaults.__dict__.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--min-accuracy", type=float, default=0.9, help="fail below this validation top-1")
    parser.add_argument("--card-only", action="store_true", help="only rewrite MODEL_CARD.md from sample_model.json")
    args = parser.parse_args(argv)
    settings = TrainSettings(**{name: getattr(args, name) for name in defaults.__dict__})
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    command = f"python sample_models/train_sample_model.py {argv_text}".strip()
    if args.card_only:
        info = json.loads((args.output / INFO_FILE).read_text(encoding="utf-8"))
        print(f"wrote {write_model_card(info, args.output / CARD_FILE)}")
        return 0
    outcome = train_sample_model(args.output, settings, command=command, callbacks=[_epoch_printer])
    top1 = outcome.info["val_top1"]
    print(f"val top-1 {top1:.4f} after {outcome.info['training']['steps']} steps ({outcome.seconds:.0f} s)")
    print(f"wrote {outcome.weights} ({outcome.weights.stat().st_size / 1024:.0f} KiB) and {outcome.info_path}")
    if top1 < args.min_accuracy:
        print(f"error: val top-1 {top1:.4f} is below --min-accuracy {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
