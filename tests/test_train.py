"""Tests of the training loop: schedule, RNG state, a PCB smoke run, exact resume, CLI errors, DDP.

The training runs use the tiny torchvision Mask R-CNN on a tiny synthetic dataset (12 classes,
180 / 40 images of 64 px) on the CPU; one 20-iteration PCB run is shared by several tests.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcb_analysis.errors import PcbkitError
from pcb_train.backends import build_backend, read_checkpoint
from pcb_train.config import TrainConfig, load_config, to_dict
from pcb_train.data import LVISDetectionDataset
from pcb_train.schedule import Schedule, make_schedule
from pcb_train.train import (
    FINAL_METRICS,
    FINAL_MODEL,
    LAST_CHECKPOINT,
    METRICS_FILE,
    TrainResult,
    build_sampler,
    resolve_amp,
    train,
)
from pcb_train.train_state import config_differences, rng_state, set_rng_state

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "synth_tiny.yaml"
K = 12
ITERS = 20
PCB_FROM = 10
UNTIMED = {"time", "data_time", "eta_seconds", "wall"}


# --------------------------------------------------------------------------------------------
# schedule and small pieces


def test_lr_factor_hand_values() -> None:
    # warm-up 4 iterations from 0.001: factor(i) = 0.001 * (1 - i/4) + i/4; x0.1 from 6 and from 8
    s = Schedule(
        max_iter=10,
        iters_per_epoch=1.0,
        lr_steps=(6, 8),
        gamma=0.1,
        warmup_iters=4,
        warmup_factor=0.001,
        pcb_start_iter=None,
    )
    assert s.lr_factor(0) == pytest.approx(0.001)
    assert s.lr_factor(2) == pytest.approx(0.001 * 0.5 + 0.5)  # 0.5005
    assert s.lr_factor(4) == 1.0 and s.lr_factor(5) == 1.0
    assert s.lr_factor(6) == pytest.approx(0.1) and s.lr_factor(7) == pytest.approx(0.1)
    assert s.lr_factor(8) == pytest.approx(0.01)
    assert not s.pcb_started(9)


def test_make_schedule_units() -> None:
    # 100 images per epoch, 10 per batch -> 10 iterations per epoch; 24 epochs -> 240 iterations;
    # lr steps at epochs 16, 22 -> iterations 160, 220; PCB start_epoch 17 (1-based, MMDetection)
    # -> after 16 epochs = iteration 160, the first lr drop.
    cfg = load_config(
        None,
        [
            "solver.ims_per_batch=10",
            "model.pcb_loss=true",
            "model.pcb_start=17",
            "model.pcb_start_unit=epoch",
        ],
    )
    s = make_schedule(cfg.solver, cfg.model, 100.0)
    assert (s.max_iter, s.lr_steps, s.pcb_start_iter, s.iters_per_epoch) == (240, (160, 220), 160, 10.0)
    assert not s.pcb_started(159) and s.pcb_started(160)
    assert s.epoch(160) == 16.0
    # lr 0.02 at 16 images, linear scaling: 10 images -> 0.0125
    assert cfg.solver.lr == pytest.approx(0.0125)
    # fraction of max_iter: round(2/3 * 3000) = 2000 (16/24 of the run); iteration: as given
    frac = load_config(TINY_YAML, ["model.pcb_loss=true"])
    assert make_schedule(frac.solver, frac.model, 1500.0).pcb_start_iter == 2000
    it = load_config(
        None,
        [
            "solver.max_iter=50",
            "model.pcb_loss=true",
            "model.pcb_start=7",
            "model.pcb_start_unit=iteration",
            "solver.lr_steps=[30, 40]",
        ],
    )
    s = make_schedule(it.solver, it.model, 1.0)
    assert (s.max_iter, s.lr_steps, s.pcb_start_iter) == (50, (30, 40), 7)
    # without the PCB loss there is no start
    assert make_schedule(load_config(None).solver, load_config(None).model, 100.0).pcb_start_iter is None


def test_amp_is_off_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert resolve_amp("fp16", torch.device("cpu")) is None
    assert "needs CUDA" in caplog.text
    assert resolve_amp("none", torch.device("cpu")) is None


def test_rng_state_round_trip_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state(torch.device("cpu"))
    torch.save({"rng": state}, tmp_path / "s.pth")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    loaded = torch.load(tmp_path / "s.pth", weights_only=True)["rng"]
    set_rng_state(loaded, torch.device("cpu"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_config_differences_ignore_mutable_keys() -> None:
    a = load_config(TINY_YAML)
    b = load_config(TINY_YAML, ["log_period=3", "data.num_workers=0", "solver.base_lr=0.01"])
    assert config_differences(to_dict(a), b) == ["solver.base_lr: 0.02 != 0.01"]


@pytest.mark.parametrize("version,k", [("v1", 1203), ("v0.5", 1230)])
@pytest.mark.parametrize("variant", ["softmax", "rfs", "pcb", "rfs_pcb"])
def test_paper_recipes(version: str, k: int, variant: str) -> None:
    cfg = load_config(ROOT / "configs" / f"lvis_{version}_r50_fpn_{variant}_2x.yaml")
    m, d, s = cfg.model, cfg.data, cfg.solver
    assert cfg.name == f"lvis_{version}_r50_fpn_{variant}_2x" and m.num_classes == k
    assert (m.arch, m.roi_batch_size_per_image, m.roi_positive_fraction) == ("r50_fpn", 512, 0.25)
    assert d.train_min_sizes == tuple(range(640, 801, 32)) and d.flip_prob == 0.5
    assert (s.base_lr, s.ims_per_batch, s.momentum, s.weight_decay, s.warmup_iters) == (
        0.02,
        16,
        0.9,
        1e-4,
        500,
    )
    assert (s.epochs, s.max_iter, s.lr_steps, s.amp) == (24.0, None, (16.0, 22.0), "fp16")
    assert d.sampler == ("rfs" if "rfs" in variant else "random") and d.rfs_threshold == 1e-3
    pcb = "pcb" in variant
    assert m.pcb_loss == pcb and m.iterative_head == pcb
    if pcb:
        assert (m.pcb_alpha, m.pcb_momentum, m.pcb_start, m.pcb_start_unit) == (0.4, 0.99, 17.0, "epoch")
        assert (m.n_iter, m.step_weights) == (3, (0.2, 0.2, 0.6))
        # LVIS v1 train: 100,170 images -> 6,260.6 iterations per epoch at 16; PCB starts at the first drop
        sched = make_schedule(s, m, 100170.0)
        assert sched.pcb_start_iter == sched.lr_steps[0] == round(16 * 100170 / 16)
    assert str(version) in str(d.train_ann)


def test_synth_configs() -> None:
    soft = load_config(ROOT / "configs" / "synth_tiny_softmax.yaml")
    pcb = load_config(ROOT / "configs" / "synth_tiny_pcb.yaml")
    assert not (soft.model.pcb_loss or soft.model.iterative_head)
    assert pcb.model.pcb_loss and pcb.model.iterative_head and pcb.model.step_weights == (0.2, 0.2, 0.6)
    assert soft.solver == pcb.solver and soft.data == pcb.data  # only the method differs
    sched = make_schedule(pcb.solver, pcb.model, 1500.0)
    # PCB after 16 of 24 "epochs" (2/3 of the run), at the first learning-rate drop; second drop at 11/12
    assert sched.pcb_start_iter == sched.lr_steps[0] == round(2 / 3 * sched.max_iter)
    assert sched.lr_steps[1] == round(11 / 12 * sched.max_iter)


# --------------------------------------------------------------------------------------------
# training runs on a tiny synthetic dataset


@pytest.fixture(scope="module")
def synth12(synth_dataset: Path) -> Path:
    return synth_dataset  # the session's shared K = 12 dataset (conftest)


def tiny_overrides(data: Path, *extra: str) -> list[str]:
    return [
        f"model.num_classes={K}",
        "model.min_size=64",
        "model.max_size=64",
        "model.iterative_head=true",
        "model.pcb_loss=true",
        f"model.pcb_start={PCB_FROM}",
        "model.pcb_start_unit=iteration",
        f"data.train_ann={data / 'train.json'}",
        f"data.train_images={data / 'images'}",
        f"data.val_ann={data / 'val.json'}",
        f"data.val_images={data / 'images'}",
        "data.num_workers=0",
        "data.max_val_images=12",
        "solver.ims_per_batch=4",
        f"solver.max_iter={ITERS}",
        "solver.warmup_iters=5",
        "solver.lr_steps=[15]",
        "log_period=1",
        "checkpoint_period=1000",
        # a sampler seed whose first 10 batches hold every class of the shared synthetic dataset,
        # so that PCB's start condition (threshold AND every class seen) is met exactly at PCB_FROM
        "seed=2",
        *extra,
    ]


def tiny_cfg(data: Path, *extra: str) -> TrainConfig:
    return load_config(TINY_YAML, tiny_overrides(data, *extra))


def train_records(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in rows if r["type"] == "train"]


@pytest.fixture(scope="module")
def reference_run(synth12: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("runs") / "ref"
    return train(tiny_cfg(synth12), out, progress=False)


def test_rfs_sampler_from_the_annotations(synth12: Path) -> None:
    # repeat factors recomputed by hand from train.json: f(c) = images with c / N,
    # r(c) = max(1, sqrt(t / f(c))) with t = 0.1, image factor = max over its classes
    cfg = tiny_cfg(synth12, "data.sampler=rfs", "data.rfs_threshold=0.1")
    ds = LVISDetectionDataset(synth12 / "train.json", synth12 / "images", K, train=True, with_masks=False)
    sampler = build_sampler(cfg, ds)
    data = json.loads((synth12 / "train.json").read_text())
    cats_of: dict[int, set[int]] = {}
    for a in data["annotations"]:
        cats_of.setdefault(a["image_id"], set()).add(a["category_id"])
    n = len(cats_of)  # every synthetic training image has objects
    assert n == len(ds)
    images_with = {
        c: sum(c in cs for cs in cats_of.values()) for c in {c for cs in cats_of.values() for c in cs}
    }
    r = {c: max(1.0, math.sqrt(0.1 / (k / n))) for c, k in images_with.items()}
    expected = [max(r[c] for c in cats_of[e.image_id]) for e in ds.entries]
    np.testing.assert_allclose(sampler.repeat_factors, expected)
    assert sampler.nominal_epoch_length == pytest.approx(sum(expected))
    # the rarest class repeats most: 6 of 190 images gives sqrt(0.1 * 190 / 6) = 1.78
    assert min(images_with.values()) == 6 and len(ds) == 190
    assert max(expected) == pytest.approx(math.sqrt(0.1 * 190 / 6)) and max(expected) > 1.7


@pytest.mark.slow
def test_pcb_smoke_run(reference_run: TrainResult, synth12: Path) -> None:
    r = reference_run
    out = r.out_dir
    assert r.finished and r.iterations == ITERS
    for name in ("config.yaml", LAST_CHECKPOINT, FINAL_MODEL, METRICS_FILE, FINAL_METRICS):
        assert (out / name).is_file(), name
    if importlib.util.find_spec("tensorboard") is not None:
        assert list(out.glob("events.out.tfevents.*"))
    recs = train_records(out)
    assert [x["iteration"] for x in recs] == list(range(ITERS))
    for x in recs:
        for key in (
            "loss",
            "loss_classifier",
            "loss_box_reg",
            "loss_mask",
            "loss_objectness",
            "loss_rpn_box_reg",
            "loss_cls_step0",
            "loss_cls_step1",
            "loss_cls_step2",
            "lr",
        ):
            assert x[key] is not None and math.isfinite(x[key]), (x["iteration"], key)
        # PCB switches on at iteration 10 exactly when every class has been seen (§4.3)
        assert x["pcb_started"] == (x["iteration"] >= PCB_FROM)
        assert x["pcb_active"] == (x["pcb_started"] and x["cm_classes_seen"] == K)
    assert recs[PCB_FROM - 1]["pcb_active"] is False and recs[PCB_FROM]["pcb_active"] is True
    # warm-up then the step at 15: lr 0.02 * 4 / 16 = 0.005
    assert recs[5]["lr"] == pytest.approx(0.005) and recs[15]["lr"] == pytest.approx(0.0005)
    # the online matrix: every class seen, rows sum to 1, far from the identity
    m, n = r.confusion_matrix, r.confusion_counts
    assert m is not None and n is not None and bool((n > 0).all())
    torch.testing.assert_close(m.sum(1), torch.ones(K, dtype=m.dtype))
    assert not torch.allclose(m, torch.eye(K, dtype=m.dtype), atol=0.1)
    # final evaluation (segm + bbox) in metrics.jsonl and final_metrics.json
    final = json.loads((out / FINAL_METRICS).read_text())
    assert final["iteration"] == ITERS and set(final["segm"]) >= {"AP", "APr", "APc", "APf"}
    assert final["APb"] == final["bbox"]["AP"]
    evals = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert evals[-1]["type"] == "eval" and evals[-1]["iteration"] == ITERS - 1
    # the outputs load back: the config, and the model through the backend's strict loader
    cfg = load_config(out / "config.yaml")
    assert cfg == tiny_cfg(synth12)
    backend = build_backend(cfg.model)
    info = backend.load_checkpoint(out / FINAL_MODEL)
    assert info.model_config == cfg.model
    torch.testing.assert_close(read_checkpoint(out / FINAL_MODEL)["pcb"]["matrix"], m)


@pytest.mark.slow
def test_ctrl_c_then_resume_is_exact(reference_run: TrainResult, synth12: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(synth12)
    out = tmp_path / "run"

    def interrupt(record: dict[str, Any]) -> None:
        if record["type"] == "train" and record["iteration"] == 12:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False, on_log=interrupt)
    state = read_checkpoint(out / LAST_CHECKPOINT)["train_state"]
    assert state["iteration"] == 13  # the iteration in flight finished, then the checkpoint
    assert len(train_records(out)) == 13
    assert not (out / FINAL_MODEL).exists()
    # a resume from the checkpoint reproduces the uninterrupted run bit for bit
    resumed = train(cfg, out, resume=True, progress=False, evaluate_at_end=False)
    assert resumed.iterations == ITERS
    assert train_records(out) == train_records(reference_run.out_dir)
    assert torch.equal(resumed.confusion_matrix, reference_run.confusion_matrix)
    assert torch.equal(resumed.confusion_counts, reference_run.confusion_counts)
    a = read_checkpoint(out / FINAL_MODEL)["model"]
    b = read_checkpoint(reference_run.out_dir / FINAL_MODEL)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_run_folder_is_never_clobbered(reference_run: TrainResult, synth12: Path) -> None:
    out = reference_run.out_dir
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(PcbkitError, match="already holds a run"):
        train(tiny_cfg(synth12), out, progress=False)
    with pytest.raises(PcbkitError, match="another config.*solver.base_lr"):
        train(tiny_cfg(synth12, "solver.base_lr=0.01"), out, resume=True, progress=False)
    # a finished run resumes to "nothing to do" and keeps its outputs
    again = train(tiny_cfg(synth12), out, resume=True, progress=False)
    assert again.iterations == ITERS and again.metrics == json.loads((out / FINAL_METRICS).read_text())
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten


# --------------------------------------------------------------------------------------------
# the command line


def test_cli_unknown_key(
    synth12: Path, tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    out = tmp_path / "run"
    code, _, err = run_pcbkit(
        ["train", "--config", str(TINY_YAML), "--out", str(out), "model.fpn_chanels=32"]
    )
    assert code == 2
    assert "unknown key 'model.fpn_chanels'" in err and "did you mean model.fpn_channels" in err
    assert not out.exists()


def test_cli_class_count_disagrees(
    synth12: Path, tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    out = tmp_path / "run"
    args = tiny_overrides(synth12, "model.num_classes=13")
    code, _, err = run_pcbkit(["train", "--config", str(TINY_YAML), "--out", str(out), *args])
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("pcbkit: error")]
    assert len(line) == 1 and "K=12 classes, the model has K=13" in line[0] and "train.json" in line[0]
    assert not out.exists()


def test_cli_missing_images(
    synth12: Path, tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    data = json.loads((synth12 / "train.json").read_text())
    data["images"][3]["file_name"] = "train/not_there.png"
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "run"
    args = tiny_overrides(synth12, f"data.train_ann={ann}")
    code, _, err = run_pcbkit(["train", "--config", str(TINY_YAML), "--out", str(out), *args])
    assert code == 2 and "not_there.png: image file not found" in err
    assert not out.exists()


@pytest.mark.slow
def test_cli_resume_with_another_config(
    reference_run: TrainResult, synth12: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    out = reference_run.out_dir
    args = tiny_overrides(synth12, "model.pcb_alpha=0.2")
    code, _, err = run_pcbkit(["train", "--config", str(TINY_YAML), "--out", str(out), "--resume", *args])
    assert code == 2 and "another config" in err and "model.pcb_alpha: 0.4 != 0.2" in err
    code, _, err = run_pcbkit(["train", "--config", str(TINY_YAML), "--resume", "--force"])
    assert code == 2 and "exclude each other" in err


# --------------------------------------------------------------------------------------------
# two processes (gloo on the CPU)


def _ddp_worker(rank: int, init_file: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = tiny_cfg(
            Path(data),
            "solver.max_iter=4",
            "model.pcb_start=1",
            "data.max_val_images=4",
            "solver.ims_per_batch=2",
            "eval_period=2",
        )
        r = train(cfg, Path(out) / "run", progress=False)
        torch.save(
            {"matrix": r.confusion_matrix, "counts": r.confusion_counts, "metrics": r.metrics},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_run(synth12: Path, tmp_path: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover
        pytest.skip("file:// rendezvous on POSIX only")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(synth12), str(tmp_path)), nprocs=2)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # OnlineConfusion all-reduces its batch sums: identical buffers on both ranks
    assert torch.equal(r0["matrix"], r1["matrix"]) and torch.equal(r0["counts"], r1["counts"])
    assert bool(torch.isfinite(r0["matrix"]).all()) and float(r0["counts"].sum()) > 0
    seen = r0["counts"] > 0
    torch.testing.assert_close(r0["matrix"][seen].sum(1), torch.ones(int(seen.sum()), dtype=torch.float64))
    # rank 0 evaluated the union of both ranks' detections; rank 1 returns no metrics
    assert r0["metrics"] is not None and "segm" in r0["metrics"] and r1["metrics"] is None
    recs = train_records(tmp_path / "run")
    assert [x["iteration"] for x in recs] == [0, 1, 2, 3]
    assert all(math.isfinite(x["loss"]) for x in recs)
    # eval_period=2: an evaluation after iteration 2 and the final one
    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [x["iteration"] for x in rows if x["type"] == "eval"] == [1, 3]
