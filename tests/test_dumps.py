"""Dump writer/reader: round trip, bounded streaming, resume, corruption, validation, merge, stats."""

from __future__ import annotations

import json
import math
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps import (
    MANIFEST_NAME,
    DumpReader,
    DumpWriter,
    merge_manifests,
)
from pcb_analysis.errors import PcbkitError
from pcb_analysis.stats import ClassStats
from pcbkit.cmd_stats import stats_cmd

K = 5


def make_space(k: int = K, tag: str = "c") -> CategorySpace:
    freqs = ("r", "c", "f")
    return CategorySpace(
        ids=tuple(range(1, k + 1)),
        names=tuple(f"{tag}{i}" for i in range(k)),
        frequency=tuple(freqs[i % 3] for i in range(k)),
        image_count=tuple(5 + 40 * i for i in range(k)),
    )


def make_images(n_images: int, k: int = K, seed: int = 0, max_rows: int = 6) -> list[dict]:
    """Random per-image records; some images have 0 rows; labels mix -1, positives and background."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n_images):
        r = int(rng.integers(0, max_rows + 1))
        images.append(
            {
                "image_id": 1000 + 7 * i,
                "boxes": rng.uniform(0, 600, (r, 4)).astype(np.float32),
                "logits": (rng.normal(size=(r, k + 1)) * 3).astype(np.float32),
                "labels": rng.integers(-1, k + 1, r),
                "ious": rng.uniform(0, 1, r).astype(np.float32),
            }
        )
    return images


def write_dump(path: Path, images: list[dict], space: CategorySpace | None = None, **kw) -> None:
    kw.setdefault("shard_rows", 8)
    provenance = {"checkpoint_hash": "ck1", "git_sha": "abc"}
    with DumpWriter(path, space or make_space(), "val", provenance, **kw) as w:
        for im in images:
            w.add_image(**im)


def read_all(path: Path, **kw) -> dict[str, np.ndarray]:
    reader = DumpReader(path, **kw)
    parts: dict[str, list[np.ndarray]] = {}
    for chunk in reader.iter_chunks(rows=5):
        for c, a in chunk.items():
            parts.setdefault(c, []).append(np.array(a))
    return {c: np.concatenate(v) for c, v in parts.items()}


def concat(images: list[dict], key: str) -> np.ndarray:
    return np.concatenate([im[key] for im in images])


def rows_image_ids(images: list[dict]) -> np.ndarray:
    return np.concatenate([np.full(len(im["labels"]), im["image_id"]) for im in images])


# ---------------------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    images = make_images(12)
    write_dump(tmp_path / "d", images)
    got = read_all(tmp_path / "d")
    # float16 storage: relative error <= 2^-11 (half an ulp), |z| < 16 here so abs error < 2^-7.
    np.testing.assert_allclose(got["logits"], concat(images, "logits"), rtol=2**-11, atol=0)
    assert got["logits"].dtype == np.float16
    np.testing.assert_array_equal(got["labels"], concat(images, "labels"))
    np.testing.assert_array_equal(got["boxes"], concat(images, "boxes"))
    np.testing.assert_array_equal(got["ious"], concat(images, "ious"))
    np.testing.assert_array_equal(got["image_ids"], rows_image_ids(images))
    reader = DumpReader(tmp_path / "d")
    assert reader.num_rows == sum(len(im["labels"]) for im in images)
    assert reader.num_images == 12  # images with 0 rows count too
    assert reader.image_ids().tolist() == [im["image_id"] for im in images]
    man = reader.manifest
    assert man["num_classes"] == K and man["background_index"] == K
    assert man["category_hash"] == make_space().hash and reader.categories == make_space()
    assert man["provenance"] == {"checkpoint_hash": "ck1", "git_sha": "abc"}
    assert man["split"] == "val" and man["finished"] is True and man["schema_version"] == 1
    # each column is a plain .npy that numpy opens on its own
    first = reader.shards[0]
    z = np.load(tmp_path / "d" / first.name / "logits.npy", mmap_mode="r")
    assert z.shape == (first.rows, K + 1) and z.dtype == np.float16


def test_regressed_boxes_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for kind, width in (("agnostic", 4), ("per_class", 4 * K)):
        images = make_images(4, seed=4)
        for im in images:
            im["regressed"] = rng.uniform(0, 100, (len(im["labels"]), width)).astype(np.float32)
        write_dump(tmp_path / kind, images, regressed=kind)
        got = read_all(tmp_path / kind)
        np.testing.assert_array_equal(got["regressed"], concat(images, "regressed"))
        assert DumpReader(tmp_path / kind).manifest["regressed"] == kind
    with pytest.raises(PcbkitError, match="regressed must be"):
        write_dump(
            tmp_path / "bad",
            [{**make_images(1, seed=1)[0], "regressed": np.zeros((6, 3))}],
            regressed="agnostic",
        )


def test_torch_inputs_and_as_torch(tmp_path: Path) -> None:
    images = make_images(3, seed=5)
    as_t = [
        {k: (torch.from_numpy(np.asarray(v)) if k != "image_id" else v) for k, v in im.items()}
        for im in images
    ]
    write_dump(tmp_path / "d", as_t)
    chunks = list(DumpReader(tmp_path / "d").iter_chunks(as_torch=True))
    assert all(isinstance(c["logits"], torch.Tensor) and c["logits"].dtype == torch.float16 for c in chunks)
    assert sum(len(c["labels"]) for c in chunks) == sum(len(im["labels"]) for im in images)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_streaming_chunks_are_bounded(tmp_path: Path, prefetch: int) -> None:
    k = 40
    images = make_images(300, k=k, seed=1, max_rows=20)
    write_dump(tmp_path / "d", images, space=make_space(k), shard_rows=700)
    reader = DumpReader(tmp_path / "d")
    total = reader.num_rows
    assert total > 2500 and len(reader.shards) > 3
    sizes, spans, bases = [], set(), set()
    seen = 0
    for chunk in reader.iter_chunks(rows=64, reuse_buffers=True, prefetch=prefetch):
        n = len(chunk["labels"])
        assert 1 <= n <= 64
        assert all(len(a) == n for a in chunk.values())
        # within one shard
        assert chunk.start + n <= next(s.rows for s in reader.shards if s.name == chunk.shard)
        spans.add(chunk.shard)
        bases.add(chunk["logits"].__array_interface__["data"][0])
        sizes.append(n)
        seen += n
    assert seen == total and len(spans) == len(reader.shards)
    assert len(bases) == prefetch + (1 if prefetch == 0 else 2)  # a fixed pool of buffers for the whole dump

    # Peak Python/numpy allocation while streaming is one chunk, not the dump (~ total*(k+1)*2 bytes).
    dump_bytes = total * (k + 1) * 2
    tracemalloc.start()
    for _ in reader.iter_chunks(rows=64, columns=("logits", "labels"), reuse_buffers=True, prefetch=prefetch):
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200_000 < dump_bytes, (peak, dump_bytes)


def test_prefetch_matches_inline_and_stops_early(tmp_path: Path) -> None:
    write_dump(tmp_path / "d", make_images(40, seed=21), shard_rows=9)
    reader = DumpReader(tmp_path / "d")
    inline = [
        (c.shard, c.start, {k: np.array(v) for k, v in c.items()})
        for c in reader.iter_chunks(rows=4, prefetch=0)
    ]
    ahead = [
        (c.shard, c.start, {k: np.array(v) for k, v in c.items()})
        for c in reader.iter_chunks(rows=4, prefetch=3)
    ]
    assert [(a, b) for a, b, _ in inline] == [(a, b) for a, b, _ in ahead]
    for (_, _, x), (_, _, y) in zip(inline, ahead, strict=True):
        for c in x:
            np.testing.assert_array_equal(x[c], y[c])
    def readers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "pcbkit-dump-reader"]

    it = reader.iter_chunks(rows=2, reuse_buffers=True, prefetch=1)
    next(it)
    assert len(readers()) == 1
    it.close()  # consumer leaves early: the reader thread ends
    assert readers() == []


def test_columns_subset_reads_only_those(tmp_path: Path) -> None:
    write_dump(tmp_path / "d", make_images(5))
    reader = DumpReader(tmp_path / "d")
    for chunk in reader.iter_chunks(columns=("labels",)):
        assert set(chunk) == {"labels"}
    with pytest.raises(PcbkitError, match="unknown column"):
        next(reader.iter_chunks(columns=("scores",)))


def test_interrupted_writer_leaves_only_complete_shards_and_resumes(tmp_path: Path) -> None:
    images = make_images(20, seed=2)
    out = tmp_path / "d"
    with (
        pytest.raises(RuntimeError, match="boom"),
        DumpWriter(out, make_space(), "val", {}, shard_rows=8) as w,
    ):
        for i, im in enumerate(images):
            if i == 13:
                raise RuntimeError("boom")
            w.add_image(**im)
    assert not list(out.glob("*.partial"))
    with pytest.raises(PcbkitError, match="unfinished"):
        DumpReader(out)
    partial = DumpReader(out, allow_unfinished=True)
    done = set(partial.image_ids().tolist())
    assert done and done < {im["image_id"] for im in images[:13]}  # complete shards only, a strict prefix
    kept = [im for im in images if im["image_id"] in done]
    assert partial.num_rows == sum(len(im["labels"]) for im in kept)

    # A writer killed without cleanup (no abort): its open shard stays as *.partial and is ignored.
    w2 = DumpWriter(out, make_space(), "val", {}, shard_rows=8)
    assert w2.done_image_ids == done
    todo = [im for im in images if im["image_id"] not in done]
    w2.add_image(**todo[0])
    del w2
    assert list(out.glob("*.partial"))
    assert set(DumpReader(out, allow_unfinished=True).image_ids().tolist()) == done

    # Rerun: the partial shard is discarded, done images are skipped, the result equals a one-shot dump.
    with DumpWriter(out, make_space(), "val", {}, shard_rows=8) as w3:
        assert w3.done_image_ids == done
        for im in images:
            if im["image_id"] not in w3.done_image_ids:
                w3.add_image(**im)
    assert not list(out.glob("*.partial"))
    got = read_all(out)
    write_dump(tmp_path / "ref", images)
    ref = read_all(tmp_path / "ref")
    for c in ref:
        np.testing.assert_array_equal(got[c], ref[c])


def test_resume_refuses_other_model_or_space(tmp_path: Path) -> None:
    write_dump(tmp_path / "d", make_images(3))
    with pytest.raises(PcbkitError, match="checkpoint_hash"):
        DumpWriter(tmp_path / "d", make_space(), "val", {"checkpoint_hash": "ck2"})
    with pytest.raises(PcbkitError, match="category_hash"):
        DumpWriter(tmp_path / "d", make_space(tag="x"), "val", {"checkpoint_hash": "ck1"})
    with pytest.raises(PcbkitError, match="split"):
        DumpWriter(tmp_path / "d", make_space(), "train", {"checkpoint_hash": "ck1"})


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    im = make_images(1, seed=7, max_rows=3)[0]
    im["logits"] = np.zeros((3, K + 1), np.float32)
    im.update(labels=np.array([0, 1, K]), boxes=np.zeros((3, 4)), ious=np.zeros(3))
    with DumpWriter(tmp_path / "d", make_space(), "val") as w:
        with pytest.raises(PcbkitError, match=r"logits must be \[R, K\+1\]"):
            w.add_image(**{**im, "logits": np.zeros((3, K))})
        with pytest.raises(PcbkitError, match="labels must lie in"):
            w.add_image(**{**im, "labels": np.array([0, K + 1, 0])})
        with pytest.raises(PcbkitError, match="NaN/inf"):
            w.add_image(**{**im, "logits": np.full((3, K + 1), np.nan)})
        with pytest.raises(PcbkitError, match="float16 range"):
            w.add_image(**{**im, "logits": np.full((3, K + 1), 1e5)})
        w.add_image(**im)
        with pytest.raises(PcbkitError, match="already written"):
            w.add_image(**im)


def _shard_file(path: Path, column: str = "logits") -> Path:
    return sorted(path.glob("shard-r00-*"))[1] / f"{column}.npy"


def test_truncated_shard_is_rejected_by_name(tmp_path: Path) -> None:
    write_dump(tmp_path / "d", make_images(12))
    f = _shard_file(tmp_path / "d")
    data = f.read_bytes()
    f.write_bytes(data[:-5])
    with pytest.raises(PcbkitError, match=f"{f.parent.name}.*truncated"):
        DumpReader(tmp_path / "d")


@pytest.mark.parametrize("prefetch", [0, 2])
def test_corrupted_shard_is_rejected_by_name(tmp_path: Path, prefetch: int) -> None:
    write_dump(tmp_path / "d", make_images(12))
    f = _shard_file(tmp_path / "d")
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # flip one mantissa bit of a float16 logit: still finite, same size
    f.write_bytes(bytes(data))
    reader = DumpReader(tmp_path / "d")  # sizes and headers still look right
    seen = []
    with pytest.raises(PcbkitError, match=f"shard {f.parent.name} is corrupted: CRC-32 of column 'logits'"):
        for chunk in reader.iter_chunks(rows=3, prefetch=prefetch):
            seen.append(chunk.shard)
    assert seen[-1] == f.parent.name  # raised right after the bad shard's rows, before the next shard
    # a column that was not requested is not read, hence not checked
    for _ in reader.iter_chunks(columns=("labels",)):
        pass


def test_missing_shard_and_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(PcbkitError, match="dump directory not found"):
        DumpReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PcbkitError, match="manifest not found .*not a pcbkit dump"):
        DumpReader(tmp_path / "empty")
    write_dump(tmp_path / "d", make_images(12))
    (tmp_path / "d" / MANIFEST_NAME).unlink()
    with pytest.raises(PcbkitError, match="manifest.json: manifest not found .*rank manifests exist"):
        DumpReader(tmp_path / "d")
    write_dump(tmp_path / "e", make_images(12))
    victim = _shard_file(tmp_path / "e")
    victim.unlink()
    with pytest.raises(PcbkitError, match=f"{victim.parent.name}: column file missing"):
        DumpReader(tmp_path / "e")


def test_manifest_validation(tmp_path: Path) -> None:
    write_dump(tmp_path / "d", make_images(4))
    with pytest.raises(PcbkitError, match="category space mismatch"):
        DumpReader(tmp_path / "d", expected_categories=make_space(tag="other"))
    with pytest.raises(PcbkitError, match="K=5 classes, expected K=7"):
        DumpReader(tmp_path / "d", expected_num_classes=7)
    path = tmp_path / "d" / MANIFEST_NAME
    good = json.loads(path.read_text())
    for change, pattern in (
        ({"schema_version": 99}, "schema_version"),
        ({"format": "other"}, "format"),
        ({"num_classes": 4}, "num_classes"),
        ({"category_hash": "0" * 16}, "category_hash"),
    ):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(PcbkitError, match=pattern):
            DumpReader(tmp_path / "d")
    cats = dict(good["categories"], names=["x"] * K)  # content no longer matches its hash
    path.write_text(json.dumps({**good, "categories": cats}))
    with pytest.raises(PcbkitError, match="hash"):
        DumpReader(tmp_path / "d")
    path.write_text("{not json")
    with pytest.raises(PcbkitError, match="not valid JSON"):
        DumpReader(tmp_path / "d")


def test_nan_logits_named(tmp_path: Path) -> None:
    images = make_images(6, seed=9)
    target = next(im for im in images[3:] if len(im["labels"]) >= 2)
    target["logits"][1, 2] = np.nan
    write_dump(tmp_path / "d", images, check_finite=False)
    reader = DumpReader(tmp_path / "d")
    with pytest.raises(
        PcbkitError, match=rf"shard shard-r00-\d+: logits contain NaN/inf.*image {target['image_id']}"
    ):
        for _ in reader.iter_chunks(columns=("logits", "labels")):  # image id found without the column
            pass
    with pytest.raises(PcbkitError, match="NaN/inf"):
        ClassStats.from_dump(tmp_path / "d", progress=False)


def test_inf_logits_named(tmp_path: Path) -> None:
    images = make_images(3, seed=10, max_rows=4)
    images[0]["logits"] = np.zeros((2, K + 1), np.float32)
    images[0]["logits"][0, 0] = -np.inf
    images[0].update(labels=np.array([0, K]), boxes=np.zeros((2, 4)), ious=np.zeros(2))
    write_dump(tmp_path / "d", images, check_finite=False)
    with pytest.raises(PcbkitError, match=f"image {images[0]['image_id']}"):
        list(DumpReader(tmp_path / "d").iter_chunks())


def test_multi_rank_merge(tmp_path: Path) -> None:
    images = make_images(15, seed=11)
    out = tmp_path / "d"
    space = make_space()
    for rank in (1, 0):  # order of completion does not matter
        with DumpWriter(
            out, space, "val", {"checkpoint_hash": "ck1"}, shard_rows=6, rank=rank, world_size=2
        ) as w:
            for im in images[rank::2]:
                w.add_image(**im)
    with pytest.raises(PcbkitError, match="manifest not found"):
        DumpReader(out)  # not merged yet
    man = merge_manifests(out)
    assert man["world_size"] == 2 and man["num_images"] == 15
    assert {s["rank"] for s in man["shards"]} == {0, 1}
    got = read_all(out)
    order = np.argsort(got["image_ids"], kind="stable")
    np.testing.assert_array_equal(got["labels"][order], concat(images, "labels"))  # ids increase with index
    np.testing.assert_allclose(got["logits"][order], concat(images, "logits"), rtol=2**-11)


def test_merge_refuses_unfinished_duplicate_and_missing_ranks(tmp_path: Path) -> None:
    images = make_images(6, seed=12)
    out = tmp_path / "d"
    space = make_space()
    with DumpWriter(out, space, "val", shard_rows=4, rank=0, world_size=2) as w:
        for im in images[:4]:
            w.add_image(**im)
    with pytest.raises(PcbkitError, match=r"missing for rank\(s\) \[1\]"):
        merge_manifests(out)
    w1 = DumpWriter(out, space, "val", shard_rows=4, rank=1, world_size=2)
    w1.add_image(**images[3])  # also written by rank 0 (DistributedSampler-style padding)
    w1.add_image(**images[4])
    with pytest.raises(PcbkitError, match="did not finish"):
        merge_manifests(out)
    w1.close()
    with pytest.raises(PcbkitError, match=f"image id {images[3]['image_id']} is in both"):
        merge_manifests(out)


def test_empty_image_counts_as_done(tmp_path: Path) -> None:
    empty = {
        "image_id": 5,
        "boxes": np.zeros((0, 4)),
        "logits": np.zeros((0, K + 1)),
        "labels": np.zeros(0, int),
        "ious": np.zeros(0),
    }
    write_dump(tmp_path / "d", [empty])
    reader = DumpReader(tmp_path / "d")
    assert reader.num_rows == 0 and reader.image_ids().tolist() == [5]
    with DumpWriter(tmp_path / "d", make_space(), "val", {"checkpoint_hash": "ck1"}) as w:
        assert w.done_image_ids == {5}
        with pytest.raises(PcbkitError, match="unfinished"):
            DumpReader(tmp_path / "d")  # a writer is (re)running: the manifest says so until close()
    with pytest.raises(PcbkitError, match="no proposal rows"):
        ClassStats.from_dump(tmp_path / "d", progress=False)


# ----------------------------------------------------------------------------------- statistics


def test_class_stats_from_dump_hand_computed(tmp_path: Path) -> None:
    k = 2
    space = make_space(k)
    ln3 = math.log(3.0)
    logits = np.array(
        [
            [0.0, 0.0, 5.0],  # label 0: p = softmax([0, 0]) = [1/2, 1/2] (background dropped)
            [ln3, 0.0, -2.0],  # label 1: p = [3/4, 1/4]; argmax 0
            [9.0, 0.0, 0.0],  # label 2 = background: not counted
            [0.0, 9.0, 0.0],  # label -1 = ignore: not counted
            [0.0, ln3, 1.0],  # label 1: p = [1/4, 3/4]; argmax 1
        ],
        np.float32,
    )
    labels = np.array([0, 1, 2, -1, 1])
    image = {"image_id": 1, "boxes": np.zeros((5, 4)), "logits": logits, "labels": labels, "ious": np.ones(5)}
    write_dump(tmp_path / "d", [image], space=space)
    st = ClassStats.from_dump(tmp_path / "d", progress=False, chunk_rows=2)
    assert isinstance(st, ClassStats)
    # S = [[1/2, 1/2], [3/4 + 1/4, 1/4 + 3/4]] = [[.5, .5], [1, 1]]; n = [1, 2]; H = [[?, ?], [1, 1]]
    # (row 0 ties at 1/2: its arg-max is either column; check the row sum only)
    # fp16 rounding of ln 3 (1.0986328) moves 3/4 by < 2e-5.
    torch.testing.assert_close(
        st.S, torch.tensor([[0.5, 0.5], [1.0, 1.0]], dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert st.n.tolist() == [1, 2]
    assert st.H[1].tolist() == [1, 1] and int(st.H[0].sum()) == 1
    torch.testing.assert_close(
        st.mean_score(), torch.tensor([0.5, 0.5], dtype=st.mean_score().dtype), atol=1e-4, rtol=0
    )
    assert st.split == "val" and st.categories == space


@pytest.mark.parametrize("chunk_rows", [1, 7, 10_000])
def test_class_stats_from_dump_equals_one_pass(tmp_path: Path, chunk_rows: int) -> None:
    images = make_images(40, seed=13, max_rows=9)
    write_dump(tmp_path / "d", images, shard_rows=11)
    st = ClassStats.from_dump(tmp_path / "d", progress=False, chunk_rows=chunk_rows)
    # one pass over the same (float16-rounded) rows, all labels included
    z = torch.from_numpy(concat(images, "logits").astype(np.float16))
    y = torch.from_numpy(concat(images, "labels").astype(np.int64))
    ref = ClassStats.zeros(K)
    ref.update(z, y)
    torch.testing.assert_close(st.S, ref.S, rtol=1e-6, atol=1e-6)
    assert torch.equal(st.n, ref.n) and torch.equal(st.H, ref.H)
    assert int(st.n.sum()) == int(((y >= 0) & (y < K)).sum())
    assert (st.rows, st.background, st.ignored) == (len(y), int((y == K).sum()), int((y == -1).sum()))
    assert st.source == str(tmp_path / "d") and st.categories == make_space()


# ---------------------------------------------------------------------------------------- CLI


def test_cli_stats(tmp_path: Path) -> None:
    images = make_images(30, seed=14)
    write_dump(tmp_path / "d", images)
    out = tmp_path / "s" / "val.npz"
    res = CliRunner().invoke(
        stats_cmd, ["--dump", str(tmp_path / "d"), "--out", str(out), "--split-name", "val2", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    rows = sum(len(im["labels"]) for im in images)
    positives = int(sum(((im["labels"] >= 0) & (im["labels"] < K)).sum() for im in images))
    assert f"rows read: {rows:,}; positives: {positives:,}" in res.output
    assert "mean score" in res.output and "classes with no positives" in res.output
    loaded = ClassStats.load(out, categories=make_space())
    assert int(loaded.n.sum()) == positives and loaded.rows == rows
    assert loaded.split == "val2" and loaded.source == str(tmp_path / "d")
    assert not list(out.parent.glob(".*tmp*"))  # no temporary left behind

    # a corrupted dump fails and leaves the good existing output untouched
    before = out.read_bytes()
    f = _shard_file(tmp_path / "d")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x10
    f.write_bytes(bytes(data))
    res = CliRunner().invoke(stats_cmd, ["--dump", str(tmp_path / "d"), "--out", str(out), "--no-progress"])
    assert res.exit_code != 0 and isinstance(res.exception, PcbkitError)
    assert f.parent.name in str(res.exception)
    assert out.read_bytes() == before
    assert not list(out.parent.glob(".*tmp*"))
