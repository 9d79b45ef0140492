"""Tests of the torchvision backend: class convention, training, records, inference, checkpoints."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_train.backends import (
    DetectorBackend,
    build_backend,
    detections_to_lvis,
    identity,
    make_checkpoint,
    match_proposals,
    save_checkpoint,
)
from pcb_train.backends.torchvision import (
    TorchvisionBackend,
    as_torchvision_model,
    bg_last_to_tv,
    default_cls_loss,
    labels_to_tv,
    tv_labels_to_bg_last,
    tv_to_bg_last,
)
from pcb_train.config import ModelConfig, load_config

K = 5
SIZE = 64
LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def tiny_config(*overrides: str) -> ModelConfig:
    base = ["model.arch=tiny", f"model.num_classes={K}", f"model.min_size={SIZE}", f"model.max_size={SIZE}"]
    return load_config(None, [*base, *overrides]).model


def tiny_backend(*overrides: str, seed: int = 0) -> TorchvisionBackend:
    torch.manual_seed(seed)
    backend = build_backend(tiny_config(*overrides))
    assert isinstance(backend, TorchvisionBackend)
    return backend


def categories(k: int = K) -> CategorySpace:
    return CategorySpace(
        ids=tuple(range(10, 10 + k)),
        names=tuple(f"c{i}" for i in range(k)),
        frequency=("f",) * k,
        image_count=(1,) * k,
    )


def make_images(seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    # two sizes, neither equal to the model's input size: exercises the resize in both directions
    return [torch.rand(3, 48, 80, generator=g), torch.rand(3, 64, 64, generator=g)]


def make_targets(images: list[Tensor]) -> list[dict[str, Tensor]]:
    out = []
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 2.0, 44.0, 20.0]])
        masks = torch.zeros((2, h, w), dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        out.append(
            {
                "boxes": boxes,
                "labels": torch.tensor([i % K, 3]),
                "masks": masks,
                "image_id": torch.tensor(100 + i),
            }
        )
    return out


@pytest.fixture(scope="module")
def backend() -> TorchvisionBackend:
    return tiny_backend()


@pytest.fixture()
def fresh() -> Iterator[TorchvisionBackend]:
    yield tiny_backend()


# --------------------------------------------------------------------------------------------
# class convention


def test_convention_helpers_hand_case() -> None:
    # torchvision order [bg, c0, c1] -> pcbkit order [c0, c1, bg]
    z = torch.tensor([[9.0, 1.0, 2.0]])
    assert torch.equal(tv_to_bg_last(z), torch.tensor([[1.0, 2.0, 9.0]]))
    assert torch.equal(bg_last_to_tv(tv_to_bg_last(z)), z)
    # sample labels: torchvision 0 = background, 1..K objects, -1 ignore
    assert tv_labels_to_bg_last(torch.tensor([0, 1, 3, -1]), 3).tolist() == [3, 0, 2, -1]
    assert labels_to_tv(torch.tensor([0, 2])).tolist() == [1, 3]


def test_background_last_on_a_real_model(fresh: TorchvisionBackend) -> None:
    images = make_images()
    captured: list[Tensor] = []
    hook = fresh.model.roi_heads.box_predictor.register_forward_hook(
        lambda m, i, o: captured.append(o[0].detach())
    )
    try:
        records = fresh.proposal_records(images, make_targets(images))
    finally:
        hook.remove()
    tv_logits = captured[0]  # torchvision's own class_logits: background in column 0
    ours = torch.cat([r.logits for r in records])
    assert ours.shape == tv_logits.shape and ours.shape[1] == K + 1
    assert torch.equal(ours[:, K], tv_logits[:, 0])
    assert torch.equal(ours[:, :K], tv_logits[:, 1:])
    # make torchvision's background logit dominate: pcbkit must see it in the LAST column
    with torch.no_grad():
        fresh.model.roi_heads.box_predictor.cls_score.bias[0] += 100.0
    records = fresh.proposal_records(images, make_targets(images))
    assert all(bool((r.logits.argmax(dim=1) == K).all()) for r in records)


# --------------------------------------------------------------------------------------------
# training


def test_tiny_train_step_gives_finite_losses_and_gradients(fresh: TorchvisionBackend) -> None:
    model = fresh.model.train()
    images = make_images()
    losses = model(images, make_targets(images))
    assert set(losses) == LOSS_KEYS
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in params)
    nonzero = {n.split(".")[0] for n, p in params if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"backbone", "rpn", "roi_heads"} <= nonzero
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_training_losses_equal_torchvision(fresh: TorchvisionBackend) -> None:
    """Same modules, same sampling RNG: pcbkit's heads (labels 0..K-1, background-last CE) give
    torchvision's own Mask R-CNN losses (labels 1..K, background-first CE)."""
    images, targets = make_images(), make_targets(make_images())
    tv = as_torchvision_model(fresh.model).train()
    fresh.model.train()
    torch.manual_seed(3)
    ours = fresh.model(images, targets)
    torch.manual_seed(3)
    theirs = tv(images, [{**t, "labels": t["labels"] + 1} for t in targets])
    assert set(ours) == set(theirs) == LOSS_KEYS
    for key in LOSS_KEYS:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_default_cls_loss_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, K + 1, generator=g)
    labels = torch.tensor([0, K, 2, K, 4, -1])
    ce = F.cross_entropy(logits[:5], labels[:5])
    torch.testing.assert_close(default_cls_loss((logits,), labels, (1.0,)), ce)
    # iterative: the step-weighted sum
    two = default_cls_loss((logits, 2 * logits), labels, (0.25, 0.75))
    torch.testing.assert_close(two, 0.25 * ce + 0.75 * F.cross_entropy(2 * logits[:5], labels[:5]))
    # equals torchvision's CE on the background-first layout with labels 1..K (0 = background)
    tv_labels = torch.where(labels[:5] == K, torch.zeros_like(labels[:5]), labels[:5] + 1)
    torch.testing.assert_close(ce, F.cross_entropy(bg_last_to_tv(logits[:5]), tv_labels))


def test_pluggable_classification_loss(fresh: TorchvisionBackend) -> None:
    images, targets = make_images(), make_targets(make_images())
    heads = fresh.model.roi_heads
    seen: list[tuple[int, int, int]] = []

    class Out:
        def __init__(self, total: Tensor) -> None:
            self.total = total

    def doubled(step_logits: tuple[Tensor, ...], labels: Tensor) -> Out:
        seen.append((len(step_logits), step_logits[0].shape[1], int(labels.max())))
        return Out(2.0 * F.cross_entropy(step_logits[0], labels))

    fresh.model.train()
    torch.manual_seed(5)
    base = fresh.model(images, targets)["loss_classifier"]
    heads.set_cls_loss(doubled)
    torch.manual_seed(5)
    plugged = fresh.model(images, targets)["loss_classifier"]
    torch.testing.assert_close(plugged, 2.0 * base)
    # one step (plain head), K+1 logits, background label K among the samples
    assert seen == [(1, K + 1, K)]
    assert isinstance(heads.last_cls_loss, Out)
    heads.set_cls_loss(lambda s, y: "nope")
    with pytest.raises(TypeError, match="expected a Tensor"):
        fresh.model(images, targets)


def test_target_labels_are_checked(fresh: TorchvisionBackend) -> None:
    images = make_images()
    bad = make_targets(images)
    bad[0]["labels"] = torch.tensor([0, K])  # K is the background, not an object class
    with pytest.raises(ValueError, match=f"0..{K - 1}"):
        fresh.model.train()(images, bad)


def test_autocast_bf16_train_step(fresh: TorchvisionBackend) -> None:
    images = make_images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = fresh.model.train()(images, make_targets(images))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_multi_scale_training_sizes() -> None:
    torch.manual_seed(0)
    b = TorchvisionBackend(tiny_config(), train_min_sizes=(48, 56))
    t = b.model.transform
    assert t.min_size[-1] == SIZE  # the test size
    assert {t.torch_choice(list(t.min_size)) for _ in range(50)} == {48, 56}


# --------------------------------------------------------------------------------------------
# proposal records


def test_match_proposals_hand_case() -> None:
    gt = torch.tensor([[10.0, 10.0, 30.0, 30.0], [60.0, 60.0, 80.0, 80.0]])
    gt_labels = torch.tensor([2, 4])
    boxes = torch.tensor(
        [
            [10.0, 10.0, 30.0, 30.0],  # == gt 0: IoU 1
            [10.0, 10.0, 30.0, 34.0],  # inter 400, union 480: IoU 5/6 -> class 2
            [20.0, 10.0, 40.0, 30.0],  # inter 200, union 600: IoU 1/3 -> background
            [40.0, 40.0, 50.0, 50.0],  # no overlap
            [60.0, 60.0, 80.0, 80.0],  # == gt 1, an ignore region
        ]
    )
    labels, ious = match_proposals(boxes, gt, gt_labels, num_classes=6, gt_ignore=torch.tensor([False, True]))
    assert labels.tolist() == [2, 2, 6, 6, -1]
    torch.testing.assert_close(ious, torch.tensor([1.0, 5 / 6, 1 / 3, 0.0, 1.0]))
    # exactly at the threshold counts as positive (IoU >= 0.5): [10, 10, 30, 50] has IoU 400/800
    labels, ious = match_proposals(torch.tensor([[10.0, 10.0, 30.0, 50.0]]), gt, gt_labels, 6)
    assert labels.tolist() == [2] and ious.tolist() == [0.5]
    labels, ious = match_proposals(boxes, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), 6)
    assert labels.tolist() == [6] * 5 and ious.tolist() == [0.0] * 5


def test_proposal_records_with_given_proposals(backend: TorchvisionBackend) -> None:
    images = make_images()
    targets = make_targets(images)
    targets[1]["iscrowd"] = torch.tensor([False, True])
    props = [
        torch.tensor([[4.0, 6.0, 30.0, 40.0], [60.0, 30.0, 70.0, 40.0]]),  # gt 0 exactly, far away
        torch.tensor([[20.0, 2.0, 44.0, 20.0], [4.0, 6.0, 30.0, 40.0]]),  # the crowd box, gt 0
    ]
    recs = backend.proposal_records(images, targets, proposals=props, regressed="per_class")
    assert [r.image_id for r in recs] == [100, 101]
    assert recs[0].labels.tolist() == [0, K] and recs[0].ious.tolist() == [1.0, 0.0]
    assert recs[1].labels.tolist() == [-1, 1] and recs[1].ious.tolist() == [1.0, 1.0]
    for r, p in zip(recs, props, strict=True):
        assert torch.equal(r.boxes, p)  # given proposals come back untouched (original pixels)
        assert r.logits.shape == (2, K + 1) and r.logits.dtype == torch.float32
        assert r.regressed is not None and r.regressed.shape == (2, 4 * K)
    # the logits of a proposal do not depend on the other proposals of the batch
    solo = backend.proposal_records(images[:1], targets[:1], proposals=props[:1])
    torch.testing.assert_close(solo[0].logits, recs[0].logits, rtol=1e-5, atol=1e-5)


def test_proposal_records_from_the_rpn(backend: TorchvisionBackend) -> None:
    images = make_images()
    recs = backend.proposal_records(images, make_targets(images), regressed="agnostic")
    top_n = backend.config.rpn_post_nms_top_n_test
    for r, im in zip(recs, images, strict=True):
        h, w = im.shape[-2:]
        n = len(r)
        assert 0 < n <= top_n
        assert r.boxes.shape == (n, 4) and r.logits.shape == (n, K + 1) and r.regressed.shape == (n, 4)
        # boxes are in the ORIGINAL image's pixels
        assert float(r.boxes[:, [0, 2]].max()) <= w + 1e-3 and float(r.boxes[:, [1, 3]].max()) <= h + 1e-3
        assert r.labels.min() >= 0 and r.labels.max() <= K
        # positives are exactly the proposals with IoU >= 0.5
        assert torch.equal(r.labels < K, r.ious >= 0.5)


def test_records_restore_training_mode(fresh: TorchvisionBackend) -> None:
    fresh.model.train()
    images = make_images()
    fresh.proposal_records(images, make_targets(images))
    fresh.infer(images, {"none": identity})
    assert fresh.model.training


# --------------------------------------------------------------------------------------------
# inference


def test_compact_masks_give_the_same_lvis_results_as_pasted_ones(backend: TorchvisionBackend) -> None:
    from pcb_analysis.categories import CategorySpace
    from pcb_train.backends.postprocess import detections_to_lvis

    cats = CategorySpace(
        ids=tuple(range(1, K + 1)),
        names=tuple(f"c{i}" for i in range(K)),
        frequency=("f",) * K,
        image_count=(1,) * K,
    )
    images = make_images()
    transforms = {"none": identity, "half": lambda q: torch.cat([q[:, :-1] * 0.5, q[:, -1:]], 1)}
    pasted = backend.infer(images, transforms, detections_per_image=-1)
    compact = backend.infer(images, transforms, detections_per_image=-1, compact_masks=True)
    for i in range(len(images)):
        cache: dict = {}
        for name in transforms:
            a, b = pasted[name][i], compact[name][i]
            assert "masks" in a and "mask_probs" in b and "masks" not in b
            assert b["mask_probs"].dim() == 3 and b["mask_probs"].shape[1] == b["mask_probs"].shape[2]
            assert tuple(b["image_size"].tolist()) == tuple(images[i].shape[-2:])
            want = detections_to_lvis(a, i, cats)
            assert want and detections_to_lvis(b, i, cats) == want
            assert detections_to_lvis(b, i, cats, cache) == want  # shared RLEs across the two sets


def test_identity_transform_reproduces_torchvision_exactly(backend: TorchvisionBackend) -> None:
    images = make_images()
    tv = as_torchvision_model(backend.model).eval()
    with torch.no_grad():
        theirs = tv(images)
    ours = backend.infer(images, {"none": identity}, mask_threshold=None)["none"]
    assert len(ours) == len(theirs) == 2
    for a, b, im in zip(ours, theirs, images, strict=True):
        assert a["boxes"].shape[0] > 0
        assert torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["scores"], b["scores"])
        assert torch.equal(labels_to_tv(a["labels"]), b["labels"])
        assert a["masks"].shape == (a["boxes"].shape[0], *im.shape[-2:])
        torch.testing.assert_close(a["masks"], b["masks"][:, 0], rtol=0, atol=1e-6)
    binary = backend.infer(images, {"none": identity})["none"]
    for a, b in zip(binary, ours, strict=True):
        assert a["masks"].dtype == torch.bool and torch.equal(a["masks"], b["masks"] >= 0.5)


def test_model_eval_forward_uses_the_score_transform_hook(fresh: TorchvisionBackend) -> None:
    images = make_images()

    def favour_class_1(q: Tensor) -> Tensor:
        out = q.clone()
        out[:, 1] += 1.0
        return out / out.sum(dim=1, keepdim=True)

    fresh.model.roi_heads.score_transform = favour_class_1
    with torch.no_grad():
        hooked = fresh.model.eval()(images)
    fresh.model.roi_heads.score_transform = None
    direct = fresh.infer(images, {"fav": favour_class_1}, mask_threshold=None)["fav"]
    for a, b in zip(hooked, direct, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
        assert int(a["labels"][0]) == 1  # the boosted class tops the list


def test_two_transforms_share_one_backbone_pass(backend: TorchvisionBackend) -> None:
    images = make_images()
    model = backend.model
    calls = {"backbone": 0, "rpn": 0, "box_head": 0, "mask_head": 0}
    modules = {
        "backbone": model.backbone,
        "rpn": model.rpn,
        "box_head": model.roi_heads.box_head,
        "mask_head": model.roi_heads.mask_head,
    }
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, m in modules.items()
    ]

    def only_class_0(q: Tensor) -> Tensor:  # all foreground mass on class 0, background kept
        out = torch.zeros_like(q)
        out[:, 0] = 1.0 - q[:, K]
        out[:, K] = q[:, K]
        return out

    try:
        out = backend.infer(images, {"none": identity, "c0": only_class_0}, mask_threshold=None)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"backbone": 1, "rpn": 1, "box_head": 1, "mask_head": 1}
    assert all(bool((d["labels"] == 0).all()) for d in out["c0"])
    single = backend.infer(images, {"none": identity}, mask_threshold=None)["none"]
    for a, b in zip(out["none"], single, strict=True):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=1e-5)


def test_bad_score_transform(backend: TorchvisionBackend) -> None:
    with pytest.raises(ValueError, match="returned"):
        backend.infer(make_images(), {"bad": lambda q: q[:, :K]})
    with pytest.raises(ValueError, match="at least one"):
        backend.infer(make_images(), {})


def test_without_mask_head() -> None:
    b = tiny_backend("model.mask_head=false")
    images = make_images()
    assert "loss_mask" not in b.model.train()(images, make_targets(images))
    dets = b.infer(images, {"none": identity})["none"]
    assert all("masks" not in d for d in dets)


def test_paste_masks_matches_torchvision() -> None:
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.ops import clip_boxes_to_image

    from pcb_train.backends.mask_ops import paste_masks

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(40, 7, 7, generator=g)
    boxes = torch.rand(40, 4, generator=g) * 50 - 5
    boxes[:, 2:] = boxes[:, :2] + torch.rand(40, 2, generator=g) * 30 + 0.2
    boxes[0] = torch.tensor([-5.0, -3.0, 200.0, 150.0])  # larger than the image
    boxes[1] = torch.tensor([3.2, 4.7, 3.3, 4.9])  # sub-pixel
    size = (40, 56)
    boxes = clip_boxes_to_image(boxes, size)  # detections are clipped before pasting
    ref = paste_masks_in_image(masks[:, None], boxes, size)[:, 0]
    for budget in (1 << 25, 3000, 10):  # batched, chunked, and the per-box loop
        ours = paste_masks(masks, boxes, size, max_elements=budget)
        torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6)
        assert torch.equal(paste_masks(masks, boxes, size, 0.5, max_elements=budget), ref >= 0.5)
    assert paste_masks(masks[:0], boxes[:0], size, 0.5).shape == (0, *size)


def test_class_mask_logits_equal_the_full_predictor(backend: TorchvisionBackend) -> None:
    from pcb_train.backends.torchvision import class_mask_logits

    pred = backend.model.roi_heads.mask_predictor
    x = torch.randn(6, pred.conv5_mask.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([0, 1, 5, 3, 3, 2])
    with torch.no_grad():
        full = pred(x)[torch.arange(6), classes]
        torch.testing.assert_close(class_mask_logits(pred, x, classes), full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# LVIS results


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_lvis_results_round_trip() -> None:
    space = categories()
    masks = torch.zeros((2, 6, 7), dtype=torch.bool)
    masks[0, 1:4, 2:6] = True
    masks[1, 5, 0] = True
    dets = {
        "boxes": torch.tensor([[2.0, 1.0, 6.0, 4.0], [0.0, 5.0, 1.0, 6.0]]),
        "scores": torch.tensor([0.9, 0.25]),
        "labels": torch.tensor([3, 0]),
        "masks": masks,
    }
    entries = detections_to_lvis(dets, 42, space)
    assert [e["category_id"] for e in entries] == [13, 10]  # contiguous 3 -> LVIS id 13
    assert entries[0]["bbox"] == [2.0, 1.0, 4.0, 3.0] and entries[0]["image_id"] == 42
    assert entries[1]["score"] == pytest.approx(0.25)
    for e, m in zip(entries, masks, strict=True):
        assert isinstance(e["segmentation"]["counts"], str) and e["segmentation"]["size"] == [6, 7]
        rle = {"size": e["segmentation"]["size"], "counts": e["segmentation"]["counts"].encode("ascii")}
        assert np.array_equal(mask_utils.decode(rle).astype(bool), m.numpy())
    with pytest.raises(PcbkitError, match="outside"):
        detections_to_lvis({**dets, "labels": torch.tensor([K, 0])}, 1, space)
    assert detections_to_lvis({k: v[:0] for k, v in dets.items()}, 1, space) == []


def test_inference_to_lvis_results(backend: TorchvisionBackend) -> None:
    images = make_images()
    dets = backend.infer(images, {"none": identity})["none"]
    entries = detections_to_lvis(dets[0], 7, categories())
    assert len(entries) == dets[0]["boxes"].shape[0] <= backend.config.detections_per_image
    assert all(10 <= e["category_id"] < 10 + K and e["bbox"][2] >= 0 for e in entries)
    assert entries[0]["segmentation"]["size"] == [48, 80]


# --------------------------------------------------------------------------------------------
# checkpoints


def _save(b: TorchvisionBackend, path: Path, space: CategorySpace | None = None) -> Path:
    save_checkpoint(
        path, make_checkpoint(b.model.state_dict(), b.config, categories=space, extra={"iteration": 7})
    )
    return path


def test_checkpoint_round_trip(tmp_path: Path, backend: TorchvisionBackend) -> None:
    path = _save(backend, tmp_path / "model.pth", categories())
    other = tiny_backend(seed=123)
    images = make_images()
    before = other.infer(images, {"none": identity})["none"][0]["scores"]
    info = other.load_checkpoint(path, categories=categories())
    assert info.extra["iteration"] == 7 and info.categories == categories() and len(info.sha256) == 16
    a = backend.infer(images, {"none": identity})["none"][0]
    b = other.infer(images, {"none": identity})["none"][0]
    assert torch.equal(a["scores"], b["scores"]) and not torch.equal(b["scores"], before)
    # a bare state dict of the same model loads too
    torch.save(backend.model.state_dict(), tmp_path / "bare.pth")
    assert tiny_backend(seed=5).load_checkpoint(tmp_path / "bare.pth").model_config is None


def test_checkpoint_mismatches_are_refused(tmp_path: Path, backend: TorchvisionBackend) -> None:
    path = _save(backend, tmp_path / "model.pth", categories())
    with pytest.raises(PcbkitError, match=f"K={K} classes, the config has K={K + 1}"):
        tiny_backend(f"model.num_classes={K + 1}").load_checkpoint(path)
    with pytest.raises(PcbkitError, match="another model config: mask_head"):
        tiny_backend("model.mask_head=false").load_checkpoint(path)
    with pytest.raises(PcbkitError, match="category space mismatch"):
        tiny_backend().load_checkpoint(
            path,
            categories=CategorySpace(
                ids=tuple(range(20, 20 + K)),
                names=("a", "b", "c", "d", "e"),
                frequency=("r",) * K,
                image_count=(1,) * K,
            ),
        )
    # a bare state dict for another class count: the error still names K
    torch.save(backend.model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(PcbkitError, match=f"checkpoint is for K={K} classes, the model has K={K + 1}"):
        tiny_backend(f"model.num_classes={K + 1}").load_checkpoint(tmp_path / "bare.pth")
    with pytest.raises(PcbkitError, match="checkpoint file not found"):
        backend.load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PcbkitError, match="junk.pth: is not a pcbkit/detectron2 checkpoint"):
        backend.load_checkpoint(tmp_path / "junk.pth")


class _Arbitrary:
    """A custom class in a pickle: refused by weights_only=True."""


def test_checkpoint_loading_is_weights_only(tmp_path: Path, backend: TorchvisionBackend) -> None:
    ckpt = make_checkpoint(backend.model.state_dict(), backend.config, extra={"evil": _Arbitrary()})
    torch.save(ckpt, tmp_path / "evil.pth")
    with pytest.raises(PcbkitError, match="weights_only=True"):
        tiny_backend().load_checkpoint(tmp_path / "evil.pth")


def test_load_weights_skips_mismatched_heads(tmp_path: Path, backend: TorchvisionBackend) -> None:
    """`model.weights`: a detector state dict for another class count initialises everything else."""
    torch.save(backend.model.state_dict(), tmp_path / "k5.pth")
    torch.manual_seed(9)
    b = build_backend(tiny_config(f"model.num_classes={K + 2}", f"model.weights={tmp_path / 'k5.pth'}"))
    assert torch.equal(b.model.backbone.stem[0].weight, backend.model.backbone.stem[0].weight)
    assert b.model.roi_heads.box_predictor.cls_score.weight.shape[0] == K + 3


# --------------------------------------------------------------------------------------------
# iterative head


def test_iterative_head(tmp_path: Path) -> None:
    pytest.importorskip("pcb_train.iterative_head")
    b = tiny_backend("model.iterative_head=true")
    heads = b.model.roi_heads
    assert heads.iterative_head is not None and heads.step_weights == (0.2, 0.2, 0.6)
    keys = list(b.model.state_dict())
    # the shared box head and predictor are saved once, under torchvision's names
    assert not any(k.startswith("roi_heads.iterative_head.box_head") for k in keys)
    assert not any(k.startswith("roi_heads.iterative_head.predictor") for k in keys)
    assert any(k.startswith("roi_heads.iterative_head.mlp_cls") for k in keys)
    assert "roi_heads.box_head.fc6.weight" in keys
    images, targets = make_images(), make_targets(make_images())
    seen: list[int] = []

    def spy(step_logits: tuple[Tensor, ...], labels: Tensor) -> Tensor:
        seen.append(len(step_logits))
        return default_cls_loss(step_logits, labels, heads.step_weights)

    heads.set_cls_loss(spy)
    losses = b.model.train()(images, targets)
    assert seen == [3] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert heads.iterative_head.mlp_cls[0].weight.grad.abs().sum() > 0
    # records carry the LAST step's logits
    captured: list[Tensor] = []
    hook = heads.iterative_head.register_forward_hook(
        lambda m, i, o: captured.append(o.step_logits[-1].detach())
    )
    try:
        recs = b.proposal_records(images, targets)
    finally:
        hook.remove()
    torch.testing.assert_close(torch.cat([r.logits for r in recs]), tv_to_bg_last(captured[0]))
    # round trip through a checkpoint (the shared weights come back into the iterative head)
    path = _save(b, tmp_path / "iter.pth")
    other = tiny_backend("model.iterative_head=true", seed=77)
    other.load_checkpoint(path)
    a = b.infer(images, {"none": identity})["none"][0]
    c = other.infer(images, {"none": identity})["none"][0]
    assert torch.equal(a["scores"], c["scores"]) and torch.equal(a["boxes"], c["boxes"])
    with pytest.raises(PcbkitError, match="iterative head"):
        as_torchvision_model(b.model)
    with pytest.raises(PcbkitError, match="another model config: iterative_head"):
        tiny_backend().load_checkpoint(path)
    # the identity start of the modulation MLPs reaches the model: the last step equals the first
    ident = tiny_backend("model.iterative_head=true", "model.modulation_init=identity").model.roi_heads
    assert ident.iterative_head.modulation_init == "identity"
    assert torch.count_nonzero(ident.iterative_head.mlp_cls[2].weight) == 0
    assert torch.all(ident.iterative_head.mlp_loc[2].bias == 1.0)


# --------------------------------------------------------------------------------------------
# the paper's configuration and the protocol


def test_backend_satisfies_the_protocol(backend: TorchvisionBackend) -> None:
    assert isinstance(backend, DetectorBackend) and backend.num_classes == K and backend.name == "torchvision"


def _has_detectron2() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_detectron2(), reason="detectron2 is installed: its backend is tested elsewhere")
def test_detectron2_backend_missing_is_a_clear_error() -> None:
    with pytest.raises(PcbkitError, match="'detectron2' is not available"):
        build_backend(ModelConfig(backend="detectron2", arch="tiny", num_classes=3))


def test_r50_fpn_at_lvis_class_count() -> None:
    torch.manual_seed(0)
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "lvis_v1_r50_fpn.yaml",
        ["model.min_size=64", "model.max_size=64", "model.rpn_post_nms_top_n_test=20"],
    ).model
    b = build_backend(cfg)
    heads = b.model.roi_heads
    assert heads.box_predictor.cls_score.weight.shape == (1204, 1024)
    assert heads.box_predictor.bbox_pred.weight.shape == (1204 * 4, 1024)
    assert heads.box_head.fc6.weight.shape == (1024, 256 * 7 * 7)
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 1204
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (1e-4, 0.5, 300)
    assert heads.fg_bg_sampler.batch_size_per_image == 512 and heads.fg_bg_sampler.positive_fraction == 0.25
    assert b.model.rpn._post_nms_top_n == {"training": 1000, "testing": 20}
    n_params = sum(p.numel() for p in b.model.parameters())
    assert 45e6 < n_params < 70e6, n_params  # ResNet-50 FPN Mask R-CNN with 1204-way heads
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1202])}
    (rec,) = b.proposal_records([image], [target])
    assert rec.logits.shape == (len(rec), 1204) and 0 < len(rec) <= 20
    assert math.isfinite(float(rec.logits.abs().max()))


def test_mask_head_in_chunks_equals_one_call(
    backend: TorchvisionBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pcb_train.backends.torchvision.roi_heads as tvb

    images = make_images()
    with torch.no_grad():
        image_list, features, _ = backend._prepare(images)
        sizes = image_list.image_sizes
        g = torch.Generator().manual_seed(3)
        boxes = []
        for h, w in sizes:
            xy = torch.rand(7, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
            boxes.append(torch.cat([xy, xy + 8 + torch.rand(7, 2, generator=g) * 20], 1))
        boxes[1] = boxes[1][:5]
        labels = [torch.randint(0, K, (b.shape[0],), generator=g) for b in boxes]
        heads = backend.model.roi_heads
        whole = heads.mask_probabilities(features, boxes, labels, sizes)
        monkeypatch.setattr(tvb, "MASK_ROI_CHUNK", 3)
        chunked = heads.mask_probabilities(features, boxes, labels, sizes)
    assert [c.shape[0] for c in chunked] == [7, 5]
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
