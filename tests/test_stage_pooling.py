"""Stage-safe pooling heads: fixed-kernel pools (PyTorchVideo's heads) under the alternating schedule."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import run_cli
from stjfd_convert.memory import measure_training_step
from stjfd_convert.stages import StageSafePool, disable_stage_safe_pooling, enable_stage_safe_pooling
from videos import make_video_dataset

SEED = 0
CLIP = (2, 3, 8, 32, 32)  # B, C, T, H, W at full resolution

# A PyTorchVideo-style head: a fixed AvgPool3d whose kernel is the full-resolution feature map.
NET_SOURCE = textwrap.dedent(
    """
    from torch import nn

    def build(num_classes=3):
        return nn.Sequential(
            nn.Conv3d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(8, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            nn.BatchNorm3d(8),
            nn.ReLU(),
            nn.AvgPool3d((8, 16, 16), stride=1),
            nn.Flatten(),
            nn.Linear(8, num_classes),
        )
    """
)


def _net() -> nn.Module:
    namespace: dict = {}
    exec(compile(NET_SOURCE, "headnet", "exec"), namespace)  # the same source the CLI tests import
    torch.manual_seed(SEED)
    return namespace["build"]()


def _clip(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEED))


def test_the_fixed_head_breaks_on_downsampled_clips_without_the_wrapper() -> None:
    model = _net().eval()
    with pytest.raises(RuntimeError, match="smaller than kernel size"):
        model(_clip((2, 3, 8, 16, 16)))


def test_full_resolution_is_unchanged_and_small_clips_pool_globally() -> None:
    model = _net().eval()
    x = _clip(CLIP)
    reference = model(x)
    adapted = enable_stage_safe_pooling(model)
    assert isinstance(model[5].__dict__["forward"], StageSafePool)
    assert torch.equal(model(x), reference) and adapted == set()  # full size: the original pool, bit for bit
    small = _clip((2, 3, 8, 16, 16))
    features = model[:5](small)
    assert torch.allclose(model(small), model[6:](features.mean(dim=(2, 3, 4), keepdim=True)))
    assert adapted == {"5"}
    short = _clip((2, 3, 4, 32, 32))
    assert model(short).shape == (2, 3)
    assert model[5].kernel_size == (8, 16, 16) and model[5].padding == 0  # restored after every call
    assert enable_stage_safe_pooling(model) is adapted  # idempotent: one wrapper, one record
    assert disable_stage_safe_pooling(model) == 1 and "forward" not in model[5].__dict__


def test_max_pool_with_dilation_and_padding_is_clipped_per_axis() -> None:
    pool = nn.MaxPool3d((3, 5, 5), stride=1, padding=(1, 2, 2), dilation=(1, 2, 2))
    model = nn.Sequential(pool)
    enable_stage_safe_pooling(model)
    x = _clip((1, 2, 6, 4, 4))  # dilated spatial span 9 > 4 + 2·2: clipped; the temporal axis fits
    out = model(x)
    assert out.shape == (1, 2, 6, 1, 1)
    expected = nn.functional.max_pool3d(x, (3, 4, 4), stride=1, padding=(1, 0, 0))
    assert torch.equal(out, expected)
    assert pool.kernel_size == (3, 5, 5) and pool.dilation == (1, 2, 2)


def test_stage_memory_measurement_runs_and_names_the_adapted_pool() -> None:
    model = _net()
    temporal = measure_training_step(model, (2, 3, 8, 16, 16), stage="temporal", steps=1)
    assert temporal.adapted_pools == ["5"]
    joint = measure_training_step(model, CLIP, stage="joint", steps=1)
    assert joint.adapted_pools == []
    assert "forward" not in model[5].__dict__  # the measured copy was wrapped, not the model


@pytest.fixture(scope="module")
def headnet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("headnet")
    (root / "headnet.py").write_text(NET_SOURCE)
    data = root / "data"
    for split, seed in (("train", 0), ("val", 1)):
        make_video_dataset(data / split, per_class=2, T=12, H=36, W=36, seed=seed)
    converted = root / "conv"
    outcome = run_cli(["convert", "--model", f"{root / 'headnet.py'}:build", "--input-shape", ",".join(map(str, CLIP)),
                       "-o", converted, "--json"])
    assert outcome.exit_code == 0, outcome.output
    return converted, data


def test_finetune_alternating_runs_a_fixed_pool_head_and_records_it(headnet: tuple[Path, Path], tmp_path: Path) -> None:
    converted, data = headnet
    run = tmp_path / "run"
    outcome = run_cli(["finetune", converted, data, "--trust-code", "--clip-len", CLIP[2], "--size", CLIP[3],
                       "-s", 2, "-r", 2, "--batch-size", 3, "--workers", 0, "--mean", "0,0,0", "--std", "1,1,1",
                       "--device", "cpu", "-o", run, "--json"])
    assert outcome.exit_code == 0, outcome.output
    stages = json.loads(outcome.stdout)["stages"]
    assert [s["stage"] for s in stages] == ["temporal", "spatial"]
    assert all(s["adapted_pools"] == ["5"] for s in stages)
    assert "pooling run over the whole downsampled input in 5" in (run / "run.log").read_text()
    # The saved model keeps the original head: it runs at full resolution and is exported unchanged.
    outcome = run_cli(["evaluate", run / "best", data, "--trust-code", "--workers", 0, "--json"])
    assert outcome.exit_code == 0, outcome.output


def test_report_stage_rows_run_and_say_which_pool_was_adapted(headnet: tuple[Path, Path]) -> None:
    converted, _ = headnet
    outcome = run_cli(["report", converted, "--trust-code", "--input-shape", ",".join(map(str, CLIP)), "--steps", 1,
                       "--json"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.stdout)
    stage_rows = [row for row in report["training"] if row["stage"] != "joint"]
    assert stage_rows and all(row["adapted_pools"] == ["5"] for row in stage_rows)
    assert any("pooled over the whole downsampled input" in note for note in report["notes"])
