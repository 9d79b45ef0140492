"""The training engine: one `Trainer` per run, whose loop is `run_step` + periodic seams.

    trainer.restore(ckpt)   model + TrainState + RNG streams from a checkpoint, or a fresh stream
    trainer.fit()           the remaining iterations; False when a stop request ended them early
      run_step              next batch, PCB condition, forward (autocast), backward, SGD step
      log_window            one train record per `log_period` (means over ranks)
      checkpoint            last_checkpoint.pth every `checkpoint_period` (and on a stop)
      evaluate              LVIS evaluation every `eval_period` (and at the end)
    trainer.finish(...)     final checkpoint, model_final.pth, final evaluation
Iteration i is 0-based; `state.iteration` counts completed steps; records carry the 0-based index
of the last step. Every rank takes the same stop / divergence decision (all-reduced flags).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pcb_analysis.atomic import write_json_atomic
from pcb_analysis.categories import CategorySpace
from pcb_train.backends import DetectorBackend
from pcb_train.cls_loss import ClsLoss, confusion_summary
from pcb_train.config import TrainConfig
from pcb_train.data import LVISDetectionDataset, Target, collate, horizontal_flip, targets_to
from pcb_train.distributed import DistContext, all_reduce_max_, barrier, reduce_means
from pcb_train.evaluation import EvalSplit, evaluate_split
from pcb_train.iterative_head import StepClsLosses
from pcb_train.run_dir import FINAL_METRICS, FINAL_MODEL, LAST_CHECKPOINT
from pcb_train.run_log import RunLog, finite_or_none, format_ap, progress_line
from pcb_train.samplers import DistributedBatchSampler, RandomSampler
from pcb_train.schedule import Schedule
from pcb_train.stop import Stopped, StopRequest
from pcb_train.train_state import (
    TrainState,
    gather_rng,
    restore_train_state,
    save_final_model,
    save_train_checkpoint,
    seed_everything,
    set_rng_state,
)
from pcb_train.workers import stop_signals_to_main, unwrap_worker_errors

logger = logging.getLogger(__name__)

OnLog = Callable[[dict[str, Any]], None]


class PlannedDataset(torch.utils.data.Dataset):
    """A training dataset indexed by `(dataset index, flip)` pairs from `DistributedBatchSampler`.

    The flip decision comes with the index (a pure function of seed and position), so the data
    of an iteration does not depend on worker processes or RNG state: the heart of exact resume.
    """

    def __init__(self, base: LVISDetectionDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[Tensor, Target]:
        index, flip = item
        image, target = self.base[int(index)]
        if flip:
            image, target = horizontal_flip(image, target)
        return image, target


@dataclass(frozen=True)
class RunPlan:
    """What a run trains on and when; built and checked before anything is written."""

    cfg: TrainConfig
    out: Path
    train_set: LVISDetectionDataset
    categories: CategorySpace
    sampler: RandomSampler
    schedule: Schedule
    val: EvalSplit | None


class Trainer:
    """Owns the model, the loss plug, the `TrainState` and the run log of one training run."""

    def __init__(
        self,
        plan: RunPlan,
        ctx: DistContext,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        backend: DetectorBackend,
        cls_loss: ClsLoss | None,
        state: TrainState,
        *,
        progress: bool,
        on_log: OnLog | None,
        wall_start: float,
    ) -> None:
        self.plan, self.cfg, self.schedule = plan, plan.cfg, plan.schedule
        self.ctx, self.device, self.amp_dtype = ctx, device, amp_dtype
        self.backend, self.model = backend, backend.model
        self.train_model: nn.Module = backend.model  # the DDP wrapper when distributed
        self.cls_loss, self.state = cls_loss, state
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.progress, self.on_log = progress, on_log
        self.ckpt_path = plan.out / LAST_CHECKPOINT
        self.log = RunLog(plan.out, enabled=False, purge_step=None)  # replaced once the folder is ready
        self.start_iter = 0
        self.iter_times: list[float] = []
        self.wall_start = wall_start
        self.bar: Any = None
        self._last_lr = 0.0
        self._last_active = False
        self.stop_signal: int | None = None  # the signal that stopped `fit` (another rank's: SIGINT)

    @property
    def iteration(self) -> int:
        return self.state.iteration

    # -- setup --------------------------------------------------------------------------------

    def restore(self, ckpt: Mapping[str, Any] | None) -> None:
        """Continue from a checked checkpoint (None: a new run), then wrap the model for DDP."""
        if ckpt is not None:
            cats = self.plan.categories
            rngs = restore_train_state(self.ckpt_path, ckpt, self.backend, cats, self.state, self.device)
            if len(rngs) == self.ctx.world_size:
                set_rng_state(rngs[self.ctx.rank], self.device)
            else:
                logger.warning(
                    "resuming on %d processes a run saved by %d: RNG streams restart "
                    "(data order is still exact)",
                    self.ctx.world_size,
                    len(rngs),
                )
                seed_everything(self.cfg.seed + 1 + self.ctx.rank + self.state.iteration)
            logger.info(
                "resumed %s at iteration %d of %d",
                self.ckpt_path,
                self.state.iteration,
                self.schedule.max_iter,
            )
        else:
            seed_everything(self.cfg.seed + 1 + self.ctx.rank)  # the training stream; rank-specific
        self.start_iter = self.state.iteration
        if self.ctx.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False,
            )

    def _loader(self) -> torch.utils.data.DataLoader:
        batches = DistributedBatchSampler(
            self.plan.sampler,
            self.cfg.solver.ims_per_batch,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            start=self.state.position,
            num_batches=self.schedule.max_iter - self.start_iter,
        )
        return torch.utils.data.DataLoader(
            PlannedDataset(self.plan.train_set),
            batch_sampler=batches,
            collate_fn=collate,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # the loader must not draw from the global RNG (exact resume)
            worker_init_fn=stop_signals_to_main() if self.cfg.data.num_workers else None,
        )

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> bool:
        """Train the remaining iterations; False when a stop request (Ctrl-C, SIGTERM) ended them."""
        loader = self._loader()
        self.model.train()
        self.bar = tqdm(
            total=self.schedule.max_iter,
            initial=self.start_iter,
            desc=f"train {self.cfg.name}",
            unit="it",
            disable=not (self.progress and self.ctx.is_main),
            dynamic_ncols=True,
        )
        if self.iteration < self.schedule.max_iter:
            self._announce()
        stopped = False
        self.stop_signal = None
        with StopRequest() as stop, logging_redirect_tqdm(), self.bar:
            batches: Iterator[Any] = unwrap_worker_errors(loader)
            while not stopped and self.iteration < self.schedule.max_iter:
                values = self.run_step(batches, stop)
                stopped = values is None or self._after_step(values, stop)
            del batches
            self.stop_signal = stop.signum
        return not stopped

    def run_step(self, batches: Iterator[Any], stop: StopRequest) -> dict[str, float] | None:
        """One SGD step on the next batch; its logged scalars, or None when a stop request cut the
        data loader short."""
        state, solver = self.state, self.cfg.solver
        t0 = time.perf_counter()
        try:
            images, targets = next(batches)
        except (RuntimeError, StopIteration):
            if stop.requested:  # a data-loader worker caught the same Ctrl-C
                return None
            raise
        t_data = time.perf_counter() - t0
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = targets_to(targets, self.device)
        if self.cls_loss is not None:
            self.cls_loss.started = self.schedule.pcb_started(state.iteration)
        with self._autocast():
            loss_dict = self.train_model(images, targets)
        losses = sum(loss_dict.values())
        assert isinstance(losses, Tensor)
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(losses).backward()
        if solver.clip_grad_norm is not None:
            state.scaler.unscale_(state.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, solver.clip_grad_norm)
        self._last_lr = state.optimizer.param_groups[0]["lr"]
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.scheduler.step()
        state.position = self.plan.sampler.advance(state.position, solver.ims_per_batch)
        scalars = {**loss_dict, "loss": losses}
        step_out = self.model.roi_heads.last_cls_loss if self.cls_loss is not None else None
        self._last_active = False
        if isinstance(step_out, StepClsLosses):
            scalars.update({f"loss_cls_step{r}": v for r, v in enumerate(step_out.per_step)})
            self._last_active = any(a > 0 for a in step_out.alphas)
        # one device-to-host copy for every logged scalar
        stacked = torch.stack([v.detach().float().reshape(()) for v in scalars.values()]).tolist()
        values = dict(zip(scalars, stacked, strict=True))
        dt = time.perf_counter() - t0
        self.iter_times.append(dt)
        state.meter.add(values, dt, t_data)
        state.iteration += 1
        return values

    def _after_step(self, values: Mapping[str, float], stop: StopRequest) -> bool:
        """The periodic seams after a step; True when the loop must stop."""
        i, cfg, max_iter = self.iteration, self.cfg, self.schedule.max_iter
        self.bar.update(1)
        if i % cfg.log_period == 0 or i == max_iter:
            self.log_window()
        if self._stop_agreed(values, stop.requested):
            return True
        if i < max_iter and i % cfg.checkpoint_period == 0:
            self.checkpoint()
        if self.plan.val is not None and cfg.eval_period and i < max_iter and i % cfg.eval_period == 0:
            self.evaluate()
        return False

    def _stop_agreed(self, values: Mapping[str, float], requested: bool) -> bool:
        """Every rank's stop request and divergence check, the same on all ranks; raises on a
        non-finite loss."""
        finite = all(math.isfinite(v) for v in values.values())
        stop_now = requested
        if self.ctx.distributed:  # every rank takes the same decisions
            flags = all_reduce_max_(torch.tensor([float(stop_now), float(not finite)], device=self.device))
            stop_now, finite = bool(flags[0] > 0), not bool(flags[1] > 0)
        if not finite:
            last = self.ckpt_path if self.ckpt_path.is_file() else "none"
            raise FloatingPointError(
                f"training diverged: non-finite loss at iteration {self.iteration - 1} "
                f"({', '.join(f'{k}={v:.4g}' for k, v in values.items())}); last good checkpoint: "
                f"{last} (try a lower solver.base_lr or solver.clip_grad_norm)"
            )
        return stop_now

    # -- seams --------------------------------------------------------------------------------

    def log_window(self) -> None:
        """Write the train record of the window that ends now (means over ranks) and reset it."""
        i, meter, max_iter = self.iteration, self.state.meter, self.schedule.max_iter
        means = reduce_means(meter.means(), self.ctx, self.device)
        sec = meter.time / max(meter.count, 1)
        record: dict[str, Any] = {
            "type": "train",
            "iteration": i - 1,
            "epoch": round(self.schedule.epoch(i), 4),
            "lr": self._last_lr,
            **{k: finite_or_none(v) for k, v in means.items()},
            "time": sec,
            "data_time": meter.data_time / max(meter.count, 1),
            "eta_seconds": sec * (max_iter - i),
            "wall": time.perf_counter() - self.wall_start,
        }
        if self.cls_loss is not None and self.state.confusion is not None:
            record["pcb_started"] = self.cls_loss.started
            record["pcb_active"] = self._last_active
            record.update(confusion_summary(self.state.confusion))
        if self.device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        meter.reset()
        if self.ctx.is_main:
            self.log.write(record)
            self.bar.set_postfix_str(f"loss {record['loss']:.3f} lr {self._last_lr:.4g}", refresh=False)
            logger.info("%s", progress_line(record, max_iter))
            if self.on_log is not None:
                self.on_log(record)

    def checkpoint(self) -> None:
        """Write last_checkpoint.pth at the current iteration (every rank takes part: RNG gather)."""
        rng = gather_rng(self.ctx, self.device)
        if self.ctx.is_main:
            save_train_checkpoint(self.ckpt_path, self.model, self.cfg, self.plan.categories, self.state, rng)

    def evaluate(self) -> dict[str, Any] | None:
        """Evaluate on the validation split and log an eval record (metrics on rank 0, else None)."""
        assert self.plan.val is not None
        metrics = evaluate_split(self.backend, self.plan.val, self.plan.categories, self.ctx, self.progress)
        self.model.train()
        if metrics is not None:
            record = {"type": "eval", "iteration": self.iteration - 1, **metrics}
            self.log.write(record)
            if self.on_log is not None:
                self.on_log(record)
            logger.info(
                "eval at iteration %d: AP %s  APr %s  APc %s  APf %s  APb %s",
                self.iteration,
                *(format_ap(metrics.get(k)) for k in ("AP", "APr", "APc", "APf", "APb")),
            )
        barrier(self.ctx)
        return metrics

    # -- the end ------------------------------------------------------------------------------

    def stop_early(self) -> None:
        """After a stop request: checkpoint, close the log, and raise `Stopped` (a KeyboardInterrupt
        whose message says where the run stopped and how to continue it)."""
        self.checkpoint()
        self.log.close()
        barrier(self.ctx)
        signum = self.stop_signal if self.stop_signal is not None else signal.SIGINT
        raise Stopped(
            f"stopped by {signal.Signals(signum).name} at iteration {self.iteration} of "
            f"{self.schedule.max_iter}; checkpoint {self.ckpt_path} (continue with --resume)",
            signum,
        )

    def finish(self, evaluate_at_end: bool) -> dict[str, Any] | None:
        """Final checkpoint and model_final.pth (unless a finished run is only resumed), then the final
        evaluation (read back from final_metrics.json when nothing was trained now)."""
        out, i = self.plan.out, self.iteration
        trained_now = i > self.start_iter
        if trained_now or not self.ckpt_path.is_file():
            self.checkpoint()
        final_path = out / FINAL_MODEL
        if self.ctx.is_main and (trained_now or not final_path.is_file()):
            save_final_model(final_path, self.model, self.cfg, self.plan.categories, self.state)
        barrier(self.ctx)
        metrics: dict[str, Any] | None = None
        final_file = out / FINAL_METRICS
        if evaluate_at_end and self.plan.val is not None:
            if not trained_now and final_file.is_file():
                metrics = json.loads(final_file.read_text(encoding="utf-8"))
            else:
                evaluated = self.evaluate()
                if self.ctx.is_main and evaluated is not None:
                    metrics = {"iteration": i, **evaluated}
                    write_json_atomic(final_file, metrics, indent=2)
        elif self.plan.val is None:
            logger.info("no validation split (data.val_ann is null): no evaluation")
        self.log.close()
        return metrics

    def _announce(self) -> None:
        pcb = self.schedule.pcb_start_iter
        logger.info(
            "training %s: %d iterations (%.1f per epoch), %d images per batch on %d process(es), %s%s",
            self.cfg.name,
            self.schedule.max_iter,
            self.schedule.iters_per_epoch,
            self.cfg.solver.ims_per_batch,
            self.ctx.world_size,
            self.device,
            f", PCB from iteration {pcb}" if pcb is not None else "",
        )
