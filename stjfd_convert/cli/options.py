"""Options that several commands share, declared once so that their flags and help read the same everywhere.

Each is an ``Annotated`` type for a command parameter (``arch: ArchOption = None``); typer reads the
``typer.Option`` from the annotation. Options whose meaning differs per command (``--force``, ``--mean``,
``--device``) stay with their command, where the help can say what they do there.
"""

from __future__ import annotations

from typing import Annotated, Any, List, Optional

import typer

ArchOption = Annotated[
    Optional[str], typer.Option("--arch", help="torchvision video model of a checkpoint (r3d_18, mc3_18, s3d, …)")
]
ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", help="user architecture of a checkpoint, module:callable or file.py:callable"),
]
ModelKwargsOption = Annotated[
    Optional[str], typer.Option("--model-kwargs", help="JSON object of the architecture's constructor kwargs")
]
TrustPickleOption = Annotated[
    bool, typer.Option("--trust-pickle", help="allow checkpoints and architectures holding pickled objects")
]
TrustCodeOption = Annotated[
    bool, typer.Option("--trust-code", help="allow the model builder a folder's manifest names")
]
NonStrictOption = Annotated[bool, typer.Option("--non-strict", help="load what matches, report the rest")]
JsonOption = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
InputShapeOption = Annotated[
    Optional[List[str]],
    typer.Option(
        "--input-shape",
        metavar="B,C,T,H,W",
        help="clip shape B,C,T,H,W, e.g. 1,3,16,112,112; a multi-pathway model: 1,3,8,224,224+1,3,32,224,224 "
        "(or repeat the flag)",
    ),
]
PathwayStridesOption = Annotated[
    Optional[str],
    typer.Option(
        "--pathway-strides",
        help="a multi-pathway model: pathway i = every k_i-th frame of one clip, e.g. 4,1 (SlowFast); "
        "default: what the model records",
    ),
]
InputLayoutOption = Annotated[
    str,
    typer.Option(
        "--input-layout", help="how the model takes a clip batch: BCTHW (torchvision) | BTHWC (frames, RGB last) | BTCHW"
    ),
]
InputDtypeOption = Annotated[
    str, typer.Option("--input-dtype", help="float32 (normalised with --mean/--std) | uint8 (raw 0-255 frames)")
]


def clip_layout(value: str) -> str:
    """``--input-layout BTHWC`` → the per-clip layout the datasets use (``THWC``)."""
    from ..errors import ConfigError

    text = value.strip().upper()
    layouts = {"BCTHW": "CTHW", "BTHWC": "THWC", "BTCHW": "TCHW"}
    if text in layouts.values():
        return text
    if text not in layouts:
        raise ConfigError(f"unknown --input-layout {value!r}", "use BCTHW, BTHWC or BTCHW")
    return layouts[text]


def input_shape_value(values: Optional[List[str]]) -> Any:
    """The parsed ``--input-shape`` (one shape, or one per pathway), or None when not given."""
    if not values:
        return None
    from ..inputs import parse_input_shape

    return parse_input_shape("+".join(values))
