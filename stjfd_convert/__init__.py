"""stjfd: spatiotemporal joint filter decomposition for 3D video CNNs."""

__version__ = "0.1.0"

from .errors import StjfdError  # noqa: E402
from .layers import DecomposedConv3d  # noqa: E402

__all__ = ["DecomposedConv3d", "StjfdError", "__version__"]
