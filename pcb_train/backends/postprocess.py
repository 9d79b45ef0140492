"""Post-processing after the score transform (docs/method.md §3) and LVIS results entries.

    select_detections   ONE image: q~ [r, K+1] (background last) + class boxes [r, K, 4] xyxy
                        -> SelectedDetections (boxes [D, 4], scores [D], labels [D] 0..K-1,
                        flat [D] = row * K + label), sorted by decreasing score
    batched_nms         class-wise NMS, bit-identical to torchvision's
    detections_to_lvis  one image's Detections -> LVIS result dicts (bbox xywh, RLE masks)

The in-model path (`infer`) and the offline path (`pcbkit calibrate --dump`) both call
`select_detections` on boxes in ORIGINAL image pixels, so equal inputs give equal detections
bit for bit (docs/backends.md §2).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import boxes as box_ops

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import ApiMisuseError, PcbkitError
from pcb_train.backends.base import SelectedDetections
from pcb_train.backends.mask_ops import chunk_masks, encode_masks, paste_masks

MIN_BOX_SIZE = 1e-2  # detections with a side shorter than this are dropped (torchvision's rule)

# torchvision's batched_nms: one NMS per class above this many box coordinates, else one NMS with
# the classes' boxes offset apart (the "coordinate trick")
_PER_CLASS_NMS_ABOVE = {"cpu": 4000}
_PER_CLASS_NMS_ABOVE_OTHER = 100_000


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: indices of the kept boxes [N, 4] (xyxy), sorted by decreasing score.

    The same kept indices, in the same order, as torchvision's `batched_nms`; large inputs group
    the classes with one stable sort instead of one scan per class (docs/backends.md §2)."""
    limit = _PER_CLASS_NMS_ABOVE.get(boxes.device.type, _PER_CLASS_NMS_ABOVE_OTHER)
    if boxes.numel() <= limit:
        return box_ops.batched_nms(boxes, scores, groups, iou_threshold)
    order = torch.argsort(groups, stable=True)  # each class's rows in ascending index order
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    keep_mask = torch.zeros_like(scores, dtype=torch.bool)
    for rows in order.split(counts.tolist()):
        keep_mask[rows[box_ops.nms(boxes[rows], scores[rows], iou_threshold)]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]


def select_detections(
    q: Tensor,
    boxes: Tensor,
    *,
    score_thresh: float,
    nms_thresh: float,
    detections_per_image: int,
    min_box_size: float = MIN_BOX_SIZE,
) -> SelectedDetections:
    """docs/method.md §3 post-processing of ONE image, after the score transform.

    q [r, K+1] (calibrated) probabilities, background last; boxes [r, K, 4] class-specific boxes
    xyxy (any frame, the same for every row). Steps: drop the background column; keep (proposal,
    class) pairs with score > score_thresh; drop boxes with a side < min_box_size; class-wise NMS
    at IoU nms_thresh (grouped by label + 1, torchvision's label values); the top
    `detections_per_image` by score (all of them when it is negative). Sorted by decreasing
    score, so a capped result is a prefix of the uncapped one.
    """
    r, k1 = q.shape
    k = k1 - 1
    if boxes.shape != (r, k, 4):
        raise ApiMisuseError(
            f"select_detections: boxes must be [r, K, 4] = [{r}, {k}, 4], got {list(boxes.shape)}"
        )
    device = q.device
    scores = q[:, :k].reshape(-1)
    labels = torch.arange(k, device=device).view(1, -1).expand(r, k).reshape(-1)
    flat = torch.arange(r * k, device=device)
    flat_boxes = boxes.reshape(-1, 4)
    inds = torch.where(scores > score_thresh)[0]
    flat_boxes, scores, labels, flat = flat_boxes[inds], scores[inds], labels[inds], flat[inds]
    keep = box_ops.remove_small_boxes(flat_boxes, min_size=min_box_size)
    flat_boxes, scores, labels, flat = flat_boxes[keep], scores[keep], labels[keep], flat[keep]
    keep = batched_nms(flat_boxes, scores, labels + 1, nms_thresh)
    if detections_per_image >= 0:  # negative: no cap (fixed AP)
        keep = keep[:detections_per_image]
    return SelectedDetections(flat_boxes[keep], scores[keep], labels[keep], flat[keep])


def _encode_subset(
    detections: Mapping[str, Tensor], rows: list[int], threshold: float
) -> list[dict[str, Any]]:
    """RLEs of the masks of detections `rows` (pasted masks, or compact RoI masks pasted here)."""
    if not rows:
        return []
    if "masks" in detections:
        masks = detections["masks"]
        if len(rows) == masks.shape[0]:
            return encode_masks(masks)
        return encode_masks(masks[torch.tensor(rows, dtype=torch.long, device=masks.device)])
    probs, boxes = detections["mask_probs"], detections["boxes"]
    h, w = (int(v) for v in detections["image_size"].tolist())
    idx = torch.tensor(rows, dtype=torch.long, device=probs.device)
    out: list[dict[str, Any]] = []
    step = chunk_masks((h, w))
    for start in range(0, len(rows), step):
        sel = idx[start : start + step]
        out.extend(encode_masks(paste_masks(probs[sel], boxes[sel], (h, w), threshold)))
    return out


def detections_to_lvis(
    detections: Mapping[str, Tensor],
    image_id: int,
    categories: CategorySpace,
    rle_cache: dict[int, dict[str, Any]] | None = None,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One image's detections -> LVIS results entries: image_id, category_id (LVIS id via the
    category space), bbox [x, y, w, h], score, and segmentation (RLE) when masks are present.

    `rle_cache` (one dict per image, shared by several detection sets of that image): with
    detections that carry "pairs" (as the torchvision backend's `infer` returns), each pair's mask
    is encoded once. Masks are pasted ("masks" [D, H, W]) or compact ("mask_probs" [D, M, M] with
    "image_size" (H, W)): those are pasted at `mask_threshold`, `chunk_masks` at a time."""
    boxes = detections["boxes"].detach().float().cpu()
    scores = detections["scores"].detach().float().cpu().tolist()
    labels = detections["labels"].detach().cpu().tolist()
    k = categories.num_classes
    bad = [lab for lab in labels if not 0 <= lab < k]
    if bad:
        raise PcbkitError(f"detections: labels {bad[:5]} outside 0..{k - 1}")
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist() if len(boxes) else []
    rles: list[dict[str, Any]] | None = None
    if "masks" in detections or "mask_probs" in detections:
        n = len(labels)
        if rle_cache is not None and "pairs" in detections:
            pairs = detections["pairs"].detach().cpu().tolist()
            todo = [i for i, p in enumerate(pairs) if p not in rle_cache]
            if todo:
                for i, rle in zip(todo, _encode_subset(detections, todo, mask_threshold), strict=True):
                    rle_cache[pairs[i]] = rle
            rles = [rle_cache[p] for p in pairs]
        else:
            rles = _encode_subset(detections, list(range(n)), mask_threshold)
    out: list[dict[str, Any]] = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels, strict=True)):
        entry: dict[str, Any] = {
            "image_id": int(image_id),
            "category_id": int(categories.ids[label]),
            "bbox": [float(v) for v in box],
            "score": float(score),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        out.append(entry)
    return out
