"""`pcbkit calibrate` on a tiny random-init Mask R-CNN and the synthetic dataset.

End to end through the CLI (one results file per row, a table of finite numbers), one backbone
pass for every statistic, offline (from a dump) == in-model box detections and AP, where the
statistics come from (Table 1 / Table 4), the logit-adjustment / NorCal identity, bad input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from pcb_analysis.calibration import Calibrator, logit_adjust
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_analysis.stats import ClassStats
from pcb_train.backends import build_backend, make_checkpoint, save_checkpoint
from pcb_train.calibrate import (
    TRAIN_MATRIX,
    UPPER_BOUND,
    CalibrateConfig,
    build_rows,
    calibrate_from_dump,
    calibrate_model,
    format_report_table,
    parse_grid,
    statistics_relation,
    table_csv,
)
from pcb_train.config import load_config, save_config
from pcb_train.dump_logits import DumpLogitsConfig, dump_logits

ROOT = Path(__file__).resolve().parents[1]
K = 12
N_IMAGES = 5
OVERRIDES = [
    f"model.num_classes={K}",
    "model.min_size=64",
    "model.max_size=64",
    "model.rpn_post_nms_top_n_test=40",
    "model.detections_per_image=50",
]


def write_model(folder: Path, categories: CategorySpace | None, k: int = K) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "configs" / "synth_tiny.yaml", [*OVERRIDES, f"model.num_classes={k}"])
    save_config(cfg, folder / "config.yaml")
    torch.manual_seed(0)
    backend = build_backend(cfg.model)
    save_checkpoint(
        folder / "model.pth",
        make_checkpoint(backend.model.state_dict(), backend.config, categories=categories),
    )
    return folder / "config.yaml", folder / "model.pth"


def dump(world: dict[str, Path], out: Path, split: str = "val", **kw: Any) -> Path:
    gt = world["gt"] if split == "val" else world["train_gt"]
    base: dict[str, Any] = {
        "checkpoint": world["checkpoint"],
        "config": world["config"],
        "gt": gt,
        "images": world["images"],
        "split": split,
        "out": out,
        "max_images": N_IMAGES,
        "batch_size": 1,
        "device": "cpu",
        "boxes": "per_class",
        "progress": False,
    }
    base.update(kw)
    dump_logits(DumpLogitsConfig(**base))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, synth_dataset: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calib_world")
    space = CategorySpace.from_lvis_json(synth_dataset / "val.json")
    config, ckpt = write_model(root / "model", space)
    w = {
        "root": root,
        "gt": synth_dataset / "val.json",
        "train_gt": synth_dataset / "train.json",
        "images": synth_dataset / "images",
        "config": config,
        "checkpoint": ckpt,
    }
    w["dump"] = dump(w, root / "dump_val")
    ClassStats.from_dump(w["dump"], progress=False).save(root / "val_stats.npz")
    w["stats"] = root / "val_stats.npz"
    return w


def model_cfg(world: dict[str, Path], out: Path, **kw: Any) -> CalibrateConfig:
    base: dict[str, Any] = {
        "stats": world["stats"],
        "gt": world["gt"],
        "out": out,
        "checkpoint": world["checkpoint"],
        "config": world["config"],
        "images": world["images"],
        "max_images": N_IMAGES,
        "batch_size": 1,
        "device": "cpu",
        "progress": False,
    }
    base.update(kw)
    return CalibrateConfig(**base)


def model_args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "calibrate",
        "--stats", str(world["stats"]),
        "--checkpoint", str(world["checkpoint"]),
        "--config", str(world["config"]),
        "--gt", str(world["gt"]),
        "--images", str(world["images"]),
        "--out", str(out),
        "--max-images", str(N_IMAGES),
        "--batch-size", "1",
        "--device", "cpu",
        "--workers", "0",
        "--no-progress",
        *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_calibrate_cli_end_to_end(
    world: dict[str, Path], tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    out = tmp_path / "res"
    args = model_args(world, out, "--stat", "none", "--stat", "ms", "--stat", "cm", "--stat", "cm-bayes",
                      "--gamma", "0,1", "--tau", "1")  # fmt: skip
    code, stdout, err = run_pcbkit(args)
    assert code == 0, err
    names = ["none", "ms", "cm", "cm-bayes", "norcal(0)", "norcal(1)", "logit-adj(1)"]
    slugs = ["none", "ms", "cm", "cm-bayes", "norcal-g0", "norcal-g1", "logit-adj-t1"]
    for s in slugs:
        results = json.loads((out / f"val-{s}.json").read_text())
        assert results and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(results[0])
    assert not list(out.glob(".*"))  # no temporaries left
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["stat"] for r in metrics["rows"]] == names
    assert metrics["statistics"]["label"] == UPPER_BOUND and metrics["statistics"]["relation"] == "same-split"
    assert metrics["images"] == N_IMAGES and metrics["provenance"]["checkpoint_hash"]
    for r in metrics["rows"]:
        for key in ("segm", "bbox", "segm_fixed", "bbox_fixed"):
            ap = r["metrics"][key]["AP"]
            assert ap is not None and math.isfinite(ap) and 0.0 <= ap <= 1.0, (r["stat"], key)
    # the printed table: one row per statistic, numbers in every cell
    lines = stdout.splitlines()
    assert UPPER_BOUND in lines[0]
    for name in names:
        row = next(ln for ln in lines if ln.startswith(name + " "))
        cells = row.split()[1:]
        assert len(cells) == 8 and all(math.isfinite(float(c)) for c in cells), row
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("stat,AP,APr,APc,APf,APb") and len(csv_lines) == 1 + len(names)
    # --json prints the same report
    code, stdout, err = run_pcbkit([*model_args(world, tmp_path / "j", "--stat", "none"), "--json"])
    assert code == 0, err
    assert json.loads(stdout)["rows"][0]["stat"] == "none"


def test_statistics_share_one_backbone_pass(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pcb_train.backends.torchvision import TinyBackbone

    calls = {"n": 0}
    real = TinyBackbone.forward

    def counting(self: TinyBackbone, x: torch.Tensor) -> Any:
        calls["n"] += 1
        return real(self, x)

    monkeypatch.setattr(TinyBackbone, "forward", counting)
    report = calibrate_model(
        model_cfg(
            world,
            tmp_path / "r",
            stat=("none", "ms", "cm", "cm-bayes"),
            gammas=(0.5,),
            batch_size=2,
            max_images=4,
        )
    )
    assert calls["n"] == 2  # 4 images in batches of 2: one pass per batch for all 5 statistics
    assert len(report.rows) == 5 and all(r["detections"] > 0 for r in report.rows)


# --------------------------------------------------------------------------------------------
# offline == in-model


def _boxes_of(path: Path) -> list[tuple[Any, ...]]:
    return [
        (e["image_id"], e["category_id"], tuple(e["bbox"]), e["score"]) for e in json.loads(path.read_text())
    ]


@pytest.mark.slow
def test_offline_box_ap_equals_in_model(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same model, split and batching: the dump replay gives the in-model detections bit for bit.

    A dump stores logits in float16; the predictor here emits float16-representable logits so that
    storage is lossless and any difference left would be the pipeline's (there is none)."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    real = FastRCNNPredictor.forward

    def fp16_logits(self: FastRCNNPredictor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, deltas = real(self, x)
        return scores.half().float(), deltas

    monkeypatch.setattr(FastRCNNPredictor, "forward", fp16_logits)
    d = dump(world, tmp_path / "dump")
    stats = tmp_path / "stats.npz"
    ClassStats.from_dump(d, progress=False).save(stats)
    out = tmp_path / "res"
    stat = ("none", "ms", "cm", "cm-bayes")
    in_model = calibrate_model(model_cfg(world, out, stats=stats, stat=stat, gammas=(1.0,)))
    offline = calibrate_from_dump(
        CalibrateConfig(
            stats=stats, gt=world["gt"], out=out, dump=d, stat=stat, gammas=(1.0,), progress=False
        )
    )
    assert [r["stat"] for r in in_model.rows] == [r["stat"] for r in offline.rows]
    for a, b in zip(in_model.rows, offline.rows, strict=True):
        assert a["detections"] == b["detections"] > 0
        assert _boxes_of(out / a["results"]) == _boxes_of(out / b["results"]), a["stat"]
        assert a["metrics"]["bbox"] == b["metrics"]["bbox"], a["stat"]
        assert a["metrics"]["bbox_fixed"] == b["metrics"]["bbox_fixed"], a["stat"]
    assert offline.statistics["label"] == UPPER_BOUND
    aps = {r["stat"]: r["metrics"]["bbox"]["AP"] for r in offline.rows}
    assert len(set(aps.values())) > 1  # the statistics do change the detections


def test_offline_mode_refuses_unusable_dumps(world: dict[str, Path], tmp_path: Path) -> None:
    pos = dump(world, tmp_path / "pos", positives_only=True, max_images=1)
    nobox = dump(world, tmp_path / "nobox", boxes="none", max_images=1)
    base = {"stats": world["stats"], "gt": world["gt"], "out": tmp_path / "out", "progress": False}
    with pytest.raises(PcbkitError, match="positives-only"):
        calibrate_from_dump(CalibrateConfig(dump=pos, **base))
    with pytest.raises(PcbkitError, match="per-class boxes"):
        calibrate_from_dump(CalibrateConfig(dump=nobox, **base))
    with pytest.raises(PcbkitError, match="takes no --checkpoint"):
        CalibrateConfig(dump=pos, checkpoint=world["checkpoint"], **base)
    with pytest.raises(PcbkitError, match="needs --checkpoint, --config, --images"):
        CalibrateConfig(**base)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# where the statistics come from


def test_train_statistics_are_labelled_table_4(world: dict[str, Path], tmp_path: Path) -> None:
    d = dump(world, tmp_path / "train_dump", split="train", boxes="none", positives_only=True)
    train = ClassStats.from_dump(d, progress=False)
    assert train.split == "train"
    rel = statistics_relation(train, "val", world["gt"])
    assert rel["relation"] == "train-split" and rel["label"].startswith(TRAIN_MATRIX)
    val = ClassStats.load(world["stats"])
    assert statistics_relation(val, "val", world["gt"])["label"] == UPPER_BOUND
    # a split name that differs but the dump read this very ground-truth file: still the same split
    assert statistics_relation(val, "lvis_val", world["gt"])["relation"] == "same-split"
    other = ClassStats.zeros(K, split="minival")
    assert statistics_relation(other, "val", world["gt"])["relation"] == "other-split"


# --------------------------------------------------------------------------------------------
# the rows' math


def test_logit_adjustment_equals_norcal_under_the_background_rule() -> None:
    """z[:K] - tau log(pi) with background kept IS norcal(freq=pi, gamma=tau).

    Hand case, K = 2, tau = 1: z = (0, 0, bg 0), pi = (0.8, 0.2) -> q = (1/3, 1/3, 1/3);
    adjusted foreground logits (-log 0.8, -log 0.2) -> p~ = (1/0.8, 1/0.2) / (1.25 + 5) = (0.2, 0.8);
    q~ = (2/3 * 0.2, 2/3 * 0.8, 1/3)."""
    z = torch.zeros(1, 3, dtype=torch.float64)
    prior = torch.tensor([0.8, 0.2], dtype=torch.float64)
    cal = Calibrator.build("norcal", None, num_classes=2, freq=prior, gamma=1.0)
    expected = torch.tensor([[2 / 15, 8 / 15, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(cal(torch.softmax(z, dim=1)), expected, rtol=0, atol=1e-12)
    # random property check against logit_adjust + foreground softmax + kept background
    g = torch.Generator().manual_seed(0)
    for tau in (0.5, 1.0, 2.0):
        logits = torch.randn(50, 8, generator=g, dtype=torch.float64) * 3
        pi = torch.rand(7, generator=g, dtype=torch.float64) * 100 + 1
        q = torch.softmax(logits, dim=1)
        adjusted = logit_adjust(logits, pi, tau)
        p_adj = torch.softmax(adjusted[:, :7], dim=1)
        via_la = torch.cat([(1 - q[:, 7:]) * p_adj, q[:, 7:]], dim=1)
        via_norcal = Calibrator.build("norcal", None, num_classes=7, freq=pi * 17.0, gamma=tau)(
            q
        )  # scale-free
        torch.testing.assert_close(via_la, via_norcal, rtol=1e-10, atol=1e-12)


def test_build_rows_names_and_priors(world: dict[str, Path]) -> None:
    stats = ClassStats.load(world["stats"])
    prior = torch.arange(1, K + 1, dtype=torch.float64)
    rows = build_rows(stats, ["none", "cm", "none"], gammas=(0.0, 0.5), taus=(1.0,), prior=prior)
    assert [r.name for r in rows] == ["none", "cm", "norcal(0)", "norcal(0.5)", "logit-adj(1)"]
    assert [r.slug for r in rows] == ["none", "cm", "norcal-g0", "norcal-g0.5", "logit-adj-t1"]
    q = torch.softmax(torch.randn(6, K + 1), dim=1)
    assert rows[0].transform(q) is q  # "none" is the identity: the model's own detections
    # norcal uses the training IMAGE counts of the statistics' category space, logit-adj the prior
    assert stats.categories is not None
    freq = torch.tensor(stats.categories.image_count, dtype=torch.float64)
    torch.testing.assert_close(
        rows[3].transform(q), Calibrator.build("norcal", None, num_classes=K, freq=freq, gamma=0.5)(q)
    )
    torch.testing.assert_close(
        rows[4].transform(q), Calibrator.build("norcal", None, num_classes=K, freq=prior, gamma=1.0)(q)
    )
    with pytest.raises(PcbkitError, match="unknown statistic"):
        build_rows(stats, ["cm2"])
    with pytest.raises(PcbkitError, match="nothing to evaluate"):
        build_rows(stats, [])


def test_parse_grid() -> None:
    assert parse_grid("0,0.5,1", "--gamma") == (0.0, 0.5, 1.0)
    assert parse_grid(" 1 , 1 ,", "--tau") == (1.0,)
    assert parse_grid(None, "--gamma") == ()
    with pytest.raises(PcbkitError, match="--gamma: 'x' is not a number"):
        parse_grid("0,x", "--gamma")
    with pytest.raises(PcbkitError, match=">= 0"):
        parse_grid("-1", "--tau")


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, no result files


def _gt_copy(world: dict[str, Path], path: Path, edit: Any) -> Path:
    data = json.loads(world["gt"].read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


def test_bad_input_is_one_line_exit_2_and_leaves_no_results(
    world: dict[str, Path], tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    out = tmp_path / "out"
    args = model_args(world, out, "--stat", "cm")
    _, ckpt5 = write_model(tmp_path / "k5", None, k=5)
    empty_dir = tmp_path / "no_images"
    empty_dir.mkdir()

    def rename_first(d: dict[str, Any]) -> None:
        d["categories"][0]["name"] = "renamed"

    cases = {
        "checkpoint is for K=5 classes": _swap(args, "--checkpoint", str(ckpt5)),
        "differ from the statistics' category space": _swap(
            args, "--gt", str(_gt_copy(world, tmp_path / "other_cats.json", rename_first))
        ),
        "image file not found": _swap(args, "--images", str(empty_dir)),
        "empty split": _swap(
            args,
            "--gt",
            str(_gt_copy(world, tmp_path / "empty.json", lambda d: d.update(images=[], annotations=[]))),
        ),
        "statistics file not found": _swap(args, "--stats", str(tmp_path / "missing.npz")),
        "--tau": [*args, "--tau", "x"],
    }
    for expected, case in cases.items():
        code, _, err = run_pcbkit(case)
        assert code == 2, (expected, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("pcbkit: error:")]
        assert len(lines) == 1 and expected in lines[0], (expected, err)
        assert "Traceback" not in err
        assert not out.exists(), expected


def test_tau_needs_instance_counts(world: dict[str, Path], tmp_path: Path) -> None:
    def drop_counts(d: dict[str, Any]) -> None:
        for c in d["categories"]:
            c.pop("instance_count", None)

    gt = _gt_copy(world, tmp_path / "gt.json", drop_counts)
    with pytest.raises(PcbkitError, match="instance_count"):
        calibrate_from_dump(
            CalibrateConfig(
                stats=world["stats"],
                gt=gt,
                out=tmp_path / "o",
                dump=world["dump"],
                taus=(1.0,),
                progress=False,
            )
        )
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# the shared post-processing


def test_batched_nms_equals_torchvision_bit_for_bit() -> None:
    from torchvision.ops import boxes as box_ops

    from pcb_train.backends.postprocess import batched_nms

    g = torch.Generator().manual_seed(0)
    for n, k in ((40, 3), (3000, 40), (20000, 300)):  # the last two take the per-class path
        xy = torch.rand(n, 2, generator=g) * 200
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 60 + 1], dim=1)
        scores = torch.rand(n, generator=g)
        scores[::5] = scores[0]  # ties: the final order must still agree
        groups = torch.randint(1, k + 1, (n,), generator=g)
        assert torch.equal(
            batched_nms(boxes, scores, groups, 0.5), box_ops.batched_nms(boxes, scores, groups, 0.5)
        )


def test_select_detections_hand_case() -> None:
    """Two proposals, K = 2, threshold 0.05, NMS 0.5, at most 3 detections.

    q rows (c0, c1, bg): (0.6, 0.1, 0.3), (0.5, 0.04, 0.46). Candidates above 0.05: (row 0, c0) 0.6,
    (row 0, c1) 0.1, (row 1, c0) 0.5. Row 1's c0 box overlaps row 0's c0 box with IoU 81/119 = 0.68
    > 0.5: suppressed. Kept, by score: (0, c0) 0.6, (0, c1) 0.1."""
    from pcb_train.backends.postprocess import select_detections

    q = torch.tensor([[0.6, 0.1, 0.3], [0.5, 0.04, 0.46]])
    box = torch.tensor([0.0, 0.0, 10.0, 10.0])
    boxes = torch.stack([torch.stack([box, box + 20]), torch.stack([box + 1, box + 1])])  # [2, 2, 4]
    d = select_detections(q, boxes, score_thresh=0.05, nms_thresh=0.5, detections_per_image=3)
    assert d.labels.tolist() == [0, 1] and d.scores.tolist() == pytest.approx([0.6, 0.1])
    assert d.flat.tolist() == [0, 1] and torch.equal(d.boxes, torch.stack([box, box + 20]))
    one = select_detections(q, boxes, score_thresh=0.05, nms_thresh=0.5, detections_per_image=1)
    assert one.flat.tolist() == [0]


# --------------------------------------------------------------------------------------------
# fixed AP: uncapped detections, 10,000 per class


def test_per_class_top_keeps_the_best_per_class_in_arrival_order_on_ties() -> None:
    from pcb_analysis.lvis_results import PerClassTop, ResultsFile

    top = PerClassTop(2)
    entries = [
        {"category_id": c, "score": s, "n": i}
        for i, (c, s) in enumerate([(7, 0.1), (7, 0.9), (3, 0.5), (7, 0.5), (7, 0.9), (7, 0.2), (3, 0.4)])
    ]
    top.add(entries)  # class 7 reaches 2 x 2 entries at its 4th: pruned on the way
    with pytest.raises(ValueError, match="per_class"):
        PerClassTop(0)

    class Sink(ResultsFile):
        def __init__(self) -> None:
            self.got: list[dict[str, Any]] = []

        def add(self, entries: Any) -> None:
            self.got.extend(entries)

    sink = Sink()
    top.drain_into(sink)
    # class 3: both (0.5, 0.4); class 7: 0.9 (n=1) before the tied 0.9 (n=4), 0.5 and lower dropped
    assert [(e["category_id"], e["score"], e["n"]) for e in sink.got] == [
        (3, 0.5, 2),
        (3, 0.4, 6),
        (7, 0.9, 1),
        (7, 0.9, 4),
    ]


def test_select_detections_uncapped_is_the_sorted_superset_of_capped() -> None:
    from pcb_train.backends.postprocess import select_detections

    g = torch.Generator().manual_seed(0)
    r, k = 30, 4
    q = torch.softmax(torch.randn(r, k + 1, generator=g) * 3, dim=1)
    xy = torch.rand(r, k, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(r, k, 2, generator=g) * 20], dim=2)
    kw = {"score_thresh": 1e-4, "nms_thresh": 0.5}
    full = select_detections(q, boxes, detections_per_image=-1, **kw)
    capped = select_detections(q, boxes, detections_per_image=7, **kw)
    assert full.scores.numel() > 7 and capped.scores.numel() == 7
    assert torch.equal(full.flat[:7], capped.flat) and torch.equal(full.scores[:7], capped.scores)
    assert torch.all(full.scores[:-1] >= full.scores[1:])


def test_fixed_ap_results_are_uncapped_and_standard_results_their_per_image_prefix(
    world: dict[str, Path], tmp_path: Path
) -> None:
    # a config with a cap of 3 detections per image, so the cap binds
    folder = tmp_path / "capped"
    cfg = load_config(world["config"], ["model.detections_per_image=3"])
    save_config(cfg, folder / "config.yaml")
    out = tmp_path / "res"
    report = calibrate_model(model_cfg(world, out, config=folder / "config.yaml", stat=("none",)))
    std = json.loads((out / "val-none.json").read_text())
    fixed = json.loads((out / "val-none-fixed.json").read_text())
    row = report.rows[0]
    assert row["fixed_results"] == "val-none-fixed.json" and row["fixed_detections"] == len(fixed)
    per_image: dict[int, list[dict[str, Any]]] = {}
    for e in std:
        per_image.setdefault(e["image_id"], []).append(e)
    assert max(len(v) for v in per_image.values()) == 3 and len(fixed) > len(std)
    # every standard detection is among the uncapped ones, and they are each image's 3 best
    key = lambda e: (e["image_id"], e["category_id"], tuple(round(v, 3) for v in e["bbox"]), e["score"])  # noqa: E731
    fixed_keys = {key(e) for e in fixed}
    assert all(key(e) in fixed_keys for e in std)
    for iid, dets in per_image.items():
        best = sorted((e["score"] for e in fixed if e["image_id"] == iid), reverse=True)[:3]
        assert sorted((e["score"] for e in dets), reverse=True) == best
    m = row["metrics"]
    assert m["segm_fixed"]["AP"] != m["segm"]["AP"] or m["bbox_fixed"]["AP"] != m["bbox"]["AP"]
    # --no-fixed-ap: no fixed file and no fixed metrics
    out2 = tmp_path / "res2"
    report2 = calibrate_model(
        model_cfg(world, out2, config=folder / "config.yaml", stat=("none",), fixed_ap=False)
    )
    assert not (out2 / "val-none-fixed.json").exists() and "segm_fixed" not in report2.rows[0]["metrics"]
    assert json.loads((out2 / "val-none.json").read_text()) == std


def test_several_calibrations_share_one_pass_and_equal_separate_runs(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pcb_train.backends.torchvision import TinyBackbone
    from pcb_train.calibrate import calibrate_models

    a = model_cfg(world, tmp_path / "a", stat=("none", "cm"))
    b = model_cfg(world, tmp_path / "b", stat=("ms",), ridge=0.1)
    sep = [
        calibrate_model(model_cfg(world, tmp_path / "sa", stat=("none", "cm"))),
        calibrate_model(model_cfg(world, tmp_path / "sb", stat=("ms",), ridge=0.1)),
    ]
    calls = {"n": 0}
    original = TinyBackbone.forward

    def counting(self: Any, x: Any) -> Any:
        calls["n"] += 1
        return original(self, x)

    monkeypatch.setattr(TinyBackbone, "forward", counting)
    both = calibrate_models([a, b])
    assert calls["n"] == N_IMAGES  # batch size 1: one backbone pass per image for both calibrations
    for got, want, out, ref in ((both[0], sep[0], "a", "sa"), (both[1], sep[1], "b", "sb")):
        assert [r["metrics"] for r in got.rows] == [r["metrics"] for r in want.rows]
        for f in (tmp_path / ref).glob("val-*.json"):
            assert (tmp_path / out / f.name).read_bytes() == f.read_bytes()
    with pytest.raises(PcbkitError, match="agree on max_images"):
        calibrate_models([a, model_cfg(world, tmp_path / "c", max_images=2)])
    with pytest.raises(PcbkitError, match="distinct output folders"):
        calibrate_models([a, a])


def test_rle_cache_encodes_each_pair_once_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import pcb_train.backends.postprocess as base

    cats = CategorySpace(ids=(5, 9), names=("a", "b"), frequency=("r", "f"), image_count=(1, 2))
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 6, 7, generator=g) > 0.5
    det = {
        "boxes": torch.tensor([[0.0, 0, 3, 3]] * 4),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([0, 1, 0, 1]),
        "masks": masks,
        "pairs": torch.tensor([3, 8, 11, 20]),
    }
    other = {k: v[[2, 0]] for k, v in det.items()}  # a second set sharing pairs 11 and 3
    plain = base.detections_to_lvis(det, 1, cats) + base.detections_to_lvis(other, 1, cats)
    encoded: list[int] = []
    real = base.encode_masks
    monkeypatch.setattr(base, "encode_masks", lambda m: (encoded.append(m.shape[0]), real(m))[1])
    cache: dict[int, dict[str, Any]] = {}
    cached = base.detections_to_lvis(det, 1, cats, cache) + base.detections_to_lvis(other, 1, cats, cache)
    assert cached == plain and encoded == [4] and sorted(cache) == [3, 8, 11, 20]


def test_metrics_equal_separate_evaluations_of_the_written_files(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from pcb_analysis.lvis_eval import evaluate
    from pcb_train.inference import ground_truth_for_images

    out = tmp_path / "res"
    report = calibrate_model(model_cfg(world, out, stat=("none", "cm")))
    import json as _json

    ids = sorted({e["image_id"] for e in _json.loads((out / "val-none-fixed.json").read_text())})
    all_ids = [im["id"] for im in _json.loads(world["gt"].read_text())["images"]]
    gt = ground_truth_for_images(world["gt"], sorted(all_ids)[:N_IMAGES])
    assert set(ids) <= set(sorted(all_ids)[:N_IMAGES])
    for row in report.rows:
        for t in ("segm", "bbox"):
            assert row["metrics"][t] == evaluate(gt, out / row["results"], t)
            assert row["metrics"][f"{t}_fixed"] == evaluate(gt, out / row["fixed_results"], t, fixed=True)


def test_max_dets_adds_the_capped_evaluation_of_the_same_results(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from pcb_analysis.lvis_compat import reference_evaluate
    from pcb_analysis.lvis_eval import evaluate
    from pcb_train.inference import ground_truth_for_images

    out = tmp_path / "res"
    report = calibrate_model(model_cfg(world, out, stat=("none",), max_dets=2))
    row = report.rows[0]
    all_ids = sorted(im["id"] for im in json.loads(world["gt"].read_text())["images"])[:N_IMAGES]
    gt = ground_truth_for_images(world["gt"], all_ids)
    results = json.loads((out / row["results"]).read_text())
    assert max(sum(e["image_id"] == i for e in results) for i in all_ids) > 2  # the cap of 2 binds
    for t in ("segm", "bbox"):
        capped = row["metrics"][f"{t}@2"]
        assert capped == evaluate(gt, out / row["results"], t, max_dets=2)
        assert row["metrics"][t] == evaluate(gt, out / row["results"], t)  # the 300 cap is unchanged
        if t == "bbox":  # lvis-api with the same cap on the same file (its gt restricted to the images run)
            sub = json.loads(world["gt"].read_text())
            keep = set(all_ids)
            sub["images"] = [im for im in sub["images"] if im["id"] in keep]
            sub["annotations"] = [a for a in sub["annotations"] if a["image_id"] in keep]
            ref = reference_evaluate(sub, results, t, max_dets=2)
            assert max(abs(capped[k] - ref[k]) for k in ref) <= 1e-9
    assert "AP@2" in format_report_table(report) and "APb@2" in table_csv(report)
    # the default (300) adds no entry; a cap above the detector's is refused before anything is written
    plain = calibrate_model(model_cfg(world, tmp_path / "plain", stat=("none",)))
    assert set(plain.rows[0]["metrics"]) == {"segm", "bbox", "segm_fixed", "bbox_fixed"}
    with pytest.raises(PcbkitError, match="exceeds the detector's cap"):
        calibrate_model(model_cfg(world, tmp_path / "big", stat=("none",), max_dets=51))  # cap 50
    assert not (tmp_path / "big").exists()
    with pytest.raises(PcbkitError, match="--max-dets must be >= 1"):
        model_cfg(world, tmp_path / "zero", max_dets=0)


# --------------------------------------------------------------------------------------------
# the fast path: no mask for a detection that no output keeps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_class_top_bar_skips_only_entries_outside_the_top_even_with_ties(seed: int) -> None:
    from pcb_analysis.lvis_results import PerClassTop, ResultsFile

    class Sink(ResultsFile):
        def __init__(self) -> None:
            self.got: list[int] = []

        def add(self, entries: Any) -> None:
            self.got.extend(e["n"] for e in entries)

    g = torch.Generator().manual_seed(seed)
    per_class, n = 4, 600
    cats = torch.randint(1, 4, (n,), generator=g).tolist()
    scores = (torch.randint(1, 6, (n,), generator=g) / 10).tolist()  # 5 values: ties everywhere
    pairs = enumerate(zip(cats, scores, strict=True))
    entries = [{"category_id": c, "score": s, "n": i} for i, (c, s) in pairs]
    # brute force: per category (by id), the per_class best by (score desc, arrival asc)
    want = [e["n"] for c in sorted(set(cats))
            for e in sorted((e for e in entries if e["category_id"] == c),
                            key=lambda e: (-e["score"], e["n"]))[:per_class]]
    full, fast = PerClassTop(per_class), PerClassTop(per_class)
    skipped = tied = 0
    for start in range(0, n, 30):  # "images" of 30 entries; bars read once per batch of 2 images
        if start % 60 == 0:
            bars = {c: fast.bar(c) for c in (1, 2, 3)}
        batch = entries[start : start + 30]
        full.add(batch)
        kept = [e for e in batch if e["score"] > bars[e["category_id"]]]
        skipped += len(batch) - len(kept)
        tied += sum(e["score"] == bars[e["category_id"]] for e in batch)
        fast.add(kept)
    a, b = Sink(), Sink()
    full.drain_into(a)
    fast.drain_into(b)
    assert a.got == want and b.got == want
    assert skipped > n // 2 and tied > 0  # the bar does skip, ties at the bar included
    assert fast.bar(1) == -math.inf  # drained: forgotten


def test_fast_path_writes_the_same_bytes_and_metrics_and_skips_masks(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a per-class top of 2 so that the bars rise within a few images; the reference run disables the
    # bars (every uncapped detection gets a mask, the path before the fast one)
    import pcb_train.calibrate.results as results_mod
    from pcb_analysis.lvis_results import PerClassTop
    from pcb_train.backends.torchvision.roi_heads import PCBRoIHeads

    monkeypatch.setattr(results_mod, "FIXED_AP_PER_CLASS", 2)
    rois: list[int] = []
    original = PCBRoIHeads.mask_probabilities

    def counting(self: Any, features: Any, boxes: Any, *a: Any) -> Any:
        rois.append(sum(int(b.shape[0]) for b in boxes))
        return original(self, features, boxes, *a)

    monkeypatch.setattr(PCBRoIHeads, "mask_probabilities", counting)
    kw = {"stat": ("none", "cm", "ms"), "batch_size": 2, "max_dets": 2}
    fast = calibrate_model(model_cfg(world, tmp_path / "fast", **kw))
    fast_rois = sum(rois)
    rois.clear()
    monkeypatch.setattr(PerClassTop, "bar", lambda self, c: -math.inf)
    slow = calibrate_model(model_cfg(world, tmp_path / "slow", **kw))
    assert fast_rois < sum(rois)  # masks skipped
    assert [r["metrics"] for r in fast.rows] == [r["metrics"] for r in slow.rows]
    files = sorted(p.name for p in (tmp_path / "slow").glob("val-*.json"))
    assert len(files) == 6
    for name in files:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes()


def test_rows_evaluated_in_forked_workers_equal_one_after_the_other(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pcb_train.calibrate.results as results_mod
    from pcb_train.inference import ground_truth_for_images

    out = tmp_path / "res"
    report = calibrate_model(model_cfg(world, out, stat=("none", "cm", "ms")))
    ids = sorted(im["id"] for im in json.loads(world["gt"].read_text())["images"])[:N_IMAGES]
    gt = ground_truth_for_images(world["gt"], ids)
    jobs = [(out / r["results"], r["detections"], (out / r["fixed_results"], r["fixed_detections"]))
            for r in report.rows]
    pools: list[int] = []
    real_pool = results_mod.mp.get_context("fork").Pool

    class Ctx:
        def Pool(self, n: int) -> Any:  # noqa: N802 - multiprocessing's name
            pools.append(n)
            return real_pool(n)

    monkeypatch.setattr(results_mod.mp, "get_context", lambda method: Ctx())
    monkeypatch.setattr(results_mod, "default_workers", lambda: 2)
    forked = results_mod.evaluate_rows(gt, jobs, ("segm", "bbox"), max_dets=3)
    assert pools == [2]  # one pool of row evaluators (each matching in-process)
    monkeypatch.setattr(results_mod, "default_workers", lambda: 1)
    serial = results_mod.evaluate_rows(gt, jobs, ("segm", "bbox"), max_dets=3)
    assert forked == serial
    standard = [{k: v for k, v in m.items() if "@" not in k} for m in serial]
    assert standard == [r["metrics"] for r in report.rows]
