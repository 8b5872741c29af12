"""The bundled sample model and its synthetic toy task (what ``stjfd demo`` runs on).

- :func:`build_sample_net` — a small 3D CNN in the style of torchvision's video ResNet (``r3d``): a
  (3, 7, 7) stem, three residual blocks of 3×3×3 convolutions (16 → 32 → 64 channels), global pooling
  and a linear classifier. About 230 k parameters (< 1 MB as float32).
- :func:`shape_frames` — one toy clip, ``uint8 [T, H, W, 3]``: a bright square that moves left→right,
  moves top→bottom or blinks in place over a dim noisy background. The classes differ only in how the
  square changes over time, so a model has to use its temporal filters to tell them apart.
- :func:`sample_clips` / :class:`SampleClips` — a seeded batch of such clips (randomised position, size,
  speed, blink rhythm, colour and noise) as float frames in 0..1, and the same as an in-memory dataset
  that :func:`stjfd_convert.finetune.finetune` and :func:`~stjfd_convert.finetune.evaluate` accept.

The checked-in weights (``sample_models/sample_model.safetensors`` + ``sample_model.json``, installed as
the package ``stjfd_convert.sample_models``) are written by ``sample_models/train_sample_model.py``. The model expects frames scaled to 0..1 without mean/std
normalisation.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

__all__ = [
    "SAMPLE_CLASSES",
    "SAMPLE_CLIP_LEN",
    "SAMPLE_MODEL_NAME",
    "SAMPLE_SIZE",
    "SampleClips",
    "SampleModelFiles",
    "build_sample_net",
    "sample_clips",
    "sample_model_files",
    "shape_frames",
    "split_seed",
]

SAMPLE_CLASSES = ("left_right", "top_bottom", "blink")
SAMPLE_CLIP_LEN = 16
SAMPLE_SIZE = 64
# How the bundled checkpoint's architecture is recorded (``--model`` form of stjfd_convert.models).
SAMPLE_MODEL_NAME = "stjfd_convert.sample:build_sample_net"

# Background noise is uniform in [0, NOISE_MAX) (uint8 levels); the square's colour in [COLOUR_MIN, 255].
NOISE_MAX = 40
COLOUR_MIN = 150


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    """Two 3×3×3 conv-BN layers with an identity (or strided 1×1×1) shortcut, as in torchvision's r3d."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv3d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm3d(planes),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(nn.Conv3d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm3d(planes))
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm3d(planes)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class SampleNet(nn.Module):
    """Stem (3, 7, 7) → three basic blocks (``widths``, stride 2 after the first) → pool → linear."""

    def __init__(self, num_classes: int = 3, widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        stem_width = widths[0]
        self.stem = nn.Sequential(
            nn.Conv3d(3, stem_width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(stem_width),
            nn.ReLU(inplace=True),
        )
        blocks = []
        in_planes = stem_width
        for i, planes in enumerate(widths):
            blocks.append(_BasicBlock(in_planes, planes, stride=2))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = blocks
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_sample_net(num_classes: int = 3) -> nn.Module:
    """The sample architecture with fresh weights (the bundled checkpoint has ``num_classes=3``)."""
    return SampleNet(num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# The toy task
# --------------------------------------------------------------------------------------------


def _kind_index(kind: int | str) -> int:
    return SAMPLE_CLASSES.index(kind) if isinstance(kind, str) else int(kind) % len(SAMPLE_CLASSES)


def shape_frames(kind: int | str, T: int, H: int, W: int, seed: int = 0, *, vary: bool = False) -> np.ndarray:
    """One toy clip ``uint8 [T, H, W, 3]``: a bright square that moves left→right (kind 0 or
    ``"left_right"``), top→bottom (1) or stays put and blinks (2), over a dim noisy background.

    Colour and position always depend on ``seed``. Without ``vary`` the square has side min(H, W) // 4,
    sweeps the whole frame over the clip and blinks on even frames. With ``vary`` its side (⅙ … ⅓ of
    the frame), speed and starting point (a sweep over 40–100 % of the free path), blink period (2–4
    frames) and phase, and the background noise level (20–60) are drawn from the seed as well.
    """
    kind_index = _kind_index(kind)
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, NOISE_MAX, size=(T, H, W, 3), dtype=np.uint8)
    side = max(2, min(H, W) // 4)
    colour = rng.integers(COLOUR_MIN, 256, size=3, dtype=np.uint8)
    y0 = int(rng.integers(0, H - side + 1))
    x0 = int(rng.integers(0, W - side + 1))
    travel, offset, period, phase = 1.0, 0.0, 2, 0
    if vary:
        # Drawn after the fixed-layout values so that vary=False clips stay exactly as they were.
        side = max(2, round(min(H, W) * rng.uniform(1 / 6, 1 / 3)))
        y0, x0 = min(y0, H - side), min(x0, W - side)
        travel = float(rng.uniform(0.4, 1.0))
        offset = float(rng.uniform(0.0, 1.0 - travel))
        period, phase = int(rng.integers(2, 5)), int(rng.integers(0, 4))
        level = float(rng.uniform(20, 60))
        frames = np.round(frames.astype(np.float32) * (level / NOISE_MAX)).clip(0, 255).astype(np.uint8)
    for t in range(T):
        position = offset + travel * t / max(1, T - 1)
        y, x = y0, x0
        if kind_index == 0:
            x = round(position * (W - side))
        elif kind_index == 1:
            y = round(position * (H - side))
        elif (t + phase) % period >= (period + 1) // 2:
            continue  # blink: the square is off for the second half of each period
        frames[t, y : y + side, x : x + side] = colour
    return frames


def split_seed(seed: int, split: str) -> int:
    """A data seed for one named split (``"train"``, ``"val"``, ``"demo-test"``…) of run seed ``seed``:
    different splits of the same run never share clips."""
    return int(np.random.SeedSequence([seed, zlib.crc32(split.encode("utf-8"))]).generate_state(1)[0])


def sample_clips(
    n: int, *, clip_len: int = SAMPLE_CLIP_LEN, size: int = SAMPLE_SIZE, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``n`` varied toy clips ``float32 [n, 3, clip_len, size, size]`` in 0..1 and their labels ``int64 [n]``.

    Classes cycle 0, 1, 2, … so every class is (almost) equally frequent; clip i is drawn from the seed
    ``(seed, i)``, so the first k clips of a set are the same whatever ``n`` is.
    """
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    labels = torch.arange(n, dtype=torch.int64) % len(SAMPLE_CLASSES)
    frames = np.empty((n, clip_len, size, size, 3), dtype=np.uint8)
    for i in range(n):
        clip_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        frames[i] = shape_frames(int(labels[i]), clip_len, size, size, clip_seed, vary=True)
    clips = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).contiguous().float().div_(255.0)
    return clips, labels


class SampleClips(Dataset):
    """:func:`sample_clips` held in memory; items are ``(clip [3, T, H, W], label)``."""

    def __init__(self, n: int, *, clip_len: int = SAMPLE_CLIP_LEN, size: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self.clips, self.targets = sample_clips(n, clip_len=clip_len, size=size, seed=seed)
        self.classes = list(SAMPLE_CLASSES)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.clips[index], int(self.targets[index])


# --------------------------------------------------------------------------------------------
# The bundled checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleModelFiles:
    """The checked-in sample checkpoint and its description (``sample_model.json``)."""

    weights: Path
    info_path: Path

    @property
    def info(self) -> dict[str, Any]:
        return json.loads(self.info_path.read_text(encoding="utf-8"))


def sample_model_files() -> SampleModelFiles:
    """Paths of ``sample_model.safetensors`` and ``sample_model.json`` in ``stjfd_convert.sample_models``."""
    from .errors import StjfdError

    assets = Path(str(resources.files(f"{__package__}.sample_models")))
    files = SampleModelFiles(assets / "sample_model.safetensors", assets / "sample_model.json")
    for path in (files.weights, files.info_path):
        if not path.is_file():
            raise StjfdError(
                f"the bundled sample model file {path} is missing",
                "reinstall stjfd, or regenerate it with `python sample_models/train_sample_model.py`",
            )
    return files
