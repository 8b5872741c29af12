"""End-to-end tests of the ``stjfd`` command line.

The rule under test (DESIGN.md §4): bad input never gives a Python traceback. It gives one line on
stderr, ``error: <what is wrong> — <what to do>``, exit code 2 (1 for a failed verification), and no
partial output (no -o folder, no ``.<name>.tmp-*`` staging folder beside it). Most runs are in-process
through typer's CliRunner; a few go through a real ``python -m stjfd_convert`` process to show that
the real entry point prints no traceback either.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.models import video as tv_video

from cli_helpers import (
    ASSERTING_SOURCE,
    LINEAR_SOURCE,
    TINY_CONVS,
    TINY_DECOMPOSABLE,
    TINY_INPUT_SHAPE,
    TINYNET_SOURCE,
    TinyFiles,
    assert_no_output,
    assert_one_error_line,
    leftovers,
    nonempty_lines,
    run_cli,
    run_process,
    tiny_state_dict,
    write_tiny,
)
from stjfd_convert.config import ConvertConfig
from stjfd_convert.parity import make_input, parse_shape
from stjfd_convert.saved_model import MANIFEST_FILE, WEIGHTS_FILE, load_converted
from stjfd_convert.workflows import convert_checkpoint

# Full rank is exact up to float32 rounding: relative L2 output difference allowed.
FULL_RANK_REL = 1e-4
# --energy on kernels that are low-rank plus noise of this relative size must find the true ranks
# and reconstruct them to within a few times the noise.
LOW_RANK_NOISE = 1e-4
LOW_RANK_REL_ERROR = 1e-3
# HOOI (our default) may be at most this much worse than tensorly's partial_tucker (tol 1e-4).
TENSORLY_SLACK = 1e-6

R3D18_PARAMS = 33_371_472
R3D18_CONV3D = 20
R3D18_DECOMPOSABLE = 17  # the three 1×1×1 downsample convs stay dense


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder (default outputs land there) and without STJFD_DEBUG."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STJFD_DEBUG", raising=False)


@pytest.fixture
def tiny(tmp_path: Path) -> TinyFiles:
    return write_tiny(tmp_path / "inputs")


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def convert_ok(*args: Any) -> dict[str, Any]:
    """``stjfd convert ARGS --json`` that must succeed; returns the parsed JSON (all of stdout)."""
    outcome = run_cli(["convert", *map(str, args), "--json"])
    assert outcome.exit_code == 0, outcome.output
    return json.loads(outcome.stdout)


def layers_by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {layer["name"]: layer for layer in report["layers"]}


def weight_numel(layer: dict[str, Any]) -> int:
    kt, kh, kw = layer["kernel_size"]
    return layer["out_channels"] * layer["in_channels"] // layer["groups"] * kt * kh * kw


def forward(model: torch.nn.Module, shape: str) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(make_input(parse_shape(shape)))


# --------------------------------------------------------------------------------------------
# Module-scoped torchvision checkpoints (built once: r3d_18 is 33 M parameters)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r3d18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("r3d18") / "r3d18.pth"
    torch.manual_seed(0)
    torch.save(tv_video.r3d_18().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def mc3_18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mc3_18") / "mc3_18.pth"
    torch.manual_seed(0)
    torch.save(tv_video.mc3_18().state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------
# Bad checkpoints
# --------------------------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def write_malicious(folder: Path) -> tuple[Path, Path]:
    marker = folder / "PWNED"
    path = folder / "evil.pth"
    torch.save({"state_dict": tiny_state_dict(), "payload": _WritesMarker(marker)}, path)
    assert not marker.exists()
    return path, marker


def write_nonfinite(folder: Path, value: float) -> Path:
    state = tiny_state_dict()
    state["stem.weight"][0, 0, 1, 1, 1] = value
    path = folder / f"nonfinite-{value}.pth"
    torch.save(state, path)
    return path


def test_missing_checkpoint(tiny: TinyFiles, out: Path) -> None:
    outcome = run_cli(["convert", *tiny.args(tiny.folder / "nothere.pth"), "-o", out])
    assert_one_error_line(outcome, "nothere.pth", "does not exist", "check the path")
    assert_no_output(out)


def test_directory_as_checkpoint(tiny: TinyFiles, out: Path) -> None:
    folder = tiny.folder / "checkpoints"
    folder.mkdir()
    outcome = run_cli(["convert", *tiny.args(folder), "-o", out])
    assert_one_error_line(outcome, "is a directory", "checkpoint file itself")
    assert_no_output(out)


def test_empty_checkpoint(tiny: TinyFiles, out: Path) -> None:
    empty = tiny.folder / "empty.pth"
    empty.write_bytes(b"")
    outcome = run_cli(["convert", *tiny.args(empty), "-o", out])
    assert_one_error_line(outcome, "empty.pth", "empty", "save or copy it again")
    assert_no_output(out)


def test_truncated_checkpoint(tiny: TinyFiles, out: Path) -> None:
    data = tiny.checkpoint.read_bytes()
    truncated = tiny.folder / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    outcome = run_cli(["convert", *tiny.args(truncated), "-o", out])
    assert_one_error_line(outcome, "truncated.pth", "corrupt", "re-download or re-save")
    assert_no_output(out)


@pytest.mark.parametrize("name", ["noise.pth", "noise.safetensors", "noise.bin"])
def test_random_bytes_checkpoint(tiny: TinyFiles, out: Path, name: str) -> None:
    noise = tiny.folder / name
    noise.write_bytes(random.Random(0).randbytes(4096))
    outcome = run_cli(["convert", *tiny.args(noise), "-o", out])
    assert_one_error_line(outcome, name, "not a readable", "re-download or re-save")
    assert_no_output(out)


def test_checkpoint_that_runs_code_is_refused(tiny: TinyFiles, out: Path) -> None:
    evil, marker = write_malicious(tiny.folder)
    outcome = run_cli(["convert", *tiny.args(evil), "-o", out])
    assert_one_error_line(outcome, "evil.pth", "could run code", "--trust-pickle")
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert_no_output(out)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_weights(tiny: TinyFiles, out: Path, value: float) -> None:
    bad = write_nonfinite(tiny.folder, value)
    outcome = run_cli(["convert", *tiny.args(bad), "-o", out])
    kind = "NaN" if math.isnan(value) else "Inf"
    assert_one_error_line(outcome, "not finite", "stem.weight", f"1 {kind}", "earlier checkpoint")
    assert_no_output(out)


def test_state_dict_of_another_arch(mc3_18_checkpoint: Path, out: Path) -> None:
    outcome = run_cli(["convert", mc3_18_checkpoint, "--arch", "r3d_18", "-o", out])
    assert_one_error_line(outcome, "does not match r3d_18", "shape mismatch", "--arch")
    assert_no_output(out)


def test_state_dict_of_other_num_classes(tiny: TinyFiles, out: Path) -> None:
    other = tiny.folder / "ten.pth"
    torch.save(tiny_state_dict(num_classes=10), other)
    outcome = run_cli(["convert", *tiny.args(other), "-o", out])
    assert_one_error_line(outcome, "does not match", "fc.weight")
    assert_no_output(out)


def test_model_without_conv3d(tmp_path: Path, out: Path) -> None:
    module = tmp_path / "linear.py"
    module.write_text(LINEAR_SOURCE)
    namespace: dict[str, Any] = {}
    exec(LINEAR_SOURCE, namespace)
    checkpoint = tmp_path / "linear.pth"
    torch.save(namespace["build"]().state_dict(), checkpoint)
    outcome = run_cli(["convert", checkpoint, "--model", f"{module}:build", "-o", out])
    assert_one_error_line(outcome, "no Conv3d", "--arch/--model")
    assert_no_output(out)


# --------------------------------------------------------------------------------------------
# Bad options
# --------------------------------------------------------------------------------------------


# Options that are wrong on their own or together, with what the error line must name.
BAD_OPTIONS = [
    (["--atoms", "0"], ["--atoms", "positive", "got 0"]),
    (["--atoms", "-3"], ["--atoms", "positive", "got -3"]),
    (["--atoms=-3"], ["--atoms", "positive", "got -3"]),
    (["--temporal-atoms", "0"], ["--temporal-atoms", "positive"]),
    (["--atoms", "50"], ["--atoms 50", "largest kernel has 9", "--atoms ≤ 9"]),
    (["--temporal-atoms", "4"], ["--temporal-atoms 4", "longest kernel has 3", "--temporal-atoms ≤ 3"]),
    (["--energy", "0.9", "--atoms", "4"], ["--energy", "--atoms", "choose one rank policy"]),
    (["--energy", "0.9", "--budget", "0.5"], ["--energy and --budget", "choose one rank policy"]),
    (["--full-rank", "--temporal-atoms", "2"], ["--full-rank", "choose one rank policy"]),
    (["--energy", "1.5"], ["--energy", "(0, 1]"]),
    (["--budget", "0"], ["--budget", "(0, 1]"]),
    (["--method", "svd"], ["--method 'svd'", "hooi"]),
    (["--mode", "fast"], ["--mode 'fast'", "fused"]),
    (["--input-dtype", "float8"], ["--input-dtype 'float8'", "uint8"]),
    (["--include", "nomatch*"], ["--include nomatch*", "matches no Conv3d", "stem"]),
    (["--model-kwargs", "{num_classes: 10}"], ["--model-kwargs", "not valid JSON", '{"num_classes": 10}']),
    (["--model-kwargs", "[10]"], ["--model-kwargs", "JSON object, got list"]),
    (["--model-kwargs", '{"depth": 3}'], ["building", "depth", "--model-kwargs"]),
    (["--input-shape", "1,5,4,8,8"], ["1, 5, 4, 8, 8", "3 channels", "--input-shape"]),
    (["--input-shape", "0,3,4,8,8"], ["--input-shape", "positive"]),
]


@pytest.mark.parametrize(
    "options, fragments", [pytest.param(o, f, id=" ".join(o)) for o, f in BAD_OPTIONS]
)
def test_bad_option(tiny: TinyFiles, out: Path, options: list[str], fragments: list[str]) -> None:
    # Later options win in click, so these override the options given by tiny.args(); a repeated
    # --input-shape would mean several pathways, so tiny's own is left out when the case gives one.
    base = tiny.args()
    if "--input-shape" in options:
        base = base[: base.index("--input-shape")] + base[base.index("--input-shape") + 2 :]
    outcome = run_cli(["convert", *base, *options, "-o", out])
    assert_one_error_line(outcome, *fragments)
    assert_no_output(out)


def test_malformed_input_shape_is_named(tiny: TinyFiles, out: Path) -> None:
    """``1,3,x`` is a typo; the error must say that this text is not a shape, not blame the model."""
    outcome = run_cli(["convert", *tiny.args(), "--input-shape", "1,3,x", "-o", out])
    assert_one_error_line(outcome, "--input-shape", "1,3,x")
    assert_no_output(out)


def test_model_that_asserts_on_its_input(tmp_path: Path, out: Path) -> None:
    """A wrong --input-shape is bad input even when the model checks it with ``assert`` (torch._assert)."""
    module = tmp_path / "asserting.py"
    module.write_text(ASSERTING_SOURCE)
    outcome = run_cli(["convert", "--model", f"{module}:build", "--input-shape", "1,5,4,8,8", "-o", out])
    assert_one_error_line(outcome, "expected RGB clips", "--input-shape")
    assert_no_output(out)


def test_unknown_arch(out: Path) -> None:
    outcome = run_cli(["convert", "--arch", "foo", "-o", out])
    assert_one_error_line(outcome, "unknown --arch 'foo'", "r3d_18", "--model")
    assert_no_output(out)


def test_arch_and_model_together(tiny: TinyFiles, out: Path) -> None:
    outcome = run_cli(["convert", *tiny.args(), "--arch", "r3d_18", "-o", out])
    assert_one_error_line(outcome, "--arch and --model", "only one")
    assert_no_output(out)


def test_nothing_to_convert(out: Path) -> None:
    outcome = run_cli(["convert", "-o", out])
    assert_one_error_line(outcome, "no checkpoint given", "--arch")
    assert_no_output(out)


@pytest.mark.parametrize(
    "model_arg, fragments",
    [
        ("{folder}/nothere.py:build", ["nothere.py", "does not exist", "module.path:callable"]),
        ("no_such_module_stjfd:build", ["no module named 'no_such_module_stjfd'", "importable"]),
        ("{folder}/tinynet.py:nothere", ["no attribute 'nothere'", "callables there:", "build"]),
        ("{folder}/tinynet.py", ["does not name a callable", "file.py:callable"]),
    ],
    ids=["missing-file", "missing-module", "missing-attribute", "no-callable"],
)
def test_unreadable_model(tiny: TinyFiles, out: Path, model_arg: str, fragments: list[str]) -> None:
    model = model_arg.format(folder=tiny.folder)
    outcome = run_cli(["convert", tiny.checkpoint, "--model", model, "--input-shape", TINY_INPUT_SHAPE, "-o", out])
    assert_one_error_line(outcome, *fragments)
    assert_no_output(out)


# --------------------------------------------------------------------------------------------
# Output folder
# --------------------------------------------------------------------------------------------


def test_output_parent_is_a_file(tiny: TinyFiles, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    target = afile / "out"
    outcome = run_cli(["convert", *tiny.args(), "-o", target])
    assert_one_error_line(outcome, "cannot write", "afile", "-o")
    assert afile.read_text() == "not a folder"
    assert_no_output(target)


def test_existing_output_needs_force(tiny: TinyFiles, out: Path) -> None:
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    outcome = run_cli(["convert", *tiny.args(), "-o", out])
    assert_one_error_line(outcome, "already exists", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(out) == []

    # --force replaces only what stjfd wrote: never a folder holding the user's files.
    outcome = run_cli(["convert", *tiny.args(), "-o", out, "--force"])
    assert_one_error_line(outcome, "--force replaces only", "did not write")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(out) == []

    converted = out.parent / "converted"
    convert_ok(*tiny.args(), "-o", converted)
    report = convert_ok(*tiny.args(), "-o", converted, "--force")
    assert report["output"] == str(converted)
    assert sorted(p.name for p in converted.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE])
    assert leftovers(converted) == []


def test_empty_output_folder_is_reused(tiny: TinyFiles, out: Path) -> None:
    out.mkdir()
    convert_ok(*tiny.args(), "-o", out)
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE])
    assert leftovers(out) == []


def test_failed_run_with_force_keeps_the_old_output(tiny: TinyFiles, out: Path) -> None:
    convert_ok(*tiny.args(), "-o", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write_nonfinite(tiny.folder, math.nan)
    outcome = run_cli(["convert", *tiny.args(bad), "-o", out, "--force"])
    assert_one_error_line(outcome, "not finite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out) == []


def test_failed_run_creates_no_parent_folders(tiny: TinyFiles, tmp_path: Path) -> None:
    target = tmp_path / "new" / "nested" / "out"
    outcome = run_cli(["convert", *tiny.args(tiny.folder / "nothere.pth"), "-o", target])
    assert_one_error_line(outcome, "does not exist")
    assert not (tmp_path / "new").exists(), "a failed run left the -o folder's parents behind"


def test_output_is_current_folder(tiny: TinyFiles, tmp_path: Path) -> None:
    """``-o . --force`` cannot replace the folder the user stands in: one line, exit 2, nothing lost."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    os.chdir(work)  # undone by monkeypatch.chdir's teardown in _isolated
    outcome = run_cli(["convert", *tiny.args(), "-o", ".", "--force"])
    assert_one_error_line(outcome, "-o")
    assert (work / "keep.txt").read_text() == "precious"


def test_output_folder_holding_the_checkpoint(tiny: TinyFiles) -> None:
    """``--force`` onto the folder that holds the source checkpoint would delete the checkpoint."""
    before = tiny.checkpoint.read_bytes()
    outcome = run_cli(["convert", *tiny.args(), "-o", tiny.folder, "--force"])
    assert_one_error_line(outcome, "-o")
    assert tiny.checkpoint.read_bytes() == before


# --------------------------------------------------------------------------------------------
# The real process: no traceback on stderr
# --------------------------------------------------------------------------------------------


def _assert_process_error(outcome: Any, *fragments: str) -> None:
    assert outcome.stderr is not None
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.stdout == "", outcome.stdout
    line = assert_one_error_line(outcome, *fragments)
    assert "\x1b[" not in line, "colour codes in piped output"


def test_process_missing_checkpoint(tiny: TinyFiles, tmp_path: Path) -> None:
    out = tmp_path / "out"
    outcome = run_process(["convert", *tiny.args(tiny.folder / "nothere.pth"), "-o", out], cwd=tmp_path)
    _assert_process_error(outcome, "does not exist")
    assert_no_output(out)


def test_process_malicious_pickle(tiny: TinyFiles, tmp_path: Path) -> None:
    evil, marker = write_malicious(tiny.folder)
    out = tmp_path / "out"
    outcome = run_process(["convert", *tiny.args(evil), "-o", out], cwd=tmp_path)
    _assert_process_error(outcome, "could run code", "--trust-pickle")
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert_no_output(out)


def test_process_nan_weights(tiny: TinyFiles, tmp_path: Path) -> None:
    bad = write_nonfinite(tiny.folder, math.nan)
    outcome = run_process(["convert", *tiny.args(bad)], cwd=tmp_path)  # default output folder
    _assert_process_error(outcome, "not finite", "stem.weight")
    assert_no_output(tmp_path / f"{bad.stem}-stjfd")


def test_console_script_help(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "stjfd"
    if not script.exists():
        pytest.skip("the stjfd console script is not installed beside this Python")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "convert" in proc.stdout and "demo" in proc.stdout


# --------------------------------------------------------------------------------------------
# Successful conversions of the tiny model
# --------------------------------------------------------------------------------------------


def test_tiny_json_report(tiny: TinyFiles, out: Path) -> None:
    report = convert_ok(*tiny.args(), "-o", out)
    layers = layers_by_name(report)
    assert list(layers) == list(TINY_CONVS)
    for name in TINY_DECOMPOSABLE:
        layer = layers[name]
        assert layer["decomposed"] and layer["skipped"] is None
        assert layer["params_after"] < layer["params_before"]
        assert 0.0 < layer["rel_error"] < 1.0
    assert layers["stem"]["temporal_atoms"] == 3 and layers["stem"]["spatial_atoms"] == 6
    assert layers["spatial"]["temporal_atoms"] == 1 and layers["spatial"]["spatial_atoms"] == 6
    assert not layers["proj"]["decomposed"] and "1×1×1" in layers["proj"]["skipped"]
    assert layers["proj"]["params_after"] == layers["proj"]["params_before"]

    totals = report["totals"]
    assert totals["conv3d_layers"] == 3 and totals["decomposed_layers"] == 2
    saved = sum(layer["params_before"] - layer["params_after"] for layer in report["layers"])
    assert totals["params_after"] == totals["params_before"] - saved
    assert report["architecture"] == {"kind": "callable", "name": tiny.model_arg, "kwargs": {}}
    parity = report["parity"]
    assert parity["input_shape"] == list(parse_shape(TINY_INPUT_SHAPE))
    assert [o["shape"] for o in parity["outputs"]] == [[1, 4]]
    assert math.isfinite(parity["rel_l2"]) and parity["rel_l2"] > 0.0
    # What tinynet printed while building is kept out of the JSON and mentioned in a note.
    assert any("building tinynet" in note for note in report["notes"])


def test_tiny_human_output(tiny: TinyFiles, out: Path) -> None:
    outcome = run_cli(["convert", *tiny.args(), "-o", out])
    assert outcome.exit_code == 0, outcome.output
    assert "Traceback" not in outcome.output
    text = outcome.stdout
    assert "Conv3d layers" in text
    lines = nonempty_lines(text)
    assert any(line.startswith("model:") and "2 of 3 Conv3d decomposed" in line for line in lines), text
    assert any(line.startswith("parity") and "relative L2 diff" in line for line in lines), text
    assert any(line.startswith("saved") and str(out) in line for line in lines), text
    for name in TINY_CONVS:
        assert name in text
    assert "skipped: 1×1×1" in text


def test_default_output_folder(tiny: TinyFiles, tmp_path: Path) -> None:
    report = convert_ok(*tiny.args())
    expected = tmp_path / "tiny-stjfd"  # <checkpoint stem>-stjfd in the current folder
    assert Path(report["output"]).resolve() == expected
    assert (expected / WEIGHTS_FILE).is_file() and (expected / MANIFEST_FILE).is_file()
    assert leftovers(expected) == []


def test_saved_folder_reloads_bit_identical(tiny: TinyFiles, out: Path) -> None:
    report = convert_ok(*tiny.args(), "-o", out)
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, MANIFEST_FILE])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert sorted(manifest["layers"]) == sorted(TINY_DECOMPOSABLE)
    assert manifest["architecture"] == report["architecture"]

    in_memory = convert_checkpoint(
        tiny.checkpoint,
        ConvertConfig(),
        model=tiny.model_arg,
        input_shape=parse_shape(TINY_INPUT_SHAPE),
        save=False,
    )
    assert in_memory.model is not None and in_memory.output is None
    expected = forward(in_memory.model, TINY_INPUT_SHAPE)
    first = forward(load_converted(out, trust_code=True).model, TINY_INPUT_SHAPE)
    second = forward(load_converted(out, trust_code=True).model, TINY_INPUT_SHAPE)
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)


def test_saved_folder_reloads_from_another_folder(tiny: TinyFiles, tmp_path: Path) -> None:
    """A relative ``--model file.py:callable`` must still rebuild once the user has changed folder."""
    os.chdir(tiny.folder)
    out = tmp_path / "out"
    report = convert_ok("tiny.pth", "--model", "tinynet.py:build", "--input-shape", TINY_INPUT_SHAPE, "-o", out)
    assert report["parity"] is not None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    reloaded = load_converted(out, trust_code=True)
    assert sorted(n for n, m in reloaded.model.named_modules() if type(m).__name__ == "DecomposedConv3d") == sorted(
        TINY_DECOMPOSABLE
    )


def test_dotted_model_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--model module:callable`` imports from the current folder."""
    module_name = "stjfd_cli_dotted_tinynet"
    (tmp_path / f"{module_name}.py").write_text(TINYNET_SOURCE)
    monkeypatch.delitem(sys.modules, module_name, raising=False)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict(), checkpoint)
    try:
        report = convert_ok(checkpoint, "--model", f"{module_name}:build", "--input-shape", TINY_INPUT_SHAPE)
    finally:
        sys.modules.pop(module_name, None)
    assert report["architecture"]["name"] == f"{module_name}:build"
    assert report["totals"]["decomposed_layers"] == 2


@pytest.mark.parametrize("layout", ["ddp-nested", "compiled-wrapped", "safetensors"])
def test_wrapped_checkpoints_load_the_same_weights(tiny: TinyFiles, tmp_path: Path, layout: str) -> None:
    """DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes, training wrappers and safetensors files."""
    from safetensors.torch import save_file

    plain = convert_ok(*tiny.args(), "-o", tmp_path / "plain")
    state = torch.load(tiny.checkpoint, weights_only=True)
    if layout == "ddp-nested":
        path = tiny.folder / "ddp.pth"
        torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "compiled-wrapped":
        path = tiny.folder / "compiled.pt"
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}, "step": 100}, path)
    else:
        path = tiny.folder / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    report = convert_ok(*tiny.args(path), "-o", tmp_path / layout)
    # Same weights loaded ⇒ same decomposition, to the bit.
    for layer, ref in zip(report["layers"], plain["layers"]):
        assert layer["name"] == ref["name"]
        assert layer["rel_error"] == ref["rel_error"]
        assert layer["params_after"] == ref["params_after"]
    assert report["parity"]["rel_l2"] == plain["parity"]["rel_l2"]
    reloaded = load_converted(tmp_path / layout, trust_code=True).model
    for key in ("proj.weight", "fc.weight", "fc.bias"):
        assert torch.equal(reloaded.state_dict()[key], state[key]), key


def test_model_kwargs(tiny: TinyFiles, out: Path) -> None:
    ten = tiny.folder / "ten.pth"
    torch.save(tiny_state_dict(num_classes=10), ten)
    report = convert_ok(*tiny.args(ten), "--model-kwargs", '{"num_classes": 10}', "-o", out)
    assert report["architecture"]["kwargs"] == {"num_classes": 10}
    assert [o["shape"] for o in report["parity"]["outputs"]] == [[1, 10]]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["architecture"]["kwargs"] == {"num_classes": 10}
    assert forward(load_converted(out, trust_code=True).model, TINY_INPUT_SHAPE).shape == (1, 10)


def test_include_and_exclude(tiny: TinyFiles, tmp_path: Path) -> None:
    included = layers_by_name(convert_ok(*tiny.args(), "--include", "st*", "-o", tmp_path / "inc"))
    assert included["stem"]["decomposed"]
    assert included["spatial"]["skipped"] == "not matched by --include"
    assert "1×1×1" in included["proj"]["skipped"]

    excluded = layers_by_name(convert_ok(*tiny.args(), "--exclude", "sp*", "-o", tmp_path / "exc"))
    assert excluded["stem"]["decomposed"]
    assert excluded["spatial"]["skipped"] == "matched by --exclude"
    assert "1×1×1" in excluded["proj"]["skipped"]

    both = convert_ok(
        *tiny.args(), "--include", "*", "--exclude", "stem", "--exclude", "spatial", "-o", tmp_path / "none"
    )
    assert both["totals"]["decomposed_layers"] == 0
    assert any("no layer was decomposed" in note for note in both["notes"])


def _low_rank_kernel(
    out_c: int, in_c: int, temporal: torch.Tensor, spatial: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """W[o,i,t,s] = Σ_{p,q} A[o,i,p,q] Ψ[t,p] Φ[s,q] plus LOW_RANK_NOISE relative noise."""
    coefficients = torch.randn(out_c, in_c, temporal.shape[1], spatial.shape[1])
    weight = torch.einsum("oipq,tp,sq->oits", coefficients, temporal, spatial).reshape(shape)
    noise = torch.randn(shape)
    return weight + LOW_RANK_NOISE * noise * weight.norm() / noise.norm()


def test_energy_finds_low_rank_atoms(tiny: TinyFiles, out: Path) -> None:
    torch.manual_seed(1)
    state = tiny_state_dict()
    state["stem.weight"] = _low_rank_kernel(8, 3, torch.randn(3, 1), torch.randn(9, 2), (8, 3, 3, 3, 3))
    state["spatial.weight"] = _low_rank_kernel(8, 8, torch.ones(1, 1), torch.randn(9, 3), (8, 8, 1, 3, 3))
    low_rank = tiny.folder / "low_rank.pth"
    torch.save(state, low_rank)
    report = convert_ok(*tiny.args(low_rank), "--energy", "0.99", "-o", out)
    assert report["config"]["policy"] == "energy"
    layers = layers_by_name(report)
    assert (layers["stem"]["temporal_atoms"], layers["stem"]["spatial_atoms"]) == (1, 2)
    assert (layers["spatial"]["temporal_atoms"], layers["spatial"]["spatial_atoms"]) == (1, 3)
    for name in TINY_DECOMPOSABLE:
        assert layers[name]["rel_error"] <= LOW_RANK_REL_ERROR


def test_budget(tiny: TinyFiles, out: Path) -> None:
    budget = 0.5
    report = convert_ok(*tiny.args(), "--budget", str(budget), "-o", out)
    assert report["config"]["policy"] == "budget"
    dense = after = 0
    for layer in report["layers"]:
        if layer["decomposed"] or "budget" in (layer["skipped"] or ""):
            bias = layer["params_before"] - weight_numel(layer)
            dense += weight_numel(layer)
            after += layer["params_after"] - bias
    assert dense == sum(weight_numel(layer) for layer in report["layers"] if layer["name"] in TINY_DECOMPOSABLE)
    assert after <= budget * dense
    assert report["totals"]["decomposed_layers"] >= 1


def test_full_rank_is_exact(tiny: TinyFiles, out: Path) -> None:
    report = convert_ok(*tiny.args(), "--full-rank", "-o", out)
    layers = layers_by_name(report)
    assert (layers["stem"]["temporal_atoms"], layers["stem"]["spatial_atoms"]) == (3, 9)
    assert (layers["spatial"]["temporal_atoms"], layers["spatial"]["spatial_atoms"]) == (1, 9)
    assert report["parity"]["rel_l2"] <= FULL_RANK_REL


def test_method_tensorly(tiny: TinyFiles, tmp_path: Path) -> None:
    reference = layers_by_name(convert_ok(*tiny.args(), "-o", tmp_path / "hooi"))
    report = convert_ok(*tiny.args(), "--method", "tensorly", "-o", tmp_path / "tensorly")
    assert report["config"]["method"] == "tensorly"
    layers = layers_by_name(report)
    for name in TINY_DECOMPOSABLE:
        assert layers[name]["decomposed"]
        assert layers[name]["params_after"] == reference[name]["params_after"]
        assert reference[name]["rel_error"] <= layers[name]["rel_error"] + TENSORLY_SLACK
    assert load_converted(tmp_path / "tensorly", trust_code=True).manifest["conversion"]["config"]["method"] == "tensorly"


# --------------------------------------------------------------------------------------------
# r3d_18, help, demo
# --------------------------------------------------------------------------------------------


def test_r3d18_atoms6(r3d18_checkpoint: Path, out: Path) -> None:
    report = convert_ok(r3d18_checkpoint, "--atoms", "6", "-o", out)
    assert report["architecture"]["name"] == "r3d_18"
    assert report["architecture"]["kwargs"] == {"num_classes": 400}
    layers = report["layers"]
    assert len(layers) == R3D18_CONV3D
    decomposed = [layer for layer in layers if layer["decomposed"]]
    assert len(decomposed) == R3D18_DECOMPOSABLE
    for layer in layers:
        if layer["kernel_size"] == [1, 1, 1]:
            assert "1×1×1" in layer["skipped"]
            continue
        assert layer["decomposed"], layer
        L, kh, kw = layer["kernel_size"]
        m_t, m_s = layer["temporal_atoms"], layer["spatial_atoms"]
        assert (m_t, m_s) == (min(L, 3), 6)
        # r3d_18's convs have no bias: A + Ψ + Φ.
        expected = layer["out_channels"] * layer["in_channels"] * m_t * m_s + L * m_t + kh * kw * m_s
        assert layer["params_after"] == expected, layer["name"]
    totals = report["totals"]
    assert totals["params_before"] == R3D18_PARAMS
    assert totals["decomposed_layers"] == R3D18_DECOMPOSABLE and totals["conv3d_layers"] == R3D18_CONV3D
    real = sum(p.numel() for p in load_converted(out, trust_code=True).model.parameters())
    assert totals["params_after"] == real
    saved = sum(layer["params_before"] - layer["params_after"] for layer in layers)
    assert totals["params_after"] == R3D18_PARAMS - saved
    assert report["parity"]["input_shape"] == [1, 3, 16, 112, 112]


def test_r3d18_full_rank_parity(r3d18_checkpoint: Path, out: Path) -> None:
    report = convert_ok(r3d18_checkpoint, "--full-rank", "--input-shape", "1,3,8,56,56", "-o", out)
    assert report["totals"]["decomposed_layers"] == R3D18_DECOMPOSABLE
    assert report["parity"]["rel_l2"] <= FULL_RANK_REL


@pytest.mark.parametrize("args", [["--help"], ["convert", "--help"], ["demo", "--help"]])
def test_help(args: list[str]) -> None:
    outcome = run_cli(args)
    assert outcome.exit_code == 0, outcome.output
    assert "Usage" in outcome.stdout
    if args[0] == "convert":
        for option in ("--atoms", "--energy", "--budget", "--full-rank", "--model", "--input-shape", "--force"):
            assert option in outcome.stdout
