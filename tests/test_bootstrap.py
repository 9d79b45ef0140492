"""Bootstrap over images: resample metrics equal lvis-api on the materialised multiset."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from pcb_analysis.bootstrap import _metrics, _prepare, _weights, percentile_interval
from pcb_analysis.errors import ApiMisuseError
from pcb_analysis.eval_cases import make_case
from pcb_analysis.lvis_compat import reference_evaluate
from pcb_analysis.lvis_eval import (
    AREA_RNGS,
    IOU_THRS,
    REC_THRS,
    bootstrap,
    compare,
    det_flags,
    evaluate,
    evaluate_resamples,
    load_ground_truth,
    match_detections,
    summarize,
)
from pcbkit.cli import cli as main


def _materialise(gt: dict, results: list, resample: list[int]) -> tuple[dict, list]:
    """Each occurrence of an image becomes its own image (new id, copies right after the
    original in id order), with its annotations and detections duplicated."""
    by_id = {im["id"]: im for im in gt["images"]}
    order = sorted(resample)
    images, anns, dets = [], [], []
    anns_of: dict[int, list] = {}
    for a in gt["annotations"]:
        anns_of.setdefault(a["image_id"], []).append(a)
    dets_of: dict[int, list] = {}
    for d in results:
        dets_of.setdefault(d["image_id"], []).append(d)
    next_ann = 1
    for new_id, old in enumerate(order, start=1):
        im = copy.deepcopy(by_id[old])
        im["id"] = new_id
        images.append(im)
        for a in anns_of.get(old, []):
            a2 = copy.deepcopy(a)
            a2["id"], a2["image_id"] = next_ann, new_id
            next_ann += 1
            anns.append(a2)
        for d in dets_of.get(old, []):
            d2 = copy.deepcopy(d)
            d2["image_id"] = new_id
            dets.append(d2)
    out = dict(gt, images=images, annotations=anns)
    return out, dets


def _resamples(gt: dict) -> list[list[int]]:
    ids = sorted(im["id"] for im in gt["images"])
    rng = np.random.default_rng(5)
    return [
        [ids[0], ids[0], ids[0]] + ids[1:],  # repeats
        ids[::2],  # omits half the images
        [int(x) for x in rng.choice(ids, size=len(ids))],  # a bootstrap draw
        ids[3:5] + ids[3:5],  # tiny: most categories vanish
    ]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_resamples_equal_lvis_api_on_the_materialised_split(iou_type):
    case = make_case(seed=3, num_images=14, num_cats=9, dets_per_image=20)
    rs = _resamples(case.gt)
    ours = evaluate_resamples(case.gt, case.results, iou_type, rs)
    vanished = 0
    for r, got in zip(rs, ours, strict=True):
        g, d = _materialise(case.gt, case.results, r)
        ref = reference_evaluate(g, d, iou_type)
        assert set(got) == set(ref)
        for k in ref:
            assert abs(got[k] - ref[k]) <= 1e-9, (r, k, got[k], ref[k])
        vanished += sum(v == -1 for v in ref.values())
    assert vanished > 0  # some metric is undefined on some resample


def test_ties_within_an_image_follow_copy_order():
    case = make_case(seed=1, num_images=8, num_cats=5, dets_per_image=15, crowded_images=0)
    res = copy.deepcopy(case.results)
    for d in res:  # coarse scores: many tied detections in one image and category
        d["score"] = round(d["score"], 1)
    ids = sorted(im["id"] for im in case.gt["images"])
    rs = [ids + ids[:4] + ids[:2]]
    got = evaluate_resamples(case.gt, res, "bbox", rs)[0]
    ref = reference_evaluate(*_materialise(case.gt, res, rs[0]), "bbox")
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-9


def test_all_images_once_is_evaluate():
    case = make_case(seed=2, num_images=20)
    ids = [im["id"] for im in case.gt["images"]]
    for t in ("bbox", "segm"):
        assert evaluate_resamples(case.gt, case.results, t, [ids])[0] == evaluate(case.gt, case.results, t)


def test_bootstrap_value_is_full_data_and_interval_brackets_it():
    case = make_case(seed=0, num_images=20)
    full = evaluate(case.gt, case.results, "bbox")
    b = bootstrap(case.gt, case.results, "bbox", n=30, seed=1)
    assert set(b) == set(full)
    for k, (v, lo, hi) in b.items():
        assert v == full[k]
        assert lo <= hi
    assert b["AP"][1] < b["AP"][2]  # a real spread on 20 images
    assert bootstrap(case.gt, case.results, "bbox", n=30, seed=1) == b  # seeded


def test_compare_with_itself_is_zero_and_paired_difference_is_exact():
    case = make_case(seed=0, num_images=16)
    c = compare(case.gt, case.results, case.results, "bbox", n=20)
    for v, lo, hi in c.values():
        assert (v, lo, hi) == (0.0, 0.0, 0.0) or math.isnan(v)
    worse = [dict(d, score=d["score"] * (0.5 if d["category_id"] % 2 else 1.0)) for d in case.results]
    c2 = compare(case.gt, case.results, worse, "bbox", n=20)
    fa, fb = evaluate(case.gt, case.results, "bbox"), evaluate(case.gt, worse, "bbox")
    assert c2["AP"][0] == pytest.approx(fb["AP"] - fa["AP"], abs=1e-12)
    assert c2["AP"][0] != 0.0 and c2["AP"][1] <= c2["AP"][2]


def test_percentile_interval_by_hand():
    # 5 values, 95%: positions 0.025 * 4 = 0.1 and 0.975 * 4 = 3.9 in [1, 2, 3, 4, 10]
    lo, hi = percentile_interval([4, 1, 10, 3, 2])
    assert lo == pytest.approx(1 + 0.1 * (2 - 1))
    assert hi == pytest.approx(4 + 0.9 * (10 - 4))
    assert percentile_interval([7.0]) == (7.0, 7.0)
    assert all(math.isnan(x) for x in percentile_interval([]))
    # 80% of 0..10: positions 1 and 9
    assert percentile_interval(list(range(11)), level=0.8) == pytest.approx((1.0, 9.0))


def test_unknown_image_id_is_refused():
    case = make_case(seed=0, num_images=6)
    with pytest.raises(ApiMisuseError, match="image id 5"):
        evaluate_resamples(case.gt, case.results, "bbox", [[5]])


def test_cli_bootstrap_and_compare(tmp_path):
    case = make_case(seed=0, num_images=12)
    (tmp_path / "gt.json").write_text(json.dumps(case.gt))
    (tmp_path / "a.json").write_text(json.dumps(case.results))
    args = ["evaluate", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "a.json"),
            "--iou-type", "bbox", "--bootstrap", "10", "--compare", str(tmp_path / "a.json")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    full = evaluate(case.gt, case.results, "bbox")
    b = bootstrap(case.gt, case.results, "bbox", n=10)
    ap_line = [ln for ln in r.output.splitlines() if ln.strip().startswith("AP ")]
    assert ap_line[0].split() == ["AP", "0.00", "[0.00,", "0.00]"]  # compare with itself
    assert ap_line[1].split() == ["AP", f"{100 * full['AP']:.2f}", f"[{100 * b['AP'][1]:.2f},",
                                  f"{100 * b['AP'][2]:.2f}]"]
    bad = CliRunner().invoke(main, args[:-4] + ["--bootstrap", "0"])
    assert bad.exit_code != 0 and "--bootstrap must be >= 1" in str(bad.exception)


def _loop_metrics(p, w: np.ndarray) -> dict[str, float]:
    """The former per-category accumulation (running sums over every point), kept as a reference."""
    gt = p.m.gt
    C = gt.num_cats
    T, R, A = len(IOU_THRS), len(REC_THRS), len(AREA_RNGS)
    precision = -np.ones((T, R, C, A))
    recall = -np.ones((T, C, A))
    ann_w = w[gt.ann_img]
    num_gt = np.zeros((C, A), dtype=np.int64)
    for a in range(A):
        num_gt[:, a] = np.bincount(gt.ann_cat[p.g_ok[:, a]], weights=ann_w[p.g_ok[:, a]], minlength=C)
    tps, fps = det_flags(gt, p.m.dets, p.m.det_area, p.m.matched, p.m.matched_ig)
    tps, fps = tps[p.order], fps[p.order]
    rw = w[p.run_img]
    single = p.run_len == 1
    n_pts = np.where(single, (rw > 0).astype(np.int64), p.run_len * rw)
    run_of = np.repeat(np.arange(n_pts.shape[0]), n_pts)
    within = np.arange(run_of.shape[0]) - (np.cumsum(n_pts) - n_pts)[run_of]
    elem = p.run_start[run_of] + within % p.run_len[run_of]
    weight = np.where(single, rw, 1)[run_of].astype(np.float64)
    pt_cat = p.run_cat[run_of]
    for c in np.flatnonzero(num_gt.any(axis=1)):
        sel = pt_cat == c
        e, wc = elem[sel], weight[sel][:, None, None]
        tp_all = np.cumsum(tps[e] * wc, axis=0)
        fp_all = np.cumsum(fps[e] * wc, axis=0)
        for a in np.flatnonzero(num_gt[c] > 0):
            precision[:, :, c, a] = 0.0
            recall[:, c, a] = 0.0
            if e.shape[0] == 0:
                continue
            tp, fp = tp_all[:, :, a].T, fp_all[:, :, a].T
            rc = tp / float(num_gt[c, a])
            pr = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
            recall[:, c, a] = rc[:, -1]
            for t in range(T):
                ins = np.searchsorted(rc[t], REC_THRS, side="left")
                ok = ins < e.shape[0]
                precision[t, np.flatnonzero(ok), c, a] = pr[t, ins[ok]]
    return summarize(precision, recall, gt, p.m.max_dets)


@pytest.mark.parametrize("coarse", [False, True])
def test_vectorised_accumulation_equals_the_running_sums(coarse):
    case = make_case(seed=4, num_images=40, num_cats=15, dets_per_image=25, with_masks=False)
    res = [dict(d, score=round(d["score"], 1)) for d in case.results] if coarse else case.results
    index = load_ground_truth(case.gt)
    prep = _prepare(match_detections(index, res, "bbox"))
    assert prep.run_len.max() > (1 if coarse else 0)  # tied runs in one image when coarse
    ids = index.img_ids
    rng = np.random.default_rng(11)
    draws = [ids, ids[:3], np.repeat(ids[:5], 4)] + [rng.choice(ids, size=ids.shape[0]) for _ in range(5)]
    for r in draws:
        w = _weights(index, r)
        got, ref = _metrics(prep, w), _loop_metrics(prep, w)
        assert set(got) == set(ref)
        assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-12, (r, got, ref)
    assert _metrics(prep, np.zeros(ids.shape[0], dtype=np.int64))["AP"] == -1.0  # empty resample
