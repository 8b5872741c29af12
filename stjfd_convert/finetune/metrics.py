"""The run's metrics.jsonl (JSON-safe records, reading them back), the training-curve PNG, log formatting."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_file
from ..formats import METRICS_FILE, PNG_SOFTWARE


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


def _clean(value: Any) -> Any:
    """JSON-safe floats (NaN/Inf → None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (a torn last line is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_training_curve(records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """A two-panel PNG: training loss per step (+ train/val loss per epoch) over stage bands, and
    validation top-1/top-5 per epoch. Written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    colours = {"temporal": "#dbe9f6", "spatial": "#fde6cf", "joint": "#e8e8e8"}
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, constrained_layout=True)
    seen_stage: set[str] = set()
    for r in epochs:
        stage = r.get("stage", "joint")
        label = f"{stage} stage" if stage not in seen_stage else None
        seen_stage.add(stage)
        for ax in (ax_loss, ax_acc):
            ax.axvspan(r["epoch"], r["epoch"] + 1, color=colours.get(stage, "#eeeeee"), lw=0,
                       label=label if ax is ax_loss else None)
    if steps:
        xs = [r["epoch_progress"] for r in steps]
        ys = [r["loss"] for r in steps]
        ax_loss.plot(xs, ys, color="#1f77b4", lw=0.8, alpha=0.45, label="train loss (per step)")
        window = max(1, len(ys) // 30)
        if window > 1:
            smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
            ax_loss.plot(xs[window - 1 :], smooth, color="#1f77b4", lw=1.8, label=f"train loss ({window}-step mean)")
    ends = [r["epoch"] + 1 for r in epochs]
    train_loss = [r.get("train_loss") for r in epochs]
    val_loss = [r.get("val_loss") for r in epochs]
    if any(v is not None for v in train_loss):
        ax_loss.plot(ends, train_loss, "o-", color="#0b3d91", ms=4, lw=1.2, label="train loss (epoch mean)")
    if any(v is not None for v in val_loss):
        ax_loss.plot(ends, val_loss, "s-", color="#d62728", ms=5, lw=1.5, label="val loss (full resolution)")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend(loc="upper right", fontsize=8, ncol=2)
    k = next((r.get("val_top5_k") for r in epochs if r.get("val_top5_k")), 5)
    for key, style, colour, label in (
        ("val_top1", "s-", "#d62728", "val top-1 (full resolution)"),
        ("val_top5", "^--", "#9467bd", f"val top-{k}"),
        ("train_top1", "o:", "#0b3d91", "train top-1 (stage input)"),
    ):
        values = [r.get(key) for r in epochs]
        if any(v is not None for v in values):
            percent = [100 * v if v is not None else np.nan for v in values]
            ax_acc.plot(ends, percent, style, color=colour, ms=5, label=label)
    ax_acc.set_ylim(-2, 102)
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.grid(True, alpha=0.3)
    if ax_acc.get_legend_handles_labels()[0]:  # a distillation run on unlabeled clips has no accuracy
        ax_acc.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    path = Path(path)
    with atomic_file(path, "internal") as staging:
        fig.savefig(staging, dpi=110, format="png", metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    plt.close(fig)
    return path


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fmt_bytes(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f} MiB"
