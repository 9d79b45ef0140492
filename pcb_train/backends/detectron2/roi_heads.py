"""PCB for detectron2: the ROI-heads plug-in `PCBROIHeads` and its config keys `MODEL.PCB`.

R RoIs, K classes: detectron2's box predictor already gives logits [R, K+1] with the background
LAST and sample labels 0..K-1 / K = background, pcbkit's convention, so nothing is converted.
Importing this module imports detectron2 and registers `PCBROIHeads` in its ROI_HEADS_REGISTRY:
`cfg = add_pcb_config(get_cfg())`, `cfg.MODEL.ROI_HEADS.NAME = "PCBROIHeads"`, then detectron2's
`build_model` / `DefaultTrainer` work unchanged. Training: the classification loss of every step
(PCB with the online matrix when MODEL.PCB.ENABLED, from `resolve_start_iter`), box loss from the
last step; inference: the last step, after `score_transform` when set. The online matrix
(`roi_heads.confusion`) is saved with the weights. MODEL.PCB.CLS_LOSS seesaw | eqlv2 swaps in the
loss family of `pcb_train.loss_families` (K+2 / sigmoid K+1 outputs; `score_logits` maps them to the
[R, K+1] layout inference and the records use) and NORMALIZED_CLASSIFIER the cosine layers
(docs/losses.md). Keys and details: docs/backends.md §7.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from pcb_analysis.errors import ApiMisuseError
from pcb_train.backends.base import ScoreTransform
from pcb_train.iterative_head import (
    DEFAULT_STEP_WEIGHTS,
    IterativeRoIHead,
    StepClsLosses,
    iterative_cls_loss,
    share_checkpoint_keys,
)
from pcb_train.loss_families import CLS_LOSSES, FamilyLoss, build_family, num_cls_outputs
from pcb_train.normed_layers import NormedConv2d, NormedLinear
from pcb_train.pcb_loss import DEFAULT_ALPHA, DEFAULT_MOMENTUM, OnlineConfusion
from pcb_train.schedule import DEFAULT_PCB_START_FRACTION, pcb_start_iteration

logger = logging.getLogger(__name__)

NAME = "PCBROIHeads"
DEFAULT_START_FRACTION = DEFAULT_PCB_START_FRACTION  # 2/3: after 16 of 24 epochs (docs/method.md §4.3)


def add_pcb_config(cfg: CfgNode) -> CfgNode:
    """Add the `MODEL.PCB` keys (defaults: docs/backends.md §7) to a detectron2 config; returns it.

    A config that already has `MODEL.PCB` is left as it is (so calling this twice keeps values)."""
    if "PCB" in cfg.MODEL:
        return cfg
    pcb = CfgNode()
    pcb.ENABLED = False
    pcb.ALPHA = DEFAULT_ALPHA
    pcb.MOMENTUM = DEFAULT_MOMENTUM
    pcb.START_ITER = -1
    pcb.START_FRACTION = DEFAULT_START_FRACTION
    pcb.ITERATIVE = False
    pcb.N_ITER = 3
    pcb.STEP_WEIGHTS = list(DEFAULT_STEP_WEIGHTS)
    pcb.MODULATION_INIT = "default"
    pcb.CLS_LOSS = "ce"
    pcb.NORMALIZED_CLASSIFIER = False
    frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.PCB = pcb
    if frozen:
        cfg.freeze()
    return cfg


def resolve_start_iter(cfg: CfgNode) -> int:
    """MODEL.PCB.START_ITER, or round(START_FRACTION * SOLVER.MAX_ITER) when it is negative."""
    pcb = cfg.MODEL.PCB
    if int(pcb.START_ITER) >= 0:
        return int(pcb.START_ITER)
    frac = float(pcb.START_FRACTION)
    if not 0.0 <= frac <= 1.0:
        raise ApiMisuseError(f"MODEL.PCB.START_FRACTION must be in [0, 1], got {frac}")
    start = pcb_start_iteration("fraction", frac, max_iter=int(cfg.SOLVER.MAX_ITER))
    assert start is not None  # a fraction with max_iter given always resolves
    return start


def _roi_channels(box_head: nn.Module, roi_size: int) -> int:
    """Channel count C of the [R, C, S, S] RoI features the box head reads (its first layer)."""
    for m in box_head.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            c, rest = divmod(int(m.in_features), roi_size * roi_size)
            if rest == 0 and c > 0:
                return c
            break
    raise ApiMisuseError(
        f"PCBROIHeads: cannot infer the RoI feature channels from {type(box_head).__name__}; "
        "pass roi_channels"
    )


class PCBROIHeads(StandardROIHeads):
    """`StandardROIHeads` with the PCB loss and the iterative box head (docs/backends.md §7).

    Args (besides `StandardROIHeads`'):
        pcb_loss: use the PCB loss with an online confusion matrix (False: cross-entropy).
        alpha, momentum: PCB alpha and the matrix EMA momentum.
        start_iter: storage iteration from which the PCB loss may be active.
        iterative: use the iterative head (n_iter weight-shared steps).
        n_iter, step_weights: its steps and their classification-loss weights.
        modulation_init: "default" or "identity" initialisation of the modulation MLPs.
        cls_loss: "ce", "seesaw" (K+2 outputs) or "eqlv2" (sigmoid K+1 outputs); docs/losses.md.
        normalized_classifier: cosine box classifier and mask predictor (temperature 20).
        roi_channels, roi_size: C and S of the box RoI features (inferred when None).
    """

    @configurable
    def __init__(
        self,
        *,
        pcb_loss: bool = False,
        alpha: float = DEFAULT_ALPHA,
        momentum: float = DEFAULT_MOMENTUM,
        start_iter: int = 0,
        iterative: bool = False,
        n_iter: int = 3,
        step_weights: Sequence[float] = DEFAULT_STEP_WEIGHTS,
        modulation_init: str = "default",
        cls_loss: str = "ce",
        normalized_classifier: bool = False,
        roi_channels: int | None = None,
        roi_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        predictor = self.box_predictor
        sigmoid = getattr(predictor, "use_sigmoid_ce", False) or getattr(predictor, "use_fed_loss", False)
        if cls_loss not in CLS_LOSSES:
            raise ApiMisuseError(f"PCBROIHeads: cls_loss must be one of {CLS_LOSSES}, got {cls_loss!r}")
        if (pcb_loss or cls_loss != "ce") and sigmoid:
            raise ApiMisuseError(
                "PCBROIHeads: the PCB loss is a softmax loss and the loss families bring their own outputs; "
                "disable MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE / USE_FED_LOSS"
            )
        self._set_classifier(cls_loss, bool(normalized_classifier))
        # the family's statistics (Seesaw counts, EQLv2 gradient sums) are buffers: saved with the model
        self.family_loss: FamilyLoss | None = build_family(cls_loss, self.num_classes)
        if alpha < 0.0:
            raise ApiMisuseError(f"PCBROIHeads: alpha must be >= 0, got {alpha}")
        self.pcb_loss = bool(pcb_loss)
        self.alpha = float(alpha)
        self.start_iter = int(start_iter)
        self.iterative_head: IterativeRoIHead | None = None
        if iterative:
            size = int(roi_size) if roi_size is not None else int(self.box_pooler.output_size[0])
            channels = int(roi_channels) if roi_channels is not None else _roi_channels(self.box_head, size)
            self.iterative_head = IterativeRoIHead(
                self.box_head,
                predictor,
                n_iter=int(n_iter),
                step_weights=tuple(step_weights),
                feat_channels=channels,
                roi_size=size,
                modulation_init=modulation_init,
            )
            self.step_weights: tuple[float, ...] = self.iterative_head.step_weights
            # one copy of the shared weights in the state dict, under detectron2's names
            share_checkpoint_keys(self)
        else:
            self.step_weights = (1.0,)
        self.confusion: OnlineConfusion | None = None
        if self.pcb_loss:
            self.confusion = (
                OnlineConfusion(self.num_classes, momentum)
                if self.family_loss is None
                else self.family_loss.make_confusion(momentum)
            )
        self.score_transform: ScoreTransform | None = None
        self.last_cls_loss: StepClsLosses | None = None

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        ret = super().from_config(cfg, input_shape)
        if "PCB" not in cfg.MODEL:
            raise KeyError(
                "PCBROIHeads: the config has no MODEL.PCB section; call add_pcb_config(cfg) first"
            )
        pcb = cfg.MODEL.PCB
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        ret.update(
            pcb_loss=bool(pcb.ENABLED),
            alpha=float(pcb.ALPHA),
            momentum=float(pcb.MOMENTUM),
            start_iter=resolve_start_iter(cfg),
            iterative=bool(pcb.ITERATIVE),
            n_iter=int(pcb.N_ITER) if pcb.ITERATIVE else 1,
            step_weights=tuple(float(w) for w in pcb.STEP_WEIGHTS) if pcb.ITERATIVE else (1.0,),
            modulation_init=str(pcb.get("MODULATION_INIT", "default")),
            cls_loss=str(pcb.get("CLS_LOSS", "ce")),
            normalized_classifier=bool(pcb.get("NORMALIZED_CLASSIFIER", False)),
            roi_channels=int(input_shape[in_features[0]].channels),
            roi_size=int(cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION),
        )
        return ret

    def _set_classifier(self, cls_loss: str, normalized: bool) -> None:
        """K+2 (Seesaw) class outputs and / or the cosine classifier and mask predictor; detectron2's
        initialisation for new plain layers (normal std 0.01, bias 0), `NormedLinear`'s for cosine."""
        predictor = self.box_predictor
        old = predictor.cls_score
        width = num_cls_outputs(cls_loss, self.num_classes)
        if normalized:
            predictor.cls_score = NormedLinear(old.in_features, width)
        elif width != old.out_features:
            layer = nn.Linear(old.in_features, width)
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)
            predictor.cls_score = layer
        mask_predictor = getattr(getattr(self, "mask_head", None), "predictor", None)
        if normalized and isinstance(mask_predictor, nn.Conv2d):
            c = mask_predictor
            self.mask_head.predictor = NormedConv2d(c.in_channels, c.out_channels, c.kernel_size[0])

    def score_logits(self, logits: Tensor) -> Tensor:
        """Raw class outputs -> [R, K+1] logits (background last) whose softmax is the model's
        test-time scores: the logits for CE, the family's `test_logits` for Seesaw / EQLv2."""
        if self.family_loss is None:
            return logits
        return self.family_loss.test_logits(logits)

    # -- box head --------------------------------------------------------------------------

    def box_predictions(
        self, features: dict[str, Tensor], proposals: list[Instances]
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """RoI-align + box head (all steps) for `proposal_boxes`: (per-step raw class outputs: [R, K+1]
        background last, [R, K+2] for Seesaw, see `score_logits`; the last step's deltas [R, 4K] or
        [R, 4])."""
        feats = [features[f] for f in self.box_in_features]
        x = self.box_pooler(feats, [p.proposal_boxes for p in proposals])
        if self.iterative_head is not None:
            out = self.iterative_head(x)
            return tuple(out.step_logits), out.deltas
        logits, deltas = self.box_predictor(self.box_head(x))
        return (logits,), deltas

    def pcb_started(self) -> bool:
        """The schedule half of the start condition: storage iteration >= start_iter."""
        return get_event_storage().iter >= self.start_iter

    def box_losses(
        self, step_logits: tuple[Tensor, ...], deltas: Tensor, proposals: list[Instances]
    ) -> dict[str, Tensor]:
        """loss_cls (all steps, PCB when enabled) and loss_box_reg (last step's deltas)."""
        predictor = self.box_predictor
        device = deltas.device
        if proposals:
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals], dim=0
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.int64, device=device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=device)
        storage = get_event_storage()
        _log_accuracy(self.score_logits(step_logits[-1].detach()), gt_classes, storage)
        cls = iterative_cls_loss(
            step_logits,
            gt_classes,
            self.step_weights,
            confusion=self.confusion,
            alpha=self.alpha,
            pcb_started=self.confusion is not None and self.pcb_started(),
            family=self.family_loss,
        )
        self.last_cls_loss = cls
        if self.confusion is not None:
            storage.put_scalar("pcb/active", float(any(a > 0 for a in cls.alphas)))
            storage.put_scalar("pcb/classes_seen", float((self.confusion.counts > 0).sum()))
        if len(cls.per_step) > 1:
            for r, loss in enumerate(cls.per_step):
                storage.put_scalar(f"pcb/loss_cls_step{r}", float(loss.detach()))
        weights = predictor.loss_weight
        box = predictor.box_reg_loss(proposal_boxes, gt_boxes, deltas, gt_classes)
        return {
            "loss_cls": cls.total * float(weights.get("loss_cls", 1.0)),
            "loss_box_reg": box * float(weights.get("loss_box_reg", 1.0)),
        }

    def _forward_box(self, features: dict[str, Tensor], proposals: list[Instances]) -> Any:
        step_logits, deltas = self.box_predictions(features, proposals)
        if self.training:
            losses = self.box_losses(step_logits, deltas, proposals)
            if self.train_on_pred_boxes:
                with torch.no_grad():
                    pred = self.box_predictor.predict_boxes_for_gt_classes(
                        (step_logits[-1], deltas), proposals
                    )
                    for p, boxes in zip(proposals, pred, strict=True):
                        p.proposal_boxes = Boxes(boxes)
            return losses
        return self.predict(step_logits[-1], deltas, proposals)

    def predict(self, logits: Tensor, deltas: Tensor, proposals: list[Instances]) -> list[Instances]:
        """detectron2's post-processing of the last step (raw outputs, mapped by `score_logits`), after
        `score_transform` when one is set."""
        predictor = self.box_predictor
        predictions = (self.score_logits(logits), deltas)
        if self.score_transform is None:
            instances, _ = predictor.inference(predictions, proposals)
            return instances
        boxes = predictor.predict_boxes(predictions, proposals)
        probs = torch.cat(predictor.predict_probs(predictions, proposals)) if proposals else predictions[0]
        q = self.score_transform(probs)
        if q.shape != probs.shape:
            raise ApiMisuseError(f"score_transform returned {tuple(q.shape)}, expected {tuple(probs.shape)}")
        instances, _ = fast_rcnn_inference(
            boxes,
            list(q.split([len(p) for p in proposals])),
            [p.image_size for p in proposals],
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        return instances


def _log_accuracy(logits: Tensor, gt_classes: Tensor, storage: Any) -> None:
    """detectron2's fast_rcnn/{cls_accuracy, fg_cls_accuracy, false_negative} scalars."""
    n = gt_classes.numel()
    if n == 0:
        return
    bg = logits.shape[1] - 1
    pred = logits.argmax(dim=1)
    fg = (gt_classes >= 0) & (gt_classes < bg)
    storage.put_scalar("fast_rcnn/cls_accuracy", float((pred == gt_classes).sum()) / n)
    n_fg = int(fg.sum())
    if n_fg:
        fg_correct = float((pred[fg] == gt_classes[fg]).sum())
        storage.put_scalar("fast_rcnn/fg_cls_accuracy", fg_correct / n_fg)
        storage.put_scalar("fast_rcnn/false_negative", float((pred[fg] == bg).sum()) / n_fg)


if NAME not in ROI_HEADS_REGISTRY:  # a re-import (e.g. importlib.reload) keeps the first registration
    ROI_HEADS_REGISTRY.register(PCBROIHeads)
