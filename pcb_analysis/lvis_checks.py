"""The field checks of LVIS JSON shared by the ground-truth and the results readers (one layer).

`column` takes one field of a list of objects; `int_column` requires integer ids (an integral
float such as 38.0 is taken as 38, as lvis-api's dict look-ups do; 38.5, "abc", true, null are
refused); `number_column` requires finite numbers (never strings or booleans); `box_column`
requires [x, y, w, h] of four finite numbers; `unique_ids` refuses repeated ids. Segmentations:
`segm_problem` checks one (polygons: lists of an even number >= 6 of finite coordinates; RLE:
`size` = the image's [h, w], `counts` a non-empty string of pycocotools' alphabet ending a run,
or a list of non-negative integers summing to h * w); `check_results_segms` checks a whole
results list, the common case (string counts) vectorised. Not checked: that the runs of a string
in that alphabet add up to h * w (it would need the decode, as slow as the evaluation's own;
pycocotools and lvis-api read such a string the same way). Every error is a one-line
`PcbkitError`: "<file>: <section>[<index>].<field> ...". Background: docs/evaluation.md §3.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pcb_analysis.errors import PcbkitError, input_error

_INT64_MAX = np.iinfo(np.int64).max
# pycocotools' compressed counts: characters '0' (48) .. 'o' (111); bit 0x20 of (char - 48) marks
# "more characters follow", so the last character of a string must be in '0' .. 'O'.
_RLE_ALPHABET = bytes(range(48, 112))
_NUMBER_TYPES = frozenset((int, float))


def column(rows: Sequence[Any], name: str, source: str | Path, section: str) -> list[Any]:
    """The field `name` of every object of `rows` (a `section` of the file)."""
    try:
        return [r[name] for r in rows]
    except (KeyError, TypeError, IndexError):
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise input_error(source, f"{section}[{i}] is not an object") from None
            if name not in r:
                raise input_error(source, f"{section}[{i}] has no field '{name}'") from None
        raise


def is_integral(v: Any) -> bool:
    """A JSON integer, or a float with an integral value (38.0); never a bool, string or null."""
    return type(v) is int or (type(v) is float and math.isfinite(v) and v.is_integer())


def int_column(rows: Sequence[Any], name: str, source: str | Path, section: str) -> np.ndarray:
    """`column` as int64; every value an integer (see the module docstring)."""
    values = column(rows, name, source, section)
    if set(map(type, values)) <= {int}:
        try:
            return np.fromiter(values, dtype=np.int64, count=len(values))
        except OverflowError:
            pass  # the loop below names the value out of range
    for i, v in enumerate(values):
        if not is_integral(v):
            raise input_error(source, f"{section}[{i}].{name} is {v!r}, not an integer")
        if abs(int(v)) > _INT64_MAX:
            raise input_error(source, f"{section}[{i}].{name} is {v!r}: out of the 64-bit integer range")
    return np.asarray([int(v) for v in values], dtype=np.int64)


def number_column(rows: Sequence[Any], name: str, source: str | Path, section: str) -> np.ndarray:
    """`column` as float64; every value a finite JSON number (a string such as "0.5" is refused)."""
    values = column(rows, name, source, section)
    if not set(map(type, values)) <= _NUMBER_TYPES:
        i = next(i for i, v in enumerate(values) if type(v) not in _NUMBER_TYPES)
        raise input_error(source, f"{section}[{i}].{name} is {values[i]!r}, not a number")
    out = np.fromiter(values, dtype=np.float64, count=len(values))
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise input_error(source, f"{section}[{i}].{name} is {out[i]} (must be a finite number)")
    return out


def box_column(boxes: Sequence[Any], index: Sequence[int] | np.ndarray, source: str | Path,
               section: str) -> np.ndarray:
    """[N, 4] float64 of `boxes` (the `bbox` of the objects `index` of `section`): each a list of four
    finite numbers [x, y, w, h]."""
    arr: np.ndarray | None = None
    with contextlib.suppress(ValueError):  # ragged lists: the loop below names the bad one
        arr = np.asarray(boxes, dtype=None if boxes else np.float64)
    ok = arr is not None and arr.dtype.kind in "if" and arr.shape == (len(boxes), 4) if boxes else True
    if not ok:
        for j, b in enumerate(boxes):
            if not (isinstance(b, list) and len(b) == 4 and set(map(type, b)) <= _NUMBER_TYPES):
                raise input_error(source, f"{section}[{int(index[j])}].bbox is {_short(b)}: "
                                          "expected four numbers [x, y, w, h]")
        raise input_error(source, f"{section}[].bbox: expected four numbers [x, y, w, h] each")
    out = np.asarray(arr, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        j = int(np.argmax(~finite))
        raise input_error(source, f"{section}[{int(index[j])}].bbox has a non-finite value {out[j].tolist()}")
    return out


def unique_ids(ids: np.ndarray, source: str | Path, section: str, what: str) -> None:
    """Refuse a repeated id in `ids` (file order), naming both positions."""
    order = np.argsort(ids, kind="stable")
    same = ids[order][1:] == ids[order][:-1]
    if same.any():
        k = int(np.argmax(same))
        a, b = sorted((int(order[k]), int(order[k + 1])))
        raise input_error(
            source,
            f"field '{section}[].id': duplicate {what} id {int(ids[a])} ({section}[{a}] and {section}[{b}])",
        )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def segm_problem(s: Any, h: int, w: int) -> str | None:
    """What is wrong with one segmentation of an object on an h x w image, or None."""
    if isinstance(s, list):
        if not s:
            return "is an empty list (no polygon)"
        for j, poly in enumerate(s):
            if not isinstance(poly, list) or not set(map(type, poly)) <= _NUMBER_TYPES:
                return f"polygon {j} is not a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon {j} has {len(poly)} coordinates (an even number >= 6 is needed)"
            if not math.isfinite(sum(poly)):
                return f"polygon {j} has a non-finite coordinate"
        return None
    if not isinstance(s, dict):
        return f"is {_short(s)} (expected a list of polygons or an RLE object)"
    for key in ("size", "counts"):
        if key not in s:
            return f"is an RLE without '{key}'"
    size = s["size"]
    if not (isinstance(size, list) and len(size) == 2 and set(map(type, size)) <= {int}):
        return f"has size {_short(size)} (expected [height, width])"
    if size != [h, w]:
        return f"is an RLE of size {size}, but the image is [{h}, {w}]"
    counts = s["counts"]
    if isinstance(counts, str):
        return _counts_string_problem(counts)
    if isinstance(counts, list):
        if not set(map(type, counts)) <= {int} or (counts and min(counts) < 0):
            return "has counts that are not non-negative integers"
        if sum(counts) != h * w:
            return f"has counts summing to {sum(counts)}, not height x width = {h * w}"
        return None
    return f"has counts {_short(counts)} (expected a string or a list of integers)"


def _counts_string_problem(counts: str) -> str | None:
    if not counts:
        return "has empty counts"
    try:
        raw = counts.encode("ascii")
    except UnicodeEncodeError:
        return "has counts with a non-ASCII character (not an RLE string)"
    if raw.translate(None, _RLE_ALPHABET) or raw[-1] - 48 >= 32:
        return f"has counts {_short(counts, 40)} that are not a valid RLE string"
    return None


def check_results_segms(results: Sequence[dict[str, Any]], has_bbox: np.ndarray, img_index: np.ndarray,
                        heights: np.ndarray, widths: np.ndarray, source: str | Path) -> list[Any]:
    """The segmentation of every result (None where the field is absent: a box-only result), each
    checked against its image (`img_index` into `heights` / `widths`); see the module docstring."""
    n = len(results)
    segm: list[Any] = [r.get("segmentation") for r in results]
    if set(map(type, segm)) == {dict}:  # the common case: every result has an RLE
        counts = [s.get("counts") for s in segm]
        if set(map(type, counts)) == {str}:
            _check_rle_strings(segm, counts, np.arange(n), img_index, heights, widths, source)
            return segm
    absent = np.fromiter((s is None for s in segm), dtype=bool, count=n)
    for i in np.flatnonzero(absent):
        if "segmentation" in results[i]:
            raise input_error(source, f"results[{i}].segmentation is null")
        if not has_bbox[i]:
            raise input_error(source, f"results[{i}] has neither 'segmentation' nor 'bbox'")
    fast = [i for i in np.flatnonzero(~absent).tolist()
            if type(segm[i]) is dict and type(segm[i].get("counts")) is str]
    fast_mask = np.zeros(n, dtype=bool)
    fast_mask[fast] = True
    for i in np.flatnonzero(~absent & ~fast_mask):  # polygons, uncompressed RLE, everything malformed
        img = int(img_index[i])
        problem = segm_problem(segm[i], int(heights[img]), int(widths[img]))
        if problem is not None:
            raise input_error(source, f"results[{int(i)}].segmentation {problem}")
    if fast:
        rles = [segm[i] for i in fast]
        _check_rle_strings(rles, [r["counts"] for r in rles], np.asarray(fast, dtype=np.int64), img_index,
                           heights, widths, source)
    return segm


def _check_rle_strings(rles: list[dict[str, Any]], counts: list[str], index: np.ndarray,
                       img_index: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                       source: str | Path) -> None:
    """`segm_problem` for the RLEs with string `counts` of the results `index`, vectorised: sizes
    compared as one array, the strings joined and checked at once (alphabet, run ends)."""
    m = len(rles)
    h = heights[img_index[index]]
    w = widths[img_index[index]]

    def first_problem() -> PcbkitError:
        for j in range(m):
            problem = segm_problem(rles[j], int(h[j]), int(w[j]))
            if problem is not None:
                return input_error(source, f"results[{int(index[j])}].segmentation {problem}")
        raise AssertionError("_check_rle_strings: the vectorised and the scalar checks disagree")

    try:
        flat = list(itertools.chain.from_iterable(r.get("size") for r in rles))
    except TypeError:  # a missing or non-list size
        raise first_problem() from None
    if len(flat) != 2 * m or not set(map(type, flat)) <= {int}:
        raise first_problem()
    size = np.fromiter(flat, dtype=np.int64, count=2 * m).reshape(m, 2)
    if ((size[:, 0] != h) | (size[:, 1] != w)).any():
        raise first_problem()
    lens = np.fromiter(map(len, counts), dtype=np.int64, count=m)
    text = "".join(counts)
    if (lens == 0).any() or not text.isascii():
        raise first_problem()
    raw = text.encode("ascii")
    last = np.frombuffer(raw, dtype=np.uint8)[np.cumsum(lens) - 1]
    if raw.translate(None, _RLE_ALPHABET) or (last >= 80).any():
        raise first_problem()
