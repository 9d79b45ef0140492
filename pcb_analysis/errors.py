"""One exception type for bad input: the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class PcbkitError(Exception):
    """Bad input or a failed precondition; the message names the file, the field and the problem."""


def input_error(path: str | Path | None, problem: str) -> PcbkitError:
    """Build a `PcbkitError` whose message starts with the offending file (when there is one)."""
    return PcbkitError(f"{path}: {problem}" if path is not None else problem)
