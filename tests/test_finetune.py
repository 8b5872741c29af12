"""Fine-tuning (the stjfd_convert/finetune/ package, `stjfd finetune`, `stjfd evaluate`) on tiny PyAV videos.

A 2-conv net (converted: temporal atoms 2, spatial atoms 4) learns the moving-shape toy task
(tests/videos.py: left→right, top→bottom, blink; 3 classes × 6 training videos, 8 frames, 32×32).
Every run is seeded and CPU-only; comparisons use the named tolerances below.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import assert_no_output, assert_one_error_line, run_cli
from videos import make_video_dataset, write_corrupt_video

from stjfd_convert.config import ConvertConfig
from stjfd_convert.convert import convert_model
from stjfd_convert.data import build_datasets
from stjfd_convert.finetune import (
    BatchEnd,
    FinetuneConfig,
    LossContext,
    NonFiniteLossError,
    ShardedShuffleSampler,
    StageEnd,
    StageStarted,
    TrainingInterrupted,
    finetune,
    load_training_state,
    lr_at,
    read_metrics,
    recalibrate_batchnorm,
    resume,
)
from stjfd_convert.layers import DecomposedConv3d
from stjfd_convert.models import ArchSpec
from stjfd_convert.saved_model import load_converted, read_manifest, save_converted

# The toy task has 3 classes (chance = 1/3); "learns" means at least 2 of 3 validation videos right.
LEARNED_TOP1 = 2 / 3
# Outputs of a reloaded last/ vs the in-memory model: safetensors round-trips bits exactly.
RELOAD_ATOL = 0.0
# Evaluating the same weights with another batch size may reorder float sums.
EVAL_LOSS_ATOL = 1e-5
# finetune's first-step memory record vs stjfd_convert.memory.measure_training_step on the same shape
# (both count saved storages once + params + buffers + grads + optimizer state; the losses differ in labels only).
MEMORY_REL = 0.01

CLIP_LEN, SIZE = 8, 32
TINY_SOURCE = '''
from torch import nn


def build(num_classes=3, bn=True, width=8):
    layers = [nn.Conv3d(3, width, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm3d(width))
    layers += [nn.ReLU(), nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1)]
    if bn:
        layers.append(nn.BatchNorm3d(2 * width))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2 * width, num_classes)]
    return nn.Sequential(*layers)
'''
ATOMS = ConvertConfig(spatial_atoms=4, temporal_atoms=2)


def _build(bn: bool = True, seed: int = 0) -> nn.Module:
    namespace: dict = {}
    exec(TINY_SOURCE, namespace)
    torch.manual_seed(seed)
    return namespace["build"](bn=bn)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def spec(workdir: Path) -> ArchSpec:
    module = workdir / "tinynet.py"
    module.write_text(TINY_SOURCE)
    return ArchSpec("callable", f"{module}:build", {})


@pytest.fixture(scope="module")
def data_root(workdir: Path) -> Path:
    """train/: 3 classes × 6 videos + 2 corrupt files; val/: 3 × 3 videos + 1 corrupt file."""
    root = workdir / "data"
    make_video_dataset(root / "train", per_class=6, T=CLIP_LEN, H=SIZE, W=SIZE, seed=1)
    make_video_dataset(root / "val", per_class=3, T=CLIP_LEN, H=SIZE, W=SIZE, seed=2)
    write_corrupt_video(root / "train" / "blink" / "broken.mp4", kind="truncated", T=CLIP_LEN, H=SIZE, W=SIZE)
    write_corrupt_video(root / "train" / "left_right" / "noise.mp4", kind="random")
    write_corrupt_video(root / "val" / "top_bottom" / "noise.avi", kind="random", seed=3)
    return root


@pytest.fixture(scope="module")
def datasets(data_root: Path):
    return build_datasets(data_root, clip_len=CLIP_LEN, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def converted_dir(workdir: Path, spec: ArchSpec) -> Path:
    model, _ = convert_model(_build(), ATOMS)
    return save_converted(model, workdir / "tiny-stjfd", spec)


def _config(**overrides) -> FinetuneConfig:
    base = dict(
        cycles=1, epochs_per_stage=1, batch_size=6, workers=0, optimizer="adamw", lr=1e-2, weight_decay=0.0,
        bn_recal_batches=1, log_every=1, plot=False, seed=0,
    )
    return FinetuneConfig(**{**base, **overrides})


def _atoms(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{kind}": getattr(m, kind).detach().clone()
        for name, m in model.named_modules() if isinstance(m, DecomposedConv3d)
        for kind in ("temporal_atoms", "spatial_atoms")
    }


# --------------------------------------------------------------------------------------------
# One alternating run shared by several tests: learning, frozen atoms, files, memory, skips
# --------------------------------------------------------------------------------------------


class _StageSpy:
    """Snapshots every atom when a stage starts and ends; records requires_grad and trainable names."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stages: list[dict] = []

    def __call__(self, event) -> None:
        if isinstance(event, StageStarted):
            requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
            self.stages.append({
                "stage": event.plan.stage, "before": _atoms(self.model), "trainable": set(event.trainable),
                "frozen": set(event.frozen), "requires_grad": requires_grad,
            })
        elif isinstance(event, StageEnd):
            self.stages[-1]["after"] = _atoms(self.model)
            self.stages[-1]["summary"] = event.summary


@pytest.fixture(scope="module")
def learned_run(workdir: Path, datasets, spec: ArchSpec):
    train, val, classes = datasets
    model, _ = convert_model(_build(), ATOMS)
    spy = _StageSpy(model)
    run_dir = workdir / "run-learn"
    result = finetune(model, train, val, _config(cycles=3, plot=True), run_dir=run_dir, spec=spec, callbacks=[spy])
    return result, model, spy, run_dir


def test_alternating_schedule_learns(learned_run) -> None:
    result, _, _, _ = learned_run
    assert [s.stage for s in result.stages] == ["temporal", "spatial"] * 3
    assert result.final is not None and result.final.top1 >= LEARNED_TOP1, result.epochs
    assert result.best_top1 >= result.final.top1
    first_val_loss = result.epochs[0]["val_loss"]
    assert result.final.loss < first_val_loss


def test_frozen_atoms_bit_identical_and_not_trained(learned_run) -> None:
    _, model, spy, _ = learned_run
    layers = [n for n, m in model.named_modules() if isinstance(m, DecomposedConv3d)]
    assert len(spy.stages) == 6
    for record in spy.stages:
        frozen_kind = "spatial_atoms" if record["stage"] == "temporal" else "temporal_atoms"
        trained_kind = "temporal_atoms" if record["stage"] == "temporal" else "spatial_atoms"
        for layer in layers:
            frozen, trained = f"{layer}.{frozen_kind}", f"{layer}.{trained_kind}"
            assert torch.equal(record["before"][frozen], record["after"][frozen]), frozen
            assert not torch.equal(record["before"][trained], record["after"][trained]), trained
            assert record["requires_grad"][frozen] is False and record["requires_grad"][trained] is True
            assert frozen in record["frozen"] and frozen not in record["trainable"]
        # Coefficients, BN, classifier and biases train in both stages.
        assert {"0.coefficients", "1.weight", "8.weight", "0.bias"} <= record["trainable"]


def test_stage_memory_recorded(learned_run) -> None:
    result, _, _, _ = learned_run
    temporal, spatial = result.stages[0], result.stages[1]
    assert temporal.input_shape == [6, 3, CLIP_LEN, SIZE // 2, SIZE // 2]
    assert spatial.input_shape == [6, 3, CLIP_LEN // 2, SIZE, SIZE]
    for summary in (temporal, spatial):
        memory = summary.memory
        assert memory["grad_bytes"] > 0 and memory["optimizer_bytes"] > 0 and memory["saved_bytes"] > 0
        assert summary.peak_memory_bytes == (
            memory["saved_bytes"] + memory["param_bytes"] + memory["buffer_bytes"] + memory["grad_bytes"]
            + memory["optimizer_bytes"]
        )
    # Frozen atoms get neither gradients nor optimizer state.
    frozen_spatial = sum(m.spatial_atoms.numel() for m in result_model_layers(learned_run))
    assert temporal.frozen_params == frozen_spatial


def test_stage_memory_agrees_with_memory_module(learned_run) -> None:
    """finetune's in-loop record uses the accounting of stjfd_convert.memory (DESIGN.md §3)."""
    from stjfd_convert.memory import measure_training_step

    result, model, _, _ = learned_run
    for summary in result.stages[:2]:
        reference = measure_training_step(model, summary.input_shape, stage=summary.stage, optimizer="adamw", steps=0)
        assert summary.peak_memory_bytes == pytest.approx(reference.total_bytes, rel=MEMORY_REL), summary.stage


def result_model_layers(learned_run) -> list[DecomposedConv3d]:
    return [m for m in learned_run[1].modules() if isinstance(m, DecomposedConv3d)]


def test_run_folder_files(learned_run, datasets) -> None:
    result, model, _, run_dir = learned_run
    for name in ("config.json", "metrics.jsonl", "run.log", "training_curve.png", "last", "best"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["finetune"]["cycles"] == 3 and config["classes"] == datasets[2]
    records = read_metrics(run_dir)
    kinds = {r["type"] for r in records}
    assert {"step", "epoch", "stage", "skipped"} <= kinds
    assert len([r for r in records if r["type"] == "epoch"]) == 6
    # last/ is the final model, bit for bit.
    last = load_converted(run_dir / "last", trust_code=True)
    clip = torch.randn(2, 3, CLIP_LEN, SIZE, SIZE)
    with torch.no_grad():
        assert (last.model(clip) - model.eval()(clip)).abs().max().item() <= RELOAD_ATOL
    # best/ holds the best epoch; both are converted-model folders with the run's clip settings.
    best = read_manifest(run_dir / "best")
    assert best["finetune"]["epoch"] == result.best_epoch
    assert best["finetune"]["classes"] == datasets[2] and best["finetune"]["clip"]["clip_len"] == CLIP_LEN
    assert set(best["layers"]) == {"0", "3"}
    # The training state is readable without unpickling arbitrary objects.
    state = torch.load(run_dir / "last" / "training_state.pt", weights_only=True)
    assert state["position"] == {"stage": 6, "epoch": 6, "batch": 0, "step": result.steps}
    assert set(state["rng"]) >= {"torch", "numpy", "python"}


def test_corrupt_videos_skipped_and_reported(learned_run, data_root: Path) -> None:
    result, _, _, run_dir = learned_run
    skipped = {(split, Path(path).name) for split, path, _ in result.skipped}
    assert skipped == {("train", "broken.mp4"), ("train", "noise.mp4"), ("val", "noise.avi")}
    logged = {Path(r["path"]).name for r in read_metrics(run_dir) if r["type"] == "skipped"}
    assert logged == {"broken.mp4", "noise.mp4", "noise.avi"}
    assert "noise.avi" in (run_dir / "run.log").read_text()
    assert result.epochs[0]["train_loss"] is not None  # training went on without them


def test_joint_schedule_plain_model(workdir: Path, datasets, spec: ArchSpec, learned_run) -> None:
    """The baseline: a plain (unconverted) model, everything trained at full size; its folder loads."""
    train, val, _ = datasets
    model = _build()
    run_dir = workdir / "run-joint"
    result = finetune(model, train, val, _config(schedule="joint"), run_dir=run_dir, spec=spec)
    assert [s.stage for s in result.stages] == ["joint"]
    assert result.stages[0].frozen_params == 0 and len(result.epochs) == 2
    assert all(r["bn_recal_batches"] == 0 for r in result.epochs)  # full-size training needs no re-estimation
    loaded = load_converted(run_dir / "best", trust_code=True)
    assert read_manifest(run_dir / "best")["layers"] == {}
    assert not any(isinstance(m, DecomposedConv3d) for m in loaded.model.modules())
    # Same batch at full size: the stages of the alternating schedule need less memory.
    joint_peak = result.stages[0].peak_memory_bytes
    alternating = learned_run[0].stages
    assert alternating[0].peak_memory_bytes < joint_peak and alternating[1].peak_memory_bytes < joint_peak


# --------------------------------------------------------------------------------------------
# Resume after a kill
# --------------------------------------------------------------------------------------------


class _KillAt:
    """Raises KeyboardInterrupt from the callback after micro-batch ``batch`` of epoch ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def __call__(self, event) -> None:
        if isinstance(event, BatchEnd) and (event.epoch, event.batch) == (self.epoch, self.batch):
            raise KeyboardInterrupt


def _comparable(epochs: list[dict]) -> list[dict]:
    keys = ("epoch", "stage", "step", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5")
    return [{k: r[k] for k in keys} for r in epochs]


def test_resume_after_kill_matches_uninterrupted(workdir: Path, datasets, spec: ArchSpec) -> None:
    train, val, _ = datasets
    # 3 micro-batches per epoch in groups of 2 (the last group has 1): the kill lands inside a group.
    config = _config(epochs_per_stage=2, grad_accum=2, optimizer="sgd", lr=0.05, weight_decay=1e-3)
    reference, _ = convert_model(_build(), ATOMS)
    expected = finetune(reference, train, val, config, run_dir=workdir / "run-whole", spec=spec)

    model, _ = convert_model(_build(), ATOMS)
    run_dir = workdir / "run-killed"
    with pytest.raises(TrainingInterrupted) as info:
        finetune(model, train, val, config, run_dir=run_dir, spec=spec, callbacks=[_KillAt(epoch=1, batch=1)])
    # The step in progress (micro-batches 1–2) was finished, then last/ saved.
    assert info.value.checkpoint == run_dir / "last"
    assert info.value.position == {"stage": 0, "epoch": 1, "batch": 2, "step": 3}
    assert load_training_state(run_dir)["position"] == info.value.position
    assert [r["type"] for r in read_metrics(run_dir)][-1] == "interrupted"

    resumed = resume(run_dir, train, val, trust_code=True)
    assert _comparable(resumed.epochs) == _comparable(expected.epochs)
    assert resumed.final.to_dict() | {"seconds": 0} == expected.final.to_dict() | {"seconds": 0}
    whole = load_converted(workdir / "run-whole" / "last", trust_code=True).model.state_dict()
    again = load_converted(run_dir / "last", trust_code=True).model.state_dict()
    assert whole.keys() == again.keys()
    for key in whole:
        assert torch.equal(whole[key], again[key]), key
    assert resumed.best_epoch == expected.best_epoch
    assert [s.val_top1 for s in resumed.stages] == [s.val_top1 for s in expected.stages]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(workdir: Path, datasets, spec: ArchSpec) -> None:
    """The loss is pluggable (LossContext); a NaN in epoch 2 stops with a clear error, epoch 1's last/ stays."""
    train, val, _ = datasets

    def exploding(ctx: LossContext) -> torch.Tensor:
        loss = nn.functional.cross_entropy(ctx.outputs, ctx.labels)
        assert ctx.full_clips.shape[-1] == SIZE and ctx.model is model
        return loss * float("nan") if ctx.epoch == 1 else loss

    model, _ = convert_model(_build(), ATOMS)
    run_dir = workdir / "run-nan"
    with pytest.raises(NonFiniteLossError, match="non-finite") as info:
        finetune(model, train, val, _config(), run_dir=run_dir, spec=spec, loss_fn=exploding)
    assert "last good checkpoint" in info.value.one_line()
    assert load_training_state(run_dir)["position"]["epoch"] == 1
    assert read_metrics(run_dir)[-1]["type"] == "error"


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_bn_recalibration_changes_running_stats_only() -> None:
    model, _ = convert_model(_build(), ATOMS)
    model.train()
    model[4].momentum = 0.3
    flags = {name: m.training for name, m in model.named_modules()}
    model[1].training = False  # a mixed train/eval state must come back as it was
    flags["1"] = False
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    batches = [torch.randn(4, 3, CLIP_LEN, SIZE, SIZE) * 2 + 1 for _ in range(3)]
    assert recalibrate_batchnorm(model, batches) == 3
    for name, value in params.items():
        assert torch.equal(model.get_parameter(name), value), name
    for name, value in buffers.items():
        assert not torch.equal(model.get_buffer(name), value), name
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert model[4].momentum == 0.3 and model[1].momentum == 0.1
    assert int(model[1].num_batches_tracked) == 3
    # momentum=None makes the running mean the plain average of the batch means.
    expected = torch.stack([model[0](b).mean((0, 2, 3, 4)) for b in batches]).mean(0)
    assert torch.allclose(model[1].running_mean, expected.detach(), atol=1e-5)


def test_lr_schedule_warmup_cosine_step() -> None:
    config = FinetuneConfig(lr=0.1, warmup_epochs=1, cycles=1, epochs_per_stage=2, min_lr=0.0)
    steps_per_epoch, total = 10, 40
    assert lr_at(0, total, steps_per_epoch, config) == pytest.approx(0.01)
    assert lr_at(9, total, steps_per_epoch, config) == pytest.approx(0.1)
    assert lr_at(10, total, steps_per_epoch, config) == pytest.approx(0.1)
    assert lr_at(39, total, steps_per_epoch, config) < 0.001
    step = FinetuneConfig(lr=0.1, lr_schedule="step", lr_step_epochs=1, lr_gamma=0.5)
    assert [lr_at(s, 30, 10, step) for s in (0, 10, 25)] == pytest.approx([0.1, 0.05, 0.025])


def test_sharded_sampler_reproduces_single_process_batches() -> None:
    single = ShardedShuffleSampler(23, 6, seed=3)
    shards = [ShardedShuffleSampler(23, 6, seed=3, world_size=2, rank=r) for r in (0, 1)]
    for sampler in (single, *shards):
        sampler.set_epoch(4)
    flat = list(single)
    assert len(flat) == 18 and len(set(flat)) == 18
    per_rank = [list(s) for s in shards]
    for batch in range(3):
        merged = per_rank[0][batch * 3 : batch * 3 + 3] + per_rank[1][batch * 3 : batch * 3 + 3]
        assert merged == flat[batch * 6 : batch * 6 + 6]
    single.skip_batches = 2
    assert list(single) == flat[12:] and len(single) == 6


def test_amp_checkpointing_accumulation_combined(datasets) -> None:
    """bf16 autocast on CPU + activation checkpointing + gradient accumulation, no run folder."""
    train, val, _ = datasets
    model, _ = convert_model(_build(), ATOMS)
    result = finetune(model, train, val, _config(amp=True, checkpoint_activations=True, grad_accum=3))
    assert result.run_dir is None and result.steps == 2  # 3 micro-batches per epoch = 1 step × 2 epochs
    assert all(r["train_loss"] is not None and r["val_loss"] is not None for r in result.epochs)
    assert "forward" not in model[0].__dict__  # checkpointing was switched off again


def test_config_validation() -> None:
    from stjfd_convert.errors import ConfigError

    for bad in (dict(cycles=0), dict(spatial_downsample=0), dict(lr=-1.0), dict(schedule="fancy"),
                dict(optimizer="lamb"), dict(label_smoothing=1.0), dict(amp_dtype="int8")):
        with pytest.raises(ConfigError):
            FinetuneConfig(**bad)
    with pytest.raises(ConfigError):
        FinetuneConfig.from_dict({"cycles": 1, "warp_drive": True})


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cli_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(model), str(data), "--clip-len", str(CLIP_LEN), "--size", str(SIZE), "--cycles", "1",
            "--epochs-per-stage", "1", "--batch-size", "6", "--workers", "0", "--optimizer", "adamw", "--lr", "0.01",
            "--bn-recal-batches", "1", "--no-plot", "--trust-code", "-o", str(out), *extra]


def test_cli_finetune_evaluate_resume(workdir: Path, converted_dir: Path, data_root: Path) -> None:
    out = workdir / "cli-run"
    outcome = run_cli(_cli_args(converted_dir, data_root, out, "--json"))
    assert outcome.exit_code == 0, outcome.output
    payload = json.loads(outcome.stdout)
    assert [s["stage"] for s in payload["stages"]] == ["temporal", "spatial"]
    assert all(s["peak_memory_bytes"] > 0 for s in payload["stages"])
    assert len(payload["skipped"]) == 3

    evaluated = run_cli(["evaluate", str(out / "best"), str(data_root / "val"), "--workers", "0", "--json",
                         "--trust-code"])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads(evaluated.stdout)
    best = payload["epochs"][payload["best_epoch"]]
    assert result["top1"] == best["val_top1"] and result["clips"] == 9
    assert result["loss"] == pytest.approx(best["val_loss"], abs=EVAL_LOSS_ATOL)
    assert sum(map(sum, result["confusion"])) == 9 and len(result["per_class"]) == 3
    assert [s["path"].endswith("noise.avi") for s in result["skipped"]] == [True]

    table = run_cli(["evaluate", str(out / "best"), str(data_root), "--workers", "0", "--trust-code"])
    assert table.exit_code == 0, table.output
    for fragment in ("per-class accuracy", "confusion matrix", "left_right", "top-1"):
        assert fragment in table.stdout

    again = run_cli(["finetune", str(out), "--resume", "--trust-code"])
    assert again.exit_code == 0, again.output
    assert "already finished" in again.stdout


def test_cli_errors_leave_no_run_folder(workdir: Path, converted_dir: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    cases = [
        (_cli_args(tmp_path / "missing-model", data_root, out), ("does not exist",)),
        (_cli_args(converted_dir, data_root, out, "--spatial-downsample", "0"), ("--spatial-downsample",)),
        (_cli_args(converted_dir, tmp_path / "no-data", out), ("does not exist",)),
        (_cli_args(converted_dir, empty, out), ()),
        (_cli_args(converted_dir, data_root, out, "--batch-size", "64"), ("fewer than one batch",)),
        (_cli_args(converted_dir, data_root, out, "--amp-dtype", "float16", "--amp", "--device", "cpu"), ("float16",)),
        (["finetune", str(converted_dir), str(data_root)], ("-o",)),
    ]
    for args, fragments in cases:
        assert_one_error_line(run_cli(args), *fragments)
        assert_no_output(out)
    exists = workdir / "exists"
    exists.mkdir(exist_ok=True)
    (exists / "keep.txt").write_text("x")
    assert_one_error_line(run_cli(_cli_args(converted_dir, data_root, exists)), "already exists")
    assert (exists / "keep.txt").exists()
    assert_one_error_line(run_cli(["finetune", str(exists), "--resume"]), "config.json")
    assert_one_error_line(run_cli(["finetune", str(workdir / "run-learn"), "--resume", "--lr", "0.1", "--trust-code"]),
                          "--lr")
    assert_one_error_line(run_cli(["evaluate", str(tmp_path), str(data_root / "val")]), "model.stjfd.json")


def _process_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("STJFD_DEBUG", "FORCE_COLOR")}
    env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb", OMP_NUM_THREADS="1")
    return env


def test_real_sigint_saves_and_exits_130(workdir: Path, converted_dir: Path, data_root: Path) -> None:
    """SIGINT to a real `stjfd finetune` process: it finishes the step, saves last/ and exits 130."""
    out = workdir / "sigint-run"
    args = _cli_args(converted_dir, data_root, out)
    args[args.index("--epochs-per-stage") + 1] = "100"  # far more than it will get to run
    proc = subprocess.Popen([sys.executable, "-m", "stjfd_convert", *args], env=_process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300  # a hang guard, not a performance limit
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and any(r["type"] == "step" for r in read_metrics(out)):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and line.startswith("error:")]
    assert len(lines) == 1 and "interrupted at" in lines[0] and "--resume" in lines[0], stderr
    state = load_training_state(out)
    assert state["position"]["step"] >= 1
    assert read_metrics(out)[-1]["type"] == "interrupted"
    assert load_converted(out / "last", trust_code=True).model is not None
