"""detectron2 Mask R-CNN as a pcbkit detector backend (optional: detectron2 is not on PyPI).

    config      `detectron2_cfg` (a `ModelConfig` -> detectron2 CfgNode), `require_detectron2`
    checkpoint  pcbkit / detectron2 checkpoints, local weights, `trusted_checkpointer`
    outputs     box-head outputs and class-specific mask probabilities shared by records/inference
    backend     `Detectron2Backend` (the `DetectorBackend` protocol)
    roi_heads   `PCBROIHeads` + `add_pcb_config` (MODEL.PCB keys)   } import detectron2 at their
    tiny        the "tiny" architecture's backbone                  } top; registered on import

This package and the first four modules import WITHOUT detectron2 (its imports are inside the
functions that need it); `roi_heads` and `tiny` are imported by `detectron2_cfg` only.
"""

from __future__ import annotations

from pcb_train.backends.detectron2.backend import Detectron2Backend
from pcb_train.backends.detectron2.checkpoint import trusted_checkpointer
from pcb_train.backends.detectron2.config import (
    ARCHS,
    NAME,
    NOT_INSTALLED,
    detectron2_cfg,
    require_detectron2,
)
from pcb_train.backends.detectron2.outputs import box_outputs, mask_probabilities

__all__ = [
    "ARCHS",
    "NAME",
    "NOT_INSTALLED",
    "Detectron2Backend",
    "box_outputs",
    "detectron2_cfg",
    "mask_probabilities",
    "require_detectron2",
    "trusted_checkpointer",
]
