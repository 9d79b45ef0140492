"""`pcbkit train`: Mask R-CNN with the online PCB loss and the iterative RoI head (docs/training.md).

    train(cfg, out_dir, resume=False, force=False) -> TrainResult

This module assembles a run: checks the config and the run folder, builds the datasets, the
sampler (`pcb_train.samplers`), the schedule (`pcb_train.schedule`), the model and its
classification loss (`pcb_train.cls_loss`), the optimiser, and hands them to the engine
(`pcb_train.trainer.Trainer`). Every input check happens before anything is written. Logits are
[R, K+1] with background = column K; the online confusion matrix [K, K] (row = ground truth)
travels in the checkpoint's `pcb` entry (`pcb_train.train_state`). Outputs: `pcb_train.run_dir`.
Resume is bit-exact on the CPU; multi-process runs come from torchrun or an existing group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.folder_lock import folder_lock, remove_stale_temporaries
from pcb_train.backends import build_backend, read_checkpoint
from pcb_train.cls_loss import build_cls_loss
from pcb_train.config import TrainConfig
from pcb_train.data import LVISDetectionDataset
from pcb_train.distributed import (
    DistContext,
    all_reduce_max_,
    barrier,
    current_context,
    init_distributed,
    resolve_device,
    shutdown,
)
from pcb_train.evaluation import EVAL_BATCH_MAX, EvalSplit
from pcb_train.inference import ground_truth_for_images
from pcb_train.run_dir import (
    CONFIG_FILE,
    FINAL_METRICS,
    FINAL_MODEL,
    LAST_CHECKPOINT,
    TEMPORARY_TARGETS,
    existing_outputs,
    prepare_run_dir,
)
from pcb_train.run_log import METRICS_FILE, RunLog, format_seconds
from pcb_train.samplers import RandomSampler, RepeatFactorSampler, image_repeat_factors
from pcb_train.schedule import make_schedule
from pcb_train.train_state import TrainState, check_resume_state, seed_everything
from pcb_train.trainer import OnLog, RunPlan, Trainer

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "FINAL_METRICS",
    "FINAL_MODEL",
    "LAST_CHECKPOINT",
    "METRICS_FILE",
    "TrainResult",
    "build_sampler",
    "image_categories",
    "resolve_amp",
    "train",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TrainResult:
    """What `train` did. `iterations` completed of `max_iter`; `metrics` is the final evaluation
    ({"segm": {...}, "bbox": {...}, "AP", "APr", "APc", "APf", "APb"}) or None (no val split or
    skipped); `confusion_matrix` [K, K] / `confusion_counts` [K] are the PCB buffers (None without
    the PCB loss); `seconds_per_iter` is the mean over this process's iterations."""

    out_dir: Path
    iterations: int
    max_iter: int
    checkpoint: Path
    final_model: Path | None
    metrics: dict[str, Any] | None
    wall_seconds: float
    seconds_per_iter: float | None
    confusion_matrix: Tensor | None = None
    confusion_counts: Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.iterations >= self.max_iter


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `solver.amp` on `device`; None (float32) on the CPU, with a warning."""
    if amp == "none":
        return None
    if device.type != "cuda":
        logger.warning("solver.amp=%s needs CUDA: training in float32 on the %s", amp, device.type)
        return None
    return AMP_DTYPES[amp]


# --------------------------------------------------------------------------------------------
# data


def image_categories(dataset: LVISDetectionDataset) -> list[list[int]]:
    """Per image (dataset order): the contiguous class indices of its usable annotations."""
    index_of = dataset.categories.index_of()
    anns = dataset._anns  # the dataset's per-image annotation lists (no public accessor yet)
    return [
        sorted({index_of[int(a["category_id"])] for a in anns[e.image_id] if dataset._usable(a)})
        for e in dataset.entries
    ]


def build_sampler(cfg: TrainConfig, dataset: LVISDetectionDataset) -> RandomSampler:
    """The config's training sampler over `dataset` (random or RFS), seeded by `cfg.seed`."""
    d = cfg.data
    if d.sampler == "rfs":
        factors = image_repeat_factors(image_categories(dataset), d.rfs_threshold)
        sampler: RandomSampler = RepeatFactorSampler(factors, cfg.seed, d.flip_prob, d.rfs_rounding)
        logger.info(
            "repeat-factor sampling (t=%g, %s rounding): %.0f images per epoch from %d (%d repeated)",
            d.rfs_threshold,
            d.rfs_rounding,
            sampler.nominal_epoch_length,
            len(dataset),
            int((factors > 1.0).sum()),
        )
        return sampler
    return RandomSampler(len(dataset), cfg.seed, d.flip_prob)


def _build_datasets(cfg: TrainConfig) -> tuple[LVISDetectionDataset, LVISDetectionDataset | None]:
    d = cfg.data
    if d.train_ann is None or d.train_images is None:
        missing = "data.train_ann" if d.train_ann is None else "data.train_images"
        raise PcbkitError(f"{missing}: not set (give the training split, e.g. {missing}=path)")
    train_ds = LVISDetectionDataset(
        d.train_ann,
        d.train_images,
        categories=cfg.model.num_classes,
        train=True,
        flip_prob=0.0,  # flips come from the sampler's plan (PlannedDataset)
        with_masks=cfg.model.mask_head,
        filter_empty=d.filter_empty,
    )
    if len(train_ds) == 0:
        raise input_error(d.train_ann, "no training image with annotations")
    val_ds = None
    if d.val_ann is not None:
        if d.val_images is None:
            raise PcbkitError("data.val_images: not set while data.val_ann is (set both, or val_ann=null)")
        val_ds = LVISDetectionDataset(
            d.val_ann,
            d.val_images,
            categories=train_ds.categories,
            train=False,
            with_masks=False,
            max_images=d.max_val_images,
        )
    return train_ds, val_ds


# --------------------------------------------------------------------------------------------
# the run


def train(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    evaluate_at_end: bool = True,
    progress: bool = True,
    on_log: OnLog | None = None,
) -> TrainResult:
    """Train `cfg` into `out_dir` (default runs/<cfg.name>); see docs/training.md.

    resume: continue from out_dir/last_checkpoint.pth (a new run when there is none); force: start
    over in a directory that already holds a run (its outputs are deleted once every check has
    passed); evaluate_at_end: run the final LVIS evaluation on the validation split; on_log: called
    on rank 0 with every metrics record. Bad input raises PcbkitError before anything is written;
    Ctrl-C or SIGTERM saves a checkpoint and raises `pcb_train.stop.Stopped` (a KeyboardInterrupt);
    the folder is locked while the run goes on (`run_folder_lock`).
    """
    cfg = cfg.resolved()
    ctx = current_context()
    ctx = init_distributed(ctx, resolve_device(cfg.device, ctx.local_rank, option="device"))
    try:
        return _train(cfg, out_dir, ctx, resume, force, evaluate_at_end, progress, on_log)
    finally:
        shutdown(ctx)


def _check_run(cfg: TrainConfig, ctx: DistContext, out_dir: str | Path | None) -> Path:
    """The run folder, after the checks that need neither data nor checkpoint."""
    if cfg.model.backend != "torchvision":
        raise PcbkitError(
            f"model.backend: pcbkit train drives the torchvision backend; train {cfg.model.backend!r} "
            "models with that framework's own trainer and pcbkit's plug-in"
        )
    if cfg.solver.ims_per_batch % ctx.world_size:
        raise PcbkitError(
            f"solver.ims_per_batch: {cfg.solver.ims_per_batch} images do not split evenly over "
            f"{ctx.world_size} processes"
        )
    out = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    if out.exists() and not out.is_dir():
        raise PcbkitError(f"--out {out}: exists and is not a directory")
    return out


def _plan(cfg: TrainConfig, ctx: DistContext, out: Path) -> RunPlan:
    """Datasets, sampler, schedule and validation split of the run (input checks, nothing written)."""
    train_ds, val_ds = _build_datasets(cfg)
    val = None
    if val_ds is not None:
        subset = cfg.data.max_val_images is not None
        val = EvalSplit(
            dataset=val_ds,
            # parsed once, on the rank that scores (the others only run inference)
            gt=ground_truth_for_images(val_ds.ann_file, val_ds.image_ids if subset else None)
            if ctx.is_main
            else str(val_ds.ann_file),
            batch_size=max(1, min(EVAL_BATCH_MAX, cfg.solver.ims_per_batch // ctx.world_size)),
            num_workers=min(cfg.data.num_workers, 2),
        )
    sampler = build_sampler(cfg, train_ds)
    schedule = make_schedule(cfg.solver, cfg.model, sampler.nominal_epoch_length)
    return RunPlan(cfg, out, train_ds, train_ds.categories, sampler, schedule, val)


def _resume_checkpoint(out: Path, cfg: TrainConfig, resume: bool, force: bool) -> dict[str, Any] | None:
    """The checked checkpoint to continue from (None: a new run); refuses to overwrite a run."""
    ckpt_path = out / LAST_CHECKPOINT
    existing = existing_outputs(out)
    if resume and ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path)
        check_resume_state(ckpt_path, ckpt, cfg)
        return ckpt
    if resume:
        logger.info("--resume: %s has no %s, starting a new run", out, LAST_CHECKPOINT)
    elif existing and not force:
        raise PcbkitError(
            f"--out {out}: already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or --force to start over"
        )
    return None


def _build_trainer(
    plan: RunPlan,
    ctx: DistContext,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    *,
    progress: bool,
    on_log: OnLog | None,
    wall_start: float,
) -> Trainer:
    """Model (seeded by cfg.seed), classification loss, SGD, schedule and GradScaler."""
    cfg = plan.cfg
    seed_everything(cfg.seed)
    backend = build_backend(cfg.model, cfg.data.train_min_sizes)
    backend.to(device)
    cls_loss = build_cls_loss(cfg.model, device)
    if cls_loss is not None:
        backend.model.roi_heads.set_cls_loss(cls_loss)
    params = [p for p in backend.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.solver.lr, momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay
    )
    schedule = plan.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: schedule.lr_factor(it))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    confusion = cls_loss.confusion if cls_loss is not None else None
    state = TrainState(optimizer, scheduler, scaler, confusion=confusion)
    return Trainer(
        plan,
        ctx,
        device,
        amp_dtype,
        backend,
        cls_loss,
        state,
        progress=progress,
        on_log=on_log,
        wall_start=wall_start,
    )


@contextmanager
def run_folder_lock(out: Path, ctx: DistContext, device: torch.device) -> Iterator[None]:
    """Hold `out`'s lock (rank 0, the rank that writes) and remove the stale temporaries of its run
    files; every rank raises when rank 0 could not take the lock (no rank waits for it)."""
    failed = torch.zeros(1, device=device)
    with ExitStack() as stack:
        if ctx.is_main:
            try:
                stack.enter_context(folder_lock(out, "pcbkit train"))
            except PcbkitError:
                all_reduce_max_(failed.fill_(1.0))  # the other ranks learn it, then rank 0 raises
                raise
        all_reduce_max_(failed)
        if failed.item() > 0:
            raise PcbkitError(f"{out}: rank 0 could not lock the run folder (its error says why)")
        if ctx.is_main:
            remove_stale_temporaries(out, TEMPORARY_TARGETS)
        yield


def _train(
    cfg: TrainConfig,
    out_dir: str | Path | None,
    ctx: DistContext,
    resume: bool,
    force: bool,
    evaluate_at_end: bool,
    progress: bool,
    on_log: OnLog | None,
) -> TrainResult:
    wall_start = time.perf_counter()
    out = _check_run(cfg, ctx, out_dir)
    device = resolve_device(cfg.device, ctx.local_rank, option="device")
    amp_dtype = resolve_amp(cfg.solver.amp, device)
    plan = _plan(cfg, ctx, out)
    with run_folder_lock(out, ctx, device):
        return _train_locked(cfg, plan, ctx, device, amp_dtype, resume, force, evaluate_at_end, progress,
                             on_log, wall_start)


def _train_locked(
    cfg: TrainConfig,
    plan: RunPlan,
    ctx: DistContext,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    resume: bool,
    force: bool,
    evaluate_at_end: bool,
    progress: bool,
    on_log: OnLog | None,
    wall_start: float,
) -> TrainResult:
    out = plan.out
    ckpt = _resume_checkpoint(out, cfg, resume, force)
    barrier(ctx)  # every rank has checked the folder before rank 0 writes to it

    trainer = _build_trainer(
        plan, ctx, device, amp_dtype, progress=progress, on_log=on_log, wall_start=wall_start
    )
    trainer.restore(ckpt)
    # a finished run given --resume keeps its files as they are (only a missing final evaluation runs)
    start, max_iter = trainer.start_iter, plan.schedule.max_iter
    to_train = start < max_iter
    to_write = to_train or (evaluate_at_end and plan.val is not None and not (out / FINAL_METRICS).is_file())
    if ctx.is_main and to_train:
        prepare_run_dir(out, cfg, start if ckpt is not None else None)
    barrier(ctx)
    trainer.log = RunLog(out, ctx.is_main and to_write, purge_step=start if ckpt is not None else None)

    if not trainer.fit() or trainer.iteration < max_iter:
        trainer.stop_early()
    metrics = trainer.finish(evaluate_at_end)
    wall = time.perf_counter() - wall_start
    spi = float(np.mean(trainer.iter_times)) if trainer.iter_times else None
    if ctx.is_main:
        logger.info(
            "done: %d iterations in %s (%s s/it); outputs in %s",
            trainer.iteration,
            format_seconds(wall),
            f"{spi:.3f}" if spi is not None else "-",
            out,
        )
    confusion = trainer.state.confusion
    return TrainResult(
        out_dir=out,
        iterations=trainer.iteration,
        max_iter=max_iter,
        checkpoint=trainer.ckpt_path,
        final_model=out / FINAL_MODEL,
        metrics=metrics,
        wall_seconds=wall,
        seconds_per_iter=spi,
        confusion_matrix=confusion.matrix.detach().cpu().clone() if confusion is not None else None,
        confusion_counts=confusion.counts.detach().cpu().clone() if confusion is not None else None,
    )
