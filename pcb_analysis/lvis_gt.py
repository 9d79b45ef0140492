"""Ground truth of an LVIS split, indexed as arrays for the evaluator (docs/evaluation.md §2).

I images (sorted by id), C categories (sorted by id), G annotations kept by lvis-api's filter
(0 < area < inf), ordered by (image, file order): the order lvis-api visits them. An (image,
category) pair is the key `image_index * C + category_index`; `neg_keys` / `nel_keys` hold the
pairs of each image's `neg_category_ids` / `not_exhaustive_category_ids`. `load_ground_truth`
reads a file with `pcb_analysis.lvis_json.read_lvis_json`, checks its fields with
`pcb_analysis.lvis_checks` and keeps the last index in memory (keyed by path, size and mtime:
LVIS val takes seconds to index). Masks are decoded to RLE lazily, once (`GroundTruth.rles`),
which checks every segmentation first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from pcb_analysis.errors import input_error
from pcb_analysis.lvis_checks import (
    box_column,
    column,
    int_column,
    is_integral,
    number_column,
    segm_problem,
    unique_ids,
)
from pcb_analysis.lvis_json import check_lvis_sections, read_lvis_json

FREQ_LABELS = ("r", "c", "f")

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
    ann_pos: np.ndarray | None = None  # [G] int64 position in the file's 'annotations' (for messages)
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
                problem = "is missing (segm needs it)" if segm is None else segm_problem(segm, h, w)
                if problem is not None:
                    pos = int(self.ann_pos[g]) if self.ann_pos is not None else g
                    where = f"annotations[{pos}] (id {int(self.ann_id[g])})"
                    raise input_error(self.source, f"{where}: field 'segmentation' {problem}")
                out.append(to_rle(segm, h, w))
            self._rles = out
        return self._rles


def to_rle(segm: Any, h: int, w: int) -> Any:
    """lvis-api's `ann_to_rle`: polygons are merged into one RLE; uncompressed RLE is compressed."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    if isinstance(segm.get("counts"), list):
        return mask_utils.frPyObjects(segm, h, w)
    return segm


_GT_CACHE: dict[tuple[str, int, int], GroundTruth] = {}



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
    data = read_lvis_json(path, "ground-truth")
    index = _index_ground_truth(data, str(path))
    _GT_CACHE.clear()  # keep one index: LVIS val is large
    _GT_CACHE[key] = index
    return index


def _index_ground_truth(data: Any, source: str) -> GroundTruth:
    data = check_lvis_sections(data, source)
    images, anns, cats = data["images"], data["annotations"], data["categories"]
    if not images:
        raise input_error(source, "field 'images': empty split (no images)")
    if not cats:
        raise input_error(source, "field 'categories': no categories")

    cat_ids_raw = int_column(cats, "id", source, "categories")
    unique_ids(cat_ids_raw, source, "categories", "category")
    freq_raw = column(cats, "frequency", source, "categories")
    bad = sorted({str(f) for f in freq_raw if f not in FREQ_LABELS})
    if bad:
        raise input_error(
            source, f"field 'categories[].frequency': unknown value(s) {bad}; expected r, c or f"
        )
    order = np.argsort(cat_ids_raw, kind="stable")
    cat_ids = cat_ids_raw[order]
    cat_freq = np.asarray(freq_raw)[order].astype("<U1")

    img_ids_raw = int_column(images, "id", source, "images")
    unique_ids(img_ids_raw, source, "images", "image")
    heights_raw = int_column(images, "height", source, "images")
    widths_raw = int_column(images, "width", source, "images")
    for name, values in (("height", heights_raw), ("width", widths_raw)):
        if (values < 1).any():
            i = int(np.argmax(values < 1))
            raise input_error(source, f"images[{i}].{name} is {int(values[i])} (must be >= 1)")
    neg_raw = column(images, "neg_category_ids", source, "images")
    nel_raw = column(images, "not_exhaustive_category_ids", source, "images")
    iorder = np.argsort(img_ids_raw, kind="stable")
    img_ids = img_ids_raw[iorder]
    heights, widths = heights_raw[iorder], widths_raw[iorder]
    num_cats = int(cat_ids.shape[0])

    def keys_of(lists: list[Any], name: str) -> np.ndarray:
        img_idx: list[int] = []
        flat: list[int] = []
        for pos, lst in enumerate(lists):
            if not isinstance(lst, list):
                raise input_error(source, f"field 'images[{pos}].{name}' is not a list")
            if not set(map(type, lst)) <= {int} and not all(map(is_integral, lst)):
                bad_id = next(c for c in lst if not is_integral(c))
                raise input_error(source, f"images[{pos}].{name} holds {bad_id!r}, not an integer id")
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
        a_img = int_column(anns, "image_id", source, "annotations")
        a_cat = int_column(anns, "category_id", source, "annotations")
        a_id = int_column(anns, "id", source, "annotations")
        unique_ids(a_id, source, "annotations", "annotation")
        a_area = number_column(anns, "area", source, "annotations")
        a_bbox = box_column(column(anns, "bbox", source, "annotations"), np.arange(len(anns)), source,
                            "annotations")
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
        raise input_error(
            source, f"annotations[{bad_i}].category_id {int(a_cat[bad_i])} is not in 'categories'"
        )
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
        ann_pos=order_a.astype(np.int64),
    )
