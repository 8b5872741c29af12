"""DDP: `torchrun --nproc_per_node 2 -m stjfd_convert finetune …` (gloo, CPU) vs one process.

The global batch is the same (6 = 2 ranks × 3), and ShardedShuffleSampler gives rank r the r-th half of
every single-process batch, so DDP's averaged gradient is the single-process gradient up to float
rounding. The model has no BatchNorm: BN in train mode normalises each rank's half batch on its own,
which is a (documented) real difference, not rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from videos import make_video_dataset

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.finetune import FinetuneConfig, finetune_paths, read_metrics
from stjfd_convert.models import ArchSpec
from stjfd_convert.saved_model import load_converted, save_converted

# Two processes sum the same terms in another order (conv on half batches, all-reduce of gradients);
# after 6 SGD steps parameters and losses agree to this absolute tolerance.
DDP_PARAM_ATOL = 1e-5
DDP_LOSS_ATOL = 1e-5

SOURCE = '''
from torch import nn


def build(num_classes=3):
    return nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv3d(8, 16, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
'''
OPTIONS = dict(cycles=1, epochs_per_stage=1, batch_size=6, optimizer="sgd", lr=0.05, momentum=0.9,
               weight_decay=1e-4, seed=0, log_every=1)


def _cli_options() -> list[str]:
    return ["--clip-len", "8", "--size", "32", "--cycles", "1", "--epochs-per-stage", "1", "--batch-size", "6",
            "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "1e-4", "--seed", "0",
            "--log-every", "1", "--workers", "0", "--no-plot", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    module = root / "plainnet.py"
    module.write_text(SOURCE)
    namespace: dict = {}
    exec(SOURCE, namespace)
    torch.manual_seed(0)
    model, _ = convert_model(namespace["build"](), ConvertConfig(spatial_atoms=4, temporal_atoms=2))
    model_dir = save_converted(model, root / "model-stjfd", ArchSpec("callable", f"{module}:build", {}))
    make_video_dataset(root / "data" / "train", per_class=6, T=8, H=32, W=32, seed=1)
    make_video_dataset(root / "data" / "val", per_class=3, T=8, H=32, W=32, seed=2)
    return model_dir, root / "data"


def test_ddp_two_gloo_processes_match_single_process(setup, tmp_path: Path) -> None:
    model_dir, data = setup
    single = finetune_paths(
        model_dir, data, FinetuneConfig(**OPTIONS, workers=0, plot=False, device="cpu"), output=tmp_path / "single",
        clip_len=8, size=32, trust_code=True,
    )

    env = {k: v for k, v in os.environ.items() if k not in ("STJFD_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", TERM="dumb", COLUMNS="200")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "stjfd_convert", "finetune", str(model_dir), str(data), *_cli_options(),
               "-o", str(tmp_path / "ddp"), "--json", "--trust-code"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(proc.stdout)  # rank 0 alone prints the result
    assert ddp["world_size"] == 2 and single.world_size == 1
    assert ddp["steps"] == single.steps == 6

    for mine, theirs in zip(single.epochs, ddp["epochs"], strict=True):
        assert theirs["train_loss"] == pytest.approx(mine["train_loss"], abs=DDP_LOSS_ATOL)
        assert theirs["val_loss"] == pytest.approx(mine["val_loss"], abs=DDP_LOSS_ATOL)
        assert theirs["val_top1"] == mine["val_top1"] and theirs["train_top1"] == mine["train_top1"]
    steps = lambda run: [r["loss"] for r in read_metrics(run) if r["type"] == "step"]  # noqa: E731
    assert steps(tmp_path / "ddp") == pytest.approx(steps(tmp_path / "single"), abs=DDP_LOSS_ATOL)

    a = load_converted(tmp_path / "single" / "last", trust_code=True).model.state_dict()
    b = load_converted(tmp_path / "ddp" / "last", trust_code=True).model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=DDP_PARAM_ATOL), (key, (a[key] - b[key]).abs().max())
    # Training moved the weights by far more than the tolerance (the comparison is not vacuous).
    start = load_converted(model_dir, trust_code=True).model.state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 100 * DDP_PARAM_ATOL
    # Only rank 0 wrote: one run folder, one JSON document.
    assert not list((tmp_path).glob(".ddp.*"))


def test_ddp_distillation_on_unlabeled_videos_matches_single_process(setup, tmp_path: Path) -> None:
    """``--unlabeled --distill``: each rank's teacher sees that rank's half batch; the averaged gradient is the
    single-process one, so two gloo processes end where one does."""
    model_dir, data = setup
    namespace: dict = {}
    exec(SOURCE, namespace)
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pth"
    torch.save(namespace["build"]().state_dict(), teacher)
    distill = ["--unlabeled", "--distill", str(teacher), "--model", f"{model_dir.parent / 'plainnet.py'}:build"]
    env = {k: v for k, v in os.environ.items() if k not in ("STJFD_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", NO_COLOR="1", TERM="dumb", COLUMNS="200")
    runs = {}
    for name, launcher in (("single", []), ("ddp", ["-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", "2"])):
        command = [sys.executable, *launcher, "-m", "stjfd_convert", "finetune", str(model_dir), str(data / "train"),
                   *_cli_options(), *distill, "-o", str(tmp_path / name), "--json", "--trust-code"]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads(proc.stdout)
    assert runs["ddp"]["world_size"] == 2 and runs["ddp"]["steps"] == runs["single"]["steps"]
    steps = lambda run: [r["loss"] for r in read_metrics(run) if r["type"] == "step"]  # noqa: E731
    assert steps(tmp_path / "ddp") == pytest.approx(steps(tmp_path / "single"), abs=DDP_LOSS_ATOL)
    a = load_converted(tmp_path / "single" / "last", trust_code=True).model.state_dict()
    b = load_converted(tmp_path / "ddp" / "last", trust_code=True).model.state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=DDP_PARAM_ATOL), (key, (a[key] - b[key]).abs().max())
    start = load_converted(model_dir, trust_code=True).model.state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 100 * DDP_PARAM_ATOL
