"""Bootstrap over images: resample metrics equal lvis-api on the materialised multiset."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from pcb_analysis.bootstrap import percentile_interval
from pcb_analysis.errors import ApiMisuseError
from pcb_analysis.eval_cases import make_case
from pcb_analysis.lvis_compat import reference_evaluate
from pcb_analysis.lvis_eval import bootstrap, compare, evaluate, evaluate_resamples
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
