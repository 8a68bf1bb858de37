"""The parser, the command registry, and what an error becomes.

Subcommands register themselves with :func:`command`; :func:`build_parser` gives
each its own subparser, and :func:`main` runs the one named on the command line.

Errors fall in two kinds, told apart by :func:`is_user_error`:

* something the user can fix — a bad model spec or argument, a missing file or
  package, a model that cannot be captured, a data folder with the wrong layout,
  an unreachable latency target, a plan made for another model
  (:data:`USER_ERRORS`): printed as ``fxmerge: error: ...``, exit status 2;
* anything else is a bug in fxmerge — a ``MergeError`` on a plan fxmerge made
  itself, an ``AssertionError``, an unexpected exception: printed with its
  traceback and a request to report it, exit status 1.

``--debug`` lets either propagate, for a debugger.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fxmerge.capture import CaptureError
from fxmerge.cli.errors import CLIError
from fxmerge.data import DataError
from fxmerge.latency import BackendUnavailable
from fxmerge.plan import PlanError

Run = Callable[[argparse.Namespace], int | None]
Configure = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Configure
    run: Run


COMMANDS: dict[str, Command] = {}
"""Subcommands by name, in registration order."""


def command(name: str, help: str, configure: Configure) -> Callable[[Run], Run]:
    """Register ``fxmerge NAME``: ``configure(parser)`` adds its arguments, the decorated
    function runs it and returns the exit status (``None`` means 0)."""

    def register(run: Run) -> Run:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


def _version() -> str:
    # the package root is always imported before its subpackages; only its version is read here
    return getattr(sys.modules.get("fxmerge"), "__version__", "unknown")


PIPELINE = ("inspect", "compress", "merge", "bench")
"""The built-in commands in the order a user runs them (``--help`` lists them so, then any others)."""


def _pipeline_order(cmd: Command) -> int:
    return PIPELINE.index(cmd.name) if cmd.name in PIPELINE else len(PIPELINE)


def build_parser() -> argparse.ArgumentParser:
    """``fxmerge [--version] [--debug] COMMAND ...`` with every registered command."""
    parser = argparse.ArgumentParser(
        prog="fxmerge",
        description="Make CNNs shallower: latency-aware activation and conv removal with exact kernel merging.",
    )
    parser.add_argument("--version", action="version", version=f"fxmerge {_version()}")
    parser.add_argument("--debug", action="store_true", help="let errors propagate with their traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in sorted(COMMANDS.values(), key=_pipeline_order):
        child = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(child)
        child.set_defaults(run=cmd.run)
    return parser


# --------------------------------------------------------------------------- errors
USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError,
    CaptureError,
    PlanError,
    DataError,
    BackendUnavailable,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ModuleNotFoundError,
)
"""Exceptions reported as ``fxmerge: error: ...`` with exit status 2.

Not ``ValueError`` (``MergeError`` is one, and on a plan fxmerge made it is a bug):
the command line turns the value errors a user can cause into :class:`CLIError`
where they arise. Not ``OSError`` as a whole either: only the file problems above.
"""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is something the user can fix (see :data:`USER_ERRORS`)."""
    if isinstance(exc, ModuleNotFoundError):
        # a missing optional package is the user's to install; a missing fxmerge module is a bug
        return (exc.name or "").split(".")[0] != "fxmerge"
    return isinstance(exc, USER_ERRORS)


def _message(exc: BaseException) -> str:
    if isinstance(exc, (CLIError, CaptureError, PlanError, DataError, BackendUnavailable)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def report_error(exc: BaseException) -> int:
    """Print ``exc`` as a user error (exit status 2) or as a bug with its traceback (exit status 1)."""
    if is_user_error(exc):
        print(f"fxmerge: error: {_message(exc)}", file=sys.stderr)
        return 2
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(
        f"fxmerge: internal error: {type(exc).__name__}: {exc}\n"
        "fxmerge: this is a bug in fxmerge, not a problem with your model or command line; "
        "please report it with the command line and the traceback above",
        file=sys.stderr,
    )
    return 1


def _silence_stdout() -> None:
    """Point stdout at the null device, so that flushing it at exit raises nothing more."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fxmerge`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        print("fxmerge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (``fxmerge inspect ... | head``): not an error
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a process killed by it
    except Exception as exc:
        if args.debug:
            raise
        return report_error(exc)
    return int(status or 0)
