"""In-model calibration: run the detector once, post-process its scores under every statistic.

Per batch ONE backbone + RPN + box-head pass serves every row of every calibration sharing the
pass (`backend.infer(images, {name: transform})`): each transform maps q [R, K+1] to q~ (background
kept), then the standard post-processing runs (score > 1e-4, class-wise NMS 0.5, top 300 per image)
and masks are predicted for the calibrated detections. With fixed AP the post-processing is
uncapped and sorted by score, so the standard results are each image's first 300 and all of them
feed the per-class top-10,000 (docs/calibration.md §3); detections that can no longer enter a top
(nor the first 300) get no mask. LVIS results per row, mask and box AP. Cross-fitted calibrations
(`protocols`) run the images fold by fold, each fold with its out-of-fold statistics' transforms: still
one pass, every image once.
Inputs are all checked (statistics, split, config, checkpoint) before anything is written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.errors import ApiMisuseError, PcbkitError, input_error
from pcb_train.backends import DetectionFilter, detections_to_lvis
from pcb_train.calibrate.options import SHARED_PASS_FIELDS, CalibrateConfig
from pcb_train.calibrate.protocols import CrossFit, calibration_rows, group_by_fold
from pcb_train.calibrate.report import CalibrationReport
from pcb_train.calibrate.results import RowResults, check_max_dets, finish_all, open_row_results
from pcb_train.calibrate.rows import StatRow, load_statistics
from pcb_train.distributed import resolve_device
from pcb_train.inference import ground_truth_for_images, iter_batches, load_detector, open_split
from pcb_train.provenance import provenance

MASK_THRESHOLD = 0.5


@dataclass
class _Job:
    """One calibration (one statistics file, one output folder) inside a shared pass."""

    cfg: CalibrateConfig
    rows: list[StatRow]
    report: CalibrationReport
    cross: CrossFit | None = None

    def transforms(self, fold: int | None) -> dict[str, Any]:
        """{slug: transform} for the images of `fold` (None: not cross-fitted)."""
        if self.cross is None:
            return {row.slug: row.transform for row in self.rows}
        assert fold is not None
        return self.cross.transforms(fold)


def written_only(bars: Callable[[str], Tensor | None], cap: int) -> DetectionFilter:
    """`infer`'s filter for uncapped detections: keep an image's first `cap` (its standard results)
    and those scoring above their class's bar (`bars(name)`: [K] float64 per contiguous label, from
    `PerClassTop.bar`; None keeps everything). Bars are read once per `infer` call: they only rise,
    so a batch-old bar is still safe. What is dropped would be written nowhere, so dropping it
    before the mask head changes no output (proof in `PerClassTop`)."""
    cache: dict[str, Tensor | None] = {}

    def keep(name: str, image: int, scores: Tensor, labels: Tensor) -> Tensor:
        if name not in cache:
            cache[name] = bars(name)
        bar = cache[name]
        if bar is None or cap < 0:
            return torch.ones_like(scores, dtype=torch.bool)
        prefix = torch.arange(scores.shape[0], device=scores.device) < cap
        return prefix | (scores.double() > bar.to(scores.device)[labels])

    return keep


def _bars_of(
    outputs: Sequence[RowResults], keys: dict[str, tuple[int, str]], cat_ids: Sequence[int]
) -> Callable[[str], Tensor | None]:
    def bars(name: str) -> Tensor | None:
        j, slug = keys[name]
        tops = outputs[j].tops
        if tops is None:
            return None
        return torch.tensor([tops[slug].bar(c) for c in cat_ids], dtype=torch.float64)

    return bars


def _run_batches(
    batches: Any, backend: Any, transforms: dict[str, Any], names: dict[tuple[int, str], str],
    outputs: Sequence[RowResults], categories: Any, cap: int, uncapped: bool,
    keys: dict[str, tuple[int, str]],
) -> None:
    """Infer every batch under `transforms` ({name: fn}) and stream each row's entries to its results."""
    for images, targets in batches:
        # with fixed AP: uncapped detections (sorted by score), the capped ones are their prefix
        dets = backend.infer(
            images, transforms, mask_threshold=MASK_THRESHOLD,
            detections_per_image=-1 if uncapped else None, compact_masks=True,
            keep=written_only(_bars_of(outputs, keys, categories.ids), cap) if uncapped else None,
        )
        caches: list[dict[int, dict[str, Any]]] = [{} for _ in images]  # one RLE per mask, per image
        for (j, slug), name in names.items():
            for d, t, cache in zip(dets[name], targets, caches, strict=True):
                entries = detections_to_lvis(d, int(t["image_id"]), categories, cache, MASK_THRESHOLD)
                outputs[j].add_image(slug, entries, cap)


def calibrate_model(cfg: CalibrateConfig) -> CalibrationReport:
    """In-model mode: one inference pass for every row, LVIS results per row, mask + box AP.

    Every input is validated before anything is written under `cfg.out`: statistics (present,
    category space = ground truth's), split (non-empty, image files present), config and
    checkpoint (class count, structure, categories)."""
    return calibrate_models([cfg])[0]


def _check_shared(cfgs: Sequence[CalibrateConfig]) -> None:
    if not cfgs:
        raise ApiMisuseError("calibrate_models: no configuration given")
    first = cfgs[0]
    for c in cfgs[1:]:
        diff = [f for f in SHARED_PASS_FIELDS if getattr(c, f) != getattr(first, f)]
        if diff:
            raise PcbkitError(f"calibrations sharing one pass must agree on {', '.join(diff)}")
    outs = [Path(c.out).resolve() for c in cfgs]
    if len(set(outs)) != len(outs):
        raise PcbkitError("calibrations sharing one pass need distinct output folders")
    for c in cfgs:
        if not Path(c.stats).is_file():
            raise input_error(c.stats, "statistics file not found")


def calibrate_models(cfgs: Sequence[CalibrateConfig]) -> list[CalibrationReport]:
    """Several in-model calibrations of the same model and split (e.g. val-set and train-set
    statistics, Table 1 and Table 4) from ONE inference pass; each writes its own `cfg.out`
    exactly as `calibrate_model` would. The configs must agree on everything but the statistics
    and the output (`SHARED_PASS_FIELDS`)."""
    t0 = time.perf_counter()
    _check_shared(cfgs)
    first = cfgs[0]
    assert first.checkpoint is not None and first.config is not None and first.images is not None
    dataset = open_split(first.gt, first.images, max_images=first.max_images)
    categories = dataset.categories
    loaded = [load_statistics(c.stats, categories, c.gt) for c in cfgs]  # checked before the model
    device = resolve_device(first.device)
    backend, info, _ = load_detector(first.checkpoint, first.config, categories, first.gt, device)
    split = first.split or Path(first.gt).stem
    prov = provenance(info, backend.config, first.config)
    jobs: list[_Job] = []
    for c, stats in zip(cfgs, loaded, strict=True):
        rows, cross, relation = calibration_rows(c, stats, categories, split, device)
        report = CalibrationReport(mode="model", split=split, gt=str(c.gt), statistics=relation,
                                   images=len(dataset), provenance=prov)
        jobs.append(_Job(c, rows, report, cross))
    crosses = {(j.cross.folds, j.cross.seed): j.cross for j in jobs if j.cross is not None}
    if len(crosses) > 1:
        raise PcbkitError("cross-fitted calibrations sharing one pass must use the same folds (F, seed); "
                          f"got {sorted(crosses)}")
    groups = group_by_fold(dataset.image_ids, next(iter(crosses.values()), None))
    ran = dataset.image_ids if first.max_images is not None else None  # None: the whole file
    gt_index = ground_truth_for_images(first.gt, ran)
    names = {(j, row.slug): f"{j}:{row.slug}" for j, job in enumerate(jobs) for row in job.rows}
    keys = {name: key for key, name in names.items()}
    cap = int(backend.config.detections_per_image)
    check_max_dets(first.max_dets, cap)
    uncapped = first.fixed_ap
    with ExitStack() as stack:
        outputs: list[RowResults] = [
            stack.enter_context(open_row_results(job.cfg.out, split, job.rows, fixed_ap=job.cfg.fixed_ap,
                                              max_dets=job.cfg.max_dets))
            for job in jobs
        ]
        for fold, positions in groups:
            transforms = {names[(j, slug)]: fn for j, job in enumerate(jobs)
                          for slug, fn in job.transforms(fold).items()}
            desc = f"calibrate {split}" + (f", fold {fold}" if fold is not None else "")
            batches = iter_batches(dataset, positions, first.batch_size, first.num_workers,
                                   device=device, progress=first.progress, desc=desc)
            _run_batches(batches, backend, transforms, names, outputs, categories, cap, uncapped, keys)
        seconds = time.perf_counter() - t0
        for job in jobs:
            job.report.seconds = seconds
        finish_all([(results, job.report, job.cfg.out) for job, results in zip(jobs, outputs, strict=True)],
                   gt_index, ("segm", "bbox"), "metrics")
    return [job.report for job in jobs]
