"""Video clip datasets for fine-tuning and distillation: folders of videos (PyAV), frame folders, lists.

A *split* is one of

- a folder of class folders, each holding videos (``.mp4 .avi .mkv .webm .mov .m4v``) and/or frame
  folders (sub-folders of ``.jpg``/``.png`` frames, ordered by a natural sort: ``frame_2 < frame_10``);
- a list file (``.csv``, ``.tsv`` or ``.txt``) of ``path,label`` rows: header optional, paths relative to
  the list file, labels given as class names or as integer indices.

A dataset *root* holds ``train`` and ``val`` splits (folders or ``train.csv``/``val.csv``…), or is itself a
single split that :func:`build_datasets` divides with ``val_split`` (stratified by class, fixed by seed).
:func:`unlabeled_dataset` reads every video under a folder, recursively, with label ``-1``.

Each item is ``(clip, label)``. ``clip`` is ``float32 [C, T, H, W]`` normalised with the model's mean/std by
default; ``layout`` picks ``CTHW``/``TCHW``/``THWC`` and ``dtype="uint8"`` gives raw, unnormalised frames.
With ``clips_per_video = K > 1`` the clip gains a leading ``K`` axis (evaluate all K, average the logits).

Decoding seeks to the keyframe before the first needed frame and stops after the last one; only the
needed frames are converted to RGB (and resized by swscale on the way). Videos shorter than a clip are
looped. Unreadable files are dropped when the dataset is built (a cheap PyAV probe of container and stream
metadata) or, when a file only fails while decoding, replaced by the next readable sample (the same one
whichever DataLoader worker meets it) and recorded: :attr:`ClipDataset.skipped` gathers both, from all
worker processes.

Randomness (temporal offset, crop, flip) comes from a generator seeded by ``(seed, epoch, index)``, so a
sample does not depend on the number of workers or on which worker loads it. The loader returned by
:func:`make_loader` advances the epoch on each pass (``loader.set_epoch(e)`` to resume).
"""

from .build import build_datasets, unlabeled_dataset
from .dataset import ClipDataset
from .decode import temporal_indices
from .loader import ClipLoader, EpochShuffleSampler, make_loader
from .options import (
    LAYOUTS,
    RESIZE_MODES,
    ClipConfig,
    DataError,
    check_playback_speed,
    check_resize_mode,
    normalization_for,
)
from .sources import (
    IMAGE_EXTENSIONS,
    LIST_EXTENSIONS,
    UNLABELED,
    VIDEO_EXTENSIONS,
    VideoSource,
    find_sources,
    find_unlabeled_sources,
    natural_key,
    split_sources,
)
from .stage_inputs import downsample_clip

__all__ = [
    "ClipConfig",
    "ClipDataset",
    "ClipLoader",
    "DataError",
    "EpochShuffleSampler",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "LIST_EXTENSIONS",
    "RESIZE_MODES",
    "UNLABELED",
    "VIDEO_EXTENSIONS",
    "VideoSource",
    "build_datasets",
    "check_playback_speed",
    "check_resize_mode",
    "downsample_clip",
    "find_sources",
    "find_unlabeled_sources",
    "make_loader",
    "natural_key",
    "normalization_for",
    "split_sources",
    "temporal_indices",
    "unlabeled_dataset",
]
