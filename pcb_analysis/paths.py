"""Output paths and names that become file names, checked before any work starts.

`check_output_path(path, option, folder=False)`: the nearest existing ancestor of `path` must be a
writable folder (a regular file where a folder is needed, e.g. `--out a.json/x.json` with a.json
a file, is refused), and `path` itself, when it exists, must be a file (`folder=False`) or a
folder (`folder=True`). Commands call it on every output option first, so a bad path fails in
a second rather than after the whole computation. `check_name(name, what)`: a name that becomes
part of a file name (a split name, a row name) may not hold a path separator, a NUL, or be
"", "." or "..", so nothing is written outside the output folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from pcb_analysis.errors import PcbkitError, input_error


def check_output_path(path: str | Path, option: str, *, folder: bool = False) -> Path:
    """`path` as a Path, or a one-line PcbkitError naming `option` (see the module docstring)."""
    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise input_error(p, f"{option}: exists and is not a folder")
        if not folder and p.is_dir():
            raise input_error(p, f"{option}: is a folder, not a file")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise input_error(p, f"{option}: {ancestor} is a file, not a folder")
    target = p if folder and p.exists() else ancestor  # atomic writers create a temporary beside p
    if not os.access(target, os.W_OK):
        raise input_error(p, f"{option}: {target} is not writable (permission denied)")
    return p


def check_name(name: str, what: str) -> str:
    """`name`, when it can be part of a file name inside an output folder, else a PcbkitError."""
    if name in ("", ".", "..") or any(ch in name for ch in ("/", "\\", "\0")):
        raise PcbkitError(
            f"{what} {name!r}: not usable in a file name (no path separators, NUL, '.' or '..')"
        )
    return name
