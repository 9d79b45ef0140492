"""Issue 13, input validation and the CLI edge: each audited case is refused in ONE line naming the
file, the index (or id) and the field, and no command prints a Python traceback for a user or an
environment error.

Mechanisms under test: the one LVIS field-check layer (`pcb_analysis.lvis_checks`, used by the
ground-truth and the results readers, so `evaluate`'s fast path and `--reference` see the same
checks), the CLI edge (`pcbkit.cli.main`: PcbkitError / OSError / torch's failed write -> one line,
exit 2; PCBKIT_DEBUG=1 or --debug -> traceback), the named write errors of `pcb_analysis.atomic`,
`pcb_analysis.paths` (output paths and file-name parts checked before the work), the statistics
file and checkpoint sniffers. Numbers in the comments are issue 13's item numbers.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from pcb_analysis import atomic
from pcb_analysis.errors import PcbkitError
from pcb_analysis.eval_cases import make_case
from pcb_analysis.lvis_eval import evaluate, load_ground_truth, load_results
from pcb_analysis.paths import check_name, check_output_path
from pcb_analysis.plots.selection import select_block
from pcb_analysis.stats import ClassStats
from pcb_train.backends.checkpoint import NOT_A_CHECKPOINT, read_checkpoint, save_checkpoint
from pcb_train.calibrate import parse_grid
from pcb_train.config_io import load_config

BAD = 3  # the index of the result / annotation made malformed


@pytest.fixture(scope="module")
def case() -> Any:
    return make_case(seed=0, num_images=6, num_cats=4, size=48, dets_per_image=6, crowded_images=0)


def write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))  # json writes NaN as the literal NaN (accepted by Python's parser)
    return path


def one_line(err: str) -> str:
    """The single stderr line of a refused command (no traceback)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcbkit: error: "), err
    return lines[0]


def image_size(gt: dict[str, Any], image_id: int) -> tuple[int, int]:
    img = next(i for i in gt["images"] if i["id"] == image_id)
    return img["height"], img["width"]


def rle_beyond_image(h: int, w: int) -> dict[str, Any]:
    """Counts in pycocotools' alphabet whose runs end beyond an h x w image (those of a 2h x w mask
    of ones, labelled [h, w])."""
    ones = np.asfortranarray(np.ones((2 * h, w), dtype=np.uint8))
    return {"size": [h, w], "counts": mask_utils.encode(ones)["counts"].decode("ascii")}


# ---------------------------------------------------------------- results (items 3, 10, 19)
RESULT_CASES = {
    # id: (field, value or builder(h, w, det) -> value, expected message part)
    "category-id-fraction": ("category_id", lambda h, w, d: d["category_id"] + 0.5, "category_id is"),
    "image-id-fraction": ("image_id", lambda h, w, d: d["image_id"] + 0.5, "image_id is"),
    "category-id-string": ("category_id", "abc", "category_id is 'abc': ids must be integers"),
    "score-string": ("score", "0.5", "score is '0.5', not a number"),
    "score-bool": ("score", True, "score is True, not a number"),
    "bbox-three-numbers": ("bbox", [1.0, 2.0, 3.0], "bbox is [1.0, 2.0, 3.0]: expected four numbers"),
    "bbox-nan": ("bbox", [1.0, math.nan, 3.0, 4.0], "bbox has a non-finite value"),
    "segm-null": ("segmentation", None, "segmentation is null"),
    "segm-empty-list": ("segmentation", [], "segmentation is an empty list"),
    "segm-rle-no-counts": ("segmentation", lambda h, w, d: {"size": [h, w]}, "RLE without 'counts'"),
    "segm-garbage-counts": ("segmentation", lambda h, w, d: {"size": [h, w], "counts": "garbage!"},
                            "not a valid RLE string"),
    "segm-counts-number": ("segmentation", lambda h, w, d: {"size": [h, w], "counts": 12345},
                           "has counts 12345"),
    "segm-counts-beyond-image": ("segmentation", lambda h, w, d: rle_beyond_image(h, w),
                                 "run beyond its"),
    "segm-rle-wrong-size": ("segmentation", lambda h, w, d: {**d["segmentation"], "size": [h + 1, w]},
                            f"RLE of size [{{h1}}, {{w}}], but the image is"),
    "segm-odd-polygon": ("segmentation", [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]],
                         "polygon 0 has 7 coordinates"),
    "segm-four-coordinate-polygon": ("segmentation", [[1.0, 2.0, 3.0, 4.0]], "polygon 0 has 4 coordinates"),
}


def malformed_results(case: Any, field: str, value: Any) -> tuple[list[dict[str, Any]], int, int]:
    results = copy.deepcopy(case.results)
    det = results[BAD]
    h, w = image_size(case.gt, det["image_id"])
    det[field] = value(h, w, det) if callable(value) else value
    return results, h, w


@pytest.mark.parametrize("name", sorted(RESULT_CASES))
def test_malformed_results_refused_by_the_reader(case: Any, tmp_path: Path, name: str) -> None:
    field, value, message = RESULT_CASES[name]
    results, h, w = malformed_results(case, field, value)
    path = write(tmp_path / "res.json", results)
    iou = "bbox" if field == "bbox" else "segm"
    with pytest.raises(PcbkitError) as info:
        load_results(path, load_ground_truth(case.gt), iou)
    text = str(info.value)
    assert text.startswith(f"{path}: results[{BAD}].{field}"), text
    assert message.format(h1=h + 1, w=w) in text


@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
@pytest.mark.parametrize("name", ["score-string", "category-id-fraction", "segm-null", "segm-rle-wrong-size",
                                  "segm-garbage-counts", "segm-odd-polygon"])
def test_evaluate_refuses_malformed_results_in_one_line(case: Any, tmp_path: Path, run_pcbkit: Any,
                                                        name: str, reference: bool) -> None:
    field, value, _ = RESULT_CASES[name]
    results, _, _ = malformed_results(case, field, value)
    gt = write(tmp_path / "gt.json", case.gt)
    res = write(tmp_path / "res.json", results)
    code, out, err = run_pcbkit(["evaluate", "--gt", str(gt), "--results", str(res), "--iou-type", "segm",
                                 *(["--reference"] if reference else ["--workers", "1"])])
    assert code == 2
    assert one_line(err).startswith(f"pcbkit: error: {res}: results[{BAD}].{field}")


def test_integral_float_ids_are_the_integers(case: Any) -> None:
    """38.0 is the integer 38 (as in lvis-api's dict look-ups): same metrics; 38.5 is refused above."""
    floats = copy.deepcopy(case.results)
    for det in floats:
        det["category_id"] = float(det["category_id"])
        det["image_id"] = float(det["image_id"])
    assert evaluate(case.gt, floats, "bbox", workers=1) == evaluate(case.gt, case.results, "bbox", workers=1)


def test_box_only_result_without_segmentation_field_still_evaluates(case: Any) -> None:
    """An absent `segmentation` with a bbox is lvis-api's box polygon; only an explicit null is refused."""
    results = copy.deepcopy(case.results)
    del results[BAD]["segmentation"]
    assert load_results(results, load_ground_truth(case.gt), "segm").segm[BAD] is None


# ---------------------------------------------------------------- ground truth (items 3, 4, 9, 14)
def _ann(gt: dict[str, Any]) -> dict[str, Any]:
    return gt["annotations"][BAD]


GT_CASES = {
    # id: (edit(gt) -> None, iou type, expected message part)
    "duplicate-annotation-id": (lambda gt: _ann(gt).update(id=gt["annotations"][0]["id"]), "bbox",
                                "duplicate annotation id"),
    "annotation-category-fraction": (lambda gt: _ann(gt).update(category_id=1.5), "bbox",
                                     f"annotations[{BAD}].category_id is 1.5: ids must be integers"),
    "bbox-nan": (lambda gt: _ann(gt)["bbox"].__setitem__(1, math.nan), "bbox",
                 f"annotations[{BAD}].bbox has a non-finite value"),
    "bbox-inf": (lambda gt: _ann(gt)["bbox"].__setitem__(2, math.inf), "bbox",
                 f"annotations[{BAD}].bbox has a non-finite value"),
    "bbox-three-numbers": (lambda gt: _ann(gt).update(bbox=[1.0, 2.0, 3.0]), "bbox",
                           f"annotations[{BAD}].bbox is [1.0, 2.0, 3.0]: expected four numbers"),
    "image-id-string": (lambda gt: gt["images"][0].update(id="abc"), "bbox",
                        "images[0].id is 'abc': ids must be integers"),
    "category-id-string": (lambda gt: gt["categories"][0].update(id="abc"), "bbox",
                           "categories[0].id is 'abc': ids must be integers"),
    "four-coordinate-polygon": (lambda gt: _ann(gt).update(segmentation=[[1.0, 2.0, 30.0, 40.0]]), "segm",
                                "field 'segmentation' polygon 0 has 4 coordinates"),
    "polygon-nan": (lambda gt: _ann(gt)["segmentation"][0].__setitem__(0, math.nan), "segm",
                    "field 'segmentation' polygon 0 has a non-finite coordinate"),
    "no-segmentation": (lambda gt: _ann(gt).pop("segmentation"), "segm",
                        "field 'segmentation' is missing (segm needs it)"),
}


@pytest.mark.parametrize("name", sorted(GT_CASES))
def test_malformed_ground_truth_refused_with_field(case: Any, tmp_path: Path, run_pcbkit: Any, name: str) -> None:
    edit, iou, message = GT_CASES[name]
    gt = copy.deepcopy(case.gt)
    edit(gt)
    gt_path = write(tmp_path / "gt.json", gt)
    res = write(tmp_path / "res.json", case.results)
    code, _, err = run_pcbkit(["evaluate", "--gt", str(gt_path), "--results", str(res), "--iou-type", iou,
                               "--workers", "1"])
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"pcbkit: error: {gt_path}: ") and message in line, line


def test_segmentation_problems_are_only_segm_problems(case: Any, tmp_path: Path) -> None:
    """Without `segmentation` the box evaluation still runs (and agrees with the intact file)."""
    gt = copy.deepcopy(case.gt)
    for ann in gt["annotations"]:
        del ann["segmentation"]
    assert evaluate(gt, case.results, "bbox", workers=1) == evaluate(case.gt, case.results, "bbox", workers=1)


def test_reference_path_checks_ground_truth_segmentations(case: Any, tmp_path: Path, run_pcbkit: Any) -> None:
    gt = copy.deepcopy(case.gt)
    _ann(gt)["segmentation"] = [[1.0, 2.0, 30.0, 40.0]]
    gt_path = write(tmp_path / "gt.json", gt)
    res = write(tmp_path / "res.json", case.results)
    code, _, err = run_pcbkit(["evaluate", "--gt", str(gt_path), "--results", str(res), "--iou-type", "segm",
                               "--reference"])
    assert code == 2 and "polygon 0 has 4 coordinates" in one_line(err)
