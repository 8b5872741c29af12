"""Options that several commands share, declared once so that their flags and help read the same everywhere.

Each is an ``Annotated`` type for a command parameter (``arch: ArchOption = None``); typer reads the
``typer.Option`` from the annotation. Options whose meaning differs per command (``--force``, ``--mean``,
``--input-shape``, ``--device``) stay with their command, where the help can say what they do there.
"""

from __future__ import annotations

from typing import Annotated

import typer

ArchOption = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="torchvision video model of a checkpoint (r3d_18, mc3_18, s3d, …)",
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="user architecture of a checkpoint, module:callable or file.py:callable",
    ),
]
ModelKwargsOption = Annotated[
    str | None,
    typer.Option(
        "--model-kwargs", help="JSON object of the architecture's constructor kwargs"
    ),
]
TrustPickleOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="allow checkpoints and architectures holding pickled objects",
    ),
]
TrustCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-code", help="allow the model builder a folder's manifest names"
    ),
]
NonStrictOption = Annotated[
    bool, typer.Option("--non-strict", help="load what matches, report the rest")
]
JsonOption = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
