"""`Detectron2Backend`: the `DetectorBackend` protocol (`pcb_train.backends.base`) on detectron2's
`GeneralizedRCNN` with `PCBROIHeads` (optional: detectron2 is imported lazily, inside methods).

Model: `config.detectron2_cfg` of the `ModelConfig`. Inputs: images [3, H, W] RGB in [0, 1] ->
`detectron2_inputs` (detectron2's `cfg.INPUT.FORMAT`, BGR, 0-255, resized like its
`ResizeShortestEdge`, "height"/"width" = the original size); the model normalises and pads.
Boxes and masks come back in original image pixels (detectron2's `detector_postprocess`).
Records and inference share one backbone + RPN + box-head pass (`outputs.box_outputs`); with
several score transforms the mask head runs once on the union of their detections.
Checkpoints and weights: `checkpoint` (pcbkit checkpoints and detectron2 files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import ApiMisuseError, PcbkitError
from pcb_train.backends.base import (
    CheckpointInfo,
    DetectionFilter,
    Detections,
    ProposalRecord,
    Regressed,
    ScoreTransform,
)
from pcb_train.backends.detectron2.checkpoint import load_checkpoint, load_weights
from pcb_train.backends.detectron2.config import NAME, detectron2_cfg, require_detectron2
from pcb_train.backends.detectron2.outputs import box_outputs, mask_probabilities, original_rows
from pcb_train.backends.matching import match_proposals
from pcb_train.config import ModelConfig

if TYPE_CHECKING:
    from detectron2.structures import Instances


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
        from detectron2.modeling import build_model  # lazy, as every detectron2 import here

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
        """Initialise from a local detectron2 file (see `checkpoint.load_weights`)."""
        load_weights(self.model, path)

    def load_checkpoint(self, path: str | Path, categories: CategorySpace | None = None) -> CheckpointInfo:
        """Load a trained model: a pcbkit checkpoint or a detectron2 checkpoint of this
        architecture (see `checkpoint.load_checkpoint`)."""
        return load_checkpoint(self.model, self.config, path, categories)

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
            raise ApiMisuseError(f"detectron2_inputs: {len(images)} images but {len(targets)} targets")
        bgr = str(self.cfg.INPUT.FORMAT).upper() == "BGR"
        train_sizes = [int(s) for s in self.cfg.INPUT.MIN_SIZE_TRAIN]
        max_train = int(self.cfg.INPUT.MAX_SIZE_TRAIN)
        out: list[dict[str, Any]] = []
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise ApiMisuseError(f"detectron2_inputs: image {i} must be [3, H, W], got {list(im.shape)}")
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
            raise ApiMisuseError(f"proposal_records: {len(images)} images but {len(targets)} targets")
        if regressed not in ("none", "agnostic", "per_class"):
            raise ApiMisuseError(f"proposal_records: unknown regressed kind {regressed!r}")
        if proposals is not None and len(proposals) != len(images):
            raise ApiMisuseError(f"proposal_records: {len(images)} images but {len(proposals)} proposal sets")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            inputs = self.detectron2_inputs(images)
            image_list, features = self._features(inputs)
            scales = [
                (d["width"] / s[1], d["height"] / s[0])
                for d, s in zip(inputs, image_list.image_sizes, strict=True)
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
                    dec = decoded[i] if decoded is not None else None
                    reg = self._regressed(dec, z, props[i], factor, regressed)
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
        keep: DetectionFilter | None = None,
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
        `detector_postprocess` always pastes full-image masks. `keep` drops detections before the
        mask head, as in the torchvision backend."""
        from detectron2.modeling.postprocessing import detector_postprocess
        from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference

        if not score_transforms:
            raise ApiMisuseError("infer: give at least one score transform (e.g. {'none': identity})")
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
                    raise ApiMisuseError(
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
                rows[name] = [
                    original_rows(b, s, idx) for b, s, idx in zip(boxes, per_image, kept, strict=True)
                ]
                if keep is not None:
                    masks_kept = [keep(name, i, x.scores, x.pred_classes) for i, x in enumerate(inst)]
                    inst = [x[m] for x, m in zip(inst, masks_kept, strict=True)]
                    rows[name] = [r[m] for r, m in zip(rows[name], masks_kept, strict=True)]
                selected[name] = inst
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
            keys = torch.cat(
                [rows[n][i] * k + inst.pred_classes for n, inst in zip(names, insts, strict=True)]
            )
            uniq, inv = torch.unique(keys, return_inverse=True)
            pos = torch.arange(keys.shape[0], device=keys.device)
            first = torch.full_like(uniq, keys.shape[0]).scatter_reduce_(0, inv, pos, reduce="amin")
            all_boxes = torch.cat([inst.pred_boxes.tensor for inst in insts])
            all_classes = torch.cat([inst.pred_classes for inst in insts])
            union.append(
                Instances(
                    insts[0].image_size, pred_boxes=Boxes(all_boxes[first]), pred_classes=all_classes[first]
                )
            )
            inverse.append(inv)
        masks = mask_probabilities(heads, features, union)
        for i, inv in enumerate(inverse):
            start = 0
            for n in names:
                inst = selected[n][i]
                inst.pred_masks = masks[i][inv[start : start + len(inst)]]
                start += len(inst)
