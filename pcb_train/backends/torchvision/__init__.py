"""torchvision Mask R-CNN as a pcbkit detector backend.

    convention  torchvision's background-first columns <-> pcbkit's background-last
    tiny        `TinyBackbone` of the "tiny" architecture
    roi_heads   `PCBRoIHeads` (iterative head, pluggable classification loss, score transforms)
    model       `build_model` / `PCBMaskRCNN` of a `ModelConfig`, local weights, interop
    backend     `TorchvisionBackend` (the `DetectorBackend` protocol)

The subpackage shares its name with the library: every module here imports the library with
absolute imports (`from torchvision.ops import ...`), which always resolve to the real package.
"""

from __future__ import annotations

from pcb_train.backends.torchvision.backend import TorchvisionBackend
from pcb_train.backends.torchvision.convention import (
    bg_last_to_tv,
    labels_to_tv,
    tv_labels_to_bg_last,
    tv_to_bg_last,
)
from pcb_train.backends.torchvision.model import (
    NAME,
    PCBMaskRCNN,
    as_torchvision_model,
    build_model,
    load_weights,
)
from pcb_train.backends.torchvision.roi_heads import (
    BoxPredictions,
    PCBRoIHeads,
    box_regression_loss,
    class_mask_logits,
    default_cls_loss,
    original_frame_boxes,
)
from pcb_train.backends.torchvision.tiny import TinyBackbone

__all__ = [
    "NAME",
    "BoxPredictions",
    "PCBMaskRCNN",
    "PCBRoIHeads",
    "TinyBackbone",
    "TorchvisionBackend",
    "as_torchvision_model",
    "bg_last_to_tv",
    "box_regression_loss",
    "build_model",
    "class_mask_logits",
    "default_cls_loss",
    "labels_to_tv",
    "load_weights",
    "original_frame_boxes",
    "tv_labels_to_bg_last",
    "tv_to_bg_last",
]
