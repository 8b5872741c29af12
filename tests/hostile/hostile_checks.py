"""Shared check for the hostile-input suite: one clear error line, and the disk exactly as it was.

Every case builds its bad input under ``tmp_path``, then calls :func:`refused`, which snapshots every
path under ``tmp_path`` (with the sha256 of each file), runs ``stjfd ARGS`` in-process, asserts the
exit code and that the output is a single ``error: <what> — <fix>`` line naming the problem, and then
that the snapshot is unchanged: nothing left behind (no output, no staging folder) and nothing lost.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

from cli_helpers import CliOutcome, assert_one_error_line, run_cli


def tree_snapshot(root: Path) -> dict[str, str]:
    """``relative path → sha256`` (files), ``"dir"`` (folders) or ``"link → target"`` (symlinks, not followed)."""
    snapshot: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                snapshot[key] = f"link → {os.readlink(path)}"
            elif path.is_dir():
                snapshot[key] = "dir"
            else:
                try:
                    snapshot[key] = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError as exc:  # an unreadable file made by the test itself
                    snapshot[key] = f"unreadable ({exc.errno})"
    return snapshot


def refused(
    root: Path, args: Sequence[object], *fragments: str, exit_code: int = 2, cwd: Path | None = None
) -> str:
    """Run ``stjfd ARGS``; assert one error line containing every fragment and an unchanged ``root``."""
    before = tree_snapshot(root)
    previous = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        outcome: CliOutcome = run_cli([str(a) for a in args])
    finally:
        os.chdir(previous)
    line = assert_one_error_line(outcome, *fragments, exit_code=exit_code)
    after = tree_snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
    assert not (added or removed or changed), f"disk changed: added {added}, removed {removed}, changed {changed}"
    return line
