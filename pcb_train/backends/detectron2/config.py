"""The detectron2 config of a pcbkit `ModelConfig` (`detectron2_cfg`), and detectron2's presence.

detectron2 is optional and not on PyPI (build it from source with
`pip install --no-build-isolation <dir>`): this module imports without it; `require_detectron2`
and `detectron2_cfg` raise `PcbkitError(NOT_INSTALLED)` when it is missing. `detectron2_cfg`
starts from detectron2's `get_cfg()` defaults, sets every model key from the `ModelConfig`
(architectures in `ARCHS`; the values, docs/backends.md §6), adds `MODEL.PCB` and sets
ROI_HEADS.NAME to `PCBROIHeads`. It imports `roi_heads` and `tiny` first, which registers
`PCBROIHeads` and the tiny backbone in detectron2's registries before the config is used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pcb_analysis.errors import PcbkitError
from pcb_train.config import ModelConfig
from pcb_train.schedule import DEFAULT_PCB_START_FRACTION, pcb_start_iteration

if TYPE_CHECKING:
    from detectron2.config import CfgNode

logger = logging.getLogger(__name__)

NAME = "detectron2"
NOT_INSTALLED = (
    "detectron2 is not installed: build it from source with pip install --no-build-isolation <source dir>"
)
# per architecture: ResNet depth, backbone stages fed to the FPN, FPN levels for the RPN and RoI heads
ARCHS: dict[str, dict[str, Any]] = {
    "r50_fpn": {
        "backbone": "build_resnet_fpn_backbone",
        "depth": 50,
        "stages": ("res2", "res3", "res4", "res5"),
        "rpn": ("p2", "p3", "p4", "p5", "p6"),
        "roi": ("p2", "p3", "p4", "p5"),
    },
    "tiny": {
        "backbone": "build_pcbkit_tiny_fpn_backbone",  # registered by pcb_train.backends.detectron2.tiny
        "depth": 18,  # unused by the tiny backbone
        "stages": ("res3", "res4", "res5"),
        "rpn": ("p3", "p4", "p5"),
        "roi": ("p3", "p4", "p5"),
    },
}
BOX_ROI_SIZE = 7


def require_detectron2() -> None:
    """Raise `PcbkitError(NOT_INSTALLED)` unless `import detectron2` works."""
    try:
        import detectron2  # noqa: F401
    except ImportError as err:
        raise PcbkitError(f"'detectron2' is not available: {NOT_INSTALLED} ({err})") from err


def _start_iter(
    config: ModelConfig, max_iter: int | None, iters_per_epoch: float | None
) -> tuple[int, float]:
    """(MODEL.PCB.START_ITER, START_FRACTION) for the config's PCB start (`pcb_start_iteration`;
    START_ITER -1 when it needs a length not given: resolved from START_FRACTION x MAX_ITER)."""
    unit = config.pcb_start_unit
    fraction = float(config.pcb_start) if unit == "fraction" else DEFAULT_PCB_START_FRACTION
    start = pcb_start_iteration(
        unit, config.pcb_start, max_iter=max_iter, iters_per_epoch=iters_per_epoch
    )
    if start is not None:
        return start, fraction
    if unit == "epoch" and config.pcb_loss:  # matters for training only (the trainer reads START_ITER)
        logger.info(
            "model.pcb_start=%g epochs cannot be converted to iterations without iters_per_epoch; "
            "MODEL.PCB.START_ITER=-1 (PCB from %.3f of SOLVER.MAX_ITER): set it for your schedule",
            config.pcb_start,
            DEFAULT_PCB_START_FRACTION,
        )
    return -1, fraction


def detectron2_cfg(
    config: ModelConfig,
    train_min_sizes: Sequence[int] | None = None,
    *,
    max_iter: int | None = None,
    iters_per_epoch: float | None = None,
) -> CfgNode:
    """The detectron2 config (unfrozen, with `MODEL.PCB`) of a pcbkit `ModelConfig`.

    `max_iter` (SOLVER.MAX_ITER) and `iters_per_epoch` convert a fractional / epoch PCB start into
    MODEL.PCB.START_ITER. MODEL.DEVICE is "cpu"; move the built model with `.to()`.
    """
    require_detectron2()
    # lazy: detectron2 is optional. Importing `tiny` and `roi_heads` registers the tiny backbone
    # and PCBROIHeads in detectron2's registries, before anything builds a model from this config.
    from detectron2.config import get_cfg

    import pcb_train.backends.detectron2.tiny  # noqa: F401  (registers the tiny backbone)
    from pcb_train.backends.detectron2.roi_heads import NAME as PCB_HEADS
    from pcb_train.backends.detectron2.roi_heads import add_pcb_config

    c = config.resolved()
    if c.backend != NAME:
        raise PcbkitError(f"model.backend: {c.backend!r} is not the detectron2 backend")
    if c.arch not in ARCHS:
        raise PcbkitError(f"model.arch: unknown architecture {c.arch!r}; expected one of {sorted(ARCHS)}")
    arch = ARCHS[c.arch]
    assert c.anchor_sizes is not None and c.min_size and c.max_size and c.fpn_channels and c.box_head_dim
    if len(c.anchor_sizes) != len(arch["rpn"]):
        raise PcbkitError(
            f"model.anchor_sizes: {c.arch} has {len(arch['rpn'])} RPN levels ({', '.join(arch['rpn'])}), "
            f"got {len(c.anchor_sizes)} sizes"
        )
    cfg = add_pcb_config(get_cfg())
    m = cfg.MODEL
    m.DEVICE = "cpu"
    m.WEIGHTS = ""  # never download; local weights are loaded by the backend
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.MASK_ON = bool(c.mask_head)
    m.KEYPOINT_ON = False
    m.LOAD_PROPOSALS = False
    m.PROPOSAL_GENERATOR.NAME = "RPN"
    m.BACKBONE.NAME = arch["backbone"]
    pretrained = c.weights is not None
    m.BACKBONE.FREEZE_AT = 5 - c.trainable_backbone_layers if pretrained else 0
    m.RESNETS.DEPTH = arch["depth"]
    m.RESNETS.NORM = "FrozenBN" if pretrained else "BN"
    m.RESNETS.RES2_OUT_CHANNELS = 64 if arch["depth"] in (18, 34) else 256
    m.RESNETS.OUT_FEATURES = list(arch["stages"])
    m.FPN.IN_FEATURES = list(arch["stages"])
    m.FPN.OUT_CHANNELS = int(c.fpn_channels)
    m.ANCHOR_GENERATOR.SIZES = [[int(s)] for s in c.anchor_sizes]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    m.RPN.IN_FEATURES = list(arch["rpn"])
    m.RPN.PRE_NMS_TOPK_TRAIN = int(c.rpn_pre_nms_top_n_train or 2000)
    m.RPN.POST_NMS_TOPK_TRAIN = int(c.rpn_post_nms_top_n_train or 1000)
    m.RPN.PRE_NMS_TOPK_TEST = int(c.rpn_pre_nms_top_n_test or 1000)
    m.RPN.POST_NMS_TOPK_TEST = int(c.rpn_post_nms_top_n_test or 1000)
    m.RPN.NMS_THRESH = float(c.rpn_nms_thresh)
    m.ROI_HEADS.NAME = PCB_HEADS
    m.ROI_HEADS.IN_FEATURES = list(arch["roi"])
    m.ROI_HEADS.NUM_CLASSES = int(c.num_classes)
    m.ROI_HEADS.BATCH_SIZE_PER_IMAGE = int(c.roi_batch_size_per_image or 512)
    m.ROI_HEADS.POSITIVE_FRACTION = float(c.roi_positive_fraction)
    m.ROI_HEADS.IOU_THRESHOLDS = [float(c.roi_iou_thresh)]
    m.ROI_HEADS.IOU_LABELS = [0, 1]
    m.ROI_HEADS.SCORE_THRESH_TEST = float(c.score_thresh)
    m.ROI_HEADS.NMS_THRESH_TEST = float(c.nms_thresh)
    m.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    m.ROI_BOX_HEAD.NUM_CONV = 0
    m.ROI_BOX_HEAD.NUM_FC = 2
    m.ROI_BOX_HEAD.FC_DIM = int(c.box_head_dim)
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = BOX_ROI_SIZE
    m.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    m.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
    m.ROI_BOX_HEAD.USE_SIGMOID_CE = False
    m.ROI_BOX_HEAD.USE_FED_LOSS = False
    if c.mask_head:
        assert c.mask_head_layers and c.mask_head_channels and c.mask_roi_size
        m.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
        m.ROI_MASK_HEAD.NUM_CONV = int(c.mask_head_layers)
        m.ROI_MASK_HEAD.CONV_DIM = int(c.mask_head_channels)
        m.ROI_MASK_HEAD.POOLER_RESOLUTION = int(c.mask_roi_size)
        m.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlignV2"
        m.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = False
    start_iter, start_fraction = _start_iter(c, max_iter, iters_per_epoch)
    m.PCB.ENABLED = bool(c.pcb_loss)
    m.PCB.ALPHA = float(c.pcb_alpha)
    m.PCB.MOMENTUM = float(c.pcb_momentum)
    m.PCB.START_ITER = start_iter
    m.PCB.START_FRACTION = start_fraction
    m.PCB.ITERATIVE = bool(c.iterative_head)
    m.PCB.N_ITER = int(c.n_iter)
    m.PCB.STEP_WEIGHTS = [float(w) for w in c.step_weights]
    m.PCB.MODULATION_INIT = str(c.modulation_init)
    m.PCB.CLS_LOSS = str(c.cls_loss)
    m.PCB.NORMALIZED_CLASSIFIER = bool(c.normalized_classifier)
    cfg.TEST.DETECTIONS_PER_IMAGE = int(c.detections_per_image)
    cfg.INPUT.MIN_SIZE_TEST = int(c.min_size)
    cfg.INPUT.MAX_SIZE_TEST = int(c.max_size)
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(int(s) for s in (train_min_sizes or (c.min_size,)))
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = int(c.max_size)
    if max_iter is not None:
        cfg.SOLVER.MAX_ITER = int(max_iter)
    return cfg
