"""Files: the report as Markdown, and a PNG of parameters per layer and training memory against clip length."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..atomic import atomic_file
from ..errors import OutputError
from ..formats import MARKDOWN_TITLE, PNG_SOFTWARE
from ..layers import FORMS
from .accounting import DTYPE_BYTES, MIB
from .core import MemoryReport


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / MIB:,.1f}"


def _g(n: int) -> str:
    return f"{n / 1e9:,.2f}"


def markdown(report: MemoryReport) -> str:
    """The report as Markdown tables."""
    t = report.totals
    shape = "×".join(map(str, report.input_shape))
    lines = [
        f"{MARKDOWN_TITLE}memory report: {report.source}",
        "",
        f"Input {shape} (B×C×T×H×W); execution modes: {', '.join(report.settings['modes']) or 'n/a'}.",
        "",
        "## Model",
        "",
        "| | original | converted | ratio |",
        "|---|---:|---:|---:|",
        f"| parameters | {t.params_original:,} | {t.params_converted:,} | {t.param_ratio:.3f} |",
    ]
    for dtype in DTYPE_BYTES:
        lines.append(f"| MiB at {dtype} | {_mib(t.bytes_original(dtype))} | {_mib(t.bytes_converted(dtype))} | {t.param_ratio:.3f} |")
    lines.append(f"| GMACs per clip | {_g(t.macs_original)} | {_g(t.macs_converted)} | {t.mac_ratio:.3f} |")
    inf = report.inference
    lines.append(
        f"| peak inference activations, MiB (batch {report.input_shape[0]}) | {_mib(inf.original.peak_bytes)} | "
        f"{_mib(inf.converted.peak_bytes)} | {inf.converted.peak_bytes / max(1, inf.original.peak_bytes):.3f} |"
    )
    lines += ["", "GMACs per clip and peak inference activations with every decomposed layer in one form:", "",
              "| form | GMACs | peak activations MiB |", "|---|---:|---:|"]
    for form in FORMS:
        lines.append(f"| {form} | {_g(t.macs_by_form[form])} | {_mib(inf.by_form[form])} |")
    lines += ["", "## Layers (per clip)", "",
              "| layer | kernel | atoms | mode (form) | params orig → conv | GMACs orig → conv | "
              + " / ".join(FORMS) + " GMACs |",
              "|---|---|---|---|---:|---:|---:|"]
    for row in report.layers:
        kernel = "×".join(map(str, row.kernel_size)) if row.kernel_size else "linear"
        atoms = f"{row.atoms[0]}×{row.atoms[1]}" if row.atoms else "—"
        forms = " / ".join(_g(row.macs_by_form[f]) for f in FORMS) if row.macs_by_form else "—"
        mode = f"{row.mode} ({row.form})" if row.mode and row.form and row.form != row.mode else (row.mode or "—")
        lines.append(
            f"| {row.name} | {kernel} | {atoms} | {mode} | {row.params_original:,} → {row.params_converted:,} | "
            f"{_g(row.macs_original)} → {_g(row.macs_converted)} | {forms} |"
        )
    if report.training:
        lines += ["", f"## Training memory (batch {report.input_shape[0]}, {report.settings['optimizer']}, "
                  f"s={report.settings['spatial_downsample']}, r={report.settings['temporal_downsample']}, "
                  f"{report.settings['device']}), MiB", "",
                  "| schedule | clip | saved activations | analytic | saved weights | params + grads + optimizer | total | step s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for entry in report.training:
            m = entry.memory
            analytic = "—"
            if entry.analytic_activation_bytes:
                analytic = f"{_mib(entry.analytic_activation_bytes)} ({entry.analytic_factor}, ×{entry.analytic_ratio:.3f})"
            step = f"{m.step_seconds_median:.3f}" if m.step_seconds_median is not None else "—"
            lines.append(
                f"| {entry.label} | {'×'.join(map(str, m.input_shape[2:]))} | {_mib(m.saved_activation_bytes)} | {analytic} | "
                f"{_mib(m.saved_weight_bytes)} | {_mib(m.param_bytes + m.grad_bytes + m.optimizer_bytes)} | "
                f"{_mib(m.total_bytes)} | {step} |"
            )
    if report.fits:
        f = report.fits
        lines += ["", f"## What fits in {_mib(f.budget_bytes)} MiB ({f.frame_size}² frames, measured on {f.device})", "",
                  f"| schedule | longest clip at batch {f.batch} | MiB at it / +1 frame | largest batch at {f.frames} frames | MiB at it / +1 |",
                  "|---|---:|---:|---:|---:|"]
        for a in f.answers:
            deciding = f" ({a.deciding_stage} stage decides)" if a.deciding_stage else ""
            lines.append(
                f"| {a.label}{deciding} | {a.clip.answer} | {_mib(a.clip.answer_bytes)} / {_mib(a.clip.above_bytes)} | "
                f"{a.batch.answer} | {_mib(a.batch.answer_bytes)} / {_mib(a.batch.above_bytes)} |"
            )
    if report.notes:
        lines += ["", *[f"- note: {n}" for n in report.notes]]
    lines += ["", "How each figure is obtained:", ""]
    lines += [f"- {k}: {v}" for k, v in report.settings["how"].items()]
    return "\n".join(lines) + "\n"


def write_markdown(
    report: MemoryReport, path: str | os.PathLike[str], *, force: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Path:
    """Write :func:`markdown` atomically; an existing file is replaced only with ``force`` and only if
    stjfd wrote it (:mod:`stjfd_convert.atomic`)."""
    with atomic_file(path, "markdown", force=force, inputs=inputs) as staging:
        staging.write_text(markdown(report), encoding="utf-8")
    return Path(path)


def write_plot(
    report: MemoryReport, path: str | os.PathLike[str], *, force: bool = False, inputs: Sequence[str | os.PathLike[str]] = ()
) -> Path:
    """PNG: per-layer parameters (original vs converted) and training memory against clip length.

    Written atomically; ``force`` replaces only a PNG stjfd wrote (its tEXt Software chunk says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise OutputError("--plot needs matplotlib, which is not installed", "reinstall stjfd or pip install matplotlib") from None
    rows = [r for r in report.layers if r.kind != "linear" or r.params_original]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.5, 1]})
    positions = range(len(rows))
    width = 0.4
    left.bar([p - width / 2 for p in positions], [r.params_original for r in rows], width, label="original", color="#9e9e9e")
    left.bar([p + width / 2 for p in positions], [r.params_converted for r in rows], width, label="converted", color="#1f77b4")
    left.set_yscale("log")
    left.set_xticks(list(positions))
    left.set_xticklabels([r.name for r in rows], rotation=70, ha="right", fontsize=7)
    left.set_ylabel("parameters (log scale)")
    t = report.totals
    left.set_title(f"Parameters per layer: {t.params_original / 1e6:.2f} M → {t.params_converted / 1e6:.2f} M "
                   f"(×{t.param_ratio:.3f})")
    left.legend()
    left.grid(axis="y", alpha=0.3)
    styles = {
        "original_joint": ("original joint", "#9e9e9e", "-"),
        "joint": ("converted joint", "#1f77b4", "-"),
        "checkpointing": ("converted + checkpointing", "#1f77b4", "--"),
        "temporal": (f"temporal stage (frames /{report.settings['spatial_downsample']})", "#2ca02c", "-"),
        "spatial": (f"spatial stage (clip /{report.settings['temporal_downsample']})", "#d62728", "-"),
    }
    highest = 0.0
    for key, (label, color, style) in styles.items():
        points = [(p.frames, p.total_bytes[key] / MIB) for p in report.sweep if key in p.total_bytes]
        if points:
            right.plot(*zip(*points), style, marker="o", color=color, label=label)
            highest = max(highest, max(y for _, y in points))
    b, _, _, h, w = report.input_shape
    right.set_xlabel("clip length T (frames)")
    right.set_ylabel("training memory, MiB (saved tensors + params + grads + optimizer)")
    right.set_title(f"Training memory, batch {b}, {h}×{w} frames, {report.settings['optimizer']}")
    budget = report.fits.budget_bytes / MIB if report.fits is not None and report.fits.frame_size == h else None
    if budget is not None and budget <= 1.5 * highest:  # a far-away budget line would flatten the curves
        right.axhline(budget, color="black", linewidth=0.8, linestyle=":", label="memory budget")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "png", force=force, inputs=inputs) as staging:
        fig.savefig(staging, format="png", dpi=110, metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    plt.close(fig)
    return Path(path)
