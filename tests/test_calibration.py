"""Tests of pcb_analysis.calibration (docs/method.md §3): hand-computed goldens and properties.

q [R, K+1] probabilities, background = column K; p = q[:K] / (1 - q[K]); q~[:K] = (1 - q[K]) p~.
"""

from __future__ import annotations

import pytest
import torch

from pcb_analysis.calibration import (
    CALIBRATORS,
    OPERANDS,
    Calibrator,
    calibrate,
    calibrate_logits,
    logit_adjust,
    norcal,
)
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_analysis.stats import ClassStats

F64 = torch.float64

# The 3-class example worked by hand. Confusion matrix (rows sum to 1):
#   M = [[0.5, 0.5,  0   ],    class 0 is seen as class 1 half of the time
#        [0,   1,    0   ],
#        [0,   0.25, 0.75]]    class 2 is seen as class 1 a quarter of the time
# Inverse (solve x M = y): y0 = 0.5 x0; y1 = 0.5 x0 + x1 + 0.25 x2; y2 = 0.75 x2, so
#   x0 = 2 y0,  x2 = 4/3 y2,  x1 = y1 - y0 - y2 / 3.
# Two proposals, background probability 0.5 each:
#   q_a = (0.1, 0.3, 0.1 | 0.5)   -> p_a = (0.2, 0.6, 0.2)
#   q_b = (0.05, 0.05, 0.4 | 0.5) -> p_b = (0.1, 0.1, 0.8)
M_HAND = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.25, 0.75]], dtype=F64)
Q_HAND = torch.tensor([[0.1, 0.3, 0.1, 0.5], [0.05, 0.05, 0.4, 0.5]], dtype=F64)
P_TILDE = {
    "none": [[0.2, 0.6, 0.2], [0.1, 0.1, 0.8]],
    # ms: s = (0.5, 1, 0.75).
    #   a: p / s = (0.4, 0.6, 4/15), sum 19/15 -> (6/19, 9/19, 4/19)
    #   b: p / s = (0.2, 0.1, 16/15), sum 41/30 -> (6/41, 3/41, 32/41)
    "ms": [[6 / 19, 9 / 19, 4 / 19], [6 / 41, 3 / 41, 32 / 41]],
    # cm: a: x = (0.4, 0.6 - 0.2 - 0.2/3, 0.8/3) = (6/15, 5/15, 4/15); sums to 1, nothing clips
    #     b: x = (0.2, 0.1 - 0.1 - 0.8/3, 3.2/3) = (3/15, -4/15, 16/15); clip -> (3/15, 0, 16/15),
    #        sum 19/15 -> (3/19, 0, 16/19)
    "cm": [[6 / 15, 5 / 15, 4 / 15], [3 / 19, 0.0, 16 / 19]],
    # cm-bayes: column sums of M: (0.5, 1.75, 0.75); posterior P(true i | predicted j) = M[i,j] / col j:
    #   col 0 -> (1, 0, 0); col 1 -> (0.5, 1, 0.25) / 1.75 = (2/7, 4/7, 1/7); col 2 -> (0, 0, 1)
    #   a: p~0 = 0.2 + 0.6*2/7 = 13/35; p~1 = 0.6*4/7 = 12/35; p~2 = 0.6/7 + 0.2 = 10/35
    #   b: p~0 = 0.1 + 0.1*2/7 = 0.9/7 = 4.5/35; p~1 = 0.4/7 = 2/35; p~2 = 0.1/7 + 0.8 = 28.5/35
    "cm-bayes": [[13 / 35, 12 / 35, 10 / 35], [4.5 / 35, 2 / 35, 28.5 / 35]],
}


def expected_q(stat: str) -> torch.Tensor:
    pt = torch.tensor(P_TILDE[stat], dtype=F64)
    return torch.cat([0.5 * pt, torch.full((2, 1), 0.5, dtype=F64)], dim=1)  # (1 - q[K]) p~ | q[K]


def random_q(r: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(r, k + 1, generator=g, dtype=F64) * 2
    z[:, k] += torch.randn(r, generator=g, dtype=F64) * 2  # spread of background probabilities
    return torch.softmax(z, dim=1)


def random_confusion(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(k, k, generator=g, dtype=F64) + 2 * k * torch.eye(k, dtype=F64) * torch.rand(
        k, generator=g, dtype=F64
    )
    return m / m.sum(1, keepdim=True)


# ----------------------------------------------------------------------------- hand example


@pytest.mark.parametrize("stat", ["none", "ms", "cm", "cm-bayes"])
def test_hand_example(stat: str) -> None:
    out = calibrate(Q_HAND, stat, M_HAND)
    torch.testing.assert_close(out, expected_q(stat), atol=1e-12, rtol=0)
    # float32 input gives float32 output with the same values
    out32 = calibrate(Q_HAND.float(), stat, M_HAND)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, expected_q(stat).float(), atol=1e-6, rtol=0)


def test_hand_example_from_class_stats_and_mean_score_vector() -> None:
    # a ClassStats whose rows are exactly M: one positive per class with foreground logits log M[i]
    st = ClassStats.zeros(3)
    z = torch.full((3, 4), -5.0, dtype=F64)
    z[:, :3] = torch.log(M_HAND.clamp_min(1e-300))
    st.update(z, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(calibrate(Q_HAND, "cm", st), expected_q("cm"), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        calibrate(Q_HAND, "ms", torch.diagonal(M_HAND)), expected_q("ms"), atol=1e-12, rtol=0
    )


def test_table_is_literal_and_complete() -> None:
    assert list(CALIBRATORS) == ["none", "ms", "cm", "cm-bayes", "norcal"]
    assert list(OPERANDS) == list(CALIBRATORS)
    with pytest.raises(PcbkitError, match="unknown calibration statistic 'cmx'"):
        calibrate(Q_HAND, "cmx", M_HAND)


# ----------------------------------------------------------------------------- properties


def test_identity_matrix_changes_nothing() -> None:
    q = random_q(50, 6, seed=1)
    eye = torch.eye(6, dtype=F64)
    for stat in ("ms", "cm", "cm-bayes"):
        torch.testing.assert_close(calibrate(q, stat, eye), q, atol=1e-12, rtol=0)


def test_diagonal_matrix_cm_equals_ms(caplog: pytest.LogCaptureFixture) -> None:
    # MS is CM with M replaced by its diagonal diag(s): p diag(s)^-1 = p / s, nothing clips, and the
    # renormalisation is the same. (diag(s) is not row-stochastic: accepted with a warning.)
    s = torch.tensor([0.9, 0.5, 0.2, 0.7], dtype=F64)
    q = random_q(40, 4, seed=2)
    cm = calibrate(q, "cm", torch.diag(s))
    assert "do not sum to 1" in caplog.text
    torch.testing.assert_close(cm, calibrate(q, "ms", torch.diag(s)), atol=1e-15, rtol=1e-14)
    torch.testing.assert_close(cm, calibrate(q, "ms", s), atol=1e-15, rtol=1e-14)
    # with a ridge too: M_l = diag((1 - l) s + l) is still diagonal
    torch.testing.assert_close(
        calibrate(q, "cm", torch.diag(s), ridge=0.2), calibrate(q, "ms", s, ridge=0.2), atol=1e-15, rtol=1e-14
    )


def test_ms_from_matrix_or_vector_and_full_ridge() -> None:
    # ms from M and from its diagonal agree, also with a ridge (diag of M_l = (1 - l) s + l);
    # ridge 1 makes every matrix statistic the identity: no change.
    q = random_q(30, 5, seed=3)
    m = random_confusion(5, seed=3)
    for lam in (0.0, 0.3):
        a = calibrate(q, "ms", m, ridge=lam)
        b = calibrate(q, "ms", torch.diagonal(m), ridge=lam)  # ms from the mean-score vector
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)
    for stat in ("ms", "cm", "cm-bayes"):  # ridge 1 -> identity -> no change
        torch.testing.assert_close(calibrate(q, stat, m, ridge=1.0), q, atol=1e-12, rtol=0)


@pytest.mark.parametrize("stat", ["none", "ms", "cm", "cm-bayes", "norcal"])
def test_rows_sum_to_one_background_unchanged(stat: str) -> None:
    k = 8
    q = random_q(200, k, seed=4)
    q[0] = 0.0
    q[0, k] = 1.0  # no foreground mass at all
    freq = torch.arange(1, k + 1, dtype=F64) ** 2
    out = calibrate(q, stat, random_confusion(k, seed=5), freq=freq)
    torch.testing.assert_close(out.sum(1), torch.ones(200, dtype=F64), atol=1e-12, rtol=0)
    assert torch.equal(out[:, k], q[:, k])
    assert (out >= 0).all()
    assert torch.equal(out[0], q[0])


def test_planted_asymmetric_confusion_recovered_by_cm() -> None:
    # The model's foreground distribution is the true one seen through an asymmetric channel M:
    # p = p* M, with p* sharp around the true class. A chain of pairwise biases: class 0 is mostly
    # reported as class 1 and class 1 as class 2, never the reverse. The arg-max of p is then wrong
    # for most of classes 0 and 1. MS only rescales columns: class 0's p ~ (0.4, 0.55) / s with
    # s_0 ~ s_1, so it stays wrong; undoing the channel measured on the same data (Table 1 setting)
    # restores it.
    k = 4
    m_true = torch.tensor(
        [
            [0.40, 0.55, 0.03, 0.02],
            [0.02, 0.40, 0.55, 0.03],
            [0.02, 0.03, 0.90, 0.05],
            [0.02, 0.03, 0.05, 0.90],
        ],
        dtype=F64,
    )
    g = torch.Generator().manual_seed(6)
    r = 4000
    y = torch.randint(0, k, (r,), generator=g)
    p_star = torch.softmax(
        3.0 * torch.nn.functional.one_hot(y, k).to(F64) + 0.7 * torch.randn(r, k, generator=g, dtype=F64), 1
    )
    p = p_star @ m_true
    logits = torch.cat(
        [torch.log(p), torch.randn(r, 1, generator=g, dtype=F64)], dim=1
    )  # any background logit
    st = ClassStats.zeros(k).update(logits, y)
    q = torch.softmax(logits, dim=1)
    acc = {
        s: float((calibrate(q, s, st)[:, :k].argmax(1) == y).double().mean())
        for s in ("none", "ms", "cm", "cm-bayes")
    }
    assert acc["none"] < 0.65, acc
    assert acc["cm"] > 0.9, acc
    assert acc["cm"] > acc["none"] + 0.25 and acc["cm"] > acc["ms"] + 0.1, acc
    # calibrated scores keep the background probability
    torch.testing.assert_close(calibrate(q, "cm", st)[:, k], q[:, k])


def test_calibrate_logits_equals_calibrate_of_softmax_and_chunking() -> None:
    k = 5
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(57, k + 1, generator=g) * 3
    m = random_confusion(k, seed=8)
    for stat in ("none", "ms", "cm", "cm-bayes"):
        a = calibrate_logits(logits, stat, m, chunk_rows=10)
        b = calibrate(torch.softmax(logits.double(), 1), stat, m)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b.float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(calibrate(torch.softmax(logits.double(), 1), stat, m, chunk_rows=4), b)


def test_calibrator_prepared_once_reused() -> None:
    m = random_confusion(6, seed=9)
    cal = Calibrator.build("cm", m, ridge=0.1)
    torch.testing.assert_close(cal.operand, torch.linalg.inv(0.9 * m + 0.1 * torch.eye(6, dtype=F64)))
    q = random_q(20, 6, seed=10)
    torch.testing.assert_close(cal(q), calibrate(q, "cm", m, ridge=0.1))
    torch.testing.assert_close(cal.to("cpu")(q[:3]), cal(q)[:3])


def test_class_stats_with_empty_class_uses_identity_row(caplog: pytest.LogCaptureFixture) -> None:
    st = ClassStats.zeros(3)
    st.update(
        torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]), torch.tensor([0, 1])
    )  # class 2 empty
    out = calibrate(Q_HAND, "cm", st)
    assert "1 of 3 classes" in caplog.text
    torch.testing.assert_close(out.sum(1), torch.ones(2, dtype=F64))


# ----------------------------------------------------------------------------- NorCal / logit adjustment


def test_norcal_hand_example_and_logit_adjust_equivalence() -> None:
    # freq (1, 4, 16), gamma 1, p = (0.2, 0.6, 0.2): p / f = (0.2, 0.15, 0.0125), sum 0.3625
    #   -> (0.2, 0.15, 0.0125) / 0.3625 = (16/29, 12/29, 1/29)
    p = torch.tensor([[0.2, 0.6, 0.2]], dtype=F64)
    freq = torch.tensor([1.0, 4.0, 16.0], dtype=F64)
    torch.testing.assert_close(norcal(p, freq, 1.0), torch.tensor([[16 / 29, 12 / 29, 1 / 29]], dtype=F64))
    torch.testing.assert_close(norcal(p, freq, 0.0), p)  # gamma 0: no change
    # logit adjustment of the foreground logits == NorCal with gamma = tau on p (prior ∝ freq)
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.5], [1.0, 1.0, 1.0, -3.0]], dtype=F64)
    adj = logit_adjust(logits, freq / freq.sum(), tau=0.7)
    assert torch.equal(adj[:, 3], logits[:, 3])
    torch.testing.assert_close(
        torch.softmax(adj[:, :3], 1), norcal(torch.softmax(logits[:, :3], 1), freq, 0.7)
    )
    # through calibrate: with explicit freq, or the training image counts of the category space
    q = torch.softmax(logits, 1)
    a = calibrate(q, "norcal", freq=freq, gamma=0.7)
    space = CategorySpace(
        ids=(1, 2, 3), names=("a", "b", "c"), frequency=("f", "c", "r"), image_count=(1, 4, 16)
    )
    st = ClassStats.zeros(3, categories=space)
    st.update(logits, torch.tensor([0, 1]))
    b = calibrate(q, "norcal", st, gamma=0.7)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, :3] / (1 - q[:, 3:]), norcal(torch.softmax(logits[:, :3], 1), freq, 0.7))
    with pytest.raises(PcbkitError, match="needs class frequencies"):
        calibrate(q, "norcal", torch.eye(3, dtype=F64))


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs() -> None:
    with pytest.raises(PcbkitError, match="K=3, the scores have K=4"):
        calibrate(random_q(2, 4, seed=0), "cm", M_HAND)
    with pytest.raises(PcbkitError, match="singular"):
        calibrate(Q_HAND, "cm", torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=F64))
    # the same singular matrix is fine with a ridge
    calibrate(
        Q_HAND, "cm", torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=F64), ridge=0.01
    )
    with pytest.raises(PcbkitError, match="ridge"):
        calibrate(Q_HAND, "cm", M_HAND, ridge=1.5)
    with pytest.raises(PcbkitError, match="finite and non-negative"):
        calibrate(Q_HAND, "cm", -M_HAND)
    with pytest.raises(PcbkitError, match="needs a confusion matrix"):
        calibrate(Q_HAND, "cm")
    with pytest.raises(PcbkitError, match="probabilities"):
        calibrate(Q_HAND * 5 - 1, "none")
    bad = Q_HAND.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(PcbkitError, match="NaN/inf"):
        calibrate(bad, "ms", M_HAND)
    z = torch.zeros(3, 4)
    z[2, 1] = float("inf")
    with pytest.raises(PcbkitError, match="row 2"):
        calibrate_logits(z, "cm", M_HAND)
    with pytest.raises(PcbkitError, match=r"\[R, K\+1\]"):
        calibrate(torch.ones(4), "none")


def test_calibrate_dump_offline_improves_planted_confusion(tmp_path):
    """Offline path on a dump: cm from the dump's own statistics recovers a planted confusion."""
    from pcb_analysis.calibration import Calibrator, calibrate_dump, positive_accuracy
    from pcb_analysis.categories import CategorySpace
    from pcb_analysis.dumps import DumpWriter

    k = 3
    space = CategorySpace(
        ids=(1, 2, 3), names=("head", "mid", "tail"), frequency=("f", "c", "r"), image_count=(500, 50, 5)
    )
    gen = torch.Generator().manual_seed(0)
    # Planted channel: 70% of the rare class's positives look like the head class (logit +2 there).
    with DumpWriter(tmp_path / "dump", space, "val") as w:
        for img in range(40):
            labels = torch.tensor([0, 1, 2, 2, 3])  # one background row (label K) per image
            logits = torch.randn(5, k + 1, generator=gen) * 0.3
            logits[torch.arange(4), labels[:4]] += 2.0
            if torch.rand((), generator=gen) < 0.7:
                logits[2, 0] += 3.0
                logits[3, 0] += 3.0
            w.add_image(img, torch.zeros(5, 4), logits, labels, torch.ones(5))
    st = ClassStats.from_dump(tmp_path / "dump", progress=False)
    cals = {s: Calibrator.build(s, st) for s in ("none", "cm")}
    rows = 0
    for chunk, out in calibrate_dump(tmp_path / "dump", cals):
        rows += chunk["labels"].shape[0]
        for q in out.values():
            torch.testing.assert_close(q.sum(1), torch.ones(q.shape[0]), atol=1e-5, rtol=0)
        # background probability kept
        bg = torch.softmax(chunk["logits"].float(), 1)[:, k]
        torch.testing.assert_close(out["cm"][:, k], bg, atol=1e-5, rtol=0)
    assert rows == 200
    acc = positive_accuracy(tmp_path / "dump", cals)
    assert acc["cm"]["r"] > acc["none"]["r"] + 0.3
    assert acc["none"]["f"] == pytest.approx(1.0)
