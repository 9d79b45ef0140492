"""Seesaw / EQLv2 (+ PCB) in the torchvision backend: model layout, test-time mapping and smoke
training runs on the shared tiny synthetic data (docs/losses.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pcb_train.backends import build_backend
from pcb_train.backends.torchvision.model import build_model
from pcb_train.config import ModelConfig, load_config
from pcb_train.long_tail_losses import eqlv2_scores, seesaw_scores
from pcb_train.normed_layers import NormedConv2d, NormedLinear
from pcb_train.train import FINAL_MODEL, METRICS_FILE, train
from tests.test_train import PCB_FROM as TRAIN_PCB_FROM
from tests.test_train import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
K = 12
ITERS = 12
PCB_FROM = TRAIN_PCB_FROM  # seed 2: the first 10 batches hold every class of the shared synthetic data


def _tiny(cls_loss: str, **kw: object) -> ModelConfig:
    return ModelConfig(arch="tiny", num_classes=K, cls_loss=cls_loss, min_size=64, max_size=64, **kw)  # type: ignore[arg-type]


def _images(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(n)]


@pytest.mark.parametrize("cls_loss,width", [("ce", K + 1), ("seesaw", K + 2), ("eqlv2", K + 1)])
@pytest.mark.parametrize("normed", [False, True])
def test_classifier_width_and_normalised_layers(cls_loss: str, width: int, normed: bool) -> None:
    model = build_model(_tiny(cls_loss, normalized_classifier=normed, iterative_head=True))
    pred = model.roi_heads.box_predictor
    assert pred.cls_score.out_features == width and pred.bbox_pred.out_features == 4 * (K + 1)
    assert isinstance(pred.cls_score, NormedLinear) == normed
    assert isinstance(model.roi_heads.mask_predictor.mask_fcn_logits, NormedConv2d) == normed
    assert (model.roi_heads.family_loss is None) == (cls_loss == "ce")


def test_normed_linear_hand_values() -> None:
    layer = NormedLinear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
        layer.bias.zero_()
    # x = [1, 1] / sqrt 2; rows [0.6, 0.8] and [0, -1]: cosines 1.4 / sqrt 2 and -1 / sqrt 2, times 20
    out = layer(torch.tensor([[1.0, 1.0]]))
    torch.testing.assert_close(
        out, torch.tensor([[20 * 1.4 / math.sqrt(2), -20 / math.sqrt(2)]]), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("cls_loss", ["seesaw", "eqlv2"])
def test_mapped_scores_reproduce_the_models_test_time_scores(cls_loss: str) -> None:
    """dump / records logits in the [R, K+1] layout: their softmax is the family's own score formula
    (EQLv2: rows whose class scores sum to at most 1; the others scaled to sum 1), and the in-model
    detections use exactly those scores."""
    torch.manual_seed(0)
    backend = build_backend(_tiny(cls_loss, iterative_head=True, rpn_post_nms_top_n_test=20))
    heads = backend.model.roi_heads
    images = _images()
    backend.model.eval()
    with torch.no_grad():
        image_list, features, _ = backend._prepare(images)
        props, _ = backend.model.rpn(image_list, features)
        box = heads.box_predictions(features, props, image_list.image_sizes)
    raw = box.logits.float()
    official = seesaw_scores(raw) if cls_loss == "seesaw" else eqlv2_scores(raw)
    q = heads.class_probabilities(heads.score_logits(box.logits))
    if cls_loss == "seesaw":
        torch.testing.assert_close(q, official, rtol=1e-5, atol=1e-7)
    else:
        s = official[:, :K]
        under = s.sum(1) <= 1
        torch.testing.assert_close(q[under, :K], s[under], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(
            q[~under, :K], s[~under] / s[~under].sum(1, keepdim=True), rtol=1e-5, atol=1e-7
        )
    # records (what dump-logits stores) carry those logits; in-model detections score with them
    targets = [
        {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]),
            "labels": torch.tensor([1]),
            "image_id": torch.tensor(i),
        }
        for i in range(2)
    ]
    recs = backend.proposal_records(images, targets)
    z = torch.cat([r.logits for r in recs])
    torch.testing.assert_close(torch.softmax(z, 1), q, rtol=1e-5, atol=1e-7)
    dets = backend.infer(images, {"none": lambda p: p}, mask_threshold=None)["none"]
    with torch.no_grad():
        own = backend.model(images)
    for d, o in zip(dets, own, strict=True):
        assert d["scores"].numel() > 0
        torch.testing.assert_close(d["scores"], o["scores"])
        assert torch.equal(d["labels"], o["labels"])


# --------------------------------------------------------------------------------------------
# smoke training runs


def _overrides(data: Path, cls_loss: str, pcb: bool) -> list[str]:
    """test_train's tiny run (same data, seed 2, PCB from iteration 10), with the family's loss, a
    shorter schedule and fewer val images; later overrides win."""
    flag = "true" if pcb else "false"
    return tiny_overrides(
        data,
        f"model.cls_loss={cls_loss}",
        f"model.normalized_classifier={'true' if cls_loss == 'seesaw' else 'false'}",
        f"model.iterative_head={flag}",
        f"model.pcb_loss={flag}",
        "data.max_val_images=4",
        f"solver.max_iter={ITERS}",
        "solver.lr_steps=[11]",
    )


@pytest.mark.parametrize("cls_loss", ["seesaw", "eqlv2"])
@pytest.mark.parametrize("pcb", [False, True])
def test_smoke_training(synth_dataset: Path, tmp_path: Path, cls_loss: str, pcb: bool) -> None:
    name = f"synth_tiny_{cls_loss}{'_pcb' if pcb else ''}.yaml"
    cfg = load_config(ROOT / "configs" / name, _overrides(synth_dataset, cls_loss, pcb))
    assert cfg.model.cls_loss == cls_loss and cfg.model.pcb_loss == pcb
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.finished and result.iterations == ITERS
    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    recs = [r for r in rows if r["type"] == "train"]
    assert all(math.isfinite(r["loss_classifier"]) for r in recs)
    if pcb:
        assert recs[-1]["pcb_active"] is True and recs[PCB_FROM - 1]["pcb_active"] is False
        m = result.confusion_matrix
        assert m is not None
        if cls_loss == "seesaw":  # softmax rows renormalised; EQLv2 rows are unnormalised EMAs
            torch.testing.assert_close(m.sum(1), torch.ones(K, dtype=m.dtype))
        else:
            # an EMA from zero of sigmoid scores in [0, 1], at most 3 updates per iteration (mu 0.99)
            assert float(m.max()) <= 1 - 0.99 ** (3 * ITERS) and float(m.min()) > 0
            assert not torch.allclose(m.sum(1), torch.ones(K, dtype=m.dtype))
    # the family's statistics are in the saved model and it loads back strictly
    backend = build_backend(cfg.model)
    backend.load_checkpoint(result.out_dir / FINAL_MODEL)
    fam = backend.model.roi_heads.family_loss
    assert fam is not None
    if cls_loss == "seesaw":
        assert fam.counts.counts.sum() > 0
    else:
        assert int(fam.stats.steps) == ITERS * (3 if pcb else 1) and fam.stats.neg_grad.sum() > 0


# --------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("version,k", [("v1", 1203), ("v0.5", 1230)])
@pytest.mark.parametrize("family", ["seesaw", "eqlv2"])
@pytest.mark.parametrize("pcb", [False, True])
def test_lvis_family_configs_mirror_the_official_ones(version: str, k: int, family: str, pcb: bool) -> None:
    name = f"lvis_{version}_r50_fpn_{family}{'_pcb' if pcb else ''}_2x"
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    m, d, s = cfg.model, cfg.data, cfg.solver
    assert cfg.name == name and m.num_classes == k and m.cls_loss == family
    # official: Seesaw with RFS (sample1e-3) and the normalised classifier / mask; EQLv2 random sampler
    assert d.sampler == ("rfs" if family == "seesaw" else "random") and d.rfs_threshold == 1e-3
    assert m.normalized_classifier == (family == "seesaw")
    assert (s.epochs, s.lr_steps, s.amp, s.base_lr, s.ims_per_batch) == (24.0, (16.0, 22.0), "fp16", 0.02, 16)
    assert m.pcb_loss == pcb and m.iterative_head == pcb
    if pcb:
        assert m.pcb_alpha == (0.05 if family == "seesaw" else 0.2)
        assert (m.pcb_momentum, m.pcb_start, m.pcb_start_unit, m.n_iter) == (0.99, 17.0, "epoch", 3)


def test_synth_family_configs_differ_only_in_the_loss() -> None:
    base = {p: load_config(ROOT / "configs" / f"synth_tiny_{p}.yaml") for p in ("softmax", "pcb")}
    for family in ("seesaw", "eqlv2"):
        for pcb in (False, True):
            cfg = load_config(ROOT / "configs" / f"synth_tiny_{family}{'_pcb' if pcb else ''}.yaml")
            ref = base["pcb" if pcb else "softmax"]
            assert cfg.data == ref.data and cfg.solver == ref.solver
            assert cfg.model.cls_loss == family and cfg.model.pcb_loss == pcb
            assert cfg.model.normalized_classifier == (family == "seesaw")
            if pcb:
                assert cfg.model.pcb_alpha == (0.05 if family == "seesaw" else 0.2)
    # the default stays softmax cross-entropy with a plain classifier
    for cfg in base.values():
        assert cfg.model.cls_loss == "ce" and not cfg.model.normalized_classifier


# --------------------------------------------------------------------------------------------
# dump-logits -> stats -> calibrate on these models


@pytest.mark.slow
@pytest.mark.parametrize("cls_loss", ["seesaw", "eqlv2"])
def test_dump_stats_calibrate_offline_equals_in_model(
    cls_loss: str, synth_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dump of the mapped [R, K+1] logits replays the model's own detections (stat none and cm).

    Dumps store float16: the mapped logits are rounded to float16 in the model too, so storage is
    lossless and any difference left would be the pipeline's."""
    from pcb_analysis.categories import CategorySpace
    from pcb_analysis.stats import ClassStats
    from pcb_train.backends import make_checkpoint, save_checkpoint
    from pcb_train.backends.torchvision.roi_heads import PCBRoIHeads
    from pcb_train.calibrate import CalibrateConfig, calibrate_from_dump, calibrate_model
    from pcb_train.config import save_config
    from pcb_train.dump_logits import DumpLogitsConfig, dump_logits

    real = PCBRoIHeads.score_logits
    monkeypatch.setattr(PCBRoIHeads, "score_logits", lambda self, z: real(self, z).half().float())
    space = CategorySpace.from_lvis_json(synth_dataset / "val.json")
    cfg = load_config(
        ROOT / "configs" / "synth_tiny.yaml",
        [
            f"model.num_classes={K}",
            "model.min_size=64",
            "model.max_size=64",
            "model.rpn_post_nms_top_n_test=40",
            "model.detections_per_image=50",
            f"model.cls_loss={cls_loss}",
            f"model.normalized_classifier={'true' if cls_loss == 'seesaw' else 'false'}",
        ],
    )
    save_config(cfg, tmp_path / "config.yaml")
    torch.manual_seed(0)
    backend = build_backend(cfg.model)
    ckpt = tmp_path / "model.pth"
    save_checkpoint(ckpt, make_checkpoint(backend.model.state_dict(), backend.config, categories=space))
    common = {"gt": synth_dataset / "val.json", "progress": False}
    dump_dir = tmp_path / "dump"
    dump_logits(
        DumpLogitsConfig(
            checkpoint=ckpt,
            config=tmp_path / "config.yaml",
            images=synth_dataset / "images",
            split="val",
            out=dump_dir,
            max_images=3,
            batch_size=1,
            device="cpu",
            boxes="per_class",
            **common,
        )
    )
    stats = tmp_path / "stats.npz"
    ClassStats.from_dump(dump_dir, progress=False).save(stats)
    out = tmp_path / "res"
    in_model = calibrate_model(
        CalibrateConfig(
            stats=stats,
            out=out,
            checkpoint=ckpt,
            config=tmp_path / "config.yaml",
            images=synth_dataset / "images",
            max_images=3,
            batch_size=1,
            device="cpu",
            stat=("none", "cm"),
            **common,
        )
    )
    offline = calibrate_from_dump(
        CalibrateConfig(stats=stats, out=out, dump=dump_dir, stat=("none", "cm"), **common)
    )
    for a, b in zip(in_model.rows, offline.rows, strict=True):
        assert a["detections"] == b["detections"] > 0
        boxes_a = json.loads((out / a["results"]).read_text())
        boxes_b = json.loads((out / b["results"]).read_text())
        assert [(e["category_id"], e["bbox"], e["score"]) for e in boxes_a] == [
            (e["category_id"], e["bbox"], e["score"]) for e in boxes_b
        ], a["stat"]


def test_normed_mask_predictor_fast_path_equals_the_full_predictor() -> None:
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    from pcb_train.backends.torchvision.roi_heads import class_mask_logits

    torch.manual_seed(0)
    pred = MaskRCNNPredictor(8, 8, K + 1)
    pred.mask_fcn_logits = NormedConv2d(8, K + 1, 1)
    feats = torch.randn(5, 8, 4, 4)
    classes = torch.tensor([1, 3, 3, 12, 7])
    full = pred(feats)[torch.arange(5), classes]
    torch.testing.assert_close(class_mask_logits(pred, feats, classes), full, rtol=1e-5, atol=1e-5)
    # hand value of the cosine 1x1 conv: pixel [3, 4] (norm 5), filter [0, 2] (norm 2): 20 * 0.8 + bias
    conv = NormedConv2d(2, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 2.0]).view(1, 2, 1, 1))
        conv.bias.fill_(0.5)
    out = conv(torch.tensor([3.0, 4.0]).view(1, 2, 1, 1))
    torch.testing.assert_close(out.flatten(), torch.tensor([20 * 0.8 + 0.5]), rtol=1e-5, atol=1e-5)
