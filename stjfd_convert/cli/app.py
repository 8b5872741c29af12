"""The Typer application and the error guard shared by every command module."""

from __future__ import annotations

import functools
import os
import shlex
import sys
from typing import Any, Callable

import typer
from typer.core import TyperGroup

try:  # typer ≥ 0.24 vendors click as typer._click; older typer depends on click itself
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _click_exceptions

from ..errors import StjfdError, first_line
from . import render


class _OneLineUsageError(_click_exceptions.UsageError):
    """A usage error (unknown option, bad value, missing argument) shown as the house's one line."""

    def show(self, file: Any = None) -> None:
        command = self.ctx.command_path if self.ctx is not None else "stjfd"
        render.error_line(f"{self.format_message()} — see `{command} --help`")


class _Group(TyperGroup):
    """The ``stjfd`` group: click's usage errors become one ``error: … — …`` line instead of a usage block."""

    @staticmethod
    def _one_line(exc: Any) -> Any:
        if isinstance(exc, _OneLineUsageError) or type(exc).__name__ == "NoArgsIsHelpError":
            return exc  # `stjfd` alone prints the help, as asked for with no_args_is_help
        return _OneLineUsageError(exc.format_message(), exc.ctx)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _click_exceptions.UsageError as exc:
            raise self._one_line(exc) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _click_exceptions.UsageError as exc:
            raise self._one_line(exc) from None


app = typer.Typer(
    cls=_Group,
    name="stjfd",
    help="Spatiotemporal joint filter decomposition for 3D video CNNs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's option panels cut long option names on an 80-column terminal ("--spatial-downsamp…")
    # and print flags as "--resume <bool>"; the plain layout wraps help text and shows flags bare.
    rich_markup_mode=None,
)

EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell shows for a reader that went away


def _silence_stdout() -> None:
    """Python docs' recipe for a closed pipe (``stjfd report --json | head -1``): point stdout at devnull so
    that the final flush at exit cannot fail again, then leave quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (an in-process runner)
        pass
    finally:
        os.close(devnull)


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["stjfd", *sys.argv[1:]])


def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one red line and an exit code; never a traceback for bad input."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = func(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, inside the guard, not at interpreter exit
            return result
        except typer.Exit:
            raise
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except StjfdError as exc:
            render.error_line(exc.one_line())
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            render.error_line("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # an unexpected failure: still one line unless debugging
            if os.environ.get("STJFD_DEBUG"):
                raise
            render.error_line(
                f"internal error: {type(exc).__name__}: {first_line(exc)[:300]} — set STJFD_DEBUG=1 for the traceback "
                "and report it"
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


