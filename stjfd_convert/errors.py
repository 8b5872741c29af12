"""Every user-facing failure of stjfd, each carrying a hint that says what to do.

Library code raises these; ``stjfd_convert.cli`` turns them into one red line and exit code
2 (1 for a failed verification). Nothing else in the package should reach a user as a traceback.
"""

from __future__ import annotations


class StjfdError(Exception):
    """Base class: ``message`` says what is wrong, ``hint`` says how to fix it."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint as a single line for terminal output."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" — {' '.join(self.hint.split())}"
        return text

    def __str__(self) -> str:
        return self.one_line()


class ConfigError(StjfdError):
    """Invalid option values or combinations (atoms ≤ 0, bad shapes, bad globs…)."""


class CheckpointError(StjfdError):
    """A checkpoint file that is missing, unreadable, corrupt, unsafe or non-finite."""


class ArchitectureError(StjfdError):
    """The model architecture cannot be built, detected or matched to the weights."""


class StateDictMismatchError(ArchitectureError):
    """The checkpoint's keys/shapes do not match the architecture (strict loading)."""


class ModelError(StjfdError):
    """The model itself cannot be processed (e.g. it has no Conv3d to decompose)."""


class SwapError(ConfigError):
    """An atom swap that does not apply: a layer whose temporal kernel is 1, atoms that do not fit in the
    new size, an output size that padding cannot keep, or nothing left to swap."""


class OutputError(StjfdError):
    """An output path that cannot be written."""


class ConvertedModelError(StjfdError):
    """A converted-model directory that is missing files or is inconsistent."""


class VerificationError(StjfdError):
    """A numerical verification (parity, ONNX validation) failed."""

    exit_code = 1


# What a model's forward raises when it is given an input it cannot take (wrong shape, dtype, a list
# where a tensor was expected, a user model's own assert). Every model-running path catches the same.
MODEL_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError, NotImplementedError,
    AttributeError,  # e.g. `x.shape` in a forward given one tensor per pathway
)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
