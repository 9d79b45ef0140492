"""`TorchvisionBackend`: the `DetectorBackend` protocol (`pcb_train.backends.base`) on
`model.PCBMaskRCNN`.

Records and inference share one backbone + RPN (+ box head) pass; several score transforms
reuse it (`infer`), the mask head runs once per distinct (proposal, class) pair of an image over
all transforms. Post-processing is `postprocess.select_detections` on boxes in ORIGINAL image
pixels (`roi_heads.original_frame_boxes`), the frame a dump's regressed boxes are stored in, so
the offline path reproduces these detections exactly. Masks: pasted [D, H, W] with
`mask_ops.paste_masks`, or compact [D, M, M] probabilities (`compact_masks=True`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection.transform import resize_boxes

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import ApiMisuseError
from pcb_train.backends.base import (
    CheckpointInfo,
    DetectionFilter,
    Detections,
    ProposalRecord,
    Regressed,
    ScoreTransform,
    SelectedDetections,
)
from pcb_train.backends.checkpoint import checkpoint_info, checkpoint_model_state, read_checkpoint
from pcb_train.backends.mask_ops import paste_masks
from pcb_train.backends.matching import match_proposals
from pcb_train.backends.torchvision.model import NAME, PCBMaskRCNN, build_model, load_state, load_weights
from pcb_train.backends.torchvision.roi_heads import original_frame_boxes
from pcb_train.config import ModelConfig


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
        load_state(self.model, state, p, strict=True)
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
        matched ground truth (see `matching.match_proposals`) and optionally the regressed boxes."""
        if len(targets) != len(images):
            raise ApiMisuseError(f"proposal_records: {len(images)} images but {len(targets)} targets")
        if regressed not in ("none", "agnostic", "per_class"):
            raise ApiMisuseError(f"proposal_records: unknown regressed kind {regressed!r}")
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
                    raise ApiMisuseError(
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
            logits = heads.score_logits(box.logits).float()  # [R, K+1] layout (docs/losses.md §4)
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
        keep: DetectionFilter | None = None,
    ) -> dict[str, list[Detections]]:
        """Detections per named score transform from ONE backbone + RPN + box-head pass.

        Each transform maps q [R, K+1] (all images' proposals, background last) to q~ of the same
        shape; then the standard post-processing (`postprocess.select_detections`) runs on the decoded
        boxes in ORIGINAL image pixels (the frame a dump's regressed boxes are stored in, so the
        offline path reproduces these detections exactly) and masks are predicted for the kept
        detections. With several transforms the mask head runs once on the union of their
        (proposal, class) pairs. `detections_per_image` overrides the model's cap of detections
        per image (-1: none); detections are sorted by decreasing score, so a capped list is the
        prefix of the uncapped one. `compact_masks=True` returns each detection's mask at RoI
        resolution ("mask_probs" [D, M, M] probabilities, with "image_size" [2] = (H, W)) instead
        of pasted [D, H, W] masks: thousands of uncapped detections of a large image would need
        gigabytes as full-image masks; `postprocess.detections_to_lvis` pastes and encodes them a chunk
        at a time. `keep(name, image index, scores, labels)` -> bool [D] drops the detections it
        rejects before any mask is predicted (the order of the others is kept): a caller that knows
        a detection will never be written saves its mask."""
        if not score_transforms:
            raise ApiMisuseError("infer: give at least one score transform (e.g. {'none': identity})")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            image_list, features, originals = self._prepare(images)
            sizes = image_list.image_sizes
            heads = model.roi_heads
            props, _ = model.rpn(image_list, features)
            box = heads.box_predictions(features, props, sizes)
            probs = heads.class_probabilities(heads.score_logits(box.logits))
            decoded = heads.decode_boxes(box.deltas, props, sizes)  # resized input's pixels
            decoded_orig = [
                original_frame_boxes(d, s, o) for d, s, o in zip(decoded, sizes, originals, strict=True)
            ]
            selected: dict[str, list[SelectedDetections]] = {}
            for name, fn in score_transforms.items():
                q = fn(probs)
                if q.shape != probs.shape:
                    raise ApiMisuseError(
                        f"score transform {name!r}: returned {tuple(q.shape)}, expected {tuple(probs.shape)}"
                    )
                selected[name] = heads.select_detections(q, decoded_orig, detections_per_image)
                if keep is not None:
                    selected[name] = [
                        SelectedDetections(*(t[m] for t in d))
                        for i, d in enumerate(selected[name])
                        for m in (keep(name, i, d.scores, d.labels),)
                    ]
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
                boxes_i = decoded_orig[i].reshape(-1, 4)[uniq[i]]
                pasted = paste_masks(probs[i][:, 0], boxes_i, originals[i], threshold)
            start = 0
            for n in names:
                d = selected[n][i].flat.shape[0]
                out[n].append(pasted[inverse[i][start : start + d]])
                start += d
        return out
