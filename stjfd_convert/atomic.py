"""Atomic outputs: write into a temporary sibling, then rename, so no half-written result remains."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def _apply_umask(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; published outputs get the usual umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _describe_os_error(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_writable_target(target: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Fail early (before any long work) if ``target`` cannot be created.

    Creates the parent folder if needed and probes it with a temporary file.
    """
    target = Path(target).expanduser().absolute()
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise OutputError(f"{target} is the current folder or one of its parents", "choose another -o")
    if target.exists() and not overwrite:
        if target.is_dir() and not any(target.iterdir()):
            pass  # an empty folder may be reused
        else:
            raise OutputError(f"{target} already exists", "pass --force to replace it, or choose another -o")
    # Probe the nearest existing ancestor: a failed run must not leave new folders behind.
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.probe-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write to {parent}: {_describe_os_error(exc)}", "choose another output location with -o"
        ) from None
    return target


def make_staging_dir(target: Path, hint: str = "choose another -o") -> Path:
    """A new hidden folder ``.<name>.tmp-*`` beside ``target`` (creating its parent folders)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {_describe_os_error(exc)}", hint) from None


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target`` in one rename.

    On any exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = check_writable_target(target, overwrite=overwrite)
    staging = make_staging_dir(target)
    try:
        yield staging
        _apply_umask(staging, 0o777)
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
        os.replace(staging, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; renamed onto ``target`` on success."""
    target = check_writable_target(target, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {_describe_os_error(exc)}", "choose another output") from None
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-", suffix=target.suffix)
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        _apply_umask(staging, 0o666)
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
