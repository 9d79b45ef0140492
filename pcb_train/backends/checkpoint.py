"""pcbkit checkpoints: plain containers and tensors, read with `torch.load(weights_only=True)`.

A checkpoint is a dict {"format": CHECKPOINT_FORMAT, "schema": CHECKPOINT_SCHEMA, "backend",
"model_config" (dict), "categories" (dict | None), "model" (state dict), **extra}; `extra` holds
the training loop's state and must be weights_only-safe too. A bare state dict is also accepted
by `checkpoint_model_state` (metadata empty). `checkpoint_info` checks the metadata against the
model config (class count, structure, backend) and the category space. `check_checkpoint_file`
(called by every checkpoint reader) refuses, in one line, a file that is no checkpoint at all
(random bytes, JSON: neither a torch zip archive nor a pickle) or an incomplete one (a zip archive
without its central directory: a truncated copy or an interrupted download).
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.atomic import atomic_path, os_errors_named
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
    """torch.save atomically (a crash never leaves a truncated file under the final name). torch
    writes into a Python file object, so a full disk raises OSError (ENOSPC), named by
    `os_errors_named`, rather than torch's "inline_container.cc ... unexpected pos"."""
    with atomic_path(path) as tmp, os_errors_named(path), open(tmp, "wb") as f:
        torch.save(dict(ckpt), f)


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format, .pkl files)
NOT_A_CHECKPOINT = "is not a pcbkit/detectron2 checkpoint"


def check_checkpoint_file(path: str | Path) -> Path:
    """`path` when it exists and looks like a complete torch / pickle file, else one PcbkitError."""
    p = Path(path)
    if not p.is_file():
        raise input_error(p, "checkpoint file not found")
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(p):
            raise input_error(p, f"{NOT_A_CHECKPOINT} that is complete (a truncated zip archive)")
        return p
    if not head or head[0] != _PICKLE_PROTOCOL:
        raise input_error(p, f"{NOT_A_CHECKPOINT} (neither a torch zip archive nor a pickle)")
    return p


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file on the CPU with `weights_only=True`; clear errors for bad files."""
    p = check_checkpoint_file(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, unsupported globals, damaged archive members, ...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if len(msg) > 200:
            msg = msg[:197].rsplit(" ", 1)[0] + " ..."
        raise input_error(p, f"{NOT_A_CHECKPOINT} readable with weights_only=True ({msg})") from err
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
