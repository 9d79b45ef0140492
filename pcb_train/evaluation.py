"""LVIS evaluation of a detector on a validation split, sharded over ranks, scored on rank 0.

Each rank runs inference on its strided share of the split (`pcb_train.inference.iter_batches`),
turns detections into LVIS result dicts (category ids of the `CategorySpace`), and rank 0 gathers
them and scores `segm` (with a mask head) and `bbox` against the ground truth. The summary keys
AP / APr / APc / APf come from segm when there is a mask head, else from bbox; APb is bbox AP;
NaN becomes None. Other ranks get None. The training loop evaluates under `fork_rng`, so an
evaluation never moves the training RNG streams (exact resume with `eval_period`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pcb_analysis.categories import CategorySpace
from pcb_analysis.lvis_eval import evaluate, nan_to_none
from pcb_analysis.lvis_gt import GroundTruth as GroundTruthIndex
from pcb_train.backends import DetectorBackend, detections_to_lvis, identity
from pcb_train.data import LVISDetectionDataset
from pcb_train.distributed import DistContext, gather_to_main, shard_indices
from pcb_train.inference import iter_batches

logger = logging.getLogger(__name__)

EVAL_BATCH_MAX = 8  # images per inference batch (per rank) during evaluation
GroundTruth = str | Path | dict[str, Any] | GroundTruthIndex


@dataclass(frozen=True)
class EvalSplit:
    """The validation split of a run and how to batch it: `gt` is the file or a restricted copy."""

    dataset: LVISDetectionDataset
    gt: GroundTruth
    batch_size: int
    num_workers: int


@torch.no_grad()
def evaluate_detector(
    backend: DetectorBackend,
    dataset: LVISDetectionDataset,
    categories: CategorySpace,
    gt: GroundTruth | None = None,
    *,
    ctx: DistContext | None = None,
    batch_size: int = EVAL_BATCH_MAX,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any] | None:
    """LVIS segm + bbox evaluation of `backend` on `dataset` (sharded over ranks, scored on rank 0).

    gt: the ground truth (default: the dataset's annotation file). Returns {"segm": metrics, "bbox":
    metrics, "AP", "APr", "APc", "APf", "APb", "detections"} on rank 0, None on the other ranks."""
    ctx = ctx or DistContext()
    device = next(backend.model.parameters()).device
    indices = shard_indices(len(dataset), ctx.rank, ctx.world_size)
    results: list[dict[str, Any]] = []
    batches = iter_batches(
        dataset,
        indices,
        batch_size,
        num_workers,
        device=device,
        progress=progress and ctx.is_main,
        desc="evaluate",
    )
    for images, targets in batches:
        dets = backend.infer(images, {"none": identity})["none"]
        for det, target in zip(dets, targets, strict=True):
            results.extend(detections_to_lvis(det, int(target["image_id"]), categories))
    gathered = gather_to_main(results, ctx)
    if gathered is None:
        return None
    results = [r for part in gathered for r in part]
    if gt is None:
        gt = str(dataset.ann_file)
    out: dict[str, Any] = {}
    for iou_type in ("segm", "bbox") if backend.config.mask_head else ("bbox",):
        if not results:
            logger.warning("evaluation: the model made no detection on %d images", len(dataset))
            out[iou_type] = None
            continue
        out[iou_type] = nan_to_none(evaluate(gt, results, iou_type))
    main = out.get("segm") or out.get("bbox") or {}
    box = out.get("bbox") or {}
    for key in ("AP", "APr", "APc", "APf"):
        out[key] = main.get(key)
    out["APb"] = box.get("AP")
    out["detections"] = len(results)
    return out


def evaluate_split(
    backend: DetectorBackend, split: EvalSplit, categories: CategorySpace, ctx: DistContext, progress: bool
) -> dict[str, Any] | None:
    """`evaluate_detector` on a run's split without touching the caller's RNG streams."""
    device = next(backend.model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return evaluate_detector(
            backend,
            split.dataset,
            categories,
            split.gt,
            ctx=ctx,
            batch_size=split.batch_size,
            num_workers=split.num_workers,
            progress=progress,
        )
