"""Packaging: a non-editable install (a wheel built in a temp dir) ships every package and the sample model,
and `stjfd demo` runs from it in any folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SAMPLE_FILES = ("sample_model.safetensors", "sample_model.json", "MODEL_CARD.md")
# What the wheel is built from: the files `pip install .` reads.
SOURCES = ("pyproject.toml", "README.md", "stjfd_convert", "sample_models")


def _declared_packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_is_declared() -> None:
    on_disk = sorted(
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "stjfd_convert").rglob("__init__.py")
        if "__pycache__" not in path.parts
    )
    declared = _declared_packages()
    assert set(on_disk) <= set(declared), f"add to pyproject's packages: {sorted(set(on_disk) - set(declared))}"
    assert "stjfd_convert.sample_models" in declared


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project copied to a temp dir, built into a wheel, installed (no deps) into a target folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    dist, target = root / "dist", root / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(dist), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("stjfd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for package in _declared_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    for name in SAMPLE_FILES:
        assert f"stjfd_convert/sample_models/{name}" in names, name
    install = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    return target


def _run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("STJFD_DEBUG", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), NO_COLOR="1", TERM="dumb", COLUMNS="200")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_installed_copy_finds_its_sample_model(installed: Path, tmp_path: Path) -> None:
    probe = (
        "import json, stjfd_convert; from stjfd_convert.sample import sample_model_files; "
        "f = sample_model_files(); print(json.dumps([stjfd_convert.__file__, str(f.weights), f.info['sha256']]))"
    )
    outcome = _run_installed(installed, tmp_path, "-c", probe)
    assert outcome.returncode == 0, outcome.stderr
    module, weights, sha = json.loads(outcome.stdout)
    assert Path(module).is_relative_to(installed) and Path(weights).is_relative_to(installed)
    assert sha == json.loads((REPO / "sample_models" / "sample_model.json").read_text())["sha256"]


@pytest.mark.slow
def test_demo_runs_from_the_installed_copy(installed: Path, tmp_path: Path) -> None:
    outcome = _run_installed(installed, tmp_path, "-m", "stjfd_convert", "demo", "--json")
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    result = json.loads(outcome.stdout)
    assert result["reload"]["identical"] and Path(result["sample_model"]["weights"]).is_relative_to(installed)
