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
    Optional[str],
    typer.Option(
        "--input-layout",
        help="how the model takes a clip batch: BCTHW (torchvision) | BTHWC (frames, RGB last) | BTCHW; "
        "default: what the converted folder records, else BCTHW",
    ),
]
InputDtypeOption = Annotated[
    Optional[str],
    typer.Option(
        "--input-dtype",
        help="float32 (normalised with --mean/--std) | uint8 (raw 0-255 frames); default: as recorded, else float32",
    ),
]
SizeOption = Annotated[
    Optional[str], typer.Option("--size", metavar="HxW", help="frame size: N (square) or HxW, e.g. 27x48")
]
ResizeModeOption = Annotated[
    Optional[str],
    typer.Option(
        "--resize-mode",
        help="crop: resize the short side, centre/random crop (default) | stretch: the whole frame resized to "
        "exactly HxW, no crop",
    ),
]
NoNormalizeOption = Annotated[
    bool,
    typer.Option(
        "--no-normalize", help="float frames scaled to 0..1 only: no mean/std, even the architecture's known ones"
    ),
]


def clip_layout(value: str | None) -> str:
    """``--input-layout BTHWC`` → the per-clip layout the datasets use (``THWC``); None → ``CTHW``."""
    from ..layouts import clip_layout as to_clip

    return to_clip(value if value is not None else "BCTHW")


def parse_size(text: str | None, flag: str = "--size") -> int | tuple[int, int] | None:
    """``--size``: ``112`` → 112, ``27x48`` (or ``27,48``, ``27×48``) → (27, 48); None stays None."""
    if text is None:
        return None
    from ..errors import ConfigError

    parts = [p.strip() for p in str(text).lower().replace("×", "x").replace(",", "x").split("x")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v < 1 for v in values):
        raise ConfigError(
            f"{flag} must be a positive integer or HEIGHTxWIDTH, got {text!r}", f"e.g. {flag} 112 or {flag} 27x48"
        )
    return values[0] if len(values) == 1 else (values[0], values[1])


def check_resize_mode(value: str | None) -> str | None:
    """``--resize-mode``: ``crop`` or ``stretch`` (None: as recorded / crop)."""
    if value is None:
        return None
    from ..data.options import check_resize_mode as check

    return check(value)


def input_shape_value(values: Optional[List[str]]) -> Any:
    """The parsed ``--input-shape`` (one shape, or one per pathway), or None when not given."""
    if not values:
        return None
    from ..inputs import parse_input_shape

    return parse_input_shape("+".join(values))
