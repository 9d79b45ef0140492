"""The two stages of LVIS evaluation, exactly as lvis-api runs them: matching and accumulation.

Matching: IoUs once per image and greedy matching per (image, category) with lvis-api's order and
tie rules, in forked worker processes over image ranges (`default_workers`: none inside a process
group or while other threads run). Accumulation: interpolated precision [T, R, C, A] and recall
[T, C, A] (T = 10 IoU thresholds, R = 101 recall points, C categories, A = 4 area ranges; -1 where
a category has no ground truth) and the summary metrics. `pcb_analysis.lvis_eval` composes them
into `evaluate`; `pcb_analysis.bootstrap` re-accumulates one matching per resample. Rules kept on
purpose: docs/evaluation.md §1; speed notes: §5.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from pcb_analysis.errors import ApiMisuseError, PcbkitError
from pcb_analysis.lvis_gt import FREQ_LABELS, GroundTruth, load_ground_truth, to_rle
from pcb_analysis.lvis_json import gc_paused
from pcb_analysis.lvis_results import Detections, cap_per_category, cap_per_image, load_results, select

IOU_TYPES = ("segm", "bbox")
# Built exactly as lvis-api builds them (linspace, not arange) so that threshold look-ups agree.
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RNGS = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_LABELS = ("all", "small", "medium", "large")
MAX_DETS = 300
FIXED_AP_PER_CLASS = 10_000
LVIS_V05_CLASSES = 1230  # the class count of LVIS v0.5, on which the paper's 300-per-image numbers are


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
    return to_rle(s, h, w)


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
        # lvis-api records the matched gt id and tests it against 0, so a gt with id 0 never counts
        # as a match.
        gid_nonzero = np.zeros((G, Np), dtype=bool)
        for r, g in enumerate(members):
            nd, ng = int(d_cnt[g]), int(g_cnt[g])
            iou[r, :nd, :ng] = iou_blocks[g]
            gsel = g_order[g_start[g] : g_start[g] + ng]
            area = gt.ann_area[gsel]
            gt_ig[r, :, :ng] = (
                gt.ann_ignore[gsel][None, :] | (area[None, :] < lo[:, None]) | (area[None, :] > hi[:, None])
            )
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


def accumulate(
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
    g_ok = (
        ~gt.ann_ignore[:, None]
        & (gt.ann_area[:, None] >= lo[None, :])
        & (gt.ann_area[:, None] <= hi[None, :])
    )
    num_gt = np.zeros((C, A), dtype=np.int64)
    for a in range(A):
        num_gt[:, a] = np.bincount(gt.ann_cat[g_ok[:, a]], minlength=C)

    tps, fps = det_flags(gt, dets, det_area, matched, matched_ig)

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


def det_flags(
    gt: GroundTruth, dets: Detections, det_area: np.ndarray, matched: np.ndarray, matched_ig: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(true positive [D, T, A], false positive [D, T, A]) flags; a detection that is neither is
    ignored: matched to an ignored gt, or unmatched and (out of the area range or of a
    not-exhaustive category in its image)."""
    lo = np.array([r[0] for r in AREA_RNGS])
    hi = np.array([r[1] for r in AREA_RNGS])
    d_key = dets.img * gt.num_cats + dets.cat
    nel = np.isin(d_key, gt.nel_keys)
    out_rng = (det_area[:, None] < lo[None, :]) | (det_area[:, None] > hi[None, :])  # [D, A]
    unmatched_ig = (out_rng | nel[:, None])[:, None, :] & ~matched  # [D, T, A]
    ignored = matched_ig | unmatched_ig
    return matched & ~ignored, ~matched & ~ignored


def summarize(precision: np.ndarray, recall: np.ndarray, gt: GroundTruth, max_dets: int) -> dict[str, float]:
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



def _other_threads() -> bool:
    """Python threads besides the main one are running (tqdm's idle monitor thread excepted)."""
    return any(
        t is not threading.main_thread() and type(t).__name__ != "TMonitor" for t in threading.enumerate()
    )


def default_workers() -> int:
    """Worker processes for the matching stage: the CPUs this process may use, at most 8; 1 (no
    fork) inside a torch.distributed process group or while other threads run (e.g. TensorBoard's
    writer during training): a thread may hold a lock at the moment of the fork, and the forked
    child then waits on it forever (seen with gloo in the 2-process training test, and with the
    event writer in a training run's mid-run evaluation)."""
    torch = sys.modules.get("torch")  # never imported here: pcb_analysis runs without torch
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return 1
    if _other_threads():
        return 1
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


@dataclass(frozen=True)
class Matches:
    """The per-detection matching of one evaluation (computed once; pcb_analysis.bootstrap
    re-accumulates it per resample). `dets` are filtered, capped and sorted by (image, category,
    -score, file order); matched / matched_ig are [D, T, A]."""

    gt: GroundTruth
    dets: Detections
    det_area: np.ndarray
    matched: np.ndarray
    matched_ig: np.ndarray
    max_dets: int


def check_eval_args(iou_type: str, max_dets: int, caller: str) -> None:
    """The arguments every evaluation entry point checks: a known IoU type, a cap >= 1 or -1."""
    if iou_type not in IOU_TYPES:
        raise PcbkitError(f"iou_type must be one of {', '.join(IOU_TYPES)}, not {iou_type!r}")
    if max_dets == 0 or max_dets < -1:
        raise ApiMisuseError(f"{caller}: max_dets must be >= 1, or -1 for no cap (got {max_dets})")


def match_detections(
    gt: str | Path | dict[str, Any] | GroundTruth,
    results: str | Path | list[dict[str, Any]] | Detections,
    iou_type: str = "segm",
    *,
    max_dets: int = MAX_DETS,
    workers: int | None = None,
) -> Matches:
    """The matching stage of `evaluate` alone (IoUs and greedy matching per image and category)."""
    check_eval_args(iou_type, max_dets, "match_detections")
    with gc_paused():
        return match_all(gt, results, iou_type, max_dets, False, FIXED_AP_PER_CLASS, workers)


def match_all(
    gt: str | Path | dict[str, Any] | GroundTruth,
    results: str | Path | list[dict[str, Any]] | Detections,
    iou_type: str,
    max_dets: int,
    fixed: bool,
    fixed_per_class: int,
    workers: int | None,
) -> Matches:
    index = load_ground_truth(gt)
    dets = results if isinstance(results, Detections) else load_results(results, index, iou_type)
    if fixed:
        max_dets = -1
        dets = select(dets, cap_per_category(dets, fixed_per_class))
    dets = select(dets, cap_per_image(dets, max_dets))

    C = index.num_cats
    # Federated filter: category present in the image, or verified absent (negative).
    d_key = dets.img * C + dets.cat
    allowed = np.union1d(index.pos_keys, index.neg_keys)
    dets = select(dets, np.flatnonzero(np.isin(d_key, allowed)))

    # Detection area for the area ranges (box area when a box is given, as lvis-api does).
    det_area = _det_areas(dets, index, iou_type)
    keep = (det_area > 0) & (det_area < np.inf)
    dets = select(dets, np.flatnonzero(keep))
    det_area = det_area[keep]

    # Sort by (image, category, -score, file order): the order lvis-api evaluates in.
    o = np.lexsort((dets.order, -dets.score, dets.cat, dets.img))
    dets = select(dets, o)
    det_area = det_area[o]

    work = _Work(iou_type=iou_type, gt=index, dets=dets, det_area=det_area)
    if iou_type == "segm":
        index.rles()  # build once in the parent so forked workers share it
    matched, matched_ig = _run_matching(work, default_workers() if workers is None else workers)
    return Matches(index, dets, det_area, matched, matched_ig, max_dets)


def _det_areas(dets: Detections, gt: GroundTruth, iou_type: str) -> np.ndarray:
    area = dets.bbox[:, 2] * dets.bbox[:, 3]
    if iou_type == "segm" and not dets.has_bbox.all():
        assert dets.segm is not None
        for i in np.flatnonzero(~dets.has_bbox):
            img = int(dets.img[i])
            rle = to_rle(dets.segm[int(dets.order[i])], int(gt.heights[img]), int(gt.widths[img]))
            area[i] = float(mask_utils.area(rle))
    return area
