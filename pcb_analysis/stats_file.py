"""Reading a statistics file (`pcbkit stats` output, .npz) safely: the checks behind `ClassStats.load`.

`read_npz(path, required, optional)` returns the named arrays of a NumPy .npz archive; a file that
is no zip archive at all (random bytes, JSON, a pickle) is refused as "not a pcbkit statistics
file" before numpy sees it (numpy would otherwise advise loading it with pickles allowed), and a
damaged archive as "unreadable". `read_meta(arrays, path, kind, schema)` parses the `meta` JSON and
checks its kind and schema version; `meta_count(meta, dotted, path)` reads an integer field such
as `num_classes` or `counts.rows` (a non-negative JSON integer, else a field error naming it).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pcb_analysis.errors import PcbkitError, input_error

NOT_STATS = "is not a pcbkit statistics file"


def read_npz(path: Path, required: Sequence[str], optional: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The arrays `required` (all must exist) and those of `optional` present in the archive."""
    if not path.is_file():
        raise input_error(path, "statistics file not found")
    if not zipfile.is_zipfile(path):
        raise input_error(path, f"{NOT_STATS} (not an .npz archive: wrong file, or truncated?)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [a for a in required if a not in data.files]
            if missing:
                raise input_error(path, f"{NOT_STATS}: missing array(s) {missing}")
            names = (*required, *(a for a in optional if a in data.files))
            return {a: np.asarray(data[a]) for a in names}
    except PcbkitError:
        raise
    except Exception as err:  # zipfile.BadZipFile, OSError, ValueError (an object array), zlib.error ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise input_error(path, f"unreadable statistics file (corrupted or truncated?): {first}") from err


def read_meta(arrays: dict[str, np.ndarray], path: Path, kind: str, schema: int) -> dict[str, Any]:
    """The `meta` JSON of a statistics file, of `kind` and `schema`."""
    try:
        meta = json.loads(str(arrays["meta"]))
    except (json.JSONDecodeError, TypeError) as err:
        raise input_error(path, f"field 'meta': not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        got = meta.get("kind") if isinstance(meta, dict) else meta
        raise input_error(path, f"field 'meta.kind': expected {kind!r}, got {got!r}")
    if meta.get("schema_version") != schema:
        raise input_error(
            path, f"field 'meta.schema_version': {meta.get('schema_version')!r}, this pcbkit reads {schema}"
        )
    return meta


def meta_count(meta: dict[str, Any], dotted: str, path: Path, default: int | None = None) -> int:
    """The non-negative integer at `dotted` ("num_classes", "counts.rows") of `meta`; `default` when
    it is absent (required when `default` is None)."""
    node: Any = meta
    for part in dotted.split("."):
        if node is not None and not isinstance(node, dict):
            raise input_error(path, f"field 'meta.{dotted}': its parent is not an object")
        node = None if node is None else node.get(part)
    if node is None:
        if default is None:
            raise input_error(path, f"field 'meta.{dotted}' is missing")
        return default
    if type(node) is not int or node < 0:
        raise input_error(path, f"field 'meta.{dotted}' is {node!r}, not a non-negative integer")
    return node
