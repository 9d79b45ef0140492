"""Offline calibration: box AP of every row from a dump, without the model.

Input: a FULL dump (not positives-only) written with per-class regressed boxes (`pcbkit
dump-logits --boxes per-class`). Per image: q from the stored logits [r, K+1] with the backend's
own softmax, each row's transform, then the SAME `select_detections` the model's `infer` runs, on
the stored boxes [r, K, 4] (original pixels). Box AP only (a dump has no masks). On the same
model, split and batching the detections equal the in-model ones whenever the logits are
float16-representable; otherwise only the dump's float16 rounding of the logits differs
(docs/calibration.md §3). Cross-fitted (`cfg.cross_fit`): each image takes the rows of its fold's
out-of-fold statistics (`protocols`). Memory: one chunk of dump rows plus one image.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps import MANIFEST_NAME, DumpReader
from pcb_analysis.errors import input_error
from pcb_train.backends import (
    ScoreTransform,
    detections_to_lvis,
    select_detections,
    softmax_probabilities,
)
from pcb_train.calibrate.options import CalibrateConfig
from pcb_train.calibrate.protocols import calibration_rows
from pcb_train.calibrate.report import CalibrationReport
from pcb_train.calibrate.results import check_max_dets, open_row_results
from pcb_train.calibrate.rows import load_statistics
from pcb_train.config import ModelConfig
from pcb_train.data import load_lvis_json
from pcb_train.inference import ground_truth_for_images

OFFLINE_CHUNK_ROWS = 2048  # rows read per chunk (per-class boxes: 2048 x 4812 float32 = 39 MB at K = 1,203)


def class_probabilities_for(backend_name: str) -> Callable[[Tensor], Tensor]:
    """The softmax the named backend scores with in-model (so the offline path gets its exact q)."""
    if backend_name == "torchvision":
        # imported only when named, as `build_backend` does: a backend module is loaded on demand
        from pcb_train.backends.torchvision import PCBRoIHeads

        return PCBRoIHeads.class_probabilities
    return softmax_probabilities


def iter_dump_images(
    reader: DumpReader, chunk_rows: int = OFFLINE_CHUNK_ROWS
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(image_id, logits [r, K+1] float16, regressed [r, K*4] float32) per image of a dump, in dump
    order. An image's rows are contiguous within one shard; chunks may cut them, so they are
    carried over (memory: one chunk + one image)."""
    cur: int | None = None
    parts_z: list[Tensor] = []
    parts_b: list[Tensor] = []
    columns = ("image_ids", "logits", "regressed")
    for chunk in reader.iter_chunks(rows=chunk_rows, columns=columns, as_torch=True):
        ids = chunk["image_ids"]
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        start = 0
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            if cur is not None and v != cur:
                yield cur, torch.cat(parts_z), torch.cat(parts_b)
                parts_z, parts_b = [], []
            cur = v
            parts_z.append(chunk["logits"][start : start + c])
            parts_b.append(chunk["regressed"][start : start + c])
            start += c
    if cur is not None:
        yield cur, torch.cat(parts_z), torch.cat(parts_b)


def postprocess_records(
    logits: Tensor,
    boxes: Tensor,
    transforms: Mapping[str, ScoreTransform],
    probabilities: Callable[[Tensor], Tensor] = softmax_probabilities,
    *,
    score_thresh: float,
    nms_thresh: float,
    detections_per_image: int,
) -> dict[str, dict[str, Tensor]]:
    """One image offline: logits [r, K+1] (background last), per-class boxes [r, K, 4] (original
    pixels) -> {name: {"boxes", "scores", "labels"}} through q = probabilities(logits), each
    transform, and `select_detections` (the function `infer` runs)."""
    q = probabilities(logits)
    out: dict[str, dict[str, Tensor]] = {}
    for name, fn in transforms.items():
        qt = fn(q)
        d = select_detections(
            qt,
            boxes,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_image=detections_per_image,
        )
        out[name] = {"boxes": d.boxes, "scores": d.scores, "labels": d.labels}
    return out


def _open_dump(cfg: CalibrateConfig, categories: CategorySpace) -> tuple[DumpReader, dict[str, Any]]:
    """The dump of `cfg`, refused unless it is a full dump with per-class boxes of these categories."""
    assert cfg.dump is not None
    reader = DumpReader(cfg.dump)
    manifest = Path(cfg.dump) / MANIFEST_NAME
    if reader.categories.hash != categories.hash:
        raise input_error(
            cfg.gt,
            f"categories (hash {categories.hash}, K={categories.num_classes}) differ from the dump's "
            f"{manifest} (hash {reader.categories.hash}, K={reader.num_classes})",
        )
    if reader.regressed != "per_class":
        raise input_error(
            manifest,
            f"the dump stores regressed boxes {reader.regressed!r}; offline evaluation needs per-class boxes "
            "(rerun `pcbkit dump-logits --boxes per-class`)",
        )
    prov = reader.provenance
    dump_opts = (prov.get("config") or {}).get("dump") or {}
    if dump_opts.get("positives_only"):
        raise input_error(
            manifest,
            "the dump is positives-only (matched proposals only); offline evaluation needs a full dump",
        )
    return reader, prov


def calibrate_from_dump(cfg: CalibrateConfig) -> CalibrationReport:
    """Offline mode: box AP of every row from a full dump with per-class boxes, without the model."""
    t0 = time.perf_counter()
    assert cfg.dump is not None
    if not Path(cfg.stats).is_file():
        raise input_error(cfg.stats, "statistics file not found")
    categories = CategorySpace.from_lvis_json(cfg.gt)
    reader, prov = _open_dump(cfg, categories)
    manifest = Path(cfg.dump) / MANIFEST_NAME
    stats = load_statistics(cfg.stats, categories, cfg.gt)
    model = (prov.get("config") or {}).get("model") or {}
    defaults = ModelConfig()
    score_thresh = float(model.get("score_thresh", defaults.score_thresh))
    nms_thresh = float(model.get("nms_thresh", defaults.nms_thresh))
    per_image = int(model.get("detections_per_image", defaults.detections_per_image))
    check_max_dets(cfg.max_dets, per_image)
    probabilities = class_probabilities_for(str(model.get("backend", "torchvision")))
    split = cfg.split or reader.split
    rows, cross, relation = calibration_rows(cfg, stats, categories, split)
    dump_ids = [int(i) for i in reader.image_ids().tolist()]
    gt_ids = [int(im["id"]) for im in load_lvis_json(cfg.gt)["images"]]
    unknown = sorted(set(dump_ids) - set(gt_ids))
    if unknown:
        raise input_error(cfg.gt, f"the dump {cfg.dump} holds image ids not in this file: {unknown[:5]}")
    if not dump_ids:
        raise input_error(manifest, "the dump holds no image")
    gt_index = ground_truth_for_images(cfg.gt, dump_ids)
    report = CalibrationReport(
        mode="dump",
        split=split,
        gt=str(cfg.gt),
        statistics=relation,
        images=len(dump_ids),
        provenance={"dump": str(cfg.dump), **prov},
    )
    k = reader.num_classes
    transforms = {row.slug: row.transform for row in rows}
    by_fold = {f: cross.transforms(f) for f in range(1, cross.folds + 1)} if cross is not None else {}
    with open_row_results(cfg.out, split, rows, fixed_ap=cfg.fixed_ap, suffix="-offline",
                          max_dets=cfg.max_dets) as results:
        desc = f"calibrate {split} (dump)"
        with tqdm(total=len(dump_ids), unit="img", desc=desc, disable=not cfg.progress) as bar:
            for image_id, logits, regressed in iter_dump_images(reader):
                dets = postprocess_records(
                    logits.float(),
                    regressed.reshape(-1, k, 4),
                    by_fold[cross.fold_of(image_id)] if cross is not None else transforms,
                    probabilities,
                    score_thresh=score_thresh,
                    nms_thresh=nms_thresh,
                    detections_per_image=-1 if cfg.fixed_ap else per_image,
                )
                for slug, d in dets.items():
                    results.add_image(slug, detections_to_lvis(d, image_id, categories), per_image)
                bar.update(1)
        report.seconds = time.perf_counter() - t0
        results.finish(report, gt_index, ("bbox",), cfg.out, "metrics-offline")
    return report
