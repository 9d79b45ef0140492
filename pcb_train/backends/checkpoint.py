"""pcbkit checkpoints: plain containers and tensors, read with `torch.load(weights_only=True)`.

A checkpoint is a dict {"format": CHECKPOINT_FORMAT, "schema": CHECKPOINT_SCHEMA, "backend",
"model_config" (dict), "categories" (dict | None), "model" (state dict), **extra}; `extra` holds
the training loop's state and must be weights_only-safe too. A bare state dict is also accepted
by `checkpoint_model_state` (metadata empty). `checkpoint_info` checks the metadata against the
model config (class count, structure, backend) and the category space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.atomic import atomic_path
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_train.backends.base import CheckpointInfo
from pcb_train.config import ModelConfig, model_config_from_dict, to_dict

CHECKPOINT_FORMAT = "pcbkit-checkpoint"
CHECKPOINT_SCHEMA = 1


def file_sha256(path: str | Path, prefix: int = 16) -> str:
    """sha256 of a file's bytes (first `prefix` hex digits): the checkpoint hash in provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:prefix]


def make_checkpoint(
    model_state: Mapping[str, Tensor],
    model_config: ModelConfig,
    *,
    categories: CategorySpace | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A pcbkit checkpoint of a model state dict (see the module docstring); `extra` keys must not
    collide with the reserved ones."""
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "schema": CHECKPOINT_SCHEMA,
        "backend": model_config.backend,
        "model_config": to_dict(model_config.resolved()),
        "categories": categories.to_dict() if categories is not None else None,
        "model": dict(model_state),
    }
    for k, v in (extra or {}).items():
        if k in ckpt:
            raise PcbkitError(f"checkpoint: extra key {k!r} collides with a reserved key")
        ckpt[k] = v
    return ckpt


def save_checkpoint(path: str | Path, ckpt: Mapping[str, Any]) -> None:
    """torch.save atomically (a crash never leaves a truncated file under the final name)."""
    with atomic_path(path) as tmp:
        torch.save(dict(ckpt), tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file on the CPU with `weights_only=True`; clear errors for bad files."""
    p = Path(path)
    if not p.is_file():
        raise input_error(p, "checkpoint file not found")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, unsupported globals, truncated zip, ...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise input_error(p, f"cannot read checkpoint with weights_only=True ({msg[:200]})") from err
    if not isinstance(obj, dict):
        raise input_error(p, f"not a checkpoint (a {type(obj).__name__}, expected a dict)")
    return obj


def checkpoint_model_state(
    obj: Mapping[str, Any], path: str | Path
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict, metadata) of a pcbkit checkpoint, or of a bare state dict (metadata empty)."""
    if obj.get("format") == CHECKPOINT_FORMAT:
        schema = obj.get("schema")
        if schema != CHECKPOINT_SCHEMA:
            raise input_error(
                path, f"checkpoint schema {schema!r} is not supported (expected {CHECKPOINT_SCHEMA})"
            )
        state = obj.get("model")
        if not isinstance(state, dict):
            raise input_error(path, "checkpoint has no 'model' state dict")
        return state, {k: v for k, v in obj.items() if k != "model"}
    if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return dict(obj), {}
    raise input_error(path, "neither a pcbkit checkpoint nor a model state dict")


def checkpoint_info(
    path: str | Path, meta: Mapping[str, Any], expected: ModelConfig, categories: CategorySpace | None
) -> CheckpointInfo:
    """Check a checkpoint's metadata against the model config (structure) and categories."""
    p = Path(path)
    cfg: ModelConfig | None = None
    if meta.get("model_config") is not None:
        cfg = model_config_from_dict(meta["model_config"], source=f"{p} (model_config)")
        if cfg.num_classes != expected.num_classes:
            raise input_error(
                p,
                f"checkpoint is for K={cfg.num_classes} classes, the config has K={expected.num_classes}",
            )
        diffs = expected.structural_differences(cfg)
        if diffs:
            raise input_error(p, "checkpoint was trained with another model config: " + "; ".join(diffs))
    if meta.get("backend") is not None and meta["backend"] != expected.backend:
        raise input_error(
            p, f"checkpoint is for backend {meta['backend']!r}, the config uses {expected.backend!r}"
        )
    space: CategorySpace | None = None
    if meta.get("categories") is not None:
        space = CategorySpace.from_dict(meta["categories"], source=p)
        if categories is not None:
            categories.check_same(space, f"{p}: checkpoint categories")
    extra = {
        k: v
        for k, v in meta.items()
        if k not in ("format", "schema", "backend", "model_config", "categories")
    }
    return CheckpointInfo(p, file_sha256(p), cfg, space, extra)
