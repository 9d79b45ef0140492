"""GatherRoIAlign (pcb_train/backends/torchvision/roi_align.py) equals torchvision's MultiScaleRoIAlign:
forward and input gradient, over FPN levels, sampling ratios, boxes crossing the border and tiny boxes."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from pcb_train.backends.torchvision.roi_align import GatherRoIAlign

NAMES = ["0", "1", "2"]


def _inputs(dtype: torch.dtype, seed: int, empty_image: bool = False):
    gen = torch.Generator().manual_seed(seed)
    feats = {
        n: torch.randn(3, 5, 32 // 2**i, 40 // 2**i, generator=gen, dtype=dtype).requires_grad_(True)
        for i, n in enumerate(NAMES)
    }
    boxes = []
    for b in range(3):
        n = 0 if empty_image and b == 1 else 25
        xy = torch.rand(n, 2, generator=gen, dtype=dtype) * torch.tensor([330.0, 270.0], dtype=dtype) - 12
        wh = torch.rand(n, 2, generator=gen, dtype=dtype) * 160 + 0.2  # from sub-pixel to most of the image
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return feats, boxes, [(256, 320)] * 3


@pytest.mark.parametrize("sampling_ratio", [1, 2, 3])
@pytest.mark.parametrize("empty_image", [False, True])
def test_gather_roi_align_equals_torchvision_float64(sampling_ratio: int, empty_image: bool) -> None:
    feats, boxes, shapes = _inputs(torch.float64, sampling_ratio, empty_image)
    ref = MultiScaleRoIAlign(NAMES, 7, sampling_ratio=sampling_ratio, canonical_scale=56)
    new = GatherRoIAlign(NAMES, 7, sampling_ratio=sampling_ratio, canonical_scale=56)
    a, b = ref(feats, boxes, shapes), new(feats, boxes, shapes)
    assert a.shape == b.shape == (sum(len(x) for x in boxes), 5, 7, 7)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    g = torch.randn(a.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ga = torch.autograd.grad(a, list(feats.values()), g)
    gb = torch.autograd.grad(b, list(feats.values()), g)
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(v, u, rtol=0, atol=1e-12)


def test_gather_roi_align_float32_and_rectangular_output() -> None:
    feats, boxes, shapes = _inputs(torch.float32, 5)
    ref = MultiScaleRoIAlign(NAMES, (14, 7), sampling_ratio=1, canonical_scale=56)
    new = GatherRoIAlign(NAMES, (14, 7), sampling_ratio=1, canonical_scale=56)
    a, b = ref(feats, boxes, shapes), new(feats, boxes, shapes)
    assert b.dtype == torch.float32 and b.shape[2:] == (14, 7)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_gather_roi_align_leaves_inference_to_torchvision() -> None:
    """Without autograd (inference) the module IS torchvision's: the same bits."""
    feats, boxes, shapes = _inputs(torch.float32, 9)
    ref = MultiScaleRoIAlign(NAMES, 7, sampling_ratio=1, canonical_scale=56)
    new = GatherRoIAlign(NAMES, 7, sampling_ratio=1, canonical_scale=56)
    with torch.no_grad():
        assert torch.equal(ref(feats, boxes, shapes), new(feats, boxes, shapes))


def test_gather_roi_align_no_boxes() -> None:
    feats, _, shapes = _inputs(torch.float32, 3)
    new = GatherRoIAlign(NAMES, 7, sampling_ratio=1, canonical_scale=56)
    out = new(feats, [torch.zeros(0, 4)] * 3, shapes)
    assert out.shape == (0, 5, 7, 7)
