"""The coverage matrix (issue #13 deliverable 5): every check of ``benchmarks/coverage_matrix.py`` on every
architecture. The whole matrix is slow (``pytest -m slow``); the fast suite runs mc3_18's conversion checks
and the table at a tiny clip."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import coverage_matrix as matrix
from tolerances import REL_FP32_FULL_RANK_MODEL

TORCHVISION = [name for name, case in matrix.CASES.items() if case.family == "torchvision"]
PYTORCHVIDEO = [name for name, case in matrix.CASES.items() if case.family == "pytorchvideo"]
# Swin's one Conv3d is its patch embedding (MViT has depthwise pooling convs besides, decomposed too).
PATCH_EMBEDDING_ONLY = {"swin3d_t": ["patch_embed.proj"]}


def assert_covered(result: dict[str, Any]) -> None:
    name = result["model"]
    assert result["errors"] == {}, result["errors"]
    # A documented limitation ended in a clean StjfdError (what a user sees), and nothing else was limited.
    assert result["limited"].keys() == matrix.CASES[name].limitations.keys()
    assert result["full_rank_rel_l2"] < REL_FP32_FULL_RANK_MODEL
    assert 0 < result["decomposed_layers"] <= result["conv3d_layers"]
    assert result["param_ratio"] < 1.0
    assert result["params_after"] < result["params_before"]
    assert result["low_savings_warning"] is matrix.CASES[name].expect_low_savings, result["warnings"]
    if name in PATCH_EMBEDDING_ONLY:
        assert result["decomposed_names"] == PATCH_EMBEDDING_ONLY[name]
    for stage in matrix.STAGES:
        if f"stage_{stage}" in result["limited"]:
            continue
        info = result["stages"][stage]
        assert info["trainable_params"] > 0 and info["frozen_params"] > 0  # the stage froze one kind of atoms
    if "onnx" not in result["limited"]:
        assert result["onnx_checker"] and result["onnx_validated"]
    assert result["report_ok"] and result["report_layers"] >= result["conv3d_layers"]  # every Conv3d has a row
    assert all(matrix.passed(result).values())


def test_script_tolerance_is_the_suite_tolerance() -> None:
    assert matrix.FULL_RANK_REL_TOL == REL_FP32_FULL_RANK_MODEL


def test_mc3_18_full_rank_and_default_conversion_and_table() -> None:
    result = matrix.check_model("mc3_18", checks=("full_rank", "convert"))
    assert result["errors"] == {}
    assert result["full_rank_rel_l2"] < REL_FP32_FULL_RANK_MODEL
    assert 0 < result["decomposed_layers"] < result["conv3d_layers"]  # 1×1×1 downsampling convs stay dense
    assert result["param_ratio"] < 1.0 and not result["low_savings_warning"]
    assert matrix.passed(result) == {"full_rank": True, "convert": True}
    table = matrix.table([result]).splitlines()
    assert table[0].startswith("| model | input shape |") and len(table) == 3
    assert table[2].startswith("| mc3_18 | 1×3×4×32×32 | ")


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_model_is_covered(name: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    assert_covered(matrix.check_model(name, workdir=tmp_path))


@pytest.mark.slow
@pytest.mark.matrix
@pytest.mark.parametrize("name", PYTORCHVIDEO)
def test_pytorchvideo_model_is_covered(name: str, tmp_path: Path) -> None:
    pytest.importorskip("pytorchvideo")
    pytest.importorskip("onnxruntime")
    assert_covered(matrix.check_model(name, workdir=tmp_path))
