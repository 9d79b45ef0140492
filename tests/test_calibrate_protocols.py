"""The calibration protocols: in-sample, train and cross-fitted (`pcbkit calibrate --cross-fit`).

Offline from a dump of the tiny model, and once in-model: each image of fold i is calibrated with the
statistics of the other folds (its entries equal a run with that fold file's statistics), the results
of all images land in one file per row evaluated once, identical folds reproduce the in-sample results,
and the protocol is recorded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_calibrate

from pcb_analysis.dumps import DumpReader
from pcb_analysis.errors import PcbkitError
from pcb_analysis.folds import fold_path, fold_statistics, image_fold, write_fold_statistics
from pcb_analysis.stats import ClassStats
from pcb_train.calibrate import (
    CalibrateConfig,
    calibrate_from_dump,
    calibrate_model,
    parse_grids,
    protocol_of,
)

world = test_calibrate.world  # the module fixture: the tiny model, its val dump and statistics
model_cfg, model_args = test_calibrate.model_cfg, test_calibrate.model_args
STATS = ("none", "ms", "cm")


def offline(world: dict[str, Path], stats: Path, out: Path, **kw: Any) -> dict[str, Any]:
    kw.setdefault("stat", STATS)
    cfg = CalibrateConfig(stats=stats, gt=world["gt"], out=out, dump=world["dump"], progress=False, **kw)
    return calibrate_from_dump(cfg).to_dict()


def entries(path: Path, images: set[int] | None = None) -> list[tuple[Any, ...]]:
    data = json.loads(path.read_text())
    return [(e["image_id"], e["category_id"], tuple(e["bbox"]), e["score"]) for e in data
            if images is None or e["image_id"] in images]


def two_fold_seed(image_ids: list[int]) -> int:
    """The first seed that puts the images in both of two folds."""
    return next(s for s in range(100) if len({image_fold(i, 2, s) for i in image_ids}) == 2)


def identical_folds(src: Path, dest: Path, folds: int = 2) -> Path:
    """`src` copied to `dest`, and F fold files beside it that all hold `src`'s statistics."""
    st = ClassStats.load(src)
    st.save(dest)
    for i in range(1, folds + 1):
        st.extra["fold"] = {"fold": i, "folds": folds, "seed": 0, "images": 0, "held_out_images": 0,
                            "contents": "test: the full statistics"}
        st.save(fold_path(dest, i, folds))
    return dest


def test_protocol_of_relation() -> None:
    assert protocol_of("same-split", False) == "in-sample"
    assert protocol_of("train-split", False) == "train"
    assert protocol_of("other-split", False) == "other-split"
    assert protocol_of("same-split", True) == "cross-fitted"


def test_cross_fitted_images_get_the_other_folds_statistics(world: dict[str, Path], tmp_path: Path) -> None:
    ids = [int(i) for i in DumpReader(world["dump"]).image_ids().tolist()]
    seed = two_fold_seed(ids)
    stats = tmp_path / "val.npz"
    ClassStats.load(world["stats"]).save(stats)
    folds = fold_statistics(world["dump"], 2, seed, progress=False)
    write_fold_statistics(stats, folds)
    in_fold = {f: {i for i in ids if image_fold(i, 2, seed) == f} for f in (1, 2)}

    cross = offline(world, stats, tmp_path / "cross", cross_fit=True)
    assert cross["statistics"]["protocol"] == "cross-fitted"
    assert cross["statistics"]["cross_fit"]["folds"] == 2 and cross["statistics"]["cross_fit"]["seed"] == seed
    assert all(r["protocol"] == "cross-fitted" for r in cross["rows"])
    # fold i's statistics = every image except fold i; fold i's images are calibrated with exactly them
    alone = {f: offline(world, fold_path(stats, f, 2), tmp_path / f"fold{f}") for f in (1, 2)}
    differ = False
    for row, r1, r2 in zip(cross["rows"], alone[1]["rows"], alone[2]["rows"], strict=True):
        got = entries(tmp_path / "cross" / row["results"])
        for f, r in ((1, r1), (2, r2)):
            mine = entries(tmp_path / f"fold{f}" / r["results"], in_fold[f])
            assert [e for e in got if e[0] in in_fold[f]] == mine, (row["stat"], f)
        other = entries(tmp_path / "fold2" / r2["results"], in_fold[1])
        differ |= other != entries(tmp_path / "fold1" / r1["results"], in_fold[1])
        assert row["detections"] == len(got)  # one file of every image, evaluated once
    assert differ  # the two folds' statistics do give fold 1's images different detections
    # the full (in-sample) statistics are a third answer
    insample = offline(world, stats, tmp_path / "in")
    assert insample["statistics"]["protocol"] == "in-sample"
    assert {r["protocol"] for r in insample["rows"]} == {"in-sample"}


def test_identical_folds_reproduce_the_in_sample_results(world: dict[str, Path], tmp_path: Path) -> None:
    stats = identical_folds(world["stats"], tmp_path / "full.npz")
    grids = parse_grids(["lambda=0.5"])
    a = offline(world, stats, tmp_path / "in", stat=(*STATS, "cm-diagshrink"), grids=grids)
    b = offline(world, stats, tmp_path / "cross", stat=(*STATS, "cm-diagshrink"), grids=grids, cross_fit=True)
    assert [r["stat"] for r in a["rows"]] == [r["stat"] for r in b["rows"]]
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra["results"] == rb["results"]
        got = (tmp_path / "cross" / rb["results"]).read_bytes()
        assert (tmp_path / "in" / ra["results"]).read_bytes() == got, ra["stat"]
        assert ra["metrics"] == rb["metrics"]
        assert (ra["protocol"], rb["protocol"]) == ("in-sample", "cross-fitted")


def test_in_model_cross_fit_with_identical_folds_equals_in_sample(
    world: dict[str, Path], tmp_path: Path
) -> None:
    stats = identical_folds(world["stats"], tmp_path / "full.npz")
    a = calibrate_model(model_cfg(world, tmp_path / "in", stats=stats, stat=STATS, fixed_ap=False))
    b = calibrate_model(model_cfg(world, tmp_path / "cross", stats=stats, stat=STATS, fixed_ap=False,
                                  cross_fit=True))
    assert b.statistics["protocol"] == "cross-fitted" and b.images == a.images
    for ra, rb in zip(a.rows, b.rows, strict=True):  # batch size 1: images fold by fold, same detections
        got = sorted(entries(tmp_path / "cross" / rb["results"]))
        assert sorted(entries(tmp_path / "in" / ra["results"])) == got
        assert ra["metrics"] == rb["metrics"]


def test_train_statistics_are_the_train_protocol(world: dict[str, Path], tmp_path: Path) -> None:
    st = ClassStats.load(world["stats"])
    st.split, st.source = "train", ""
    st.save(tmp_path / "train.npz")
    rep = offline(world, tmp_path / "train.npz", tmp_path / "out", stat=("cm",))
    assert rep["statistics"]["protocol"] == "train" and rep["rows"][0]["protocol"] == "train"
    identical_folds(tmp_path / "train.npz", tmp_path / "train.npz")
    with pytest.raises(PcbkitError, match="--cross-fit needs statistics of the evaluated split 'val'"):
        offline(world, tmp_path / "train.npz", tmp_path / "out2", stat=("cm",), cross_fit=True)


def test_cross_fit_bad_input(
    world: dict[str, Path], tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    stats = tmp_path / "val.npz"
    ClassStats.load(world["stats"]).save(stats)
    out = tmp_path / "out"
    code, _, err = run_pcbkit(model_args(world, out, "--stats", str(stats), "--cross-fit"))
    assert code == 2 and "no fold statistics beside it" in err and not out.exists()
    identical_folds(world["stats"], stats)
    with pytest.raises(PcbkitError, match="ms-eq.*not available with fold statistics"):
        offline(world, stats, out, stat=("ms-eq",), grids=parse_grids(["eta=1"]), cross_fit=True)
    other = ClassStats.load(fold_path(stats, 2, 2))
    other.source = "/elsewhere/dump"
    other.save(fold_path(stats, 2, 2))
    with pytest.raises(PcbkitError, match="read from '/elsewhere/dump'"):
        offline(world, stats, out, cross_fit=True)
    wrong = ClassStats.load(fold_path(stats, 1, 2))
    wrong.extra["fold"]["fold"] = 2
    wrong.save(fold_path(stats, 1, 2))
    with pytest.raises(PcbkitError, match="says fold 2 of 2, the file name fold 1 of 2"):
        offline(world, stats, out, cross_fit=True)
    assert not out.exists()


def test_cli_cross_fitted_sweep_offline(
    world: dict[str, Path], tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    stats = tmp_path / "val.npz"
    code, out, err = run_pcbkit(["stats", "--dump", str(world["dump"]), "--out", str(stats), "--no-progress",
                                 "--no-clip-mass", "--split-folds", "2", "--fold-seed", "1"])
    assert code == 0, err
    res = tmp_path / "res"
    code, out, err = run_pcbkit(["calibrate", "--dump", str(world["dump"]), "--stats", str(stats), "--gt",
                                 str(world["gt"]), "--out", str(res), "--no-progress", "--cross-fit",
                                 "--stat", "ms", "--stat", "cm-diagshrink", "--grid", "lambda=0,1"])
    assert code == 0, err
    assert "cross-fitted: each image calibrated with the statistics of the other 1 fold(s) of 2" in out
    assert [ln.split()[0] for ln in out.splitlines()[2:5]] == [
        "ms", "cm-diagshrink(lambda=0)", "cm-diagshrink(lambda=1)"]
    metrics = json.loads((res / "metrics-offline.json").read_text())
    assert metrics["statistics"]["cross_fit"]["files"] == [str(fold_path(stats, i, 2)) for i in (1, 2)]
    by = {r["stat"]: r for r in metrics["rows"]}
    shrunk = (res / by["cm-diagshrink(lambda=1)"]["results"]).read_bytes()
    assert (res / by["ms"]["results"]).read_bytes() == shrunk  # cross-fitted too, lambda = 1 is ms
