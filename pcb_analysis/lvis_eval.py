"""LVIS evaluation with lvis-api's exact semantics, fast: AP, AP50, AP75, APs/m/l, APr/c/f, AR.

The reference is lvis-api (`lvis` 0.5.3, `LVISEval`); this module gives the same numbers to
floating-point identity (tests compare both on adversarial inputs). The rules it keeps on purpose
(federated negatives and not-exhaustive lists, 300 detections per image, box area for the area
ranges, greedy matching order, 101-point precision) are listed in docs/evaluation.md §1; fixed AP
(10,000 per class, no per-image cap) in §4 and docs/method.md §6. Shapes: precision [T, R, C, A]
and recall [T, C, A] with T = 10 IoU thresholds, R = 101 recall points, C categories, A = 4 area
ranges; -1 where a category has no ground truth. Ground truth: `pcb_analysis.lvis_gt`;
detections: `pcb_analysis.lvis_results`; both re-exported here. Speed notes: docs/evaluation.md §5.
The two stages (matching, accumulation) live in `pcb_analysis.lvis_protocol`; the bootstrap over
images (`evaluate_resamples`, `bootstrap`, `compare`) in `pcb_analysis.bootstrap`; both re-exported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcb_analysis.bootstrap import bootstrap, compare, evaluate_resamples
from pcb_analysis.errors import ApiMisuseError
from pcb_analysis.lvis_gt import FREQ_LABELS, GroundTruth, load_ground_truth
from pcb_analysis.lvis_json import gc_paused
from pcb_analysis.lvis_protocol import (
    AREA_LABELS,
    AREA_RNGS,
    FIXED_AP_PER_CLASS,
    IOU_THRS,
    IOU_TYPES,
    LVIS_V05_CLASSES,
    MAX_DETS,
    REC_THRS,
    Matches,
    accumulate,
    check_eval_args,
    default_workers,
    det_flags,
    match_all,
    match_detections,
    summarize,
)
from pcb_analysis.lvis_results import Detections, cap_per_category, cap_per_image, load_results

__all__ = [
    "bootstrap",
    "compare",
    "evaluate_resamples",
    "AREA_LABELS",
    "AREA_RNGS",
    "FIXED_AP_PER_CLASS",
    "FREQ_LABELS",
    "IOU_THRS",
    "IOU_TYPES",
    "MAX_DETS",
    "REC_THRS",
    "Detections",
    "EvalResult",
    "GroundTruth",
    "Matches",
    "cap_per_category",
    "cap_per_image",
    "default_workers",
    "det_flags",
    "evaluate",
    "evaluate_full",
    "gc_paused",
    "load_ground_truth",
    "load_results",
    "lvis_equivalent_cap",
    "match_detections",
    "nan_to_none",
    "summarize",
]


def lvis_equivalent_cap(num_classes: int, max_dets: int = MAX_DETS) -> int:
    """The per-image cap that gives K classes LVIS's per-class budget: round(300 K / 1230), at least 1
    (12 for K = 48). 300 K / 1230 = 10 K / 41 is never halfway between integers, so rounding has no
    tie to break. docs/evaluation.md §4."""
    if num_classes < 1:
        raise ApiMisuseError(f"lvis_equivalent_cap: num_classes must be >= 1, got {num_classes}")
    return max(1, round(max_dets * num_classes / LVIS_V05_CLASSES))


@dataclass(frozen=True)
class EvalResult:
    """Summary metrics plus the raw precision [T, R, C, A] and recall [T, C, A] arrays."""

    metrics: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    iou_type: str


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
    check_eval_args(iou_type, max_dets, "evaluate")
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
    m = match_all(gt, results, iou_type, max_dets, fixed, fixed_per_class, workers)
    precision, recall = accumulate(m.gt, m.dets, m.det_area, m.matched, m.matched_ig)
    return EvalResult(summarize(precision, recall, m.gt, m.max_dets), precision, recall, iou_type)


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
    `max_dets`: detections kept per image (the highest scores, ties by file order), lvis-api's
    `params.max_dets`; -1 keeps all. `fixed=True` computes fixed AP (top 10,000 per class, no
    per-image cap; `max_dets` is then ignored).
    """
    return evaluate_full(gt, results, iou_type, max_dets=max_dets, fixed=fixed, workers=workers).metrics


def nan_to_none(metrics: dict[str, float]) -> dict[str, float | None]:
    """JSON-friendly copy: NaN becomes None."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
