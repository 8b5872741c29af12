"""Model registry and checkpoint loading.

Three ways to name an architecture (:class:`ArchSpec`): a torchvision video model (``r3d_18``), a
user callable (``mypkg.nets:build_net`` or ``path/to/file.py:build_net``), or a whole pickled
``nn.Module``. Checkpoints are read with ``weights_only=True`` first so that an untrusted file cannot
run code; every failure becomes a :class:`~stjfd_convert.errors.StjfdError` naming the file and the fix.
"""

from .builders import build_model, model_source_paths
from .checkpoints import check_finite, read_checkpoint, sha256_file
from .detect import (
    Detection,
    detect_architecture,
    infer_num_classes,
    load_state_dict_into,
)
from .load import LoadedModel, load_model, parse_model_kwargs
from .registry import (
    ARCH_KINDS,
    TORCHVISION_VIDEO_ARCHS,
    TRUSTED_BUILDERS,
    ArchInfo,
    ArchSpec,
    default_input_shape,
    is_trusted_builder,
)

__all__ = [
    "ARCH_KINDS",
    "TRUSTED_BUILDERS",
    "ArchInfo",
    "ArchSpec",
    "Detection",
    "LoadedModel",
    "TORCHVISION_VIDEO_ARCHS",
    "build_model",
    "default_input_shape",
    "check_finite",
    "detect_architecture",
    "infer_num_classes",
    "is_trusted_builder",
    "load_model",
    "load_state_dict_into",
    "model_source_paths",
    "parse_model_kwargs",
    "read_checkpoint",
    "sha256_file",
]
