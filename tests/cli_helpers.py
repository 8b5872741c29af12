"""Helpers for the end-to-end CLI tests (tests/test_cli.py): tiny models on disk and output checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from typer.testing import CliRunner

from stjfd_convert.cli.main import app

# A model file the CLI imports with --model PATH:build. It prints while building so that the
# tests also see that user output never leaks into --json.
TINYNET_SOURCE = textwrap.dedent(
    '''
    from collections import OrderedDict

    from torch import nn


    def build(num_classes=4):
        print("building tinynet")
        return nn.Sequential(
            OrderedDict(
                stem=nn.Conv3d(3, 8, 3, padding=1),
                relu=nn.ReLU(),
                spatial=nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)),
                proj=nn.Conv3d(8, 8, 1),
                pool=nn.AdaptiveAvgPool3d(1),
                flat=nn.Flatten(),
                fc=nn.Linear(8, num_classes),
            )
        )
    '''
)
TINY_INPUT_SHAPE = "1,3,4,8,8"
# Conv3d names of the tiny model in module order, and which of them can be decomposed.
TINY_CONVS = ("stem", "spatial", "proj")
TINY_DECOMPOSABLE = ("stem", "spatial")

# A model with no Conv3d at all.
LINEAR_SOURCE = textwrap.dedent(
    '''
    from torch import nn


    def build():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    '''
)

# A model that validates its input with ``assert`` (as torchvision's torch._assert does).
ASSERTING_SOURCE = textwrap.dedent(
    '''
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(3, 4, 3)

        def forward(self, x):
            assert x.shape[1] == 3, "expected RGB clips"
            return self.conv(x)


    def build():
        return Net()
    '''
)


def tiny_reference_model(num_classes: int = 4) -> nn.Module:
    """The same architecture as TINYNET_SOURCE, built here (the checkpoint's state_dict comes from it)."""
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv3d(3, 8, 3, padding=1),
            relu=nn.ReLU(),
            spatial=nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)),
            proj=nn.Conv3d(8, 8, 1),
            pool=nn.AdaptiveAvgPool3d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(8, num_classes),
        )
    )


# Checkpoint weights come from their own seed so that they never equal a fresh init under the
# suite's global seed 0 (a loader that silently skipped the checkpoint would go unnoticed).
CHECKPOINT_SEED = 1234


def tiny_state_dict(seed: int = CHECKPOINT_SEED, num_classes: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return tiny_reference_model(num_classes).state_dict()


@dataclass
class TinyFiles:
    """A tiny model file and its checkpoint in one folder, and the --model value naming it."""

    folder: Path
    module: Path
    checkpoint: Path

    @property
    def model_arg(self) -> str:
        return f"{self.module}:build"

    def args(self, checkpoint: Path | None = None) -> list[str]:
        """``CHECKPOINT --model FILE:build --input-shape …`` (the usual start of a tiny convert)."""
        return [str(checkpoint or self.checkpoint), "--model", self.model_arg, "--input-shape", TINY_INPUT_SHAPE]


def write_tiny(folder: Path, seed: int = CHECKPOINT_SEED) -> TinyFiles:
    folder.mkdir(parents=True, exist_ok=True)
    module = folder / "tinynet.py"
    module.write_text(TINYNET_SOURCE)
    checkpoint = folder / "tiny.pth"
    torch.save(tiny_state_dict(seed), checkpoint)
    return TinyFiles(folder, module, checkpoint)


# --------------------------------------------------------------------------------------------
# Running the CLI
# --------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class CliOutcome:
    """What one CLI run produced. ``stderr`` is None where the runner mixes it into ``stdout``."""

    exit_code: int
    stdout: str
    stderr: str | None
    exception: BaseException | None = None

    @property
    def output(self) -> str:
        """Everything the user saw, both streams."""
        return self.stdout + (self.stderr or "")


def run_cli(args: Sequence[str]) -> CliOutcome:
    """Run ``stjfd ARGS`` in-process. Typer 0.29's runner keeps stderr apart (``result.stderr``);
    older Click runners raise ValueError there and mix it into ``result.stdout``."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    try:
        stderr: str | None = result.stderr
        stdout = result.stdout
    except ValueError:
        stderr, stdout = None, result.output
    return CliOutcome(result.exit_code, _ANSI.sub("", stdout), None if stderr is None else _ANSI.sub("", stderr),
                      result.exception)


def run_process(args: Sequence[str], cwd: Path) -> CliOutcome:
    """Run ``python -m stjfd_convert ARGS`` in a real process with a narrow, non-debug, uncoloured terminal."""
    env = {k: v for k, v in os.environ.items() if k not in ("STJFD_DEBUG", "FORCE_COLOR", "PYTHONWARNINGS")}
    env.update(COLUMNS="40", NO_COLOR="1", TERM="dumb")
    proc = subprocess.run(
        [sys.executable, "-m", "stjfd_convert", *[str(a) for a in args]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return CliOutcome(proc.returncode, proc.stdout, proc.stderr)


def nonempty_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_error_line(outcome: CliOutcome, *fragments: str, exit_code: int = 2) -> str:
    """Exactly one non-empty line in all output, on stderr, ``error: <what> — <fix>``; returns it."""
    assert "Traceback" not in outcome.output, outcome.output
    assert outcome.exit_code == exit_code, f"exit {outcome.exit_code}, expected {exit_code}:\n{outcome.output}"
    if outcome.exception is not None:
        assert isinstance(outcome.exception, SystemExit), repr(outcome.exception)
    lines = nonempty_lines(outcome.output)
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{outcome.output}"
    line = lines[0]
    assert line.startswith("error:"), line
    if outcome.stderr is not None:
        assert outcome.stdout.strip() == "", f"error output went to stdout: {outcome.stdout!r}"
    assert not line.startswith("error: internal error"), line
    assert " — " in line, f"the error gives no hint on what to do: {line}"
    lowered = line.lower()
    for fragment in fragments:
        assert fragment.lower() in lowered, f"{fragment!r} not in: {line}"
    return line


def leftovers(target: Path) -> list[str]:
    """Staging/probe/backup siblings that an interrupted or failed write could leave next to ``target``."""
    parent = target.parent
    if not parent.is_dir():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{target.name}."))


def assert_no_output(target: Path) -> None:
    assert not target.exists(), f"{target} was created by a failed run"
    assert leftovers(target) == [], f"stray files next to {target}: {leftovers(target)}"
