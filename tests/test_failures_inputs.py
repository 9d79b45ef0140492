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
from pathlib import Path
from typing import Any

import numpy as np
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


# ---------------------------------------------------------------- results (items 3, 10, 19)
RESULT_CASES = {
    # id: (field, value or builder(h, w, det) -> value, expected message part)
    "category-id-fraction": ("category_id", lambda h, w, d: d["category_id"] + 0.5, "category_id is"),
    "image-id-fraction": ("image_id", lambda h, w, d: d["image_id"] + 0.5, "image_id is"),
    "category-id-string": ("category_id", "abc", "category_id is 'abc', not an integer"),
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
    "segm-counts-unterminated": ("segmentation", lambda h, w, d: {"size": [h, w], "counts": "0ab"},
                                 "not a valid RLE string"),
    "segm-counts-non-ascii": ("segmentation", lambda h, w, d: {"size": [h, w], "counts": "0é1"},
                              "non-ASCII"),
    "segm-counts-empty": ("segmentation", lambda h, w, d: {"size": [h, w], "counts": ""}, "empty counts"),
    "segm-uncompressed-rle-wrong-total": ("segmentation", lambda h, w, d: {"size": [h, w], "counts": [0, 5]},
                                          "summing to 5, not height x width"),
    "segm-rle-size-missing": ("segmentation", lambda h, w, d: {"counts": d["segmentation"]["counts"]},
                              "RLE without 'size'"),
    "segm-rle-wrong-size": ("segmentation", lambda h, w, d: {**d["segmentation"], "size": [h + 1, w]},
                            "RLE of size [{h1}, {w}], but the image is"),
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
                                     f"annotations[{BAD}].category_id is 1.5, not an integer"),
    "bbox-nan": (lambda gt: _ann(gt)["bbox"].__setitem__(1, math.nan), "bbox",
                 f"annotations[{BAD}].bbox has a non-finite value"),
    "bbox-inf": (lambda gt: _ann(gt)["bbox"].__setitem__(2, math.inf), "bbox",
                 f"annotations[{BAD}].bbox has a non-finite value"),
    "bbox-three-numbers": (lambda gt: _ann(gt).update(bbox=[1.0, 2.0, 3.0]), "bbox",
                           f"annotations[{BAD}].bbox is [1.0, 2.0, 3.0]: expected four numbers"),
    "image-id-string": (lambda gt: gt["images"][0].update(id="abc"), "bbox",
                        "images[0].id is 'abc', not an integer"),
    "category-id-string": (lambda gt: gt["categories"][0].update(id="abc"), "bbox",
                           "categories[0].id is 'abc', not an integer"),
    "image-height-string": (lambda gt: gt["images"][1].update(height="48"), "bbox",
                            "images[1].height is '48', not an integer"),
    "neg-category-id-fraction": (lambda gt: gt["images"][1].update(neg_category_ids=[2.5]), "bbox",
                                 "images[1].neg_category_ids holds 2.5, not an integer id"),
    "four-coordinate-polygon": (lambda gt: _ann(gt).update(segmentation=[[1.0, 2.0, 30.0, 40.0]]), "segm",
                                "field 'segmentation' polygon 0 has 4 coordinates"),
    "polygon-nan": (lambda gt: _ann(gt)["segmentation"][0].__setitem__(0, math.nan), "segm",
                    "field 'segmentation' polygon 0 has a non-finite coordinate"),
    "no-segmentation": (lambda gt: _ann(gt).pop("segmentation"), "segm",
                        "field 'segmentation' is missing (segm needs it)"),
}


@pytest.mark.parametrize("name", sorted(GT_CASES))
def test_malformed_ground_truth_refused_with_field(case: Any, tmp_path: Path, run_pcbkit: Any,
                                                  name: str) -> None:
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


# ---------------------------------------------------------------- the CLI edge (items 12, tracebacks)
def _eval_args(tmp_path: Path, case: Any) -> list[str]:
    gt = write(tmp_path / "gt.json", case.gt)
    res = write(tmp_path / "res.json", case.results)
    return ["evaluate", "--gt", str(gt), "--results", str(res), "--iou-type", "bbox", "--workers", "1"]


EDGE_ERRORS = {
    "enospc-no-file": (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
    "enospc-file": (OSError(errno.ENOSPC, "No space left on device", "/d/shard.bin"),
                    "/d/shard.bin: no space left on device"),
    "permission": (PermissionError(errno.EACCES, "Permission denied", "/d/x.json"),
                   "/d/x.json: Permission denied"),
    "read-only": (OSError(errno.EROFS, "Read-only file system", "/d/x.json"),
                  "/d/x.json: Read-only file system"),
    "torch-writer": (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                     "could not be written completely; is the disk full?"),
    "memory": (MemoryError(), "out of memory"),
}


def _raise(exc: BaseException) -> Any:
    def raiser(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return raiser


@pytest.mark.parametrize("name", sorted(EDGE_ERRORS))
def test_environment_errors_are_one_line(case: Any, tmp_path: Path, run_pcbkit: Any,
                                         monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    exc, message = EDGE_ERRORS[name]
    monkeypatch.delenv("PCBKIT_DEBUG", raising=False)
    monkeypatch.setattr("pcb_analysis.lvis_eval.load_ground_truth", _raise(exc))
    code, _, err = run_pcbkit(_eval_args(tmp_path, case))
    line = one_line(err)
    assert code == 2 and message in line
    assert line.startswith("pcbkit: error: " + ("" if name == "torch-writer" else message))


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback(case: Any, tmp_path: Path, run_pcbkit: Any,
                                   monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setattr("pcb_analysis.lvis_eval.load_ground_truth",
                        _raise(PcbkitError("gt.json: something is wrong")))
    args = _eval_args(tmp_path, case)
    if how == "env":
        monkeypatch.setenv("PCBKIT_DEBUG", "1")
    else:
        monkeypatch.delenv("PCBKIT_DEBUG", raising=False)
        args = ["--debug", *args]
    code, _, err = run_pcbkit(args)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "raiser" in err
    assert err.strip().splitlines()[-1] == "pcbkit: error: gt.json: something is wrong"
    # the flag does not stick to the next call in the same process
    monkeypatch.delenv("PCBKIT_DEBUG", raising=False)
    code, _, err = run_pcbkit(_eval_args(tmp_path, case))
    assert code == 2 and one_line(err)


def test_a_bug_keeps_its_traceback(case: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pcbkit.cli import main

    monkeypatch.setattr("pcb_analysis.lvis_eval.load_ground_truth", _raise(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(_eval_args(tmp_path, case))


# ---------------------------------------------------------------- full disk at the writers (item 12)
def _no_space(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_in_evaluate_out(case: Any, tmp_path: Path, run_pcbkit: Any,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "outdir" / "metrics.json"
    out.parent.mkdir()
    monkeypatch.setattr(atomic.os, "fsync", _no_space)
    code, stdout, err = run_pcbkit([*_eval_args(tmp_path, case), "--out", str(out)])
    assert code == 2 and one_line(err) == f"pcbkit: error: {out}: no space left on device"
    assert list(out.parent.iterdir()) == []  # no output, no temporary left behind


def test_full_disk_keeps_the_previous_statistics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.npz"
    ClassStats.zeros(3).save(path)
    before = path.read_bytes()
    monkeypatch.setattr(np, "savez_compressed", _no_space)
    with pytest.raises(PcbkitError, match=f"^{path}: no space left on device$"):
        ClassStats.zeros(3).save(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_full_disk_while_saving_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last_checkpoint.pth"
    save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(PcbkitError, match=f"^{path}: no space left on device$"):
        save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_torch_reports_a_full_disk_as_oserror_through_a_file_object() -> None:
    """The premise of save_checkpoint: with a file object torch raises ENOSPC itself (with a path, only
    inline_container.cc's 'unexpected pos')."""
    with pytest.raises(OSError) as info, open("/dev/full", "wb") as f:
        torch.save({"w": torch.zeros(1000)}, f)
    assert info.value.errno == errno.ENOSPC


def test_read_only_target_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic.os, "replace", _raise(OSError(errno.EROFS, "Read-only file system")))
    with pytest.raises(PcbkitError, match=r"x.json: cannot write \(Read-only file system\)$"):
        atomic.write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- output paths (15) and names (8)
def test_check_output_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file.json"
    blocker.write_text("{}")
    (tmp_path / "dir").mkdir()
    deep = tmp_path / "new" / "deeper" / "m.json"
    assert check_output_path(deep, "--out") == deep
    assert check_output_path(blocker, "--out") == blocker  # an existing file is replaced atomically
    for path, folder, message in ((blocker / "m.json", False, "file.json is a file, not a folder"),
                                  (blocker / "a" / "b.json", False, "file.json is a file, not a folder"),
                                  (tmp_path / "dir", False, "is a folder, not a file"),
                                  (blocker, True, "exists and is not a folder")):
        with pytest.raises(PcbkitError, match=message):
            check_output_path(path, "--out", folder=folder)


def _stats_file(tmp_path: Path) -> Path:
    return ClassStats.zeros(3).save(tmp_path / "s.npz")


@pytest.mark.parametrize("command", ["evaluate", "stats", "plot-confusion", "calibrate", "dump-logits",
                                     "synth", "study", "demo"])
def test_out_under_a_regular_file_fails_before_the_work(
    case: Any, tmp_path: Path, run_pcbkit: Any, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker / "out.json"
    # the work would fail loudly (the evaluator, the dump reader, the statistics reader, the run)
    monkeypatch.setattr("pcb_analysis.lvis_eval.load_ground_truth", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_analysis.plots.from_stats.load_matrices", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_train.calibrate.run_calibration", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_train.dump_logits.dump_logits", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_analysis.synth.generate", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_train.study.run_study", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_train.study.run_study_models", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_train.study_demo.run_demo", _raise(AssertionError("work started")))
    missing = str(tmp_path / "missing")
    args = {
        "evaluate": [*_eval_args(tmp_path, case), "--out", str(out)],
        "stats": ["stats", "--dump", str(tmp_path / "no-dump"), "--out", str(out)],
        "plot-confusion": ["plot-confusion", "--stats", str(_stats_file(tmp_path)), "--out", str(out)],
        "calibrate": ["calibrate", "--stats", str(_stats_file(tmp_path)), "--gt", str(tmp_path / "gt.json"),
                      "--out", str(blocker / "cal")],
        "dump-logits": ["dump-logits", "--checkpoint", missing, "--config", missing, "--gt", missing,
                        "--images", missing, "--split", "val", "--out", str(blocker / "dump")],
        "synth": ["synth", "--out", str(blocker / "data")],
        "study": ["study", "--config", missing, "--checkpoint", missing, "--train-gt", missing, "--val-gt",
                  missing, "--images", missing, "--work", str(blocker / "work")],
        "demo": ["demo", "--work", str(blocker / "work")],
    }[command]
    code, _, err = run_pcbkit(args)
    assert code == 2 and "blocker is a file, not a folder" in one_line(err)


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".", "", "a\\b", "x\0y"])
def test_names_that_become_file_names_refuse_paths(name: str) -> None:
    with pytest.raises(PcbkitError, match="not usable in a file name"):
        check_name(name, "--split")


@pytest.mark.parametrize("name", ["val", "val..v2", "train-2017"])
def test_ordinary_names_pass(name: str) -> None:
    assert check_name(name, "--split") == name


@pytest.mark.parametrize(("command", "option"), [("dump-logits", "--split"), ("study", "--name")])
def test_names_of_dumps_and_studies_refuse_paths(
    tmp_path: Path, run_pcbkit: Any, monkeypatch: pytest.MonkeyPatch, command: str, option: str
) -> None:
    monkeypatch.setattr("pcb_train.dump_logits.dump_logits", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_train.study.run_study", _raise(AssertionError("work started")))
    monkeypatch.setattr("pcb_train.study.run_study_models", _raise(AssertionError("work started")))
    missing = str(tmp_path / "missing")
    args = {
        "dump-logits": ["dump-logits", "--checkpoint", missing, "--config", missing, "--gt", missing,
                        "--images", missing, "--out", str(tmp_path / "dump"), "--split", "../up"],
        "study": ["study", "--config", missing, "--checkpoint", missing, "--train-gt", missing, "--val-gt",
                  missing, "--images", missing, "--work", str(tmp_path / "w"), "--name", "../up"],
    }[command]
    code, _, err = run_pcbkit(args)
    assert code == 2 and f"{option} '../up': not usable in a file name" in one_line(err)


def test_calibrate_split_cannot_escape_out(tmp_path: Path, run_pcbkit: Any) -> None:
    work = tmp_path / "work"
    work.mkdir()
    code, _, err = run_pcbkit(["calibrate", "--stats", str(_stats_file(tmp_path)), "--gt",
                               str(tmp_path / "g.json"), "--split", "../escaped",
                               "--out", str(work / "cal" / "slash")])
    assert code == 2 and "--split '../escaped': not usable in a file name" in one_line(err)
    assert list(work.iterdir()) == [] and not (tmp_path / "escaped").exists()


def test_open_row_results_refuses_a_dump_split_with_a_separator(tmp_path: Path) -> None:
    """The split may come from a dump's manifest: refused where it becomes a file name too."""
    from pcb_train.calibrate.results import open_row_results

    with pytest.raises(PcbkitError, match="split name '../x'"), \
            open_row_results(tmp_path / "cal", "../x", [], fixed_ap=False):
        pass
    assert not (tmp_path / "cal").exists()


# ---------------------------------------------------------------- statistics files (16, 22, 20)
def _rewrite_meta(path: Path, edit: Any) -> Path:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    edit(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


@pytest.mark.parametrize(("field", "value"), [
    ("num_classes", "abc"), ("num_classes", 3.5), ("num_classes", None), ("counts.rows", "12"),
    ("counts.background", -1), ("counts.rows", True),
])
def test_statistics_meta_counts_are_integer_fields(tmp_path: Path, field: str, value: Any) -> None:
    def edit(meta: dict[str, Any]) -> None:
        node = meta
        *parents, last = field.split(".")
        for part in parents:
            node = node[part]
        node[last] = value

    path = _rewrite_meta(_stats_file(tmp_path), edit)
    missing = value is None
    with pytest.raises(PcbkitError, match=rf"s.npz: field 'meta.{field}' is {'missing' if missing else ''}"):
        ClassStats.load(path)


@pytest.mark.parametrize("content", [bytes(range(256)) * 8, b'{"S": [1, 2]}\n',
                                     b"\x80\x04K\x01."], ids=["random", "json", "pickle"])
def test_not_a_statistics_file(tmp_path: Path, run_pcbkit: Any, content: bytes) -> None:
    path = tmp_path / "stats.npz"
    path.write_bytes(content)
    with pytest.raises(PcbkitError, match="stats.npz: is not a pcbkit statistics file") as info:
        ClassStats.load(path)
    assert "pickle" not in str(info.value)
    code, _, err = run_pcbkit(["plot-confusion", "--stats", str(path)])
    assert code == 2 and "is not a pcbkit statistics file" in one_line(err)


def test_truncated_statistics_file(tmp_path: Path) -> None:
    path = _stats_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PcbkitError, match="is not a pcbkit statistics file"):
        ClassStats.load(path)


def test_plot_confusion_without_positives_says_so(tmp_path: Path, run_pcbkit: Any) -> None:
    path = _stats_file(tmp_path)  # zeros: no class has a positive
    code, _, err = run_pcbkit(["plot-confusion", "--stats", str(path), "--out", str(tmp_path / "f.png")])
    line = one_line(err.replace(_warnings(err), ""))
    assert code == 2 and "no positives" in line and "class list" not in line
    assert not (tmp_path / "f.png").exists()


def _warnings(err: str) -> str:
    return "".join(line + "\n" for line in err.splitlines() if line.startswith("WARNING"))


def test_most_confused_block_of_a_symmetric_matrix_has_distinct_classes() -> None:
    """D = |M - M^T| = 0 everywhere (identity, or any symmetric M): the block still holds k classes."""
    from tests.test_plots import make_space

    space = make_space(6)
    for m in (np.eye(6), np.full((6, 6), 1 / 6)):
        block = select_block(m, space, 4, "most-confused")
        assert len(block) == 4 and len(set(block)) == 4


# ---------------------------------------------------------------- config (17), checkpoint (21), --tau (25)
def test_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"solver:\n  lr: 0.02\n# \xff\xfe latin-1 comment \xe9\n")
    with pytest.raises(PcbkitError, match=r"cfg.yaml: not a UTF-8 text file \(byte 21 is 0xff\)$"):
        load_config(path)


@pytest.mark.parametrize("kind", ["truncated", "random", "json", "empty"])
def test_not_a_complete_checkpoint(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.pth"
    if kind == "truncated":
        save_checkpoint(path, {"model": {"w": torch.zeros(1000)}})
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes({"random": bytes(range(256)) * 4, "json": b'{"model": {}}', "empty": b""}[kind])
    with pytest.raises(PcbkitError) as info:
        read_checkpoint(path)
    text = str(info.value)
    assert text.startswith(f"{path}: {NOT_A_CHECKPOINT}")
    assert ("that is complete" in text) == (kind == "truncated")
    assert "weights_only" not in text and "unpickl" not in text.lower()


def test_a_complete_checkpoint_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}})
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.arange(3.0))


@pytest.mark.parametrize("text", [",,", "", " , "])
def test_empty_tau_grid_is_refused(text: str, tmp_path: Path, run_pcbkit: Any) -> None:
    """Item 25: already refused on main (sweeps.parse_values); kept as a test of the CLI."""
    with pytest.raises(PcbkitError, match="--tau"):
        parse_grid(text, "--tau")
    code, _, err = run_pcbkit(["calibrate", "--stats", str(_stats_file(tmp_path)), "--gt",
                               str(tmp_path / "g.json"), "--out", str(tmp_path / "cal"), "--tau", text])
    assert code == 2 and "--tau" in one_line(err)


def test_full_disk_while_saving_a_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    from pcb_analysis.plots.heatmap import save_figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _no_space)
    with pytest.raises(PcbkitError, match=r"f\.png: no space left on device$"):
        save_figure(matplotlib.figure.Figure(), tmp_path / "f.png", dpi=50)
    assert list(tmp_path.iterdir()) == []


class _StoppedBySignal(KeyboardInterrupt):
    exit_code = 143


@pytest.mark.parametrize(("exc", "code", "line"), [
    (KeyboardInterrupt(), 130, "pcbkit: interrupted"),
    (_StoppedBySignal("stopped by SIGTERM; resume with --resume"), 143,
     "pcbkit: stopped by SIGTERM; resume with --resume"),
])
def test_interrupts_are_one_line(case: Any, tmp_path: Path, run_pcbkit: Any, monkeypatch: pytest.MonkeyPatch,
                                 exc: BaseException, code: int, line: str) -> None:
    monkeypatch.delenv("PCBKIT_DEBUG", raising=False)
    monkeypatch.setattr("pcb_analysis.lvis_eval.load_ground_truth", _raise(exc))
    got, _, err = run_pcbkit(_eval_args(tmp_path, case))
    assert got == code and err.strip().splitlines() == [line]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_full_disk_in_the_training_log(tmp_path: Path) -> None:
    """metrics.jsonl is appended to (not atomic): a real ENOSPC (/dev/full) is named by its path."""
    from pcb_train.run_log import RunLog

    log = RunLog(tmp_path, enabled=True, purge_step=None, tensorboard=False)
    log.path = Path("/dev/full")
    with pytest.raises(PcbkitError, match="^/dev/full: no space left on device$"):
        log.write({"iteration": 1, "loss": 0.5})
