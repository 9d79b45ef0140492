"""Image folds and out-of-fold statistics (`pcb_analysis.folds`, `pcbkit stats --split-folds`).

The fold hash is pinned by hand-computed values; folds partition the images; the out-of-fold sums
equal the statistics of a dump holding only those images; the CLI writes one file per fold beside the
full one (which stays what it is without folds)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps import DumpReader, DumpWriter
from pcb_analysis.errors import PcbkitError
from pcb_analysis.folds import (
    find_fold_files,
    fold_path,
    fold_statistics,
    image_fold,
    image_folds,
    in_fold_statistics,
    out_of_fold,
)
from pcb_analysis.regime import instance_counts
from pcb_analysis.stats import ClassStats

FREQS = "rrcf"
K = len(FREQS)
IMAGES = tuple(range(1, 13))


def test_image_fold_is_the_documented_hash() -> None:
    # sha256("pcbkit-fold:0:1") starts 36 0c ... ; its first 8 bytes, big-endian, are
    # 3894492290557185759, odd, so image 1 is in fold 3894492290557185759 % 2 + 1 = 2 of 2.
    digest = hashlib.sha256(b"pcbkit-fold:0:1").digest()
    assert int.from_bytes(digest[:8], "big") == 3894492290557185759
    assert image_fold(1, 2, 0) == 2
    # pinned values: the same on every machine and Python (no hash randomisation)
    assert [image_fold(i, 2, 0) for i in range(1, 11)] == [2, 1, 2, 2, 2, 1, 2, 1, 1, 2]
    assert [image_fold(i, 3, 7) for i in (1, 42, 139)] == [1, 2, 1]
    for i in (5, 397133, 10**12):
        h = int.from_bytes(hashlib.sha256(f"pcbkit-fold:3:{i}".encode()).digest()[:8], "big")
        assert image_fold(i, 5, 3) == h % 5 + 1
    assert image_folds([3, 1, 3], 2) == {3: 2, 1: 2}
    # the seed changes the assignment
    assert [image_fold(i, 2, 1) for i in range(1, 21)] != [image_fold(i, 2, 0) for i in range(1, 21)]


@pytest.mark.parametrize(("folds", "seed"), [(1, 0), (0, 0), (2, -1), (True, 0)])
def test_bad_fold_counts_are_refused(folds: int, seed: int) -> None:
    with pytest.raises(PcbkitError):
        image_fold(1, folds, seed)


def space() -> CategorySpace:
    return CategorySpace(ids=tuple(range(1, K + 1)), names=tuple(f"c{i}" for i in range(K)),
                         frequency=tuple(FREQS), image_count=(5, 8, 40, 200))


def image_rows(img: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image `img`'s rows: labels (0, 1, 2, 3, 3, K, -1), logits seeded by the image id."""
    gen = torch.Generator().manual_seed(1000 + img)
    labels = torch.tensor([0, 1, 2, 3, 3, K, -1])
    logits = torch.randn(7, K + 1, generator=gen)
    logits[torch.arange(5), labels[:5]] += 1.5
    logits[0, 2] += 2.0 * (img % 3)  # class 0 leaks into class 2 on some images: folds differ
    return logits, labels


def write_dump(path: Path, images: tuple[int, ...], shard_rows: int = 9) -> Path:
    with DumpWriter(path, space(), "val", {}, shard_rows=shard_rows) as w:
        for img in images:
            logits, labels = image_rows(img)
            w.add_image(img, torch.zeros(7, 4), logits, labels, torch.ones(7))
    return path


def write_gt(path: Path, images: tuple[int, ...]) -> Path:
    cats = [{"id": i + 1, "name": f"c{i}", "frequency": f} for i, f in enumerate(FREQS)]
    imgs = [{"id": i, "height": 10, "width": 10, "neg_category_ids": [], "not_exhaustive_category_ids": []}
            for i in images]
    anns = [{"id": n, "image_id": img, "category_id": 1 + (img + j) % K, "bbox": [1, 1, 3, 3], "area": 9.0,
             "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]}
            for n, (img, j) in enumerate(((img, j) for img in images for j in range(img % 3 + 1)), start=1)]
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    return path


def test_folds_partition_the_images_and_out_of_fold_sums_add_up(tmp_path: Path) -> None:
    reader = DumpReader(write_dump(tmp_path / "dump", IMAGES))
    parts, images = in_fold_statistics(reader, 3, seed=0, progress=False, chunk_rows=5)
    assert sorted(np.concatenate(images).tolist()) == list(IMAGES)
    for f, ids in enumerate(images, start=1):
        assert all(image_fold(i, 3, 0) == f for i in ids.tolist()) and len(ids) > 0
    full = ClassStats.from_dump(reader, progress=False)
    total = parts[0] + parts[1] + parts[2]
    assert torch.equal(total.n, full.n) and torch.equal(total.H, full.H) and total.rows == full.rows
    # p is summed in float32 windows (docs/statistics.md §2): other row groupings round differently,
    # relative error <= 64 * 2^-24 ~ 4e-6
    torch.testing.assert_close(total.S, full.S, rtol=4e-6, atol=1e-9)
    for f in (1, 2, 3):
        oof = out_of_fold(parts, f)
        assert torch.equal(oof.n + parts[f - 1].n, full.n)
        assert oof.rows + parts[f - 1].rows == full.rows


@pytest.mark.parametrize("folds", [2, 3])
def test_out_of_fold_statistics_equal_a_dump_of_only_those_images(tmp_path: Path, folds: int) -> None:
    dump = write_dump(tmp_path / "dump", IMAGES)
    gt = write_gt(tmp_path / "val.json", IMAGES)
    stats = fold_statistics(dump, folds, seed=0, gt=gt, progress=False, chunk_rows=4)
    assert len(stats) == folds
    for i, st in enumerate(stats, start=1):
        kept = tuple(img for img in IMAGES if image_fold(img, folds, 0) != i)
        direct = ClassStats.from_dump(write_dump(tmp_path / f"only{i}", kept, shard_rows=50), progress=False)
        assert torch.equal(st.n, direct.n) and torch.equal(st.H, direct.H)
        torch.testing.assert_close(st.S, direct.S, rtol=4e-6, atol=1e-9)  # float32 windows, other grouping
        assert (st.rows, st.background, st.ignored) == (direct.rows, direct.background, direct.ignored)
        assert st.categories == direct.categories and st.split == "val"
        assert st.extra["fold"] == {"fold": i, "folds": folds, "seed": 0, "images": len(kept),
                                    "held_out_images": len(IMAGES) - len(kept),
                                    "contents": f"every image of the dump except fold {i} of {folds}"}
        assert st.instances is not None
        assert torch.equal(st.instances, instance_counts(gt, space(), np.array(kept))[0])
    # the folds' statistics do differ (so that a protocol can tell them apart)
    assert not torch.equal(stats[0].S, stats[1].S)


def test_fold_files_are_found_beside_the_statistics(tmp_path: Path) -> None:
    stats = tmp_path / "val.stats.npz"
    assert fold_path(stats, 1, 2) == tmp_path / "val.stats.fold1of2.npz"
    with pytest.raises(PcbkitError, match="no fold statistics beside it"):
        find_fold_files(stats)
    st = ClassStats.zeros(K, space())
    st.save(fold_path(stats, 1, 2))
    with pytest.raises(PcbkitError, match="incomplete: missing val.stats.fold2of2.npz"):
        find_fold_files(stats)
    st.save(fold_path(stats, 2, 2))
    assert find_fold_files(stats) == [fold_path(stats, 1, 2), fold_path(stats, 2, 2)]
    st.save(tmp_path / "val.fold1of2.npz")  # another stem: not this file's folds
    assert len(find_fold_files(stats)) == 2
    st.save(fold_path(stats, 1, 3))
    with pytest.raises(PcbkitError, match=r"several fold sets beside it \(F = 2, 3\)"):
        find_fold_files(stats)


def test_stats_cli_writes_fold_files_beside_an_unchanged_full_file(
    tmp_path: Path, run_pcbkit: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    dump = write_dump(tmp_path / "dump", IMAGES)
    gt = write_gt(tmp_path / "val.json", IMAGES)
    plain, folded = tmp_path / "plain.npz", tmp_path / "folded.npz"
    base = ["stats", "--dump", str(dump), "--gt", str(gt), "--no-progress", "--no-clip-mass"]
    assert run_pcbkit([*base, "--out", str(plain)])[0] == 0
    code, out, err = run_pcbkit([*base, "--out", str(folded), "--split-folds", "2", "--fold-seed", "3"])
    assert code == 0, err
    a, b = ClassStats.load(plain), ClassStats.load(folded)
    assert torch.equal(a.S, b.S) and torch.equal(a.n, b.n) and torch.equal(a.instances, b.instances)
    assert "fold" not in b.extra
    expected = fold_statistics(dump, 2, seed=3, gt=gt, progress=False)
    for i in (1, 2):
        path = tmp_path / f"folded.fold{i}of2.npz"
        st = ClassStats.load(path)
        info = st.extra["fold"]
        assert (info["fold"], info["folds"], info["seed"]) == (i, 2, 3)
        assert info["images"] == sum(image_fold(img, 2, 3) != i for img in IMAGES)
        assert torch.equal(st.n, expected[i - 1].n) and torch.equal(st.instances, expected[i - 1].instances)
        assert f"wrote {path}: every image except fold {i} of 2" in out
    code, _, err = run_pcbkit([*base, "--out", str(tmp_path / "x.npz"), "--split-folds", "1"])
    assert code == 2 and "--split-folds" in err and not (tmp_path / "x.npz").exists()
