"""Detector backends: one protocol (`base.DetectorBackend`) and its implementations.

    torchvision   always available (`pcb_train.backends.torchvision.TorchvisionBackend`)
    detectron2    optional, when `import detectron2` works (`pcb_train.backends.detectron2`)

`build_backend(model_config)` picks the implementation named by `model_config.backend`; the
framework subpackages are imported only there, so importing this package stays light and works
without detectron2. The framework-independent pieces are re-exported here: the protocol types
(`base`), checkpoints (`checkpoint`), post-processing (`postprocess`), matching (`matching`) and
mask ops (`mask_ops`).

Never `import torchvision` / `import detectron2` in THIS module: once the subpackages of the
same names are imported, Python sets them as attributes of this package, i.e. as globals here.
"""

from __future__ import annotations

from collections.abc import Sequence

from pcb_analysis.errors import PcbkitError
from pcb_train.backends.base import (
    CheckpointInfo,
    DetectionFilter,
    Detections,
    DetectorBackend,
    ProposalRecord,
    Regressed,
    ScoreTransform,
    SelectedDetections,
    identity,
    softmax_probabilities,
)
from pcb_train.backends.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_SCHEMA,
    checkpoint_info,
    checkpoint_model_state,
    file_sha256,
    make_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pcb_train.backends.mask_ops import RLE_CHUNK, encode_masks, paste_masks
from pcb_train.backends.matching import match_proposals
from pcb_train.backends.postprocess import MIN_BOX_SIZE, batched_nms, detections_to_lvis, select_detections
from pcb_train.config import ModelConfig

__all__ = [
    "DetectionFilter",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_SCHEMA",
    "MIN_BOX_SIZE",
    "RLE_CHUNK",
    "CheckpointInfo",
    "DetectorBackend",
    "Detections",
    "ProposalRecord",
    "Regressed",
    "ScoreTransform",
    "SelectedDetections",
    "batched_nms",
    "build_backend",
    "checkpoint_info",
    "checkpoint_model_state",
    "detections_to_lvis",
    "encode_masks",
    "file_sha256",
    "identity",
    "make_checkpoint",
    "match_proposals",
    "paste_masks",
    "read_checkpoint",
    "save_checkpoint",
    "select_detections",
    "softmax_probabilities",
]


def build_backend(config: ModelConfig, train_min_sizes: Sequence[int] | None = None) -> DetectorBackend:
    """The backend named by `config.backend`, with a freshly built model (random init or
    `config.weights`). Load a trained model with `.load_checkpoint(path)`."""
    # the framework subpackages are imported here only: detectron2 is optional, and a caller that
    # never builds a model (e.g. the offline calibration path) need not load the torchvision model code
    if config.backend == "torchvision":
        from pcb_train.backends.torchvision import TorchvisionBackend

        return TorchvisionBackend(config, train_min_sizes)
    if config.backend == "detectron2":
        try:
            from pcb_train.backends.detectron2 import Detectron2Backend
        except ImportError as err:
            raise PcbkitError(
                f"model.backend: 'detectron2' is not available ({err}); install detectron2 from source "
                "(pip install --no-build-isolation <detectron2 source dir>) or use backend 'torchvision'"
            ) from err
        return Detectron2Backend(config, train_min_sizes)
    raise PcbkitError(
        f"model.backend: unknown backend {config.backend!r}; expected 'torchvision' or 'detectron2'"
    )
