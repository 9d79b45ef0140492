"""RoIAlign as one gather over all FPN levels: the CPU training path of the torchvision backend.

    roi_align_gather(table [T, C], rois [R, 5], ...)        -> [R, C, ph, pw]
    GatherRoIAlign(featmap_names, output_size, sampling_ratio, canonical_scale=...)
        a `MultiScaleRoIAlign` whose forward, on the CPU with autograd recording, samples every
        level's RoIs from one channels-last table [sum_l B H_l W_l, C] by `index_select`.

Same arithmetic as torchvision's `roi_align(aligned=False)` with a fixed `sampling_ratio` s > 0 (the
contract, tested to float rounding): a box (x1, y1, x2, y2) at level scale `k` covers
[x1 k, x1 k + max((x2 - x1) k, 1)]; bin (p, q) averages s x s bilinear samples at
y = y1 k + p h + (i + 1/2) h / s (h = bin height), likewise x; a sample outside [-1, H] x [-1, W]
is 0, coordinates below 0 read row/column 0 and those at or past H - 1 read the last row/column.

Why: torchvision's CPU backward loops over RoIs x channels x bins x samples and recomputes the
bilinear weights for every channel, single-threaded; on the tiny demo model it took ~40% of a
training step (docs/backends.md §5). Here the weights are computed once per sample and the
backward is `index_add_` of [C]-long rows. Inference and GPUs keep torchvision's kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales  # reused as they are


def _axis(start: Tensor, bin_size: Tensor, bins: int, s: int, size: Tensor) -> tuple[Tensor, Tensor]:
    """Sample positions along one axis -> (indices [R, 2, bins * s], weights [R, 2, bins * s]).

    start, bin_size, size: [R] (size = the level's H or W per RoI). Index 0 / 1 of dim 1: the lower
    and the upper neighbour. Weights are 0 for samples outside [-1, size]."""
    p = torch.arange(bins, dtype=start.dtype, device=start.device).repeat_interleave(s)
    i = torch.arange(s, dtype=start.dtype, device=start.device).repeat(bins)
    pos = start[:, None] + p[None, :] * bin_size[:, None] + (i[None, :] + 0.5) * bin_size[:, None] / s
    lim = size.to(start.dtype)[:, None]
    valid = (pos >= -1.0) & (pos <= lim)
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    top = low >= lim - 1
    low = torch.where(top, lim - 1, low)
    high = torch.where(top, low, low + 1)
    pos = torch.where(top, low, pos)
    frac = (pos - low) * valid
    return torch.stack([low, high], 1).long(), torch.stack([(1.0 - frac) * valid, frac], 1)


def roi_align_gather(
    table: Tensor,
    rois: Tensor,
    output_size: tuple[int, int],
    sampling_ratio: int,
    *,
    offset: Tensor,
    height: Tensor,
    width: Tensor,
    scale: Tensor,
) -> Tensor:
    """RoIAlign of R RoIs from a channels-last feature table -> [R, C, ph, pw].

    table [T, C]: rows b H W + y W + x of each level's [B, C, H, W] map, levels stacked; rois [R, 5]
    (batch index, x1, y1, x2, y2 in image pixels); per RoI: `offset` (first row of its level),
    `height`, `width` and `scale` of its level ([R] each)."""
    ph, pw = output_size
    s = int(sampling_ratio)
    r = rois.shape[0]
    if r == 0:
        return table.new_zeros(0, table.shape[1], ph, pw)
    coords = rois[:, 1:].to(torch.float32 if rois.dtype != torch.float64 else rois.dtype)
    k = scale.to(coords.dtype)
    x1, y1 = coords[:, 0] * k, coords[:, 1] * k
    roi_w = (coords[:, 2] * k - x1).clamp(min=1.0)
    roi_h = (coords[:, 3] * k - y1).clamp(min=1.0)
    yi, yw = _axis(y1, roi_h / ph, ph, s, height)
    xi, xw = _axis(x1, roi_w / pw, pw, s, width)
    base = offset + rois[:, 0].long() * height * width  # [R]
    # [R, 2 (y lo/hi), 2 (x lo/hi), ph s, pw s]
    rows = (base[:, None, None, None, None] + (yi * width[:, None, None])[:, :, None, :, None]
            + xi[:, None, :, None, :])
    wts = (yw[:, :, None, :, None] * xw[:, None, :, None, :]).to(table.dtype)
    vals = table.index_select(0, rows.reshape(-1)).view(r, 4, ph, s, pw, s, -1)
    out = (vals * wts.reshape(r, 4, ph, s, pw, s, 1)).sum(dim=(1, 3, 5)) / (s * s)
    return out.permute(0, 3, 1, 2)  # [R, C, ph, pw]


class GatherRoIAlign(MultiScaleRoIAlign):
    """`MultiScaleRoIAlign` with the one-gather CPU path of `roi_align_gather` while autograd records
    (training on the CPU); torchvision's own kernel otherwise (inference, CUDA, adaptive sampling)."""

    def forward(  # type: ignore[override]
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        if not (torch.is_grad_enabled() and feats[0].device.type == "cpu" and self.sampling_ratio > 0):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                feats, image_shapes, self.canonical_scale, self.canonical_level
            )
        assert self.scales is not None and self.map_levels is not None
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.long)
        dims = torch.tensor([[f.shape[2], f.shape[3]] for f in feats])
        sizes = torch.tensor([f.shape[0] * f.shape[2] * f.shape[3] for f in feats])
        starts = torch.cumsum(sizes, 0) - sizes
        table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats])
        return roi_align_gather(
            table, rois, self.output_size, self.sampling_ratio,  # type: ignore[arg-type]
            offset=starts[levels], height=dims[levels, 0], width=dims[levels, 1],
            scale=torch.tensor(self.scales, dtype=torch.float64)[levels],
        )
