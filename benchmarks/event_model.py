"""A small per-frame event model for the recovery benchmark (issue #12): a 3D CNN that takes raw frames.

    python benchmarks/event_model.py OUT.pth [--clips 512] [--epochs 6] [--seed 0] [--threads 2]

- :class:`EventNet` takes ``uint8 [B, T, H, W, 3]`` (BTHWC, raw 0..255) and returns
  ``(clip_logits [B, 3], {"aux": per_frame_probabilities [B, T]})`` — the shape of model issue #12 is about:
  channels-last uint8 input, a tuple with a dict, one head a per-frame sigmoid. The time axis is never
  strided, so there is one probability per input frame.
- :func:`event_clip` — one synthetic clip, seeded: a dim noisy background with a static dim distractor
  square, and 1–3 *events*: a bright square (random size and place) that appears for 1–3 frames. The
  events of a clip share a dominant colour channel (red, green or blue), which is the clip's class.
  Frames are ``VIDEO_SIZE``² so that the data loaders' resize (short side = size · 128/112) is a no-op and
  their centre crop of ``SIZE``² keeps every event (events stay ``MARGIN`` px from the border).
- :func:`event_clips` — a seeded batch of clips with their per-frame event masks and classes;
- :func:`event_scores` — onset precision / recall / F1 of thresholded per-frame probabilities against
  ground-truth masks, with ``stjfd compare``'s own matching (``stjfd_convert.compare``);
- :func:`train` — trains :class:`EventNet` on centre crops of generated clips (AdamW, BCE + CE), seeded,
  about a CPU minute, and saves its ``state_dict``. Nothing is downloaded.

The architecture is loaded by the CLI as ``--model benchmarks/event_model.py:build_event_net``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLIP_LEN = 16
SIZE = 42  # the model's input crop
# 48 (even, as yuv420 videos need): the loaders resize the short side to SIZE · 128/112, then crop SIZE.
VIDEO_SIZE = round(SIZE * 128 / 112)
CROP = (VIDEO_SIZE - SIZE) // 2  # the loaders' centre-crop offset
MARGIN = 8  # events and the distractor keep this far from the video border (> CROP, so crops keep them)
NUM_CLASSES = 3  # the events' dominant channel: red, green, blue
BACKGROUND_MAX = 50  # background noise is uniform in [0, BACKGROUND_MAX)
EVENT_MIN = 170  # an event's dominant channel lies in [EVENT_MIN, 255]; the others in [0, 110]
DISTRACTOR = (80, 130)  # the static square's grey level range: brighter than noise, dimmer than events


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def _conv_bn(c_in: int, c_out: int, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> nn.Sequential:
    padding = tuple(k // 2 for k in kernel)
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class EventNet(nn.Module):
    """uint8 ``[B, T, H, W, 3]`` → ``(clip logits [B, classes], {"aux": per-frame event probability [B, T]})``."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(3, width, (3, 5, 5), (1, 2, 2)),
            _conv_bn(width, 2 * width, (3, 3, 3), (1, 2, 2)),
            _conv_bn(2 * width, 2 * width, (3, 3, 3), (1, 1, 1)),
        )
        self.frame_head = nn.Linear(2 * width, 1)
        self.clip_head = nn.Linear(2 * width, num_classes)

    def forward(self, frames: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = frames.permute(0, 4, 1, 2, 3).float() / 255.0  # uint8 BTHWC → float BCTHW in 0..1
        features = self.body(x)  # [B, C, T, h, w]
        per_frame = features.amax(dim=(3, 4)).transpose(1, 2)  # [B, T, C]: an event is local, so max-pool space
        events = torch.sigmoid(self.frame_head(per_frame).squeeze(-1))
        return self.clip_head(features.mean(dim=(2, 3, 4))), {"aux": events}


def build_event_net(num_classes: int = NUM_CLASSES) -> nn.Module:
    """The event architecture with fresh weights (what ``--model benchmarks/event_model.py:build_event_net`` loads)."""
    return EventNet(num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# The synthetic task
# --------------------------------------------------------------------------------------------


def event_clip(seed: int, clip_len: int = CLIP_LEN, size: int = VIDEO_SIZE) -> tuple[np.ndarray, np.ndarray, int]:
    """One clip ``uint8 [clip_len, size, size, 3]``, its event mask ``bool [clip_len]`` and its class.

    1–3 events of 1–3 frames each, separated by at least 2 quiet frames (so that their onsets are distinct
    within ``stjfd compare``'s ±1-frame tolerance); none in the first frame.
    """
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, BACKGROUND_MAX, size=(clip_len, size, size, 3), dtype=np.uint8)
    label = int(rng.integers(0, NUM_CLASSES))
    side = int(rng.integers(6, 11))
    y, x = rng.integers(MARGIN, size - MARGIN - side + 1, size=2)
    frames[:, y : y + side, x : x + side] = rng.integers(*DISTRACTOR)  # static: never an event
    mask = np.zeros(clip_len, dtype=bool)
    start = 1 + int(rng.integers(0, 3))
    for _ in range(int(rng.integers(1, 4))):
        length = int(rng.integers(1, 4))
        if start + length > clip_len:
            break
        side = int(rng.integers(5, 13))
        y, x = rng.integers(MARGIN, size - MARGIN - side + 1, size=2)
        colour = rng.integers(0, 111, size=3)
        colour[label] = rng.integers(EVENT_MIN, 256)
        frames[start : start + length, y : y + side, x : x + side] = colour.astype(np.uint8)
        mask[start : start + length] = True
        start += length + 2 + int(rng.integers(0, 5))
    return frames, mask, label


def clip_seed(seed: int, index: int) -> int:
    """Clip ``index`` of the set with ``seed``: the first k clips of a set do not depend on its size."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def event_clips(n: int, seed: int, clip_len: int = CLIP_LEN, size: int = VIDEO_SIZE
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` clips ``uint8 [n, clip_len, size, size, 3]``, masks ``bool [n, clip_len]``, classes ``int64 [n]``."""
    frames = np.empty((n, clip_len, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, clip_len), dtype=bool)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        frames[i], masks[i], labels[i] = event_clip(clip_seed(seed, i), clip_len, size)
    return frames, masks, labels


def centre_crop(frames: np.ndarray, size: int = SIZE) -> np.ndarray:
    """The loaders' evaluation crop of ``[..., H, W, 3]`` frames (their resize is a no-op at VIDEO_SIZE)."""
    top, left = (frames.shape[-3] - size) // 2, (frames.shape[-2] - size) // 2
    return frames[..., top : top + size, left : left + size, :]


def event_scores(probabilities: Tensor | np.ndarray, masks: Tensor | np.ndarray, threshold: float = 0.5,
                 tolerance: int = 1) -> dict[str, float | int | None]:
    """Onsets of ``probabilities ≥ threshold`` [N, T] matched to the onsets of the true ``masks`` [N, T]
    within ± ``tolerance`` frames: precision, recall, F1 (``stjfd compare``'s definitions, ground truth as
    the reference)."""
    from stjfd_convert.compare import EventScores, match_events, onsets

    predicted, truth = torch.as_tensor(probabilities) >= threshold, torch.as_tensor(masks).bool()
    scores = EventScores()
    for p, t in zip(predicted, truth):
        reference, candidate = onsets(t), onsets(p)
        scores.original_events += len(reference)
        scores.converted_events += len(candidate)
        scores.matched += match_events(reference, candidate, tolerance)
    return {"events": scores.original_events, "predicted": scores.converted_events, "matched": scores.matched,
            "precision": scores.precision, "recall": scores.recall, "f1": scores.f1}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def train(output: str | Path, *, clips: int = 384, epochs: int = 5, batch_size: int = 16, lr: float = 3e-3,
          seed: int = 0, data_seed: int = 1000, threads: int | None = None) -> dict[str, float]:
    """Train :class:`EventNet` on ``clips`` generated clips (centre crops, random flips) and save its
    ``state_dict`` to ``output``. Returns the final training loss and the seconds it took."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    frames, masks, labels = event_clips(clips, data_seed)
    frames = np.ascontiguousarray(centre_crop(frames))
    model = build_event_net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (clips // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    loss = torch.zeros(())
    for _ in range(epochs):
        order = rng.permutation(clips)
        for first in range(0, clips - batch_size + 1, batch_size):
            index = order[first : first + batch_size]
            batch = torch.from_numpy(frames[index])
            if rng.random() < 0.5:
                batch = batch.flip(3)  # the loaders flip training clips: the task is left-right symmetric
            logits, outputs = model(batch)
            loss = F.binary_cross_entropy(outputs["aux"], torch.from_numpy(masks[index]).float()) + \
                F.cross_entropy(logits, torch.from_numpy(labels[index]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output)
    return {"loss": loss.item(), "seconds": time.perf_counter() - start, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="where to save the state_dict (.pth)")
    parser.add_argument("--clips", type=int, default=384)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(train(args.output, clips=args.clips, epochs=args.epochs, seed=args.seed, threads=args.threads))


if __name__ == "__main__":
    main()
