"""LVIS evaluation: AP, AP50, AP75, APs/m/l, APr/c/f and AR, with lvis-api's exact semantics, fast.

The reference is lvis-api (`lvis` 0.5.3, `LVISEval`). This module re-implements the same
protocol with arrays instead of per-(image, category) Python loops and gives the same numbers to
floating-point identity (tests compare both on adversarial inputs). Semantics that are kept on
purpose, because they are what lvis-api computes:

- Categories: every category of the ground truth; AP averages over those with >= 1 non-ignored
  ground-truth instance in the evaluated split (others are -1 and excluded).
- At most `max_dets` (300) detections per image, the highest scores (ties: file order); `-1`
  removes the cap. Annotations and detections with area 0 are dropped (lvis-api's filter).
- Federated rules: a detection of category c in image I is evaluated only when c has ground truth
  in I or is in I's `neg_category_ids`; an unmatched detection of a category in I's
  `not_exhaustive_category_ids` is ignored (not a false positive).
- A detection's area (for the small/medium/large ranges) is its box area `w * h` whenever the
  result carries a `bbox`, even in segm evaluation, and its mask area otherwise.
- Greedy matching per IoU threshold in score order, never re-matching a ground truth; a match to
  an area-ignored ground truth is taken only when no regular one qualifies; ties in IoU go to
  the later ground truth in file order. Precision is made monotone from the right and read at
  101 recall points.

Fixed AP (Dave et al., 2021; docs/method.md §6): no per-image cap, the 10,000 highest-scoring
detections per category over the whole split, then the same protocol.

Speed comes from: one ground-truth index per file (cached in-process, keyed by path, size and
mtime), IoUs computed once per image, greedy matching vectorised across all (image, category)
groups at once (groups bucketed by size), accumulation per category on sorted arrays, and the
IoU + matching stage split over worker processes (fork) when `workers > 1`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import multiprocessing as mp
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from pcb_analysis.errors import PcbkitError, input_error

try:  # optional: parses LVIS-size results files several times faster than the json module
    import orjson
except ImportError:  # pragma: no cover - orjson is a declared dependency
    orjson = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

IOU_TYPES = ("segm", "bbox")
# Built exactly as lvis-api builds them (linspace, not arange) so that threshold look-ups agree.
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNGS = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_LABELS = ("all", "small", "medium", "large")
FREQ_LABELS = ("r", "c", "f")
MAX_DETS = 300
FIXED_AP_PER_CLASS = 10_000


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------
@dataclass
class GroundTruth:
    """Index of an LVIS annotation file, arrays over images (I), categories (C), annotations (G).

    Annotation arrays are ordered by (image, file order), the order lvis-api visits them.
    `key = image_index * C + category_index` identifies an (image, category) pair.
    """

    source: str
    img_ids: np.ndarray  # [I] int64, sorted
    heights: np.ndarray  # [I] int64
    widths: np.ndarray  # [I] int64
    cat_ids: np.ndarray  # [C] int64, sorted
    cat_freq: np.ndarray  # [C] '<U1' r/c/f
    neg_keys: np.ndarray  # sorted int64 keys of (image, neg category)
    nel_keys: np.ndarray  # sorted int64 keys of (image, not-exhaustive category)
    ann_img: np.ndarray  # [G] int64 image index
    ann_cat: np.ndarray  # [G] int64 category index
    ann_id: np.ndarray  # [G] int64
    ann_area: np.ndarray  # [G] float64
    ann_ignore: np.ndarray  # [G] bool (the optional "ignore" field)
    ann_bbox: np.ndarray  # [G, 4] float64 xywh
    ann_segm: list[Any]  # [G] raw segmentation (polygons or RLE)
    _rles: list[Any] | None = field(default=None, repr=False)

    @property
    def num_cats(self) -> int:
        return int(self.cat_ids.shape[0])

    @property
    def pos_keys(self) -> np.ndarray:
        return np.unique(self.ann_img * self.num_cats + self.ann_cat)

    def rles(self) -> list[Any]:
        """Compressed RLE of every annotation (computed once, then cached)."""
        if self._rles is None:
            out = []
            for g, segm in enumerate(self.ann_segm):
                h = int(self.heights[self.ann_img[g]])
                w = int(self.widths[self.ann_img[g]])
                out.append(_to_rle(segm, h, w))
            self._rles = out
        return self._rles


def _to_rle(segm: Any, h: int, w: int) -> Any:
    """lvis-api's `ann_to_rle`: polygons are merged into one RLE; uncompressed RLE is compressed."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


_GT_CACHE: dict[tuple[str, int, int], GroundTruth] = {}


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


def _read_json(path: Path, what: str) -> Any:
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
            raise input_error(path, f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
        except UnicodeDecodeError as err:
            raise input_error(path, "not a UTF-8 text file") from err


def load_ground_truth(gt: str | Path | dict[str, Any] | GroundTruth) -> GroundTruth:
    """Read and index an LVIS annotation file (or an already parsed dict); cached per file."""
    if isinstance(gt, GroundTruth):
        return gt
    if isinstance(gt, dict):
        return _index_ground_truth(gt, "<ground truth dict>")
    path = Path(gt)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise input_error(path, "ground-truth file not found") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    cached = _GT_CACHE.get(key)
    if cached is not None:
        return cached
    data = _read_json(path, "ground-truth")
    index = _index_ground_truth(data, str(path))
    _GT_CACHE.clear()  # keep one index: LVIS val is large
    _GT_CACHE[key] = index
    return index


def _field(rows: Sequence[dict[str, Any]], name: str, source: str, section: str) -> list[Any]:
    try:
        return [r[name] for r in rows]
    except KeyError:
        bad = next(i for i, r in enumerate(rows) if name not in r)
        raise input_error(source, f"not an LVIS file: {section}[{bad}] has no field '{name}'") from None
    except TypeError:
        raise input_error(source, f"not an LVIS file: '{section}' must be a list of objects") from None


def _index_ground_truth(data: Any, source: str) -> GroundTruth:
    if not isinstance(data, dict):
        raise input_error(source, "not an LVIS annotation file: top level is not a JSON object")
    for section in ("images", "annotations", "categories"):
        if section not in data:
            raise input_error(source, f"not an LVIS annotation file: missing field '{section}'")
        if not isinstance(data[section], list):
            raise input_error(source, f"not an LVIS annotation file: '{section}' is not a list")
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    if not images:
        raise input_error(source, "field 'images': empty split (no images)")
    if not cats:
        raise input_error(source, "field 'categories': no categories")

    cat_ids_raw = np.asarray(_field(cats, "id", source, "categories"), dtype=np.int64)
    freq_raw = _field(cats, "frequency", source, "categories")
    bad = sorted({str(f) for f in freq_raw if f not in FREQ_LABELS})
    if bad:
        raise input_error(source, f"field 'categories[].frequency': unknown value(s) {bad}; expected r, c or f")
    order = np.argsort(cat_ids_raw, kind="stable")
    cat_ids = cat_ids_raw[order]
    if np.unique(cat_ids).shape[0] != cat_ids.shape[0]:
        raise input_error(source, "field 'categories[].id': duplicate category ids")
    cat_freq = np.asarray(freq_raw)[order].astype("<U1")

    img_ids_raw = np.asarray(_field(images, "id", source, "images"), dtype=np.int64)
    heights_raw = np.asarray(_field(images, "height", source, "images"), dtype=np.int64)
    widths_raw = np.asarray(_field(images, "width", source, "images"), dtype=np.int64)
    neg_raw = _field(images, "neg_category_ids", source, "images")
    nel_raw = _field(images, "not_exhaustive_category_ids", source, "images")
    iorder = np.argsort(img_ids_raw, kind="stable")
    img_ids = img_ids_raw[iorder]
    if np.unique(img_ids).shape[0] != img_ids.shape[0]:
        raise input_error(source, "field 'images[].id': duplicate image ids")
    heights, widths = heights_raw[iorder], widths_raw[iorder]
    num_cats = int(cat_ids.shape[0])

    def keys_of(lists: list[Any], name: str) -> np.ndarray:
        img_idx: list[int] = []
        flat: list[int] = []
        for pos, lst in enumerate(lists):
            if not isinstance(lst, list):
                raise input_error(source, f"field 'images[{pos}].{name}' is not a list")
            flat.extend(lst)
            img_idx.extend([pos] * len(lst))
        if not flat:
            return np.zeros(0, dtype=np.int64)
        raw_pos = np.asarray(img_idx, dtype=np.int64)
        inv = np.empty_like(iorder)
        inv[iorder] = np.arange(iorder.shape[0])
        cidx = np.searchsorted(cat_ids, np.asarray(flat, dtype=np.int64))
        cidx = np.minimum(cidx, num_cats - 1)
        known = cat_ids[cidx] == np.asarray(flat, dtype=np.int64)
        # Unknown ids in these lists cannot match any detection (detections are checked against the
        # categories), so dropping them changes nothing.
        return np.unique(inv[raw_pos[known]] * num_cats + cidx[known])

    neg_keys = keys_of(neg_raw, "neg_category_ids")
    nel_keys = keys_of(nel_raw, "not_exhaustive_category_ids")

    if anns:
        a_img = np.asarray(_field(anns, "image_id", source, "annotations"), dtype=np.int64)
        a_cat = np.asarray(_field(anns, "category_id", source, "annotations"), dtype=np.int64)
        a_id = np.asarray(_field(anns, "id", source, "annotations"), dtype=np.int64)
        a_area = np.asarray(_field(anns, "area", source, "annotations"), dtype=np.float64)
        a_bbox = np.asarray(_field(anns, "bbox", source, "annotations"), dtype=np.float64).reshape(-1, 4)
        a_ign = np.asarray([bool(a.get("ignore", 0)) for a in anns], dtype=bool)
        a_segm = [a.get("segmentation") for a in anns]
    else:
        a_img = a_cat = a_id = np.zeros(0, dtype=np.int64)
        a_area = np.zeros(0)
        a_bbox = np.zeros((0, 4))
        a_ign = np.zeros(0, dtype=bool)
        a_segm = []
    img_pos = np.searchsorted(img_ids, a_img)
    img_pos_c = np.minimum(img_pos, img_ids.shape[0] - 1)
    if a_img.size and not np.all(img_ids[img_pos_c] == a_img):
        bad_i = int(np.argmax(img_ids[img_pos_c] != a_img))
        raise input_error(source, f"annotations[{bad_i}].image_id {int(a_img[bad_i])} is not in 'images'")
    cat_pos = np.minimum(np.searchsorted(cat_ids, a_cat), num_cats - 1)
    if a_cat.size and not np.all(cat_ids[cat_pos] == a_cat):
        bad_i = int(np.argmax(cat_ids[cat_pos] != a_cat))
        raise input_error(source, f"annotations[{bad_i}].category_id {int(a_cat[bad_i])} is not in 'categories'")
    if a_area.size and not np.all(np.isfinite(a_area)):
        bad_i = int(np.argmax(~np.isfinite(a_area)))
        raise input_error(source, f"annotations[{bad_i}].area is not finite")
    # lvis-api's get_ann_ids keeps 0 < area < inf only.
    keep = (a_area > 0) & (a_area < np.inf)
    # Visit order of lvis-api: images in sorted id order, annotations in file order within an image.
    order_a = np.lexsort((np.arange(a_img.shape[0]), img_pos_c))
    order_a = order_a[keep[order_a]]
    return GroundTruth(
        source=source,
        img_ids=img_ids,
        heights=heights,
        widths=widths,
        cat_ids=cat_ids,
        cat_freq=cat_freq,
        neg_keys=neg_keys,
        nel_keys=nel_keys,
        ann_img=img_pos_c[order_a].astype(np.int64),
        ann_cat=cat_pos[order_a].astype(np.int64),
        ann_id=a_id[order_a],
        ann_area=a_area[order_a],
        ann_ignore=a_ign[order_a],
        ann_bbox=a_bbox[order_a],
        ann_segm=[a_segm[i] for i in order_a],
    )


# --------------------------------------------------------------------------------------------
# Detections
# --------------------------------------------------------------------------------------------
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
        results = _read_json(Path(results), "results")
    if not isinstance(results, list):
        raise input_error(source, "not an LVIS results file: expected a JSON list of detections")
    if not results:
        raise input_error(source, "results list is empty (no detections to evaluate)")
    n = len(results)
    try:
        img_raw = np.fromiter((r["image_id"] for r in results), dtype=np.int64, count=n)
        cat_raw = np.fromiter((r["category_id"] for r in results), dtype=np.int64, count=n)
        score = np.fromiter((r["score"] for r in results), dtype=np.float64, count=n)
    except (KeyError, TypeError, ValueError):
        for i, r in enumerate(results):
            if not isinstance(r, dict):
                raise input_error(source, f"results[{i}] is not an object") from None
            for name in ("image_id", "category_id", "score"):
                if name not in r:
                    raise input_error(source, f"results[{i}] has no field '{name}'") from None
                if not isinstance(r[name], (int, float)) or isinstance(r[name], bool):
                    raise input_error(source, f"results[{i}].{name} is not a number") from None
        raise
    bad = ~np.isfinite(score)
    if bad.any():
        i = int(np.argmax(bad))
        raise input_error(source, f"results[{i}].score is {score[i]} (scores must be finite numbers)")
    img = np.searchsorted(gt.img_ids, img_raw)
    img_c = np.minimum(img, gt.img_ids.shape[0] - 1)
    if not np.all(gt.img_ids[img_c] == img_raw):
        i = int(np.argmax(gt.img_ids[img_c] != img_raw))
        raise input_error(
            source, f"results[{i}].image_id {int(img_raw[i])} is not an image of the ground truth ({gt.source})"
        )
    cat = np.minimum(np.searchsorted(gt.cat_ids, cat_raw), gt.num_cats - 1)
    if not np.all(gt.cat_ids[cat] == cat_raw):
        unknown = sorted(set(cat_raw[gt.cat_ids[cat] != cat_raw].tolist()))
        shown = ", ".join(str(c) for c in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise input_error(
            source, f"field 'category_id': {len(unknown)} id(s) not in the ground truth's categories ({shown})"
        )
    has_bbox = np.fromiter(("bbox" in r for r in results), dtype=bool, count=n)
    bbox = np.full((n, 4), np.nan)
    if has_bbox.any():
        try:
            bbox[has_bbox] = np.asarray([r["bbox"] for r in results if "bbox" in r], dtype=np.float64).reshape(-1, 4)
        except (TypeError, ValueError):
            raise input_error(source, "field 'bbox': every bbox must be four numbers [x, y, w, h]") from None
        if not np.all(np.isfinite(bbox[has_bbox])):
            i = int(np.argmax(has_bbox & ~np.all(np.isfinite(bbox), axis=1)))
            raise input_error(source, f"results[{i}].bbox has a non-finite value")
    segm: list[Any] | None = None
    if iou_type == "bbox":
        if not has_bbox.all():
            i = int(np.argmax(~has_bbox))
            raise input_error(source, f"results[{i}] has no field 'bbox' (needed for bbox evaluation)")
    else:
        segm = [r.get("segmentation") for r in results]
        missing = [i for i, s in enumerate(segm) if s is None and not has_bbox[i]]
        if missing:
            raise input_error(source, f"results[{missing[0]}] has neither 'segmentation' nor 'bbox'")
    return Detections(
        img=img_c.astype(np.int64),
        cat=cat.astype(np.int64),
        score=score,
        bbox=bbox,
        has_bbox=has_bbox,
        segm=segm,
        order=np.arange(n, dtype=np.int64),
    )


def _select(d: Detections, idx: np.ndarray) -> Detections:
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


# --------------------------------------------------------------------------------------------
# Evaluation core
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Work:
    """Per-worker inputs: dets and gts sorted by (image, category, ...) for a range of images."""

    iou_type: str
    gt: GroundTruth
    dets: Detections  # already filtered and sorted by (img, cat, -score, order)
    det_area: np.ndarray


_WORK: _Work | None = None  # set before forking workers (copy-on-write)


def _image_ious(work: _Work, di: np.ndarray, gi: np.ndarray) -> np.ndarray:
    """IoU [len(di), len(gi)] between detections `di` and ground truths `gi` of one image."""
    gt, dets = work.gt, work.dets
    if work.iou_type == "bbox":
        return np.asarray(mask_utils.iou(dets.bbox[di], gt.ann_bbox[gi], [0] * len(gi)), dtype=np.float64)
    rles = gt.rles()
    img = int(dets.img[di[0]])
    h, w = int(gt.heights[img]), int(gt.widths[img])
    d_rles = [_det_rle(dets, int(i), h, w) for i in di]
    g_rles = [rles[int(i)] for i in gi]
    return np.asarray(mask_utils.iou(d_rles, g_rles, [0] * len(gi)), dtype=np.float64)


def _det_rle(dets: Detections, i: int, h: int, w: int) -> Any:
    assert dets.segm is not None
    s = dets.segm[int(dets.order[i])]
    if s is None:  # lvis-api turns a box-only result into a box polygon
        x, y, bw, bh = dets.bbox[i]
        s = [[x, y, x, y + bh, x + bw, y + bh, x + bw, y]]
    return _to_rle(s, h, w)


def _match_range(img_lo: int, img_hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy matching for the images [img_lo, img_hi).

    Returns (det_index [M], matched [M, T, A] bool, matched_ignored [M, T, A] bool) for the
    detections that share an (image, category) with >= 1 ground truth; all other detections are
    unmatched.
    """
    work = _WORK
    assert work is not None
    gt, dets = work.gt, work.dets
    C = gt.num_cats
    T, A = len(IOU_THRS), len(AREA_RNGS)

    d_lo, d_hi = np.searchsorted(dets.img, [img_lo, img_hi])
    g_lo, g_hi = np.searchsorted(gt.ann_img, [img_lo, img_hi])
    d_key = dets.img[d_lo:d_hi] * C + dets.cat[d_lo:d_hi]
    g_key = gt.ann_img[g_lo:g_hi] * C + gt.ann_cat[g_lo:g_hi]
    # Groups (image, category) that have both detections and ground truth.
    both = np.intersect1d(np.unique(d_key), np.unique(g_key), assume_unique=True)
    if both.size == 0:
        empty = np.zeros((0, T, A), dtype=bool)
        return np.zeros(0, dtype=np.int64), empty, empty.copy()
    d_start = d_lo + np.searchsorted(d_key, both, side="left")
    d_cnt = d_lo + np.searchsorted(d_key, both, side="right") - d_start
    # Ground truth is in (image, file order); make it (image, category, file order) for slicing.
    g_order = g_lo + np.lexsort((np.arange(g_hi - g_lo), g_key))
    g_key_sorted = g_key[g_order - g_lo]
    g_start = np.searchsorted(g_key_sorted, both, side="left")
    g_cnt = np.searchsorted(g_key_sorted, both, side="right") - g_start

    # IoUs per image, then scattered into per-group padded blocks (bucketed by size).
    n_groups = both.shape[0]
    group_img = both // C
    iou_blocks: list[np.ndarray] = [np.zeros(0)] * n_groups
    img_bounds = np.flatnonzero(np.diff(group_img)) + 1
    for grp in np.split(np.arange(n_groups), img_bounds):
        di = np.concatenate([np.arange(d_start[g], d_start[g] + d_cnt[g]) for g in grp])
        gi_local = np.concatenate([np.arange(g_start[g], g_start[g] + g_cnt[g]) for g in grp])
        gi = g_order[gi_local]
        ious = _image_ious(work, di, gi)
        r0 = c0 = 0
        for g in grp:
            nd, ng = int(d_cnt[g]), int(g_cnt[g])
            iou_blocks[g] = ious[r0 : r0 + nd, c0 : c0 + ng]
            r0 += nd
            c0 += ng

    out_idx: list[np.ndarray] = []
    out_m: list[np.ndarray] = []
    out_ig: list[np.ndarray] = []
    thr = np.minimum(IOU_THRS, 1 - 1e-10)[None, :, None, None]  # [1, T, 1, 1]
    lo = np.array([r[0] for r in AREA_RNGS])
    hi = np.array([r[1] for r in AREA_RNGS])
    d_bucket = np.ceil(np.log2(np.maximum(d_cnt, 1))).astype(np.int64)
    g_bucket = np.ceil(np.log2(np.maximum(g_cnt, 1))).astype(np.int64)
    bucket_key = d_bucket * 64 + g_bucket
    for bk in np.unique(bucket_key):
        members = np.flatnonzero(bucket_key == bk)
        members = members[np.argsort(-d_cnt[members], kind="stable")]  # most detections first
        G = members.shape[0]
        Dp, Np = int(d_cnt[members].max()), int(g_cnt[members].max())
        iou = np.full((G, Dp, Np), -1.0)
        gt_ig = np.ones((G, A, Np), dtype=bool)
        pad = np.ones((G, Np), dtype=bool)
        # lvis-api records the matched gt id and tests it against 0, so a gt with id 0 never counts as a match.
        gid_nonzero = np.zeros((G, Np), dtype=bool)
        for r, g in enumerate(members):
            nd, ng = int(d_cnt[g]), int(g_cnt[g])
            iou[r, :nd, :ng] = iou_blocks[g]
            gsel = g_order[g_start[g] : g_start[g] + ng]
            area = gt.ann_area[gsel]
            gt_ig[r, :, :ng] = gt.ann_ignore[gsel][None, :] | (area[None, :] < lo[:, None]) | (area[None, :] > hi[:, None])
            pad[r, :ng] = False
            gid_nonzero[r, :ng] = gt.ann_id[gsel] != 0
        gt_taken = np.broadcast_to(pad[:, None, None, :], (G, T, A, Np)).copy()
        det_m = np.zeros((G, Dp, T, A), dtype=bool)
        det_ig = np.zeros((G, Dp, T, A), dtype=bool)
        active_counts = d_cnt[members]
        ig4 = gt_ig[:, None, :, :]  # [G, 1, A, Np]
        for k in range(Dp):
            n = int(np.count_nonzero(active_counts > k))
            v = iou[:n, k, :][:, None, None, :]  # [n, 1, 1, Np]
            cand = (v >= thr) & ~gt_taken[:n]  # [n, T, A, Np]
            regular = cand & ~ig4[:n]
            use_regular = regular.any(axis=-1, keepdims=True)
            sel = np.where(use_regular, regular, cand & ig4[:n])
            found = sel.any(axis=-1)  # [n, T, A]
            if not found.any():
                continue
            vv = np.where(sel, v, -2.0)
            # Last index of the maximum (lvis-api replaces on equal IoU).
            best = Np - 1 - np.argmax(vv[..., ::-1], axis=-1)  # [n, T, A]
            rr, tt, aa = np.nonzero(found)
            bb = best[rr, tt, aa]
            gt_taken[rr, tt, aa, bb] = True
            det_m[rr, k, tt, aa] = gid_nonzero[rr, bb]
            det_ig[rr, k, tt, aa] = gt_ig[rr, aa, bb]
        for r, g in enumerate(members):
            nd = int(d_cnt[g])
            out_idx.append(np.arange(d_start[g], d_start[g] + nd))
            out_m.append(det_m[r, :nd])
            out_ig.append(det_ig[r, :nd])
    return np.concatenate(out_idx), np.concatenate(out_m), np.concatenate(out_ig)


def _run_matching(work: _Work, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """matched [D, T, A] and matched-to-ignored [D, T, A] for every (sorted) detection."""
    global _WORK
    D = work.dets.img.shape[0]
    T, A = len(IOU_THRS), len(AREA_RNGS)
    matched = np.zeros((D, T, A), dtype=bool)
    matched_ig = np.zeros((D, T, A), dtype=bool)
    num_imgs = int(work.gt.img_ids.shape[0])
    _WORK = work
    try:
        use_pool = workers > 1 and "fork" in mp.get_all_start_methods() and num_imgs >= 2 * workers
        if use_pool:
            # Split images so that each chunk holds about the same number of detections.
            per_img = np.bincount(work.dets.img, minlength=num_imgs)
            cum = np.cumsum(per_img)
            n_chunks = workers * 4
            cuts = np.searchsorted(cum, np.linspace(0, cum[-1], n_chunks + 1)[1:-1])
            bounds = np.unique(np.concatenate([[0], cuts, [num_imgs]]))
            ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
            with mp.get_context("fork").Pool(workers) as pool:
                parts = pool.starmap(_match_range, ranges)
        else:
            parts = [_match_range(0, num_imgs)]
    finally:
        _WORK = None
    for idx, m, ig in parts:
        matched[idx] = m
        matched_ig[idx] = ig
    return matched, matched_ig


def _accumulate(
    gt: GroundTruth, dets: Detections, det_area: np.ndarray, matched: np.ndarray, matched_ig: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """precision [T, R, C, A] and recall [T, C, A], -1 where a category has no ground truth."""
    C = gt.num_cats
    T, R, A = len(IOU_THRS), len(REC_THRS), len(AREA_RNGS)
    precision = -np.ones((T, R, C, A))
    recall = -np.ones((T, C, A))
    lo = np.array([r[0] for r in AREA_RNGS])
    hi = np.array([r[1] for r in AREA_RNGS])

    # Non-ignored ground truth per (category, area range).
    g_ok = ~gt.ann_ignore[:, None] & (gt.ann_area[:, None] >= lo[None, :]) & (gt.ann_area[:, None] <= hi[None, :])
    num_gt = np.zeros((C, A), dtype=np.int64)
    for a in range(A):
        num_gt[:, a] = np.bincount(gt.ann_cat[g_ok[:, a]], minlength=C)

    # Ignore flags of detections: matched to an ignored gt, or unmatched and (out of the area range
    # or of a not-exhaustive category in that image).
    d_key = dets.img * C + dets.cat
    nel = np.isin(d_key, gt.nel_keys)
    out_rng = (det_area[:, None] < lo[None, :]) | (det_area[:, None] > hi[None, :])  # [D, A]
    unmatched_ig = (out_rng | nel[:, None])[:, None, :] & ~matched  # [D, T, A]
    ignored = matched_ig | unmatched_ig
    tps = matched & ~ignored
    fps = ~matched & ~ignored

    # lvis-api's order per category: score descending, ties by image then by in-image order.
    o = np.lexsort((dets.order, dets.img, -dets.score, dets.cat))
    cats_sorted = dets.cat[o]
    starts = np.searchsorted(cats_sorted, np.arange(C), side="left")
    ends = np.searchsorted(cats_sorted, np.arange(C), side="right")
    eps = np.spacing(1)
    for c in range(C):
        sel = o[starts[c] : ends[c]]
        for a in range(A):
            ng = int(num_gt[c, a])
            if ng == 0:
                continue
            nd = sel.shape[0]
            if nd == 0:
                precision[:, :, c, a] = 0.0
                recall[:, c, a] = 0.0
                continue
            tp = np.cumsum(tps[sel, :, a].T, axis=1).astype(np.float64)  # [T, nd]
            fp = np.cumsum(fps[sel, :, a].T, axis=1).astype(np.float64)
            rc = tp / ng
            pr = tp / (fp + tp + eps)
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
            recall[:, c, a] = rc[:, -1]
            for t in range(T):
                ins = np.searchsorted(rc[t], REC_THRS, side="left")
                inside = ins < nd
                row = np.zeros(R)
                row[inside] = pr[t, ins[inside]]
                precision[t, :, c, a] = row
    return precision, recall


def _summarize(precision: np.ndarray, recall: np.ndarray, gt: GroundTruth, max_dets: int) -> dict[str, float]:
    def mean(s: np.ndarray) -> float:
        v = s[s > -1]
        return float(np.mean(v)) if v.size else -1.0

    out: dict[str, float] = {}
    a_all = AREA_LABELS.index("all")
    out["AP"] = mean(precision[:, :, :, a_all])
    for thr, name in ((0.50, "AP50"), (0.75, "AP75")):
        tidx = np.where(thr == IOU_THRS)[0]
        out[name] = mean(precision[tidx][:, :, :, a_all])
    for lbl, name in (("small", "APs"), ("medium", "APm"), ("large", "APl")):
        out[name] = mean(precision[:, :, :, AREA_LABELS.index(lbl)])
    for f in FREQ_LABELS:
        cats = np.flatnonzero(gt.cat_freq == f)
        out[f"AP{f}"] = mean(precision[:, :, cats, a_all])
    tag = max_dets if max_dets >= 0 else "all"
    out[f"AR@{tag}"] = mean(recall[:, :, a_all])
    for lbl in ("small", "medium", "large"):
        out[f"AR{lbl[0]}@{tag}"] = mean(recall[:, :, AREA_LABELS.index(lbl)])
    return out


@dataclass(frozen=True)
class EvalResult:
    """Summary metrics plus the raw precision [T, R, C, A] and recall [T, C, A] arrays."""

    metrics: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    iou_type: str


def default_workers() -> int:
    """Worker processes for the matching stage: the CPUs this process may use, at most 8; 1 (no
    fork) inside a torch.distributed process group, whose communication threads may hold locks
    that a forked child then waits on forever (seen with gloo in the 2-process training test)."""
    torch = sys.modules.get("torch")  # never imported here: pcb_analysis runs without torch
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def evaluate_full(
    gt: str | Path | dict[str, Any] | GroundTruth,
    results: str | Path | list[dict[str, Any]] | Detections,
    iou_type: str = "segm",
    *,
    max_dets: int = MAX_DETS,
    fixed: bool = False,
    fixed_per_class: int = FIXED_AP_PER_CLASS,
    workers: int | None = None,
) -> EvalResult:
    """Evaluate like lvis-api; `fixed=True` gives fixed AP (10,000 per class, no per-image cap)."""
    if iou_type not in IOU_TYPES:
        raise PcbkitError(f"iou_type must be one of {', '.join(IOU_TYPES)}, not {iou_type!r}")
    with gc_paused():
        return _evaluate(gt, results, iou_type, max_dets, fixed, fixed_per_class, workers)


def _evaluate(
    gt: str | Path | dict[str, Any] | GroundTruth,
    results: str | Path | list[dict[str, Any]] | Detections,
    iou_type: str,
    max_dets: int,
    fixed: bool,
    fixed_per_class: int,
    workers: int | None,
) -> EvalResult:
    index = load_ground_truth(gt)
    dets = results if isinstance(results, Detections) else load_results(results, index, iou_type)
    if fixed:
        max_dets = -1
        dets = _select(dets, cap_per_category(dets, fixed_per_class))
    dets = _select(dets, cap_per_image(dets, max_dets))

    C = index.num_cats
    # Federated filter: category present in the image, or verified absent (negative).
    d_key = dets.img * C + dets.cat
    allowed = np.union1d(index.pos_keys, index.neg_keys)
    dets = _select(dets, np.flatnonzero(np.isin(d_key, allowed)))

    # Detection area for the area ranges (box area when a box is given, as lvis-api does).
    det_area = _det_areas(dets, index, iou_type)
    keep = (det_area > 0) & (det_area < np.inf)
    dets = _select(dets, np.flatnonzero(keep))
    det_area = det_area[keep]

    # Sort by (image, category, -score, file order): the order lvis-api evaluates in.
    o = np.lexsort((dets.order, -dets.score, dets.cat, dets.img))
    dets = _select(dets, o)
    det_area = det_area[o]

    work = _Work(iou_type=iou_type, gt=index, dets=dets, det_area=det_area)
    if iou_type == "segm":
        index.rles()  # build once in the parent so forked workers share it
    matched, matched_ig = _run_matching(work, default_workers() if workers is None else workers)
    precision, recall = _accumulate(index, dets, det_area, matched, matched_ig)
    return EvalResult(_summarize(precision, recall, index, max_dets), precision, recall, iou_type)


def _det_areas(dets: Detections, gt: GroundTruth, iou_type: str) -> np.ndarray:
    area = dets.bbox[:, 2] * dets.bbox[:, 3]
    if iou_type == "segm" and not dets.has_bbox.all():
        assert dets.segm is not None
        for i in np.flatnonzero(~dets.has_bbox):
            img = int(dets.img[i])
            rle = _to_rle(dets.segm[int(dets.order[i])], int(gt.heights[img]), int(gt.widths[img]))
            area[i] = float(mask_utils.area(rle))
    return area


def evaluate(
    gt: str | Path | dict[str, Any] | GroundTruth,
    results: str | Path | list[dict[str, Any]],
    iou_type: str = "segm",
    *,
    max_dets: int = MAX_DETS,
    fixed: bool = False,
    workers: int | None = None,
) -> dict[str, float]:
    """LVIS metrics for one IoU type: AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs/m/l@300.

    gt: an LVIS annotation file (or its parsed dict); results: an LVIS results file or list
    (`image_id`, `category_id`, `score`, and `bbox` [x, y, w, h] and/or `segmentation` RLE).
    `fixed=True` computes fixed AP (top 10,000 per class, no per-image cap).
    """
    return evaluate_full(gt, results, iou_type, max_dets=max_dets, fixed=fixed, workers=workers).metrics


def nan_to_none(metrics: dict[str, float]) -> dict[str, float | None]:
    """JSON-friendly copy: NaN becomes None."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
