"""The torchvision Mask R-CNN of a `ModelConfig`: `build_model`, local weights, interop.

Architectures (ModelConfig.arch; details in docs/backends.md §5):
- "r50_fpn": the paper's Mask R-CNN R50-FPN for LVIS (ResNet-50 + 5-level FPN, RPN, 1024-d
  TwoMLPHead, 4 x 256 mask convs, K+1 classes). Random initialisation (nothing is downloaded)
  unless `ModelConfig.weights` names a local file (`load_weights`).
- "tiny": `tiny.TinyBackbone` with small heads, for CPU tests and the synthetic demo.
`PCBMaskRCNN` is torchvision's `GeneralizedRCNN` with `roi_heads.PCBRoIHeads`: in training
`model(images, targets)` returns torchvision's loss dict (targets with labels 0..K-1); in eval
`model(images)` returns detections with labels 0..K-1 and mask probabilities [D, 1, H, W].
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN, MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from pcb_analysis.errors import PcbkitError, input_error
from pcb_train.backends.checkpoint import checkpoint_model_state, read_checkpoint
from pcb_train.backends.torchvision.roi_align import GatherRoIAlign
from pcb_train.backends.torchvision.roi_heads import PCBRoIHeads
from pcb_train.backends.torchvision.tiny import TINY_CANONICAL_SCALE, TINY_SAMPLING_RATIO, TinyBackbone
from pcb_train.config import ModelConfig
from pcb_train.iterative_head import IterativeRoIHead
from pcb_train.loss_families import build_family, num_cls_outputs
from pcb_train.normed_layers import NormedConv2d, NormedLinear

logger = logging.getLogger(__name__)

NAME = "torchvision"
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
BOX_ROI_SIZE = 7


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
    box_roi_pool = GatherRoIAlign(levels, BOX_ROI_SIZE, sampling_ratio=sampling, **canonical)
    box_head = TwoMLPHead(c * BOX_ROI_SIZE**2, cfg.box_head_dim)
    box_predictor = FastRCNNPredictor(cfg.box_head_dim, k1)
    n_cls = num_cls_outputs(cfg.cls_loss, cfg.num_classes)  # K+2 for Seesaw (docs/losses.md)
    if cfg.normalized_classifier:
        box_predictor.cls_score = NormedLinear(cfg.box_head_dim, n_cls)
    elif n_cls != k1:
        box_predictor.cls_score = nn.Linear(cfg.box_head_dim, n_cls)
    mask_parts: dict[str, Any] = {}
    if cfg.mask_head:
        assert cfg.mask_head_channels and cfg.mask_head_layers and cfg.mask_roi_size
        mc = cfg.mask_head_channels
        mask_parts = {
            "mask_roi_pool": GatherRoIAlign(
                levels, cfg.mask_roi_size, sampling_ratio=sampling, **canonical
            ),
            "mask_head": MaskRCNNHeads(c, [mc] * cfg.mask_head_layers, 1),
            "mask_predictor": MaskRCNNPredictor(mc, mc, k1),
        }
        if cfg.normalized_classifier:
            mask_parts["mask_predictor"].mask_fcn_logits = NormedConv2d(mc, k1, 1)
    iterative = None
    step_weights: tuple[float, ...] = (1.0,)
    if cfg.iterative_head:
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
        family_loss=build_family(cfg.cls_loss, cfg.num_classes),
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
    if heads.family_loss is not None:
        raise PcbkitError("as_torchvision_model: Seesaw / EQLv2 heads have no torchvision equivalent")
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


def load_state(model: nn.Module, state: Mapping[str, Tensor], path: Path, strict: bool) -> None:
    """Load a full state dict with clear errors for another class count, shapes or keys (strict)."""
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
