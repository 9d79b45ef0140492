"""The two exception types of pcbkit, shared by pcb_analysis and pcb_train.

    PcbkitError     bad INPUT (a file, a field, an option): the CLI prints its message on one line
                    and exits non-zero; the message names the file, the field and the problem.
    ApiMisuseError  a PROGRAMMING error in a call of a library function (wrong shape, dtype,
                    argument combination): a bug in the caller, not in the data. It derives from
                    ValueError and TypeError, so code written against the standard types still works.
"""

from __future__ import annotations

from pathlib import Path


class PcbkitError(Exception):
    """Bad input or a failed precondition; the message names the file, the field and the problem."""


class ApiMisuseError(ValueError, TypeError):
    """A library function was called wrongly (shapes, dtypes, arguments); the message names the call."""


def input_error(path: str | Path | None, problem: str) -> PcbkitError:
    """Build a `PcbkitError` whose message starts with the offending file (when there is one)."""
    return PcbkitError(f"{path}: {problem}" if path is not None else problem)
