"""What an artifact (dump, calibration results) records about its origin.

`provenance(...)` -> {"checkpoint", "checkpoint_hash" (sha256 prefix), "config_file", "config"
(the resolved model config plus the options that change the artifact), "git_sha", "torch_version"}.
checkpoint_hash and config must match for a dump to be resumed or its ranks merged.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pcb_train.backends.base import CheckpointInfo
from pcb_train.config import ModelConfig, to_dict


def git_sha(start: Path | None = None) -> str | None:
    """The commit of the source tree this code runs from (None outside a git checkout)."""
    where = start if start is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None

def provenance(
    info: CheckpointInfo,
    model_config: ModelConfig,
    config_path: str | Path,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What an artifact records about its origin.

    checkpoint_hash (sha256 prefix) and config (the resolved model config plus `extra`, the
    options that change the rows) must match for a dump to be resumed or its ranks merged."""
    return {
        "checkpoint": str(info.path),
        "checkpoint_hash": info.sha256,
        "config_file": str(config_path),
        "config": {"model": to_dict(model_config), **dict(extra or {})},
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
    }

