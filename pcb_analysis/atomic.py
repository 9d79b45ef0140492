"""Atomic output: write to a temporary sibling, then rename over the target.

A reader never sees a half-written file, and an interrupted writer leaves the previous good
output (if any) untouched. An OSError of the writing itself (a full disk, a read-only file
system, no permission) becomes a one-line `PcbkitError` naming the target (`write_error`):
"<file>: no space left on device", exit status 2 at the CLI; `os_errors_named(target)` applies
the same translation to a writer of its own (a streamed results file, a checkpoint).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pcb_analysis.errors import PcbkitError, input_error

_PROBLEMS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def write_error(target: str | Path, err: OSError) -> PcbkitError:
    """The one-line error of an OSError met while writing `target`."""
    problem = _PROBLEMS.get(err.errno or -1) or f"cannot write ({err.strerror or err})"
    return input_error(target, problem)


@contextmanager
def os_errors_named(target: str | Path) -> Iterator[None]:
    """Turn an OSError raised inside the block into `write_error(target, ...)`."""
    try:
        yield
    except OSError as err:
        raise write_error(target, err) from err


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target`, on error it is removed.

    `suffix` lets writers that infer the format from the extension (e.g. matplotlib) see the right one.
    """
    target = Path(target)
    with os_errors_named(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=suffix or target.suffix + ".tmp", dir=target.parent
        )
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with os_errors_named(target):
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give outputs the usual mode
            os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp, os_errors_named(target), open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(target: str | Path, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


def write_json_atomic(target: str | Path, obj: Any, indent: int | None = None) -> None:
    """Serialise `obj` deterministically (sorted keys are NOT forced; dict order is kept)."""
    text = json.dumps(obj, indent=indent, separators=(",", ":") if indent is None else None)
    write_text_atomic(target, text + "\n")


def write_with_atomic(target: str | Path, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and move the result onto `target` atomically."""
    with atomic_path(target) as tmp, os_errors_named(target):
        writer(tmp)
