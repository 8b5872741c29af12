"""Data safety (issue 10): nothing a user had is ever lost, a model folder never runs code.

- ``--force`` replaces only what stjfd wrote, never an input, a dataset or a folder holding other files;
- a resumed run that had finished changes nothing on disk;
- a manifest naming an arbitrary callable is refused by every command that loads folders;
- export, report and demo refuse an existing output without ``--force``;
- a killed write's staging folder is cleaned by the next run;
- SIGTERM to the whole process group (``timeout``, ``docker stop``) saves a resumable checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import TinyFiles, assert_no_output, assert_one_error_line, leftovers, run_cli, write_tiny
from videos import make_video_dataset

from stjfd_convert.atomic import atomic_directory, check_output, clean_leftovers, written_by_stjfd
from stjfd_convert.errors import OutputError
from stjfd_convert.finetune import FinetuneConfig, finetune, load_training_state, read_metrics
from stjfd_convert.formats import MANIFEST_FILE
from stjfd_convert.saved_model import load_converted

CLIP_LEN, SIZE = 8, 32
# Weights of a resumed run vs the uninterrupted run: exact on CPU with the same seed.
RESUME_ATOL = 0.0


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyFiles:
    return write_tiny(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def converted(tiny: TinyFiles, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny-stjfd"
    outcome = run_cli(["convert", *tiny.args(), "--atoms", "4", "--temporal-atoms", "2", "-o", out, "--json"])
    assert outcome.exit_code == 0, outcome.output
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "data"
    make_video_dataset(root / "train", per_class=2, T=CLIP_LEN, H=SIZE, W=SIZE, seed=1)
    make_video_dataset(root / "val", per_class=1, T=CLIP_LEN, H=SIZE, W=SIZE, seed=2)
    return root


def finetune_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(model), str(data), "--clip-len", str(CLIP_LEN), "--size", str(SIZE), "--cycles", "1",
            "--epochs-per-stage", "1", "--batch-size", "3", "--workers", "0", "--optimizer", "adamw", "--lr", "0.01",
            "--bn-recal-batches", "1", "--no-plot", "--trust-code", "-o", str(out), *extra]


@pytest.fixture(scope="module")
def finished_run(converted: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "exp1"
    outcome = run_cli(finetune_args(converted, data_root, out))
    assert outcome.exit_code == 0, outcome.output
    return out


# --------------------------------------------------------------------------------------------
# Resume of a finished run
# --------------------------------------------------------------------------------------------


def test_resume_of_a_finished_run_changes_nothing(finished_run: Path) -> None:
    before = snapshot(finished_run)
    assert {"last/model.safetensors", "best/model.safetensors", "metrics.jsonl"} <= set(before)
    for _ in range(2):
        outcome = run_cli(["finetune", str(finished_run), "--resume", "--trust-code"])
        assert outcome.exit_code == 0, outcome.output
        assert "already finished" in outcome.stdout and "unchanged" in outcome.stdout
        assert snapshot(finished_run) == before
    assert leftovers(finished_run) == []


# --------------------------------------------------------------------------------------------
# --force never destroys what stjfd did not write
# --------------------------------------------------------------------------------------------


def test_force_refuses_the_dataset_itself(converted: Path, data_root: Path) -> None:
    before = snapshot(data_root)
    outcome = run_cli(finetune_args(converted, data_root, data_root, "--force"))
    assert_one_error_line(outcome, "dataset", str(data_root))
    assert snapshot(data_root) == before


def test_output_inside_the_dataset_is_refused(converted: Path, data_root: Path) -> None:
    before = snapshot(data_root)
    target = data_root / "train" / "runs"
    assert_one_error_line(run_cli(finetune_args(converted, data_root, target)), "inside the dataset")
    assert snapshot(data_root) == before and not target.exists()


def test_force_refuses_the_source_model(converted: Path, data_root: Path) -> None:
    before = snapshot(converted)
    outcome = run_cli(finetune_args(converted, data_root, converted, "--force"))
    assert_one_error_line(outcome, "input", str(converted))
    assert snapshot(converted) == before


def test_force_refuses_a_folder_holding_the_source(finished_run: Path, data_root: Path) -> None:
    before = snapshot(finished_run)
    outcome = run_cli(finetune_args(finished_run / "best", data_root, finished_run, "--force"))
    assert_one_error_line(outcome, "contains", "input")
    assert snapshot(finished_run) == before


def test_convert_force_refuses_a_foreign_folder(tiny: TinyFiles, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("four years of work")
    outcome = run_cli(["convert", *tiny.args(), "-o", precious, "--force"])
    assert_one_error_line(outcome, "--force replaces only", "did not write")
    assert (precious / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.txt"]
    assert leftovers(precious) == []


def test_convert_force_refuses_a_converted_folder_with_extra_files(tiny: TinyFiles, converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(["convert", *tiny.args(), "-o", out]).exit_code == 0
    (out / "notes.md").write_text("mine")
    before = snapshot(out)
    assert_one_error_line(run_cli(["convert", *tiny.args(), "-o", out, "--force"]), "did not write")
    assert snapshot(out) == before


def test_convert_force_refuses_a_plain_file(tiny: TinyFiles, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a model")
    assert_one_error_line(run_cli(["convert", *tiny.args(), "-o", afile, "--force"]), "did not write")
    assert afile.read_text() == "not a model"
    assert leftovers(afile) == []


def test_convert_force_refuses_the_folder_holding_the_checkpoint(tiny: TinyFiles) -> None:
    before = snapshot(tiny.folder)
    outcome = run_cli(["convert", *tiny.args(), "-o", tiny.folder, "--force"])
    assert_one_error_line(outcome, "contains", "input")
    assert snapshot(tiny.folder) == before


def test_force_replaces_what_stjfd_wrote(tiny: TinyFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli(["convert", *tiny.args(), "-o", out]).exit_code == 0
    assert written_by_stjfd(out, "converted")
    outcome = run_cli(["convert", *tiny.args(), "--atoms", "2", "-o", out, "--force", "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads((out / MANIFEST_FILE).read_text())["conversion"]["config"]["spatial_atoms"] == 2
    assert leftovers(out) == []


# --------------------------------------------------------------------------------------------
# A model folder is data: it never runs code without an opt-in
# --------------------------------------------------------------------------------------------


@pytest.fixture
def hostile(converted: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a converted folder whose manifest names ``os:system``; returns it and the canary path."""
    folder = Path(shutil.copytree(converted, tmp_path / "shared-model"))
    canary = tmp_path / "PWNED"
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["architecture"] = {"kind": "callable", "name": "os:system", "kwargs": {"command": f"touch {canary}"}}
    manifest["input"]["shape"] = [1, 3, 4, 8, 8]
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder, canary


def test_manifest_naming_a_callable_is_refused_everywhere(hostile: tuple[Path, Path], data_root: Path, tmp_path: Path) -> None:
    folder, canary = hostile
    commands = [
        ["plan", folder, "--repeats", "1"],
        ["report", folder, "--no-training"],
        ["evaluate", folder, data_root / "val", "--workers", "0", "--clip-len", str(CLIP_LEN), "--size", str(SIZE)],
        ["export", folder, "--onnx", tmp_path / "m.onnx", "--runs", "0"],
        [*finetune_args(folder, data_root, tmp_path / "run")[:-3], "-o", tmp_path / "run"],  # without --trust-code
    ]
    for args in commands:
        args = [a for a in args if a != "--trust-code"]
        assert_one_error_line(run_cli(args), "os:system", "--trust-code")
        assert not canary.exists(), f"{args[0]} ran the manifest's command"
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "run").exists()


def test_resume_refuses_a_run_whose_manifest_names_a_callable(finished_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    canary = tmp_path / "PWNED"
    manifest_path = run / "last" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["architecture"] = {"kind": "callable", "name": "os:system", "kwargs": {"command": f"touch {canary}"}}
    manifest_path.write_text(json.dumps(manifest))
    before = snapshot(run)
    assert_one_error_line(run_cli(["finetune", str(run), "--resume"]), "os:system", "--trust-code")
    assert not canary.exists() and snapshot(run) == before


def test_model_given_again_is_the_opt_in(converted: Path, tiny: TinyFiles) -> None:
    with pytest.raises(Exception, match="--trust-code"):
        load_converted(converted)
    assert load_converted(converted, model=tiny.model_arg).model is not None
    with pytest.raises(Exception, match="differs"):
        load_converted(converted, model="other.module:build")


# --------------------------------------------------------------------------------------------
# Export, report and demo refuse an existing output without --force
# --------------------------------------------------------------------------------------------


def test_export_refuses_an_existing_file(converted: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    target = tmp_path / "model.onnx"
    base = ["export", converted, "--onnx", target, "--runs", "0", "--trust-code", "--json"]
    assert run_cli(base).exit_code == 0
    before = target.read_bytes()
    assert_one_error_line(run_cli(base[:-1]), "already exists", "--force")
    assert target.read_bytes() == before
    assert run_cli([*base, "--force", "--mode", "fused"]).exit_code == 0
    assert target.read_bytes() != before and leftovers(target) == []

    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"someone else's graph")
    assert_one_error_line(run_cli(["export", converted, "--onnx", foreign, "--trust-code", "--force"]), "did not write")
    assert foreign.read_bytes() == b"someone else's graph"


def test_report_refuses_existing_files(converted: Path, tmp_path: Path) -> None:
    markdown, plot = tmp_path / "r.md", tmp_path / "r.png"
    base = ["report", converted, "--no-training", "--trust-code", "--markdown", markdown, "--plot", plot]
    assert run_cli(base).exit_code == 0
    assert written_by_stjfd(markdown, "markdown") and written_by_stjfd(plot, "png")
    before = snapshot(tmp_path)
    assert_one_error_line(run_cli(base), "already exists", "--force")
    assert snapshot(tmp_path) == before
    assert run_cli([*base, "--force"]).exit_code == 0

    mine = tmp_path / "mine.md"
    mine.write_text("# my notes\n")
    assert_one_error_line(run_cli([*base[:4], "--markdown", mine, "--force"]), "did not write")
    assert mine.read_text() == "# my notes\n"
    assert_one_error_line(run_cli([*base[:4], "--plot", tmp_path]), "is a folder")


def test_demo_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    assert_one_error_line(run_cli(["demo", "-o", target]), "already exists", "--force")
    assert_one_error_line(run_cli(["demo", "-o", target, "--force"]), "did not write")
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_demo_folder_is_recognised(converted: Path, finished_run: Path, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    shutil.copytree(converted, demo / "sample-stjfd")
    assert written_by_stjfd(demo, "demo")
    (demo / "finetune").mkdir()
    (demo / "finetune" / "notes.txt").write_text("x")
    assert not written_by_stjfd(demo, "demo")


# --------------------------------------------------------------------------------------------
# Leftovers of killed runs
# --------------------------------------------------------------------------------------------


KILLED_WRITER = """
import os, signal, sys
from stjfd_convert.atomic import atomic_directory
with atomic_directory(sys.argv[1], "converted") as staging:
    (staging / "model.safetensors").write_bytes(b"x" * 1_000_000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_staging_of_a_killed_convert_is_cleaned_by_the_next_run(tiny: TinyFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert len(leftovers(out)) == 1 and leftovers(out)[0].startswith(".out.tmp-"), leftovers(out)
    outcome = run_cli(["convert", *tiny.args(), "-o", out, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert leftovers(out) == []


def test_interrupted_replace_is_rolled_back(converted: Path, tmp_path: Path) -> None:
    """Killed between moving the old output aside and renaming the new one in: the old one comes back."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    target = tmp_path / "out"
    backup = Path(shutil.copytree(converted, tmp_path / f".out.old-{pid}"))
    (tmp_path / f".out.tmp-{pid}-abcd1234").mkdir()
    before = snapshot(backup)
    cleaned = clean_leftovers(target)
    assert len(cleaned) == 2 and snapshot(target) == before and leftovers(target) == []


def test_leftovers_of_a_live_process_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "out"
    mine = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    mine.mkdir()
    assert clean_leftovers(target) == [] and mine.exists()


def test_check_output_policy_unit(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", "converted") == tmp_path / "empty"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "empty")
    with pytest.raises(OutputError, match="symbolic link"):
        check_output(link, "converted", force=True)
    with pytest.raises(OutputError, match="folder"):
        check_output(tmp_path / "empty", "markdown", force=True)
    with pytest.raises(ValueError):
        check_output(tmp_path / "x", "nonsense")


# --------------------------------------------------------------------------------------------
# A run that fails before its first checkpoint leaves no folder
# --------------------------------------------------------------------------------------------


def test_run_failing_before_any_checkpoint_leaves_no_folder(converted: Path, data_root: Path, tmp_path: Path) -> None:
    from stjfd_convert.data import build_datasets

    train, val, classes = build_datasets(data_root, clip_len=CLIP_LEN, size=SIZE, seed=0)
    model = load_converted(converted, trust_code=True).model
    from stjfd_convert.finetune import adapt_classifier

    adapt_classifier(model, load_converted(converted, trust_code=True).spec, len(classes), seed=0)

    def broken(ctx):  # e.g. every clip of the epoch failing to decode
        raise RuntimeError("could not decode any frame")

    out = tmp_path / "run"
    config = FinetuneConfig(cycles=1, epochs_per_stage=1, batch_size=3, workers=0, plot=False)
    with pytest.raises(RuntimeError, match="decode"):
        finetune(model, train, val, config, loss_fn=broken, run_dir=out)
    assert_no_output(out)


# --------------------------------------------------------------------------------------------
# SIGTERM to the process group
# --------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STJFD_DEBUG", "FORCE_COLOR")}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_resumes_exactly(converted: Path, data_root: Path, tmp_path: Path) -> None:
    """`timeout`/`docker stop` signal every process of the group, DataLoader workers included."""
    extra = ("--log-every", "1", "--workers", "2")

    def args(out: Path) -> list[str]:
        a = finetune_args(converted, data_root, out, *extra)
        a[a.index("--epochs-per-stage") + 1] = "3"
        del a[a.index("--workers"):a.index("--workers") + 2]  # the last --workers wins anyway; keep one
        return a

    def stjfd(*argv: str | Path, **kwargs) -> subprocess.Popen:
        # Every run in its own process with the same environment (thread count): bit-identical arithmetic.
        # From tmp_path: `python -m` imports from the working directory first, and the repository root holds a
        # source tree that is not the installed package under test.
        return subprocess.Popen([sys.executable, "-m", "stjfd_convert", *map(str, argv)], env=_env(), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

    whole = tmp_path / "whole"
    reference = stjfd(*args(whole))
    output = reference.communicate(timeout=600)
    assert reference.returncode == 0, output

    out = tmp_path / "run"
    proc = stjfd(*args(out), start_new_session=True)
    deadline = time.monotonic() + 300  # a hang guard, not a performance limit
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file() and any(r["type"] == "step" for r in read_metrics(out)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted at" in errors[0] and "--resume" in errors[0], stderr
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    assert "interrupted (SIGTERM)" in (out / "run.log").read_text()
    assert load_training_state(out)["position"]["step"] >= 1

    resumed = stjfd("finetune", out, "--resume", "--trust-code")
    output = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    a = load_converted(whole / "last", trust_code=True).model.state_dict()
    b = load_converted(out / "last", trust_code=True).model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=RESUME_ATOL, rtol=0)
