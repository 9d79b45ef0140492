"""torchvision Mask R-CNN as a pcbkit detector backend.

R proposals, K foreground classes; pcbkit logits [R, K+1], background = column K.

torchvision puts the background FIRST (class logits [R, K+1] with column 0 = background, labels
1..K for objects, box deltas and mask logits with a background slot 0). The parameters keep
torchvision's layout (so torchvision state dicts load unchanged); the conversion happens in ONE
place, the functions of the "class convention" section below, and `PCBRoIHeads` calls them at
its boundary: everything it hands out (logits, probabilities, labels, detections) and everything
it takes in (targets, score transforms, the classification loss) is in pcbkit's convention.

Architectures (ModelConfig.arch):
- "r50_fpn": the paper's Mask R-CNN R50-FPN for LVIS: ResNet-50 + FPN (256 channels, 5 levels),
  RPN, 1024-d TwoMLPHead, 4 x 256 mask convs, K+1 classes, 300 detections per image, score
  threshold 1e-4, NMS 0.5. Random initialisation (`weights=None, weights_backbone=None`: nothing
  is downloaded) unless `ModelConfig.weights` names a local file.
- "tiny": a strided conv backbone (stem + 4 stages of 16-24-48-96-128 channels, BatchNorm) with
  a 3-level FPN (strides 8/16/32, 64 channels, anchors 16/32/64), small RPN top-N, 64 RoIs per
  image, RoIAlign with one sample per bin, a 256-d two-layer box head and a 2 x 32 mask head on
  7 x 7 RoIs (14 x 14 masks): trains and infers on the synthetic 128 px dataset on 2 CPU cores
  (a training step of 8 images takes about 0.2 s there).

Inference (`TorchvisionBackend.infer`) evaluates the mask predictor's last 1x1 convolution for the
detected class only and pastes masks with batched matrix products (`paste_masks`): same numbers
as torchvision up to float rounding, far less work at K = 1,203 and 300 detections per image.

`PCBRoIHeads` (a torchvision `RoIHeads`, the seam for a new head) adds:
- the optional PCB iterative head (`pcb_train.iterative_head.IterativeRoIHead`, docs/method.md §4.4):
  3 weight-shared passes, box loss and prediction from the last step;
- a pluggable classification loss `cls_loss_fn(step_logits, labels) -> Tensor`: step_logits is a
  tuple of [N, K+1] logits (background last; one entry for the plain head), labels [N] in
  0..K-1, K = background, -1 ignored. Default: cross-entropy (equal to torchvision's), weighted
  by the step weights for an iterative head. PCB plugs `pcb_loss` with an `OnlineConfusion`;
- a score-transform hook (`score_transform`, q [R, K+1] -> q~ [R, K+1]) in post-processing, and
  the split of inference into box predictions / detection selection / masks that `infer` uses to
  run several transforms on ONE backbone + RPN + box-head pass.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, project_masks_on_boxes
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops import boxes as box_ops
from torchvision.ops.misc import Conv2dNormActivation, FrozenBatchNorm2d

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_train.backends.base import (
    MIN_BOX_SIZE,
    CheckpointInfo,
    Detections,
    ProposalRecord,
    Regressed,
    ScoreTransform,
    SelectedDetections,
    checkpoint_info,
    checkpoint_model_state,
    match_proposals,
    read_checkpoint,
    select_detections,
)
from pcb_train.config import ModelConfig
from pcb_train.iterative_head import share_checkpoint_keys

logger = logging.getLogger(__name__)

MASK_ROI_CHUNK = 1024  # RoIs per mask-head call at inference (bounds its activations)
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
BOX_ROI_SIZE = 7
BOX_SMOOTH_L1_BETA = 1.0 / 9.0  # torchvision's Fast R-CNN box loss
TINY_WIDTHS = (16, 24, 48, 96, 128)  # stem (stride 2) and four stages (strides 4, 8, 16, 32)
TINY_CANONICAL_SCALE = 56  # RoI -> FPN level mapping: a 56 px box goes to level 4 (stride 16)
# RoIAlign samples per bin side for tiny (torchvision's CPU RoIAlign backward dominates a tiny step)
TINY_SAMPLING_RATIO = 1
NAME = "torchvision"

# keys of the iterative head's shared box head / predictor (saved once, under torchvision's names)

ClsLossFn = Callable[[tuple[Tensor, ...], Tensor], Any]


# --------------------------------------------------------------------------------------------
# class convention: the ONLY place that knows torchvision puts the background first


def tv_to_bg_last(x: Tensor) -> Tensor:
    """[R, K+1] in torchvision's column order (background 0) -> pcbkit's (background K)."""
    return torch.cat([x[:, 1:], x[:, :1]], dim=1)


def bg_last_to_tv(x: Tensor) -> Tensor:
    """[R, K+1] in pcbkit's column order (background K) -> torchvision's (background 0)."""
    return torch.cat([x[:, -1:], x[:, :-1]], dim=1)


def labels_to_tv(labels: Tensor) -> Tensor:
    """pcbkit object labels 0..K-1 -> torchvision's 1..K (also indexes the class slots of box
    deltas and mask logits, whose slot 0 is the background)."""
    return labels + 1


def tv_labels_to_bg_last(labels: Tensor, num_classes: int) -> Tensor:
    """torchvision sample labels (0 background, 1..K objects, -1 ignore) -> pcbkit's (K, 0..K-1, -1)."""
    out = labels - 1
    out = torch.where(labels == 0, torch.full_like(labels, num_classes), out)
    return torch.where(labels < 0, torch.full_like(labels, -1), out)


# --------------------------------------------------------------------------------------------
# the tiny backbone


class TinyBackbone(nn.Module):
    """Strided 3x3 conv stages + FPN: [B, 3, H, W] -> {"0", "1", "2"} at strides 8, 16, 32.

    Stages: stem (stride 2) and four blocks of two 3x3 convs (strides 4, 8, 16, 32; widths
    `widths`), BatchNorm + ReLU. The FPN reads the last three blocks; every output level has
    `out_channels` channels (the attribute torchvision's heads read). No stride-4 level: at
    64 channels its FPN and RPN convolutions would cost more than the rest of the network.
    """

    def __init__(self, out_channels: int = 64, widths: Sequence[int] = TINY_WIDTHS) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                Conv2dNormActivation(cin, cout, 3, stride=2, norm_layer=nn.BatchNorm2d),
                Conv2dNormActivation(cout, cout, 3, stride=1, norm_layer=nn.BatchNorm2d),
            )

        self.stem = Conv2dNormActivation(3, w0, 3, stride=2, norm_layer=nn.BatchNorm2d)
        self.layer1 = block(w0, w1)
        self.layer2 = block(w1, w2)
        self.layer3 = block(w2, w3)
        self.layer4 = block(w3, w4)
        self.fpn = FeaturePyramidNetwork([w2, w3, w4], out_channels)
        self.out_channels = out_channels
        for stage in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            for m in stage.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        c2 = self.layer2(self.layer1(self.stem(x)))
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return self.fpn(OrderedDict([("0", c2), ("1", c3), ("2", c4)]))


# --------------------------------------------------------------------------------------------
# RoI heads


class BoxPredictions(NamedTuple):
    """Box-head outputs for R RoIs: per-step class logits [R, K+1] (background LAST) and the final
    box deltas [R, 4(K+1)] (torchvision layout, slot 0 = background; decoded by `decode_boxes`)."""

    step_logits: tuple[Tensor, ...]
    deltas: Tensor

    @property
    def logits(self) -> Tensor:
        """The prediction: the last step's logits [R, K+1] (background last)."""
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
        w = conv.weight[classes_tv, :, 0, 0]  # [D, C]
        out = torch.einsum("dchw,dc->dhw", x, w.to(x.dtype))
        if conv.bias is not None:
            out = out + conv.bias[classes_tv].to(out.dtype)[:, None, None]
        return out
    return predictor(features)[idx, classes_tv]


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

    Same geometry and bilinear weights as torchvision's `paste_masks_in_image` (1-pixel zero
    padding, box grown by (M+2)/M around its centre and truncated to integers, align_corners=False
    resize into the box; equal to it up to float rounding), as two matrix products per mask:
    batched over detections (chunks of at most `max_elements` output values) when the whole
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
            raise ValueError(f"PCBRoIHeads: {len(self.step_weights)} step weights for {n_steps} step(s)")
        self.cls_loss_fn = cls_loss_fn
        self.last_cls_loss: Any = None  # what cls_loss_fn returned last (for logging per-step terms)
        self.score_transform: ScoreTransform | None = None
        if iterative_head is not None:
            # The iterative head shares box_head / box_predictor: keep ONE copy of their weights in
            # the state dict, under torchvision's names (so plain and iterative models share keys).
            share_checkpoint_keys(self)

    # -- seams ------------------------------------------------------------------------------

    def set_cls_loss(self, fn: ClsLossFn | None) -> None:
        """Plug a classification loss `fn(step_logits, labels) -> Tensor | obj with .total` (None: CE)."""
        self.cls_loss_fn = fn

    def classification_loss(self, step_logits: tuple[Tensor, ...], labels: Tensor) -> Tensor:
        """step_logits: per-step [N, K+1] (background last); labels [N] (K background, -1 ignore)."""
        if self.cls_loss_fn is None:
            out: Any = default_cls_loss(step_logits, labels, self.step_weights)
        else:
            out = self.cls_loss_fn(step_logits, labels)
        self.last_cls_loss = out
        total = getattr(out, "total", out)
        if not isinstance(total, Tensor):
            raise TypeError(
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
        return BoxPredictions(tuple(tv_to_bg_last(z) for z in step_tv), deltas)

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
        `base.select_detections` on probs q~ [R, K+1] (background last, all images' rows) and
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
                part = self._mask_probabilities(features, only, [lab[start : start + MASK_ROI_CHUNK]], image_shapes)
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
        probs = self.class_probabilities(box.logits)
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
            raise ValueError("PCBRoIHeads: targets are required in training mode")
        tv_targets = []
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be floating point, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be int64, got {t['labels'].dtype}")
            if t["labels"].numel() and (
                int(t["labels"].min()) < 0 or int(t["labels"].max()) >= self.num_classes
            ):
                raise ValueError(f"target labels must be in 0..{self.num_classes - 1}")
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






# --------------------------------------------------------------------------------------------
# the model


class PCBMaskRCNN(GeneralizedRCNN):
    """Mask R-CNN (Faster R-CNN without the mask head) with `PCBRoIHeads`.

    `model(images, targets)` in training returns torchvision's loss dict (loss_classifier,
    loss_box_reg, loss_mask, loss_objectness, loss_rpn_box_reg); targets carry labels 0..K-1.
    `model.eval()(images)` returns torchvision-style detections with labels 0..K-1 and mask
    probabilities [D, 1, H, W], after `roi_heads.score_transform` when one is set.
    """

    roi_heads: PCBRoIHeads
    transform: GeneralizedRCNNTransform


def _anchor_generator(sizes: Sequence[int]) -> AnchorGenerator:
    return AnchorGenerator(tuple((int(s),) for s in sizes), (ASPECT_RATIOS,) * len(sizes))


def _backbone(cfg: ModelConfig) -> tuple[nn.Module, list[str]]:
    """(backbone, names of its feature maps used by the RoI heads)."""
    assert cfg.fpn_channels is not None and cfg.anchor_sizes is not None
    if cfg.arch == "tiny":
        if len(cfg.anchor_sizes) != 3:
            raise PcbkitError(
                f"model.anchor_sizes: the tiny backbone has 3 FPN levels, got {len(cfg.anchor_sizes)} sizes"
            )
        return TinyBackbone(cfg.fpn_channels), ["0", "1", "2"]
    if cfg.arch == "r50_fpn":
        if len(cfg.anchor_sizes) != 5:
            raise PcbkitError(
                f"model.anchor_sizes: R50-FPN has 5 levels (4 + pool), got {len(cfg.anchor_sizes)} sizes"
            )
        if cfg.fpn_channels != 256:
            logger.info("R50-FPN with %d FPN channels (the paper uses 256)", cfg.fpn_channels)
        pretrained = cfg.weights is not None
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50",
            weights=None,  # never download: local weights are loaded by `load_weights`
            norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d,
            trainable_layers=cfg.trainable_backbone_layers if pretrained else 5,
        )
        if cfg.fpn_channels != backbone.out_channels:
            backbone.fpn = FeaturePyramidNetwork(
                [256, 512, 1024, 2048], cfg.fpn_channels, extra_blocks=backbone.fpn.extra_blocks
            )
            backbone.out_channels = cfg.fpn_channels
        return backbone, ["0", "1", "2", "3"]
    raise PcbkitError(f"model.arch: unknown architecture {cfg.arch!r}; expected 'tiny' or 'r50_fpn'")


def build_model(cfg: ModelConfig, train_min_sizes: Sequence[int] | None = None) -> PCBMaskRCNN:
    """Build the torchvision detector of `cfg` (random init; see `load_weights` for local weights).

    train_min_sizes: short sides drawn per image in training (multi-scale); default (min_size,).
    """
    cfg = cfg.resolved()
    if cfg.backend != NAME:
        raise PcbkitError(f"model.backend: {cfg.backend!r} is not the torchvision backend")
    assert cfg.min_size and cfg.max_size and cfg.box_head_dim and cfg.fpn_channels and cfg.anchor_sizes
    k1 = cfg.num_classes + 1
    backbone, levels = _backbone(cfg)
    c = cfg.fpn_channels
    anchors = _anchor_generator(cfg.anchor_sizes)
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(c, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        nms_thresh=cfg.rpn_nms_thresh,
    )
    canonical = {"canonical_scale": TINY_CANONICAL_SCALE} if cfg.arch == "tiny" else {}
    sampling = TINY_SAMPLING_RATIO if cfg.arch == "tiny" else 2
    box_roi_pool = MultiScaleRoIAlign(levels, BOX_ROI_SIZE, sampling_ratio=sampling, **canonical)
    box_head = TwoMLPHead(c * BOX_ROI_SIZE**2, cfg.box_head_dim)
    box_predictor = FastRCNNPredictor(cfg.box_head_dim, k1)
    mask_parts: dict[str, Any] = {}
    if cfg.mask_head:
        assert cfg.mask_head_channels and cfg.mask_head_layers and cfg.mask_roi_size
        mc = cfg.mask_head_channels
        mask_parts = {
            "mask_roi_pool": MultiScaleRoIAlign(
                levels, cfg.mask_roi_size, sampling_ratio=sampling, **canonical
            ),
            "mask_head": MaskRCNNHeads(c, [mc] * cfg.mask_head_layers, 1),
            "mask_predictor": MaskRCNNPredictor(mc, mc, k1),
        }
    iterative = None
    step_weights: tuple[float, ...] = (1.0,)
    if cfg.iterative_head:
        from pcb_train.iterative_head import IterativeRoIHead

        step_weights = tuple(cfg.step_weights)
        iterative = IterativeRoIHead(
            box_head,
            box_predictor,
            n_iter=cfg.n_iter,
            step_weights=step_weights,
            feat_channels=c,
            roi_size=BOX_ROI_SIZE,
            modulation_init=cfg.modulation_init,
        )
    roi_heads = PCBRoIHeads(
        box_roi_pool,
        box_head,
        box_predictor,
        num_classes=cfg.num_classes,
        fg_iou_thresh=cfg.roi_iou_thresh,
        bg_iou_thresh=cfg.roi_iou_thresh,
        batch_size_per_image=cfg.roi_batch_size_per_image or 512,
        positive_fraction=cfg.roi_positive_fraction,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_image,
        iterative_head=iterative,
        step_weights=step_weights,
        **mask_parts,
    )
    sizes = tuple(int(s) for s in (train_min_sizes or ())) + (int(cfg.min_size),)
    # GeneralizedRCNNTransform draws from min_size[:] in training and uses min_size[-1] at test
    transform = _Transform(sizes, cfg.max_size, list(IMAGE_MEAN), list(IMAGE_STD), n_train=len(sizes) - 1)
    return PCBMaskRCNN(backbone, rpn, roi_heads, transform)


class _Transform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform whose training sizes exclude the appended test size.

    min_size = (*train_sizes, test_size): torchvision uses min_size[-1] at test time and draws from
    all of min_size in training; this draws only from the training sizes (when there are any)."""

    def __init__(
        self, min_size: tuple[int, ...], max_size: int, mean: list[float], std: list[float], n_train: int
    ) -> None:
        super().__init__(min_size, max_size, mean, std)
        self.n_train = n_train

    def torch_choice(self, k: list[int]) -> int:
        return super().torch_choice(list(k[: self.n_train]) if self.n_train > 0 else list(k))


def as_torchvision_model(model: PCBMaskRCNN) -> MaskRCNN:
    """A plain torchvision `MaskRCNN` sharing this model's modules (plain box head only).

    For interoperability (export, torchvision tooling) and to check that pcbkit's post-processing
    reproduces torchvision's exactly. Its detections use torchvision's labels (1..K)."""
    heads = model.roi_heads
    if heads.iterative_head is not None:
        raise PcbkitError("as_torchvision_model: the PCB iterative head has no torchvision equivalent")
    if not heads.has_mask():
        raise PcbkitError("as_torchvision_model: needs the mask head (Mask R-CNN)")
    rpn = model.rpn
    t = model.transform
    tv = MaskRCNN(
        model.backbone,
        num_classes=None,
        min_size=t.min_size,
        max_size=t.max_size,
        image_mean=t.image_mean,
        image_std=t.image_std,
        rpn_anchor_generator=rpn.anchor_generator,
        rpn_head=rpn.head,
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"],
        rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"],
        rpn_nms_thresh=rpn.nms_thresh,
        box_roi_pool=heads.box_roi_pool,
        box_head=heads.box_head,
        box_predictor=heads.box_predictor,
        box_score_thresh=heads.score_thresh,
        box_nms_thresh=heads.nms_thresh,
        box_detections_per_img=heads.detections_per_img,
        box_fg_iou_thresh=heads.proposal_matcher.high_threshold,
        box_bg_iou_thresh=heads.proposal_matcher.low_threshold,
        box_batch_size_per_image=heads.fg_bg_sampler.batch_size_per_image,
        box_positive_fraction=heads.fg_bg_sampler.positive_fraction,
        mask_roi_pool=heads.mask_roi_pool,
        mask_head=heads.mask_head,
        mask_predictor=heads.mask_predictor,
    )
    return tv.train(model.training)


# --------------------------------------------------------------------------------------------
# weights


def _load_state(model: nn.Module, state: Mapping[str, Tensor], path: Path, strict: bool) -> None:
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        cls_key = "roi_heads.box_predictor.cls_score.weight"
        if cls_key in state and cls_key in own and state[cls_key].shape[0] != own[cls_key].shape[0]:
            raise input_error(
                path,
                f"checkpoint is for K={state[cls_key].shape[0] - 1} classes, the model has "
                f"K={own[cls_key].shape[0] - 1}",
            )
        raise input_error(path, f"{len(wrong)} tensor(s) have another shape than the model's: {wrong[:3]}")
    result = model.load_state_dict(dict(state), strict=False)
    missing = list(result.missing_keys)
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise input_error(
            path,
            f"checkpoint does not fit the model: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}",
        )


def load_weights(model: PCBMaskRCNN, path: str | Path) -> None:
    """Initialise from a local file: a torchvision ResNet-50 state dict (ImageNet backbone), or a
    detector state dict / pcbkit checkpoint (tensors whose shape differs, e.g. the class-specific
    layers of a COCO model, are skipped with a log line). Read with weights_only=True."""
    p = Path(path)
    state, _ = checkpoint_model_state(read_checkpoint(p), p)
    if any(k.startswith(("backbone.", "rpn.", "roi_heads.")) for k in state):
        own = model.state_dict()
        usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        skipped = sorted(set(state) - set(usable))
        if not usable:
            raise input_error(p, "no tensor of these weights fits the model")
        model.load_state_dict(usable, strict=False)
        logger.info(
            "weights %s: loaded %d tensors, skipped %d (%s)", p, len(usable), len(skipped), skipped[:4]
        )
        return
    body = getattr(model.backbone, "body", None)
    if body is None:
        raise input_error(p, "backbone weights (ResNet keys) need the r50_fpn architecture")
    result = body.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    if result.missing_keys:
        raise input_error(p, f"not a ResNet-50 state dict: missing {list(result.missing_keys)[:3]}")
    logger.info("weights %s: loaded the ResNet-50 backbone", p)


# --------------------------------------------------------------------------------------------
# the backend


class TorchvisionBackend:
    """`DetectorBackend` on torchvision's Mask R-CNN (see the module and `base` docstrings).

    Args:
        config: the model configuration (resolved here).
        train_min_sizes: multi-scale training short sides (DataConfig.train_min_sizes).
    """

    name = NAME

    def __init__(self, config: ModelConfig, train_min_sizes: Sequence[int] | None = None) -> None:
        self.config = config.resolved()
        self.model: PCBMaskRCNN = build_model(self.config, train_min_sizes)
        if self.config.weights is not None:
            load_weights(self.model, self.config.weights)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> TorchvisionBackend:
        self.model.to(device)
        return self

    def load_checkpoint(self, path: str | Path, categories: CategorySpace | None = None) -> CheckpointInfo:
        """Load a pcbkit checkpoint (or a bare state dict of this model) with weights_only=True.

        Refuses, with the file in the message, a checkpoint for another class count, another
        backend, another structural config (arch, heads, widths), or other categories."""
        p = Path(path)
        state, meta = checkpoint_model_state(read_checkpoint(p), p)
        info = checkpoint_info(p, meta, self.config, categories)
        _load_state(self.model, state, p, strict=True)
        return info

    # -- shared first half of every inference path ----------------------------------------

    def _prepare(self, images: Sequence[Tensor]) -> tuple[Any, dict[str, Tensor], list[tuple[int, int]]]:
        originals = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        image_list, _ = self.model.transform(list(images))
        features = self.model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        return image_list, features, originals

    @torch.no_grad()
    def proposal_records(
        self,
        images: Sequence[Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        *,
        regressed: Regressed = "none",
        proposals: Sequence[Tensor] | None = None,
    ) -> list[ProposalRecord]:
        """Per image: the RoI head's class logits [R, K+1] (background last; last iterative step) for
        its test-time RPN proposals (or for the given `proposals`, xyxy original pixels), with the
        matched ground truth (see `base.match_proposals`) and optionally the regressed boxes."""
        if len(targets) != len(images):
            raise ValueError(f"proposal_records: {len(images)} images but {len(targets)} targets")
        if regressed not in ("none", "agnostic", "per_class"):
            raise ValueError(f"proposal_records: unknown regressed kind {regressed!r}")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            image_list, features, originals = self._prepare(images)
            sizes = image_list.image_sizes
            if proposals is None:
                props, _ = model.rpn(image_list, features)
                boxes_orig = [resize_boxes(p, s, o) for p, s, o in zip(props, sizes, originals, strict=True)]
            else:
                if len(proposals) != len(images):
                    raise ValueError(
                        f"proposal_records: {len(images)} images but {len(proposals)} proposal sets"
                    )
                dtype = image_list.tensors.dtype
                boxes_orig = [p.to(device=image_list.tensors.device, dtype=torch.float32) for p in proposals]
                props = [
                    resize_boxes(p, o, s).to(dtype)
                    for p, s, o in zip(boxes_orig, sizes, originals, strict=True)
                ]
            heads = model.roi_heads
            box = heads.box_predictions(features, props, sizes)
            logits = box.logits.float()
            counts = [p.shape[0] for p in props]
            decoded = heads.decode_boxes(box.deltas, props, sizes) if regressed != "none" else None
            k = self.num_classes
            records: list[ProposalRecord] = []
            for i, (z, t) in enumerate(zip(logits.split(counts, 0), targets, strict=True)):
                gt_boxes = t["boxes"].to(z.device)
                labels, ious = match_proposals(
                    boxes_orig[i],
                    gt_boxes,
                    t["labels"].to(z.device),
                    k,
                    self.config.roi_iou_thresh,
                    t.get("iscrowd"),
                )
                reg = None
                if decoded is not None:
                    per_class = original_frame_boxes(decoded[i], sizes[i], originals[i])
                    if regressed == "agnostic":
                        top = z[:, :k].argmax(dim=1)
                        reg = per_class[torch.arange(per_class.shape[0], device=z.device), top]
                    else:
                        reg = per_class.reshape(-1, 4 * k)
                image_id = int(t["image_id"]) if "image_id" in t else i
                records.append(ProposalRecord(image_id, boxes_orig[i].float(), z, labels, ious, reg))
            return records
        finally:
            model.train(was_training)

    @torch.no_grad()
    def infer(
        self,
        images: Sequence[Tensor],
        score_transforms: Mapping[str, ScoreTransform],
        *,
        mask_threshold: float | None = 0.5,
        detections_per_image: int | None = None,
        compact_masks: bool = False,
    ) -> dict[str, list[Detections]]:
        """Detections per named score transform from ONE backbone + RPN + box-head pass.

        Each transform maps q [R, K+1] (all images' proposals, background last) to q~ of the same
        shape; then the standard post-processing (`base.select_detections`) runs on the decoded
        boxes in ORIGINAL image pixels (the frame a dump's regressed boxes are stored in, so the
        offline path reproduces these detections exactly) and masks are predicted for the kept
        detections. With several transforms the mask head runs once on the union of their
        (proposal, class) pairs. `detections_per_image` overrides the model's cap of detections
        per image (-1: none); detections are sorted by decreasing score, so a capped list is the
        prefix of the uncapped one. `compact_masks=True` returns each detection's mask at RoI
        resolution ("mask_probs" [D, M, M] probabilities, with "image_size" [2] = (H, W)) instead
        of pasted [D, H, W] masks: thousands of uncapped detections of a large image would need
        gigabytes as full-image masks; `base.detections_to_lvis` pastes and encodes them a chunk
        at a time."""
        if not score_transforms:
            raise ValueError("infer: give at least one score transform (e.g. {'none': identity})")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            image_list, features, originals = self._prepare(images)
            sizes = image_list.image_sizes
            heads = model.roi_heads
            props, _ = model.rpn(image_list, features)
            box = heads.box_predictions(features, props, sizes)
            probs = heads.class_probabilities(box.logits)
            decoded = heads.decode_boxes(box.deltas, props, sizes)  # resized input's pixels
            decoded_orig = [original_frame_boxes(d, s, o) for d, s, o in zip(decoded, sizes, originals, strict=True)]
            selected: dict[str, list[SelectedDetections]] = {}
            for name, fn in score_transforms.items():
                q = fn(probs)
                if q.shape != probs.shape:
                    raise ValueError(
                        f"score transform {name!r}: returned {tuple(q.shape)}, expected {tuple(probs.shape)}"
                    )
                selected[name] = heads.select_detections(q, decoded_orig, detections_per_image)
            masks = (
                self._masks(
                    features, sizes, decoded, decoded_orig, originals, selected, mask_threshold, compact_masks
                )
                if heads.has_mask()
                else None
            )
            out: dict[str, list[Detections]] = {}
            for name, dets in selected.items():
                results: list[dict[str, Tensor]] = []
                for i, d in enumerate(dets):
                    r = {"boxes": d.boxes, "scores": d.scores, "labels": d.labels, "pairs": d.flat}
                    if masks is not None:
                        if compact_masks:
                            r["mask_probs"] = masks[name][i]
                            r["image_size"] = torch.tensor(originals[i], dtype=torch.int64)
                        else:
                            r["masks"] = masks[name][i]
                    results.append(r)
                out[name] = results
            return out
        finally:
            model.train(was_training)

    def _masks(
        self,
        features: dict[str, Tensor],
        sizes: list[tuple[int, int]],
        decoded: list[Tensor],
        decoded_orig: list[Tensor],
        originals: list[tuple[int, int]],
        selected: Mapping[str, list[SelectedDetections]],
        threshold: float | None,
        compact: bool = False,
    ) -> dict[str, list[Tensor]]:
        """Pasted masks [D, H, W] (original image size; bool with a threshold, else probabilities)
        per transform and image, or with `compact` the RoI-resolution probabilities [D, M, M]. The
        mask head (and the pasting) run ONCE per distinct (proposal, class) pair of an image over
        all transforms (calibrations mostly keep the same pairs).

        `decoded` / `decoded_orig`: per image [r, K, 4] boxes in the resized input's pixels (what
        RoIAlign reads) / in the original image's (where masks are pasted); the selected detections
        index both through `flat`."""
        heads = self.model.roi_heads
        names = list(selected)
        k = self.num_classes
        uniq, inverse = [], []
        for i in range(len(sizes)):
            flat = torch.cat([selected[n][i].flat for n in names])
            u, inv = torch.unique(flat, return_inverse=True)
            uniq.append(u)
            inverse.append(inv)
        boxes = [decoded[i].reshape(-1, 4)[u] for i, u in enumerate(uniq)]
        probs = heads.mask_probabilities(features, boxes, [u % k for u in uniq], sizes)
        out: dict[str, list[Tensor]] = {n: [] for n in names}
        for i in range(len(sizes)):
            if compact:
                pasted = probs[i][:, 0]
            else:
                pasted = paste_masks(probs[i][:, 0], decoded_orig[i].reshape(-1, 4)[uniq[i]], originals[i], threshold)
            start = 0
            for n in names:
                d = selected[n][i].flat.shape[0]
                out[n].append(pasted[inverse[i][start : start + d]])
                start += d
        return out
