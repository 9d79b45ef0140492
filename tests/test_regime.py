"""Tests of pcb_analysis.regime: regime diagnostics of class statistics (docs/statistics.md §4).

Every number has a hand-computed golden on a tiny matrix; limiting cases: identity M (cond 1, no
clipping, L1 distance 2) and classes without positives (no row: left out of every mean).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps import DumpReader, DumpWriter
from pcb_analysis.errors import PcbkitError
from pcb_analysis.regime import (
    DEFAULT_CLIP_ROWS,
    TABLE_HEADER,
    ClipMass,
    clip_mass_from_dump,
    clip_stride,
    clipped_mass_sums,
    diagnose,
    instance_counts,
    stats_from_dump,
)
from pcb_analysis.stats import ClassStats
from pcbkit.cmd_stats import stats_cmd

PHI = (1 + math.sqrt(5)) / 2


def space_of(freqs: str) -> CategorySpace:
    k = len(freqs)
    return CategorySpace(ids=tuple(range(1, k + 1)), names=tuple(f"c{i}" for i in range(k)),
                         frequency=tuple(freqs), image_count=(0,) * k)


def stats_of(rows: list[list[float]], n: list[int], freqs: str) -> ClassStats:
    """ClassStats whose confusion matrix is `rows` (S = rows * n; rows of empty classes are ignored)."""
    m = torch.tensor(rows, dtype=torch.float64)
    nn = torch.tensor(n, dtype=torch.int64)
    k = len(n)
    h = torch.zeros(k, k, dtype=torch.int64)
    return ClassStats(S=m * nn[:, None], n=nn, H=h, categories=space_of(freqs))


# The 3-class example worked by hand (classes r, c, f):
#   M = [[0.5, 0.5, 0], [0, 1, 0], [0, 0, 1]],  M^-1 = [[2, -1, 0], [0, 1, 0], [0, 0, 1]]
#   singular values: 1 (class f) and those of [[0.5, 0.5], [0, 1]]: M^T M = [[.25, .25], [.25, 1.25]],
#   trace 1.5, det 0.25 -> sigma^2 = (1.5 +- sqrt(1.25)) / 2 -> sigma_max = 1.144123, sigma_min =
#   0.437016 = 1 / (sqrt(2) phi); cond_2 = sigma_max / sigma_min = phi^2 = 2.618034.
#   L1 distances of the rare row 0: to row 1 |.5| + |.5 - 1| + 0 = 1.0; to row 2 .5 + .5 + 1 = 2.0.
#   Positives: A (true 0) p = (.6, .1, .3) -> p M^-1 = (1.2, -.5, .3): negative .5, |.| 2.0
#              B (true 2) p = (.2, .5, .3) -> p M^-1 = (.4, .3, .3):   negative 0,  |.| 1.0
#   clipped fraction = .5 / 3 = 1/6; by true bucket r .5 / 2 = .25, c none (no positive), f 0 / 1 = 0.
HAND_M = [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
HAND_P = torch.tensor([[0.6, 0.1, 0.3], [0.2, 0.5, 0.3]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 2])


def test_hand_3x3_golden() -> None:
    st = stats_of(HAND_M, [2, 4, 1], "rcf")
    m_inv = torch.linalg.inv(st.confusion())
    torch.testing.assert_close(m_inv, torch.tensor([[2.0, -1, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64))
    clip = clipped_mass_sums(HAND_P, HAND_LABELS, m_inv)
    assert isinstance(clip, ClipMass)
    torch.testing.assert_close(clip.negative, torch.tensor([0.5, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(clip.total, torch.tensor([2.0, 0, 1.0], dtype=torch.float64))
    d = diagnose(st, instances=torch.tensor([3, 10, 40]), clip=clip, label="hand")
    assert [b.mean_diagonal for b in d.buckets] == [0.5, 1.0, 1.0]
    assert d.mean_diagonal == pytest.approx(2.5 / 3)
    assert d.sigma_max == pytest.approx(1.144123, abs=1e-6)
    assert d.sigma_min == pytest.approx(1 / (math.sqrt(2) * PHI), abs=1e-12)
    assert d.cond2 == pytest.approx(PHI**2, abs=1e-12)
    assert d.rare_l1 == pytest.approx(1.0) and d.rare_l1_pair == ("c0", "c1")
    assert d.clipped_fraction == pytest.approx(1 / 6)
    by = {b.bucket: b for b in d.buckets}
    assert by["r"].clipped_fraction == pytest.approx(0.25)
    assert by["c"].clipped_fraction is None and by["f"].clipped_fraction == 0.0
    assert (by["r"].instances_min, by["r"].instances_median) == (3, 3.0)
    row = d.table_row()
    assert len(row) == len(TABLE_HEADER)
    assert row == ["hand", "0.50", "1.00", "1.00", "2.62", "0.437", "3 / 3", "10 / 10", "40 / 40", "1.000",
                   "0.167"]
    text = "\n".join(d.lines())
    assert "cond_2(M) 2.62" in text and "0.167 of |p M^-1|" in text and "(c0 -> c1)" in text


def test_hand_2x2_singular_values() -> None:
    # M = [[.8, .2], [.4, .6]]: det = .48 - .08 = .4; M^T M = [[.8, .4], [.4, .4]], trace 1.2, det .16
    # sigma^2 = (1.2 +- sqrt(1.44 - .64)) / 2 = .6 +- sqrt(.2) -> sigma_max = 1.023335, sigma_min =
    # .390879, cond = 2.618034 (= phi^2 again: cond + 1 / cond = trace / |det| = 1.2 / .4 = 3)
    d = diagnose(stats_of([[0.8, 0.2], [0.4, 0.6]], [5, 5], "rf"))
    assert d.sigma_max == pytest.approx(math.sqrt(0.6 + math.sqrt(0.2)), abs=1e-12)
    assert d.sigma_min == pytest.approx(math.sqrt(0.6 - math.sqrt(0.2)), abs=1e-12)
    assert d.sigma_max * d.sigma_min == pytest.approx(0.4)  # |det|
    assert d.cond2 == pytest.approx(PHI**2, abs=1e-12)
    assert d.rare_l1 == pytest.approx(0.8)  # |.8 - .4| + |.2 - .6|
    assert d.clipped_fraction is None and d.buckets[0].instances_min is None
    assert "not measured" in "\n".join(d.lines())


def test_empty_classes_have_no_row_in_any_mean_or_distance() -> None:
    # classes r, r, c, f; class 1 has no positives (its stored row is an identity row, which would
    # give r mean (0.1 + 1) / 2 = 0.55 and L1 distance 0.4 from row 0 if it were counted).
    #   row 0 (r): (.1, .8, .05, .05)   row 2 (c): (.2, 0, .7, .1)   row 3 (f): (.1, .2, 0, .7)
    #   d(0, 2) = .1 + .8 + .65 + .05 = 1.6;  d(0, 3) = 0 + .6 + .05 + .65 = 1.3
    rows = [[0.1, 0.8, 0.05, 0.05], [0, 0, 0, 0], [0.2, 0.0, 0.7, 0.1], [0.1, 0.2, 0.0, 0.7]]
    st = stats_of(rows, [4, 0, 2, 5], "rrcf")
    d = diagnose(st, instances=[3, 0, 12, 40])
    by = {b.bucket: b for b in d.buckets}
    assert by["r"].mean_diagonal == pytest.approx(0.1) and by["r"].with_rows == 1 and by["r"].classes == 2
    assert d.mean_diagonal == pytest.approx(0.5) and d.classes_with_rows == 3
    assert d.rare_l1 == pytest.approx(1.3) and d.rare_l1_pair == ("c0", "c3")
    assert (by["r"].instances_min, by["r"].instances_median) == (0, 1.5)
    # the singular values are those of the matrix cm inverts (identity row for class 1)
    np.testing.assert_allclose(sorted([d.sigma_min, d.sigma_max]), [
        np.linalg.svd(st.confusion().numpy(), compute_uv=False).min(),
        np.linalg.svd(st.confusion().numpy(), compute_uv=False).max()])


def test_bucket_without_rows_and_no_rare_class() -> None:
    d = diagnose(stats_of([[1, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]], [0, 3, 3], "rcf"))
    assert math.isnan(d.buckets[0].mean_diagonal) and d.buckets[0].with_rows == 0
    assert d.rare_l1 is None and d.table_row()[1] == "-" and d.table_row()[9] == "-"
    assert d.cond2 > 1e12  # rows 1 and 2 are equal: singular
    d2 = diagnose(stats_of([[0.5, 0.5], [0.5, 0.5]], [3, 3], "cf"))  # no rare bucket at all
    assert [b.bucket for b in d2.buckets] == ["c", "f"] and d2.rare_l1 is None


def test_identity_limiting_case() -> None:
    k = 4
    st = stats_of(torch.eye(k).tolist(), [3, 1, 7, 2], "rrcf")
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, k, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, k, (50,), generator=gen)
    clip = clipped_mass_sums(p, labels, torch.linalg.inv(st.confusion()))
    d = diagnose(st, clip=clip)
    assert d.cond2 == pytest.approx(1.0) and d.sigma_min == pytest.approx(1.0)
    assert d.clipped_fraction == 0.0
    assert d.rare_l1 == pytest.approx(2.0)
    assert all(b.mean_diagonal == 1.0 for b in d.buckets)


def test_clip_mass_total_is_rows_plus_twice_negative() -> None:
    # rows of M sum to 1, so M^-1 1 = 1 and every p M^-1 sums to 1: |v| = 1 + 2 * negative per row
    gen = torch.Generator().manual_seed(1)
    k = 6
    m = torch.softmax(torch.randn(k, k, generator=gen, dtype=torch.float64) + 3 * torch.eye(k), 1)
    p = torch.softmax(2 * torch.randn(200, k, generator=gen, dtype=torch.float64), 1)
    labels = torch.randint(0, k, (200,), generator=gen)
    clip = clipped_mass_sums(p, labels, torch.linalg.inv(m))
    counts = torch.bincount(labels, minlength=k).to(torch.float64)
    torch.testing.assert_close(clip.total, counts + 2 * clip.negative)
    assert float(clip.negative.sum()) > 0


def test_clipped_mass_sums_rejects_bad_input() -> None:
    m_inv = torch.eye(3, dtype=torch.float64)
    with pytest.raises(PcbkitError, match="labels must be in 0..2"):
        clipped_mass_sums(HAND_P, torch.tensor([0, 3]), m_inv)
    with pytest.raises(PcbkitError, match=r"p must be \[R, K=3\]"):
        clipped_mass_sums(HAND_P[:, :2], HAND_LABELS, m_inv)
    with pytest.raises(PcbkitError, match="no category space"):
        diagnose(ClassStats.zeros(3))


# ------------------------------------------------------------------------------ from a dump

FREQS = "rrcf"
K = len(FREQS)


def write_world(tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    """A dump of images 1..6 and an LVIS file with images 1..7 (image 7 is not in the dump)."""
    space = space_of(FREQS)
    gen = torch.Generator().manual_seed(seed)
    with DumpWriter(tmp_path / "dump", space, "val", {}, shard_rows=5) as w:
        for img in range(1, 7):
            labels = torch.tensor([0, 1, 2, 3, 3, K, -1])
            logits = torch.randn(7, K + 1, generator=gen)
            logits[torch.arange(5), labels[:5]] += 1.5
            logits[0, 2] += 2.0  # rare class 0 leaks into class 2
            w.add_image(img, torch.zeros(7, 4), logits, labels, torch.ones(7))
    cats = [{"id": i + 1, "name": f"c{i}", "frequency": f} for i, f in enumerate(FREQS)]
    images = [{"id": i, "height": 10, "width": 10, "neg_category_ids": [], "not_exhaustive_category_ids": []}
              for i in range(1, 8)]
    anns = []
    # per image 1..6: class 0 once, class 2 twice, class 3 three times; class 1 only on image 7;
    # one ignored and one zero-area annotation of class 3 on image 1 (not instances)
    plan = [(img, c) for img in range(1, 7) for c in (0, 2, 2, 3, 3, 3)] + [(7, 1), (7, 1), (7, 3)]
    for aid, (img, c) in enumerate(plan, start=1):
        anns.append({"id": aid, "image_id": img, "category_id": c + 1, "bbox": [1, 1, 3, 3], "area": 9.0,
                     "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]})
    anns.append({"id": 900, "image_id": 1, "category_id": 4, "bbox": [1, 1, 3, 3], "area": 9.0,
                 "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]], "ignore": 1})
    anns.append({"id": 901, "image_id": 1, "category_id": 4, "bbox": [1, 1, 0, 0], "area": 0.0,
                 "segmentation": [[1, 1, 1, 1, 1, 1]]})
    gt = tmp_path / "val.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return tmp_path / "dump", gt


def test_instance_counts_restricted_to_the_dump_images(tmp_path: Path) -> None:
    dump, gt = write_world(tmp_path)
    counts, images = instance_counts(gt, space_of(FREQS), DumpReader(dump).image_ids())
    assert counts.tolist() == [6, 0, 12, 18] and images == 6
    counts_all, images_all = instance_counts(gt, space_of(FREQS))
    assert counts_all.tolist() == [6, 2, 12, 19] and images_all == 7
    with pytest.raises(PcbkitError, match=r"val.json.*2 image\(s\) of the statistics are not in it"):
        instance_counts(gt, space_of(FREQS), np.array([1, 8, 9]))
    with pytest.raises(PcbkitError, match="differ from the statistics' category space"):
        instance_counts(gt, space_of("rccf"))


def test_stats_from_dump_stores_the_sums_and_they_round_trip(tmp_path: Path) -> None:
    dump, gt = write_world(tmp_path)
    st = stats_from_dump(dump, gt=gt, progress=False, chunk_rows=4)
    assert st.instances is not None and st.instances.tolist() == [6, 0, 12, 18]
    assert st.extra["instances"] == {"gt": str(gt), "images": 6}
    # the clip sums equal a direct computation over all positive rows
    reader = DumpReader(dump)
    rows = [(torch.from_numpy(np.array(c["logits"])), torch.from_numpy(np.array(c["labels"])))
            for c in reader.iter_chunks(100, columns=("logits", "labels"))]
    logits = torch.cat([r[0] for r in rows]).double()
    labels = torch.cat([r[1] for r in rows]).long()
    pos = (labels >= 0) & (labels < K)
    p = torch.softmax(logits[pos, :K].float(), 1).double()
    v = p @ torch.linalg.inv(st.confusion(warn=False))
    for i in range(K):
        sel = labels[pos] == i
        neg = float((-v[sel]).clamp(min=0).sum())
        assert float(st.clip_negative[i]) == pytest.approx(neg, rel=1e-9, abs=1e-12)
        assert float(st.clip_total[i]) == pytest.approx(float(v[sel].abs().sum()), rel=1e-9, abs=1e-12)
    path = st.save(tmp_path / "s.npz")
    back = ClassStats.load(path)
    assert torch.equal(back.instances, st.instances)
    assert torch.equal(back.clip_negative, st.clip_negative) and torch.equal(back.clip_total, st.clip_total)
    assert diagnose(back) == diagnose(st)
    assert diagnose(back).instance_images == 6
    assert diagnose(back, instances=[1, 1, 1, 1]).instance_images is None  # not the stored sums' images
    assert back.metadata()["counts"]["instances"] == 36
    merged = back + back
    assert merged.instances is None and merged.clip_negative is None and merged.clip_total is None
    plain = stats_from_dump(dump, clip_mass=False, progress=False)
    assert plain.instances is None and plain.clip_negative is None
    assert "not measured" in "\n".join(diagnose(ClassStats.load(plain.save(tmp_path / "p.npz"))).lines())


def test_clip_rows_cap_reads_every_sth_positive(tmp_path: Path) -> None:
    assert [clip_stride(10, r) for r in (None, 10, 11, 5, 4, 1)] == [1, 1, 1, 2, 3, 10]
    with pytest.raises(PcbkitError, match="clip rows must be >= 1"):
        clip_stride(10, 0)
    dump, _ = write_world(tmp_path)  # 30 positives in dump order; at most 7 -> stride 5: 0, 5, .., 25
    st = stats_from_dump(dump, clip_rows=7, progress=False, chunk_rows=4)  # chunks cut across the stride
    assert st.extra["clip_mass"]["stride"] == 5 and st.extra["clip_mass"]["rows"] == 6
    chunks = list(DumpReader(dump).iter_chunks(100, columns=("logits", "labels")))
    logits = torch.cat([torch.from_numpy(np.array(c["logits"])) for c in chunks])
    labels = torch.cat([torch.from_numpy(np.array(c["labels"])) for c in chunks]).long()
    pos = torch.nonzero((labels >= 0) & (labels < K)).flatten()[::5]
    ref = clipped_mass_sums(torch.softmax(logits[pos, :K].float(), 1), labels[pos],
                            torch.linalg.inv(st.confusion(warn=False)))
    torch.testing.assert_close(st.clip_negative, ref.negative)
    torch.testing.assert_close(st.clip_total, ref.total)
    assert int(torch.bincount(labels[pos], minlength=K).sum()) == 6
    assert "over 6 of 30 positives" in "\n".join(diagnose(st).lines())
    assert diagnose(stats_from_dump(dump, clip_rows=None, progress=False)).clip_rows is None


def test_load_refuses_bad_optional_arrays(tmp_path: Path) -> None:
    st = stats_of(HAND_M, [2, 4, 1], "rcf")
    st.instances = torch.tensor([1, 2, 3])
    st.clip_negative = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    st.clip_total = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(PcbkitError, match="'clip_negative' must be finite and non-negative"):
        ClassStats.load(st.save(tmp_path / "bad.npz"))
    with pytest.raises(PcbkitError, match=r"instances must be \[K\] = \[3\]"):
        ClassStats(S=st.S, n=st.n, H=st.H, instances=torch.tensor([1, 2]))


def test_singular_matrix_leaves_clip_mass_unmeasured(tmp_path: Path) -> None:
    space = space_of("rf")
    with DumpWriter(tmp_path / "dump", space, "val", {}) as w:  # both classes: p = (.5, .5) exactly
        w.add_image(1, torch.zeros(2, 4), torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(2))
    reader = DumpReader(tmp_path / "dump")
    st = ClassStats.from_dump(reader, progress=False)
    assert clip_mass_from_dump(reader, st, progress=False) is None
    assert stats_from_dump(tmp_path / "dump", progress=False).clip_negative is None


def test_cli_stats_prints_the_diagnostics(tmp_path: Path) -> None:
    dump, gt = write_world(tmp_path)
    out = tmp_path / "s.npz"
    args = ["--dump", str(dump), "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(stats_cmd, [*args, "--gt", str(gt)])
    assert res.exit_code == 0, res.output
    d = diagnose(ClassStats.load(out))
    for line in d.lines():
        assert line in res.output
    assert "ground-truth instances per class (6 images): r min 0 median 3" in res.output
    res = CliRunner().invoke(stats_cmd, [*args, "--no-clip-mass"])
    assert next(o.default for o in stats_cmd.params if o.name == "clip_rows") == DEFAULT_CLIP_ROWS
    assert res.exit_code == 0 and "clipping: not measured" in res.output
    assert ClassStats.load(out).clip_negative is None


# ------------------------------------------------------------------------------ the study report


def test_study_notes_and_report_section_leave_empty_classes_out(tmp_path: Path) -> None:
    from pcb_analysis.report import regime_section
    from pcb_train.study import StudyModel
    from pcb_train.study_report import matrix_notes, regime_diagnostics

    # the 4-class example above: r mean 0.10 over the one rare class with positives (0.55 if class
    # 1's identity row were counted)
    rows = [[0.1, 0.8, 0.05, 0.05], [0, 0, 0, 0], [0.2, 0.0, 0.7, 0.1], [0.1, 0.2, 0.0, 0.7]]
    val = stats_of(rows, [4, 0, 2, 5], "rrcf")
    val.instances = torch.tensor([3, 0, 12, 40])
    paths = {"val": val.save(tmp_path / "val.npz"),
             "train": stats_of(torch.eye(4).tolist(), [1, 1, 1, 1], "rrcf").save(tmp_path / "train.npz")}
    model = StudyModel(name="softmax", config=tmp_path / "c.yaml", checkpoint=tmp_path / "m.pth")
    (note,) = matrix_notes([model], {"softmax": paths})
    assert "mean diagonal r 0.10 (1/2 classes), c 0.70 (1/1 classes), f 0.70 (1/1 classes)" in note
    assert "0.55" not in note and "a rare row lies 1.300 (L1) from another row" in note
    diags = regime_diagnostics([model], {"softmax": paths})
    assert [d.label for d in diags] == ["softmax val", "softmax train"]
    table = regime_section(diags).splitlines()
    assert table[0] == "| " + " | ".join(TABLE_HEADER) + " |"
    assert table[2].startswith("| softmax val | 0.10 | 0.70 | 0.70 |")
    assert "| 0 / 1.5 | 12 / 12 | 40 / 40 |" in table[2]
    assert table[3].startswith("| softmax train | 1.00 | 1.00 | 1.00 | 1 | 1 | - | - | - | 2.000 | - |")
