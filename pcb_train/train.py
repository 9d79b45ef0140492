"""The training loop of `pcbkit train`: Mask R-CNN with the online PCB loss and the iterative RoI head.

Conventions (docs/method.md §4-§5): logits [R, K+1] with background = column K; the online confusion
matrix [K, K] (row = ground truth, column = prediction) lives in an `OnlineConfusion` OUTSIDE the
model and outside any DistributedDataParallel wrapper (it all-reduces its own batch sums, so every
rank holds identical buffers), and travels in the checkpoint's `pcb` entry, not in the model's
state dict.

    train(cfg, out_dir, resume=False, force=False) -> TrainResult

One iteration (0-based index i, global batch B = solver.ims_per_batch split over W ranks):
  1. the next B entries of the sampler's stream (`pcb_train.samplers`; this rank's B / W);
  2. PCB's schedule condition for step i (`Schedule.pcb_started(i)`) is handed to the
     classification loss, which updates the matrix with every step's logits and switches the
     fightback term on once the condition holds AND every class has been seen (§4.3);
  3. forward under autocast (CUDA only: bf16, or fp16 with a GradScaler), backward, optional
     gradient clipping, SGD step with the learning rate of `Schedule.lr_factor(i)`.

Schedule: lr = base_lr * ims_per_batch / lr_reference_batch, linear warm-up from
`warmup_factor` over `warmup_iters`, times `gamma` at each step. An epoch is
`nominal_epoch_length / B` iterations (N images for the random sampler, the sum of the repeat
factors for RFS); `solver.epochs` / epoch-unit `lr_steps` convert through it, `solver.max_iter`
(iteration-unit `lr_steps`) bypasses it. PCB's start (`model.pcb_start` in `pcb_start_unit`):
  - "epoch": PCB from the first iteration of the `pcb_start`-th epoch counted from 1, as
    MMDetection's `start_epoch` **[choice]**: 17 starts after 16 completed epochs, at the first
    learning-rate drop of the 2x schedule (steps at epochs 16 and 22), as docs/method.md §4.3 says;
  - "fraction": from iteration round(pcb_start * max_iter) (2/3 = 16 of 24 epochs);
  - "iteration": from iteration index pcb_start (0-based).

Outputs in `out_dir` (default runs/<name>), written by rank 0, each atomically:
    config.yaml          the resolved config
    last_checkpoint.pth  model, optimizer, scheduler, GradScaler, sampler position, RNG states of
                         every rank (python, numpy, torch, cuda), iteration, log-window sums and the
                         PCB buffers; every `checkpoint_period` iterations, on Ctrl-C and at the end
    model_final.pth      the trained model (+ PCB buffers), loadable by every pcbkit command
    metrics.jsonl        one JSON object per log period ({"type": "train", ...}) and per evaluation
                         ({"type": "eval", ...}); "iteration" is the 0-based index of the last step
    final_metrics.json   the final LVIS evaluation (segm and bbox) on the validation split
    events.out.tfevents.*  TensorBoard scalars (when the `tensorboard` package is installed)

`resume=True` continues from last_checkpoint.pth exactly: on the CPU the resumed run reproduces the
uninterrupted run's losses and PCB matrix bit for bit (the data order and flips are pure
functions of (seed, position), every RNG state is restored, metrics.jsonl and the TensorBoard
events are cut back to the checkpoint's iteration).

Distributed: launched by `torchrun` (env:// rendezvous; NCCL on CUDA, gloo on the CPU), or called
with a process group already initialised (tests: gloo with a file:// rendezvous). DDP wraps the
model with `find_unused_parameters=False` (every parameter takes part in every loss: the mask
loss keeps its graph with zero positives, the iterative head runs all its MLPs in training) and
the default buffer broadcast (BatchNorm statistics of the tiny backbone follow rank 0).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pcb_analysis.atomic import write_json_atomic, write_text_atomic
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_train.config import ModelConfig, TrainConfig, save_config, to_dict
from pcb_train.data import LVISDetectionDataset, collate, horizontal_flip, load_lvis_json, targets_to
from pcb_train.distributed import (
    DistContext,
    all_reduce_max_,
    barrier,
    current_context,
    gather_to_main,
    init_distributed,
    reduce_means,
    resolve_device,
    shard_indices,
    shutdown,
)
from pcb_train.inference import iter_batches
from pcb_train.iterative_head import StepClsLosses, iterative_cls_loss
from pcb_train.pcb_loss import OnlineConfusion
from pcb_train.samplers import (
    DistributedBatchSampler,
    RandomSampler,
    RepeatFactorSampler,
    SamplerPosition,
    image_repeat_factors,
)
from pcb_train.schedule import make_schedule

logger = logging.getLogger(__name__)

TRAIN_STATE_FORMAT = "pcbkit-train-state"
TRAIN_STATE_SCHEMA = 1
CONFIG_FILE = "config.yaml"
LAST_CHECKPOINT = "last_checkpoint.pth"
FINAL_MODEL = "model_final.pth"
METRICS_FILE = "metrics.jsonl"
FINAL_METRICS = "final_metrics.json"
EVENTS_PREFIX = "events.out.tfevents."
RUN_FILES = (CONFIG_FILE, LAST_CHECKPOINT, FINAL_MODEL, METRICS_FILE, FINAL_METRICS)
EVAL_BATCH_MAX = 8  # images per inference batch (per rank) during evaluation
# Config keys that may change between an interrupted run and its --resume (they do not change the
# computation); every other difference is refused.
RESUME_MUTABLE = frozenset(
    {
        "name",
        "device",
        "log_period",
        "checkpoint_period",
        "eval_period",
        "model.weights",
        "data.train_images",
        "data.val_ann",
        "data.val_images",
        "data.num_workers",
        "data.max_val_images",
    }
)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_SHORT = {
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn",
}


# --------------------------------------------------------------------------------------------
# results


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


# --------------------------------------------------------------------------------------------
# schedule


# --------------------------------------------------------------------------------------------
# distributed context and devices


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `solver.amp` on `device`; None (float32) on the CPU, with a warning."""
    if amp == "none":
        return None
    if device.type != "cuda":
        logger.warning("solver.amp=%s needs CUDA: training in float32 on the %s", amp, device.type)
        return None
    return AMP_DTYPES[amp]


# --------------------------------------------------------------------------------------------
# RNG state (weights_only-safe containers)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every RNG state of this process, as plain containers and tensors (torch.load weights_only)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [int(version), torch.tensor(words, dtype=torch.int64), gauss],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    version, words, gauss = state["python"]
    random.setstate((int(version), tuple(int(w) for w in words.tolist()), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# data


class PlannedDataset(torch.utils.data.Dataset):
    """A training dataset indexed by `(dataset index, flip)` pairs from `DistributedBatchSampler`.

    The flip decision comes with the index (a pure function of seed and position), so the data
    of an iteration does not depend on worker processes or RNG state: the heart of exact resume.
    """

    def __init__(self, base: LVISDetectionDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[Tensor, dict[str, Tensor]]:
        index, flip = item
        image, target = self.base[int(index)]
        if flip:
            image, target = horizontal_flip(image, target)
        return image, target


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


def ground_truth_for(dataset: LVISDetectionDataset, subset: bool) -> str | dict[str, Any]:
    """Ground truth to evaluate `dataset` against: its file, or for a subset of the file's images
    (data.max_val_images) a copy restricted to the dataset's images (else the others count as misses)."""
    if not subset:
        return str(dataset.ann_file)
    data = load_lvis_json(dataset.ann_file)
    keep = set(dataset.image_ids)
    if len(keep) == len(data["images"]):
        return str(dataset.ann_file)
    return {
        **data,
        "images": [im for im in data["images"] if int(im["id"]) in keep],
        "annotations": [a for a in data["annotations"] if int(a["image_id"]) in keep],
    }


# --------------------------------------------------------------------------------------------
# the PCB classification loss


class ClsLoss:
    """The classification loss plugged into the RoI head: `iterative_cls_loss` with the online
    matrix (PCB on) or without it (iterative head only). `started` is set by the loop before each
    forward. Not an nn.Module: the matrix stays out of the model's state dict and out of DDP."""

    def __init__(
        self, confusion: OnlineConfusion | None, alpha: float, step_weights: Sequence[float]
    ) -> None:
        self.confusion = confusion
        self.alpha = float(alpha)
        self.step_weights = tuple(float(w) for w in step_weights)
        self.started = False

    def __call__(self, step_logits: tuple[Tensor, ...], labels: Tensor) -> StepClsLosses:
        return iterative_cls_loss(
            step_logits,
            labels,
            self.step_weights,
            confusion=self.confusion,
            alpha=self.alpha,
            pcb_started=self.started,
        )


def build_cls_loss(model_cfg: ModelConfig, device: torch.device) -> ClsLoss | None:
    """PCB loss and/or iterative-head loss of a config (None: the backend's plain cross-entropy)."""
    if not (model_cfg.pcb_loss or model_cfg.iterative_head):
        return None
    weights = tuple(model_cfg.step_weights) if model_cfg.iterative_head else (1.0,)
    confusion = None
    if model_cfg.pcb_loss:
        confusion = OnlineConfusion(model_cfg.num_classes, model_cfg.pcb_momentum).to(device)
    return ClsLoss(confusion, model_cfg.pcb_alpha, weights)


def confusion_summary(confusion: OnlineConfusion | None) -> dict[str, Any]:
    """`cm_classes_seen` and `cm_diag_mean` (mean diagonal over the classes seen) for the logs."""
    if confusion is None:
        return {}
    seen = confusion.counts > 0
    n = int(seen.sum())
    diag = float(confusion.matrix.diagonal()[seen].mean()) if n else None
    return {"cm_classes_seen": n, "cm_diag_mean": diag}


# --------------------------------------------------------------------------------------------
# logging: window meter, metrics.jsonl, TensorBoard


class WindowMeter:
    """Sums of per-iteration scalars since the last log line (checkpointed for exact resume)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.time = 0.0
        self.data_time = 0.0

    def add(self, values: Mapping[str, float], seconds: float, data_seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        self.time += seconds
        self.data_time += data_seconds

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count, self.time, self.data_time = {}, 0, 0.0, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count, "time": self.time, "data_time": self.data_time}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = {str(k): float(v) for k, v in state.get("sums", {}).items()}
        self.count = int(state.get("count", 0))
        self.time = float(state.get("time", 0.0))
        self.data_time = float(state.get("data_time", 0.0))


def _format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(record: Mapping[str, Any], max_iter: int) -> str:
    """The one-line progress summary of a train record."""
    parts = [f"iter {record['iteration'] + 1}/{max_iter}", f"loss {record['loss']:.4f}"]
    terms = [f"{short} {record[k]:.3f}" for k, short in LOSS_SHORT.items() if k in record]
    if terms:
        parts[-1] += " (" + " ".join(terms) + ")"
    parts.append(f"lr {record['lr']:.5f}")
    parts.append(f"{record['time']:.3f} s/it (data {record['data_time']:.3f})")
    parts.append(f"eta {_format_seconds(record['eta_seconds'])}")
    if "pcb_active" in record:
        state = "on" if record["pcb_active"] else ("waiting for classes" if record["pcb_started"] else "off")
        diag = record.get("cm_diag_mean")
        parts.append(f"pcb {state}" + (f" (cm diag {diag:.3f})" if diag is not None else ""))
    return "  ".join(parts)


def _truncate_metrics(path: Path, keep_before: int) -> None:
    """Keep the records of iterations < keep_before (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        if isinstance(rec, dict) and int(rec.get("iteration", keep_before)) < keep_before:
            kept.append(line)
    write_text_atomic(path, "".join(s + "\n" for s in kept))


class RunLog:
    """metrics.jsonl (+ TensorBoard) of rank 0; a no-op on other ranks."""

    def __init__(
        self, out_dir: Path, enabled: bool, purge_step: int | None, tensorboard: bool = True
    ) -> None:
        self.path = out_dir / METRICS_FILE
        self.enabled = enabled
        self.writer: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("TensorBoard events skipped: the `tensorboard` package is not installed")
            else:
                self.writer = SummaryWriter(log_dir=str(out_dir), purge_step=purge_step)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.writer is not None:
            step = int(record["iteration"])
            prefix = "train" if record.get("type") == "train" else "eval"
            for k, v in _flatten(record).items():
                if k in ("iteration", "type") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            if "pcb_active" in record:
                self.writer.add_scalar("train/pcb_active", float(record["pcb_active"]), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def _flatten(d: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level, keys joined by `sep` ("a/b" for TensorBoard, "a.b" for configs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------------------------
# Ctrl-C


class StopRequest(AbstractContextManager["StopRequest"]):
    """SIGINT / SIGTERM handler for the loop: the first signal asks the loop to stop after the
    current iteration and save a checkpoint (Ctrl-C, a scheduler's pre-emption, torchrun passing
    on a Ctrl-C); a second one interrupts at once. Installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker: the main process decides
            return
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "%s: saving a checkpoint after this iteration (again to abort at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __exit__(self, *exc: object) -> None:
        self.restore()


# --------------------------------------------------------------------------------------------
# checks before training


def config_differences(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
    """`key: saved != current` for every config value a resume may not change (RESUME_MUTABLE excepted)."""
    a, b = _flatten(saved, "."), _flatten(to_dict(current), ".")
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_MUTABLE:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} != {b.get(key, '<absent>')!r}")
    return out


def _check_resume_state(path: Path, state: Mapping[str, Any], cfg: TrainConfig) -> None:
    train_state = state.get("train_state")
    if not isinstance(train_state, Mapping) or train_state.get("format") != TRAIN_STATE_FORMAT:
        raise input_error(path, "not a pcbkit training checkpoint (no train_state): cannot resume from it")
    if train_state.get("schema") != TRAIN_STATE_SCHEMA:
        raise input_error(path, f"training-state schema {train_state.get('schema')!r} is not supported")
    diffs = config_differences(train_state.get("config", {}), cfg)
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise input_error(
            path,
            f"checkpoint was written with another config ({shown}; checkpoint's value first): "
            "resume with the run's config, or start over with --force / another --out",
        )


def _existing_outputs(out: Path) -> list[str]:
    names = [n for n in RUN_FILES if (out / n).exists()]
    if out.is_dir() and any(p.name.startswith(EVENTS_PREFIX) for p in out.iterdir()):
        names.append(EVENTS_PREFIX + "*")
    return names


def _clear_outputs(out: Path) -> None:
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for p in out.glob(EVENTS_PREFIX + "*"):
        p.unlink()


def _build_datasets(
    cfg: TrainConfig,
) -> tuple[LVISDetectionDataset, LVISDetectionDataset | None]:
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
# evaluation


@torch.no_grad()
def evaluate_detector(
    backend: Any,
    dataset: LVISDetectionDataset,
    categories: CategorySpace,
    gt: str | Path | dict[str, Any] | None = None,
    *,
    ctx: DistContext | None = None,
    batch_size: int = EVAL_BATCH_MAX,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any] | None:
    """LVIS segm + bbox evaluation of `backend` on `dataset` (sharded over ranks, scored on rank 0).

    gt: the ground truth (default: the dataset's annotation file). Returns {"segm": metrics, "bbox":
    metrics, "AP", "APr", "APc", "APf", "APb", "detections"} on rank 0 (AP.. from segm with a mask
    head, else bbox; NaN -> None), None on the other ranks."""
    from pcb_analysis.lvis_eval import evaluate, nan_to_none
    from pcb_train.backends import detections_to_lvis, identity

    ctx = ctx or DistContext()
    device = next(backend.model.parameters()).device
    indices = shard_indices(len(dataset), ctx.rank, ctx.world_size)
    results: list[dict[str, Any]] = []
    batches = iter_batches(
        dataset, indices, batch_size, num_workers, device=device, progress=progress and ctx.is_main, desc="evaluate"
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


# --------------------------------------------------------------------------------------------
# checkpoints


def _train_state(
    cfg: TrainConfig,
    iteration: int,
    position: SamplerPosition,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    meter: WindowMeter,
    rng: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": TRAIN_STATE_FORMAT,
        "schema": TRAIN_STATE_SCHEMA,
        "config": to_dict(cfg),
        "iteration": int(iteration),
        "sampler": {"epoch": int(position.epoch), "index": int(position.index)},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "meter": meter.state_dict(),
        "rng": rng,
        "world_size": len(rng),
        "torch_version": str(torch.__version__),
    }


def _gather_rng(ctx: DistContext, device: torch.device) -> list[dict[str, Any]]:
    mine = rng_state(device)
    if not ctx.distributed:
        return [mine]
    if device.type == "cuda":  # gather_object pickles tensors: move them to the CPU first
        mine = {**mine, "cuda": None if mine["cuda"] is None else mine["cuda"].cpu()}
    return gather_to_main(mine, ctx) or []


# --------------------------------------------------------------------------------------------
# the loop


def train(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    evaluate_at_end: bool = True,
    progress: bool = True,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train `cfg` into `out_dir` (default runs/<cfg.name>); see the module docstring.

    resume: continue from out_dir/last_checkpoint.pth (a new run when there is none); force: start
    over in a directory that already holds a run (its outputs are deleted once every check has
    passed); evaluate_at_end: run the final LVIS evaluation on the validation split; on_log: called
    on rank 0 with every metrics record. Bad input raises PcbkitError before anything is written;
    Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt.
    """
    cfg = cfg.resolved()
    ctx = current_context()
    ctx = init_distributed(ctx, resolve_device(cfg.device, ctx.local_rank, option="device"))
    try:
        return _train(cfg, out_dir, ctx, resume, force, evaluate_at_end, progress, on_log)
    finally:
        shutdown(ctx)


def _train(
    cfg: TrainConfig,
    out_dir: str | Path | None,
    ctx: DistContext,
    resume: bool,
    force: bool,
    evaluate_at_end: bool,
    progress: bool,
    on_log: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from pcb_train.backends import build_backend, make_checkpoint, read_checkpoint, save_checkpoint

    wall_start = time.perf_counter()
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
    device = resolve_device(cfg.device, ctx.local_rank, option="device")
    amp_dtype = resolve_amp(cfg.solver.amp, device)
    out = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    if out.exists() and not out.is_dir():
        raise PcbkitError(f"--out {out}: exists and is not a directory")

    # -- every input check happens before anything is written ----------------------------
    train_ds, val_ds = _build_datasets(cfg)
    categories = train_ds.categories
    val_gt = ground_truth_for(val_ds, cfg.data.max_val_images is not None) if val_ds is not None else None
    sampler = build_sampler(cfg, train_ds)
    schedule = make_schedule(cfg.solver, cfg.model, sampler.nominal_epoch_length)
    ckpt_path = out / LAST_CHECKPOINT
    state: dict[str, Any] | None = None
    existing = _existing_outputs(out)
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
        _check_resume_state(ckpt_path, state, cfg)
    elif resume:
        logger.info("--resume: %s has no %s, starting a new run", out, LAST_CHECKPOINT)
    elif existing and not force:
        raise PcbkitError(
            f"--out {out}: already holds a run ({', '.join(existing)}); pass --resume to continue it "
            "or --force to start over"
        )

    barrier(ctx)  # every rank has checked the folder before rank 0 writes to it

    # -- model, loss, optimiser ---------------------------------------------------------
    seed_everything(cfg.seed)
    backend = build_backend(cfg.model, cfg.data.train_min_sizes)
    backend.to(device)
    model: nn.Module = backend.model
    roi_heads = model.roi_heads
    cls_loss = build_cls_loss(cfg.model, device)
    if cls_loss is not None:
        roi_heads.set_cls_loss(cls_loss)
    confusion = cls_loss.confusion if cls_loss is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.solver.lr, momentum=cfg.solver.momentum, weight_decay=cfg.solver.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: schedule.lr_factor(it))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    meter = WindowMeter()
    start_iter = 0
    position = SamplerPosition(0, 0)
    if state is not None:
        backend.load_checkpoint(ckpt_path, categories)
        ts = state["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if ts.get("scaler") is not None and scaler.is_enabled():
            scaler.load_state_dict(ts["scaler"])
        if confusion is not None:
            pcb_state = state.get("pcb")
            if not isinstance(pcb_state, Mapping):
                raise input_error(ckpt_path, "checkpoint has no PCB buffers ('pcb') but the config uses PCB")
            confusion.load_state_dict({k: v.to(device) for k, v in pcb_state.items()})
        meter.load_state_dict(ts.get("meter", {}))
        start_iter = int(ts["iteration"])
        position = SamplerPosition(int(ts["sampler"]["epoch"]), int(ts["sampler"]["index"]))
        rngs = ts["rng"]
        if len(rngs) == ctx.world_size:
            set_rng_state(rngs[ctx.rank], device)
        else:
            logger.warning(
                "resuming on %d processes a run saved by %d: RNG streams restart (data order is still exact)",
                ctx.world_size,
                len(rngs),
            )
            seed_everything(cfg.seed + 1 + ctx.rank + start_iter)
        logger.info("resumed %s at iteration %d of %d", ckpt_path, start_iter, schedule.max_iter)
    else:
        seed_everything(cfg.seed + 1 + ctx.rank)  # the training stream; rank-specific (RPN / RoI sampling)

    train_model: nn.Module = model
    if ctx.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
        )

    # -- output folder --------------------------------------------------------------------
    # a finished run given --resume keeps its files as they are (only a missing final evaluation runs)
    final_file = out / FINAL_METRICS
    to_train = start_iter < schedule.max_iter
    to_write = to_train or (evaluate_at_end and val_ds is not None and not final_file.is_file())
    if ctx.is_main and to_train:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            _clear_outputs(out)
        else:
            _truncate_metrics(out / METRICS_FILE, start_iter)
        save_config(cfg, out / CONFIG_FILE)
    barrier(ctx)
    log = RunLog(out, ctx.is_main and to_write, purge_step=start_iter if state is not None else None)
    eval_workers = min(cfg.data.num_workers, 2)
    eval_batch = max(1, min(EVAL_BATCH_MAX, cfg.solver.ims_per_batch // ctx.world_size))

    def checkpoint(iteration: int) -> None:
        rng = _gather_rng(ctx, device)
        if not ctx.is_main:
            return
        extra = {
            "train_state": _train_state(cfg, iteration, position, optimizer, scheduler, scaler, meter, rng),
            "pcb": {k: v.detach().cpu() for k, v in confusion.state_dict().items()} if confusion else None,
        }
        save_checkpoint(
            ckpt_path, make_checkpoint(model.state_dict(), cfg.model, categories=categories, extra=extra)
        )

    def run_eval(iteration: int) -> dict[str, Any] | None:
        assert val_ds is not None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = evaluate_detector(
                backend,
                val_ds,
                categories,
                val_gt,
                ctx=ctx,
                batch_size=eval_batch,
                num_workers=eval_workers,
                progress=progress,
            )
        model.train()
        if metrics is not None:
            record = {"type": "eval", "iteration": iteration - 1, **metrics}
            log.write(record)
            if on_log is not None:
                on_log(record)
            logger.info(
                "eval at iteration %d: AP %s  APr %s  APc %s  APf %s  APb %s",
                iteration,
                *(_fmt(metrics.get(k)) for k in ("AP", "APr", "APc", "APf", "APb")),
            )
        barrier(ctx)
        return metrics

    # -- train ------------------------------------------------------------------------------
    batches = DistributedBatchSampler(
        sampler,
        cfg.solver.ims_per_batch,
        rank=ctx.rank,
        world_size=ctx.world_size,
        start=position,
        num_batches=schedule.max_iter - start_iter,
    )
    loader = torch.utils.data.DataLoader(
        PlannedDataset(train_ds),
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # the loader must not draw from the global RNG (exact resume)
    )
    autocast: Callable[[], AbstractContextManager[Any]] = (
        (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype))
        if amp_dtype is not None
        else nullcontext
    )
    model.train()
    i = start_iter
    iter_times: list[float] = []
    interrupted = False
    bar = tqdm(
        total=schedule.max_iter,
        initial=start_iter,
        desc=f"train {cfg.name}",
        unit="it",
        disable=not (progress and ctx.is_main),
        dynamic_ncols=True,
    )
    if i < schedule.max_iter:
        logger.info(
            "training %s: %d iterations (%.1f per epoch), %d images per batch on %d process(es), %s%s",
            cfg.name,
            schedule.max_iter,
            schedule.iters_per_epoch,
            cfg.solver.ims_per_batch,
            ctx.world_size,
            device,
            f", PCB from iteration {schedule.pcb_start_iter}" if schedule.pcb_start_iter is not None else "",
        )
    with StopRequest() as stop, logging_redirect_tqdm(), bar:
        data_iter: Iterator[Any] = iter(loader)
        while i < schedule.max_iter:
            t0 = time.perf_counter()
            try:
                images, targets = next(data_iter)
            except (RuntimeError, StopIteration):
                if stop.requested:  # a data-loader worker caught the same Ctrl-C
                    interrupted = True
                    break
                raise
            t_data = time.perf_counter() - t0
            images = [im.to(device, non_blocking=True) for im in images]
            targets = targets_to(targets, device)
            if cls_loss is not None:
                cls_loss.started = schedule.pcb_started(i)
            with autocast():
                loss_dict = train_model(images, targets)
            losses = sum(loss_dict.values())
            assert isinstance(losses, Tensor)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses).backward()
            if cfg.solver.clip_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.solver.clip_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            position = sampler.advance(position, cfg.solver.ims_per_batch)
            scalars = {**loss_dict, "loss": losses}
            step_out = roi_heads.last_cls_loss if cls_loss is not None else None
            active = False
            if isinstance(step_out, StepClsLosses):
                scalars.update({f"loss_cls_step{r}": v for r, v in enumerate(step_out.per_step)})
                active = any(a > 0 for a in step_out.alphas)
            # one device-to-host copy for every logged scalar
            stacked = torch.stack([v.detach().float().reshape(()) for v in scalars.values()]).tolist()
            values = dict(zip(scalars, stacked, strict=True))
            dt = time.perf_counter() - t0
            iter_times.append(dt)
            meter.add(values, dt, t_data)
            i += 1
            bar.update(1)
            if i % cfg.log_period == 0 or i == schedule.max_iter:
                means = reduce_means(meter.means(), ctx, device)
                sec = meter.time / max(meter.count, 1)
                record: dict[str, Any] = {
                    "type": "train",
                    "iteration": i - 1,
                    "epoch": round(schedule.epoch(i), 4),
                    "lr": lr,
                    **{k: _finite_or_none(v) for k, v in means.items()},
                    "time": sec,
                    "data_time": meter.data_time / max(meter.count, 1),
                    "eta_seconds": sec * (schedule.max_iter - i),
                    "wall": time.perf_counter() - wall_start,
                }
                if cls_loss is not None and confusion is not None:
                    record["pcb_started"] = cls_loss.started
                    record["pcb_active"] = active
                    record.update(confusion_summary(confusion))
                if device.type == "cuda":
                    record["max_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                meter.reset()
                if ctx.is_main:
                    log.write(record)
                    bar.set_postfix_str(f"loss {record['loss']:.3f} lr {lr:.4g}", refresh=False)
                    logger.info("%s", progress_line(record, schedule.max_iter))
                    if on_log is not None:
                        on_log(record)
            finite = all(math.isfinite(v) for v in values.values())
            stop_now = stop.requested
            if ctx.distributed:  # every rank takes the same decisions
                flags = all_reduce_max_(torch.tensor([float(stop_now), float(not finite)], device=device))
                stop_now, finite = bool(flags[0] > 0), not bool(flags[1] > 0)
            if not finite:
                raise FloatingPointError(
                    f"training diverged: non-finite loss at iteration {i - 1} "
                    f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}); last good checkpoint: "
                    f"{ckpt_path if ckpt_path.is_file() else 'none'} (try a lower solver.base_lr or "
                    "solver.clip_grad_norm)"
                )
            if stop_now:
                interrupted = True
                break
            if i < schedule.max_iter and i % cfg.checkpoint_period == 0:
                checkpoint(i)
            if val_ds is not None and cfg.eval_period and i < schedule.max_iter and i % cfg.eval_period == 0:
                run_eval(i)
        del data_iter
    if interrupted or i < schedule.max_iter:
        checkpoint(i)
        log.close()
        barrier(ctx)
        logger.warning(
            "stopped at iteration %d of %d; checkpoint %s (continue with --resume)",
            i,
            schedule.max_iter,
            ckpt_path,
        )
        raise KeyboardInterrupt

    # -- finish -----------------------------------------------------------------------------
    trained_now = i > start_iter
    if trained_now or not ckpt_path.is_file():
        checkpoint(i)
    final_path = out / FINAL_MODEL
    if ctx.is_main and (trained_now or not final_path.is_file()):
        pcb_extra = {k: v.detach().cpu() for k, v in confusion.state_dict().items()} if confusion else None
        save_checkpoint(
            final_path,
            make_checkpoint(
                model.state_dict(),
                cfg.model,
                categories=categories,
                extra={"iteration": i, "train_config": to_dict(cfg), "pcb": pcb_extra},
            ),
        )
    barrier(ctx)
    metrics: dict[str, Any] | None = None
    if evaluate_at_end and val_ds is not None:
        if not trained_now and final_file.is_file():
            metrics = json.loads(final_file.read_text(encoding="utf-8"))
        else:
            evaluated = run_eval(i)
            if ctx.is_main and evaluated is not None:
                metrics = {"iteration": i, **evaluated}
                write_json_atomic(final_file, metrics, indent=2)
    elif val_ds is None:
        logger.info("no validation split (data.val_ann is null): no evaluation")
    log.close()
    wall = time.perf_counter() - wall_start
    spi = float(np.mean(iter_times)) if iter_times else None
    if ctx.is_main:
        logger.info(
            "done: %d iterations in %s (%s s/it); outputs in %s",
            i,
            _format_seconds(wall),
            f"{spi:.3f}" if spi is not None else "-",
            out,
        )
    return TrainResult(
        out_dir=out,
        iterations=i,
        max_iter=schedule.max_iter,
        checkpoint=ckpt_path,
        final_model=final_path,
        metrics=metrics,
        wall_seconds=wall,
        seconds_per_iter=spi,
        confusion_matrix=confusion.matrix.detach().cpu().clone() if confusion is not None else None,
        confusion_counts=confusion.counts.detach().cpu().clone() if confusion is not None else None,
    )


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}"
