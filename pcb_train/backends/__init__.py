"""Detector backends: one protocol (`DetectorBackend`, see `base`) and its implementations.

    torchvision   always available (`torchvision_backend.TorchvisionBackend`)
    detectron2    optional, when `import detectron2` works

`build_backend(model_config)` picks the implementation named by `model_config.backend`; the
framework modules are imported only there, so importing this package stays light.
"""

from __future__ import annotations

from collections.abc import Sequence

from pcb_analysis.errors import PcbkitError
from pcb_train.backends.base import (
    CheckpointInfo,
    Detections,
    DetectorBackend,
    ProposalRecord,
    ScoreTransform,
    detections_to_lvis,
    identity,
    make_checkpoint,
    match_proposals,
    read_checkpoint,
    save_checkpoint,
)
from pcb_train.config import ModelConfig

__all__ = [
    "CheckpointInfo",
    "DetectorBackend",
    "Detections",
    "ProposalRecord",
    "ScoreTransform",
    "build_backend",
    "detections_to_lvis",
    "identity",
    "make_checkpoint",
    "match_proposals",
    "read_checkpoint",
    "save_checkpoint",
]


def build_backend(config: ModelConfig, train_min_sizes: Sequence[int] | None = None) -> DetectorBackend:
    """The backend named by `config.backend`, with a freshly built model (random init or
    `config.weights`). Load a trained model with `.load_checkpoint(path)`."""
    if config.backend == "torchvision":
        from pcb_train.backends.torchvision_backend import TorchvisionBackend

        return TorchvisionBackend(config, train_min_sizes)
    if config.backend == "detectron2":
        try:
            from pcb_train.backends.detectron2_backend import Detectron2Backend  # type: ignore[import-not-found]
        except ImportError as err:
            raise PcbkitError(
                f"model.backend: 'detectron2' is not available ({err}); install detectron2 from source "
                "(pip install --no-build-isolation <detectron2 source dir>) or use backend 'torchvision'"
            ) from err
        return Detectron2Backend(config, train_min_sizes)
    raise PcbkitError(
        f"model.backend: unknown backend {config.backend!r}; expected 'torchvision' or 'detectron2'"
    )
