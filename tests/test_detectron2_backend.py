"""Tests of the detectron2 backend and the PCB ROI-heads plug-in (tiny models, CPU).

Every test that needs detectron2 skips without it (detectron2 is not on PyPI; CI does not build
it). `test_missing_detectron2_is_a_clear_error` needs nothing: it hides detectron2 itself.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_train.backends import DetectorBackend, build_backend, identity, make_checkpoint, save_checkpoint
from pcb_train.config import ModelConfig, load_config

try:
    import detectron2  # noqa: F401

    D2_MISSING: str | None = None
except ImportError as _err:
    D2_MISSING = (
        f"detectron2 is not installed ({_err}); build it from source with "
        "pip install --no-build-isolation <detectron2 source dir>"
    )


def needs_detectron2(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a test `needs_detectron2` and skip it, with the reason, when detectron2 cannot be imported."""
    return pytest.mark.needs_detectron2(
        pytest.mark.skipif(D2_MISSING is not None, reason=D2_MISSING or "")(fn)
    )


K = 3
SIZE = 64
DETS = 10
TINY = [
    "model.backend=detectron2",
    "model.arch=tiny",
    f"model.num_classes={K}",
    f"model.min_size={SIZE}",
    "model.max_size=96",
    "model.rpn_pre_nms_top_n_train=200",
    "model.rpn_post_nms_top_n_train=100",
    "model.rpn_pre_nms_top_n_test=200",
    "model.rpn_post_nms_top_n_test=50",
    "model.roi_batch_size_per_image=32",
    f"model.detections_per_image={DETS}",  # detectron2 pastes masks one by one on the CPU
]
PCB = [
    "model.iterative_head=true",
    "model.pcb_loss=true",
    "model.pcb_start_unit=iteration",
    "model.pcb_start=1",
]


def tiny_config(*overrides: str) -> ModelConfig:
    return load_config(None, [*TINY, *overrides]).model


def tiny_backend(*overrides: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return build_backend(tiny_config(*overrides))


def categories(k: int = K) -> CategorySpace:
    return CategorySpace(
        ids=tuple(range(10, 10 + k)),
        names=tuple(f"c{i}" for i in range(k)),
        frequency=("f",) * k,
        image_count=(1,) * k,
    )


def make_images(seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    # two sizes, neither the model's input size: the resize runs in both directions
    return [torch.rand(3, 48, 80, generator=g), torch.rand(3, 72, 72, generator=g)]


def make_targets(images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Every image holds classes 0..K-1 at least once between them (so PCB's `ready` comes at once)."""
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 2.0, 44.0, 20.0], [30.0, 20.0, 60.0, 46.0]])
    out = []
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        n = 2 + i
        masks = torch.zeros((n, h, w), dtype=torch.uint8)
        for j, (x1, y1, x2, y2) in enumerate(boxes[:n].int().tolist()):
            masks[j, y1:y2, x1:x2] = 1
        labels = torch.tensor([0, 1] if i == 0 else [2, 1, 0])
        out.append(
            {"boxes": boxes[:n].clone(), "labels": labels, "masks": masks, "image_id": torch.tensor(100 + i)}
        )
    return out


def train_steps(backend: Any, n: int, start: int = 0) -> list[dict[str, float]]:
    """n iterations of detectron2's SimpleTrainer; per iteration the scalars it logged."""
    from detectron2.engine import HookBase, SimpleTrainer

    images = make_images()
    targets = make_targets(images)

    def loader() -> Iterator[list[dict[str, Any]]]:
        while True:
            yield backend.detectron2_inputs(images, targets, train=True)

    logged: list[dict[str, float]] = []

    class Record(HookBase):
        def after_step(self) -> None:
            storage = self.trainer.storage
            logged.append({k: float(v[0]) for k, v in storage.latest().items()})

    model = backend.model
    model.train()
    trainer = SimpleTrainer(model, loader(), torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    trainer.register_hooks([Record()])
    trainer.train(start, start + n)
    model.eval()
    return logged


@pytest.fixture(scope="module")
def backend() -> Any:
    if D2_MISSING is not None:
        pytest.skip(D2_MISSING)
    return tiny_backend()


@pytest.fixture(scope="module")
def trained_pcb() -> Any:
    """A tiny PCB model (iterative head + PCB loss from iteration 1) after 3 SimpleTrainer steps."""
    if D2_MISSING is not None:
        pytest.skip(D2_MISSING)
    b = tiny_backend(*PCB)
    b.logged = train_steps(b, 3)
    return b


# --------------------------------------------------------------------------------------------
# without detectron2


def test_missing_detectron2_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide detectron2 (a None entry makes `import detectron2` raise ImportError) and request it."""
    for name in list(sys.modules):
        if (
            name == "detectron2"
            or name.startswith("detectron2.")
            or name == "pcb_train.backends.detectron2"
            or name.startswith("pcb_train.backends.detectron2.")
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "detectron2", None)
    config = ModelConfig(backend="detectron2", arch="tiny", num_classes=3)
    with pytest.raises(
        PcbkitError, match="detectron2 is not installed: build it from source with pip install"
    ):
        build_backend(config)
    with pytest.raises(PcbkitError, match="--no-build-isolation <source dir>"):
        from pcb_train.backends.detectron2 import Detectron2Backend

        Detectron2Backend(config)
    with pytest.raises(PcbkitError, match="not installed"):
        from pcb_train.backends.detectron2 import detectron2_cfg

        detectron2_cfg(config)


# --------------------------------------------------------------------------------------------
# config and build


@needs_detectron2
def test_add_pcb_config_defaults_and_start_iter() -> None:
    from detectron2.config import get_cfg

    from pcb_train.backends.detectron2.roi_heads import add_pcb_config, resolve_start_iter

    cfg = add_pcb_config(get_cfg())
    pcb = cfg.MODEL.PCB
    assert (pcb.ENABLED, pcb.ITERATIVE, pcb.ALPHA, pcb.MOMENTUM, pcb.N_ITER) == (False, False, 0.4, 0.99, 3)
    assert list(pcb.STEP_WEIGHTS) == [0.2, 0.2, 0.6] and pcb.START_ITER == -1
    assert pcb.MODULATION_INIT == "default"
    pcb.ALPHA = 0.2
    assert add_pcb_config(cfg).MODEL.PCB.ALPHA == 0.2  # a second call keeps the values
    cfg.SOLVER.MAX_ITER = 2400
    assert resolve_start_iter(cfg) == 1600  # 2/3 of 2400 (PCB after 16 of 24 epochs)
    pcb.START_ITER = 5
    assert resolve_start_iter(cfg) == 5
    cfg.merge_from_list(["MODEL.PCB.ENABLED", "True", "MODEL.PCB.STEP_WEIGHTS", "[0.5, 0.5]"])
    assert cfg.MODEL.PCB.ENABLED is True and list(cfg.MODEL.PCB.STEP_WEIGHTS) == [0.5, 0.5]


@needs_detectron2
def test_r50_fpn_lvis_settings() -> None:
    from pcb_train.backends.detectron2 import detectron2_cfg

    cfg = detectron2_cfg(
        load_config(None, ["model.backend=detectron2", "model.arch=r50_fpn", "model.num_classes=1203"]).model
    )
    m = cfg.MODEL
    assert m.WEIGHTS == "" and m.META_ARCHITECTURE == "GeneralizedRCNN" and m.MASK_ON
    widths = (m.RESNETS.DEPTH, m.FPN.OUT_CHANNELS, m.ROI_BOX_HEAD.NUM_FC, m.ROI_BOX_HEAD.FC_DIM)
    assert widths == (50, 256, 2, 1024)
    assert list(m.RPN.IN_FEATURES) == ["p2", "p3", "p4", "p5", "p6"]
    assert [list(s) for s in m.ANCHOR_GENERATOR.SIZES] == [[32], [64], [128], [256], [512]]
    rpn_top = (m.RPN.PRE_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TEST, m.RPN.POST_NMS_TOPK_TRAIN)
    assert rpn_top == (1000, 1000, 1000)
    assert m.ROI_HEADS.NAME == "PCBROIHeads" and m.ROI_HEADS.NUM_CLASSES == 1203
    assert (m.ROI_HEADS.BATCH_SIZE_PER_IMAGE, m.ROI_HEADS.POSITIVE_FRACTION) == (512, 0.25)
    assert list(m.ROI_HEADS.IOU_THRESHOLDS) == [0.5]
    test = (m.ROI_HEADS.SCORE_THRESH_TEST, m.ROI_HEADS.NMS_THRESH_TEST, cfg.TEST.DETECTIONS_PER_IMAGE)
    assert test == (1e-4, 0.5, 300)
    mask = (m.ROI_MASK_HEAD.NUM_CONV, m.ROI_MASK_HEAD.CONV_DIM, m.ROI_MASK_HEAD.POOLER_RESOLUTION)
    assert mask == (4, 256, 14)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert not m.PCB.ENABLED and not m.PCB.ITERATIVE and m.PCB.MODULATION_INIT == "default"
    ident = load_config(None, ["model.backend=detectron2", "model.modulation_init=identity"]).model
    assert detectron2_cfg(ident).MODEL.PCB.MODULATION_INIT == "identity"
    # a PCB start given as a fraction of training
    frac = load_config(
        None,
        [
            "model.backend=detectron2",
            "model.pcb_loss=true",
            "model.pcb_start_unit=fraction",
            "model.pcb_start=0.5",
        ],
    ).model
    assert detectron2_cfg(frac, max_iter=1000).MODEL.PCB.START_ITER == 500
    with pytest.raises(PcbkitError, match="anchor_sizes"):
        detectron2_cfg(tiny_config("model.anchor_sizes=[16,32]"))


@needs_detectron2
def test_tiny_model_builds(backend: Any) -> None:
    from detectron2.modeling import GeneralizedRCNN

    from pcb_train.backends.detectron2.roi_heads import PCBROIHeads

    assert isinstance(backend, DetectorBackend)
    assert backend.name == "detectron2" and backend.num_classes == K
    assert isinstance(backend.model, GeneralizedRCNN)
    heads = backend.model.roi_heads
    assert isinstance(heads, PCBROIHeads) and heads.iterative_head is None and heads.confusion is None
    assert heads.box_predictor.cls_score.out_features == K + 1
    assert heads.box_predictor.bbox_pred.out_features == 4 * K
    assert heads.mask_head.predictor.out_channels == K
    assert backend.cfg.MODEL.WEIGHTS == "" and backend.cfg.is_frozen()
    # random init: BatchNorm (trained), nothing frozen
    assert all(p.requires_grad for p in backend.model.parameters())


@needs_detectron2
def test_ablation_switches() -> None:
    head_only = tiny_backend("model.iterative_head=true").model.roi_heads
    assert head_only.iterative_head is not None and head_only.iterative_head.n_iter == 3
    assert head_only.confusion is None
    loss_only = tiny_backend("model.pcb_loss=true").model.roi_heads
    assert loss_only.iterative_head is None and loss_only.confusion is not None
    assert loss_only.confusion.matrix.shape == (K, K) and loss_only.step_weights == (1.0,)


# --------------------------------------------------------------------------------------------
# class convention and records


@needs_detectron2
def test_background_is_the_last_column_on_a_real_model() -> None:
    """Make one column dominate through the classifier bias and compare with detectron2's own inference."""
    b = tiny_backend()
    images = make_images()
    targets = make_targets(images)
    cls = b.model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls.weight.zero_()
        cls.bias.zero_()
        cls.bias[1] = 20.0  # foreground class 1
    records = b.proposal_records(images, targets)
    assert all(r.logits.shape == (len(r), K + 1) for r in records)
    assert all(bool((r.logits.argmax(1) == 1).all()) for r in records)
    with torch.no_grad():
        own = b.model.eval()(b.detectron2_inputs(images))
    assert all(len(o["instances"]) > 0 and bool((o["instances"].pred_classes == 1).all()) for o in own)
    with torch.no_grad():
        cls.bias.zero_()
        cls.bias[K] = 20.0  # column K: detectron2 treats it as the background and keeps no detection
    records = b.proposal_records(images, targets)
    assert all(bool((r.logits.argmax(1) == K).all()) for r in records)
    with torch.no_grad():
        own = b.model.eval()(b.detectron2_inputs(images))
    # softmax of the foreground columns = e^0 / (K + e^20) ~ 2e-9 < score threshold 1e-4
    assert all(len(o["instances"]) == 0 for o in own)


@needs_detectron2
def test_records_on_hand_made_proposals(backend: Any) -> None:
    images = make_images()[:1]  # 48 x 80 -> input 58 x 96 (short side 64 would make the long side > 96)
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0], [40.0, 10.0, 70.0, 40.0]]),
        "labels": torch.tensor([2, 0]),
        "iscrowd": torch.tensor([False, True]),
        "image_id": torch.tensor(7),
    }
    proposals = torch.tensor(
        [
            [0.0, 0.0, 20.0, 20.0],  # == gt 0: label 2, IoU 1
            [0.0, 0.0, 20.0, 16.0],  # inter 320 / union 400 = 0.8: label 2
            [10.0, 0.0, 30.0, 20.0],  # inter 200 / union 600 = 1/3 < 0.5: background K
            [40.0, 10.0, 70.0, 40.0],  # == the crowd box: ignore, -1
            [75.0, 42.0, 79.0, 47.0],  # touches nothing: K, IoU 0
        ]
    )
    captured: list[Tensor] = []
    hook = backend.model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        (rec,) = backend.proposal_records(images, [target], proposals=[proposals], regressed="per_class")
    finally:
        hook.remove()
    assert rec.image_id == 7
    assert rec.labels.tolist() == [2, 2, K, -1, K]
    torch.testing.assert_close(rec.ious, torch.tensor([1.0, 0.8, 1.0 / 3.0, 1.0, 0.0]))
    torch.testing.assert_close(rec.boxes, proposals, atol=1e-4, rtol=0)  # back in original pixels
    assert rec.logits.shape == (5, K + 1) and torch.equal(rec.logits, captured[-1].float())
    assert rec.regressed is not None and rec.regressed.shape == (5, 4 * K)
    reg = rec.regressed.reshape(5, K, 4)
    assert bool((reg[..., 0::2] >= 0).all() and (reg[..., 0::2] <= 80).all() and (reg[..., 1::2] <= 48).all())


@needs_detectron2
def test_records_from_the_rpn(backend: Any) -> None:
    from pcb_train.backends import match_proposals

    images = make_images()
    targets = make_targets(images)
    backend.model.train()
    records = backend.proposal_records(images, targets, regressed="agnostic")
    assert backend.model.training  # the mode is restored
    backend.model.eval()
    for rec, im, t in zip(records, images, targets, strict=True):
        h, w = im.shape[-2:]
        assert 0 < len(rec) <= 50 and rec.logits.shape == (len(rec), K + 1)
        assert bool((rec.boxes[:, 2] <= w + 1e-3).all() and (rec.boxes[:, 3] <= h + 1e-3).all())
        labels, ious = match_proposals(rec.boxes, t["boxes"], t["labels"], K)
        assert torch.equal(rec.labels, labels) and torch.equal(rec.ious, ious)
        assert rec.regressed is not None and rec.regressed.shape == (len(rec), 4)
    assert [r.image_id for r in records] == [100, 101]


# --------------------------------------------------------------------------------------------
# inference


def _sharpen(q: Tensor) -> Tensor:
    """A test transform that moves scores across classes and keeps the background: p~ ∝ p^2."""
    fg = q[:, :K] ** 2
    fg = fg / fg.sum(dim=1, keepdim=True) * (1.0 - q[:, K:])
    return torch.cat([fg, q[:, K:]], dim=1)


@needs_detectron2
def test_identity_equals_detectron2_and_transforms_share_one_pass(backend: Any) -> None:
    images = make_images()
    calls: list[int] = []
    hook = backend.model.backbone.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        out = backend.infer(images, {"none": identity, "sharp": _sharpen})
    finally:
        hook.remove()
    assert len(calls) == 1 and set(out) == {"none", "sharp"}
    with torch.no_grad():
        own = backend.model.eval()(backend.detectron2_inputs(images))
    for det, ref, im in zip(out["none"], own, images, strict=True):
        inst = ref["instances"]
        assert 0 < len(inst) <= DETS
        assert torch.equal(det["boxes"], inst.pred_boxes.tensor)
        assert torch.equal(det["scores"], inst.scores)
        assert torch.equal(det["labels"], inst.pred_classes)
        assert det["masks"].shape == (len(inst), *im.shape[-2:]) and det["masks"].dtype == torch.bool
        # class-specific mask logits vs detectron2's all-class head: equal up to float rounding
        assert float((det["masks"] != inst.pred_masks).float().mean()) < 1e-3
    # the detectron2 path with the same transform plugged in gives the "sharp" detections
    backend.model.roi_heads.score_transform = _sharpen
    try:
        with torch.no_grad():
            own_sharp = backend.model.eval()(backend.detectron2_inputs(images))
    finally:
        backend.model.roi_heads.score_transform = None
    for det, ref in zip(out["sharp"], own_sharp, strict=True):
        inst = ref["instances"]
        assert torch.equal(det["boxes"], inst.pred_boxes.tensor) and torch.equal(det["scores"], inst.scores)
        assert float((det["masks"] != inst.pred_masks).float().mean()) < 1e-3
    assert not torch.equal(out["none"][0]["scores"], out["sharp"][0]["scores"])


@needs_detectron2
def test_infer_checks(backend: Any) -> None:
    images = make_images()[:1]
    with pytest.raises(ValueError, match="at least one score transform"):
        backend.infer(images, {})
    with pytest.raises(ValueError, match="returned"):
        backend.infer(images, {"bad": lambda q: q[:, :K]})
    (soft,) = backend.infer(images, {"none": identity}, mask_threshold=None)["none"]
    assert soft["masks"].dtype == torch.float32 and float(soft["masks"].max()) <= 1.0
    boxes_only = tiny_backend("model.mask_head=false")
    assert not boxes_only.model.roi_heads.mask_on
    (det,) = boxes_only.infer(images, {"none": identity})["none"]
    assert "masks" not in det and 0 < len(det["boxes"]) <= DETS


# --------------------------------------------------------------------------------------------
# training with detectron2's trainer


@needs_detectron2
def test_pcb_training_with_simple_trainer(trained_pcb: Any) -> None:
    logged = trained_pcb.logged
    assert len(logged) == 3
    for row in logged:
        for key in ("total_loss", "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"):
            assert torch.isfinite(torch.tensor(row[key])), (key, row)
    # start threshold: iteration 1; every class is in the first batch, so ready at once
    assert [row["pcb/active"] for row in logged] == [0.0, 1.0, 1.0]
    assert all("pcb/loss_cls_step2" in row for row in logged)
    heads = trained_pcb.model.roi_heads
    assert heads.last_cls_loss is not None and heads.last_cls_loss.alphas == (0.0, 0.2, 0.4)
    conf = heads.confusion
    assert bool((conf.counts > 0).all()) and conf.ready
    torch.testing.assert_close(conf.matrix.sum(dim=1), torch.ones(K, dtype=torch.float64))
    assert not torch.allclose(conf.matrix, torch.eye(K, dtype=torch.float64))


@pytest.mark.slow
@needs_detectron2
def test_default_trainer_trains_and_resumes_pcb(tmp_path: Path) -> None:
    """detectron2's DefaultTrainer end to end (files on disk, its data loader, its checkpoints),
    then a resumed trainer that continues with the saved PCB buffers."""
    import numpy as np
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.structures import BoxMode
    from PIL import Image

    from pcb_train.backends.detectron2 import detectron2_cfg

    images = make_images()
    dicts = []
    for i, (im, t) in enumerate(zip(images, make_targets(images), strict=True)):
        path = tmp_path / f"im{i}.png"
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
        anns = []
        for (x1, y1, x2, y2), label in zip(t["boxes"].tolist(), t["labels"].tolist(), strict=True):
            polygon = [x1, y1, x2, y1, x2, y2, x1, y2]
            anns.append(
                {
                    "bbox": [x1, y1, x2, y2],
                    "bbox_mode": BoxMode.XYXY_ABS,
                    "category_id": label,
                    "segmentation": [polygon],
                }
            )
        h, w = int(im.shape[1]), int(im.shape[2])
        dicts.append({"file_name": str(path), "image_id": i, "height": h, "width": w, "annotations": anns})
    name = f"pcbkit_tiny_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).thing_classes = [f"c{i}" for i in range(K)]
    try:
        cfg = detectron2_cfg(tiny_config(*PCB), max_iter=2)
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
        cfg.DATALOADER.NUM_WORKERS = 0
        cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, cfg.SOLVER.STEPS = 2, 0.01, ()
        cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD = 1, 100
        cfg.OUTPUT_DIR = str(tmp_path / "out")
        trainer = DefaultTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        conf = trainer.model.roi_heads.confusion
        assert conf.ready and (tmp_path / "out" / "model_final.pth").is_file()
        cfg.defrost()
        cfg.SOLVER.MAX_ITER = 3
        resumed = DefaultTrainer(cfg)
        resumed.resume_or_load(resume=True)  # detectron2's own loader (torch.load defaults) reads it
        assert resumed.start_iter == 2
        assert torch.equal(resumed.model.roi_heads.confusion.matrix, conf.matrix)
        assert torch.equal(resumed.model.roi_heads.confusion.counts, conf.counts)
        resumed.train()
        after = resumed.model.roi_heads.confusion.counts
        assert bool((after >= conf.counts).all()) and float(after.sum()) > float(conf.counts.sum())
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@needs_detectron2
def test_plain_heads_equal_standard_roi_heads() -> None:
    """PCB and the iterative head off: the same losses as detectron2's StandardROIHeads."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    b = tiny_backend()
    cfg = b.cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    stock = build_model(cfg)
    stock.load_state_dict(b.model.state_dict())
    images = make_images()
    targets = make_targets(images)
    losses = []
    for model in (b.model, stock):
        model.train()
        torch.manual_seed(3)
        inputs = b.detectron2_inputs(images, targets, train=True)
        with EventStorage(0):
            losses.append({k: float(v.detach()) for k, v in model(inputs).items()})
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        assert losses[0][key] == pytest.approx(losses[1][key], rel=1e-5, abs=1e-6), key


@needs_detectron2
def test_pcb_rejects_sigmoid_classifier() -> None:
    from detectron2.modeling import build_model

    b = tiny_backend()
    cfg = b.cfg.clone()
    cfg.defrost()
    cfg.MODEL.PCB.ENABLED = True
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
    with pytest.raises(ValueError, match="softmax"):
        build_model(cfg)


# --------------------------------------------------------------------------------------------
# checkpoints


def _states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_detectron2
def test_detectron2_checkpoint_round_trip_keeps_pcb_buffers(tmp_path: Path, trained_pcb: Any) -> None:
    from detectron2.checkpoint import DetectionCheckpointer

    state = trained_pcb.model.state_dict()
    assert "roi_heads.confusion.matrix" in state and "roi_heads.confusion.counts" in state
    assert not any(k.startswith("roi_heads.iterative_head.box_head.") for k in state)  # saved once
    assert any(k.startswith("roi_heads.iterative_head.mlp_cls.") for k in state)
    DetectionCheckpointer(trained_pcb.model, str(tmp_path)).save("model_pcb", iteration=3)
    fresh = tiny_backend(*PCB, seed=5)
    assert not _states_equal(fresh.model.state_dict(), state)
    info = fresh.load_checkpoint(tmp_path / "model_pcb.pth")
    assert info.extra["format"] == "detectron2" and info.extra["iteration"] == 3
    assert _states_equal(fresh.model.state_dict(), state)
    assert fresh.model.roi_heads.confusion.ready
    # the weights reach the shared iterative head too
    heads = fresh.model.roi_heads
    assert heads.iterative_head.box_head is heads.box_head
    # a resumed detectron2 checkpointer restores the buffers as well
    again = tiny_backend(*PCB, seed=6)
    DetectionCheckpointer(again.model).load(str(tmp_path / "model_pcb.pth"))
    torch.testing.assert_close(
        again.model.roi_heads.confusion.matrix, trained_pcb.model.roi_heads.confusion.matrix
    )


@needs_detectron2
def test_pcbkit_checkpoint_round_trip_and_mismatches(tmp_path: Path, trained_pcb: Any) -> None:
    path = tmp_path / "pcbkit.pth"
    save_checkpoint(
        path, make_checkpoint(trained_pcb.model.state_dict(), trained_pcb.config, categories=categories())
    )
    fresh = tiny_backend(*PCB, seed=7)
    info = fresh.load_checkpoint(path, categories())
    assert info.model_config == trained_pcb.config and info.categories == categories()
    assert _states_equal(fresh.model.state_dict(), trained_pcb.model.state_dict())
    images = make_images()
    a = trained_pcb.infer(images, {"none": identity})["none"]
    b = fresh.infer(images, {"none": identity})["none"]
    assert all(torch.equal(x["scores"], y["scores"]) for x, y in zip(a, b, strict=True))
    with pytest.raises(PcbkitError, match="K=3 classes, the config has K=4"):
        tiny_backend(*PCB, f"model.num_classes={K + 1}").load_checkpoint(path)
    with pytest.raises(PcbkitError, match="another model config"):
        tiny_backend().load_checkpoint(path)  # no iterative head
    with pytest.raises(PcbkitError, match="categories"):
        fresh.load_checkpoint(path, dataclasses.replace(categories(), names=("x", "y", "z")))
    with pytest.raises(PcbkitError, match="not found"):
        fresh.load_checkpoint(tmp_path / "missing.pth")


@needs_detectron2
def test_detectron2_checkpoint_needing_weights_only_false(
    tmp_path: Path, backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A detectron2 .pth that pickles a non-tensor object (here its CfgNode, as some projects do)."""
    path = tmp_path / "with_cfg.pth"
    torch.save({"model": backend.model.state_dict(), "cfg": backend.cfg, "iteration": 9}, path)
    with pytest.raises(Exception):  # noqa: B017 - torch's own error type for refused globals
        torch.load(path, weights_only=True)
    fresh = tiny_backend(seed=8)
    with caplog.at_level(logging.INFO, logger="pcb_train.backends.detectron2"):
        info = fresh.load_checkpoint(path)
    assert "weights_only=False" in caplog.text
    assert info.extra["iteration"] == 9
    assert _states_equal(fresh.model.state_dict(), backend.model.state_dict())


@needs_detectron2
def test_detectron2_model_zoo_pickle_and_class_count(tmp_path: Path, backend: Any) -> None:
    """A model-zoo style .pkl (numpy arrays, "__author__", FrozenBN: no BatchNorm step counters)
    loads; another class count is refused."""
    state = {
        k: v.numpy() for k, v in backend.model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "pcbkit test"}, f)
    fresh = tiny_backend(seed=9)
    fresh.load_checkpoint(path)
    ours = {k: v for k, v in fresh.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert _states_equal(ours, {k: torch.from_numpy(v) for k, v in state.items()})
    with pytest.raises(PcbkitError, match="K=3 classes, the model has K=4"):
        tiny_backend(f"model.num_classes={K + 1}").load_checkpoint(path)
    del state["roi_heads.box_head.fc1.weight"]  # a weight the model needs
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "pcbkit test"}, f)
    with pytest.raises(PcbkitError, match="1 missing key"):
        tiny_backend(seed=9).load_checkpoint(path)


@needs_detectron2
def test_local_weights_initialise_a_frozen_backbone(tmp_path: Path, backend: Any) -> None:
    """`model.weights`: detectron2's checkpointer, FrozenBN, the first stages frozen."""
    from detectron2.layers import FrozenBatchNorm2d

    path = tmp_path / "init.pkl"
    with open(path, "wb") as f:
        pickle.dump(
            {"model": {k: v.numpy() for k, v in backend.model.state_dict().items()}, "__author__": "t"}, f
        )
    b = tiny_backend(f"model.weights={path}", "model.trainable_backbone_layers=3", seed=11)
    bottom_up = b.model.backbone.bottom_up
    assert isinstance(bottom_up.stem.norm, FrozenBatchNorm2d)
    frozen = [n for n, p in bottom_up.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("stem.", "res2.")) for n in frozen)  # FREEZE_AT = 2
    assert all(p.requires_grad for p in bottom_up.res3.parameters())
    torch.testing.assert_close(
        b.model.roi_heads.box_predictor.cls_score.weight,
        backend.model.roi_heads.box_predictor.cls_score.weight,
    )


# --------------------------------------------------------------------------------------------
# loss families (model.cls_loss: seesaw | eqlv2, model.normalized_classifier; docs/losses.md)


def family_overrides(cls_loss: str, pcb: bool) -> list[str]:
    """The synthetic family configs' switches: Seesaw with the cosine classifier, EQLv2 without."""
    normed = "true" if cls_loss == "seesaw" else "false"
    return [f"model.cls_loss={cls_loss}", f"model.normalized_classifier={normed}", *(PCB if pcb else [])]


@needs_detectron2
@pytest.mark.parametrize("pcb", [False, True])
@pytest.mark.parametrize("cls_loss", ["seesaw", "eqlv2"])
def test_family_training_with_simple_trainer(cls_loss: str, pcb: bool) -> None:
    from pcb_train.loss_families import EQLv2Loss, SeesawLoss
    from pcb_train.normed_layers import NormedConv2d, NormedLinear

    b = tiny_backend(*family_overrides(cls_loss, pcb))
    heads = b.model.roi_heads
    cls = heads.box_predictor.cls_score
    assert cls.out_features == (K + 2 if cls_loss == "seesaw" else K + 1)
    assert isinstance(cls, NormedLinear) == (cls_loss == "seesaw")
    assert isinstance(heads.mask_head.predictor, NormedConv2d) == (cls_loss == "seesaw")
    assert isinstance(heads.family_loss, SeesawLoss if cls_loss == "seesaw" else EQLv2Loss)
    # the family's statistics are saved with the model
    keys = set(b.model.state_dict())
    stat = "family_loss.counts.counts" if cls_loss == "seesaw" else "family_loss.stats.pos_grad"
    assert f"roi_heads.{stat}" in keys
    logged = train_steps(b, 3)
    assert len(logged) == 3
    for row in logged:
        for key in ("total_loss", "loss_cls", "loss_box_reg", "loss_mask"):
            assert torch.isfinite(torch.tensor(row[key])), (key, row)
    if cls_loss == "seesaw":
        counts = heads.family_loss.counts.counts
        assert bool((counts[:K] > 0).all())  # every class is in every batch
    else:
        stats = heads.family_loss.stats
        assert int(stats.steps) > 0 and bool((stats.pos_grad > 0).all())
    if not pcb:
        assert heads.confusion is None
        assert heads.last_cls_loss is not None and heads.last_cls_loss.alphas == (0.0,)
        return
    assert [row["pcb/active"] for row in logged] == [0.0, 1.0, 1.0]
    assert heads.last_cls_loss is not None and heads.last_cls_loss.alphas == (0.0, 0.2, 0.4)
    conf = heads.confusion
    assert conf is not None and conf.ready
    rows = conf.matrix.sum(dim=1)
    if cls_loss == "seesaw":  # softmax of the K class logits, renormalised rows
        torch.testing.assert_close(rows, torch.ones(K, dtype=torch.float64))
    else:  # sigmoid scores, rows not renormalised
        assert not torch.allclose(rows, torch.ones(K, dtype=torch.float64))


def _hand_scores(cls_loss: str, raw: Tensor) -> Tensor:
    """The family's test-time scores [R, K+1] written out from the raw head outputs: Seesaw
    softmax(classes) x P(fg) and P(bg); EQLv2 s_j = sigmoid(z_j)(1 - sigmoid(z_K)), background 1 - S
    (scaled to sum 1 when S > 1)."""
    raw = raw.double()
    if cls_loss == "seesaw":
        obj = raw[:, K:].softmax(dim=1)
        return torch.cat([raw[:, :K].softmax(dim=1) * obj[:, :1], obj[:, 1:]], dim=1)
    s = raw[:, :K].sigmoid() * (1.0 - raw[:, K:].sigmoid())
    total = s.sum(dim=1, keepdim=True)
    return torch.cat([s / total.clamp_min(1.0), (1.0 - total).clamp_min(0.0)], dim=1)


@needs_detectron2
@pytest.mark.parametrize("cls_loss", ["seesaw", "eqlv2"])
def test_family_scores_are_the_test_time_formula(cls_loss: str) -> None:
    """Records hold [R, K+1] logits whose softmax is the family's own test-time scores, and the
    model's in-model detections equal `infer`'s (both go through `score_logits`)."""
    # score threshold 0: the young Seesaw model's scores are small, and the detections must exist
    b = tiny_backend(*family_overrides(cls_loss, True), "model.score_thresh=0.0", seed=3)
    train_steps(b, 2)
    images = make_images()
    targets = make_targets(images)
    captured: list[Tensor] = []
    hook = b.model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: captured.append(o[0]))
    try:
        records = b.proposal_records(images, targets)
    finally:
        hook.remove()
    raw = captured[-1]  # the iterative head runs the predictor once per step: the last step's outputs
    assert raw.shape[1] == (K + 2 if cls_loss == "seesaw" else K + 1)
    logits = torch.cat([r.logits for r in records])
    assert logits.shape == (raw.shape[0], K + 1)
    q = logits.double().softmax(dim=1)
    torch.testing.assert_close(q, _hand_scores(cls_loss, raw), atol=1e-6, rtol=1e-5)
    out = b.infer(images, {"none": identity})["none"]
    with torch.no_grad():
        own = b.model.eval()(b.detectron2_inputs(images))
    for det, ref in zip(out, own, strict=True):
        inst = ref["instances"]
        assert 0 < len(inst) <= DETS
        assert torch.equal(det["boxes"], inst.pred_boxes.tensor)
        assert torch.equal(det["scores"], inst.scores)
        assert torch.equal(det["labels"], inst.pred_classes)
        # class-specific (cosine, for Seesaw) mask logits vs detectron2's all-class head
        assert float((det["masks"] != inst.pred_masks).float().mean()) < 1e-3


@needs_detectron2
def test_family_checkpoint_round_trip(tmp_path: Path) -> None:
    """The family's statistics travel with the weights (pcbkit and detectron2 checkpoints); a
    checkpoint of another family does not load."""
    from detectron2.checkpoint import DetectionCheckpointer

    trained = tiny_backend(*family_overrides("seesaw", True))
    train_steps(trained, 2)
    state = trained.model.state_dict()
    path = tmp_path / "pcbkit.pth"
    save_checkpoint(path, make_checkpoint(state, trained.config, categories=categories()))
    fresh = tiny_backend(*family_overrides("seesaw", True), seed=11)
    assert not torch.equal(
        fresh.model.roi_heads.family_loss.counts.counts, trained.model.roi_heads.family_loss.counts.counts
    )
    fresh.load_checkpoint(path, categories())
    assert _states_equal(fresh.model.state_dict(), state)
    DetectionCheckpointer(trained.model, str(tmp_path)).save("model_seesaw")
    again = tiny_backend(*family_overrides("seesaw", True), seed=12)
    DetectionCheckpointer(again.model).load(str(tmp_path / "model_seesaw.pth"))
    assert _states_equal(again.model.state_dict(), state)
    with pytest.raises(PcbkitError):
        tiny_backend(*family_overrides("eqlv2", True)).load_checkpoint(path)
