"""stjfd: spatiotemporal joint filter decomposition for 3D video CNNs.

``from stjfd_convert import convert_model, DecomposedConv3d`` is the entry point for Python users;
the ``stjfd`` command line is a thin layer over the same functions.
"""

__version__ = "0.1.0"

from .config import AtomSpec, ConvertConfig  # noqa: E402
from .convert import ConversionReport, convert_model, set_mode  # noqa: E402
from .errors import StjfdError  # noqa: E402
from .layers import DecomposedConv3d  # noqa: E402
from .saved_model import load_converted, save_converted  # noqa: E402

__all__ = [
    "AtomSpec",
    "ConversionReport",
    "ConvertConfig",
    "DecomposedConv3d",
    "StjfdError",
    "__version__",
    "convert_model",
    "load_converted",
    "save_converted",
    "set_mode",
]
