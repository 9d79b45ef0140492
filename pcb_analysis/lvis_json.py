"""The one reader of LVIS-format JSON files (annotations, and the results lists of the evaluator).

`read_json(path, what)` parses any JSON file fast: orjson when installed (a declared dependency,
several times faster than `json` on LVIS-size files), the cyclic garbage collector paused while
the millions of small objects are built, and the standard parser as the fallback for its precise
error message (and for NaN). `read_lvis_json(path, what, require)` adds the checks of an LVIS
annotation file: a JSON object whose sections in `require` (by default images, annotations and
categories) are lists. Errors are `PcbkitError`s that start with the path:
"<what> file not found", "not valid JSON (...)", "not an LVIS annotation file: ...".
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pcb_analysis.errors import input_error

try:  # optional: parses LVIS-size files several times faster than the json module
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None  # type: ignore[assignment]

LVIS_SECTIONS = ("images", "annotations", "categories")


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building large acyclic object graphs.

    Parsing an LVIS results file creates millions of dicts and lists; with the collector on,
    CPython re-scans them again and again (measured: about 2.5x slower to parse).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_json(path: str | Path, what: str) -> Any:
    """Parse the JSON file `path`; errors name it and `what` it is (e.g. "results")."""
    path = Path(path)
    if not path.exists():
        raise input_error(path, f"{what} file not found")
    if not path.is_file():
        raise input_error(path, f"{what} path is not a file")
    data = path.read_bytes()
    with gc_paused():
        if orjson is not None:
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                pass  # fall through to the standard parser for its precise error message (and NaN)
        try:
            return json.loads(data)
        except json.JSONDecodeError as err:
            where = f"at line {err.lineno}, column {err.colno}"
            raise input_error(path, f"not valid JSON ({err.msg} {where})") from err
        except UnicodeDecodeError as err:
            raise input_error(path, "not a UTF-8 text file") from err


def check_lvis_sections(
    data: Any, source: str | Path, require: Sequence[str] = LVIS_SECTIONS
) -> dict[str, Any]:
    """`data` as an LVIS annotation dict, or a PcbkitError: a JSON object whose `require` fields are lists."""
    if not isinstance(data, dict):
        raise input_error(source, "not an LVIS annotation file: top level is not a JSON object")
    for section in require:
        if section not in data:
            raise input_error(source, f"not an LVIS annotation file: missing field '{section}'")
        if not isinstance(data[section], list):
            raise input_error(source, f"not an LVIS annotation file: '{section}' is not a list")
    return data


def read_lvis_json(
    path: str | Path, what: str = "annotation", require: Sequence[str] = LVIS_SECTIONS
) -> dict[str, Any]:
    """Read an LVIS-format annotation file and check that its `require` sections are lists."""
    return check_lvis_sections(read_json(path, what), path, require)
