"""Model pieces the detectron2 backend's records and inference share (no column moves: detectron2
already puts the background LAST, logits [R, K+1], labels 0..K-1, K = background).

    box_outputs         per-step logits [R, K+1] and the last step's deltas of any StandardROIHeads
                        (a loss family's raw outputs mapped by `PCBROIHeads.score_logits`)
    mask_probabilities  mask probabilities [D, 1, M, M] of each instance's predicted class only
    original_rows       proposal rows of `fast_rcnn_inference`'s kept indices

detectron2 (optional) is imported inside `mask_probabilities` only; `Instances` is a type here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pcb_train.normed_layers import NormedConv2d

if TYPE_CHECKING:
    from detectron2.structures import Instances


def box_outputs(
    roi_heads: nn.Module, features: dict[str, Tensor], proposals: list[Instances]
) -> tuple[tuple[Tensor, ...], Tensor]:
    """(per-step logits [R, K+1] background last, last deltas) of any StandardROIHeads; the raw
    outputs of a Seesaw / EQLv2 head go through its `score_logits` (docs/losses.md §4)."""
    if hasattr(roi_heads, "box_predictions"):
        step_logits, deltas = roi_heads.box_predictions(features, proposals)
        return tuple(roi_heads.score_logits(z) for z in step_logits), deltas
    feats = [features[f] for f in roi_heads.box_in_features]
    x = roi_heads.box_pooler(feats, [p.proposal_boxes for p in proposals])
    logits, deltas = roi_heads.box_predictor(roi_heads.box_head(x))
    return (logits,), deltas


def mask_probabilities(
    roi_heads: nn.Module, features: dict[str, Tensor], instances: list[Instances]
) -> list[Tensor]:
    """Mask probabilities [D, 1, M, M] of each instance's `pred_classes`, per image (boxes
    `pred_boxes` in the model's input pixels).

    For detectron2's `MaskRCNNConvUpsampleHead` the final 1x1 convolution is evaluated for the
    predicted class only (D x C x M x M multiply-adds instead of D x K x C x M x M: at K = 1,203
    and 300 detections, no [300, 1203, 28, 28] tensor); other heads run through detectron2."""
    # lazy: detectron2 is optional
    from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
    from detectron2.structures import Instances as Inst

    counts = [len(i) for i in instances]
    head = roi_heads.mask_head
    if roi_heads.mask_pooler is None or not isinstance(head, MaskRCNNConvUpsampleHead):
        shallow = [
            Inst(i.image_size, pred_boxes=i.pred_boxes, pred_classes=i.pred_classes) for i in instances
        ]
        out = roi_heads.forward_with_given_boxes(features, shallow)
        return [o.pred_masks for o in out]
    feats = [features[f] for f in roi_heads.mask_in_features]
    x = roi_heads.mask_pooler(feats, [i.pred_boxes for i in instances])
    predictor = head.predictor
    for layer in head:
        if layer is predictor:
            break
        x = layer(x)
    classes = torch.cat([i.pred_classes for i in instances]).to(x.device)
    weight = predictor.weight
    if isinstance(predictor, NormedConv2d):  # cosine mask predictor (docs/losses.md §2)
        x, weight = predictor.normalized_input(x), predictor.normalized_weight()
    weight = weight[:, :, 0, 0]  # [K or 1, C]
    if weight.shape[0] == 1:  # class-agnostic masks
        classes = torch.zeros_like(classes)
    logits = torch.einsum("dchw,dc->dhw", x, weight[classes].to(x.dtype))
    if predictor.bias is not None:
        logits = logits + predictor.bias[classes].to(logits.dtype)[:, None, None]
    return list(logits.float().sigmoid()[:, None].split(counts, 0))


def original_rows(boxes: Tensor, scores: Tensor, kept: Tensor) -> Tensor:
    """Proposal rows of `fast_rcnn_inference`'s kept indices (it drops rows with non-finite boxes or
    scores before indexing, so its indices count the finite rows only)."""
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if bool(valid.all()):
        return kept
    return valid.nonzero().squeeze(1)[kept]
