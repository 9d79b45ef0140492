"""Tests of pcb_analysis.stats / class_sums: S, n, H, confusion, mean score, merge, persistence, EMA.

docs/method.md §2, §4.1.

Logits [R, K+1], background = column K; labels -1 ignore, 0..K-1 positive, K background.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_analysis.stats import (
    ClassStats,
    batch_sums,
    check_finite,
    ema_update_,
    foreground_probs,
    row_normalise,
)

# ----------------------------------------------------------------------------- fixtures

# The 3-class example worked by hand. Foreground logits are log(p) + a per-row constant, so the
# foreground softmax of each row is exactly p (softmax ignores a constant shift); the background
# logit (last column) is arbitrary and must not matter.
#
#   row  label  p = softmax(z[:3])      argmax
#   0    0      (0.5, 0.25, 0.25)       0
#   1    0      (0.7, 0.2,  0.1 )       0
#   2    1      (0.2, 0.6,  0.2 )       1
#   3    1      (0.5, 0.4,  0.1 )       0    <- class 1 mistaken for class 0
#   4    2      (0.1, 0.1,  0.8 )       2
#   5    3 (bg) (0.9, 0.05, 0.05)       -    background: not accumulated
#   6    -1     (0.05,0.05, 0.9 )       -    ignored
#
#   S[0] = r0 + r1 = (0.5+0.7, 0.25+0.2, 0.25+0.1) = (1.2, 0.45, 0.35),  n[0] = 2
#   S[1] = r2 + r3 = (0.2+0.5, 0.6+0.4,  0.2+0.1 ) = (0.7, 1.0,  0.3 ),  n[1] = 2
#   S[2] = r4                                       = (0.1, 0.1,  0.8 ),  n[2] = 1
#   H    = [[2, 0, 0], [1, 1, 0], [0, 0, 1]]         (row 1: r2 -> 1, r3 -> 0)
#   M    = S / n = [[0.6, 0.225, 0.175], [0.35, 0.5, 0.15], [0.1, 0.1, 0.8]]
#   s    = diag(M) = (0.6, 0.5, 0.8)
HAND_P = [
    (0.5, 0.25, 0.25),
    (0.7, 0.2, 0.1),
    (0.2, 0.6, 0.2),
    (0.5, 0.4, 0.1),
    (0.1, 0.1, 0.8),
    (0.9, 0.05, 0.05),
    (0.05, 0.05, 0.9),
]
HAND_LABELS = [0, 0, 1, 1, 2, 3, -1]
HAND_S = [[1.2, 0.45, 0.35], [0.7, 1.0, 0.3], [0.1, 0.1, 0.8]]
HAND_N = [2, 2, 1]
HAND_H = [[2, 0, 0], [1, 1, 0], [0, 0, 1]]
HAND_M = [[0.6, 0.225, 0.175], [0.35, 0.5, 0.15], [0.1, 0.1, 0.8]]
HAND_MS = [0.6, 0.5, 0.8]


def hand_logits(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    p = torch.tensor(HAND_P, dtype=torch.float64)
    shift = torch.tensor([0.0, 3.0, -2.0, 1.5, 7.0, -4.0, 0.3], dtype=torch.float64)[:, None]
    bg = torch.tensor([5.0, -1.0, 0.0, 2.0, 10.0, 30.0, -3.0], dtype=torch.float64)[:, None]
    return torch.cat([torch.log(p) + shift, bg], dim=1).to(dtype)


def space(k: int, tag: str = "") -> CategorySpace:
    return CategorySpace(
        ids=tuple(range(1, k + 1)),
        names=tuple(f"c{i}{tag}" for i in range(k)),
        frequency=tuple("rcf"[i % 3] for i in range(k)),
        image_count=tuple(5 + 10 * i for i in range(k)),
    )


def random_batch(
    r: int, k: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(r, k + 1, generator=g) * 2.0).to(dtype)
    labels = torch.randint(-1, k + 1, (r,), generator=g)
    return logits, labels


def reference_sums(logits: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Straightforward float64 reference: softmax in float64, explicit loops via index_put_."""
    pos = (labels >= 0) & (labels < k)
    z = logits[pos, :k].to(torch.float64)
    p = torch.softmax(z, dim=1)
    y = labels[pos].long()
    S = torch.zeros(k, k, dtype=torch.float64).index_put_((y,), p, accumulate=True)
    n = torch.bincount(y, minlength=k)
    H = torch.zeros(k, k, dtype=torch.int64)
    H.index_put_((y, p.argmax(dim=1)), torch.ones_like(y), accumulate=True)
    return S, n, H


# ----------------------------------------------------------------------------- hand example


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_example_sums_confusion_mean_score(dtype: torch.dtype) -> None:
    st = ClassStats.zeros(3)
    st.update(hand_logits(dtype), torch.tensor(HAND_LABELS))
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(st.S, torch.tensor(HAND_S, dtype=torch.float64), atol=tol, rtol=0)
    assert st.n.tolist() == HAND_N
    assert st.H.tolist() == HAND_H
    torch.testing.assert_close(st.confusion(), torch.tensor(HAND_M, dtype=torch.float64), atol=tol, rtol=0)
    torch.testing.assert_close(st.mean_score(), torch.tensor(HAND_MS, dtype=torch.float64), atol=tol, rtol=0)
    assert st.empty_classes().tolist() == [False, False, False]
    assert (st.rows, st.background, st.ignored) == (7, 1, 1)
    assert st.S.dtype == torch.float64 and st.n.dtype == torch.int64 and st.H.dtype == torch.int64


def test_foreground_probs_drops_background() -> None:
    p = foreground_probs(hand_logits())
    torch.testing.assert_close(p, torch.tensor(HAND_P, dtype=torch.float64), atol=1e-12, rtol=0)
    # half logits are computed in float32 and rows still sum to 1
    p16 = foreground_probs(hand_logits(torch.float16))
    assert p16.dtype == torch.float32
    torch.testing.assert_close(p16.sum(1), torch.ones(7), atol=1e-6, rtol=0)
    # numerically stable: huge logits do not overflow
    big = torch.tensor([[1000.0, 999.0, -1000.0, 5.0]])
    pb = foreground_probs(big)
    assert torch.isfinite(pb).all()
    torch.testing.assert_close(pb[0, :2], torch.tensor([1 / (1 + math.e**-1), 1 / (1 + math.e)]))


def test_batch_sums_tuple_and_accumulator_forms() -> None:
    S, n, H = batch_sums(hand_logits(), torch.tensor(HAND_LABELS), 3)
    torch.testing.assert_close(S, torch.tensor(HAND_S, dtype=torch.float64))
    out = (
        torch.ones(3, 3, dtype=torch.float64),
        torch.ones(3, dtype=torch.int64),
        torch.ones(3, 3, dtype=torch.int64),
    )
    res = batch_sums(hand_logits(), torch.tensor(HAND_LABELS), 3, out=out)
    assert res.S is out[0] and res.n is out[1] and res.H is out[2]  # accumulated in place
    torch.testing.assert_close(out[0], S + 1)
    assert out[1].tolist() == [x + 1 for x in HAND_N] and torch.equal(out[2], H + 1)
    with pytest.raises(PcbkitError, match="out"):
        batch_sums(hand_logits(), torch.tensor(HAND_LABELS), 3, out=(S.float(), n, H))


# ----------------------------------------------------------------------------- properties


def test_matches_reference_across_chunking_and_paths() -> None:
    # K = 200 with many rows: exercises the float32 window (flushes when a class reaches 64
    # terms, touched-rows and full flushes) and the per-class cascade path (a chunk with > 64 rows
    # of one class), against a float64 reference.
    k = 200
    logits, labels = random_batch(12_000, k, seed=1)
    labels[:2500] = 7  # a run of one class (image-ordered dumps look like this)
    labels[2500:5000] = torch.randint(0, 10, (2500,))  # few classes: touched-row flushes
    S_ref, n_ref, H_ref = reference_sums(logits, labels, k)
    for chunk in (250, 2048, 100_000):
        S, n, H = batch_sums(logits, labels, k, chunk_rows=chunk)
        torch.testing.assert_close(S, S_ref, rtol=2e-6, atol=1e-6)
        assert torch.equal(n, n_ref) and torch.equal(H, H_ref)


def test_merge_of_shards_equals_one_pass() -> None:
    k = 7
    logits, labels = random_batch(3000, k, seed=2)
    one = ClassStats.zeros(k).update(logits, labels)
    shards = [ClassStats.zeros(k).update(logits[a : a + 1000], labels[a : a + 1000]) for a in (0, 1000, 2000)]
    merged = ClassStats.merge(ClassStats.merge(shards[0], shards[1]), shards[2])
    summed = shards[0] + shards[1] + shards[2]
    for m in (merged, summed):
        torch.testing.assert_close(m.S, one.S, rtol=1e-6, atol=1e-9)
        assert torch.equal(m.n, one.n) and torch.equal(m.H, one.H)
        assert (m.rows, m.background, m.ignored) == (one.rows, one.background, one.ignored)
        torch.testing.assert_close(m.confusion(), one.confusion(), rtol=1e-6, atol=1e-9)


def test_merge_checks_k_and_category_space() -> None:
    a = ClassStats.zeros(3, categories=space(3))
    with pytest.raises(PcbkitError, match="K differs"):
        ClassStats.merge(a, ClassStats.zeros(4))
    with pytest.raises(PcbkitError, match="category space mismatch"):
        _ = a + ClassStats.zeros(3, categories=space(3, tag="x"))
    both = a + ClassStats.zeros(3)  # one side without a space: the other's is kept
    assert both.categories == space(3)


def test_update_invariant_to_row_order() -> None:
    k = 11
    logits, labels = random_batch(4000, k, seed=3)
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(0))
    a = ClassStats.zeros(k).update(logits, labels)
    b = ClassStats.zeros(k).update(logits[perm], labels[perm])
    torch.testing.assert_close(a.S, b.S, rtol=1e-6, atol=1e-9)
    assert torch.equal(a.n, b.n) and torch.equal(a.H, b.H)


def test_float16_logits_round_trip_within_tolerance() -> None:
    k = 9
    logits, labels = random_batch(2000, k, seed=4)
    full = ClassStats.zeros(k).update(logits, labels)
    half = ClassStats.zeros(k).update(logits.half(), labels)
    assert torch.equal(full.n, half.n)
    # float16 keeps ~3 significant digits of logits in [-8, 8]: p moves by < ~0.5%
    torch.testing.assert_close(half.confusion(), full.confusion(), atol=2e-3, rtol=0)
    # arg-max counts may only differ on near-ties
    assert int((half.H - full.H).abs().sum()) <= 2 * 10


def test_numpy_inputs_and_bfloat16_accepted() -> None:
    z = hand_logits(torch.float32)
    st = ClassStats.zeros(3).update(z.numpy(), np.array(HAND_LABELS))
    torch.testing.assert_close(st.S, torch.tensor(HAND_S, dtype=torch.float64), atol=1e-6, rtol=0)
    sb = ClassStats.zeros(3).update(z.bfloat16(), torch.tensor(HAND_LABELS))
    torch.testing.assert_close(sb.confusion(), torch.tensor(HAND_M, dtype=torch.float64), atol=2e-2, rtol=0)


def test_empty_classes_identity_rows_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    st = ClassStats.zeros(4, source="val-dump")
    st.update(hand_logits_k4(), torch.tensor([0, 0, 1, 4]))  # classes 2 and 3 have no positive
    assert st.empty_classes().tolist() == [False, False, True, True]
    with caplog.at_level(logging.WARNING, logger="pcb_analysis.stats"):
        m = st.confusion()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 classes" in warnings[0].getMessage()
    assert "val-dump" in warnings[0].getMessage()
    torch.testing.assert_close(m[2:], torch.eye(4, dtype=torch.float64)[2:])
    torch.testing.assert_close(m.sum(1), torch.ones(4, dtype=torch.float64))
    assert st.mean_score(warn=False)[2:].tolist() == [1.0, 1.0]


def hand_logits_k4() -> torch.Tensor:
    return torch.tensor([[2.0, 0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0, 1.0],
                         [0.0, 0.0, 0.0, 9.0, 1.0]])


def test_all_background_input() -> None:
    k = 5
    logits, _ = random_batch(300, k, seed=5)
    st = ClassStats.zeros(k).update(logits, torch.full((300,), k))
    assert st.S.abs().sum() == 0 and st.n.sum() == 0 and st.H.sum() == 0
    assert st.background == 300 and st.empty_classes().all()
    torch.testing.assert_close(st.confusion(warn=False), torch.eye(k, dtype=torch.float64))
    # an empty batch is fine too
    st.update(torch.zeros(0, k + 1), torch.zeros(0, dtype=torch.int64))
    assert st.rows == 300


def test_ignored_labels_do_not_count() -> None:
    k = 6
    logits, labels = random_batch(1000, k, seed=6)
    keep = labels != -1
    a = ClassStats.zeros(k).update(logits, labels)
    b = ClassStats.zeros(k).update(logits[keep], labels[keep])
    torch.testing.assert_close(a.S, b.S, rtol=1e-6, atol=1e-9)
    assert torch.equal(a.n, b.n) and torch.equal(a.H, b.H)
    assert a.ignored == int((~keep).sum()) and b.ignored == 0


def test_row_normalise_golden() -> None:
    # S row 0 = (1, 3) / n 4 -> (0.25, 0.75); row 1 has n = 0 -> identity row (0, 1)
    s_rows = torch.tensor([[1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    m, empty = row_normalise(s_rows, torch.tensor([4, 0]))
    assert m.tolist() == [[0.25, 0.75], [0.0, 1.0]] and empty.tolist() == [False, True]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["positive", "background_row", "background_column"])
def test_non_finite_logits_rejected_naming_the_shard(bad: float, where: str) -> None:
    logits = hand_logits(torch.float16)
    if where == "positive":
        logits[3, 1] = bad
    elif where == "background_row":
        logits[5, 0] = bad
    else:
        logits[2, 3] = bad
    st = ClassStats.zeros(3)
    with pytest.raises(PcbkitError, match=r"shard-00042.*NaN/inf.*row \d"):
        st.update(logits, torch.tensor(HAND_LABELS), source="dump/shard-00042")


def test_non_finite_found_in_long_batch_with_row_number() -> None:
    logits, _ = random_batch(6000, 30, seed=7)
    labels = torch.randint(0, 30, (6000,), generator=torch.Generator().manual_seed(1))
    logits[5003, 4] = float("nan")
    with pytest.raises(PcbkitError, match="row 5003"):
        batch_sums(logits, labels, 30, chunk_rows=512, source="s")
    with pytest.raises(PcbkitError, match="row 5003"):
        check_finite(logits, source="s")


def test_minus_inf_foreground_is_probability_zero_in_batch_sums() -> None:
    # batch_sums lets a -inf foreground logit through (p = 0 exactly); ClassStats.update (strict) refuses it
    z = torch.tensor([[0.0, -float("inf"), 0.0, 1.0]])
    S, n, _ = batch_sums(z, torch.tensor([0]), 3)
    assert S[0].tolist() == [0.5, 0.0, 0.5] and n.tolist() == [1, 0, 0]
    with pytest.raises(PcbkitError, match="NaN/inf"):
        ClassStats.zeros(3).update(z, torch.tensor([0]))


def test_wrong_k_shapes_and_labels_rejected() -> None:
    st = ClassStats.zeros(3)
    with pytest.raises(PcbkitError, match=r"shardA: logits have K=4.*expected K=3"):
        st.update(torch.zeros(2, 5), torch.tensor([0, 1]), source="shardA")
    with pytest.raises(PcbkitError, match="label 4 out of range"):
        st.update(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(PcbkitError, match="label -2 out of range"):
        st.update(torch.zeros(2, 4), torch.tensor([-2, 0]))
    with pytest.raises(PcbkitError, match="integer"):
        st.update(torch.zeros(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(PcbkitError, match=r"labels must be \[R\]"):
        st.update(torch.zeros(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(PcbkitError, match="floating point"):
        st.update(torch.zeros(2, 4, dtype=torch.int64), torch.tensor([0, 1]))
    assert st.rows == 0 and st.n.sum() == 0  # nothing was accumulated


# ----------------------------------------------------------------------------- persistence


def filled_stats() -> ClassStats:
    st = ClassStats.zeros(3, categories=space(3), source="dumps/m/val", split="val")
    return st.update(hand_logits(), torch.tensor(HAND_LABELS))


def test_save_load_round_trip(tmp_path: Path) -> None:
    st = filled_stats()
    path = st.save(tmp_path / "val.npz")
    back = ClassStats.load(path, categories=space(3))
    assert torch.equal(back.S, st.S) and torch.equal(back.n, st.n) and torch.equal(back.H, st.H)
    assert back.categories == st.categories and back.category_hash == space(3).hash
    assert (back.source, back.split, back.rows, back.background, back.ignored) == (
        "dumps/m/val", "val", 7, 1, 1
    )
    with np.load(path) as data:  # derived arrays for convenience
        np.testing.assert_allclose(data["CM"], np.array(HAND_M), atol=1e-12)
        np.testing.assert_allclose(data["MS"], np.array(HAND_MS), atol=1e-12)
        meta = json.loads(str(data["meta"]))
    assert meta["schema_version"] == 1 and meta["category_hash"] == space(3).hash
    assert meta["counts"] == {"rows": 7, "positives": 5, "background": 1, "ignored": 1, "empty_classes": 0}
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_load_refuses_category_hash_mismatch(tmp_path: Path) -> None:
    path = filled_stats().save(tmp_path / "val.npz")
    with pytest.raises(PcbkitError, match="category space mismatch"):
        ClassStats.load(path, categories=space(3, tag="other"))
    bare = ClassStats.zeros(3).save(tmp_path / "bare.npz")
    with pytest.raises(PcbkitError, match="carries no category space"):
        ClassStats.load(bare, categories=space(3))
    assert ClassStats.load(bare).categories is None


def test_load_errors_missing_corrupt_schema(tmp_path: Path) -> None:
    with pytest.raises(PcbkitError, match="not found"):
        ClassStats.load(tmp_path / "nope.npz")
    good = filled_stats().save(tmp_path / "good.npz")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(PcbkitError, match=r"trunc\.npz: is not a pcbkit statistics file"):
        ClassStats.load(trunc)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(PcbkitError, match="is not a pcbkit statistics file"):
        ClassStats.load(junk)
    # a future schema version
    with np.load(good) as d:
        arrays = {name: d[name] for name in d.files}
    meta = json.loads(str(arrays["meta"]))
    meta["schema_version"] = 99
    arrays["meta"] = np.array(json.dumps(meta))
    future = tmp_path / "future.npz"
    with open(future, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(PcbkitError, match="schema_version"):
        ClassStats.load(future)
    # a plain npz that is not ours
    other = tmp_path / "other.npz"
    with open(other, "wb") as f:
        np.savez(f, x=np.zeros(3))
    with pytest.raises(PcbkitError, match="missing array"):
        ClassStats.load(other)


def test_failed_save_keeps_existing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = filled_stats().save(tmp_path / "val.npz")
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(PcbkitError, match=r"val\.npz: cannot write \(disk full\)$"):  # one line, by name
        ClassStats.zeros(3).save(path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


# ----------------------------------------------------------------------------- online EMA


def test_ema_update_golden() -> None:
    # mu = 0.5. Row 0: batch mean S_b[0] / n_b[0] = (1.0, 0.6, 0.4) / 2 = (0.5, 0.3, 0.2)
    #   new = 0.5 * (0.8, 0.1, 0.1) + 0.5 * (0.5, 0.3, 0.2) = (0.65, 0.2, 0.15)   (sums to 1)
    # Row 1: n_b = 0 -> untouched. Row 2: mean (0.2, 0.2, 0.6) / 1
    #   new = 0.5 * (0, 0, 1) + 0.5 * (0.2, 0.2, 0.6) = (0.1, 0.1, 0.8)
    m = torch.tensor([[0.8, 0.1, 0.1], [0.3, 0.3, 0.4], [0.0, 0.0, 1.0]], dtype=torch.float64)
    s_b = torch.tensor([[1.0, 0.6, 0.4], [0.0, 0.0, 0.0], [0.2, 0.2, 0.6]], dtype=torch.float64)
    n_b = torch.tensor([2, 0, 1])
    out = ema_update_(m, s_b, n_b, 0.5)
    assert out is m
    torch.testing.assert_close(m, torch.tensor([[0.65, 0.2, 0.15], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]],
                                               dtype=torch.float64), atol=1e-15, rtol=0)


def test_ema_update_renormalises_and_starts_from_zero() -> None:
    # From M = 0 (docs/method.md §4.1 start), the first update of a class sets its row to the batch mean:
    #   0.99 * 0 + 0.01 * mean -> renormalised -> mean.
    m = torch.zeros(3, 3, dtype=torch.float32)
    s_b = torch.tensor([[0.0, 0.0, 0.0], [0.6, 2.4, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # float64 counts (OnlineConfusion)
    ema_update_(m, s_b, torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64), 0.99)
    torch.testing.assert_close(m[1], torch.tensor([0.2, 0.8, 0.0]))
    assert m[0].abs().sum() == 0 and m[2].abs().sum() == 0
    # a second batch of class 1 moves it by (1 - mu) toward the new mean: 0.99*(0.2, 0.8) + 0.01*(1, 0)
    ema_update_(m, torch.tensor([[0.0] * 3, [1.0, 0.0, 0.0], [0.0] * 3], dtype=torch.float64),
                torch.tensor([0, 1, 0]), 0.99)
    torch.testing.assert_close(m[1], torch.tensor([0.208, 0.792, 0.0]))


def test_ema_update_properties() -> None:
    g = torch.Generator().manual_seed(8)
    k = 6
    m = torch.rand(k, k, generator=g, dtype=torch.float64)
    m /= m.sum(1, keepdim=True)
    for step in range(5):
        logits, labels = random_batch(40, k, seed=100 + step)
        labels[labels == 2] = k  # class 2 never appears
        before = m.clone()
        s_b, n_b, _ = batch_sums(logits, labels, k)
        ema_update_(m, s_b, n_b, 0.9)
        present = n_b > 0
        assert torch.equal(m[~present], before[~present])  # absent classes bit-for-bit untouched
        assert not torch.equal(m[present], before[present])
        torch.testing.assert_close(m.sum(1), torch.ones(k, dtype=torch.float64))
    # mu = 0: the row becomes this batch's mean == the offline confusion row of the same batch
    # (up to the EMA's renormalisation: rows of S / n sum to 1 only up to float32 rounding of p)
    logits, labels = random_batch(500, k, seed=9)
    s_b, n_b, _ = batch_sums(logits, labels, k)
    ema_update_(m, s_b, n_b, 0.0)
    offline = ClassStats.zeros(k).update(logits, labels).confusion(warn=False)
    offline = offline / offline.sum(1, keepdim=True)
    torch.testing.assert_close(m[n_b > 0], offline[n_b > 0], rtol=1e-12, atol=1e-12)
    with pytest.raises(PcbkitError, match="momentum"):
        ema_update_(m, s_b, n_b, 1.0)
