"""Proposal matching for records: each proposal takes its best-IoU ground-truth box.

boxes [R, 4] and gt_boxes [G, 4] xyxy in the same pixels; gt_labels [G] in 0..K-1; optional
gt_ignore [G] bool (crowd regions). Result: labels [R] int64 (matched class at IoU >= threshold,
-1 for an ignore region, K = background) and ious [R] float32 (best IoU, 0 without ground truth).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou


def match_proposals(
    boxes: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    iou_thresh: float = 0.5,
    gt_ignore: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The R-CNN matcher for records (see the module docstring for shapes and values)."""
    r = boxes.shape[0]
    device = boxes.device
    if gt_boxes.numel() == 0 or r == 0:
        return (
            torch.full((r,), num_classes, dtype=torch.int64, device=device),
            torch.zeros((r,), dtype=torch.float32, device=device),
        )
    iou = box_iou(boxes.float(), gt_boxes.to(device=device, dtype=torch.float32))  # [R, G]
    best, idx = iou.max(dim=1)
    labels = gt_labels.to(device=device, dtype=torch.int64)[idx]
    fg = best >= iou_thresh
    labels = torch.where(fg, labels, torch.full_like(labels, num_classes))
    if gt_ignore is not None and gt_ignore.numel():
        ign = gt_ignore.to(device=device, dtype=torch.bool)[idx] & fg
        labels = torch.where(ign, torch.full_like(labels, -1), labels)
    return labels, best.float()
