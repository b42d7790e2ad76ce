"""The CLI's error surface, in one place: the project's own errors become one `Error: ...` line and a documented
exit status; anything else (a bug) keeps its traceback.

`ci-store --debug COMMAND ...` or `CI_STORE_DEBUG=1` prints their traceback first (same line, same status).
Classes are named by module and name (matched along the exception's MRO, so subclasses map with their base) so
that starting the CLI imports neither torch nor the libraries behind the commands.
"""
from __future__ import annotations

import os
import sys
import traceback

import click

DEBUG_ENV = "CI_STORE_DEBUG"

# (status, what failed, the classes that map to it as "module:QualName", what the user should check)
EXIT_STATUSES: tuple[tuple[int, str, tuple[str, ...], str], ...] = (
    (3, "store", ("ci_store.errors:StoreError",),
     "a label store URL is not a ci-store, is incomplete or cannot be read/written"),
    (4, "manifest", ("distill.data.manifest:ManifestError",),
     "a manifest is missing, malformed or has duplicate utterance ids"),
    (5, "audio", ("distill.data.audio:AudioError",),
     "an utterance's audio file is missing, unreadable or disagrees with the manifest"),
    (6, "teacher", ("distill.teachers.base:TeacherError",),
     "--teacher is not a usable checkpoint, or --layer is out of range"),
    (7, "quantizer", ("distill.codec.quantizer:QuantizerError",),
     "--quantizer is not a quantizer file, or the frames / codec options are unusable"),
    (8, "extraction", ("distill.extract.planning:ExtractionError",),
     "extraction cannot start (teacher/quantizer mismatch, output store refuses the plan, no usable audio)"),
    (9, "config/data", ("distill.synth.corpus:CorpusError", "distill.teachers.training:TeacherDataError",
                        "distill.student.trainer:TrainingError", "distill.data.alignment:AlignmentError"),
     "training or corpus options/data are unusable (transcripts, label kind, run directory, output directory)"),
    (10, "lhotse interop", ("distill.interop:InteropError",),
     "cuts, their custom field or the store cannot be attached, imported or exported"),
)

_BY_NAME = {name: status for status, _, names, _ in EXIT_STATUSES for name in names}


def exit_status_for(exc: BaseException) -> int | None:
    """The documented exit status of one of the project's errors (most specific class first); None otherwise."""
    for cls in type(exc).__mro__:
        status = _BY_NAME.get(f"{cls.__module__}:{cls.__qualname__}")
        if status is not None:
            return status
    return None


def debug_requested(ctx: click.Context | None = None) -> bool:
    """--debug on the group, or CI_STORE_DEBUG set to anything but '', 0, false, no, off."""
    if ctx is not None and ctx.find_root().params.get("debug"):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines) or type(exc).__name__


class ProjectError(click.ClickException):
    """Shown by click as `Error: <message>` on stderr; exits with the status of the error it stands for."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def epilog() -> str:
    """The exit-status table for `ci-store --help`."""
    rows = ["Exit status:",
            "  0  ok",
            "  1  `verify` found problems; or a bug (an unexpected error, printed with its traceback)",
            "  2  usage: a bad option or option value; or `extract` finished with failed utterances (listed)"]
    rows += [f"  {status}  {what}: {hint}" for status, what, _, hint in EXIT_STATUSES]
    rows.append(f"Statuses 3-10 print one `Error:` line naming the file, utterance or option; --debug or "
                f"{DEBUG_ENV}=1 adds the traceback.")
    return "\b\n" + "\n".join(rows)


class ErrorHandlingGroup(click.Group):
    """A click group whose subcommands' project errors become `Error:` lines with their exit status."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            status = exit_status_for(e)
            if status is None:
                raise  # a bug: Python prints the traceback, exit status 1
            if debug_requested(ctx):
                traceback.print_exc(file=sys.stderr)  # then the same `Error:` line and status as without --debug
            raise ProjectError(one_line(e), status) from None
