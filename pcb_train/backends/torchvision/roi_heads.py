"""`PCBRoIHeads`: torchvision's `RoIHeads` with pcbkit's class convention at its boundary.

R RoIs, K classes. Everything it hands out (logits [R, K+1] and probabilities with the background
LAST, labels 0..K-1, detections) and takes in (targets, score transforms, the classification
loss) is in pcbkit's convention; parameters keep torchvision's layout. Seams (docs/backends.md §4):
- an optional PCB iterative head (`pcb_train.iterative_head.IterativeRoIHead`, docs/method.md
  §4.4): weight-shared steps, box loss and prediction from the last step;
- `cls_loss_fn(step_logits, labels)`: step_logits a tuple of [N, K+1], labels [N] (K background,
  -1 ignored); default `default_cls_loss` (cross-entropy, step-weighted);
- `score_transform` (q [R, K+1] -> q~) in post-processing, and inference split into box
  predictions / detection selection / masks, so `infer` runs several transforms on one pass;
- `family_loss` (`pcb_train.loss_families`, None for softmax CE): the Seesaw head has K+2 outputs
  in the reference layout (K classes, foreground, background; no column reordering), the EQLv2
  head K+1 sigmoid outputs (torchvision order in the parameters, background last outside).
  `step_logits` are these raw outputs; `score_logits` maps them to the [R, K+1] logits whose
  softmax is the model's test-time scores (docs/losses.md §4), what inference and dumps use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops

from pcb_analysis.errors import ApiMisuseError
from pcb_train.backends.base import ScoreTransform, SelectedDetections
from pcb_train.backends.postprocess import MIN_BOX_SIZE, select_detections
from pcb_train.backends.torchvision.convention import (
    bg_last_to_tv,
    labels_to_tv,
    tv_labels_to_bg_last,
    tv_to_bg_last,
)
from pcb_train.iterative_head import share_checkpoint_keys
from pcb_train.loss_families import FamilyLoss
from pcb_train.normed_layers import NormedConv2d

MASK_ROI_CHUNK = 1024  # RoIs per mask-head call at inference (bounds its activations)
BOX_SMOOTH_L1_BETA = 1.0 / 9.0  # torchvision's Fast R-CNN box loss

ClsLossFn = Callable[[tuple[Tensor, ...], Tensor], Any]


class BoxPredictions(NamedTuple):
    """Box-head outputs for R RoIs: per-step raw class outputs ([R, K+1] background LAST; Seesaw
    [R, K+2] classes, foreground, background: see `PCBRoIHeads.score_logits`) and the final
    box deltas [R, 4(K+1)] (torchvision layout, slot 0 = background; decoded by `decode_boxes`)."""

    step_logits: tuple[Tensor, ...]
    deltas: Tensor

    @property
    def logits(self) -> Tensor:
        """The prediction: the last step's raw class outputs (see the class docstring)."""
        return self.step_logits[-1]


def original_frame_boxes(decoded: Tensor, size: tuple[int, int], original: tuple[int, int]) -> Tensor:
    """Class-specific boxes [r, K, 4] of one image from the resized input's pixels to the original
    image's. The ONE conversion that both `infer` (before post-processing) and the records'
    regressed boxes (what a dump stores) use, so the offline path sees the same numbers."""
    return resize_boxes(decoded.reshape(-1, 4), size, original).reshape(decoded.shape)


def box_regression_loss(deltas: Tensor, labels_tv: Tensor, regression_targets: Tensor) -> Tensor:
    """torchvision's Fast R-CNN box loss: smooth-L1 (beta 1/9) on the ground-truth class's deltas of
    the positives, summed and divided by the number of sampled RoIs N.

    deltas [N, 4(K+1)] (torchvision layout), labels_tv [N] (0 background), targets [N, 4]."""
    n = labels_tv.numel()
    pos = torch.where(labels_tv > 0)[0]
    per_class = deltas.reshape(n, -1, 4)
    loss = F.smooth_l1_loss(
        per_class[pos, labels_tv[pos]].float(),
        regression_targets[pos].float(),
        beta=BOX_SMOOTH_L1_BETA,
        reduction="sum",
    )
    return loss / max(n, 1)


def class_mask_logits(predictor: nn.Module, features: Tensor, classes_tv: Tensor) -> Tensor:
    """Mask logits [D, M, M] of ONE class per RoI (torchvision class slots, 0 = background) from the
    mask head's features [D, C, M/2, M/2].

    For torchvision's `MaskRCNNPredictor` the last 1x1 convolution is evaluated for that class only:
    D x C x M x M multiply-adds instead of D x (K+1) x C x M x M (at K = 1,203 and 300 detections,
    0.06 instead of 72 GMAC per image, and no [D, K+1, M, M] tensor). Other predictors run whole."""
    idx = torch.arange(features.shape[0], device=features.device)
    if isinstance(predictor, MaskRCNNPredictor):
        x = predictor.relu(predictor.conv5_mask(features))
        conv = predictor.mask_fcn_logits
        weight = conv.weight
        if isinstance(conv, NormedConv2d):  # cosine mask predictor (docs/losses.md §2)
            x, weight = conv.normalized_input(x), conv.normalized_weight()
        w = weight[classes_tv, :, 0, 0]  # [D, C]
        out = torch.einsum("dchw,dc->dhw", x, w.to(x.dtype))
        if conv.bias is not None:
            out = out + conv.bias[classes_tv].to(out.dtype)[:, None, None]
        return out
    return predictor(features)[idx, classes_tv]


def default_cls_loss(
    step_logits: tuple[Tensor, ...], labels: Tensor, step_weights: Sequence[float]
) -> Tensor:
    """sum_r w_r * CE(step_logits[r], labels) (labels: K background, -1 ignored); one step = plain CE."""
    total: Tensor | None = None
    for logits, w in zip(step_logits, step_weights, strict=True):
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-1) * float(w)
        total = loss if total is None else total + loss
    assert total is not None
    return total


class PCBRoIHeads(RoIHeads):
    """torchvision `RoIHeads` with pcbkit's class convention at its boundary, an optional PCB
    iterative head, a pluggable classification loss and a score-transform hook.

    Targets given to `forward` carry labels 0..K-1 (pcbkit); detections it returns carry labels
    0..K-1. Training matches, samples and encodes exactly like torchvision (same matcher, sampler
    and box coder). See the module docstring for the seams.
    """

    def __init__(
        self,
        box_roi_pool: MultiScaleRoIAlign,
        box_head: nn.Module,
        box_predictor: nn.Module,
        *,
        num_classes: int,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 1e-4,
        nms_thresh: float = 0.5,
        detections_per_img: int = 300,
        mask_roi_pool: MultiScaleRoIAlign | None = None,
        mask_head: nn.Module | None = None,
        mask_predictor: nn.Module | None = None,
        iterative_head: nn.Module | None = None,
        step_weights: Sequence[float] = (1.0,),
        cls_loss_fn: ClsLossFn | None = None,
        family_loss: FamilyLoss | None = None,
    ) -> None:
        super().__init__(
            box_roi_pool,
            box_head,
            box_predictor,
            fg_iou_thresh,
            bg_iou_thresh,
            batch_size_per_image,
            positive_fraction,
            None,
            score_thresh,
            nms_thresh,
            detections_per_img,
            mask_roi_pool=mask_roi_pool,
            mask_head=mask_head,
            mask_predictor=mask_predictor,
        )
        self.num_classes = int(num_classes)
        self.iterative_head = iterative_head
        self.step_weights = tuple(float(w) for w in step_weights)
        n_steps = getattr(iterative_head, "n_iter", 1) if iterative_head is not None else 1
        if len(self.step_weights) != n_steps:
            raise ApiMisuseError(f"PCBRoIHeads: {len(self.step_weights)} step weights for {n_steps} step(s)")
        # the loss family's statistics are buffers of this module: saved with the model's state
        self.family_loss = family_loss
        self.cls_loss_fn = cls_loss_fn
        if cls_loss_fn is not None:
            self.set_cls_loss(cls_loss_fn)
        self.last_cls_loss: Any = None  # what cls_loss_fn returned last (for logging per-step terms)
        self.score_transform: ScoreTransform | None = None
        if iterative_head is not None:
            # The iterative head shares box_head / box_predictor: keep ONE copy of their weights in
            # the state dict, under torchvision's names (so plain and iterative models share keys).
            share_checkpoint_keys(self)

    # -- seams ------------------------------------------------------------------------------

    def set_cls_loss(self, fn: ClsLossFn | None) -> None:
        """Plug a classification loss `fn(step_logits, labels) -> Tensor | obj with .total` (None: the
        family's loss, CE by default). A `fn` with `bind_family` gets this head's loss family."""
        bind = getattr(fn, "bind_family", None)
        if bind is not None:
            bind(self.family_loss)
        self.cls_loss_fn = fn

    def classification_loss(self, step_logits: tuple[Tensor, ...], labels: Tensor) -> Tensor:
        """step_logits: per-step [N, K+1] (background last); labels [N] (K background, -1 ignore)."""
        if self.cls_loss_fn is None and self.family_loss is not None:
            out: Any = sum(
                self.family_loss(z, labels) * w for z, w in zip(step_logits, self.step_weights, strict=True)
            )
        elif self.cls_loss_fn is None:
            out = default_cls_loss(step_logits, labels, self.step_weights)
        else:
            out = self.cls_loss_fn(step_logits, labels)
        self.last_cls_loss = out
        total = getattr(out, "total", out)
        if not isinstance(total, Tensor):
            raise ApiMisuseError(
                f"cls_loss_fn returned {type(out).__name__}, expected a Tensor or an object with .total"
            )
        return total

    # -- box head -------------------------------------------------------------------------

    def box_predictions(
        self, features: Mapping[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> BoxPredictions:
        """RoI-align + box head (+ iterative steps) for proposals (resized-input pixels)."""
        x = self.box_roi_pool(features, proposals, image_shapes)
        if self.iterative_head is not None:
            out = self.iterative_head(x)
            step_tv, deltas = tuple(out.step_logits), out.step_deltas[-1]
        else:
            logits, deltas = self.box_predictor(self.box_head(x))
            step_tv = (logits,)
        if getattr(self.family_loss, "name", None) == "seesaw":  # reference layout, nothing to move
            return BoxPredictions(tuple(step_tv), deltas)
        return BoxPredictions(tuple(tv_to_bg_last(z) for z in step_tv), deltas)

    def score_logits(self, logits: Tensor) -> Tensor:
        """Raw class outputs of the head -> [R, K+1] logits (background last) whose softmax is the
        model's test-time scores: the logits themselves for softmax CE, the family's mapping for
        Seesaw (K+2 outputs) and EQLv2 (sigmoid outputs); docs/losses.md §4."""
        if self.family_loss is None:
            return logits
        return self.family_loss.test_logits(logits)

    @staticmethod
    def class_probabilities(logits: Tensor) -> Tensor:
        """q = softmax over all K+1 logits [R, K+1] (background last), in float32.

        The softmax runs in torchvision's column order, then the columns move: bit-identical to
        the scores torchvision's own post-processing computes."""
        return tv_to_bg_last(F.softmax(bg_last_to_tv(logits).float(), dim=-1))

    def decode_boxes(
        self, deltas: Tensor, proposals: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> list[Tensor]:
        """Class-specific boxes per image [r, K, 4] (background slot dropped), clipped to the image."""
        counts = [p.shape[0] for p in proposals]
        pred = self.box_coder.decode(deltas.float(), proposals)  # [R, K+1, 4], torchvision slots
        out = []
        for boxes, shape in zip(pred.split(counts, 0), image_shapes, strict=True):
            out.append(box_ops.clip_boxes_to_image(boxes, shape)[:, 1:])
        return out

    def select_detections(
        self, probs: Tensor, decoded: list[Tensor], detections_per_image: int | None = None
    ) -> list[SelectedDetections]:
        """Post-processing of docs/method.md §3 (as torchvision's `postprocess_detections`) per image:
        `postprocess.select_detections` on probs q~ [R, K+1] (background last, all images' rows) and
        each image's decoded boxes [r, K, 4] (any frame; the results are in that frame).
        `detections_per_image` overrides the model's cap (-1: no cap, as for fixed AP)."""
        counts = [b.shape[0] for b in decoded]
        cap = self.detections_per_img if detections_per_image is None else detections_per_image
        return [
            select_detections(
                q,
                boxes,
                score_thresh=self.score_thresh,
                nms_thresh=self.nms_thresh,
                detections_per_image=cap,
                min_box_size=MIN_BOX_SIZE,
            )
            for boxes, q in zip(decoded, probs.split(counts, 0), strict=True)
        ]

    def mask_probabilities(
        self,
        features: Mapping[str, Tensor],
        boxes: list[Tensor],
        labels: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """Mask probabilities [D, 1, M, M] of each box's class (labels 0..K-1), per image.

        At most MASK_ROI_CHUNK RoIs go through the mask head at once (uncapped detections can
        be thousands per image; R50-FPN's mask head holds 256 x 28 x 28 floats per RoI)."""
        if sum(b.shape[0] for b in boxes) <= MASK_ROI_CHUNK:
            return self._mask_probabilities(features, boxes, labels, image_shapes)
        out: list[Tensor] = []
        for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
            parts = []
            for start in range(0, max(b.shape[0], 1), MASK_ROI_CHUNK):
                only = [b[start : start + MASK_ROI_CHUNK] if j == i else b[:0] for j in range(len(boxes))]
                chunk_labels = [lab[start : start + MASK_ROI_CHUNK]]
                part = self._mask_probabilities(features, only, chunk_labels, image_shapes)
                parts.append(part[i])
            out.append(torch.cat(parts, 0))
        return out

    def _mask_probabilities(
        self,
        features: Mapping[str, Tensor],
        boxes: list[Tensor],
        labels: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> list[Tensor]:
        x = self.mask_head(self.mask_roi_pool(features, boxes, image_shapes))
        logits = class_mask_logits(self.mask_predictor, x, labels_to_tv(torch.cat(labels)).to(x.device))
        return list(logits.float().sigmoid()[:, None].split([b.shape[0] for b in boxes], 0))

    # -- forward --------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            return [], self._training_losses(features, proposals, image_shapes, targets)
        box = self.box_predictions(features, proposals, image_shapes)
        probs = self.class_probabilities(self.score_logits(box.logits))
        if self.score_transform is not None:
            probs = self.score_transform(probs)
        dets = self.select_detections(probs, self.decode_boxes(box.deltas, proposals, image_shapes))
        result = [{"boxes": d.boxes, "labels": d.labels, "scores": d.scores} for d in dets]
        if self.has_mask():
            masks = self.mask_probabilities(
                features, [d.boxes for d in dets], [d.labels for d in dets], image_shapes
            )
            for r, m in zip(result, masks, strict=True):
                r["masks"] = m
        return result, {}

    def _training_losses(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None,
    ) -> dict[str, Tensor]:
        if targets is None:
            raise ApiMisuseError("PCBRoIHeads: targets are required in training mode")
        tv_targets = []
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise ApiMisuseError(f"target boxes must be floating point, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise ApiMisuseError(f"target labels must be int64, got {t['labels'].dtype}")
            if t["labels"].numel() and (
                int(t["labels"].min()) < 0 or int(t["labels"].max()) >= self.num_classes
            ):
                raise ApiMisuseError(f"target labels must be in 0..{self.num_classes - 1}")
            tv_targets.append({**t, "labels": labels_to_tv(t["labels"])})
        proposals, matched_idxs, labels_tv, regression_targets = self.select_training_samples(
            proposals, tv_targets
        )
        box = self.box_predictions(features, proposals, image_shapes)
        all_labels_tv = torch.cat(labels_tv, dim=0)
        labels = tv_labels_to_bg_last(all_labels_tv, self.num_classes)
        losses = {
            "loss_classifier": self.classification_loss(box.step_logits, labels),
            "loss_box_reg": box_regression_loss(
                box.deltas, all_labels_tv, torch.cat(regression_targets, dim=0)
            ),
        }
        if self.has_mask():
            mask_proposals, pos_matched = [], []
            for props, lab, idx in zip(proposals, labels_tv, matched_idxs, strict=True):
                pos = torch.where(lab > 0)[0]
                mask_proposals.append(props[pos])
                pos_matched.append(idx[pos])
            losses["loss_mask"] = self.mask_loss(
                features, mask_proposals, pos_matched, tv_targets, image_shapes
            )
        return losses

    def mask_loss(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        matched_idxs: list[Tensor],
        tv_targets: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        """torchvision's Mask R-CNN loss (per-pixel BCE on the ground-truth class's mask of each
        positive RoI, mean over pixels and RoIs), with only that class's logits computed."""
        x = self.mask_head(self.mask_roi_pool(features, proposals, image_shapes))
        classes = torch.cat([t["labels"][i] for t, i in zip(tv_targets, matched_idxs, strict=True)])
        logits = class_mask_logits(self.mask_predictor, x, classes)
        if logits.shape[0] == 0:
            return logits.sum() * 0.0  # keeps every mask parameter in the graph (DDP)
        size = logits.shape[-1]
        targets = torch.cat(
            [
                project_masks_on_boxes(t["masks"], p, i, size)
                for t, p, i in zip(tv_targets, proposals, matched_idxs, strict=True)
            ]
        )
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
