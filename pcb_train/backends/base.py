"""The detector-backend protocol and its framework-independent types.

R proposals, K foreground classes; logits [R, K+1], background = column K (each backend converts
its framework's convention once, at its boundary). Inputs: images, a list of [3, H, W] float
tensors in [0, 1]; targets, dicts with "boxes" [N, 4] xyxy (same image's pixels), "labels" [N]
in 0..K-1, optional "iscrowd" [N] bool (matches recorded as ignore, -1). Outputs stay on the
inputs' device. A score transform maps q [R, K+1] (softmax, background last) to q~ of the same
layout (`identity`: "none"). Detections (one dict per image): "boxes" [D, 4] float32 xyxy in
ORIGINAL pixels, "scores" [D] float32, "labels" [D] int64 0..K-1, optional "masks" [D, H, W]
(bool at mask_threshold, else float). The protocol's methods: docs/backends.md §1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from pcb_analysis.categories import CategorySpace
from pcb_train.config import ModelConfig

ScoreTransform = Callable[[Tensor], Tensor]
# keep(transform name, image index, scores [D], labels [D] 0..K-1) -> bool [D]: which of an image's
# selected detections `infer` keeps; the others are dropped BEFORE masks are predicted
DetectionFilter = Callable[[str, int, Tensor, Tensor], Tensor]
Detections = dict[str, Tensor]
Regressed = Literal["none", "agnostic", "per_class"]


def identity(q: Tensor) -> Tensor:
    """The "none" score transform: q~ = q."""
    return q


@dataclass
class ProposalRecord:
    """The RoI head's view of one image's test-time proposals (R rows).

    boxes [R, 4] float32 proposal boxes, xyxy, original image pixels; logits [R, K+1] float32
    (background last; the last step's for an iterative head); labels [R] int64 (-1 ignore, 0..K-1
    matched ground-truth class at IoU >= 0.5, K background); ious [R] float32 (IoU with the
    best-matching ground-truth box, 0 without ground truth); regressed: None, [R, 4] (the box
    regressed for the top-scoring foreground class) or [R, K*4] (class k at [4k:4k+4]), original
    image pixels.
    """

    image_id: int
    boxes: Tensor
    logits: Tensor
    labels: Tensor
    ious: Tensor
    regressed: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> ProposalRecord:
        return ProposalRecord(
            self.image_id,
            self.boxes.to(device),
            self.logits.to(device),
            self.labels.to(device),
            self.ious.to(device),
            None if self.regressed is None else self.regressed.to(device),
        )


@dataclass(frozen=True)
class CheckpointInfo:
    """What `load_checkpoint` read: the file, its sha256 prefix, model config and category space."""

    path: Path
    sha256: str
    model_config: ModelConfig | None
    categories: CategorySpace | None
    extra: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class DetectorBackend(Protocol):
    """What `dump-logits`, `calibrate` and `train` need from a detection framework."""

    name: str
    config: ModelConfig
    model: nn.Module

    @property
    def num_classes(self) -> int: ...

    def to(self, device: torch.device | str) -> DetectorBackend: ...

    def load_checkpoint(
        self, path: str | Path, categories: CategorySpace | None = None
    ) -> CheckpointInfo: ...

    def proposal_records(
        self,
        images: Sequence[Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        *,
        regressed: Regressed = "none",
        proposals: Sequence[Tensor] | None = None,
    ) -> list[ProposalRecord]: ...

    def infer(
        self,
        images: Sequence[Tensor],
        score_transforms: Mapping[str, ScoreTransform],
        *,
        mask_threshold: float | None = 0.5,
        detections_per_image: int | None = None,
        compact_masks: bool = False,
        keep: DetectionFilter | None = None,
    ) -> dict[str, list[Detections]]: ...


class SelectedDetections(NamedTuple):
    """One image's post-processed detections, in the frame of the boxes `select_detections` got.

    boxes [D, 4], scores [D], labels [D] (0..K-1), flat [D] = proposal_row * K + label (identifies
    the (proposal, class) pair, hence the box and the mask, across score transforms)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    flat: Tensor


def softmax_probabilities(logits: Tensor) -> Tensor:
    """q = softmax over all K+1 logits [R, K+1] (background last), in float32.

    The framework-neutral scoring; a backend whose framework orders the columns differently may
    compute the same softmax in its own column order (bit-identical to its framework)."""
    return torch.softmax(logits.float(), dim=-1)
