"""`pcbkit dump-logits` on a tiny random-init Mask R-CNN and the synthetic dataset.

dump -> `pcbkit stats` (matrix shape, rows sum to 1, positives counted independently with
pycocotools' box IoU), positives-only, resume after an interruption, bad input, and a 2-process
gloo run merged into one dump equal to a single-process dump.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps import DumpReader
from pcb_analysis.errors import PcbkitError
from pcb_analysis.stats import ClassStats
from pcb_train.backends import build_backend, make_checkpoint, save_checkpoint
from pcb_train.backends.torchvision import TorchvisionBackend
from pcb_train.config import load_config, save_config
from pcb_train.dump_logits import DumpLogitsConfig, dump_logits

ROOT = Path(__file__).resolve().parents[1]
K = 12
N_IMAGES = 6
TOP_N = 40  # RPN proposals per image at test time (keeps the tiny model fast)


# --------------------------------------------------------------------------------------------
# fixtures: a synthetic split and a tiny random-init checkpoint for it


def tiny_overrides(k: int = K) -> list[str]:
    return [
        f"model.num_classes={k}",
        "model.min_size=64",
        "model.max_size=64",
        f"model.rpn_post_nms_top_n_test={TOP_N}",
        "model.detections_per_image=50",
    ]


def write_model(
    folder: Path, categories: CategorySpace | None, k: int = K, seed: int = 0
) -> tuple[Path, Path]:
    """(config.yaml, checkpoint) of a random-init tiny model with K = k."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "configs" / "synth_tiny.yaml", tiny_overrides(k))
    save_config(cfg, folder / "config.yaml")
    torch.manual_seed(seed)
    backend = build_backend(cfg.model)
    save_checkpoint(
        folder / "model.pth",
        make_checkpoint(backend.model.state_dict(), backend.config, categories=categories),
    )
    return folder / "config.yaml", folder / "model.pth"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, synth_dataset: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dump_world")
    space = CategorySpace.from_lvis_json(synth_dataset / "val.json")
    config, ckpt = write_model(root / "model", space)
    return {
        "root": root,
        "gt": synth_dataset / "val.json",
        "images": synth_dataset / "images",
        "config": config,
        "checkpoint": ckpt,
    }


def dump_cfg(world: dict[str, Path], out: Path, **kw: Any) -> DumpLogitsConfig:
    base: dict[str, Any] = {
        "checkpoint": world["checkpoint"],
        "config": world["config"],
        "gt": world["gt"],
        "images": world["images"],
        "split": "val",
        "out": out,
        "max_images": N_IMAGES,
        "batch_size": 1,
        "device": "cpu",
        "progress": False,
    }
    base.update(kw)
    return DumpLogitsConfig(**base)


def cli_args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "dump-logits",
        "--checkpoint", str(world["checkpoint"]),
        "--config", str(world["config"]),
        "--gt", str(world["gt"]),
        "--images", str(world["images"]),
        "--split", "val",
        "--out", str(out),
        "--max-images", str(N_IMAGES),
        "--batch-size", "1",
        "--device", "cpu",
        "--workers", "0",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def rows_by_image(dump: Path) -> dict[int, dict[str, np.ndarray]]:
    """Every row of a dump grouped by image id, rows sorted by (box, label) for set comparison."""
    reader = DumpReader(dump)
    out: dict[int, list[dict[str, np.ndarray]]] = {}
    for chunk in reader.iter_chunks():
        for i in np.unique(chunk["image_ids"]).tolist():
            sel = chunk["image_ids"] == i
            out.setdefault(int(i), []).append({c: np.array(v[sel]) for c, v in chunk.items()})
    for i in reader.image_ids().tolist():
        out.setdefault(int(i), [])
    merged: dict[int, dict[str, np.ndarray]] = {}
    for i, parts in out.items():
        if not parts:
            merged[i] = {}
            continue
        cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        order = np.lexsort((cols["labels"], *cols["boxes"].T[::-1]))
        merged[i] = {c: v[order] for c, v in cols.items()}
    return merged


def assert_same_rows(a: dict[int, dict[str, np.ndarray]], b: dict[int, dict[str, np.ndarray]]) -> None:
    assert sorted(a) == sorted(b)
    for i in a:
        assert sorted(a[i]) == sorted(b[i]), i
        for c in a[i]:
            np.testing.assert_array_equal(a[i][c], b[i][c], err_msg=f"image {i} column {c}")


@pytest.fixture(scope="module")
def full_dump(world: dict[str, Path]) -> Path:
    out = world["root"] / "dump_full"
    dump_logits(dump_cfg(world, out))
    return out


# --------------------------------------------------------------------------------------------
# dump -> stats


def independent_positive_count(dump: Path, gt_file: Path) -> tuple[int, int]:
    """(proposals with IoU >= 0.5 to some ground-truth box, rows) from the dump's boxes and the
    ground-truth JSON, with pycocotools' box IoU (an implementation independent of pcbkit's)."""
    gt = json.loads(gt_file.read_text())
    boxes_of: dict[int, list[list[float]]] = {}
    for a in gt["annotations"]:
        boxes_of.setdefault(int(a["image_id"]), []).append([float(v) for v in a["bbox"]])
    reader = DumpReader(dump)
    positives = rows = 0
    for chunk in reader.iter_chunks(columns=("image_ids", "boxes")):
        for i in np.unique(chunk["image_ids"]).tolist():
            b = chunk["boxes"][chunk["image_ids"] == i].astype(np.float64)
            rows += len(b)
            g = boxes_of.get(int(i), [])
            if not g or not len(b):
                continue
            xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
            iou = mask_utils.iou(xywh.tolist(), g, [0] * len(g))  # [R, G]
            positives += int((np.asarray(iou).max(axis=1) >= 0.5 - 1e-6).sum())
    return positives, rows


def test_dump_then_stats_matrix_and_positive_count(
    world: dict[str, Path], tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    out = tmp_path / "dump"
    code, stdout, stderr = run_pcbkit(cli_args(world, out))
    assert code == 0, stderr
    assert f"dumped {N_IMAGES} image(s)" in stdout
    reader = DumpReader(out)
    assert reader.finished and reader.num_classes == K and reader.split == "val"
    assert reader.num_images == N_IMAGES and 0 < reader.num_rows <= N_IMAGES * TOP_N
    prov = reader.provenance
    assert len(prov["checkpoint_hash"]) == 16 and prov["config"]["model"]["num_classes"] == K
    assert prov["config"]["dump"] == {"positives_only": False, "boxes": "none"}
    assert prov["torch_version"] == torch.__version__ and "git_sha" in prov

    code, _, stderr = run_pcbkit(
        ["stats", "--dump", str(out), "--out", str(tmp_path / "s.npz"), "--no-progress"]
    )
    assert code == 0, stderr
    st = ClassStats.load(tmp_path / "s.npz")
    cm = st.confusion(warn=False)
    assert cm.shape == (K, K)
    torch.testing.assert_close(
        cm.sum(dim=1), torch.ones(K, dtype=torch.float64), rtol=0, atol=1e-6
    )  # float32 softmax rows
    positives, rows = independent_positive_count(out, world["gt"])
    assert rows == reader.num_rows
    assert positives > 0, "the random-init model should still propose some boxes on the objects"
    assert int(st.n.sum()) == positives
    assert st.rows == reader.num_rows and st.background == reader.num_rows - positives


def test_positives_only_keeps_exactly_the_positive_rows(
    world: dict[str, Path], full_dump: Path, tmp_path: Path
) -> None:
    out = tmp_path / "pos"
    s = dump_logits(dump_cfg(world, out, positives_only=True))
    full = rows_by_image(full_dump)
    pos = rows_by_image(out)
    assert sorted(pos) == sorted(full)  # every image listed, also those without positives
    n = 0
    for i, cols in full.items():
        keep = (cols["labels"] >= 0) & (cols["labels"] < K)
        n += int(keep.sum())
        if not keep.any():
            assert pos[i] == {}
            continue
        for c in cols:
            np.testing.assert_array_equal(pos[i][c], cols[c][keep])
    assert n > 0 and s.rows == s.positives == n == DumpReader(out).num_rows
    assert DumpReader(out).provenance["config"]["dump"]["positives_only"] is True


def test_regressed_boxes_are_stored(world: dict[str, Path], tmp_path: Path) -> None:
    dump_logits(dump_cfg(world, tmp_path / "pc", boxes="per_class", max_images=2))
    dump_logits(dump_cfg(world, tmp_path / "ag", boxes="agnostic", max_images=2))
    pc, ag = DumpReader(tmp_path / "pc"), DumpReader(tmp_path / "ag")
    assert pc.regressed == "per_class" and ag.regressed == "agnostic"
    a = next(iter(pc.iter_chunks()))
    b = next(iter(ag.iter_chunks()))
    assert a["regressed"].shape[1] == 4 * K and b["regressed"].shape[1] == 4
    # the agnostic box is the per-class box of the top-scoring foreground class
    top = a["logits"][:, :K].astype(np.float32).argmax(axis=1)
    per_class = a["regressed"].reshape(-1, K, 4)[np.arange(len(top)), top]
    np.testing.assert_allclose(per_class, b["regressed"], rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# resume


def test_resume_after_interruption_equals_uninterrupted(
    world: dict[str, Path], full_dump: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "resumed"
    cfg = dump_cfg(world, out, shard_rows=TOP_N)  # a shard closes after every image with >= TOP_N rows
    real = TorchvisionBackend.proposal_records
    calls = {"n": 0}

    def crash_on_fourth(self: TorchvisionBackend, *args: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what Ctrl-C raises
        return real(self, *args, **kw)

    monkeypatch.setattr(TorchvisionBackend, "proposal_records", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        dump_logits(cfg)
    monkeypatch.setattr(TorchvisionBackend, "proposal_records", real)
    with pytest.raises(PcbkitError, match="unfinished"):
        DumpReader(out)
    assert not list(out.glob("*.partial"))  # the open shard was dropped
    kept = DumpReader(out, allow_unfinished=True).num_images
    assert 1 <= kept <= 3
    s = dump_logits(cfg)
    assert s.images_skipped == kept and s.images_written == N_IMAGES - kept
    assert_same_rows(rows_by_image(out), rows_by_image(full_dump))
    # a third run has nothing left to do
    assert dump_logits(cfg).images_written == 0


def test_resume_refuses_another_checkpoint(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "d"
    dump_logits(dump_cfg(world, out, max_images=1))
    space = CategorySpace.from_lvis_json(world["gt"])
    _, other = write_model(tmp_path / "other", space, seed=7)
    with pytest.raises(PcbkitError, match="checkpoint_hash"):
        dump_logits(dump_cfg(world, out, max_images=2, checkpoint=other))


# --------------------------------------------------------------------------------------------
# ranks


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_worker(rank: int, world_size: int, port: int, cfg: DumpLogitsConfig) -> None:
    import os

    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    dump_logits(cfg)


@pytest.mark.slow
def test_two_process_gloo_dump_equals_single_process(
    world: dict[str, Path], full_dump: Path, tmp_path: Path
) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "ranks"
    cfg = dump_cfg(world, out, shard_rows=TOP_N)
    mp.spawn(_rank_worker, args=(2, _free_port(), cfg), nprocs=2, join=True)
    man = json.loads((out / "manifest.json").read_text())
    assert man["finished"] and man["world_size"] == 2
    assert {s["rank"] for s in man["shards"]} == {0, 1}
    ids = sorted(DumpReader(out).image_ids().tolist())
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert_same_rows(rows_by_image(out), rows_by_image(full_dump))


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written


def _copy_gt(world: dict[str, Path], tmp_path: Path, edit: Any) -> Path:
    data = json.loads(world["gt"].read_text())
    edit(data)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def bad_inputs(world: dict[str, Path], tmp_path: Path) -> Iterator[dict[str, list[str]]]:
    out = tmp_path / "out"
    space = CategorySpace.from_lvis_json(world["gt"])
    _, ckpt5 = write_model(tmp_path / "k5", None, k=5)
    # the config says K=12 (right for the ground truth), the checkpoint was trained for K=5
    ckpt_k5 = cli_args(world, out)
    ckpt_k5[ckpt_k5.index("--checkpoint") + 1] = str(ckpt5)
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    missing = cli_args(world, out)
    missing[missing.index("--images") + 1] = str(no_images)
    empty_gt = _copy_gt(world, tmp_path, lambda d: d.update(images=[], annotations=[]))
    empty = cli_args(world, out)
    empty[empty.index("--gt") + 1] = str(empty_gt)
    no_ckpt = cli_args(world, out)
    no_ckpt[no_ckpt.index("--checkpoint") + 1] = str(tmp_path / "missing.pth")
    assert space.num_classes == K
    yield {
        "checkpoint is for K=5 classes": ckpt_k5,
        "image file not found": missing,
        "empty split": empty,
        "checkpoint file not found": no_ckpt,
    }
    shutil.rmtree(out, ignore_errors=True)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    bad_inputs: dict[str, list[str]], tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    for expected, args in bad_inputs.items():
        code, _, err = run_pcbkit(args)
        assert code == 2, (expected, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("pcbkit: error:")]
        assert len(lines) == 1 and expected in lines[0], (expected, err)
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists(), expected


def test_cuda_requested_without_cuda_is_a_clear_error(world: dict[str, Path], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(PcbkitError, match="no CUDA device"):
        dump_logits(dump_cfg(world, tmp_path / "d", device="cuda"))
    assert not (tmp_path / "d").exists()


@pytest.mark.needs_cuda
def test_cuda_dump_matches_cpu(world: dict[str, Path], full_dump: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dump_logits(dump_cfg(world, tmp_path / "gpu", device="cuda"))
    a, b = rows_by_image(tmp_path / "gpu"), rows_by_image(full_dump)
    assert sorted(a) == sorted(b)
    for i in a:  # proposals may differ at the margin on another device: compare the counts
        assert abs(len(a[i].get("labels", [])) - len(b[i].get("labels", []))) <= 2


def test_config_is_frozen_and_validated(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = dump_cfg(world, tmp_path)
    with pytest.raises(PcbkitError, match="--batch-size"):
        replace(cfg, batch_size=0)
    with pytest.raises(PcbkitError, match="--boxes"):
        replace(cfg, boxes="per-class")
