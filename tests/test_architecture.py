"""The layering rules of ARCHITECTURE.md, checked on the source: only cli/ talks to the terminal, imports
flow downward, and no module outgrows one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stjfd_convert"
TERMINAL_LIBRARIES = ("typer", "rich", "click")
# Leaves import nothing from the package (errors, formats) or only other leaves.
LEAVES = {"errors.py": set(), "formats.py": set(), "config.py": {"errors"}, "atomic.py": {"errors", "formats"}}
# A module over this many lines is split into a package (DEVELOPERS.md: ~600 lines).
MAX_MODULE_LINES = 650


def library_modules() -> list[Path]:
    """Every module below cli/ (the entry point ``__main__`` only calls the CLI)."""
    return sorted(
        p for p in PACKAGE.rglob("*.py")
        if "cli" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py" and "__pycache__" not in p.parts
    )


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported_roots(tree: ast.Module) -> set[str]:
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_module_never_talks_to_the_terminal(path: Path) -> None:
    tree = _tree(path)
    assert not _imported_roots(tree) & set(TERMINAL_LIBRARIES), f"{path.name} imports a terminal library"
    prints = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
    assert not prints, f"{path.name} prints on lines {prints}: report through a callback or a result instead"
    writes = [
        n.lineno for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and n.attr in ("stdout", "stderr") and getattr(n.value, "id", None) == "sys"
    ]
    assert not writes, f"{path.name} uses sys.stdout/stderr on lines {writes}"


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_module_never_imports_the_cli(path: Path) -> None:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert not (module == "cli" or module.startswith("cli.") or ".cli" in f".{module}"), (
                f"{path.name}:{node.lineno} imports the CLI; the CLI imports the library, never the reverse"
            )


@pytest.mark.parametrize("name", sorted(LEAVES))
def test_leaf_modules_import_only_leaves(name: str) -> None:
    tree = _tree(PACKAGE / name)
    internal = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            internal.add((node.module or "").split(".")[0] or "__init__")
    internal.discard("__init__")  # `from . import __version__`
    assert internal <= LEAVES[name], f"{name} imports {sorted(internal - LEAVES[name])}"


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_fits_in_one_sitting(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it into a package"


def test_architecture_document_matches_the_tree() -> None:
    """Every package and module of stjfd_convert is named in ARCHITECTURE.md, and nothing it names is gone."""
    document = (PACKAGE.parent / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "__pycache__" in path.parts or path.name in ("__init__.py", "__main__.py"):
            continue
        if path.name not in document:
            missing.append(str(path.relative_to(PACKAGE)))
    for package in sorted(p.parent for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE):
        if f"{package.name}/" not in document:
            missing.append(f"{package.name}/")
    assert not missing, f"ARCHITECTURE.md does not mention: {missing}"
    import re

    named = set(re.findall(r"`([a-z_]+\.py)`|([a-z_]+\.py)\b", document))
    files = {p.name for p in PACKAGE.rglob("*.py")} | {"train_sample_model.py", Path(__file__).name}
    gone = sorted({a or b for a, b in named} - files)
    assert not gone, f"ARCHITECTURE.md names modules that do not exist: {gone}"


def test_help_does_not_import_torch() -> None:
    """`stjfd --help` (and every command's --help) answers without importing torch (seconds saved)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from stjfd_convert.cli.main import app\n"
        "for args in (['--help'], ['convert', '--help'], ['finetune', '--help'], ['export', '--help']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "print('torch' in sys.modules)\n"
    )
    outcome = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert outcome.returncode == 0, outcome.stderr
    assert outcome.stdout.strip() == "False", "a CLI module imports torch at import time"


def test_public_api_named_in_the_readme_imports() -> None:
    """Every `from stjfd_convert import …` name and `stjfd_convert.x.y` entry point the README names exists."""
    import importlib
    import re

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    names = [
        ("stjfd_convert", name.strip())
        for line in re.findall(r"^from stjfd_convert import (.+)$", readme, flags=re.M)
        for name in line.split(",")
    ]
    names += [tuple(dotted.rsplit(".", 1)) for dotted in re.findall(r"`(stjfd_convert(?:\.[a-z_]+)+)`", readme)]
    assert len(names) >= 8, names
    for module, attribute in names:
        assert hasattr(importlib.import_module(module), attribute), f"{module}.{attribute}"
