"""detectron2 Mask R-CNN (`GeneralizedRCNN`) as a pcbkit detector backend (optional).

R proposals, K foreground classes; logits [R, K+1], background = column K. detectron2 already
uses this convention (its `FastRCNNOutputLayers` puts the background LAST and labels proposals
0..K-1 / K), so no column moves here; `tests/test_detectron2_backend.py` asserts it on a real model.

detectron2 is imported lazily (inside functions): importing this module works without it, and
building the backend without it raises `PcbkitError(NOT_INSTALLED)`. detectron2 is not on PyPI;
build it from source against the installed torch with `pip install --no-build-isolation <dir>`.

Model (`detectron2_cfg`): detectron2's defaults from `get_cfg()` plus explicit settings from the
`ModelConfig`, Mask R-CNN with `PCBROIHeads` (`pcb_train.detectron2_pcb`; with PCB and the
iterative head switched off it computes exactly what `StandardROIHeads` does):
- "r50_fpn": ResNet-50 + FPN (p2-p6, 256 channels), anchors 32..512, RPN top-N 2000/1000 train
  and 1000/1000 test, 512 RoIs per image with 25% positives at IoU 0.5, 2 x 1024 FC box head,
  4 x 256 mask convs on 14 x 14 RoIs, K classes; test: score threshold 1e-4, NMS 0.5, 300
  detections per image; input short side 800, long side <= 1333, BGR 0-255 with detectron2's
  pixel mean. The paper's recipe (docs/method.md §5).
- "tiny": a small strided-conv backbone (`detectron2_tiny`, registered in detectron2's
  BACKBONE_REGISTRY) + detectron2's FPN on res3-res5 (p3-p5, `fpn_channels` wide), anchors
  16/32/64, few proposals and RoIs, a small box head and a 2 x 32 mask head: runs on a CPU in tests.
Random initialisation (`MODEL.WEIGHTS = ""`: nothing is downloaded), BatchNorm trained from
scratch; `ModelConfig.weights` names a local detectron2 file (an ImageNet `R-50.pkl`, a model
zoo `.pkl`, a detectron2 `.pth`), loaded with detectron2's checkpointer (frozen BatchNorm, the
first `5 - trainable_backbone_layers` stages frozen).

Inputs: images [3, H, W] float RGB in [0, 1] -> `detectron2_inputs`: detectron2's input format
(`cfg.INPUT.FORMAT`, BGR) scaled to 0-255 and resized like detectron2's `ResizeShortestEdge`
(bilinear), with "height"/"width" = the original size; the model normalises and pads itself.
Boxes and masks come back in original image pixels (detectron2's `detector_postprocess`).

Checkpoints (`load_checkpoint`): pcbkit checkpoints (`checkpoint.make_checkpoint` of this model's state
dict) are read with `weights_only=True` and checked against the config and categories; anything
else is taken as a detectron2 file: `.pkl` through detectron2's own reader, `.pth` with
`weights_only=True` first and, when that refuses the file (detectron2 checkpoints may pickle
numpy arrays or other objects, which torch >= 2.6 rejects by default), `weights_only=False` with
a log line saying so (only load files you trust).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_train.backends.base import (
    CHECKPOINT_FORMAT,
    CheckpointInfo,
    Detections,
    ProposalRecord,
    Regressed,
    ScoreTransform,
    checkpoint_info,
    checkpoint_model_state,
    file_sha256,
    match_proposals,
)
from pcb_train.config import ModelConfig

if TYPE_CHECKING:
    from detectron2.config import CfgNode
    from detectron2.structures import Instances

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
        "backbone": "build_pcbkit_tiny_fpn_backbone",  # pcb_train.backends.detectron2_tiny
        "depth": 18,  # unused by the tiny backbone
        "stages": ("res3", "res4", "res5"),
        "rpn": ("p3", "p4", "p5"),
        "roi": ("p3", "p4", "p5"),
    },
}
BOX_ROI_SIZE = 7
CLS_SCORE_KEY = "roi_heads.box_predictor.cls_score.weight"
PCB_BUFFER_PREFIX = "roi_heads.confusion."


def require_detectron2() -> None:
    """Raise `PcbkitError(NOT_INSTALLED)` unless `import detectron2` works."""
    try:
        import detectron2  # noqa: F401
    except ImportError as err:
        raise PcbkitError(f"'detectron2' is not available: {NOT_INSTALLED} ({err})") from err


# --------------------------------------------------------------------------------------------
# config


def _start_iter(config: ModelConfig, max_iter: int | None, iters_per_epoch: int | None) -> tuple[int, float]:
    """(MODEL.PCB.START_ITER, START_FRACTION) for the config's PCB start threshold."""
    from pcb_train.detectron2_pcb import DEFAULT_START_FRACTION

    if config.pcb_start_unit == "iteration":
        return int(config.pcb_start), DEFAULT_START_FRACTION
    if config.pcb_start_unit == "fraction":
        if max_iter is not None:
            return int(round(config.pcb_start * max_iter)), float(config.pcb_start)
        return -1, float(config.pcb_start)  # resolved against SOLVER.MAX_ITER when the heads are built
    if iters_per_epoch is not None:
        return int(round(config.pcb_start * iters_per_epoch)), DEFAULT_START_FRACTION
    if config.pcb_loss:  # matters for training only (detectron2's trainer reads START_ITER)
        logger.info(
            "model.pcb_start=%g epochs cannot be converted to iterations without iters_per_epoch; "
            "MODEL.PCB.START_ITER=-1 (PCB from %.3f of SOLVER.MAX_ITER): set it for your schedule",
            config.pcb_start,
            DEFAULT_START_FRACTION,
        )
    return -1, DEFAULT_START_FRACTION


def detectron2_cfg(
    config: ModelConfig,
    train_min_sizes: Sequence[int] | None = None,
    *,
    max_iter: int | None = None,
    iters_per_epoch: int | None = None,
) -> CfgNode:
    """The detectron2 config (unfrozen, with `MODEL.PCB`) of a pcbkit `ModelConfig`.

    `max_iter` (SOLVER.MAX_ITER) and `iters_per_epoch` convert a fractional / epoch PCB start into
    MODEL.PCB.START_ITER. MODEL.DEVICE is "cpu"; move the built model with `.to()`.
    """
    require_detectron2()
    from detectron2.config import get_cfg

    import pcb_train.backends.detectron2_tiny  # noqa: F401  (registers the tiny backbone)
    from pcb_train.detectron2_pcb import NAME as PCB_HEADS
    from pcb_train.detectron2_pcb import add_pcb_config

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
    cfg.TEST.DETECTIONS_PER_IMAGE = int(c.detections_per_image)
    cfg.INPUT.MIN_SIZE_TEST = int(c.min_size)
    cfg.INPUT.MAX_SIZE_TEST = int(c.max_size)
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(int(s) for s in (train_min_sizes or (c.min_size,)))
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = int(c.max_size)
    if max_iter is not None:
        cfg.SOLVER.MAX_ITER = int(max_iter)
    return cfg


# --------------------------------------------------------------------------------------------
# checkpoints


def trusted_checkpointer(
    model: nn.Module, save_dir: str = "", *, preloaded: Any = None, **checkpointables: Any
) -> Any:
    """A detectron2 `DetectionCheckpointer` whose `.pth` reader tries `weights_only=True` and, when
    torch refuses the file, retries with `weights_only=False` and logs why (torch >= 2.6 made
    weights_only=True the default, and detectron2 checkpoints may pickle other objects).

    `preloaded`: the file's object, already read (its `.pth` reader then returns it without reading
    again). After `.load()`, `.last_incompatible` holds fvcore's missing / unexpected keys and
    incorrect shapes. `checkpointables` (optimizer, scheduler, ...) as for DetectionCheckpointer."""
    require_detectron2()
    from detectron2.checkpoint import DetectionCheckpointer

    class TrustedDetectionCheckpointer(DetectionCheckpointer):
        last_incompatible: Any = None

        def _torch_load(self, f: Any) -> Any:
            if preloaded is not None:
                return preloaded
            try:
                return torch.load(f, map_location="cpu", weights_only=True)
            except Exception as err:  # torch's UnpicklingError for globals it does not allow
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                logger.info(
                    "%s: loading with weights_only=False: torch's weights_only=True loader refused this "
                    "detectron2 checkpoint (%s); detectron2 files pickle non-tensor objects, which "
                    "torch >= 2.6 rejects by default. Only load checkpoints you trust.",
                    f,
                    first[:160],
                )
                return torch.load(f, map_location="cpu", weights_only=False)

        def _load_model(self, checkpoint: Any) -> Any:
            self.last_incompatible = super()._load_model(checkpoint)
            return self.last_incompatible

    return TrustedDetectionCheckpointer(model, save_dir, **checkpointables)


def _load_state(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    """Strict load of a full state dict (pcbkit checkpoints): clear errors for K / shape / key mismatches."""
    own = model.state_dict()
    if CLS_SCORE_KEY in state and CLS_SCORE_KEY in own and state[CLS_SCORE_KEY].shape[0] != own[CLS_SCORE_KEY].shape[0]:
        raise input_error(
            path,
            f"checkpoint is for K={state[CLS_SCORE_KEY].shape[0] - 1} classes, the model has "
            f"K={own[CLS_SCORE_KEY].shape[0] - 1}",
        )
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise input_error(path, f"{len(wrong)} tensor(s) have another shape than the model's: {wrong[:3]}")
    result = model.load_state_dict(dict(state), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise input_error(
            path,
            f"checkpoint does not fit the model: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:3]}",
        )


def _benign_key(key: str, *, missing: bool) -> bool:
    """Keys a detectron2 checkpoint may lack (or carry) without changing the model's outputs."""
    if key.endswith(".num_batches_tracked"):
        return True
    return missing and key.startswith(PCB_BUFFER_PREFIX)


def _try_weights_only(path: Path) -> tuple[Any, str | None]:
    """(object, None) when `torch.load(weights_only=True)` reads the file, else (None, reason)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return None, first[:200]


# --------------------------------------------------------------------------------------------
# model pieces shared by records and inference


def box_outputs(
    roi_heads: nn.Module, features: dict[str, Tensor], proposals: list[Instances]
) -> tuple[tuple[Tensor, ...], Tensor]:
    """(per-step logits [R, K+1] background last, last deltas) of any StandardROIHeads."""
    if hasattr(roi_heads, "box_predictions"):
        return roi_heads.box_predictions(features, proposals)
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
    from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

    counts = [len(i) for i in instances]
    head = roi_heads.mask_head
    if roi_heads.mask_pooler is None or not isinstance(head, MaskRCNNConvUpsampleHead):
        from detectron2.structures import Instances as Inst

        shallow = [Inst(i.image_size, pred_boxes=i.pred_boxes, pred_classes=i.pred_classes) for i in instances]
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
    weight = predictor.weight[:, :, 0, 0]  # [K or 1, C]
    if weight.shape[0] == 1:  # class-agnostic masks
        classes = torch.zeros_like(classes)
    logits = torch.einsum("dchw,dc->dhw", x, weight[classes].to(x.dtype))
    if predictor.bias is not None:
        logits = logits + predictor.bias[classes].to(logits.dtype)[:, None, None]
    return list(logits.float().sigmoid()[:, None].split(counts, 0))


# --------------------------------------------------------------------------------------------
# the backend


class Detectron2Backend:
    """`DetectorBackend` on detectron2's `GeneralizedRCNN` with `PCBROIHeads` (see the module and
    `base` docstrings).

    Args:
        config: the model configuration (resolved here; `backend` must be "detectron2").
        train_min_sizes: multi-scale training short sides (DataConfig.train_min_sizes).
    Attributes: `cfg` (the frozen detectron2 config), `model` (the GeneralizedRCNN).
    """

    name = NAME

    def __init__(self, config: ModelConfig, train_min_sizes: Sequence[int] | None = None) -> None:
        require_detectron2()
        from detectron2.modeling import build_model

        self.config = config.resolved()
        self.cfg = detectron2_cfg(self.config, train_min_sizes)
        self.cfg.freeze()
        self.model: nn.Module = build_model(self.cfg)
        predictor = self.model.roi_heads.box_predictor
        if getattr(predictor, "use_sigmoid_ce", False):
            raise PcbkitError("model: the detectron2 backend needs a softmax classifier (USE_SIGMOID_CE off)")
        if self.config.weights is not None:
            self.load_weights(self.config.weights)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> Detectron2Backend:
        self.model.to(device)
        return self

    # -- weights and checkpoints ---------------------------------------------------------

    def load_weights(self, path: str | Path) -> None:
        """Initialise from a local detectron2 file (ImageNet `R-50.pkl`, model zoo `.pkl`, `.pth`)
        with detectron2's checkpointer: name-matching heuristics for Caffe2-style files, tensors of
        another shape skipped with a log line (e.g. the classifier of a COCO model)."""
        p = Path(path)
        if not p.is_file():
            raise input_error(p, "weights file not found")
        trusted_checkpointer(self.model).load(str(p))

    def load_checkpoint(self, path: str | Path, categories: CategorySpace | None = None) -> CheckpointInfo:
        """Load a trained model: a pcbkit checkpoint (weights_only=True; checked against the config,
        the categories and every key) or a detectron2 checkpoint of this architecture (see the
        module docstring for weights_only; every weight must fit; PCB buffers and BatchNorm step
        counters may be absent, so a FrozenBN-trained detectron2 model loads into this BN model)."""
        p = Path(path)
        if not p.is_file():
            raise input_error(p, "checkpoint file not found")
        obj: Any = None
        reason: str | None = "a .pkl file (detectron2 / Caffe2 pickle)"
        if p.suffix != ".pkl":
            obj, reason = _try_weights_only(p)
        if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
            state, meta = checkpoint_model_state(obj, p)
            info = checkpoint_info(p, meta, self.config, categories)
            _load_state(self.model, state, p)
            return info
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            obj = {"model": obj}  # a bare state dict
        return self._load_detectron2(p, obj, reason)

    def _load_detectron2(self, p: Path, preloaded: Any, reason: str | None) -> CheckpointInfo:
        try:
            if preloaded is not None:
                logger.info("%s: a detectron2 checkpoint (read with weights_only=True)", p)
            elif p.suffix != ".pkl":
                logger.info(
                    "%s: loading with weights_only=False: torch's weights_only=True loader refused this "
                    "detectron2 checkpoint (%s); detectron2 files may pickle non-tensor objects, which "
                    "torch >= 2.6 rejects by default. Only load checkpoints you trust.",
                    p,
                    reason,
                )
                preloaded = torch.load(p, map_location="cpu", weights_only=False)
            ckpt = trusted_checkpointer(self.model, preloaded=preloaded)
            extra = ckpt.load(str(p), checkpointables=[])
        except Exception as err:
            raise input_error(p, f"cannot read as a detectron2 checkpoint ({str(err)[:200]})") from err
        bad = ckpt.last_incompatible
        shapes = list(getattr(bad, "incorrect_shapes", []) or [])
        for key, theirs, ours in shapes:
            if key == CLS_SCORE_KEY:
                raise input_error(p, f"checkpoint is for K={theirs[0] - 1} classes, the model has K={ours[0] - 1}")
        # benign: PCB buffers (a model trained without the PCB loss), BatchNorm step counters (a
        # FrozenBN checkpoint, e.g. detectron2's model zoo, in a BN model and the reverse)
        missing = [k for k in getattr(bad, "missing_keys", []) if not _benign_key(k, missing=True)]
        unexpected = [k for k in getattr(bad, "unexpected_keys", []) if not _benign_key(k, missing=False)]
        if shapes or missing or unexpected:
            raise input_error(
                p,
                "detectron2 checkpoint does not fit the model: "
                f"{len(shapes)} shape mismatch(es) {[s[0] for s in shapes][:3]}, "
                f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}",
            )
        keep = {k: v for k, v in (extra or {}).items() if isinstance(v, (int, float, str))}
        return CheckpointInfo(p, file_sha256(p), None, None, {"format": "detectron2", **keep})

    # -- inputs ------------------------------------------------------------------------------

    def input_size(self, height: int, width: int, short_side: int | None = None) -> tuple[int, int]:
        """(h, w) detectron2's ResizeShortestEdge gives an image of that size (test size by default)."""
        from detectron2.data.transforms import ResizeShortestEdge

        short = int(short_side if short_side is not None else self.cfg.INPUT.MIN_SIZE_TEST)
        return ResizeShortestEdge.get_output_shape(height, width, short, int(self.cfg.INPUT.MAX_SIZE_TEST))

    def detectron2_inputs(
        self,
        images: Sequence[Tensor],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        *,
        train: bool = False,
    ) -> list[dict[str, Any]]:
        """detectron2 `batched_inputs` for images [3, H, W] RGB in [0, 1].

        "image": [3, h, w] float in `cfg.INPUT.FORMAT` (BGR) 0-255, resized (test short side, or
        with `train=True` a short side drawn from INPUT.MIN_SIZE_TRAIN); "height"/"width": H, W.
        With `targets` (pcbkit targets: boxes xyxy original pixels, labels 0..K-1, optional masks
        [N, H, W]) also "instances": gt_boxes / gt_classes / gt_masks (BitMasks) at the input size.
        """
        from detectron2.structures import BitMasks, Boxes, Instances

        if targets is not None and len(targets) != len(images):
            raise ValueError(f"detectron2_inputs: {len(images)} images but {len(targets)} targets")
        bgr = str(self.cfg.INPUT.FORMAT).upper() == "BGR"
        train_sizes = [int(s) for s in self.cfg.INPUT.MIN_SIZE_TRAIN]
        max_train = int(self.cfg.INPUT.MAX_SIZE_TRAIN)
        out: list[dict[str, Any]] = []
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"detectron2_inputs: image {i} must be [3, H, W], got {list(im.shape)}")
            h0, w0 = int(im.shape[-2]), int(im.shape[-1])
            if train:
                from detectron2.data.transforms import ResizeShortestEdge

                short = train_sizes[int(torch.randint(len(train_sizes), ()))]
                h, w = ResizeShortestEdge.get_output_shape(h0, w0, short, max_train)
            else:
                h, w = self.input_size(h0, w0)
            x = im.float()
            if bgr:
                x = x.flip(0)
            x = x * 255.0
            if (h, w) != (h0, w0):
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            entry: dict[str, Any] = {"image": x, "height": h0, "width": w0}
            if targets is not None:
                t = targets[i]
                sx, sy = w / w0, h / h0
                boxes = t["boxes"].float().to(x.device) * torch.tensor([sx, sy, sx, sy], device=x.device)
                inst = Instances((h, w))
                inst.gt_boxes = Boxes(boxes)
                inst.gt_classes = t["labels"].to(device=x.device, dtype=torch.int64)
                if "masks" in t:
                    masks = t["masks"].to(x.device)
                    if masks.shape[0] and (h, w) != (h0, w0):
                        masks = F.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0]
                    inst.gt_masks = BitMasks(masks.reshape(-1, h, w) > 0)
                entry["instances"] = inst
            out.append(entry)
        return out

    def _features(self, inputs: list[dict[str, Any]]) -> tuple[Any, dict[str, Tensor]]:
        image_list = self.model.preprocess_image(inputs)
        return image_list, self.model.backbone(image_list.tensor)

    # -- records -------------------------------------------------------------------------------

    @torch.no_grad()
    def proposal_records(
        self,
        images: Sequence[Tensor],
        targets: Sequence[Mapping[str, Tensor]],
        *,
        regressed: Regressed = "none",
        proposals: Sequence[Tensor] | None = None,
    ) -> list[ProposalRecord]:
        """Per image: the box head's class logits [R, K+1] (background last; the last iterative
        step) for its test-time RPN proposals (or the given `proposals`, xyxy original pixels),
        matched to the ground truth (`matching.match_proposals`), optionally with regressed boxes."""
        from detectron2.structures import Boxes, Instances

        if len(targets) != len(images):
            raise ValueError(f"proposal_records: {len(images)} images but {len(targets)} targets")
        if regressed not in ("none", "agnostic", "per_class"):
            raise ValueError(f"proposal_records: unknown regressed kind {regressed!r}")
        if proposals is not None and len(proposals) != len(images):
            raise ValueError(f"proposal_records: {len(images)} images but {len(proposals)} proposal sets")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            inputs = self.detectron2_inputs(images)
            image_list, features = self._features(inputs)
            scales = [
                (d["width"] / s[1], d["height"] / s[0]) for d, s in zip(inputs, image_list.image_sizes, strict=True)
            ]
            if proposals is None:
                props, _ = model.proposal_generator(image_list, features, None)
            else:
                props = []
                for p, (sx, sy), size in zip(proposals, scales, image_list.image_sizes, strict=True):
                    box = p.to(device=image_list.tensor.device, dtype=torch.float32)
                    box = box / torch.tensor([sx, sy, sx, sy], device=box.device)
                    props.append(Instances(size, proposal_boxes=Boxes(box)))
            step_logits, deltas = box_outputs(model.roi_heads, features, props)
            logits = step_logits[-1].float()
            counts = [len(p) for p in props]
            k = self.num_classes
            decoded = None
            if regressed != "none" and sum(counts):
                transform = model.roi_heads.box_predictor.box2box_transform
                all_boxes = torch.cat([p.proposal_boxes.tensor for p in props])
                decoded = transform.apply_deltas(deltas.float(), all_boxes).split(counts, 0)
            records: list[ProposalRecord] = []
            for i, (z, t) in enumerate(zip(logits.split(counts, 0), targets, strict=True)):
                sx, sy = scales[i]
                factor = torch.tensor([sx, sy, sx, sy], device=z.device)
                boxes = props[i].proposal_boxes.tensor.float() * factor
                labels, ious = match_proposals(
                    boxes,
                    t["boxes"].to(z.device),
                    t["labels"].to(z.device),
                    k,
                    self.config.roi_iou_thresh,
                    t.get("iscrowd"),
                )
                reg = None
                if regressed != "none":
                    reg = self._regressed(decoded[i] if decoded is not None else None, z, props[i], factor, regressed)
                image_id = int(t["image_id"]) if "image_id" in t else i
                records.append(ProposalRecord(image_id, boxes, z, labels, ious, reg))
            return records
        finally:
            model.train(was_training)

    def _regressed(
        self, decoded: Tensor | None, logits: Tensor, props: Instances, factor: Tensor, kind: Regressed
    ) -> Tensor:
        """Decoded boxes clipped to the input image, in original pixels: [R, 4] (top foreground class)
        or [R, K*4]."""
        from detectron2.structures import Boxes

        k = self.num_classes
        r = len(props)
        if decoded is None or r == 0:
            return logits.new_zeros((r, 4 if kind == "agnostic" else 4 * k))
        per = decoded.reshape(r, -1, 4)  # [R, K or 1, 4]
        clipped = Boxes(per.reshape(-1, 4))
        clipped.clip(props.image_size)
        per = clipped.tensor.view(r, -1, 4) * factor
        if per.shape[1] == 1:
            per = per.expand(r, k, 4)
        if kind == "agnostic":
            top = logits[:, :k].argmax(dim=1)
            return per[torch.arange(r, device=per.device), top]
        return per.reshape(r, 4 * k)

    # -- inference -----------------------------------------------------------------------------

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

        Each transform maps q [R, K+1] (softmax, all images' proposals, background last) to q~;
        detectron2's `fast_rcnn_inference` (score threshold, class-wise NMS, top-k) runs on q~,
        the mask head once on the union of all transforms' detections, and detectron2's
        `detector_postprocess` scales boxes and pastes masks into the original images. With the
        identity transform the result equals `model.eval()(detectron2_inputs(images))`.
        `detections_per_image` overrides `test_topk_per_image` (-1: no cap, as for fixed AP);
        detectron2 keeps its NMS order (decreasing score), so a capped list is a prefix of the
        uncapped one. `compact_masks` is accepted for the protocol and ignored: detectron2's
        `detector_postprocess` always pastes full-image masks."""
        from detectron2.modeling.postprocessing import detector_postprocess
        from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

        if not score_transforms:
            raise ValueError("infer: give at least one score transform (e.g. {'none': identity})")
        model = self.model
        heads = model.roi_heads
        predictor = heads.box_predictor
        was_training = model.training
        model.eval()
        try:
            inputs = self.detectron2_inputs(images)
            image_list, features = self._features(inputs)
            props, _ = model.proposal_generator(image_list, features, None)
            step_logits, deltas = box_outputs(heads, features, props)
            predictions = (step_logits[-1], deltas)
            boxes = predictor.predict_boxes(predictions, props)
            probs = torch.cat(predictor.predict_probs(predictions, props))
            counts = [len(p) for p in props]
            shapes = [p.image_size for p in props]
            selected: dict[str, list[Instances]] = {}
            rows: dict[str, list[Tensor]] = {}
            for name, fn in score_transforms.items():
                q = fn(probs)
                if q.shape != probs.shape:
                    raise ValueError(
                        f"score transform {name!r}: returned {tuple(q.shape)}, expected {tuple(probs.shape)}"
                    )
                per_image = list(q.split(counts, 0))
                inst, kept = fast_rcnn_inference(
                    boxes,
                    per_image,
                    shapes,
                    predictor.test_score_thresh,
                    predictor.test_nms_thresh,
                    predictor.test_topk_per_image if detections_per_image is None else detections_per_image,
                )
                selected[name] = inst
                rows[name] = [
                    _original_rows(b, s, idx) for b, s, idx in zip(boxes, per_image, kept, strict=True)
                ]
            if getattr(heads, "mask_on", False):
                self._attach_masks(features, selected, rows)
            threshold = -1.0 if mask_threshold is None else float(mask_threshold)
            out: dict[str, list[Detections]] = {}
            for name, insts in selected.items():
                results: list[Detections] = []
                for inst, d in zip(insts, inputs, strict=True):
                    r = detector_postprocess(inst, d["height"], d["width"], threshold)
                    det: Detections = {
                        "boxes": r.pred_boxes.tensor,
                        "scores": r.scores,
                        "labels": r.pred_classes,
                    }
                    if r.has("pred_masks"):
                        m = r.pred_masks
                        det["masks"] = m.float() / 255.0 if mask_threshold is None else m.bool()
                    results.append(det)
                out[name] = results
            return out
        finally:
            model.train(was_training)

    def _attach_masks(
        self,
        features: dict[str, Tensor],
        selected: Mapping[str, list[Instances]],
        rows: Mapping[str, list[Tensor]],
    ) -> None:
        """Set `pred_masks` [D, 1, M, M] on every transform's instances; one mask-head pass on the
        union of the (proposal, class) pairs the transforms kept."""
        from detectron2.structures import Boxes, Instances

        heads = self.model.roi_heads
        names = list(selected)
        if len(names) == 1:
            insts = selected[names[0]]
            for inst, m in zip(insts, mask_probabilities(heads, features, insts), strict=True):
                inst.pred_masks = m
            return
        k = self.num_classes
        union: list[Instances] = []
        inverse: list[Tensor] = []
        for i in range(len(selected[names[0]])):
            insts = [selected[n][i] for n in names]
            keys = torch.cat([rows[n][i] * k + inst.pred_classes for n, inst in zip(names, insts, strict=True)])
            uniq, inv = torch.unique(keys, return_inverse=True)
            pos = torch.arange(keys.shape[0], device=keys.device)
            first = torch.full_like(uniq, keys.shape[0]).scatter_reduce_(0, inv, pos, reduce="amin")
            all_boxes = torch.cat([inst.pred_boxes.tensor for inst in insts])
            all_classes = torch.cat([inst.pred_classes for inst in insts])
            union.append(
                Instances(insts[0].image_size, pred_boxes=Boxes(all_boxes[first]), pred_classes=all_classes[first])
            )
            inverse.append(inv)
        masks = mask_probabilities(heads, features, union)
        for i, inv in enumerate(inverse):
            start = 0
            for n in names:
                inst = selected[n][i]
                inst.pred_masks = masks[i][inv[start : start + len(inst)]]
                start += len(inst)


def _original_rows(boxes: Tensor, scores: Tensor, kept: Tensor) -> Tensor:
    """Proposal rows of `fast_rcnn_inference`'s kept indices (it drops rows with non-finite boxes or
    scores before indexing, so its indices count the finite rows only)."""
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if bool(valid.all()):
        return kept
    return valid.nonzero().squeeze(1)[kept]
