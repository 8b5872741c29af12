"""The output-safety policy: atomic outputs that never replace what stjfd did not write.

Every command that writes goes through :func:`check_output` (early, before long work) and
:func:`atomic_directory` / :func:`atomic_file` (at the end). The rules:

- An existing output is refused unless ``force`` is given (an empty folder may be reused).
- With ``force`` only a path stjfd itself wrote is replaced, recognised by its markers
  (:mod:`stjfd_convert.formats`): a converted-model folder, a run folder, a demo folder holding only
  those, an ONNX file stjfd produced, a report it wrote. A folder holding anything else, a plain
  file, a link, is never replaced.
- Never the command's own input, nor a folder that contains an input, nor a path inside a dataset.
- Results are staged in a hidden sibling (``.NAME.tmp-PID-*``) and renamed into place; a killed run's
  staging and ``.NAME.old-PID`` leftovers are cleaned (an interrupted swap is rolled back) by the
  next run that writes the same path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import formats
from .errors import OutputError

KINDS = ("converted", "run", "demo", "onnx", "markdown", "png", "internal")
_LEFTOVER = re.compile(r"^(tmp|old|probe)-(\d+)(?:-.*)?$")
_LEGACY_TMP = re.compile(r"^tmp-[A-Za-z0-9_]{8}(?:\..*)?$")  # mkdtemp/mkstemp names of stjfd < 0.2


def _apply_umask(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; published outputs get the usual umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def give_default_mode(path: Path) -> None:
    """The mode ``open()`` gives a new file (0666 minus the umask), for a file a library wrote privately
    (safetensors writes 0600), so it matches the other files of its output."""
    _apply_umask(path, 0o666)


def _describe_os_error(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# --------------------------------------------------------------------------------------------
# Recognising what stjfd wrote
# --------------------------------------------------------------------------------------------


def _json_format(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def _entries(path: Path) -> set[str] | None:
    try:
        return {entry.name for entry in path.iterdir()}
    except OSError:
        return None


def is_converted_output(path: Path) -> bool:
    """A folder with a stjfd manifest and nothing but the files a converted folder holds."""
    names = _entries(path) if path.is_dir() and not path.is_symlink() else None
    return (
        names is not None
        and names <= formats.CONVERTED_ENTRIES
        and _json_format(path / formats.MANIFEST_FILE) == formats.CONVERTED_FORMAT
    )


def is_run_output(path: Path) -> bool:
    """A fine-tuning run folder: config.json, logs, curve, and last/ best/ converted folders only."""
    names = _entries(path) if path.is_dir() and not path.is_symlink() else None
    if names is None or not names <= formats.RUN_FILES | formats.RUN_CHECKPOINTS:
        return False
    if _json_format(path / formats.CONFIG_FILE) != formats.RUN_FORMAT:
        return False
    return all(is_converted_output(path / name) for name in names & formats.RUN_CHECKPOINTS)


def is_demo_output(path: Path) -> bool:
    """The folder `stjfd demo -o` fills: its converted model and its run, nothing else."""
    names = _entries(path) if path.is_dir() and not path.is_symlink() else None
    if not names or not names <= {formats.DEMO_CONVERTED_DIR, formats.DEMO_RUN_DIR}:
        return False
    converted, run = path / formats.DEMO_CONVERTED_DIR, path / formats.DEMO_RUN_DIR
    return (not converted.exists() or is_converted_output(converted)) and (not run.exists() or is_run_output(run))


def _head(path: Path, size: int = 4096) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""


def is_onnx_output(path: Path) -> bool:
    """An ONNX file whose producer_name (ModelProto field 2, serialised near the start) is stjfd's."""
    marker = formats.ONNX_PRODUCER.encode()
    head = _head(path, 256)
    return path.is_file() and re.search(rb"\x12[\x01-\x7f]" + re.escape(marker), head[:64]) is not None


def is_markdown_output(path: Path) -> bool:
    return path.is_file() and _head(path, 256).startswith(formats.MARKDOWN_TITLE.encode())


def is_png_output(path: Path) -> bool:
    """A PNG whose tEXt "Software" chunk names stjfd (matplotlib writes it before the image data)."""
    head = _head(path, 8192)
    return (
        path.is_file()
        and head.startswith(b"\x89PNG\r\n\x1a\n")
        and b"tEXtSoftware\x00" + formats.PNG_SOFTWARE.encode() in head
    )


_EXAMPLE = {"onnx": "model.onnx", "markdown": "report.md", "png": "report.png"}

_RECOGNISERS = {
    "converted": is_converted_output,
    "run": is_run_output,
    "demo": is_demo_output,
    "onnx": is_onnx_output,
    "markdown": is_markdown_output,
    "png": is_png_output,
}

_WHAT = {
    "converted": "a converted-model folder",
    "run": "a fine-tuning run folder",
    "demo": "a demo folder",
    "onnx": "an ONNX file",
    "markdown": "a Markdown report",
    "png": "a PNG",
}


def written_by_stjfd(path: str | os.PathLike[str], kind: str) -> bool:
    """True if ``path`` is an output of ``kind`` that stjfd wrote (and holds nothing else)."""
    return _RECOGNISERS[kind](Path(path))


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(path).expanduser().absolute().resolve()


def _check_inputs(target: Path, inputs: Iterable[str | os.PathLike[str]], datasets: Iterable[str | os.PathLike[str]]) -> None:
    resolved = target.resolve()
    for given in inputs:
        source = _resolved(given)
        if source == resolved or resolved in source.parents:
            what = "is" if source == resolved else "contains"
            raise OutputError(
                f"the output {target} {what} this command's input {given}; stjfd never overwrites an input",
                "choose another output path",
            )
    for given in datasets:
        root = _resolved(given)
        if root == resolved or resolved in root.parents or root in resolved.parents:
            where = "is" if root == resolved else ("contains" if resolved in root.parents else "is inside")
            raise OutputError(
                f"the output {target} {where} the dataset {given}; the data must stay as it is",
                "write the output outside the dataset folder",
            )


def _check_existing(target: Path, kind: str, force: bool) -> None:
    if target.is_symlink():
        raise OutputError(f"{target} is a symbolic link; stjfd does not write through links", "choose another output path")
    if not target.exists() or kind == "internal":
        return
    if target.is_dir() and kind in _EXAMPLE:
        raise OutputError(f"{target} is a folder", f"pass the path of the file to write, e.g. {target / _EXAMPLE[kind]}")
    if target.is_dir() and not any(target.iterdir()):
        return  # an empty folder may be reused
    if not force:
        raise OutputError(f"{target} already exists", "pass --force to replace it, or choose another output path")
    if not _RECOGNISERS[kind](target):
        found = "a folder holding files stjfd did not write" if target.is_dir() else "a file stjfd did not write"
        raise OutputError(
            f"--force replaces only {_WHAT[kind]} written by stjfd, and {target} is {found}",
            "move it away yourself, or choose another output path",
        )


def _check_external_data(target: Path, kind: str, force: bool) -> None:
    """An ONNX export may write ``NAME.data`` beside ``NAME``; never clobber someone else's."""
    if kind != "onnx":
        return
    external = target.parent / f"{target.name}{formats.ONNX_EXTERNAL_SUFFIX}"
    if (external.exists() or external.is_symlink()) and not (force and is_onnx_output(target)):
        raise OutputError(
            f"{external} already exists and does not belong to an ONNX file stjfd wrote at {target}",
            "move it away, or choose another output path",
        )


def _probe_parent(target: Path) -> None:
    # Probe the nearest existing ancestor: a failed run must not leave new folders behind.
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{target.name}.probe-{os.getpid()}-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write to {parent}: {_describe_os_error(exc)}", "choose another output location"
        ) from None


def check_output(
    target: str | os.PathLike[str],
    kind: str,
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    datasets: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Apply the policy to ``target`` before any long work; returns it as an absolute path.

    ``kind`` is what will be written there (one of :data:`KINDS`); ``inputs`` are the paths the
    command reads (never replaced, nor a folder holding one); ``datasets`` are data roots (the output
    may be neither one of them, nor contain one, nor lie inside one). Also cleans leftovers of an
    earlier killed run beside ``target``. Raises :class:`OutputError` with what to do instead.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    target = Path(target).expanduser().absolute()
    cwd = Path.cwd().resolve()
    if target.resolve() == cwd or target.resolve() in cwd.parents:
        raise OutputError(f"{target} is the current folder or one of its parents", "choose another output path")
    _check_inputs(target, inputs, datasets)
    clean_leftovers(target)
    _check_existing(target, kind, force)
    _check_external_data(target, kind, force)
    _probe_parent(target)
    return target


# --------------------------------------------------------------------------------------------
# Staging, publishing and leftovers
# --------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def clean_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.NAME.tmp-*``/``.NAME.probe-*`` of dead processes beside ``target``; an ``.NAME.old-PID``
    of a dead process is moved back to ``target`` if that is missing (an interrupted replace), else removed.
    Returns what was removed or restored."""
    target = Path(target).expanduser().absolute()
    prefix = f".{target.name}."
    try:
        names = [entry.name for entry in target.parent.iterdir() if entry.name.startswith(prefix)]
    except OSError:
        return []
    cleaned = []
    for name in names:
        rest = name[len(prefix):]
        match = _LEFTOVER.match(rest)
        if match is None and not _LEGACY_TMP.match(rest):
            continue
        if match is not None and _pid_alive(int(match.group(2))):
            continue
        path = target.parent / name
        if match is not None and match.group(1) == "old" and not target.exists() and not target.is_symlink():
            with contextlib.suppress(OSError):
                os.replace(path, target)
                cleaned.append(path)
                continue
        _remove(path)
        cleaned.append(path)
    return cleaned


def make_staging_dir(target: Path, hint: str = "choose another output path") -> Path:
    """A new hidden folder ``.<name>.tmp-<pid>-*`` beside ``target`` (creating its parent folders)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {_describe_os_error(exc)}", hint) from None


def _publish(staging: Path, target: Path) -> None:
    """Rename ``staging`` onto ``target``; an existing target is moved aside first and removed after."""
    if not staging.is_dir() and not target.is_dir():
        os.replace(staging, target)  # a file replaces a file atomically, no window without one
        return
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    try:
        os.replace(staging, target)
    except BaseException:
        if backup is not None:
            os.replace(backup, target)
        raise
    if backup is not None:
        _remove(backup)


def _make_staging_file(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-", suffix=target.suffix)
    except OSError as exc:
        raise OutputError(f"cannot write to {target.parent}: {_describe_os_error(exc)}", "choose another output path") from None
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike[str],
    kind: str,
    *,
    directory: bool,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    datasets: Iterable[str | os.PathLike[str]] = (),
) -> Iterator[Path]:
    """Yield a hidden staging folder (``directory``) or file path beside ``target``; on success it
    replaces ``target`` in one rename.

    :func:`check_output` decides whether ``target`` may be written. On any exception the staging
    entry is removed and ``target`` is left as it was. ``kind="internal"`` is for stjfd's own files
    inside a folder it owns (a manifest, metrics.jsonl).
    """
    target = check_output(target, kind, force=force, inputs=inputs, datasets=datasets)
    staging = make_staging_dir(target) if directory else _make_staging_file(target)
    try:
        yield staging
        _apply_umask(staging, 0o777 if directory else 0o666)
        _publish(staging, target)
    except BaseException:
        _remove(staging)
        raise


#: ``atomic_directory(target, kind, force=…, inputs=…, datasets=…)``: stage a folder, rename it into place.
atomic_directory = functools.partial(atomic_output, directory=True)
#: ``atomic_file(target, kind, force=…, inputs=…, datasets=…)``: stage a file, rename it into place.
atomic_file = functools.partial(atomic_output, directory=False)
