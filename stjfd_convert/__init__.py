"""stjfd: spatiotemporal joint filter decomposition for 3D video CNNs.

``from stjfd_convert import convert_model, DecomposedConv3d`` is the entry point for Python users;
the ``stjfd`` command line is a thin layer over the same functions.
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .calibrate import calibrate_model, gather_statistics
    from .compare import compare_on_clips, compare_paths
    from .config import AtomSpec, ConvertConfig, SwapConfig
    from .convert import ConversionReport, convert_model, set_mode
    from .deploy import deploy
    from .errors import StjfdError
    from .finetune.distill import DistillationLoss
    from .layers import DecomposedConv3d
    from .saved_model import load_converted, save_converted
    from .swap import swap_atoms, swap_folder

# The public names, imported on first use (PEP 562): `import stjfd_convert` — and so `stjfd --help` —
# does not pay for importing torch until a command needs it.
_LAZY = {
    "calibrate_model": "calibrate",
    "gather_statistics": "calibrate",
    "compare_on_clips": "compare",
    "compare_paths": "compare",
    "DistillationLoss": "finetune.distill",
    "AtomSpec": "config",
    "ConvertConfig": "config",
    "SwapConfig": "config",
    "ConversionReport": "convert",
    "convert_model": "convert",
    "set_mode": "convert",
    "deploy": "deploy",
    "StjfdError": "errors",
    "DecomposedConv3d": "layers",
    "load_converted": "saved_model",
    "save_converted": "saved_model",
    "swap_atoms": "swap",
    "swap_folder": "swap",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AtomSpec",
    "DistillationLoss",
    "calibrate_model",
    "compare_on_clips",
    "compare_paths",
    "gather_statistics",
    "ConversionReport",
    "ConvertConfig",
    "DecomposedConv3d",
    "StjfdError",
    "SwapConfig",
    "__version__",
    "convert_model",
    "deploy",
    "load_converted",
    "save_converted",
    "set_mode",
    "swap_atoms",
    "swap_folder",
]
