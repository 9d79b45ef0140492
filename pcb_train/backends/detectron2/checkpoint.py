"""Checkpoints and weights of the detectron2 backend's model.

`load_checkpoint` reads a pcbkit checkpoint (`pcb_train.backends.checkpoint`, weights_only=True,
checked against the config, the categories and every key) or a detectron2 file of the same
architecture: `.pkl` through detectron2's own reader; `.pth` with weights_only=True first and,
when torch refuses it (detectron2 files may pickle other objects), weights_only=False with a log
line (only load files you trust). `trusted_checkpointer` is detectron2's `DetectionCheckpointer`
with that `.pth` reader. PCB buffers and BatchNorm step counters may be missing from a detectron2
file. detectron2 is imported only inside `trusted_checkpointer` (it is optional).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import input_error
from pcb_train.backends.base import CheckpointInfo
from pcb_train.backends.checkpoint import (
    CHECKPOINT_FORMAT,
    check_checkpoint_file,
    checkpoint_info,
    checkpoint_model_state,
    file_sha256,
)
from pcb_train.backends.detectron2.config import require_detectron2
from pcb_train.config import ModelConfig

logger = logging.getLogger(__name__)

CLS_SCORE_KEY = "roi_heads.box_predictor.cls_score.weight"
PCB_BUFFER_PREFIX = "roi_heads.confusion."


def trusted_checkpointer(
    model: nn.Module, save_dir: str = "", *, preloaded: Any = None, **checkpointables: Any
) -> Any:
    """A detectron2 `DetectionCheckpointer` whose `.pth` reader tries `weights_only=True` and, when
    torch refuses the file, retries with `weights_only=False` and logs why.

    `preloaded`: the file's object, already read (the reader then returns it). After `.load()`,
    `.last_incompatible` holds fvcore's missing / unexpected keys and incorrect shapes.
    `checkpointables` (optimizer, scheduler, ...) as for DetectionCheckpointer."""
    require_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer  # lazy: detectron2 is optional

    class TrustedDetectionCheckpointer(DetectionCheckpointer):
        last_incompatible: Any = None

        def _torch_load(self, f: Any) -> Any:
            if preloaded is not None:
                return preloaded
            try:
                return torch.load(f, map_location="cpu", weights_only=True)
            except Exception as err:  # torch's UnpicklingError for globals it does not allow
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                logger.info(
                    "%s: loading with weights_only=False: torch's weights_only=True loader refused this "
                    "detectron2 checkpoint (%s); detectron2 files pickle non-tensor objects, which "
                    "torch >= 2.6 rejects by default. Only load checkpoints you trust.",
                    f,
                    first[:160],
                )
                return torch.load(f, map_location="cpu", weights_only=False)

        def _load_model(self, checkpoint: Any) -> Any:
            self.last_incompatible = super()._load_model(checkpoint)
            return self.last_incompatible

    return TrustedDetectionCheckpointer(model, save_dir, **checkpointables)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise from a local detectron2 file (ImageNet `R-50.pkl`, model zoo `.pkl`, `.pth`)
    with detectron2's checkpointer: name-matching heuristics for Caffe2-style files, tensors of
    another shape skipped with a log line (e.g. the classifier of a COCO model)."""
    p = Path(path)
    if not p.is_file():
        raise input_error(p, "weights file not found")
    trusted_checkpointer(model).load(str(p))


def load_checkpoint(
    model: nn.Module, config: ModelConfig, path: str | Path, categories: CategorySpace | None = None
) -> CheckpointInfo:
    """Load a trained model into `model`: a pcbkit checkpoint or a detectron2 checkpoint of this
    architecture (see the module docstring); every weight must fit."""
    p = check_checkpoint_file(path)  # not found, not a torch/pickle file, truncated: one line
    obj: Any = None
    reason: str | None = "a .pkl file (detectron2 / Caffe2 pickle)"
    if p.suffix != ".pkl":
        obj, reason = _try_weights_only(p)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state, meta = checkpoint_model_state(obj, p)
        info = checkpoint_info(p, meta, config, categories)
        load_state(model, state, p)
        return info
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        obj = {"model": obj}  # a bare state dict
    return _load_detectron2(model, p, obj, reason)


def load_state(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Strict load of a full state dict (pcbkit checkpoints): clear errors for K / shape / key
    mismatches."""
    own = model.state_dict()
    if (
        CLS_SCORE_KEY in state
        and CLS_SCORE_KEY in own
        and state[CLS_SCORE_KEY].shape[0] != own[CLS_SCORE_KEY].shape[0]
    ):
        raise input_error(
            path,
            f"checkpoint is for K={state[CLS_SCORE_KEY].shape[0] - 1} classes, the model has "
            f"K={own[CLS_SCORE_KEY].shape[0] - 1}",
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise input_error(path, f"{len(wrong)} tensor(s) have another shape than the model's: {wrong[:3]}")
    result = model.load_state_dict(dict(state), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise input_error(
            path,
            f"checkpoint does not fit the model: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}",
        )


def _load_detectron2(model: nn.Module, p: Path, preloaded: Any, reason: str | None) -> CheckpointInfo:
    """A detectron2 checkpoint through `trusted_checkpointer`; refuses one that does not fit."""
    try:
        if preloaded is not None:
            logger.info("%s: a detectron2 checkpoint (read with weights_only=True)", p)
        elif p.suffix != ".pkl":
            logger.info(
                "%s: loading with weights_only=False: torch's weights_only=True loader refused this "
                "detectron2 checkpoint (%s); detectron2 files may pickle non-tensor objects, which "
                "torch >= 2.6 rejects by default. Only load checkpoints you trust.",
                p,
                reason,
            )
            preloaded = torch.load(p, map_location="cpu", weights_only=False)
        ckpt = trusted_checkpointer(model, preloaded=preloaded)
        extra = ckpt.load(str(p), checkpointables=[])
    except Exception as err:
        raise input_error(p, f"cannot read as a detectron2 checkpoint ({str(err)[:200]})") from err
    bad = ckpt.last_incompatible
    shapes = list(getattr(bad, "incorrect_shapes", []) or [])
    for key, theirs, ours in shapes:
        if key == CLS_SCORE_KEY:
            raise input_error(
                p, f"checkpoint is for K={theirs[0] - 1} classes, the model has K={ours[0] - 1}"
            )
    # benign: PCB buffers (a model trained without the PCB loss), BatchNorm step counters (a
    # FrozenBN checkpoint, e.g. detectron2's model zoo, in a BN model and the reverse)
    missing = [k for k in getattr(bad, "missing_keys", []) if not _benign_key(k, missing=True)]
    unexpected = [k for k in getattr(bad, "unexpected_keys", []) if not _benign_key(k, missing=False)]
    if shapes or missing or unexpected:
        raise input_error(
            p,
            "detectron2 checkpoint does not fit the model: "
            f"{len(shapes)} shape mismatch(es) {[s[0] for s in shapes][:3]}, "
            f"{len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}",
        )
    keep = {k: v for k, v in (extra or {}).items() if isinstance(v, (int, float, str))}
    return CheckpointInfo(p, file_sha256(p), None, None, {"format": "detectron2", **keep})


def _benign_key(key: str, *, missing: bool) -> bool:
    """Keys a detectron2 checkpoint may lack (or carry) without changing the model's outputs."""
    if key.endswith(".num_batches_tracked"):
        return True
    return missing and key.startswith(PCB_BUFFER_PREFIX)


def _try_weights_only(path: Path) -> tuple[Any, str | None]:
    """(object, None) when `torch.load(weights_only=True)` reads the file, else (None, reason)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return None, first[:200]
