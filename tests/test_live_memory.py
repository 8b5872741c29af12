"""The live peak of a whole training step: every byte alive at once, transients and recomputation included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.memory import default_loss, measure_training_step
from stjfd_convert.stages import enable_activation_checkpointing

SEED = 0
SHAPE = (1, 3, 4, 16, 16)
LIVE_PEAK_REL = 0.05  # the bar: within 5 % of an independent live-tensor count


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv3d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm3d(channels)
        self.b = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.bn(self.a(x)))) + x)


def _net(converted: bool) -> nn.Module:
    torch.manual_seed(SEED)
    model = nn.Sequential(
        nn.Conv3d(3, 12, 3, padding=1), Block(12), Block(12), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(12, 4)
    )
    return convert_model(model, ConvertConfig())[0] if converted else model


def _mem_tracker_peak(model: nn.Module, checkpointing: bool) -> int:
    """torch's own live-tensor tracker (MemTracker) over a steady-state SGD step, as the reference."""
    tracker_module = pytest.importorskip("torch.distributed._tools.mem_tracker")
    work = copy.deepcopy(model).train()
    if checkpointing:
        enable_activation_checkpointing(work)
    optimizer = torch.optim.SGD(work.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        default_loss(work(x)).backward()
        optimizer.step()

    step()  # the optimizer state exists before a steady-state step
    tracker = tracker_module.MemTracker()
    tracker.track_external(work, optimizer, x)
    with tracker:
        step()
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


@pytest.mark.parametrize("converted", [False, True], ids=["dense", "converted"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_live_peak_matches_torch_mem_tracker(converted: bool, checkpointing: bool) -> None:
    model = _net(converted)
    ours = measure_training_step(model, SHAPE, checkpointing=checkpointing, steps=0)
    reference = _mem_tracker_peak(model, checkpointing)
    assert ours.peak_live_bytes == pytest.approx(reference, rel=LIVE_PEAK_REL)
    assert ours.budget_bytes == ours.peak_live_bytes  # what-fits compares this figure with the budget


def test_checkpointing_peak_is_above_the_saved_tensor_total() -> None:
    """Recomputed activations and gradients in flight are live at once: the saved-tensor total misses them."""
    memory = measure_training_step(_net(True), SHAPE, checkpointing=True, steps=0)
    assert memory.peak_live_bytes > memory.total_bytes


def test_meta_device_gives_the_same_live_peak() -> None:
    model = _net(True)
    cpu = measure_training_step(model, SHAPE, stage="temporal", steps=0)
    meta = measure_training_step(model, SHAPE, stage="temporal", steps=0, device="meta")
    assert meta.peak_live_bytes == cpu.peak_live_bytes
