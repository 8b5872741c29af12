"""``stjfd predict``: the top classes of a video's centre clip with an exported ONNX model."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ConfigError, first_line
from .base import META_PREFIX
from .runtime import ort_session
from .source import _normalization


@dataclass
class Prediction:
    """Top-k classes of one clip of a video."""

    video: Path
    model: Path
    input_shape: tuple[int, ...]  # in the model's layout
    normalization: dict[str, list[float]] | None  # None: raw uint8 frames
    normalization_source: str
    top: list[dict[str, Any]]  # {"rank", "index", "label", "probability", "logit"}
    num_classes: int
    seconds: float = 0.0
    playback_speed: float = 1.0
    warnings: list[str] = field(default_factory=list)  # e.g. a video shorter than the clip (frames repeated)
    input_layout: str = "BCTHW"
    input_dtype: str = "float32"
    resize_mode: str = "crop"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["video"] = str(self.video)
        data["model"] = str(self.model)
        data["input_shape"] = list(self.input_shape)
        return data


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a comma-separated list of numbers", "e.g. 0.45,0.45,0.45") from None


def _read_labels(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read labels file {path}: {exc}", "pass a UTF-8 text file with one label per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def predict(
    model_path: str | os.PathLike[str],
    video: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    top_k: int = 5,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    threads: int | None = None,
    playback_speed: float = 1.0,
    pathway_strides: Sequence[int] | None = None,
    input_layout: str | None = None,
    input_dtype: str | None = None,
    size: int | tuple[int, int] | None = None,
    resize_mode: str | None = None,
    normalize: bool = True,
) -> Prediction:
    """Classify the centre clip of ``video`` with an exported ONNX model (onnxruntime, CPU).

    Clip length and frame size come from the graph's input (or, for dynamic axes, from the export
    shape stored in its metadata); decoding is ``data.ClipDataset``'s evaluation path (centre clip,
    short side resized to 128/112 of the crop, centre crop). Mean/std come from ``mean``/``std`` or
    else from the metadata written at export time. ``playback_speed`` resamples the clip's frames as
    if the video played that many times as fast (0.5: slowed 2×; ``data.ClipConfig``). A model with one
    input per pathway gets pathway i = every ``pathway_strides[i]``-th frame of one decoded clip (default:
    the strides its metadata records, e.g. SlowFast's 4,1).

    ``input_layout`` (``BTHWC``…) defaults to the metadata's ``stjfd.layout``, the dtype is the graph's input
    type (``uint8``: raw frames, no normalisation; ``input_dtype`` must agree). ``size`` (int or (H, W)) sets
    the frame size where the graph's height/width axes are dynamic; ``resize_mode="stretch"`` resizes whole
    frames to it without cropping (default: the metadata's, else crop); ``normalize=False`` feeds float frames
    scaled to 0..1 without mean/std.
    """
    start = time.perf_counter()
    model_path, video = Path(model_path), Path(video)
    if top_k < 1:
        raise ConfigError(f"--top-k must be ≥ 1, got {top_k}", "e.g. --top-k 5")
    from ..data import check_playback_speed, check_resize_mode
    from ..layouts import check_given_format, check_input_layout

    playback_speed = check_playback_speed(playback_speed)
    layout, dtype = check_given_format(input_layout, input_dtype)
    resize_mode = check_resize_mode(resize_mode) if resize_mode is not None else None
    if not normalize and (mean is not None or std is not None):
        raise ConfigError("--no-normalize and --mean/--std contradict each other", "drop one of them")
    if not model_path.is_file():
        what = "is a folder, not an .onnx file" if model_path.is_dir() else "does not exist"
        raise ConfigError(f"ONNX model {model_path} {what}", "pass the file written by `stjfd export --onnx`")
    if not video.is_file():
        what = "is a folder, not a video file" if video.is_dir() else "does not exist"
        raise ConfigError(f"video {video} {what}", "pass a video file (.mp4, .avi, .mkv, …)")
    label_names = _read_labels(Path(labels)) if labels is not None else None
    session = ort_session(model_path, threads, hint="pass the .onnx file written by `stjfd export --onnx`")
    meta = dict(session.get_modelmeta().custom_metadata_map or {})
    layout = layout or check_input_layout(meta.get(f"{META_PREFIX}layout") or "BCTHW", "stored layout")
    dtype = _graph_dtype(session, dtype, model_path)
    resize_mode = resize_mode or check_resize_mode(meta.get(f"{META_PREFIX}resize_mode") or "crop")
    sizes = (size, size) if isinstance(size, int) else size
    shapes = [_clip_shape(session, meta, model_path, i, layout, sizes) for i in range(len(session.get_inputs()))]
    strides = _pathway_strides(meta, pathway_strides, len(shapes), model_path)
    clip_len = max(one[2] * stride for one, stride in zip(shapes, strides))
    primary = max(shapes, key=lambda one: one[2] * one[3] * one[4])
    shape = [primary[0], primary[1], clip_len, primary[3], primary[4]]  # B, C, T, H, W
    if dtype == "uint8":
        norm, source = None, "none (raw uint8 frames)"
    elif not normalize:
        norm, source = {"mean": [0.0] * shape[1], "std": [1.0] * shape[1]}, "--no-normalize (frames scaled to 0..1)"
    else:
        norm, source = _clip_normalization(meta, mean, std, model_path, channels=shape[1])
    clip, num_frames, span = _centre_clip(video, shape, norm, playback_speed, layout, dtype, resize_mode)
    time_axis = layout.index("T")
    feeds = [_every(clip, time_axis, stride, one[2]) for one, stride in zip(shapes, strides)]
    logits = _logits(session, feeds)
    label_names = _class_names(meta, label_names, len(logits), labels)
    top = _top_classes(logits, top_k, label_names)
    warnings = []
    if num_frames is not None and num_frames < span:
        warnings.append(
            f"{video.name} has {num_frames} frame{'s' if num_frames != 1 else ''}, fewer than the {span} a clip of this "
            f"model spans: its frames were repeated (looped) to fill the clip, so the prediction says little about "
            "motion — use a longer video"
        )
    from ..layouts import from_bcthw

    return Prediction(
        video, model_path, tuple(from_bcthw(tuple(shape), layout)), norm, source,  # type: ignore[arg-type]
        top, len(logits),
        time.perf_counter() - start, float(playback_speed), warnings, layout, dtype, resize_mode,
    )


def _graph_dtype(session: Any, given: str | None, model_path: Path) -> str:
    """``uint8`` when the graph takes raw frames, else ``float32``; a contradicting ``--input-dtype`` is refused."""
    graph = "uint8" if session.get_inputs()[0].type == "tensor(uint8)" else "float32"
    if given is not None and given != graph:
        raise ConfigError(
            f"--input-dtype {given}, but {model_path.name} takes {graph} input",
            "drop --input-dtype (predict feeds what the graph takes), or export with the dtype you want",
        )
    return graph


def _every(clip: np.ndarray, axis: int, stride: int, length: int) -> np.ndarray:
    """Every ``stride``-th entry of ``clip`` along ``axis``, the first ``length`` of them (one pathway)."""
    index: list[Any] = [slice(None)] * clip.ndim
    index[axis] = slice(None, None, stride)
    picked = clip[tuple(index)]
    index[axis] = slice(None, length)
    return picked[tuple(index)]


def _clip_shape(
    session: Any, meta: Mapping[str, str], model_path: Path, index: int = 0, layout: str = "BCTHW",
    size: tuple[int, int] | None = None,
) -> list[int]:
    """The [batch, 3, time, height, width] of input ``index`` (read in the model's ``layout``): the graph's
    fixed axes, batch 1 for a dynamic batch, ``size`` for dynamic height/width, the export shape stored in the
    metadata for the other dynamic axes. A ``size`` that contradicts fixed axes is refused."""
    graph_input = session.get_inputs()[index]
    stored_text = meta.get(f"{META_PREFIX}input_shape", "")
    pathways = stored_text.split("+") if stored_text else []
    stored = _floats(pathways[index], "stored input shape") if index < len(pathways) else []
    dims = list(graph_input.shape)
    if len(dims) != 5:
        raise ConfigError(f"{model_path.name} takes a {len(dims)}-D input; predict needs a 5-D clip ({layout})",
                          "export a video model")
    wanted = {"H": size[0], "W": size[1]} if size is not None else {}
    by_letter: dict[str, int] = {}
    for axis, (letter, dim) in enumerate(zip(layout, dims)):
        if isinstance(dim, int) and dim > 0:
            if letter in wanted and wanted[letter] != dim:
                raise ConfigError(
                    f"--size {size[0]}x{size[1]}: {model_path.name} takes frames of exactly "  # type: ignore[index]
                    f"{dims[layout.index('H')]}x{dims[layout.index('W')]}",
                    "drop --size, or export with --dynamic height,width",
                )
            by_letter[letter] = dim
        elif letter == "B":
            by_letter[letter] = 1
        elif letter in wanted:
            by_letter[letter] = wanted[letter]
        elif stored:
            by_letter[letter] = int(stored[axis])
        else:
            raise ConfigError(f"{model_path.name} has a dynamic axis {axis} and no stored export shape", "re-export with stjfd")
    shape = [by_letter[letter] for letter in "BCTHW"]
    channels = shape[1]
    if channels != 3:
        raise ConfigError(
            f"{model_path.name} expects {channels} input channels, not RGB, in the layout {layout}",
            "export an RGB video model, or pass the --input-layout it takes (BCTHW, BTHWC, BTCHW)",
        )
    return shape


def _clip_normalization(
    meta: Mapping[str, str], mean: Sequence[float] | None, std: Sequence[float] | None, model_path: Path,
    channels: int | None = None,
) -> tuple[dict[str, list[float]], str]:
    """Mean/std and where they came from: ``--mean``/``--std``, else the ONNX metadata."""
    if mean is not None or std is not None:
        norm = _normalization(None, mean, std, channels=channels)
        assert norm is not None  # _normalization raises unless both are given
        return norm, "--mean/--std"
    if f"{META_PREFIX}mean" in meta and f"{META_PREFIX}std" in meta:
        norm = {"mean": _floats(meta[f"{META_PREFIX}mean"], "stored mean"), "std": _floats(meta[f"{META_PREFIX}std"], "stored std")}
        return norm, "ONNX metadata"
    raise ConfigError(
        f"{model_path.name} records no normalisation (mean/std)",
        "pass the --mean and --std the model was trained with: --mean 0,0,0 --std 1,1,1 for frames scaled to 0..1 "
        "without normalisation, --mean 0.43,0.39,0.38 --std 0.23,0.22,0.22 for torchvision's Kinetics models"
    )


def _centre_clip(
    video: Path, shape: Sequence[int], norm: Mapping[str, Sequence[float]] | None, playback_speed: float = 1.0,
    layout: str = "BCTHW", dtype: str = "float32", resize_mode: str = "crop",
) -> tuple[np.ndarray, int | None, int]:
    """The centre clip of ``video`` as evaluation decodes it, [batch, …] in the model's ``layout`` and
    ``dtype`` (the clip repeated; ``shape`` is [B, C, T, H, W]), with the video's frame count (None if
    unknown) and the frames one clip spans."""
    from ..data import ClipConfig, ClipDataset, VideoSource
    from ..layouts import CLIP_LAYOUTS

    batch, _, clip_len, height, width = shape
    config = ClipConfig(
        clip_len=clip_len, size=(height, width), mean=tuple(norm["mean"]) if norm else None,
        std=tuple(norm["std"]) if norm else None, playback_speed=playback_speed, layout=CLIP_LAYOUTS[layout],
        dtype=dtype, resize_mode=resize_mode,
    )
    dataset = ClipDataset([VideoSource(video, -1)], ["video"], config, probe="metadata", probe_workers=1, name=str(video))
    clip, _ = dataset[0]  # [3, T, H, W] or the layout's order; DataError if it cannot be decoded
    batched = clip.unsqueeze(0).expand(batch, -1, -1, -1, -1).contiguous().numpy()
    return batched, dataset.sources[0].num_frames, config.span


def _pathway_strides(
    meta: Mapping[str, str], given: Sequence[int] | None, inputs: int, model_path: Path
) -> tuple[int, ...]:
    """How each ONNX input is cut from the one decoded clip: ``given``, else the metadata's; (1,) for one input."""
    if inputs == 1:
        return (1,)
    text = meta.get(f"{META_PREFIX}pathway_strides")
    strides = tuple(int(s) for s in given) if given else (tuple(int(v) for v in text.split(",")) if text else None)
    if strides is None:
        raise ConfigError(
            f"{model_path.name} takes {inputs} inputs (one per pathway) and records no pathway strides",
            "pass --pathway-strides, e.g. 4,1 for SlowFast (slow pathway: every 4th frame)",
        )
    if len(strides) != inputs:
        raise ConfigError(
            f"--pathway-strides {','.join(map(str, strides))} gives {len(strides)} pathways; "
            f"{model_path.name} takes {inputs}",
            "give one stride per model input",
        )
    return strides


def _logits(session: Any, feeds: Sequence[np.ndarray]) -> np.ndarray:
    """The first output of the model for the first clip, float64 [classes]; ``feeds`` holds one array per input."""
    x = feeds[0]
    try:
        outputs = session.run(None, {i.name: np.ascontiguousarray(f) for i, f in zip(session.get_inputs(), feeds)})
    except Exception as exc:  # onnxruntime errors
        raise ConfigError(
            f"onnxruntime failed on the clip: {first_line(exc)[:300]}", "check that the model was exported by stjfd"
        ) from None
    return np.asarray(outputs[0], dtype=np.float64).reshape(x.shape[0], -1)[0]


def _class_names(
    meta: Mapping[str, str], label_names: list[str] | None, num_classes: int, labels: str | os.PathLike[str] | None
) -> list[str] | None:
    """``--labels``, else the class names a fine-tuned model recorded (when they match the classes)."""
    if label_names is None and f"{META_PREFIX}classes" in meta:
        try:
            stored_names = json.loads(meta[f"{META_PREFIX}classes"])
        except json.JSONDecodeError:
            stored_names = None
        if isinstance(stored_names, list) and len(stored_names) == num_classes:
            label_names = [str(name) for name in stored_names]
    if label_names is not None and len(label_names) != num_classes:
        raise ConfigError(
            f"{labels} has {len(label_names)} labels but the model has {num_classes} classes",
            f"give exactly {num_classes} labels, one per line, in class-index order",
        )
    return label_names


def _top_classes(logits: np.ndarray, top_k: int, label_names: list[str] | None) -> list[dict[str, Any]]:
    """The ``top_k`` classes by logit, with their softmax probabilities."""
    shifted = np.exp(logits - logits.max())
    probabilities = shifted / shifted.sum()
    order = np.argsort(-logits, kind="stable")[: min(top_k, len(logits))]
    return [
        {
            "rank": rank,
            "index": int(i),
            "label": label_names[int(i)] if label_names is not None else str(int(i)),
            "probability": float(probabilities[i]),
            "logit": float(logits[i]),
        }
        for rank, i in enumerate(order, start=1)
    ]
