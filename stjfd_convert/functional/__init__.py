"""Pure tensor maths: kernel decomposition and the execution forms of a decomposed conv."""

from .conv import ConvGeometry, atoms_first_conv3d, fused_conv3d, reconstruct_weight, sandwich_conv3d
from .decompose import JointDecomposition, decompose, hooi, hosvd

__all__ = [
    "ConvGeometry",
    "JointDecomposition",
    "atoms_first_conv3d",
    "decompose",
    "fused_conv3d",
    "hooi",
    "hosvd",
    "reconstruct_weight",
    "sandwich_conv3d",
]
