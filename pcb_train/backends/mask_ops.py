"""Mask pasting and RLE encoding, shared by every backend and by `postprocess`.

    paste_masks   RoI mask probabilities [D, M, M] + boxes [D, 4] (xyxy, image pixels)
                  -> [D, H, W] float32 probabilities, or bool at a threshold
    encode_masks  binary masks [D, H, W] (bool / uint8 / probabilities >= 0.5)
                  -> COCO RLE dicts {"size": [H, W], "counts": str}, RLE_CHUNK masks per call

`paste_masks` reproduces torchvision's `paste_masks_in_image` (same geometry, same bilinear
weights) with matrix products; see docs/backends.md §3.
"""

from __future__ import annotations

from typing import Any

import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import Tensor

RLE_CHUNK = 64  # masks encoded per pycocotools call (bounds the [H, W, n] uint8 copy)
CHUNK_PIXELS = 1 << 22  # pasted pixels per chunk of `chunk_masks` (small images: many masks at once)


def chunk_masks(image_size: tuple[int, int]) -> int:
    """Masks pasted and encoded together for one image of `image_size`: RLE_CHUNK, or more when the
    image is small (up to CHUNK_PIXELS pasted pixels; fewer, longer calls, the same values)."""
    return max(RLE_CHUNK, CHUNK_PIXELS // max(int(image_size[0]) * int(image_size[1]), 1))


def _interp_weights(lo: Tensor, hi: Tensor, src_size: int, n: int) -> Tensor:
    """Bilinear (align_corners=False) resampling weights [D, n, src_size] that resize a source line
    of `src_size` samples to the integer span [lo, hi] (inclusive) of an n-pixel image line, zero
    outside the span: torchvision's `paste_mask_in_image` along one axis, written as a matrix."""
    d = lo.shape[0]
    device = lo.device
    t = torch.arange(n, device=device)
    size = (hi - lo + 1).clamp(min=1)  # [D]
    dst = t[None, :] - lo[:, None]  # [D, n] index in the resized mask
    ratio = float(src_size) / size.to(torch.float32)  # torch's area_pixel_compute_scale
    src = (ratio[:, None] * (dst.to(torch.float32) + 0.5) - 0.5).clamp(min=0.0)
    i0 = src.floor().to(torch.int64).clamp(max=src_size - 1)
    l1 = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
    i1 = i0 + (i0 < src_size - 1).to(torch.int64)
    inside = (t[None, :] >= lo.clamp(min=0)[:, None]) & (t[None, :] < (hi + 1).clamp(max=n)[:, None])
    w = torch.zeros((d, n, src_size), device=device, dtype=torch.float32)
    w.scatter_add_(2, i0[..., None], ((1.0 - l1) * inside)[..., None])
    w.scatter_add_(2, i1[..., None], (l1 * inside)[..., None])
    return w


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    threshold: float | None = None,
    max_elements: int = 1 << 25,
) -> Tensor:
    """Paste RoI mask probabilities [D, M, M] into the image: [D, H, W] float32 probabilities, or
    bool (probability >= threshold) when a threshold is given.

    Batched over detections (chunks of at most `max_elements` output values) when the whole
    images fit that budget or on an accelerator; otherwise (large images on the CPU) one product
    per detection restricted to its box, written into a preallocated output."""
    d, m = masks.shape[0], masks.shape[-1]
    h_img, w_img = int(image_size[0]), int(image_size[1])
    out_dtype = torch.float32 if threshold is None else torch.bool
    if d == 0:
        return masks.new_zeros((0, h_img, w_img), dtype=out_dtype)
    p = m + 2
    padded = F.pad(masks.float(), (1, 1, 1, 1))
    scale = float(p) / m
    boxes = boxes.float()
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    ib = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1).to(torch.int64)
    wy = _interp_weights(ib[:, 1], ib[:, 3], p, h_img)  # [D, H, P]
    wx = _interp_weights(ib[:, 0], ib[:, 2], p, w_img)  # [D, W, P]
    # columns first, then rows: the order in which torchvision's bilinear kernel combines the taps
    if masks.device.type != "cpu" or d * h_img * w_img <= max_elements:
        out = masks.new_empty((d, h_img, w_img), dtype=out_dtype)
        step = max(1, max_elements // max(h_img * w_img, 1))
        for start in range(0, d, step):
            sl = slice(start, start + step)
            res = torch.bmm(wy[sl], torch.bmm(padded[sl], wx[sl].transpose(1, 2)))
            out[sl] = res if threshold is None else res >= threshold
        return out
    out = masks.new_zeros((d, h_img, w_img), dtype=out_dtype)
    y0s, x0s = ib[:, 1].clamp(min=0).tolist(), ib[:, 0].clamp(min=0).tolist()
    y1s, x1s = (ib[:, 3] + 1).clamp(max=h_img).tolist(), (ib[:, 2] + 1).clamp(max=w_img).tolist()
    for i in range(d):
        y0, y1, x0, x1 = y0s[i], y1s[i], x0s[i], x1s[i]
        if y1 <= y0 or x1 <= x0:
            continue
        region = wy[i, y0:y1] @ (padded[i] @ wx[i, x0:x1].T)
        out[i, y0:y1, x0:x1] = region if threshold is None else region >= threshold
    return out


def encode_masks(masks: Tensor) -> list[dict[str, Any]]:
    """Binary masks [D, H, W] (bool / uint8 / probabilities >= 0.5) -> COCO RLEs with str counts."""
    if masks.dtype.is_floating_point:
        masks = masks >= 0.5
    h, w = int(masks.shape[1]), int(masks.shape[2])
    # [D, W, H] C-contiguous: each chunk of it, seen as [H, W, n], is the Fortran-ordered array
    # pycocotools reads, so no column-major copy of the masks is made
    arr = masks.to(device="cpu", dtype=torch.uint8).transpose(1, 2).contiguous().numpy()
    out: list[dict[str, Any]] = []
    for start in range(0, arr.shape[0], RLE_CHUNK):
        chunk = arr[start : start + RLE_CHUNK].transpose(2, 1, 0)
        for rle in mask_utils.encode(chunk):
            counts = rle["counts"]
            text = counts.decode("ascii") if isinstance(counts, bytes) else counts
            out.append({"size": [h, w], "counts": text})
    return out
