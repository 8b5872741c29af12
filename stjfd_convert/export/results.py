"""What an export reports: the validation of every output, the file's size and latency, the result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..inputs import format_input_shape, input_shape_to_json


@dataclass
class OutputCheck:
    """One output of one validation clip: ORT vs PyTorch."""

    clip: int
    input_shape: tuple[int, ...]
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel_diff: float  # ‖ort − torch‖ / ‖torch‖
    ok: bool
    problem: str | None = None  # shape/dtype/non-finite mismatch, else None


@dataclass
class ValidationReport:
    """Every output of every clip, the tolerance used and the verdict."""

    atol: float
    checks: list[OutputCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def mismatches(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.checks), default=0.0)

    @property
    def rel_diff(self) -> float:
        return max((c.rel_diff for c in self.checks), default=0.0)

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        seen: dict[int, tuple[int, ...]] = {}
        for c in self.checks:
            seen.setdefault(c.clip, c.input_shape)
        return list(seen.values())

    def summary(self) -> str:
        """One line: verdict, clips, tolerance, worst differences and every mismatch."""
        head = (
            f"{'PASS' if self.passed else 'FAIL'}: {len(self.input_shapes)} clips, atol {self.atol:.1e}, "
            f"max abs diff {self.max_abs:.3e}, max relative diff {self.rel_diff:.3e}"
        )
        if self.passed:
            return head
        listed = "; ".join(
            f"clip {c.clip} ({format_input_shape(c.input_shape)}) {c.name}: "
            + (c.problem or f"max abs {c.max_abs:.3e} > {self.atol:.1e}")
            for c in self.mismatches
        )
        return f"{head}; {len(self.mismatches)} of {len(self.checks)} outputs mismatch: {listed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "atol": self.atol,
            "max_abs": self.max_abs,
            "rel_diff": self.rel_diff,
            "input_shapes": [input_shape_to_json(s) for s in self.input_shapes],
            "checks": [asdict(c) for c in self.checks],
            "mismatches": len(self.mismatches),
        }


@dataclass
class GraphStats:
    """Size, stored parameters and onnxruntime latency of one ONNX file."""

    file_bytes: int
    files: list[str]
    parameters: int  # elements of all initializers (weights as stored in the file)
    latency_ms: float | None = None  # median of ``runs`` timed runs after warm-up
    latency_runs: int = 0
    latency_all_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and checked."""

    path: Path | None  # None when a failed file was removed
    source: str
    mode: str
    forms: dict[str, str]
    plan_source: str
    exporter: str
    opset: int
    input_shape: tuple[int, ...]
    dynamic_axes: tuple[str, ...]
    fp16: bool
    external_data: bool
    checker_passed: bool
    stats: GraphStats
    validation: ValidationReport | None
    latency_shape: tuple[int, ...]
    threads: int | None
    original: GraphStats | None = None  # the dense model's export, with compare=True
    normalization: dict[str, list[float]] | None = None
    architecture: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    kept_invalid: bool = False
    plan: Any = None  # the ExecutionPlan measured in onnxruntime (``measure=True``), else None
    plan_seconds: float = 0.0
    plan_saved: Path | None = None  # the manifest it was stored in (a converted folder as input)

    @property
    def form_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for form in self.forms.values():
            counts[form] = counts.get(form, 0) + 1
        return counts

    def ratios(self) -> dict[str, float | None]:
        """This export relative to the original's (file size, parameters, latency)."""
        if self.original is None:
            return {}
        o, s = self.original, self.stats
        return {
            "file_bytes": s.file_bytes / o.file_bytes if o.file_bytes else None,
            "parameters": s.parameters / o.parameters if o.parameters else None,
            "latency": s.latency_ms / o.latency_ms if s.latency_ms and o.latency_ms else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "source": self.source,
            "mode": self.mode,
            "forms": self.forms,
            "form_counts": self.form_counts,
            "plan_source": self.plan_source,
            "exporter": self.exporter,
            "opset": self.opset,
            "input_shape": input_shape_to_json(self.input_shape),
            "dynamic_axes": list(self.dynamic_axes),
            "fp16": self.fp16,
            "external_data": self.external_data,
            "checker_passed": self.checker_passed,
            **{k: v for k, v in self.stats.to_dict().items()},
            "validation": self.validation.to_dict() if self.validation else None,
            "latency_shape": input_shape_to_json(self.latency_shape),
            "threads": self.threads,
            "original": self.original.to_dict() if self.original else None,
            "ratios_to_original": self.ratios(),
            "normalization": self.normalization,
            "architecture": self.architecture,
            "notes": self.notes,
            "seconds": self.seconds,
            "kept_invalid": self.kept_invalid,
            "measured_plan": self.plan.to_dict() if self.plan is not None else None,
            "plan_seconds": self.plan_seconds,
            "plan_saved": str(self.plan_saved) if self.plan_saved else None,
        }
