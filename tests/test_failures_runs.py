"""Issue 13, the run-folder half: one lock per output folder, stale temporaries, signals, loader
workers, the identity of a dump, and bounded chunks.

Each case of the audit is a test here, grouped by the shared mechanism that fixes it:
`pcb_analysis.folder_lock` (items 5, 6, 26), `pcb_train.stop` + `pcb_train.workers` (items 11, 13),
the dump's identity and resume checks in `pcb_analysis.dumps` / `pcb_train.dump_logits` (items 1,
2, 7, 24, 23) and `DumpReader.check_chunk_memory` (item 18).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils import signal_handling

from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps import DumpReader
from pcb_analysis.dumps.format import ColumnSpec
from pcb_analysis.dumps.writer import _ColumnFile
from pcb_analysis.errors import PcbkitError
from pcb_analysis.folder_lock import (
    LOCK_NAME,
    folder_lock,
    lock_name,
    remove_stale_temporaries,
    temporary_target,
)
from pcb_train.calibrate.results import open_row_results
from pcb_train.config import load_config, to_dict
from pcb_train.dump_logits import check_whole, dump_logits
from pcb_train.train import LAST_CHECKPOINT, METRICS_FILE, train
from pcb_train.train_state import (
    TRAIN_STATE_FORMAT,
    TRAIN_STATE_SCHEMA,
    check_resume_state,
    config_differences,
)
from pcb_train.workers import stop_signals_to_main, unwrap_worker_errors, worker_message
from tests.test_dump_logits import N_IMAGES, TOP_N, cli_args, dump_cfg, rows_by_image, write_model
from tests.test_train import TINY_YAML, tiny_cfg, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RunPcbkit = Callable[[list[str]], tuple[int, str, str]]


# --------------------------------------------------------------------------------------------
# helpers: a live process and a dead pid, a temporary left by a killed atomic write


@pytest.fixture()
def live_pid() -> Iterator[int]:
    """The pid of a process that runs for the whole test (another pcbkit run, as far as a lock knows)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, pid: int, host: str | None = None, name: str = LOCK_NAME) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    started = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())  # after `pid` started
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": started,
                                "command": "pcbkit train"}))
    return path


def stats_args(dump: Path, out: Path) -> list[str]:
    return ["stats", "--dump", str(dump), "--out", str(out), "--no-progress"]


def killed_atomic_write(target: Path, size: int = 1000) -> Path:
    """Start an atomic write of `target` (pcb_analysis.atomic) in a process that is SIGKILLed mid-way;
    returns the temporary it leaves behind (the real naming, whatever it is)."""
    code = (
        "import os, sys\n"
        "from pcb_analysis.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    open(tmp, 'wb').write(b'x' * int(sys.argv[2]))\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    before = set(target.parent.iterdir()) if target.parent.exists() else set()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code, str(target), str(size)], env=env, check=False)
    (left,) = set(target.parent.iterdir()) - before
    return left


# --------------------------------------------------------------------------------------------
# the lock (items 5, 6) and stale temporaries (item 26)


def test_lock_holds_pid_host_start_and_is_released_also_on_error(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    with folder_lock(folder, "pcbkit test") as info:
        data = json.loads((folder / LOCK_NAME).read_text())
        assert data["pid"] == os.getpid() == info.pid and data["host"] == socket.gethostname()
        assert data["command"] == "pcbkit test" and data["started"].endswith("+00:00")
        with pytest.raises(PcbkitError, match=f"is in use by pid {os.getpid()} on host"), \
                folder_lock(folder, "again"):
            pass
        (folder / "file").write_text("x")
    assert not (folder / LOCK_NAME).exists()
    with pytest.raises(RuntimeError), folder_lock(folder, "pcbkit test"):
        raise RuntimeError("boom")
    assert not (folder / LOCK_NAME).exists()
    # a folder the block created and left empty goes with the lock
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "fresh", "pcbkit test"):
        raise RuntimeError("boom")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("holder", ["live", "live, other host"])
def test_live_lock_is_refused_in_one_line(tmp_path: Path, live_pid: int, holder: str) -> None:
    other = "elsewhere.example" if "other host" in holder else None
    path = write_lock(tmp_path, live_pid if other is None else 1, other)
    with pytest.raises(PcbkitError) as err, folder_lock(tmp_path, "pcbkit train"):
        pass
    msg = str(err.value)
    host = other or socket.gethostname()
    pid = live_pid if other is None else 1
    assert msg.startswith(f"{tmp_path} is in use by pid {pid} on host {host} (since ") and "\n" not in msg
    assert ("delete" in msg) == (other is not None)  # another host's process cannot be checked
    assert path.is_file()  # the holder keeps its lock


def test_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid = dead_pid()
    write_lock(tmp_path, pid)
    (tmp_path / LOCK_NAME).with_name("x").write_text("")  # unrelated file stays
    with caplog.at_level(logging.WARNING), folder_lock(tmp_path, "pcbkit train") as info:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == info.pid == os.getpid()
    assert f"taking over the stale lock of pid {pid}" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists() and (tmp_path / "x").exists()
    assert lock_name(3) == ".pcbkit-r03.lock" and lock_name() == LOCK_NAME


def test_only_the_runs_own_stale_temporaries_are_removed(tmp_path: Path) -> None:
    ckpt_tmp = killed_atomic_write(tmp_path / LAST_CHECKPOINT, 10_000)
    other_tmp = killed_atomic_write(tmp_path / "notes.json")
    assert ckpt_tmp.name.startswith(f".{LAST_CHECKPOINT}.") and ckpt_tmp.stat().st_size == 10_000
    assert temporary_target(ckpt_tmp.name) == LAST_CHECKPOINT
    assert temporary_target(other_tmp.name) == "notes.json"
    assert temporary_target("last_checkpoint.pth") is None and temporary_target(".pcbkit.lock") is None
    (tmp_path / ".val-none.json.partial").write_text("x")  # what calibrate left before atomic writes
    (tmp_path / "keep.pth").write_text("x")
    removed = remove_stale_temporaries(tmp_path, (LAST_CHECKPOINT, "val-*.json"))
    assert sorted(p.name for p in removed) == sorted([ckpt_tmp.name, ".val-none.json.partial"])
    assert other_tmp.exists() and (tmp_path / "keep.pth").exists()


# --------------------------------------------------------------------------------------------
# train: the lock and the temporaries of its folder


def test_train_refuses_a_folder_in_use_and_leaves_it_alone(
    synth_dataset: Path, tmp_path: Path, live_pid: int, run_pcbkit: RunPcbkit
) -> None:
    out = tmp_path / "run"
    lock = write_lock(out, live_pid)
    (out / METRICS_FILE).write_text('{"type": "train", "iteration": 0}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["train", "--config", str(TINY_YAML), "--out", str(out), "--resume",
            *tiny_overrides(synth_dataset)]
    code, _, err = run_pcbkit(args)
    lines = [x for x in err.splitlines() if x.startswith("pcbkit: error")]
    assert code == 2 and len(lines) == 1 and f"is in use by pid {live_pid}" in lines[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and lock.is_file()


def test_train_takes_over_a_stale_lock_and_removes_its_stale_checkpoint_temporary(
    synth_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    left = killed_atomic_write(out / LAST_CHECKPOINT, 50_000)
    write_lock(out, dead_pid())
    cfg = tiny_cfg(synth_dataset, "solver.max_iter=1", "data.val_ann=null")
    with caplog.at_level(logging.INFO):
        result = train(cfg, out, progress=False, evaluate_at_end=False)
    assert result.iterations == 1
    assert "taking over the stale lock" in caplog.text
    assert not left.exists() and (out / LAST_CHECKPOINT).is_file()
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert not [p for p in out.iterdir() if temporary_target(p.name)]


def test_calibrate_output_folder_is_locked_and_cleaned(tmp_path: Path, live_pid: int) -> None:
    out = tmp_path / "cal"
    left = killed_atomic_write(out / "val-none.json", 5000)  # a calibration killed while writing
    other = killed_atomic_write(out / "notes.txt")
    with pytest.raises(KeyError), open_row_results(out, "val", [], fixed_ap=False):
        assert (out / LOCK_NAME).is_file() and not left.exists() and other.exists()
        raise KeyError("stop here")
    assert not (out / LOCK_NAME).exists()
    write_lock(out, live_pid)
    with pytest.raises(PcbkitError, match=f"is in use by pid {live_pid}"), \
            open_row_results(out, "val", [], fixed_ap=False):
        pass


def test_resume_with_another_config_names_the_keys_not_the_configs(tmp_path: Path) -> None:
    cfg = load_config(TINY_YAML)
    saved = to_dict(cfg)
    saved["model"]["pcb_alpha"] = 0.9
    saved["data"]["train_min_sizes"] = list(range(100, 1000, 8))  # a long value is shortened
    diffs = config_differences(saved, cfg)
    assert [d.split(":")[0] for d in diffs] == ["data.train_min_sizes", "model.pcb_alpha"]
    assert diffs[1] == f"model.pcb_alpha: 0.9 != {cfg.model.pcb_alpha!r}"
    assert diffs[0].endswith(f"... != {cfg.data.train_min_sizes!r}") and len(diffs[0]) < 140
    ckpt = {"train_state": {"format": TRAIN_STATE_FORMAT, "schema": TRAIN_STATE_SCHEMA, "config": saved}}
    with pytest.raises(PcbkitError) as err:
        check_resume_state(tmp_path / "last_checkpoint.pth", ckpt, cfg)
    msg = str(err.value)
    assert "model.pcb_alpha: 0.9" in msg and "\n" not in msg and len(msg) < 400, msg


# --------------------------------------------------------------------------------------------
# loader workers: signals ignored, errors re-raised as their one line (items 11, 13)


class _BadItem(Dataset[int]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        if i == 2:
            raise PcbkitError(f"images/{i}.png: cannot read image (truncated)")
        return i


@pytest.mark.parametrize("workers", [0, 1])
def test_worker_error_is_the_same_one_line(workers: int) -> None:
    loader = DataLoader(_BadItem(), batch_size=1, num_workers=workers, worker_init_fn=stop_signals_to_main())
    got = []
    with pytest.raises(PcbkitError) as err:
        for batch in unwrap_worker_errors(loader):
            got.append(int(batch[0]))
    assert got == [0, 1] and str(err.value) == "images/2.png: cannot read image (truncated)"


class _Slow(Dataset[int]):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> int:
        time.sleep(0.01)
        return i


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="needs sigwaitinfo (Linux)")
def test_workers_ignore_a_group_sigterm_but_not_the_main_processes() -> None:
    loader = DataLoader(_Slow(), batch_size=1, num_workers=1, worker_init_fn=stop_signals_to_main())
    it = iter(loader)
    next(it)
    (worker,) = it._workers  # type: ignore[attr-defined]
    for sig in ("TERM", "INT"):  # sent by another process, as a scheduler or a terminal does
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert _alive(worker.pid) and int(next(it)) >= 1
    # what torch's shutdown does to a worker that does not exit in time: unregister it (so that its
    # exit is not an error), then SIGTERM from the main process
    signal_handling._remove_worker_pids(id(it))
    it._worker_pids_set = False  # type: ignore[attr-defined]
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=10)
    assert not worker.is_alive() and worker.exitcode == 128 + signal.SIGTERM
    del it


def test_worker_message_leaves_other_errors_alone() -> None:
    assert worker_message(PcbkitError("a.json: field 'x': missing")) is None
    wrapped = PcbkitError(
        "Caught PcbkitError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\npcb_analysis.errors.PcbkitError: b.png: cannot read image\n'
    )
    assert worker_message(wrapped) == "b.png: cannot read image"


@pytest.fixture()
def broken_image_split(synth_dataset: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """(gt, images) where the second image (by id) of val.json is not an image file, and its name."""
    images = tmp_path / "images"
    shutil.copytree(synth_dataset / "images", images)
    data = json.loads((synth_dataset / "val.json").read_text())
    second = sorted(data["images"], key=lambda im: im["id"])[1]["file_name"]
    (images / second).write_bytes(b"not a png")
    return synth_dataset / "val.json", images, second


def test_dump_logits_bad_image_with_workers_is_one_line(
    world: dict[str, Path], broken_image_split: tuple[Path, Path, str], tmp_path: Path, run_pcbkit: RunPcbkit
) -> None:
    _, images, name = broken_image_split
    lines = {}
    for workers in ("0", "2"):
        args = cli_args(world, tmp_path / f"d{workers}")
        args[args.index("--images") + 1] = str(images)
        args[args.index("--workers") + 1] = workers
        code, _, err = run_pcbkit(args)
        assert code == 2 and "Traceback" not in err and "Caught" not in err and "worker" not in err, err
        (line,) = [x for x in err.splitlines() if x.startswith("pcbkit: error:")]
        lines[workers] = line
    assert lines["0"] == lines["2"] and name in lines["0"] and "cannot read image" in lines["0"]


def test_train_bad_image_with_workers_is_one_line(
    synth_dataset: Path, tmp_path: Path, run_pcbkit: RunPcbkit
) -> None:
    images = tmp_path / "images"
    shutil.copytree(synth_dataset / "images", images)
    for png in (images / "train").glob("*.png"):
        png.write_bytes(b"not a png")
    lines = {}
    for workers in ("0", "2"):
        out = tmp_path / f"run{workers}"
        args = ["train", "--config", str(TINY_YAML), "--out", str(out), "--no-progress",
                *tiny_overrides(synth_dataset, f"data.train_images={images}", f"data.num_workers={workers}",
                                "data.val_ann=null")]
        code, _, err = run_pcbkit(args)
        assert code == 2 and "Traceback" not in err and "Caught" not in err and "worker" not in err, err
        (line,) = [x for x in err.splitlines() if x.startswith("pcbkit: error:")]
        lines[workers] = line
        assert not (out / LOCK_NAME).exists()
    assert lines["0"] == lines["2"] and "cannot read image" in lines["0"]


# --------------------------------------------------------------------------------------------
# dump-logits: one writer, the dump's identity, resume checks (items 1, 2, 6, 7, 23, 24)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, synth_dataset: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("failures_world")
    space = CategorySpace.from_lvis_json(synth_dataset / "val.json")
    config, ckpt = write_model(root / "model", space)
    return {"root": root, "gt": synth_dataset / "val.json", "images": synth_dataset / "images",
            "config": config, "checkpoint": ckpt}


def test_second_dump_writer_gets_one_line_and_changes_nothing(
    world: dict[str, Path], tmp_path: Path, live_pid: int, run_pcbkit: RunPcbkit
) -> None:
    out = tmp_path / "d"
    lock = write_lock(out, live_pid)
    code, stdout, err = run_pcbkit(cli_args(world, out))
    (line,) = [x for x in err.splitlines() if x.startswith("pcbkit: error:")]
    assert code == 2 and f"{out} is in use by pid {live_pid}" in line and "wrote" not in stdout
    assert sorted(p.name for p in out.iterdir()) == [lock.name]


def test_dump_that_is_not_whole_is_an_error(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "d"
    dump_logits(dump_cfg(world, out, max_images=2))
    check_whole(out, 2)
    with pytest.raises(PcbkitError, match=r"not whole \(2 of 3 image\(s\)"):
        check_whole(out, 3)  # what the survivor of two writers would otherwise have called "wrote"


def _edited_gt(world: dict[str, Path], tmp_path: Path) -> Path:
    data = json.loads(world["gt"].read_text())
    ids = sorted(c["id"] for c in data["categories"])
    for a in data["annotations"]:  # same images and categories, other labels
        a["category_id"] = ids[(ids.index(a["category_id"]) + 1) % len(ids)]
    path = tmp_path / "other_gt.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("change", ["gt", "positives_only", "max_images"])
def test_resume_with_another_input_is_refused_and_changes_nothing(
    world: dict[str, Path], tmp_path: Path, change: str
) -> None:
    out = tmp_path / "d"
    dump_logits(dump_cfg(world, out, max_images=3))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    kw: dict[str, Any] = {
        "gt": {"gt": _edited_gt(world, tmp_path)},
        "positives_only": {"positives_only": True},
        "max_images": {"max_images": 2},
    }[change]
    with pytest.raises(PcbkitError) as err:
        dump_logits(dump_cfg(world, out, **{"max_images": 3, **kw}))
    msg = str(err.value)
    expected = {
        "gt": "provenance 'gt_hash' differs",
        "positives_only": "dump.positives_only: False -> True",  # the key, not two whole configs
        "max_images": "already holds 1 image(s) that this run would not dump",
    }[change]
    assert expected in msg and "\n" not in msg and len(msg) < 400, msg
    if change == "max_images":
        assert "max_images=3" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.fixture(scope="module")
def other_model_dump(world: dict[str, Path]) -> Path:
    space = CategorySpace.from_lvis_json(world["gt"])
    config, ckpt = write_model(world["root"] / "other", space, seed=7)
    out = world["root"] / "other_dump"
    dump_logits(dump_cfg(world, out, checkpoint=ckpt, config=config, shard_rows=TOP_N))
    return out


def test_foreign_shard_is_refused_on_resume(
    world: dict[str, Path], other_model_dump: Path, tmp_path: Path
) -> None:
    out = tmp_path / "d"
    cfg = dump_cfg(world, out, shard_rows=TOP_N, max_images=2)
    dump_logits(cfg)
    foreign = sorted(other_model_dump.glob("shard-r00-*"))[-1]
    shutil.copytree(foreign, out / "shard-r00-00090")
    with pytest.raises(PcbkitError, match=r"shard-r00-00090: cannot resume: shard written by another run "
                                          r"\(checkpoint_hash"):
        dump_logits(dump_cfg(world, out, shard_rows=TOP_N))


@pytest.mark.parametrize("how", ["listed in the manifest", "copied over a shard"])
def test_stats_refuses_a_foreign_shard(
    world: dict[str, Path], other_model_dump: Path, tmp_path: Path, how: str, run_pcbkit: RunPcbkit
) -> None:
    out = tmp_path / "d"
    dump_logits(dump_cfg(world, out, shard_rows=TOP_N))
    man = json.loads((out / "manifest.json").read_text())
    other = json.loads((other_model_dump / "manifest.json").read_text())
    entry = other["shards"][0]
    if how == "listed in the manifest":  # a shard adopted under a new name, totals edited to match
        shutil.copytree(other_model_dump / entry["name"], out / "shard-r00-00090")
        man["shards"].append({**entry, "name": "shard-r00-00090", "identity": man["identity"]})
        man["num_rows"] += entry["rows"]
        man["num_images"] += entry["images"]
    else:  # the files and the manifest entry of another model's shard under an existing name
        name = man["shards"][0]["name"]
        shutil.rmtree(out / name)
        shutil.copytree(other_model_dump / entry["name"], out / name)
        man["num_rows"] += entry["rows"] - man["shards"][0]["rows"]
        man["shards"][0] = {**entry, "name": name}
    (out / "manifest.json").write_text(json.dumps(man))
    code, _, err = run_pcbkit(stats_args(out, tmp_path / "s.npz"))
    (line,) = [x for x in err.splitlines() if x.startswith("pcbkit: error:")]
    assert code == 2 and "does not belong to this dump" in line and "checkpoint_hash" in line, err
    assert not (tmp_path / "s.npz").exists()


def test_damaged_shard_is_rewritten_on_resume(
    world: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, run_pcbkit: RunPcbkit
) -> None:
    out = tmp_path / "d"
    args = [*cli_args(world, out), "--shard-rows", str(TOP_N)]
    assert run_pcbkit(args)[0] == 0
    clean = rows_by_image(out)
    shard = sorted(out.glob("shard-r00-*"))[1]
    logits = shard / "logits.npy"
    data = bytearray(logits.read_bytes())
    data[-1] ^= 0xFF  # same size: only the CRC-32 can tell
    logits.write_bytes(bytes(data))
    code, _, err = run_pcbkit(stats_args(out, tmp_path / "s.npz"))
    assert code == 2 and "CRC-32" in err
    with caplog.at_level(logging.WARNING):
        code, stdout, err = run_pcbkit(args)
    assert code == 0 and "fails the CRC-32 of column 'logits'" in caplog.text and f"wrote {out}" in stdout
    assert "already dumped" in caplog.text or "dumped" in stdout
    rows = rows_by_image(out)  # every shard read back with its CRC checked
    assert sorted(rows) == sorted(clean)
    for i in rows:
        for c in rows[i]:
            np.testing.assert_array_equal(rows[i][c], clean[i][c])
    assert run_pcbkit(stats_args(out, tmp_path / "s.npz"))[0] == 0
    assert DumpReader(out).num_images == N_IMAGES


# --------------------------------------------------------------------------------------------
# stats: chunks bounded by memory (item 18)


def test_stats_chunk_rows_bounded_by_memory(
    world: dict[str, Path], tmp_path: Path, run_pcbkit: RunPcbkit, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "d"
    dump_logits(dump_cfg(world, out, shard_rows=TOP_N))
    reader = DumpReader(out)
    biggest = max(s.rows for s in reader.shards)
    # a chunk never spans two shards: 200,000,000 rows allocate the largest shard's rows, no more
    assert reader.chunk_rows(200_000_000) == biggest
    stats = ["stats", "--dump", str(out), "--out", str(tmp_path / "s.npz"), "--no-progress"]
    code, _, err = run_pcbkit([*stats, "--chunk-rows", "200000000"])
    assert code == 0, err
    # when even that does not fit: refused before anything is allocated, with a size that fits
    k1 = reader.num_classes + 1
    per_row = (8 + 2 * k1 + 4) * 4 + 8 * k1  # 4 buffers of image_ids, logits, labels + float32 work
    with pytest.raises(PcbkitError) as err_info:
        reader.check_chunk_memory(200_000_000, ("image_ids", "logits", "labels"), 8 * k1,
                                  available=biggest * per_row)
    fit = biggest * per_row // 2 // per_row
    assert f"use --chunk-rows {fit:,} or less" in str(err_info.value)
    assert reader.check_chunk_memory(fit, ("image_ids", "logits", "labels"), 8 * k1,
                                     available=biggest * per_row) == fit
    monkeypatch.setattr("pcb_analysis.dumps.reader.available_memory", lambda: 4096)
    stats[stats.index("--out") + 1] = str(tmp_path / "refused.npz")
    code, _, err = run_pcbkit([*stats, "--chunk-rows", "200000000"])
    (line,) = [x for x in err.splitlines() if x.startswith("pcbkit: error:")]
    assert code == 2 and "--chunk-rows 200,000,000" in line and "GiB of memory available" in line
    assert not (tmp_path / "refused.npz").exists()


# --------------------------------------------------------------------------------------------
# signals with loader workers (item 11) and a second run on a live folder (item 5), for real


def _wait_for_records(path: Path, n: int, proc: subprocess.Popen[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()[1][-3000:]}")
        if path.is_file() and sum(1 for _ in path.open()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("no training records in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_saves_a_checkpoint_with_workers(
    synth_dataset: Path, tmp_path: Path, sig: signal.Signals, run_pcbkit: RunPcbkit
) -> None:
    out = tmp_path / "run"
    args = ["train", "--config", str(TINY_YAML), "--out", str(out), "--no-progress",
            *tiny_overrides(synth_dataset, "data.num_workers=2", "solver.max_iter=2000", "data.val_ann=null")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pcbkit", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _wait_for_records(out / METRICS_FILE, 2, proc, timeout=120)
        if sig == signal.SIGTERM:  # item 5: a second run on the live folder is refused in one line
            code, _, err = run_pcbkit([*args, "--resume"])
            assert code == 2 and f"{out} is in use by pid {proc.pid}" in err, err
        os.killpg(proc.pid, sig)  # what a scheduler (SIGTERM) or Ctrl-C (SIGINT) does
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    ckpt = torch.load(out / LAST_CHECKPOINT, weights_only=True)
    done = ckpt["train_state"]["iteration"]
    assert last == (f"pcbkit: stopped by {sig.name} at iteration {done} of 2000; checkpoint "
                    f"{out / LAST_CHECKPOINT} (continue with --resume)")
    records = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    assert done >= 2 and [r["iteration"] for r in records] == list(range(done))
    assert not (out / LOCK_NAME).exists()


class _FullDisk:
    """A file object whose writes fail as on a full disk."""

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_dump_shard_write_on_a_full_disk_names_the_file(tmp_path: Path) -> None:
    """Issue 13 item 12: a full disk while a shard streams a column gives `<file>: no space left on
    device` (not an unnamed OSError); aborting the shard does not raise a second error."""
    col = _ColumnFile(tmp_path, ColumnSpec("logits", "<f2", (3,)))
    col._f.close()
    col._f = _FullDisk()  # type: ignore[assignment]
    with pytest.raises(PcbkitError, match=r"logits\.npy: no space left on device"):
        col.append(np.zeros((2, 3), dtype=np.float16))
    col.abort()
