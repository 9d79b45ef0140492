"""LVIS results lists: read and validated against the ground truth, or written as a stream.

Reading (docs/evaluation.md §3): D detections as arrays in file order: image index into
`GroundTruth.img_ids`, category index, score, box xywh (NaN when absent), segmentation per original
result, and `order` (position in the file, the tie-breaker lvis-api uses). A results list is a JSON
list of objects with `image_id`, `category_id`, `score`, and `bbox` [x, y, w, h] and/or
`segmentation` (RLE), every field checked by `pcb_analysis.lvis_checks` (one line naming the
file, the detection's index and the field). `cap_per_image` (lvis-api's 300 per image) and
`cap_per_category` (fixed AP's 10,000 per class) return the indices they keep; `select` takes a
subset.

Writing (docs/calibration.md §3): `write_results(target)` yields a `ResultsFile` streaming entries
to a hidden temporary beside `target` (`pcb_analysis.atomic.atomic_path`); `finish()` closes and
syncs it (`.tmp` is then a complete file that can be evaluated); it replaces `target` only when
the block ends without error, else it is removed: nothing half-written under the final name, an
earlier good file never clobbered. `PerClassTop` keeps the best `per_class` entries of every
category over a split, streamed (the input of fixed AP).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from pcb_analysis.atomic import atomic_path, os_errors_named
from pcb_analysis.errors import ApiMisuseError, input_error
from pcb_analysis.lvis_checks import box_column, check_results_segms, int_column, number_column
from pcb_analysis.lvis_gt import GroundTruth
from pcb_analysis.lvis_json import read_json

try:  # optional: serialises entries several times faster than the json module
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None  # type: ignore[assignment]


@dataclass
class Detections:
    """Detections as arrays, in input order. `order` is the position in the results file."""

    img: np.ndarray  # [D] int64 image index into GroundTruth.img_ids
    cat: np.ndarray  # [D] int64 category index
    score: np.ndarray  # [D] float64
    bbox: np.ndarray  # [D, 4] float64 xywh (NaN when absent)
    has_bbox: np.ndarray  # [D] bool
    segm: list[Any] | None  # segmentation per ORIGINAL result (index with `order`), or None
    order: np.ndarray  # [D] int64


def load_results(results: str | Path | list[dict[str, Any]], gt: GroundTruth, iou_type: str) -> Detections:
    """Validate an LVIS results list (file or parsed) against the ground truth."""
    source = str(results) if isinstance(results, (str, Path)) else "<results list>"
    if isinstance(results, (str, Path)):
        results = read_json(results, "results")
    if not isinstance(results, list):
        raise input_error(source, "not an LVIS results file: expected a JSON list of detections")
    if not results:
        raise input_error(source, "results list is empty (no detections to evaluate)")
    n = len(results)
    img_raw = int_column(results, "image_id", source, "results")
    cat_raw = int_column(results, "category_id", source, "results")
    score = number_column(results, "score", source, "results")
    img = np.searchsorted(gt.img_ids, img_raw)
    img_c = np.minimum(img, gt.img_ids.shape[0] - 1)
    if not np.all(gt.img_ids[img_c] == img_raw):
        i = int(np.argmax(gt.img_ids[img_c] != img_raw))
        raise input_error(
            source,
            f"results[{i}].image_id {int(img_raw[i])} is not an image of the ground truth ({gt.source})",
        )
    cat = np.minimum(np.searchsorted(gt.cat_ids, cat_raw), gt.num_cats - 1)
    if not np.all(gt.cat_ids[cat] == cat_raw):
        unknown = sorted(set(cat_raw[gt.cat_ids[cat] != cat_raw].tolist()))
        shown = ", ".join(str(c) for c in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise input_error(
            source,
            f"field 'category_id': {len(unknown)} id(s) not in the ground truth's categories ({shown})",
        )
    has_bbox = np.fromiter(("bbox" in r for r in results), dtype=bool, count=n)
    bbox = np.full((n, 4), np.nan)
    if has_bbox.any():
        with_box = np.flatnonzero(has_bbox)
        bbox[has_bbox] = box_column([results[i]["bbox"] for i in with_box], with_box, source, "results")
    segm: list[Any] | None = None
    if iou_type == "bbox":
        if not has_bbox.all():
            i = int(np.argmax(~has_bbox))
            raise input_error(source, f"results[{i}] has no field 'bbox' (needed for bbox evaluation)")
    else:
        segm = check_results_segms(results, has_bbox, img_c, gt.heights, gt.widths, source)
    return Detections(
        img=img_c.astype(np.int64),
        cat=cat.astype(np.int64),
        score=score,
        bbox=bbox,
        has_bbox=has_bbox,
        segm=segm,
        order=np.arange(n, dtype=np.int64),
    )


def select(d: Detections, idx: np.ndarray) -> Detections:
    return Detections(
        img=d.img[idx],
        cat=d.cat[idx],
        score=d.score[idx],
        bbox=d.bbox[idx],
        has_bbox=d.has_bbox[idx],
        segm=d.segm,
        order=d.order[idx],
    )


def cap_per_image(d: Detections, max_dets: int) -> np.ndarray:
    """Indices of the detections kept by lvis-api's per-image cap (highest scores, ties: file order)."""
    if max_dets < 0:
        return np.arange(d.img.shape[0])
    o = np.lexsort((d.order, -d.score, d.img))
    img_sorted = d.img[o]
    start = np.searchsorted(img_sorted, img_sorted, side="left")
    rank = np.arange(o.shape[0]) - start
    counts = np.bincount(d.img, minlength=int(d.img.max()) + 1)
    # lvis-api only truncates images with more than max_dets detections, keeping the others whole.
    keep = (rank < max_dets) | (counts[img_sorted] <= max_dets)
    return np.sort(o[keep])


def cap_per_category(d: Detections, per_class: int) -> np.ndarray:
    """Indices of the `per_class` highest-scoring detections of each category (fixed AP)."""
    o = np.lexsort((d.order, -d.score, d.cat))
    cat_sorted = d.cat[o]
    start = np.searchsorted(cat_sorted, cat_sorted, side="left")
    rank = np.arange(o.shape[0]) - start
    return np.sort(o[rank < per_class])


# ---------------------------------------------------------------- writing


def _dumps_list() -> Callable[[Sequence[Any]], str]:
    """Compact JSON of a list (no spaces), the same bytes with orjson and with json."""
    if orjson is not None:
        return lambda entries: orjson.dumps(entries).decode("utf-8")
    return lambda entries: json.dumps(list(entries), separators=(",", ":"))  # pragma: no cover


class ResultsFile:
    """An LVIS results list being streamed to `tmp`, which becomes `target` (see `write_results`)."""

    def __init__(self, target: Path, tmp: Path, stream: IO[str]) -> None:
        self.target = target
        self.tmp = tmp
        self.count = 0
        self._f: IO[str] | None = stream
        self._dumps = _dumps_list()
        stream.write("[")

    def add(self, entries: Sequence[dict[str, Any]]) -> None:
        """Append `entries` (one JSON serialisation for all of them: the list's items, brackets cut)."""
        assert self._f is not None, "ResultsFile: add() after finish()"
        if not entries:
            return
        with os_errors_named(self.target):
            self._f.write(("," if self.count else "") + self._dumps(entries)[1:-1])
            self.count += len(entries)

    def finish(self) -> None:
        """Close the list and sync the file: `tmp` is then a complete results file."""
        if self._f is None:
            return
        with os_errors_named(self.target):
            self._f.write("]\n")
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        self._f = None


@contextmanager
def write_results(target: str | Path) -> Iterator[ResultsFile]:
    """A `ResultsFile` for `target`: committed (renamed onto `target`) when the block succeeds."""
    target = Path(target)
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as stream:
        results = ResultsFile(target, tmp, stream)
        yield results
        results.finish()


class PerClassTop:
    """The `per_class` highest-scoring entries of every category over a whole split (fixed AP:
    no per-image cap, 10,000 detections per category; Dave et al. 2021).

    Entries arrive image by image, uncapped; a category's list is pruned to its top `per_class`
    whenever it reaches twice that, so memory stays <= 2 x per_class entries per category. Ties in
    score keep the earlier entry (arrival order), so the result is deterministic.

    `bar(category_id)` is a score at or below which a NEW entry of that category can never be in
    the final top (-inf while the category has fewer than `per_class` entries), so a caller may
    skip such entries (and the masks they would need) without changing the result. Proof: the
    final top is the first `per_class` entries of the category in the order (score descending,
    arrival ascending). `bar` is the lowest score among `per_class` entries already held, so at
    least `per_class` held entries have score >= bar, and all of them arrived earlier than any
    new entry. A new entry with score <= bar is therefore preceded in that order by at least
    `per_class` entries, now and after any later arrival (entries are never removed except by
    falling out of the top), so it is never in the top. Leaving an entry that is not in the top
    out of the set changes neither which entries form the top nor their relative order (the
    order compares scores and arrival ranks only), so the drained output is the same, byte for
    byte. A new entry with score == bar is skipped too: a tie loses to the earlier entry."""

    def __init__(self, per_class: int) -> None:
        if per_class < 1:
            raise ApiMisuseError(f"PerClassTop: per_class must be >= 1, got {per_class}")
        self.per_class = int(per_class)
        self._by_class: dict[int, list[tuple[float, int, dict[str, Any]]]] = {}
        self._bar: dict[int, float] = {}
        self._seq = 0

    def add(self, entries: Sequence[dict[str, Any]]) -> None:
        for e in entries:
            cat = int(e["category_id"])
            bucket = self._by_class.setdefault(cat, [])
            bucket.append((-float(e["score"]), self._seq, e))
            self._seq += 1
            if len(bucket) >= 2 * self.per_class:
                self._prune(bucket)
                self._bar[cat] = -bucket[-1][0]  # the per_class-th best so far
            elif len(bucket) == self.per_class and cat not in self._bar:
                self._bar[cat] = -max(bucket)[0]  # the lowest of the first per_class entries

    def bar(self, category_id: int) -> float:
        """New entries of `category_id` scoring <= this can never enter its top (see the class doc)."""
        return self._bar.get(int(category_id), -math.inf)

    def _prune(self, bucket: list[tuple[float, int, dict[str, Any]]]) -> None:
        bucket.sort(key=lambda x: (x[0], x[1]))
        del bucket[self.per_class :]

    def drain_into(self, results: ResultsFile) -> None:
        """Write every category's top entries (categories by id, each by decreasing score) and forget
        them."""
        for cat in sorted(self._by_class):
            bucket = self._by_class[cat]
            self._prune(bucket)
            results.add([e for _, _, e in bucket])
        self._by_class.clear()
        self._bar.clear()
