"""Coverage matrix (issue #13 deliverable 5): real video architectures through every stjfd step, on CPU.

    python benchmarks/coverage_matrix.py [--models r3d_18,mc3_18,...] [--threads 2] [--json]

For each model (random weights, seed 0, a small input; the PyTorchVideo ones only when ``pytorchvideo``
is importable) the script checks, with the library calls a user would make:

1. full rank is exact: ``convert_model(model, ConvertConfig(full_rank=True))``, then
   ``parity.compare_models`` in float32; its relative L2 error must stay below ``FULL_RANK_REL_TOL``;
2. default conversion: decomposed Conv3d count, parameter ratio and ``report.warnings`` (the low-savings
   warning is expected where the model's parameters sit in pointwise/depthwise convs, e.g. CSN);
3. one alternating step per stage: ``memory.measure_training_step`` on ``stage_clip_shape(shape, stage,
   2, 2)`` for the temporal and the spatial stage (a real forward, backward and SGD step); fixed-kernel
   pools the downsampled clip no longer fits are adapted and named in ``adapted_pools``;
4. ONNX: ``export.export_onnx(converted, path, input_shape=shape, runs=0)`` and its onnxruntime validation;
5. ``report.memory_report(converted, shape, training=False)``, its clip sweep at the clip's own length only
   (the default sweep, 4–32 frames on the meta device, would take most of the matrix's time).

A check that raises records the error (type and message) instead of stopping the matrix. The table is
Markdown; ``--json`` prints the raw results instead. ``tests/test_coverage_matrix.py`` imports
:func:`check_model` and asserts every check for every model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.errors import StjfdError
from stjfd_convert.export import export_onnx
from stjfd_convert.inputs import (
    InputShape,
    format_input_shape,
    input_shape_to_json,
    normalize_input_shape,
    primary_shape,
)
from stjfd_convert.memory import measure_training_step
from stjfd_convert.parity import compare_models
from stjfd_convert.report import memory_report
from stjfd_convert.stages import stage_clip_shape

# Full rank keeps every atom: the converted model computes the same function up to float32 rounding,
# which deep nets (50 layers, random BN statistics) amplify somewhat. Relative L2 over all outputs.
FULL_RANK_REL_TOL = 1e-4
SEED = 0
CHECKS = ("full_rank", "convert", "stages", "onnx", "report")
STAGES = ("temporal", "spatial")
SPATIAL_DOWNSAMPLE = 2
TEMPORAL_DOWNSAMPLE = 2


@dataclass(frozen=True)
class Case:
    """One architecture of the matrix: how to build it with random weights, and the clip it is fed."""

    name: str
    family: str  # torchvision | pytorchvideo
    build: Callable[[], nn.Module]
    input_shape: InputShape
    slow: bool = True  # the test marks it slow
    expect_low_savings: bool = False  # the default conversion must warn that it saves little
    note: str = ""  # a one-line remark shown in the table
    # Checks that cannot pass for a reason outside stjfd (check → one-line reason); the check must then end
    # in a clean StjfdError (what a user sees), never an internal error.
    limitations: dict[str, str] = field(default_factory=dict)


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import video

        return getattr(video, name)(weights=None, **kwargs)

    return build


def _mvit_v2_s_at(temporal_size: int, spatial_size: tuple[int, int]) -> Callable[[], nn.Module]:
    """torchvision's mvit_v2_s, its blocks unchanged, with the token grid (relative positions, pooled sizes)
    built for a smaller clip: ``mvit_v2_s`` itself fixes 16×224² and takes no size arguments."""

    def build() -> nn.Module:
        from unittest import mock

        from torchvision.models.video import mvit

        captured: dict[str, Any] = {}
        with mock.patch.object(mvit, "_mvit", lambda **kwargs: captured.update(kwargs)):
            mvit.mvit_v2_s(weights=None)
        captured.update(spatial_size=spatial_size, temporal_size=temporal_size)
        return mvit._mvit(**captured)

    return build


def _ptv(module: str, builder: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import importlib

        return getattr(importlib.import_module(f"pytorchvideo.models.{module}"), builder)(**kwargs)

    return build


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("r3d_18", "torchvision", _tv("r3d_18"), (1, 3, 8, 64, 64)),
        Case("mc3_18", "torchvision", _tv("mc3_18"), (1, 3, 4, 32, 32), slow=False),
        Case("r2plus1d_18", "torchvision", _tv("r2plus1d_18"), (1, 3, 8, 64, 64)),
        # S3D ends in AvgPool3d((2, 7, 7), stride 1): its input must reach 2×7×7 at stride (8, 32, 32).
        Case("s3d", "torchvision", _tv("s3d"), (1, 3, 16, 224, 224), note="fixed head pool: full 16×224² input"),
        Case(
            "mvit_v2_s",
            "torchvision",
            _mvit_v2_s_at(8, (64, 64)),
            (1, 3, 8, 64, 64),
            expect_low_savings=True,
            note="token grid built for 8×64²",
            limitations={
                "stage_temporal": "MViT's token grid is fixed when it is built: a downsampled clip cannot pass",
                "stage_spatial": "MViT's token grid is fixed when it is built: a downsampled clip cannot pass",
                "onnx": "onnxruntime fails on the TorchScript exporter's graph of MViT's pool_skip (the dense model too)",
            },
        ),
        Case("swin3d_t", "torchvision", _tv("swin3d_t"), (1, 3, 8, 64, 64), expect_low_savings=True),
        Case(
            "x3d_xs",
            "pytorchvideo",
            _ptv("x3d", "create_x3d", input_clip_length=4, input_crop_size=64, depth_factor=2.2),
            (1, 3, 4, 64, 64),
            expect_low_savings=True,  # depthwise 3×3×3 and pointwise convs
        ),
        Case(
            "slow_r50",
            "pytorchvideo",
            _ptv("resnet", "create_resnet", model_depth=50, stem_conv_kernel_size=(1, 7, 7),
                 head_pool_kernel_size=(4, 2, 2)),
            (1, 3, 4, 64, 64),
        ),
        Case(
            "csn_r50",
            "pytorchvideo",
            _ptv("csn", "create_csn", model_depth=50, head_pool_kernel_size=(1, 4, 4)),
            (1, 3, 8, 64, 64),
            expect_low_savings=True,
        ),
        Case(
            "r2plus1d_r50",
            "pytorchvideo",
            _ptv("r2plus1d", "create_r2plus1d", model_depth=50, dropout_rate=0.5, head_pool_kernel_size=(2, 2, 2)),
            (1, 3, 8, 64, 64),
        ),
        Case(
            "slowfast_r50",
            "pytorchvideo",
            _ptv("slowfast", "create_slowfast", model_depth=50, slowfast_fusion_conv_kernel_size=(7, 1, 1),
                 head_pool_kernel_sizes=((2, 2, 2), (8, 2, 2))),
            ((1, 3, 2, 64, 64), (1, 3, 8, 64, 64)),
        ),
    )
}


def available(case: Case) -> bool:
    """torchvision cases always; PyTorchVideo ones when it imports."""
    if case.family != "pytorchvideo":
        return True
    try:
        import pytorchvideo  # noqa: F401
    except ImportError:
        return False
    return True


def _error(exc: BaseException) -> str:
    hint = getattr(exc, "hint", None) if isinstance(exc, StjfdError) else None
    hint = f" ({hint})" if hint and hint not in str(exc) else ""
    return f"{type(exc).__name__}: {exc}{hint}"


def build_model(name: str) -> nn.Module:
    """The case's model with seeded random weights, in eval mode."""
    torch.manual_seed(SEED)
    return CASES[name].build().eval()


def check_model(name: str, workdir: str | Path | None = None, checks: Sequence[str] = CHECKS) -> dict[str, Any]:
    """Run ``checks`` (default: all of :data:`CHECKS`; the default conversion always runs) on one model.

    A check that raises is recorded in ``errors`` (check → ``Type: message``) and the others go on.
    """
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; choose from {CHECKS}")
    case = CASES[name]
    shape = case.input_shape
    start = time.perf_counter()
    result: dict[str, Any] = {
        "model": name,
        "family": case.family,
        "input_shape": input_shape_to_json(shape),
        "note": case.note,
        "expect_low_savings": case.expect_low_savings,
        "checks": list(checks),
        "errors": {},
        "limited": {},  # check → {"reason", "error"}: a documented limitation, ended in a clean StjfdError
        "check_seconds": {},
    }
    errors: dict[str, str] = result["errors"]

    def fail(check: str, exc: BaseException) -> None:
        reason = case.limitations.get(check)
        if reason is not None and isinstance(exc, StjfdError):
            result["limited"][check] = {"reason": reason, "error": _error(exc)}
        else:
            errors[check] = _error(exc)

    timings: dict[str, float] = result["check_seconds"]
    model = build_model(name)
    tick = time.perf_counter()

    def lap(check: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[check] = now - tick
        tick = now

    if "full_rank" in checks:
        try:
            exact, _ = convert_model(model, ConvertConfig(full_rank=True))
            parity = compare_models(model, exact, shape, seed=SEED)
            result["full_rank_rel_l2"] = parity.rel_l2
            result["full_rank_max_abs"] = parity.max_abs
            del exact
        except Exception as exc:  # noqa: BLE001 — recorded, the matrix goes on
            fail("full_rank", exc)
        lap("full_rank")

    try:
        converted, report = convert_model(model)
    except Exception as exc:  # noqa: BLE001
        fail("convert", exc)
        result["seconds"] = time.perf_counter() - start
        return result
    result.update(
        conv3d_layers=len(report.layers),
        decomposed_layers=len(report.decomposed),
        decomposed_names=[layer.name for layer in report.decomposed],
        params_before=report.params_before,
        params_after=report.params_after,
        param_ratio=report.ratio,
        touchable_share=report.touchable_share,
        warnings=list(report.warnings),
        low_savings_warning=any("saves only" in w for w in report.warnings),
    )
    lap("convert")

    result["stages"] = {}
    for stage in STAGES if "stages" in checks else ():
        try:
            clip = stage_clip_shape(shape, stage, SPATIAL_DOWNSAMPLE, TEMPORAL_DOWNSAMPLE)
            step = measure_training_step(converted, clip, stage=stage, steps=1)
            result["stages"][stage] = {
                "input_shape": input_shape_to_json(clip),
                "trainable_params": step.trainable_params,
                "frozen_params": step.frozen_params,
                "adapted_pools": list(step.adapted_pools),
            }
        except Exception as exc:  # noqa: BLE001
            fail(f"stage_{stage}", exc)
        lap(f"stage_{stage}")

    if "onnx" in checks:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            try:
                exported = export_onnx(converted, Path(tmp) / f"{name}.onnx", input_shape=shape, runs=0)
                result["onnx_validated"] = bool(exported.validation is not None and exported.validation.passed)
                result["onnx_checker"] = exported.checker_passed
            except Exception as exc:  # noqa: BLE001
                fail("onnx", exc)
        lap("onnx")

    if "report" in checks:
        try:
            frames = primary_shape(shape)[2]
            memory = memory_report(converted, shape, training=False, sweep_frames=[frames])
            result["report_ok"] = True
            result["report_layers"] = len(memory.layers)
        except Exception as exc:  # noqa: BLE001
            fail("report", exc)
        lap("report")

    result["seconds"] = time.perf_counter() - start
    return result


def passed(result: dict[str, Any]) -> dict[str, bool]:
    """Each check's verdict (those that ran), from a :func:`check_model` result."""
    stages = result.get("stages", {})
    verdicts = {
        "full_rank": result.get("full_rank_rel_l2", float("inf")) < FULL_RANK_REL_TOL,
        "convert": result.get("decomposed_layers", 0) > 0 and result.get("param_ratio", 1.0) < 1.0
        and result.get("low_savings_warning") == result["expect_low_savings"],
        "stages": all(stage in stages or f"stage_{stage}" in result["limited"] for stage in STAGES),
        "onnx": bool(result.get("onnx_validated")),
        "report": bool(result.get("report_ok")),
    }
    verdicts.update({check: True for check in result["limited"] if check in verdicts})
    return {check: verdict for check, verdict in verdicts.items() if check in result["checks"] or check == "convert"}


def _cell_stages(result: dict[str, Any]) -> str:
    if "stages" not in result["checks"]:
        return "—"
    cells = []
    for stage in STAGES:
        info = result.get("stages", {}).get(stage)
        if info is None:
            cells.append(f"{stage} — (limitation)" if f"stage_{stage}" in result["limited"] else f"{stage} ✗")
            continue
        pools = info["adapted_pools"]
        cells.append(f"{stage} ✓" + (f" (adapted: {', '.join(pools)})" if pools else ""))
    return "; ".join(cells)


def table(results: list[dict[str, Any]]) -> str:
    """The Markdown table of the README's Coverage section."""
    mark = {True: "✓", False: "✗"}
    rows = [
        (
            "| model | input shape | Conv3d decomposed / total | param ratio (default atoms) | full-rank rel. error "
            "| stages run (adapted pools) | ONNX validated | report | seconds | notes |"
        ),
        "|---|---|---:|---:|---:|---|---|---|---:|---|",
    ]
    for r in results:
        verdict = passed(r)
        shape = format_input_shape(normalize_input_shape(r["input_shape"]))
        notes = [r["note"]] if r["note"] else []
        if r.get("low_savings_warning"):
            notes.append("low-savings warning")
        notes += sorted({f"{limit['reason']}" for limit in r["limited"].values()})
        notes += [f"{check} failed: {message}" for check, message in r["errors"].items()]
        ratio = f"{r['param_ratio']:.3f}" if "param_ratio" in r else "—"
        counts = f"{r['decomposed_layers']} / {r['conv3d_layers']}" if "conv3d_layers" in r else "—"
        error = f"{r['full_rank_rel_l2']:.1e}" if "full_rank_rel_l2" in r else "—"

        def cell(check: str, r: dict[str, Any] = r, verdict: dict[str, bool] = verdict) -> str:
            return "— (limitation)" if check in r["limited"] else mark.get(verdict.get(check), "—")  # type: ignore[arg-type]
        rows.append(
            f"| {r['model']} | {shape} | {counts} | {ratio} | {error}{'' if verdict.get('full_rank', True) else ' ✗'} "
            f"| {_cell_stages(r)} | {cell('onnx')} | {cell('report')} "
            f"| {r['seconds']:.1f} "
            f"| {'; '.join(notes)} |"
        )
    return "\n".join(rows)


def footer(meta: dict[str, Any]) -> str:
    skipped = meta["skipped (pytorchvideo not importable)"]
    return (
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads; full-rank tolerance "
        f"{meta['full_rank_rel_tol']:.0e}" + (f"; skipped (no pytorchvideo): {', '.join(skipped)}" if skipped else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the raw results as JSON instead of the table")
    parser.add_argument("--table-from", metavar="FILE", nargs="+",
                        help="print the table of saved --json outputs (a later file's model replaces an earlier "
                        "one's); run nothing")
    args = parser.parse_args(argv)
    if args.table_from:
        merged: dict[str, dict[str, Any]] = {}
        for path in args.table_from:
            saved = json.loads(Path(path).read_text())
            merged.update((r["model"], r) for r in saved["results"])
        print(table([merged[name] for name in CASES if name in merged]))
        print()
        print(footer(saved["meta"]))
        return 0
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    results, skipped = [], []
    for name in names:
        if not available(CASES[name]):
            skipped.append(name)
            continue
        print(f"[{name}] …", file=sys.stderr, flush=True)
        results.append(check_model(name))
        print(f"[{name}] {results[-1]['seconds']:.1f} s, errors: {results[-1]['errors'] or 'none'}",
              file=sys.stderr, flush=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or platform.platform()}",
        "torch": torch.__version__,
        "threads": args.threads,
        "full_rank_rel_tol": FULL_RANK_REL_TOL,
        "skipped (pytorchvideo not importable)": skipped,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
    else:
        print(table(results))
        print()
        print(footer(meta))
    failed = [r["model"] for r in results if not all(passed(r).values())]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
