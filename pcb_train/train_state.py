"""What a training checkpoint holds, written and read in this one module.

last_checkpoint.pth = the backend's checkpoint (model state, model config, categories) plus
    "train_state": {format, schema, config, iteration, sampler {epoch, index}, optimizer,
                    scheduler, scaler, meter, rng [one entry per rank], world_size, torch_version}
    "pcb":         the OnlineConfusion buffers (matrix [K, K], counts [K]) or None
model_final.pth = the model plus {"iteration", "train_config", "pcb"}.
Everything is plain containers and tensors (`torch.load(weights_only=True)` reads it). `iteration`
is the number of completed steps; the sampler position is where the next batch starts. A resume
restores every item and refuses a config that differs outside RESUME_MUTABLE
(docs/training.md §3).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import input_error
from pcb_train.backends import DetectorBackend, make_checkpoint, save_checkpoint
from pcb_train.config import TrainConfig, to_dict
from pcb_train.distributed import DistContext, gather_to_main
from pcb_train.pcb_loss import OnlineConfusion
from pcb_train.run_log import WindowMeter, flatten
from pcb_train.samplers import SamplerPosition

TRAIN_STATE_FORMAT = "pcbkit-train-state"
TRAIN_STATE_SCHEMA = 1
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


@dataclass
class TrainState:
    """The mutable objects of a run that a checkpoint captures (besides the model and the RNGs)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    meter: WindowMeter = field(default_factory=WindowMeter)
    confusion: OnlineConfusion | None = None
    iteration: int = 0
    position: SamplerPosition = SamplerPosition(0, 0)

    def pcb_buffers(self) -> dict[str, torch.Tensor] | None:
        """The PCB buffers on the CPU (None without the PCB loss)."""
        if self.confusion is None:
            return None
        return {k: v.detach().cpu() for k, v in self.confusion.state_dict().items()}


# --------------------------------------------------------------------------------------------
# RNG states (weights_only-safe containers)


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


def gather_rng(ctx: DistContext, device: torch.device) -> list[dict[str, Any]]:
    """Every rank's `rng_state` in rank order on rank 0 (an empty list on the other ranks)."""
    mine = rng_state(device)
    if not ctx.distributed:
        return [mine]
    if device.type == "cuda":  # gather_object pickles tensors: move them to the CPU first
        mine = {**mine, "cuda": None if mine["cuda"] is None else mine["cuda"].cpu()}
    return gather_to_main(mine, ctx) or []


# --------------------------------------------------------------------------------------------
# writing


def save_train_checkpoint(
    path: Path,
    model: nn.Module,
    cfg: TrainConfig,
    categories: CategorySpace,
    state: TrainState,
    rng: list[dict[str, Any]],
) -> None:
    """Write last_checkpoint.pth: the model and everything `restore_train_state` reads back."""
    train_state = {
        "format": TRAIN_STATE_FORMAT,
        "schema": TRAIN_STATE_SCHEMA,
        "config": to_dict(cfg),
        "iteration": int(state.iteration),
        "sampler": {"epoch": int(state.position.epoch), "index": int(state.position.index)},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
        "meter": state.meter.state_dict(),
        "rng": rng,
        "world_size": len(rng),
        "torch_version": str(torch.__version__),
    }
    extra = {"train_state": train_state, "pcb": state.pcb_buffers()}
    save_checkpoint(path, make_checkpoint(model.state_dict(), cfg.model, categories=categories, extra=extra))


def save_final_model(
    path: Path, model: nn.Module, cfg: TrainConfig, categories: CategorySpace, state: TrainState
) -> None:
    """Write model_final.pth: the trained model, the run's config and the PCB buffers."""
    extra = {"iteration": state.iteration, "train_config": to_dict(cfg), "pcb": state.pcb_buffers()}
    save_checkpoint(path, make_checkpoint(model.state_dict(), cfg.model, categories=categories, extra=extra))


# --------------------------------------------------------------------------------------------
# reading


def config_differences(saved: Mapping[str, Any], current: TrainConfig) -> list[str]:
    """`key: saved != current` for every config value a resume may not change (RESUME_MUTABLE excepted)."""
    a, b = flatten(saved, "."), flatten(to_dict(current), ".")
    out = []
    for key in sorted(set(a) | set(b)):
        if key in RESUME_MUTABLE:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {_short(a.get(key, '<absent>'))} != {_short(b.get(key, '<absent>'))}")
    return out


def _short(value: Any, limit: int = 60) -> str:
    """repr of a config value, cut to `limit` characters (a message names keys, not whole configs)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_resume_state(path: Path, ckpt: Mapping[str, Any], cfg: TrainConfig) -> None:
    """Refuse (PcbkitError naming `path`) a checkpoint that is not a pcbkit training state of `cfg`."""
    train_state = ckpt.get("train_state")
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


def restore_train_state(
    path: Path,
    ckpt: Mapping[str, Any],
    backend: DetectorBackend,
    categories: CategorySpace,
    state: TrainState,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Load the model and `state` from a checked checkpoint; returns the saved per-rank RNG states."""
    backend.load_checkpoint(path, categories)
    ts = ckpt["train_state"]
    state.optimizer.load_state_dict(ts["optimizer"])
    state.scheduler.load_state_dict(ts["scheduler"])
    if ts.get("scaler") is not None and state.scaler.is_enabled():
        state.scaler.load_state_dict(ts["scaler"])
    if state.confusion is not None:
        pcb_state = ckpt.get("pcb")
        if not isinstance(pcb_state, Mapping):
            raise input_error(path, "checkpoint has no PCB buffers ('pcb') but the config uses PCB")
        state.confusion.load_state_dict({k: v.to(device) for k, v in pcb_state.items()})
    state.meter.load_state_dict(ts.get("meter", {}))
    state.iteration = int(ts["iteration"])
    state.position = SamplerPosition(int(ts["sampler"]["epoch"]), int(ts["sampler"]["index"]))
    return list(ts["rng"])
