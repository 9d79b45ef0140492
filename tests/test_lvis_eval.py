"""pcbkit's LVIS evaluator: hand-worked goldens, federated rules, parity with lvis-api, bad input."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pcb_analysis.errors import ApiMisuseError, PcbkitError
from pcb_analysis.eval_cases import make_case
from pcb_analysis.lvis_compat import reference_evaluate
from pcb_analysis.lvis_eval import (
    cap_per_category,
    cap_per_image,
    default_workers,
    evaluate,
    evaluate_full,
    load_ground_truth,
    load_results,
)
from pcbkit.cli import cli


def _gt(images, anns, cats=None):
    cats = cats or [
        {"id": 1, "name": "a", "synset": "a.n.01", "frequency": "f",
         "image_count": 200, "instance_count": 300},
        {"id": 2, "name": "b", "synset": "b.n.01", "frequency": "r", "image_count": 3, "instance_count": 3},
    ]
    return {"images": images, "annotations": anns, "categories": cats}


def _img(i, neg=(), nel=()):
    return {
        "id": i,
        "height": 100,
        "width": 100,
        "neg_category_ids": list(neg),
        "not_exhaustive_category_ids": list(nel),
    }


def _ann(i, img, cat, box):
    x, y, w, h = box
    return {
        "id": i,
        "image_id": img,
        "category_id": cat,
        "bbox": list(box),
        "area": float(w * h),
        "segmentation": [[x, y, x, y + h, x + w, y + h, x + w, y]],
    }


def _det(img, cat, box, score):
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score}


# ------------------------------------------------------------------------------------------
# Hand-worked golden
# ------------------------------------------------------------------------------------------
def test_golden_two_gts_three_dets():
    # One image, category 1 with ground truths A=[0,0,20,20] and B=[50,50,20,20].
    # Detections: d1 (0.9) = A exactly, d2 (0.8) far from both, d3 (0.7) = B exactly.
    # Sorted by score: tp = [1, 1, 2], fp = [0, 1, 1], recall = [.5, .5, 1],
    # precision = [1, 1/2, 2/3] -> monotone from the right: [1, 2/3, 2/3].
    # Recall points 0.00..0.50 (51 of them) land on index 0 -> 1; 0.51..1.00 (50) on index 2 -> 2/3.
    # Same at every IoU threshold (IoU is 1), so AP = (51 * 1 + 50 * 2/3) / 101 = 253 / 303.
    gt = _gt([_img(1)], [_ann(1, 1, 1, (0, 0, 20, 20)), _ann(2, 1, 1, (50, 50, 20, 20))])
    dets = [
        _det(1, 1, (0, 0, 20, 20), 0.9), _det(1, 1, (80, 0, 10, 10), 0.8), _det(1, 1, (50, 50, 20, 20), 0.7)
    ]
    m = evaluate(gt, dets, "bbox")
    assert m["AP"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["AP50"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["APf"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["APr"] == -1  # category 2 has no ground truth in this split: excluded
    assert m["AR@300"] == pytest.approx(1.0)
    # areas are 400 (< 32^2): all "small"; medium and large have no gt
    assert m["APs"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["APm"] == -1 and m["APl"] == -1


def test_federated_rules():
    # Image 1: category 1 present (gt), category 2 listed as negative.
    # Image 2: category 1 present but not exhaustively annotated.
    gt = _gt(
        [_img(1, neg=[2]), _img(2, nel=[1])],
        [_ann(1, 1, 1, (0, 0, 40, 40)), _ann(2, 2, 1, (0, 0, 40, 40)), _ann(3, 2, 2, (60, 60, 30, 30))],
    )
    perfect = [
        _det(1, 1, (0, 0, 40, 40), 0.9), _det(2, 1, (0, 0, 40, 40), 0.9), _det(2, 2, (60, 60, 30, 30), 0.9)
    ]
    assert evaluate(gt, perfect, "bbox")["AP"] == pytest.approx(1.0)
    # An unmatched detection of a not-exhaustive category (image 2, cat 1) is ignored: AP stays 1.
    nel_fp = perfect + [_det(2, 1, (50, 0, 20, 20), 0.95)]
    assert evaluate(gt, nel_fp, "bbox")["AP"] == pytest.approx(1.0)
    # A detection of a category that is neither present nor negative in the image is not evaluated.
    unknown_fp = perfect + [_det(2, 2, (0, 0, 20, 20), 0.5), _det(1, 2, (0, 0, 20, 20), 0.99)]
    # ... except image 1 lists category 2 as negative: that one IS a false positive for category 2,
    # ranked first (0.99): category 2 precision = [0, 1/2] -> monotone [1/2, 1/2] -> AP_2 = 1/2.
    m = evaluate(gt, unknown_fp, "bbox")
    assert m["APr"] == pytest.approx(0.5)
    assert m["APf"] == pytest.approx(1.0)
    only_unlisted = perfect + [_det(2, 2, (0, 0, 20, 20), 0.99)]  # cat 2 present in image 2: a real FP
    assert evaluate(gt, only_unlisted, "bbox")["APr"] == pytest.approx(0.5)


def test_rare_class_without_detections_scores_zero():
    gt = _gt([_img(1)], [_ann(1, 1, 1, (0, 0, 40, 40)), _ann(2, 1, 2, (50, 50, 40, 40))])
    m = evaluate(gt, [_det(1, 1, (0, 0, 40, 40), 0.9)], "bbox")
    assert m["APr"] == 0.0 and m["APf"] == pytest.approx(1.0) and m["AP"] == pytest.approx(0.5)


def test_cap_per_image_keeps_top_scores_ties_in_file_order():
    gt = load_ground_truth(_gt([_img(1), _img(2)], [_ann(1, 1, 1, (0, 0, 4, 4))]))
    dets = load_results(
        [_det(1, 1, (0, 0, 1, 1), s) for s in (0.1, 0.5, 0.5, 0.9)] + [_det(2, 1, (0, 0, 1, 1), 0.2)],
        gt,
        "bbox",
    )
    # image 1 has 4 > 2 detections: keep 0.9 (index 3) and the first 0.5 (index 1); image 2 is untouched
    assert cap_per_image(dets, 2).tolist() == [1, 3, 4]
    assert cap_per_image(dets, -1).tolist() == [0, 1, 2, 3, 4]
    assert cap_per_category(dets, 1).tolist() == [3]


# ------------------------------------------------------------------------------------------
# Parity with lvis-api (the reference)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_parity_with_lvis_api(seed, iou_type):
    case = make_case(seed=seed, num_images=30)
    ref = reference_evaluate(case.gt, case.results, iou_type)
    for workers in (1, 2):
        ours = evaluate(case.gt, case.results, iou_type, workers=workers)
        assert set(ours) == set(ref)
        for k in ref:
            assert abs(ours[k] - ref[k]) <= 1e-9, (k, ours[k], ref[k])


@pytest.mark.parametrize("max_dets", [1, 12, 50])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_max_dets_equals_lvis_api_with_the_same_cap(max_dets, iou_type):
    case = make_case(seed=4, num_images=16)
    ref = reference_evaluate(case.gt, case.results, iou_type, max_dets=max_dets)
    ours = evaluate(case.gt, case.results, iou_type, max_dets=max_dets)
    assert set(ours) == set(ref) and f"AR@{max_dets}" in ours
    assert max(abs(ours[k] - ref[k]) for k in ref) <= 1e-9
    # the cap binds on this case: a smaller cap changes the numbers
    assert ours["AP"] != evaluate(case.gt, case.results, iou_type)["AP"]


def test_max_dets_300_is_the_default_and_bad_caps_are_refused(tmp_path, small_files):
    case = make_case(seed=4, num_images=8)
    assert evaluate(case.gt, case.results, "bbox", max_dets=300) == evaluate(case.gt, case.results, "bbox")
    for bad in (0, -2):
        with pytest.raises(ApiMisuseError, match="max_dets"):
            evaluate(case.gt, case.results, "bbox", max_dets=bad)
    gt_path, res_path, small = small_files
    args = ["evaluate", "--gt", str(gt_path), "--results", str(res_path), "--iou-type", "bbox", "--json"]
    r = CliRunner().invoke(cli, [*args, "--max-dets", "2"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["bbox"]
    ref = reference_evaluate(small.gt, small.results, "bbox", max_dets=2)
    assert max(abs(got[k] - ref[k]) for k in ref) <= 1e-9
    r = CliRunner().invoke(cli, [*args, "--max-dets", "0"])
    assert isinstance(r.exception, PcbkitError) and "--max-dets must be >= 1" in str(r.exception)


def test_case_exercises_the_rules():
    case = make_case(seed=0, num_images=30)
    per_img: dict[int, int] = {}
    for d in case.results:
        per_img[d["image_id"]] = per_img.get(d["image_id"], 0) + 1
    assert max(per_img.values()) > 300
    assert any(im["not_exhaustive_category_ids"] for im in case.gt["images"])
    assert any(im["neg_category_ids"] for im in case.gt["images"])
    annotated = {a["image_id"] for a in case.gt["annotations"]}
    assert any(im["id"] not in annotated for im in case.gt["images"])
    m = evaluate(case.gt, case.results, "bbox")
    assert all(m[k] != -1 for k in ("AP", "APs", "APm", "APl", "APr", "APc", "APf"))


def test_parity_duplicates_and_box_only_results_in_segm():
    case = make_case(seed=5, num_images=12)
    results = case.results + copy.deepcopy(case.results[:50])  # exact duplicates (tied scores)
    for d in results[::7]:
        d.pop("segmentation", None)  # box-only results become box polygons, as in lvis-api
    for t in ("bbox", "segm"):
        ref = reference_evaluate(case.gt, results, t)
        ours = evaluate(case.gt, results, t)
        assert max(abs(ours[k] - ref[k]) for k in ref) <= 1e-9


def test_fixed_ap_matches_lvis_api_on_prefiltered_results():
    case = make_case(seed=3, num_images=20)
    per_class = 25
    gt = load_ground_truth(case.gt)
    dets = load_results(case.results, gt, "bbox")
    kept = [case.results[i] for i in cap_per_category(dets, per_class)]
    ref = reference_evaluate(case.gt, kept, "bbox", max_dets=-1)
    ours = evaluate_full(case.gt, case.results, "bbox", fixed=True, fixed_per_class=per_class).metrics
    assert max(abs(ours[k] - ref[k]) for k in ref) <= 1e-9
    # the standard per-image cap differs from the fixed protocol on this case
    assert evaluate(case.gt, case.results, "bbox")["AP"] != ours["AP"]


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------
@pytest.fixture()
def small_files(tmp_path: Path):
    case = make_case(seed=7, num_images=6, dets_per_image=5, crowded_images=0)
    gt_path = tmp_path / "val.json"
    gt_path.write_text(json.dumps(case.gt))
    res_path = tmp_path / "dets.json"
    res_path.write_text(json.dumps(case.results))
    return gt_path, res_path, case


def _bad(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_bad_input_messages(tmp_path, small_files):
    gt_path, res_path, case = small_files
    with pytest.raises(PcbkitError, match="missing.json: ground-truth file not found"):
        evaluate(tmp_path / "missing.json", res_path)
    with pytest.raises(
        PcbkitError, match="notlvis.json: not an LVIS annotation file: missing field 'images'"
    ):
        evaluate(_bad(tmp_path, "notlvis.json", {"foo": 1}), res_path)
    with pytest.raises(PcbkitError, match="garbage.json: not valid JSON"):
        evaluate(_bad(tmp_path, "garbage.json", "{not json"), res_path)
    with pytest.raises(PcbkitError, match="empty.json: results list is empty"):
        evaluate(gt_path, _bad(tmp_path, "empty.json", []))
    wrong_cat = copy.deepcopy(case.results)
    wrong_cat[2]["category_id"] = 9999
    with pytest.raises(PcbkitError, match=r"wrongcat.json: field 'category_id': 1 id\(s\) not in .*9999"):
        evaluate(gt_path, _bad(tmp_path, "wrongcat.json", wrong_cat))
    nan = copy.deepcopy(case.results)
    nan[1]["score"] = math.nan
    with pytest.raises(PcbkitError, match=r"nan.json: results\[1\].score is nan"):
        evaluate(gt_path, _bad(tmp_path, "nan.json", nan))
    wrong_img = copy.deepcopy(case.results)
    wrong_img[0]["image_id"] = -5
    with pytest.raises(PcbkitError, match=r"wrongimg.json: results\[0\].image_id -5 is not an image"):
        evaluate(gt_path, _bad(tmp_path, "wrongimg.json", wrong_img))
    with pytest.raises(PcbkitError, match="not an LVIS results file"):
        evaluate(gt_path, _bad(tmp_path, "dict.json", {"annotations": []}))


def test_cli_evaluate_table_and_json(tmp_path, small_files):
    gt_path, res_path, case = small_files
    out = tmp_path / "m.json"
    r = CliRunner().invoke(
        cli, ["evaluate", "--gt", str(gt_path), "--results", str(res_path), "--fixed-ap", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "mask" in r.output and "box" in r.output and "APb" in r.output
    saved = json.loads(out.read_text())["metrics"]
    assert set(saved) == {"segm", "bbox", "segm_fixed", "bbox_fixed"}
    ref = reference_evaluate(case.gt, case.results, "segm")
    assert saved["segm"]["APr"] == pytest.approx(ref["APr"], abs=1e-9)
    r = CliRunner().invoke(
        cli, ["evaluate", "--gt", str(gt_path), "--results", str(res_path), "--iou-type", "bbox", "--json"]
    )
    assert r.exit_code == 0
    assert set(json.loads(r.output)) == {"bbox"}


def test_cli_bad_input_is_one_line_nonzero(tmp_path, small_files):
    gt_path, res_path, _ = small_files
    empty = _bad(tmp_path, "empty.json", [])
    proc = subprocess.run(
        [sys.executable, "-m", "pcbkit", "evaluate", "--gt", str(gt_path), "--results", str(empty)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "empty.json" in lines[0] and "Traceback" not in proc.stderr
    out = tmp_path / "keep.json"
    out.write_text("good")
    proc = subprocess.run(
        [
            sys.executable, "-m", "pcbkit", "evaluate",
            "--gt", str(gt_path), "--results", str(empty), "--out", str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and out.read_text() == "good"  # an existing output is never clobbered


def test_worker_count_does_not_change_results():
    case = make_case(seed=11, num_images=40)
    a = evaluate_full(case.gt, case.results, "segm", workers=1)
    b = evaluate_full(case.gt, case.results, "segm", workers=2)
    np.testing.assert_array_equal(a.precision, b.precision)
    np.testing.assert_array_equal(a.recall, b.recall)


def test_no_forked_workers_inside_a_process_group(tmp_path: Path) -> None:
    import torch.distributed as dist  # heavy (torch): only this test of the module needs it

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert default_workers() == 1
    finally:
        dist.destroy_process_group()
    assert default_workers() >= 1


def test_no_forked_workers_while_other_threads_run() -> None:
    release = threading.Event()
    worker = threading.Thread(target=release.wait, daemon=True)  # e.g. TensorBoard's event writer
    worker.start()
    try:
        assert default_workers() == 1
    finally:
        release.set()
        worker.join()
    assert default_workers() >= 1


def test_lvis_equivalent_cap_keeps_the_per_class_budget():
    from pcb_analysis.lvis_eval import lvis_equivalent_cap

    # 300 * 48 / 1230 = 11.707 -> 12; LVIS itself -> 300; v1's 1,203 classes: 293.4 -> 293; never 0
    assert [lvis_equivalent_cap(k) for k in (48, 1230, 1203, 12, 1)] == [12, 300, 293, 3, 1]
    with pytest.raises(ApiMisuseError):
        lvis_equivalent_cap(0)
