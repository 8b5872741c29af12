"""benchmarks/bench_recovery.py (issue #12): the event model's synthetic task and metric, and the whole
pipeline — event model training, plain conversion, distillation, evaluate / compare — on a tiny setting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import event_model  # noqa: E402

SEED = 0
CLIPS = 40
MIN_GAP = 2  # quiet frames between two events of a clip (event_model.event_clip)


def test_event_clips_are_seeded_with_separated_events_of_the_clip_class() -> None:
    frames, masks, labels = event_model.event_clips(CLIPS, SEED)
    again = event_model.event_clips(CLIPS, SEED)
    assert np.array_equal(frames, again[0]) and np.array_equal(masks, again[1]) and np.array_equal(labels, again[2])
    assert not np.array_equal(frames, event_model.event_clips(CLIPS, SEED + 1)[0])
    assert frames.shape == (CLIPS, event_model.CLIP_LEN, event_model.VIDEO_SIZE, event_model.VIDEO_SIZE, 3)
    assert frames.dtype == np.uint8 and set(labels.tolist()) == set(range(event_model.NUM_CLASSES))
    for clip, mask, label in zip(frames, masks, labels):
        assert mask.any() and not mask[0]
        runs = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        starts, ends = runs[0::2], runs[1::2]
        assert all(1 <= end - start <= 3 for start, end in zip(starts, ends))
        assert all(nxt - end >= MIN_GAP for end, nxt in zip(ends[:-1], starts[1:]))
        # Event pixels: bright in the class channel, which no quiet frame reaches.
        event_frames = clip[mask].reshape(-1, 3)
        assert event_frames[:, label].max() >= event_model.EVENT_MIN
        assert clip[~mask].max() < event_model.EVENT_MIN
        # The loaders' centre crop keeps every event pixel.
        cropped = event_model.centre_crop(clip[mask])
        assert cropped[..., label].max(axis=(1, 2)).min() >= event_model.EVENT_MIN


def test_event_scores_match_onsets_within_one_frame() -> None:
    truth = np.zeros((2, 10), dtype=bool)
    truth[0, [2, 3, 7]] = True  # onsets 2 and 7
    truth[1, 5] = True  # onset 5
    assert event_model.event_scores(truth.astype(float), truth)["f1"] == 1.0
    shifted = np.roll(truth, 1, axis=1).astype(float)  # every onset one frame late: still matched
    assert event_model.event_scores(shifted, truth)["f1"] == 1.0
    missed = truth.astype(float)
    missed[1] = 0.0  # one of three events missed, nothing invented
    scores = event_model.event_scores(missed, truth)
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(0.8)


def test_event_net_takes_uint8_frames_and_returns_logits_and_per_frame_probabilities() -> None:
    net = event_model.build_event_net().eval()
    frames = torch.from_numpy(event_model.centre_crop(event_model.event_clips(2, SEED)[0]).copy())
    logits, outputs = net(frames)
    assert logits.shape == (2, event_model.NUM_CLASSES)
    assert outputs["aux"].shape == (2, event_model.CLIP_LEN)
    assert bool(((outputs["aux"] >= 0) & (outputs["aux"] <= 1)).all())


@pytest.mark.slow
def test_bench_recovery_runs_end_to_end_on_a_tiny_setting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Both models, every arm, through the CLI: a few clips and one short cycle."""
    import bench_recovery

    out = tmp_path / "recovery.json"
    results = bench_recovery.main(["--tiny", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    for name in ("sample", "event"):
        rows = {row["arm"]: row for row in results["models"][name]["rows"]}
        assert list(rows) == ["original", "plain", "calibrate", "distill"]
        for row in rows.values():  # convert records the BTHWC layout, so every arm is comparable
            assert 0.0 <= row["top1"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
        assert rows["plain"]["wall_s"] > 0 and rows["calibrate"]["cpu_s"] > 0 and rows["distill"]["cpu_s"] > 0
        assert set(results["models"][name]["targets"]) >= {"quality", "wall", "calibrate_beats_plain"}
    event_rows = {row["arm"]: row for row in results["models"]["event"]["rows"]}
    assert all("event_f1_original" in row and "event_f1_truth" in row for row in event_rows.values())
    assert (tmp_path / "work" / "event" / "distill" / "last").is_dir()
    table = capsys.readouterr().out
    assert "| sample | distill |" in table and "| event | calibrate |" in table
