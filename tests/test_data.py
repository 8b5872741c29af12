"""Data pipeline: discovery, decoding, clip sampling, transforms, skips, loaders, stage inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from videos import (
    INDEX_PERIOD,
    encoder_for,
    frame_index_of,
    indexed_frames,
    make_frame_folder_dataset,
    make_video_dataset,
    write_corrupt_video,
    write_frame_folder,
    write_list_file,
    write_video,
)

from stjfd_convert.data import (
    ClipConfig,
    ClipDataset,
    DataError,
    VideoSource,
    build_datasets,
    downsample_clip,
    find_sources,
    make_loader,
    natural_key,
    normalization_for,
    split_sources,
    temporal_indices,
    unlabeled_dataset,
)
from stjfd_convert.errors import ConfigError
from stjfd_convert.models import TORCHVISION_VIDEO_ARCHS

# Mean absolute error (0..255) allowed between decoded and source frames of a lossy codec.
CODEC_MAE = 12.0
# Same for lossless storage (png frames, ffv1): only yuv444 rounding remains.
LOSSLESS_MAE = 1.0
# Normalised float output vs. the same frames computed from the uint8 output.
NORM_ATOL = 1e-5

CONTAINERS = (".mp4", ".avi", ".mkv", ".webm")
T_SRC, H_SRC, W_SRC = 40, 48, 64  # indexed source videos: 40 frames of 48×64


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/a/v.<ext> for each container and root/b/frames/frame_<i>.png, all indexed_frames(40, 48, 64)."""
    root = tmp_path_factory.mktemp("indexed")
    frames = indexed_frames(T_SRC, H_SRC, W_SRC)
    for ext in CONTAINERS:
        write_video(root / "a" / f"v{ext}", frames)
    write_frame_folder(root / "b" / "frames", frames)
    return root


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ of the 3-class moving-shape task in mp4, 3 + 1 videos per class."""
    root = tmp_path_factory.mktemp("shapes")
    make_video_dataset(root / "train", per_class=3, T=12, H=32, W=40, ext=".mp4", seed=1)
    make_video_dataset(root / "val", per_class=1, T=12, H=32, W=40, ext=".mp4", seed=2)
    return root


def _source(root: Path, name: str) -> VideoSource:
    path = root / "b" / "frames" if name == "frames" else root / "a" / f"v{name}"
    return VideoSource(path, 0, "frames" if name == "frames" else "video")


def _dataset(root: Path, name: str, **config) -> ClipDataset:
    options = dict(clip_len=8, size=(H_SRC, W_SRC), resize=H_SRC, layout="THWC", dtype="uint8")
    options.update(config)
    return ClipDataset([_source(root, name)], ["a"], ClipConfig(**options))


def _red_indices(clip_thwc: torch.Tensor) -> np.ndarray:
    return frame_index_of(clip_thwc[..., 0].float().mean(dim=(1, 2)).numpy())


# ---- layouts of the dataset root -------------------------------------------------------------


@pytest.mark.parametrize("ext", CONTAINERS)
def test_video_folders_yield_clips_with_labels(tmp_path: Path, ext: str) -> None:
    make_video_dataset(tmp_path / "train", per_class=2, T=10, H=32, W=40, ext=ext)
    make_video_dataset(tmp_path / "val", per_class=1, T=10, H=32, W=40, ext=ext)
    train, val, classes = build_datasets(tmp_path, clip_len=4, size=24, arch="r3d_18")
    assert classes == sorted(["left_right", "top_bottom", "blink"])
    assert (len(train), len(val)) == (6, 3)
    assert train.skipped == [] and val.skipped == []
    for ds in (train, val):
        for i in range(len(ds)):
            clip, label = ds[i]
            assert clip.shape == (3, 4, 24, 24) and clip.dtype == torch.float32
            assert classes[label] == ds.sources[i].path.parent.name


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_frame_folders_yield_clips_with_labels(tmp_path: Path, ext: str) -> None:
    made = make_frame_folder_dataset(tmp_path, classes=("left_right", "blink"), per_class=2, T=6, H=24, W=32, ext=ext)
    train, val, classes = build_datasets(tmp_path, clip_len=8, size=16, val_split=0.5)
    assert classes == ["blink", "left_right"]
    assert len(train) + len(val) == 4 and all(s.kind == "frames" for s in train.sources)
    assert {s.path for s in train.sources + val.sources} == {p for paths in made.values() for p in paths}
    clip, label = train[0]
    assert clip.shape == (3, 8, 16, 16) and classes[label] == train.sources[0].path.parent.name


@pytest.mark.parametrize("list_name, header, labels_as", [("train.csv", True, "names"), ("train.tsv", False, "ints")])
def test_list_files(tmp_path: Path, list_name: str, header: bool, labels_as: str) -> None:
    videos = make_video_dataset(tmp_path / "media", classes=("left_right", "top_bottom"), per_class=2, T=8, H=24, W=24)
    frames = make_frame_folder_dataset(tmp_path / "frames", classes=("left_right",), per_class=1, T=8, H=24, W=24)
    names = ["left_right", "top_bottom"]
    entries = [(p, name if labels_as == "names" else names.index(name)) for name, ps in videos.items() for p in ps]
    entries.append((frames["left_right"][0], "left_right" if labels_as == "names" else 0))
    write_list_file(tmp_path / list_name, entries, header=header)
    val_name = list_name.replace("train", "val")
    write_list_file(tmp_path / val_name, entries[:2], header=header)
    train, val, classes = build_datasets(tmp_path, clip_len=4, size=16)
    assert classes == (names if labels_as == "names" else ["0", "1"])
    assert (len(train), len(val)) == (5, 2)
    assert [s.label for s in train.sources] == [0, 0, 1, 1, 0]
    assert train.sources[-1].kind == "frames"
    clip, label = val[1]
    assert clip.shape == (3, 4, 16, 16) and label == 0


def test_list_file_errors(tmp_path: Path) -> None:
    videos = make_video_dataset(tmp_path, classes=("left_right",), per_class=2, T=8, H=24, W=24)
    write_list_file(tmp_path / "train.csv", [(videos["left_right"][0], "left_right")])
    write_list_file(tmp_path / "val.csv", [(videos["left_right"][1], "no_such_class")])
    with pytest.raises(DataError, match="no_such_class"):
        build_datasets(tmp_path, clip_len=4, size=16)
    (tmp_path / "bad.csv").write_text("only_a_path.mp4\n")
    with pytest.raises(DataError, match=r"bad\.csv:1"):
        find_sources(tmp_path / "bad.csv")
    write_list_file(tmp_path / "missing.csv", [("nowhere.mp4", "x"), (videos["left_right"][0], "y")])
    sources, classes, skipped = find_sources(tmp_path / "missing.csv")
    assert classes == ["x", "y"] and len(sources) == 1 and skipped == [(tmp_path / "nowhere.mp4", "file not found")]


def test_natural_sort() -> None:
    names = ["frame_10.png", "frame_2.png", "frame_1.png", "Frame_3.png"]
    assert sorted(names, key=natural_key) == ["frame_1.png", "frame_2.png", "Frame_3.png", "frame_10.png"]


# ---- decoding and clip sampling -------------------------------------------------------------


@pytest.mark.parametrize("name", CONTAINERS + ("frames",))
def test_decoded_frames_match_source_and_center_clip(indexed: Path, name: str) -> None:
    ds = _dataset(indexed, name, frame_stride=3)
    clip, _ = ds[0]
    # 40 frames, span (8 − 1)·3 + 1 = 22 → centre start 9: frames 9, 12, …, 30.
    expected = np.arange(9, 31, 3)
    assert temporal_indices(T_SRC, ds.config).tolist() == [expected.tolist()]
    source = indexed_frames(T_SRC, H_SRC, W_SRC)[expected]
    lossless = name == "frames" or encoder_for(name)[0] == "ffv1"
    assert np.abs(clip.numpy().astype(np.float64) - source).mean() < (LOSSLESS_MAE if lossless else CODEC_MAE)
    np.testing.assert_array_equal(_red_indices(clip), expected % INDEX_PERIOD)
    assert torch.equal(ds[0][0], clip)  # val is deterministic


@pytest.mark.parametrize("name", [".mp4", ".webm", "frames"])
def test_short_video_loops(tmp_path: Path, name: str) -> None:
    frames = indexed_frames(5, 32, 32)
    if name == "frames":
        source = VideoSource(write_frame_folder(tmp_path / "f", frames), 0, "frames")
    else:
        source = VideoSource(write_video(tmp_path / f"v{name}", frames), 0, "video")
    config = ClipConfig(clip_len=8, size=32, resize=32, frame_stride=2, layout="THWC", dtype="uint8")
    ds = ClipDataset([source], ["a"], config)
    np.testing.assert_array_equal(_red_indices(ds[0][0]), [0, 2, 4, 1, 3, 0, 2, 4])


def _write_video_with_title(path: Path, frames: np.ndarray, title: str) -> Path:
    """Like ``write_video``, with ``title`` as container and stream metadata."""
    import av

    codec, options = encoder_for(path.suffix)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = dict(options)
        stream.metadata["title"] = container.metadata["title"] = title
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_video_with_non_utf8_metadata_is_read(tmp_path: Path, ext: str) -> None:
    """PyAV ≤ 18 raises UnicodeDecodeError at open on a cp1251 title unless told to ignore it; PyAV 19
    removed that option (and never raises). Either way the video is kept and decodes."""
    frames = indexed_frames(8, 32, 32)
    path = _write_video_with_title(tmp_path / f"v{ext}", frames, "STJFD-TITLE")
    data = path.read_bytes()
    assert data.count(b"STJFD-TITLE") == 2
    path.write_bytes(data.replace(b"STJFD-TITLE", "Привет-мир!".encode("cp1251")))  # same length, not UTF-8
    config = ClipConfig(clip_len=8, size=32, resize=32, layout="THWC", dtype="uint8")
    ds = ClipDataset([VideoSource(path, 0)], ["a"], config, probe="decode")
    assert ds.skipped == [] and ds.sources[0].num_frames == 8
    np.testing.assert_array_equal(_red_indices(ds[0][0]), np.arange(8))


def test_seek_selects_late_frames(indexed: Path) -> None:
    """A clip near the end of a long-GOP video still gets exactly the frames asked for."""
    ds = _dataset(indexed, ".mp4", clip_len=4, frame_stride=1, clips_per_video=3)
    clips, _ = ds[0]
    assert clips.shape == (3, 4, H_SRC, W_SRC, 3)
    # Starts spread over 0 … 40 − 4 = 36.
    for clip, start in zip(clips, (0, 18, 36)):
        np.testing.assert_array_equal(_red_indices(clip), (np.arange(start, start + 4)) % INDEX_PERIOD)


def test_center_crop_location(indexed: Path) -> None:
    ds = _dataset(indexed, "frames", size=32, resize=H_SRC, clip_len=2)  # no resize: 48×64 → crop 32×32
    clip, _ = ds[0]
    source = indexed_frames(T_SRC, H_SRC, W_SRC)[19:21, 8:40, 16:48]
    np.testing.assert_array_equal(clip.numpy(), source)


def test_train_sampling_is_random_but_seeded(indexed: Path) -> None:
    config = ClipConfig(clip_len=4, size=32, resize=H_SRC, frame_stride=2, train=True, layout="THWC", dtype="uint8")
    sources = [_source(indexed, "frames")] * 8

    def draws(seed: int, epoch: int) -> list[torch.Tensor]:
        ds = ClipDataset(sources, ["a"], config, seed=seed)
        ds.set_epoch(epoch)
        return [ds[i][0] for i in range(len(ds))]

    first = draws(seed=0, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(first, draws(seed=0, epoch=0)))
    assert not all(torch.equal(a, b) for a, b in zip(first, draws(seed=0, epoch=1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, draws(seed=1, epoch=0)))
    flips = set()
    for clip in first:
        idx = _red_indices(clip)
        np.testing.assert_array_equal(np.diff(idx) % INDEX_PERIOD, 2)  # consecutive stride-2 frames
        green = clip[0, 0, :, 1].int()
        flips.add(bool(green[0] > green[-1]))
        steps = torch.diff(green)
        assert bool((steps >= 0).all()) or bool((steps <= 0).all())  # a window of the gradient, maybe mirrored
    assert flips == {True, False}


def test_normalization_uses_arch_stats(indexed: Path) -> None:
    mean, std = normalization_for("mvit_v2_s")
    assert (mean, std) == (TORCHVISION_VIDEO_ARCHS["mvit_v2_s"].mean, TORCHVISION_VIDEO_ARCHS["mvit_v2_s"].std)
    raw, _ = _dataset(indexed, ".mkv", layout="CTHW")[0]
    normed, _ = _dataset(indexed, ".mkv", layout="CTHW", dtype="float32", mean=mean, std=std)[0]
    expected = (raw.float() / 255 - torch.tensor(mean).view(3, 1, 1, 1)) / torch.tensor(std).view(3, 1, 1, 1)
    torch.testing.assert_close(normed, expected, atol=NORM_ATOL, rtol=0)
    unscaled, _ = _dataset(indexed, ".mkv", layout="CTHW", dtype="float32")[0]
    torch.testing.assert_close(unscaled, raw.float() / 255, atol=NORM_ATOL, rtol=0)
    with pytest.raises(ConfigError, match="no_such_arch"):
        normalization_for("no_such_arch")


def test_output_layouts_are_permutations(indexed: Path) -> None:
    thwc, _ = _dataset(indexed, ".mp4", layout="THWC", dtype="float32")[0]
    cthw, _ = _dataset(indexed, ".mp4", layout="CTHW", dtype="float32")[0]
    tchw, _ = _dataset(indexed, ".mp4", layout="TCHW", dtype="float32")[0]
    assert thwc.shape == (8, H_SRC, W_SRC, 3) and cthw.shape == (3, 8, H_SRC, W_SRC)
    assert tchw.shape == (8, 3, H_SRC, W_SRC)
    assert torch.equal(thwc.permute(3, 0, 1, 2), cthw) and torch.equal(thwc.permute(0, 3, 1, 2), tchw)
    raw, _ = _dataset(indexed, ".mp4")[0]
    assert raw.dtype == torch.uint8 and raw.shape == (8, H_SRC, W_SRC, 3)
    torch.testing.assert_close(thwc, raw.float() / 255, atol=NORM_ATOL, rtol=0)


def test_resize_short_side_then_crop(indexed: Path) -> None:
    ds = _dataset(indexed, ".mp4", size=16, resize=None, clip_len=2)  # short side → round(16·128/112) = 18
    clip, _ = ds[0]
    assert clip.shape == (2, 16, 16, 3)
    full = _dataset(indexed, ".mp4", size=(18, 24), resize=18, clip_len=2)[0][0]
    assert torch.equal(clip, full[:, 1:17, 4:20])  # 18×24 centre-cropped to 16×16
    # Antialiased bilinear resize of the source frames, the same for videos and frame folders.
    source = torch.from_numpy(indexed_frames(T_SRC, H_SRC, W_SRC)[19:21]).permute(0, 3, 1, 2).float()
    reference = torch.nn.functional.interpolate(source, size=(18, 24), mode="bilinear", antialias=True)
    reference = reference.permute(0, 2, 3, 1)
    from_frames = _dataset(indexed, "frames", size=(18, 24), resize=18, clip_len=2)[0][0]
    assert (from_frames.float() - reference).abs().max() <= 1.0  # uint8 rounding only
    assert (full.float() - reference).abs().mean() < CODEC_MAE


# ---- corrupt files and errors ---------------------------------------------------------------


def test_corrupt_videos_skipped_at_index_time(tmp_path: Path) -> None:
    make_video_dataset(tmp_path, classes=("left_right", "blink"), per_class=2, T=8, H=24, W=24)
    truncated = write_corrupt_video(tmp_path / "blink" / "truncated.mp4", "truncated")
    garbage = write_corrupt_video(tmp_path / "left_right" / "garbage.avi", "random")
    train, _, classes = build_datasets(tmp_path, clip_len=4, size=16)
    assert len(train) == 4
    assert sorted(p for p, _ in train.skipped) == sorted([truncated, garbage])
    assert all(reason for _, reason in train.skipped)
    assert all(train[i][0].shape == (3, 4, 16, 16) for i in range(len(train)))


def test_corrupt_video_found_while_loading_is_replaced(tmp_path: Path) -> None:
    made = make_video_dataset(tmp_path, classes=("left_right",), per_class=3, T=8, H=24, W=24)
    bad = write_corrupt_video(tmp_path / "left_right" / "video_1a.mp4", "random")  # sorts between video_1 and video_2
    _, val, _ = build_datasets(tmp_path, clip_len=4, size=16, val_split=0.5, probe="none")
    train, _, _ = build_datasets(tmp_path, clip_len=4, size=16, probe="none")
    assert [s.path for s in train.sources] == [made["left_right"][0], made["left_right"][1], bad, made["left_right"][2]]
    val_like = ClipDataset(train.sources, ["left_right"], val.config, probe="none")
    clip, label = val_like[2]  # the corrupt one: replaced by the next sample, deterministically
    assert label == 0 and torch.equal(clip, val_like[3][0])
    assert [p for p, _ in val_like.skipped] == [bad]
    # In DataLoader workers: no crash, and the skip is collected from the worker processes.
    fresh = ClipDataset(train.sources, ["left_right"], train.config, probe="none")
    loader = make_loader(fresh, batch_size=2, shuffle=True, workers=2, seed=0)
    batches = [clips.shape for clips, _ in loader]
    assert batches == [(2, 3, 4, 16, 16)] * 2
    assert [p for p, _ in fresh.skipped] == [bad]


def test_empty_or_unreadable_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    with pytest.raises(DataError) as empty:
        build_datasets(tmp_path / "empty", clip_len=4, size=16)
    assert "no videos" in str(empty.value) and empty.value.hint and "\n" not in str(empty.value)
    write_corrupt_video(tmp_path / "broken" / "c" / "a.mp4", "truncated")
    write_corrupt_video(tmp_path / "broken" / "c" / "b.webm", "random")
    with pytest.raises(DataError) as broken:
        build_datasets(tmp_path / "broken", clip_len=4, size=16)
    assert "none of its 2 videos or frame folders can be read" in str(broken.value) and "\n" not in str(broken.value)
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(tmp_path / "nowhere", clip_len=4, size=16)


def test_option_errors(shapes_root: Path) -> None:
    with pytest.raises(ConfigError, match="layout"):
        ClipConfig(clip_len=4, size=16, layout="HWC")
    with pytest.raises(ConfigError, match="clip_len"):
        ClipConfig(clip_len=0, size=16)
    with pytest.raises(ConfigError, match="mean and std"):
        ClipConfig(clip_len=4, size=16, mean=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="val_split"):
        build_datasets(shapes_root, clip_len=4, size=16, val_split=0.2)  # val/ exists already


# ---- splits, unlabeled data ------------------------------------------------------------------


def test_val_split_is_stratified_and_deterministic() -> None:
    sources = [VideoSource(Path(f"c{c}/v{i}.mp4"), c, "video") for c in range(3) for i in range(5 + c)]
    train, val = split_sources(sources, 0.4, seed=0)
    assert [sum(s.label == c for s in val) for c in range(3)] == [2, 2, 3]  # round(5·.4), round(6·.4), round(7·.4)
    assert sorted(map(str, (s.path for s in train + val))) == sorted(str(s.path) for s in sources)
    assert split_sources(sources, 0.4, seed=0) == (train, val)
    assert split_sources(sources, 0.4, seed=1)[1] != val
    with pytest.raises(ConfigError, match="val_split"):
        split_sources(sources, 1.0)


def test_unlabeled_folder(tmp_path: Path) -> None:
    write_video(tmp_path / "a.mp4", indexed_frames(6, 24, 24))
    write_video(tmp_path / "deep" / "er" / "b.mkv", indexed_frames(6, 24, 24))
    write_frame_folder(tmp_path / "deep" / "frames", indexed_frames(6, 24, 24))
    (tmp_path / "notes.txt").write_text("not a video")
    ds = unlabeled_dataset(tmp_path, clip_len=4, size=16, arch="r3d_18")
    assert len(ds) == 3 and ds.classes == []
    for i in range(len(ds)):
        clip, label = ds[i]
        assert label == -1 and clip.shape == (3, 4, 16, 16)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="no videos"):
        unlabeled_dataset(tmp_path / "nothing", clip_len=4, size=16)


# ---- loaders ---------------------------------------------------------------------------------


def test_val_loader_workers_match_single_process(shapes_root: Path) -> None:
    train, val, _ = build_datasets(shapes_root, clip_len=4, size=24, frame_stride=2, arch="r3d_18")
    single = [(c.clone(), y.clone()) for c, y in make_loader(val, 2, shuffle=False, workers=0, seed=0)]
    multi = [(c.clone(), y.clone()) for c, y in make_loader(val, 2, shuffle=False, workers=2, seed=0)]
    assert len(single) == 2 and [c.shape[0] for c, _ in single] == [2, 1]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(single, multi))


def test_workers_forked_after_decoding_in_the_main_process(shapes_root: Path) -> None:
    """PyAV 19 keeps one swscale context per thread; a worker forked from a thread that had converted
    frames inherited it without its threads and hung. Run in a subprocess so a hang fails, not stalls."""
    script = (
        "from stjfd_convert.data import build_datasets, make_loader\n"
        f"_, val, _ = build_datasets({str(shapes_root)!r}, clip_len=4, size=24)\n"
        "val[0]\n"
        "print([tuple(c.shape) for c, _ in make_loader(val, 2, shuffle=False, workers=2)])\n"
    )
    # A session of its own, so that a timeout can kill the hung workers too.
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("DataLoader workers hung after the main process had decoded frames")
    assert process.returncode == 0, stderr
    assert stdout.strip() == "[(2, 3, 4, 24, 24), (1, 3, 4, 24, 24)]"


class _SignalsItsLoader(torch.utils.data.Dataset):
    """Each item sends ``sig`` to the process that loads it (a DataLoader worker)."""

    def __init__(self, sig: int) -> None:
        self.sig = sig

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        os.kill(os.getpid(), self.sig)
        return torch.tensor(index)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_workers_ignore_the_signals_the_main_process_handles(sig: int) -> None:
    """Ctrl-C and `timeout`/`docker stop` signal the whole process group; the workers must survive them."""
    loader = make_loader(_SignalsItsLoader(sig), batch_size=1, shuffle=False, workers=1)
    assert [int(batch) for batch in loader] == [0, 1]


def test_train_loader_replays_epochs_with_any_worker_count(shapes_root: Path) -> None:
    train, _, _ = build_datasets(shapes_root, clip_len=4, size=24, arch="r3d_18", seed=3)

    def two_epochs(workers: int) -> list[list[torch.Tensor]]:
        loader = make_loader(train, 4, shuffle=True, workers=workers, seed=3)
        return [[torch.cat([c.flatten(), y.float()]) for c, y in loader] for _ in range(2)]

    single, multi = two_epochs(0), two_epochs(2)
    assert len(single[0]) == 2  # 9 clips, drop_last
    for a, b in zip(single, multi):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(single[0][0], single[1][0])  # epochs differ
    loader = make_loader(train, 4, shuffle=True, workers=0, seed=3)
    loader.set_epoch(1)  # resume at epoch 1
    assert all(torch.equal(x, torch.cat([c.flatten(), y.float()])) for x, (c, y) in zip(single[1], loader))


def test_loader_takes_a_distributed_sampler(shapes_root: Path) -> None:
    train, _, _ = build_datasets(shapes_root, clip_len=4, size=24)
    sampler = torch.utils.data.distributed.DistributedSampler(train, num_replicas=2, rank=1, shuffle=True, seed=0)
    loader = make_loader(train, 2, shuffle=True, workers=0, sampler=sampler)
    list(loader)
    list(loader)
    assert sampler.epoch == 1 and loader.epoch == 1
    assert sum(y.numel() for _, y in loader) == 4  # 9 samples → 5 on rank 1, drop_last


# ---- stage inputs ----------------------------------------------------------------------------


def test_downsample_clip() -> None:
    clips = torch.arange(2 * 3 * 8 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 8, 12)
    temporal_stage = downsample_clip(clips, spatial=2)
    assert temporal_stage.shape == (2, 3, 8, 4, 6)
    expected = clips.reshape(2, 3, 8, 4, 2, 6, 2).mean(dim=(4, 6))
    torch.testing.assert_close(temporal_stage, expected, atol=NORM_ATOL, rtol=0)
    spatial_stage = downsample_clip(clips, temporal=3)
    assert spatial_stage.shape == (2, 3, 3, 8, 12) and torch.equal(spatial_stage, clips[:, :, [0, 3, 6]])
    assert downsample_clip(clips, spatial=2, mode="bilinear").shape == (2, 3, 8, 4, 6)
    assert torch.equal(downsample_clip(clips[0], temporal=2), clips[0, :, ::2])
    thwc = clips.permute(0, 2, 3, 4, 1)
    assert torch.equal(downsample_clip(thwc, spatial=2, layout="THWC"), temporal_stage.permute(0, 2, 3, 4, 1))
    raw = (clips % 256).to(torch.uint8)
    small = downsample_clip(raw, spatial=2)
    assert small.dtype == torch.uint8 and small.shape == (2, 3, 8, 4, 6)
    with pytest.raises(ConfigError):
        downsample_clip(clips, spatial=0)


def test_all_samples_failing_while_loading_is_a_clear_error(tmp_path: Path) -> None:
    sources = [VideoSource(write_corrupt_video(tmp_path / f"{i}.mp4", "random", seed=i), 0) for i in range(3)]
    ds = ClipDataset(sources, ["a"], ClipConfig(clip_len=4, size=16), probe="none")
    with pytest.raises(DataError, match="3 samples in a row") as error:
        ds[1]
    assert "\n" not in str(error.value) and error.value.hint
    assert sorted(p for p, _ in ds.skipped) == sorted(s.path for s in sources)
