"""DistillationLoss: a converted model learns from its frozen original on unlabeled clips (#12, library)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.data import unlabeled_dataset
from stjfd_convert.errors import ConfigError
from stjfd_convert.finetune import FinetuneConfig, LossContext, finetune
from stjfd_convert.finetune.distill import DistillationLoss
from stjfd_convert.parity import make_input
from videos import make_video_dataset

SEED = 0
CLIP = (2, 3, 8, 32, 32)


def _classifier() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


class TwoHead(nn.Module):
    """Clip logits and, in a dict, per-frame event probabilities (a sigmoid head): ``(logits, {"aux": p})``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.body = nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.ReLU())
        self.clip_head = nn.Linear(6, 4)
        self.frame_head = nn.Conv3d(6, 1, 1)

    def forward(self, x: torch.Tensor):
        features = self.body(x)
        logits = self.clip_head(features.mean(dim=(2, 3, 4)))
        events = torch.sigmoid(self.frame_head(features).mean(dim=(3, 4))).squeeze(1)  # [B, T]
        return logits, {"aux": events}


def _ctx(student: nn.Module, clips: torch.Tensor, labels: torch.Tensor | None = None) -> LossContext:
    labels = labels if labels is not None else torch.full((clips.shape[0],), -1)
    return LossContext(student(clips), labels, clips, clips, student, "joint", 0, 0)


def test_auto_picks_kl_for_logits_bce_for_probabilities_mse_otherwise() -> None:
    loss = DistillationLoss(_classifier())
    assert loss.kind_for(torch.randn(4, 3)) == "kl"
    assert loss.kind_for(torch.rand(4, 16)) == "bce"  # all in [0, 1]: probabilities
    assert loss.kind_for(torch.randn(4, 8, 2, 2)) == "mse"
    assert loss.kind_for(torch.randn(4, 1)) == "mse"
    assert DistillationLoss(_classifier(), "mse").kind_for(torch.randn(4, 3)) == "mse"
    two_head = DistillationLoss(TwoHead().eval())
    two_head(_ctx(TwoHead().eval(), make_input(CLIP, seed=SEED)))
    assert two_head.kinds == {"output[0]": "kl", "output[1]['aux']": "bce"}  # decided once, kept for the run


def test_the_student_equal_to_its_teacher_has_zero_loss_and_every_output_is_matched() -> None:
    teacher = TwoHead().eval()
    loss, extras = DistillationLoss(teacher)(_ctx(copy.deepcopy(teacher), make_input(CLIP, seed=SEED)))
    # KL of equal distributions is 0; BCE of p against itself is p's entropy, its minimum over the student.
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.clip_head.bias += 1.0
        student.frame_head.bias += 0.5
    worse, _ = DistillationLoss(teacher)(_ctx(student, make_input(CLIP, seed=SEED)))
    assert worse > loss and extras["distill"] == pytest.approx(float(loss))


def test_distillation_pulls_a_two_head_student_towards_its_teacher() -> None:
    """Both heads move to the teacher's: the clip logits (KL) and the per-frame probabilities (BCE)."""
    teacher = TwoHead().eval()
    student = TwoHead()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    probe = make_input(CLIP, seed=SEED + 100)

    def gaps() -> tuple[float, float]:
        with torch.no_grad():
            (s_logits, s_aux), (t_logits, t_aux) = student(probe), teacher(probe)
        return (float((s_logits.softmax(1) - t_logits.softmax(1)).abs().mean()),
                float((s_aux["aux"] - t_aux["aux"]).abs().mean()))

    start = gaps()
    loss_fn = DistillationLoss(teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    for step in range(40):
        loss, _ = loss_fn(_ctx(student, make_input(CLIP, seed=step)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = gaps()
    assert end[0] < 0.5 * start[0] and end[1] < 0.5 * start[1], (start, end)


def test_mismatched_outputs_and_bad_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="do not match"):
        DistillationLoss(TwoHead())(_ctx(_classifier(), make_input(CLIP, seed=SEED)))
    with pytest.raises(ConfigError, match="--distill-loss"):
        DistillationLoss(_classifier(), "l1")
    with pytest.raises(ConfigError, match="--distill-weight"):
        DistillationLoss(_classifier(), label_weight=2.0)


def test_labels_mix_in_only_where_clips_have_them() -> None:
    teacher = _classifier()
    student = convert_model(teacher, ConvertConfig(spatial_atoms=2, temporal_atoms=1))[0]
    clips = make_input(CLIP, seed=SEED)
    mixed = DistillationLoss(teacher, label_weight=0.5)
    _, with_labels = mixed(_ctx(student, clips, torch.tensor([0, 2])))
    _, without = mixed(_ctx(student, clips))
    assert "label" in with_labels and "label" not in without


@pytest.mark.parametrize("amp, bn_recal_batches", [(False, 0), (True, 2)], ids=["fp32", "bf16-autocast+bn-recal"])
def test_finetune_distils_a_converted_classifier_on_unlabeled_videos(
    tmp_path: Path, amp: bool, bn_recal_batches: int
) -> None:
    """The alternating schedule with the teacher seeing each stage's clip: the student moves towards it,
    the teacher does not move at all — also under autocast and with BatchNorm re-estimated after stages."""
    make_video_dataset(tmp_path / "clips" / "a", per_class=2, T=12, H=36, W=36, seed=SEED)
    dataset = unlabeled_dataset(tmp_path / "clips", clip_len=CLIP[2], size=CLIP[3], mean=(0, 0, 0), std=(1, 1, 1))
    teacher = _classifier()
    with torch.no_grad():
        teacher[-1].weight.mul_(30.0)  # a confident teacher, so that the conversion's damage shows
    before = copy.deepcopy(teacher.state_dict())
    student = convert_model(teacher, ConvertConfig(spatial_atoms=2, temporal_atoms=1))[0]
    eval_set = unlabeled_dataset(tmp_path / "clips", clip_len=CLIP[2], size=CLIP[3], mean=(0, 0, 0), std=(1, 1, 1),
                                 train=False)
    probe = torch.stack([eval_set[i][0] for i in range(len(eval_set))])

    def gap(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model.eval()(probe).softmax(1) - teacher(probe).softmax(1)).abs().mean())

    start = gap(student)
    config = FinetuneConfig(cycles=3, batch_size=2, lr=0.05, device="cpu", bn_recal_batches=bn_recal_batches,
                            plot=False, seed=SEED, weight_decay=0.0, amp=amp)
    finetune(student, dataset, None, config, loss_fn=DistillationLoss(teacher))
    assert gap(student) < 0.5 * start, (start, gap(student))
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and BN statistics unchanged
    assert not teacher.training


# --------------------------------------------------------------------------------------------
# The command line: stjfd finetune --unlabeled --distill
# --------------------------------------------------------------------------------------------

SAMPLE_SHAPE = (1, 3, 8, 32, 32)


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bundled sample model converted with few atoms, and a folder of unlabeled videos (nested)."""
    from stjfd_convert.sample import SAMPLE_MODEL_NAME, sample_model_files
    from stjfd_convert.workflows import convert_checkpoint

    root = tmp_path_factory.mktemp("distill")
    result = convert_checkpoint(
        sample_model_files().weights, ConvertConfig(spatial_atoms=2, temporal_atoms=1), model=SAMPLE_MODEL_NAME,
        model_kwargs={"num_classes": 3}, input_shape=SAMPLE_SHAPE, output=root / "small",
    )
    make_video_dataset(root / "clips" / "day1", per_class=2, T=12, H=36, W=36, seed=SEED)
    make_video_dataset(root / "clips" / "day2", per_class=1, T=12, H=36, W=36, seed=SEED + 1)
    return {"root": root, "small": result.output, "clips": root / "clips"}


def _distill_args(sample: dict[str, Path], run: Path, *extra: object) -> list[object]:
    return ["finetune", sample["small"], sample["clips"], "--unlabeled", "--distill", "source", "--clip-len",
            SAMPLE_SHAPE[2], "--size", SAMPLE_SHAPE[3], "--batch-size", 3, "--workers", 0, "--mean", "0,0,0", "--std",
            "1,1,1", "--device", "cpu", "--lr", "0.02", "-o", run, *extra]


def test_cli_distils_on_unlabeled_videos_and_resume_gives_the_same_result(
    small_sample: dict[str, Path], tmp_path: Path
) -> None:
    import json

    from cli_helpers import run_cli
    from stjfd_convert.saved_model import load_converted

    whole = tmp_path / "whole"
    outcome = run_cli(_distill_args(small_sample, whole, "--json"))
    assert outcome.exit_code == 0, outcome.output
    config = json.loads((whole / "config.json").read_text())
    assert config["distill"]["loss"] == "auto" and config["data"]["unlabeled"] is True
    assert config["distill"]["teacher"].endswith(".safetensors")  # `source`: the checkpoint it was converted from
    # No class folders: the run keeps the class names the converted folder records, so evaluate matches them.
    from stjfd_convert.sample import SAMPLE_CLASSES

    assert load_converted(whole / "last").manifest["finetune"]["classes"] == list(SAMPLE_CLASSES)
    # An interrupted copy: stop after its first stage (a callback asks to stop), then resume.
    from stjfd_convert.finetune import TrainingInterrupted, finetune_paths, resume
    from stjfd_convert.finetune.events import BatchEnd

    class StopInTheSpatialStage:
        """Ctrl-C after the first micro-batch of epoch 1 (the spatial stage): the step is saved in last/."""

        def __call__(self, event: object) -> None:
            if isinstance(event, BatchEnd) and (event.epoch, event.batch) == (1, 1):
                raise KeyboardInterrupt

    split = tmp_path / "split"
    with pytest.raises(TrainingInterrupted):
        finetune_paths(
            small_sample["small"], small_sample["clips"], FinetuneConfig(batch_size=3, lr=0.02, device="cpu", plot=False),
            output=split, clip_len=SAMPLE_SHAPE[2], size=SAMPLE_SHAPE[3], mean=(0, 0, 0), std=(1, 1, 1),
            unlabeled=True, distill="source", callbacks=[StopInTheSpatialStage()],
        )
    # An edited config.json naming another teacher builder is data, not code: resume refuses to run it.
    config_path = split / "config.json"
    original_config = config_path.read_text()
    edited = json.loads(original_config)
    edited["distill"]["model"] = "os:system"
    config_path.write_text(json.dumps(edited))
    with pytest.raises(ConfigError, match="os:system"):
        resume(split)
    config_path.write_text(original_config)
    resumed = resume(split)
    assert resumed.changed
    a = load_converted(whole / "last").model.state_dict()
    b = load_converted(split / "last").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_unlabeled_without_a_teacher_is_refused(small_sample: dict[str, Path], tmp_path: Path) -> None:
    from cli_helpers import assert_one_error_line, run_cli

    args = [a for a in _distill_args(small_sample, tmp_path / "run") if a not in ("--distill", "source")]
    assert_one_error_line(run_cli(args), "--unlabeled", "--distill")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# stjfd compare: how close the converted (and distilled) model stays to its original
# --------------------------------------------------------------------------------------------


def test_event_onsets_are_matched_one_to_one_within_the_tolerance() -> None:
    from stjfd_convert.compare import EventScores, match_events, onsets

    assert onsets(torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)) == [1, 4, 7]
    assert match_events([1, 4, 7], [2, 4, 9], tolerance=1) == 2
    assert match_events([3], [2, 4], tolerance=1) == 1  # one reference event matches once
    scores = EventScores(original_events=3, converted_events=4, matched=3)
    assert scores.precision == pytest.approx(0.75) and scores.recall == 1.0
    assert scores.f1 == pytest.approx(2 * 0.75 / 1.75)
    assert EventScores().f1 == 1.0  # no events on either side: nothing missed, nothing invented


def test_a_model_compared_with_itself_agrees_on_every_output() -> None:
    from stjfd_convert.compare import compare_on_clips

    teacher = TwoHead().eval()
    batches = [make_input(CLIP, seed=s) for s in range(3)]
    result = compare_on_clips(teacher, copy.deepcopy(teacher), batches, threshold=0.5)
    assert result.clips == 3 * CLIP[0] and [o.name for o in result.outputs] == ["output[0]", "output[1]['aux']"]
    logits, events = result.outputs
    assert logits.rel_error == 0.0 and logits.cosine == pytest.approx(1.0) and logits.top1_agreement == 1.0
    assert events.events is not None and events.events.f1 == 1.0


def test_cli_compare_runs_before_and_after_distillation(small_sample: dict[str, Path], tmp_path: Path) -> None:
    """The no-labels loop from the command line: convert (fixture) → compare → distil → compare.
    (Whether distillation helps is checked on the library side, where the gap can be measured in
    probabilities: logits' relative error is not shift-invariant, KL is.)"""
    import json

    from cli_helpers import assert_one_error_line, run_cli
    from stjfd_convert.sample import sample_model_files

    original = sample_model_files().weights
    before = run_cli(["compare", original, small_sample["small"], small_sample["clips"], "--json"])
    assert before.exit_code == 0, before.output
    run = tmp_path / "kd"
    trained = run_cli(_distill_args(small_sample, run, "--cycles", 3))
    assert trained.exit_code == 0, trained.output
    after = run_cli(["compare", original, run / "last", small_sample["clips"], "--json"])
    assert after.exit_code == 0, after.output
    (b,), (a,) = json.loads(before.stdout)["outputs"], json.loads(after.stdout)["outputs"]
    clips = json.loads(before.stdout)["clips"]
    assert clips == 9 and b["top1_agreement"] is not None and a["top1_agreement"] is not None
    assert b["rel_error"] != a["rel_error"]  # the distilled weights were compared, not the converted ones
    assert b["cosine"] is not None
    text = run_cli(["compare", original, run / "last", small_sample["clips"]])
    assert text.exit_code == 0 and "top-1 agreement" in text.stdout
    assert_one_error_line(run_cli(["compare", original, small_sample["small"], tmp_path / "none"]), "not a folder")
    assert_one_error_line(run_cli(["compare", original, small_sample["clips"], small_sample["clips"]]),
                          "not a converted-model folder")


def test_cli_compare_names_the_videos_it_could_not_read(small_sample: dict[str, Path], tmp_path: Path) -> None:
    """An unreadable video among the held-out clips is left out and named (JSON and text), not silently dropped."""
    import json
    import shutil

    from cli_helpers import run_cli
    from stjfd_convert.sample import sample_model_files

    held = tmp_path / "held"
    shutil.copytree(small_sample["clips"], held)
    (held / "broken.mp4").write_bytes(b"not a video")
    original = sample_model_files().weights
    outcome = run_cli(["compare", original, small_sample["small"], held, "--json"])
    assert outcome.exit_code == 0, outcome.output
    data = json.loads(outcome.stdout)
    assert data["clips"] == 9
    assert [Path(entry["path"]).name for entry in data["skipped"]] == ["broken.mp4"] and data["skipped"][0]["reason"]
    text = run_cli(["compare", original, small_sample["small"], held])
    assert text.exit_code == 0 and "skipped" in text.stdout and "broken.mp4" in text.stdout


# --------------------------------------------------------------------------------------------
# A model nobody here wrote: uint8 frames [B, T, H, W, 3] in, (logits, {"aux": per-frame sigmoid}) out
# --------------------------------------------------------------------------------------------

TOY_SOURCE = '''
import torch
from torch import nn


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv3d(6, 6, 3, padding=1), nn.ReLU())
        self.clip_head = nn.Linear(6, 3)
        self.frame_head = nn.Conv3d(6, 1, 1)

    def forward(self, frames):
        x = frames.permute(0, 4, 1, 2, 3).float() / 255  # uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W]
        features = self.body(x)
        events = torch.sigmoid(self.frame_head(features).mean(dim=(3, 4))).squeeze(1)
        return self.clip_head(features.mean(dim=(2, 3, 4))), {"aux": events}


def build():
    return Toy()
'''


def test_cli_uint8_channels_last_two_head_model_is_calibrated_distilled_and_compared(tmp_path: Path) -> None:
    import json
    import importlib.util

    from cli_helpers import run_cli

    (tmp_path / "toy.py").write_text(TOY_SOURCE)
    spec = importlib.util.spec_from_file_location("toy_for_distill", tmp_path / "toy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    torch.manual_seed(SEED)
    torch.save(module.build().state_dict(), tmp_path / "toy.pth")
    model = ["--model", f"{tmp_path / 'toy.py'}:build"]
    make_video_dataset(tmp_path / "clips", per_class=1, T=12, H=36, W=36, seed=SEED)
    outcome = run_cli(["convert", tmp_path / "toy.pth", *model, "--input-shape", "1,8,32,32,3", "--input-dtype",
                       "uint8", "--input-layout", "BTHWC", "--atoms", 2, "--temporal-atoms", 1,
                       "--calibrate", tmp_path / "clips", "-o", tmp_path / "conv", "--json"])
    assert outcome.exit_code == 0, outcome.output
    converted = json.loads(outcome.stdout)
    assert [o["name"] for o in converted["parity"]["outputs"]] == ["output[0]", "output[1]['aux']"]
    assert converted["calibration"]["layout"] == "BTHWC" and converted["calibration"]["dtype"] == "uint8"
    rows = [layer for layer in converted["layers"] if layer["decomposed"]]
    assert sum(r["output_error"] for r in rows) < sum(r["plain_output_error"] for r in rows)
    run = tmp_path / "kd"
    # Layout and dtype come from the converted folder's manifest.
    outcome = run_cli(["finetune", tmp_path / "conv", tmp_path / "clips", *model, "--unlabeled", "--distill", "source",
                       "--clip-len", 8, "--size", 32,
                       "--batch-size", 3, "--workers", 0, "--device", "cpu", "-o", run, "--json"])
    assert outcome.exit_code == 0, outcome.output
    stages = json.loads(outcome.stdout)["stages"]
    assert [s["input_shape"] for s in stages] == [[3, 8, 16, 16, 3], [3, 4, 32, 32, 3]]  # B,T,H,W,C per stage
    outcome = run_cli(["compare", tmp_path / "toy.pth", run / "last", tmp_path / "clips", *model, "--json"])
    assert outcome.exit_code == 0, outcome.output
    logits, events = json.loads(outcome.stdout)["outputs"]
    assert logits["top1_agreement"] is not None and events["events"] is not None
    assert 0.0 <= events["events"]["f1"] <= 1.0
