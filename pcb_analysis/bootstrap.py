"""Paired bootstrap over images for the LVIS metrics, without re-matching.

A resample is a multiset of image ids (repeats allowed). Its metrics are defined as lvis-api's on
the materialised split: every repeat of an image is a copy with a new id placed right after the
original in id order, with its annotations and detections duplicated. Matching is per (image,
category), so the matching of `evaluate` is computed once (`match_detections`) and each resample
only re-accumulates its true positives with image multiplicities as weights: ground-truth counts, detection
records and the federated rules all follow the multiset; categories without ground truth in a
resample get -1, as lvis-api gives them. `bootstrap` gives each metric (value, low, high): the
full-data value and a 95% percentile interval; `compare` the paired difference b - a on the same
resamples. Resamples where a metric is undefined (-1) are left out of its interval.
docs/evaluation.md §6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcb_analysis.errors import ApiMisuseError
from pcb_analysis.lvis_gt import GroundTruth, load_ground_truth
from pcb_analysis.lvis_json import gc_paused
from pcb_analysis.lvis_protocol import (
    AREA_RNGS,
    IOU_THRS,
    MAX_DETS,
    REC_THRS,
    Matches,
    det_flags,
    match_detections,
    summarize,
)
from pcb_analysis.lvis_results import Detections

GtArg = str | Path | dict[str, Any] | GroundTruth
ResultsArg = str | Path | list[dict[str, Any]]


@dataclass(frozen=True)
class _Prepared:
    """What every resample re-uses: flags in accumulation order and the tie runs."""

    m: Matches
    order: np.ndarray  # accumulation order of m.dets (`accumulation_order`)
    run_start: np.ndarray  # runs of equal (category, score, image) in accumulation order
    run_len: np.ndarray
    run_img: np.ndarray
    run_cat: np.ndarray
    g_ok: np.ndarray  # [N_ann, A] non-ignored ground truth per area range
    fp_base: np.ndarray  # [D, A] bool: the majority false-positive flag over thresholds
    tp_ptr: np.ndarray  # CSR by element: its true positives' (threshold, area) codes t * A + a
    tp_ta: np.ndarray
    x_ptr: np.ndarray  # CSR by element: codes where the false-positive flag differs from fp_base
    x_ta: np.ndarray
    x_sign: np.ndarray  # +1: a false positive fp_base misses; -1: fp_base counts one that is not


def accumulation_order(d: Detections) -> np.ndarray:
    """lvis-api's order per category: score descending, ties by image then in-image order."""
    return np.lexsort((d.order, d.img, -d.score, d.cat))


def _prepare(m: Matches) -> _Prepared:
    tps, fps = det_flags(m.gt, m.dets, m.det_area, m.matched, m.matched_ig)
    d = m.dets
    o = accumulation_order(d)
    cat, score, img = d.cat[o], d.score[o], d.img[o]
    new = np.ones(o.shape[0], dtype=bool)
    new[1:] = (cat[1:] != cat[:-1]) | (score[1:] != score[:-1]) | (img[1:] != img[:-1])
    run_start = np.flatnonzero(new)
    run_len = np.diff(np.append(run_start, o.shape[0]))
    lo = np.array([r[0] for r in AREA_RNGS])
    hi = np.array([r[1] for r in AREA_RNGS])
    gt = m.gt
    area = gt.ann_area[:, None]
    g_ok = ~gt.ann_ignore[:, None] & (area >= lo[None, :]) & (area <= hi[None, :])
    tps, fps = tps[o], fps[o]
    D, T, A = tps.shape
    fp_base = 2 * fps.sum(axis=1) > T
    tp_e, tp_ta = np.nonzero(tps.reshape(D, T * A))
    diff = fps != fp_base[:, None, :]
    x_e, x_ta = np.nonzero(diff.reshape(D, T * A))
    x_sign = np.where(fps.reshape(D, T * A)[x_e, x_ta], 1.0, -1.0)
    return _Prepared(
        m, o, run_start, run_len, img[run_start], cat[run_start], g_ok, fp_base,
        _csr_ptr(tp_e, D), tp_ta.astype(np.int16), _csr_ptr(x_e, D), x_ta.astype(np.int16), x_sign,
    )


def _csr_ptr(rows: np.ndarray, n: int) -> np.ndarray:
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=ptr[1:])
    return ptr


def _expand(
    ptr: np.ndarray, codes: np.ndarray, elem: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR entries of each point's element, sorted by (code, point): (point, code, entry)."""
    cnt = (ptr[1:] - ptr[:-1])[elem]
    pt = np.repeat(np.arange(elem.shape[0]), cnt)
    first = np.cumsum(cnt) - cnt
    entry = ptr[:-1][elem][pt] + (np.arange(pt.shape[0]) - first[pt])
    ta = codes[entry]
    by = np.argsort(ta, kind="stable")  # points stay in order within a code
    return pt[by], ta[by].astype(np.int64), entry[by]


def _weights(gt: GroundTruth, resample: Any) -> np.ndarray:
    ids = np.asarray(resample, dtype=np.int64).reshape(-1)
    pos = np.searchsorted(gt.img_ids, ids)
    pos_c = np.minimum(pos, max(gt.img_ids.shape[0] - 1, 0))
    if ids.size and (gt.img_ids.size == 0 or not np.all(gt.img_ids[pos_c] == ids)):
        bad = int(ids[np.argmax(gt.img_ids[pos_c] != ids)]) if gt.img_ids.size else int(ids[0])
        raise ApiMisuseError(f"evaluate_resamples: image id {bad} is not in the ground truth")
    return np.bincount(pos_c[: ids.size], minlength=gt.img_ids.shape[0]).astype(np.int64)


def _metrics(p: _Prepared, w: np.ndarray) -> dict[str, float]:
    """lvis-api's metrics on the split where image i appears w[i] times."""
    gt = p.m.gt
    C = gt.num_cats
    T, R, A = len(IOU_THRS), len(REC_THRS), len(AREA_RNGS)
    ann_w = w[gt.ann_img]
    num_gt = np.zeros((C, A), dtype=np.int64)
    for a in range(A):
        num_gt[:, a] = np.bincount(gt.ann_cat[p.g_ok[:, a]], weights=ann_w[p.g_ok[:, a]], minlength=C)
    # Points of the weighted cumulative sums: a lone detection of a run with weight k stands for
    # its k copies (consecutive, same flags: the envelope and the recall look-ups see the same
    # values); a run of tied detections in one image is tiled k times (copy-major order).
    rw = w[p.run_img]
    single = p.run_len == 1
    n_pts = np.where(single, (rw > 0).astype(np.int64), p.run_len * rw)
    pt_w = np.where(single, rw, 1)
    run_of = np.repeat(np.arange(n_pts.shape[0]), n_pts)
    offset = np.cumsum(n_pts) - n_pts
    within = np.arange(run_of.shape[0]) - offset[run_of]
    elem = p.run_start[run_of] + within % p.run_len[run_of]
    weight = pt_w[run_of].astype(np.float64)
    pt_cat = p.run_cat[run_of]
    n_pt = elem.shape[0]
    cat_first = np.searchsorted(pt_cat, np.arange(C), side="left")
    # Weighted false positives up to each point: fp_base's running sum plus the exceptions'.
    base = np.zeros((n_pt + 1, A))
    np.cumsum(p.fp_base[elem] * weight[:, None], axis=0, out=base[1:])
    x_pt, x_ta, x_entry = _expand(p.x_ptr, p.x_ta, elem)
    x_key = x_ta * n_pt + x_pt
    x_cum = np.zeros(x_pt.shape[0] + 1)
    np.cumsum(p.x_sign[x_entry] * weight[x_pt], out=x_cum[1:])
    # True positives, sorted by (threshold, area, category, point): the groups of the accumulation.
    t_pt, t_ta, _ = _expand(p.tp_ptr, p.tp_ta, elem)
    t_cat = pt_cat[t_pt]
    t_a = t_ta % A
    lo_pt = cat_first[t_cat]
    fp = base[t_pt + 1, t_a] - base[lo_pt, t_a]
    fp += x_cum[np.searchsorted(x_key, t_ta * n_pt + t_pt, side="right")]
    fp -= x_cum[np.searchsorted(x_key, t_ta * n_pt + lo_pt, side="left")]
    group = t_ta * C + t_cat  # (t * A + a) * C + c
    w_cum = np.cumsum(weight[t_pt])
    g_new = np.ones(group.shape[0], dtype=bool)
    g_new[1:] = group[1:] != group[:-1]
    g_first = np.flatnonzero(g_new)
    before = (w_cum - weight[t_pt])[g_first]
    tp = w_cum - np.repeat(before, np.diff(np.append(g_first, group.shape[0])))
    ng = num_gt[t_cat, t_a].astype(np.float64)
    rc = tp / ng
    pr = tp / (fp + tp + np.spacing(1))
    # Precision at recall threshold k: the best precision among true positives with recall >= it.
    n_thr = np.searchsorted(REC_THRS, rc, side="right")  # thresholds this point reaches
    key = group * (R + 1) + n_thr
    k_new = np.ones(key.shape[0], dtype=bool)
    k_new[1:] = key[1:] != key[:-1]
    k_first = np.flatnonzero(k_new)
    # Only groups with a true positive get non-zero values; they are the columns of `best`. Row
    # R - n: the best precision reaching exactly n thresholds; a running max down the rows gives, in
    # row R - 1 - k, the best among those reaching more than k (contiguous rows).
    G = T * A * C
    g_ids = group[g_first]
    col = np.repeat(np.arange(g_first.shape[0]), np.diff(np.append(g_first, group.shape[0])))
    best = np.zeros((R + 1, g_first.shape[0]))
    if k_first.size:
        best[R - n_thr[k_first], col[k_first]] = np.maximum.reduceat(pr, k_first)
    for i in range(1, R + 1):  # row by row: ~4x faster than np.maximum.accumulate(axis=0) here
        np.maximum(best[i - 1], best[i], out=best[i])
    env = best[R - 1 :: -1]  # [R, groups with a TP]
    has = (num_gt > 0).T  # [A, C]
    prec = np.empty((T, A, C, R))
    prec[...] = np.where(has, 0.0, -1.0)[None, :, :, None]
    prec.reshape(G, R)[g_ids] = env.T
    rec = np.where(has[None], 0.0, -1.0).repeat(T, axis=0).reshape(G)
    if g_first.size:
        last = np.append(g_first[1:], group.shape[0]) - 1
        rec[group[last]] = rc[last]
    precision = prec.transpose(0, 3, 2, 1)  # [T, R, C, A]
    recall = rec.reshape(T, A, C).transpose(0, 2, 1)
    return summarize(precision, recall, gt, p.m.max_dets)


def evaluate_resamples(
    gt: GtArg,
    results: ResultsArg,
    iou_type: str,
    resamples: list[Any],
    *,
    max_dets: int = MAX_DETS,
    workers: int | None = None,
) -> list[dict[str, float]]:
    """One metrics dict (the keys of `evaluate`) per resample, a list of image ids (repeats allowed)."""
    with gc_paused():
        index = load_ground_truth(gt)
        prep = _prepare(match_detections(index, results, iou_type, max_dets=max_dets, workers=workers))
        return [_metrics(prep, _weights(index, r)) for r in resamples]


def draw_resamples(img_ids: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """n resamples of len(img_ids) image ids drawn with replacement (numpy's PCG64, `seed`)."""
    if n < 1:
        raise ApiMisuseError(f"bootstrap: n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    return [img_ids[rng.integers(0, img_ids.shape[0], size=img_ids.shape[0])] for _ in range(n)]


def percentile_interval(values: Any, level: float = 0.95) -> tuple[float, float]:
    """(low, high): the (1-level)/2 and (1+level)/2 quantiles, linear between order statistics
    (position q (n - 1) in the sorted list); NaN for an empty list."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        return math.nan, math.nan
    out = []
    for q in ((1 - level) / 2, (1 + level) / 2):
        x = q * (v.size - 1)
        i = int(math.floor(x))
        j = min(i + 1, v.size - 1)
        out.append(float(v[i] + (x - i) * (v[j] - v[i])))
    return out[0], out[1]


def _intervals(full: dict[str, float], per: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    out = {}
    for k, v in full.items():
        vals = [r[k] for r in per if r[k] > -1]
        out[k] = (v, *percentile_interval(vals))
    return out


def bootstrap(
    gt: GtArg, results: ResultsArg, iou_type: str, n: int = 200, seed: int = 0, *,
    max_dets: int = MAX_DETS, workers: int | None = None,
) -> dict[str, tuple[float, float, float]]:
    """Each metric -> (full-data value, low, high): a 95% percentile interval over n image resamples."""
    with gc_paused():
        index = load_ground_truth(gt)
        prep = _prepare(match_detections(index, results, iou_type, max_dets=max_dets, workers=workers))
        full = _metrics(prep, np.ones(index.img_ids.shape[0], dtype=np.int64))
        per = [_metrics(prep, _weights(index, r)) for r in draw_resamples(index.img_ids, n, seed)]
    return _intervals(full, per)


def compare(
    gt: GtArg, results_a: ResultsArg, results_b: ResultsArg, iou_type: str, n: int = 200, seed: int = 0,
    *, max_dets: int = MAX_DETS, workers: int | None = None,
) -> dict[str, tuple[float, float, float]]:
    """Each metric -> (b - a, low, high), paired: both evaluated on the same n image resamples.
    A resample where either side is undefined (-1) is left out of that metric's interval."""
    with gc_paused():
        index = load_ground_truth(gt)
        preps = [
            _prepare(match_detections(index, r, iou_type, max_dets=max_dets, workers=workers))
            for r in (results_a, results_b)
        ]
        ones = np.ones(index.img_ids.shape[0], dtype=np.int64)
        fa, fb = (_metrics(p, ones) for p in preps)
        diffs: dict[str, list[float]] = {k: [] for k in fa}
        for r in draw_resamples(index.img_ids, n, seed):
            w = _weights(index, r)
            ma, mb = (_metrics(p, w) for p in preps)
            for k in fa:
                if ma[k] > -1 and mb[k] > -1:
                    diffs[k].append(mb[k] - ma[k])
    undefined = {k for k in fa if fa[k] <= -1 or fb[k] <= -1}
    return {
        k: ((math.nan if k in undefined else fb[k] - fa[k]), *percentile_interval(diffs[k])) for k in fa
    }
