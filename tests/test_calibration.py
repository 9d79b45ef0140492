"""Tests of pcb_analysis.calibration (docs/method.md §3): hand-computed goldens and properties.

q [R, K+1] probabilities, background = column K; p = q[:K] / (1 - q[K]); q~[:K] = (1 - q[K]) p~.
"""

from __future__ import annotations

import pytest
import torch

from pcb_analysis.calibration import (
    CALIBRATORS,
    OPERANDS,
    ROW_STATISTICS,
    Calibrator,
    calibrate,
    calibrate_logits,
    logit_adjust,
    norcal,
)
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import ApiMisuseError, PcbkitError
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
    assert list(CALIBRATORS) == [
        "none", "ms", "cm", "cm-bayes", "norcal", "cm-diagshrink", "cm-tikhonov", "ibu", "ms-eq"
    ]
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


# ----------------------------------------------------------------------------- regularised estimators
# (docs/calibration.md §6). PARAMS: each estimator with one setting of its knob, for the properties.

PARAMS = {
    "cm-diagshrink": {"lam": 0.5},
    "cm-tikhonov": {"tau": 0.1},
    "ibu-uniform": {"k": 3, "start": "uniform"},
    "ibu-ms": {"k": 3, "start": "ms"},
}


def _est(name: str) -> str:
    return name.split("-ms")[0].split("-uniform")[0]


def test_cm_diagshrink_hand_example() -> None:
    # lam = 0.5 on M_HAND: M_l = diag(M) + 0.5 offdiag(M) = [[0.5, 0.25, 0], [0, 1, 0], [0, 0.125, 0.75]].
    # Solve x M_l = y: y0 = 0.5 x0; y1 = 0.25 x0 + x1 + 0.125 x2; y2 = 0.75 x2, so
    #   x0 = 2 y0, x2 = 4/3 y2, x1 = y1 - y0 / 2 - y2 / 6.
    #   a: y = (0.2, 0.6, 0.2) -> x = (6/15, 0.6 - 0.1 - 1/30 = 7/15, 4/15), sum 17/15 -> (6/17, 7/17, 4/17)
    #   b: y = (0.1, 0.1, 0.8) -> x = (3/15, 0.1 - 0.05 - 0.8/6 < 0 -> 0, 16/15) -> (3/19, 0, 16/19)
    pt = torch.tensor([[6 / 17, 7 / 17, 4 / 17], [3 / 19, 0.0, 16 / 19]], dtype=F64)
    want = torch.cat([0.5 * pt, torch.full((2, 1), 0.5, dtype=F64)], dim=1)
    torch.testing.assert_close(calibrate(Q_HAND, "cm-diagshrink", M_HAND, lam=0.5), want, atol=1e-12, rtol=0)


def test_cm_diagshrink_limits_are_cm_and_ms() -> None:
    q = random_q(60, 6, seed=11)
    m = random_confusion(6, seed=11)
    torch.testing.assert_close(calibrate(q, "cm-diagshrink", m, lam=0.0), calibrate(q, "cm", m),
                               atol=0, rtol=0)
    torch.testing.assert_close(calibrate(q, "cm-diagshrink", m, lam=1.0), calibrate(q, "ms", m),
                               atol=1e-15, rtol=1e-14)


# Two-class example for cm-tikhonov and ibu: M2 = [[0.5, 0.5], [0, 1]], p = (0.4, 0.6), no background.
M2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=F64)
Q2 = torch.tensor([[0.4, 0.6, 0.0]], dtype=F64)


def test_cm_tikhonov_hand_example() -> None:
    # tau = 1, D = diag(0.5, 1), p D^-1 = (0.8, 0.6). x = (a, b): x M2 = (a/2, a/2 + b).
    # d/da: (a/2 - 0.4)/2 + (a/2 + b - 0.6)/2 + (a - 0.8) = 0  ->  1.5 a + 0.5 b = 1.3
    # d/db: (a/2 + b - 0.6) + (b - 0.6) = 0                  ->  0.5 a + 2 b = 1.2
    # -> a = 8/11, b = 4.6/11 (both >= 0), renormalised: (8/12.6, 4.6/12.6) = (40/63, 23/63).
    # Closed form: (M^T + D^-1) = [[2.5, 0], [0.5, 2]], (M M^T + I)^-1 = [[2, -0.5], [-0.5, 1.5]] / 2.75,
    # product [[5, -1.25], [0, 2.75]] / 2.75; p times it = (2, 1.15) / 2.75 = (8/11, 4.6/11). Same.
    out = calibrate(Q2, "cm-tikhonov", M2, tau=1.0)
    torch.testing.assert_close(out, torch.tensor([[40 / 63, 23 / 63, 0.0]], dtype=F64), atol=1e-12, rtol=0)


def test_cm_tikhonov_closed_form_is_the_least_squares_minimiser() -> None:
    # The stacked least-squares problem: x [M, sqrt(tau) I] ~ [p, sqrt(tau) p D^-1], solved by lstsq.
    from pcb_analysis.estimators import tikhonov_matrix

    k, tau = 5, 0.3
    m = random_confusion(k, seed=12)
    p = torch.softmax(torch.randn(7, k, generator=torch.Generator().manual_seed(12), dtype=F64), 1)
    a = torch.cat([m, tau**0.5 * torch.eye(k, dtype=F64)], dim=1)  # [K, 2K]
    b = torch.cat([p, tau**0.5 * p / torch.diagonal(m)], dim=1)  # [R, 2K]
    x = torch.linalg.lstsq(a.t(), b.t()).solution.t()
    torch.testing.assert_close(p @ tikhonov_matrix(m, tau), x, atol=1e-12, rtol=0)


def test_cm_tikhonov_limits_are_cm_and_ms() -> None:
    q = random_q(60, 6, seed=13)
    m = random_confusion(6, seed=13)
    torch.testing.assert_close(calibrate(q, "cm-tikhonov", m, tau=0.0), calibrate(q, "cm", m), atol=0, rtol=0)
    torch.testing.assert_close(calibrate(q, "cm-tikhonov", m, tau=1e-9), calibrate(q, "cm", m),
                               atol=1e-6, rtol=0)
    # W -> D^-1 with error O(1/tau): at tau = 1e8 within 1e-6 of ms
    torch.testing.assert_close(calibrate(q, "cm-tikhonov", m, tau=1e8), calibrate(q, "ms", m),
                               atol=1e-6, rtol=0)
    far = (calibrate(q, "cm-tikhonov", m, tau=1.0) - calibrate(q, "ms", m)).abs().max()
    assert far > 1e-3  # the tolerance above is not trivially met


def test_ibu_hand_example_and_limits() -> None:
    # uniform start x = (1/2, 1/2). Step 1: x M2 = (0.25, 0.75); p / (x M2) = (1.6, 0.8);
    #   (ratio M2^T)_i = sum_j ratio_j M2[i, j] = (0.8 + 0.4, 0.8) = (1.2, 0.8); x * that = (0.6, 0.4).
    #   cm-bayes: column sums (0.5, 1.5): p~0 = 0.4 + 0.6 * 0.5/1.5 = 0.6. Equal.
    # Step 2: x M2 = (0.3, 0.7); ratio = (4/3, 6/7); ratio M2^T = (2/3 + 3/7, 6/7) = (23/21, 18/21);
    #   x * that = (13.8/21, 7.2/21) = (23/35, 12/35) (sums to 1 already: sum_i x_i (r M^T)_i = sum_j p_j).
    # ms start: s = (0.5, 1): (0.8, 0.6) / 1.4 = (4/7, 3/7).
    def run(k: int, start: str) -> list[float]:
        return calibrate(Q2, "ibu", M2, k=k, start=start)[0, :2].tolist()

    assert run(1, "uniform") == pytest.approx([0.6, 0.4], abs=1e-12)
    assert run(2, "uniform") == pytest.approx([23 / 35, 12 / 35], abs=1e-12)
    assert run(0, "uniform") == pytest.approx([0.5, 0.5], abs=1e-12)
    assert run(0, "ms") == pytest.approx([4 / 7, 3 / 7], abs=1e-12)
    # many steps approach the interior maximum-likelihood solution p M2^-1 = (0.8, 0.2) (= cm here)
    assert run(2000, "uniform") == pytest.approx([0.8, 0.2], abs=1e-3)
    q = random_q(60, 6, seed=14)
    m = random_confusion(6, seed=14)
    torch.testing.assert_close(calibrate(q, "ibu", m, k=1, start="uniform"), calibrate(q, "cm-bayes", m),
                               atol=1e-14, rtol=0)
    torch.testing.assert_close(calibrate(q, "ibu", m, k=0, start="ms"), calibrate(q, "ms", m),
                               atol=0, rtol=0)
    torch.testing.assert_close(calibrate(Q_HAND, "ibu", M_HAND, k=1, start="uniform"), expected_q("cm-bayes"),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(PARAMS))
def test_estimator_properties(name: str) -> None:
    k = 8
    q = random_q(200, k, seed=15)
    q[0] = 0.0
    q[0, k] = 1.0  # no foreground mass at all
    m = random_confusion(k, seed=16)
    out = calibrate(q, _est(name), m, **PARAMS[name])
    torch.testing.assert_close(out.sum(1), torch.ones(200, dtype=F64), atol=1e-12, rtol=0)
    assert torch.equal(out[:, k], q[:, k])
    assert (out >= 0).all()
    # identity M changes nothing
    torch.testing.assert_close(calibrate(q, _est(name), torch.eye(k, dtype=F64), **PARAMS[name]), q,
                               atol=1e-12, rtol=0)
    # chunking does not change the result; float32 in, float32 out
    torch.testing.assert_close(calibrate(q, _est(name), m, chunk_rows=7, **PARAMS[name]), out, atol=0, rtol=0)
    assert calibrate(q.float(), _est(name), m, **PARAMS[name]).dtype == torch.float32


@pytest.mark.parametrize("name", ["cm-diagshrink", "cm-tikhonov", "ibu-ms"])
def test_diagonal_matrix_gives_ms(name: str) -> None:
    # diagshrink: M_l = diag(s) whatever lam; tikhonov: x (D^2 + tau I) = p (D + tau D^-1)
    # = p D^-1 (D^2 + tau I), so x = p D^-1; ibu from ms: x = c p/s -> x D = c p, the ratio is 1/c,
    # (ratio D)_i / e_i = s_i / (c s_i) with efficiency e = row sums = s: every step keeps x
    # (and from uniform one step gives p/s).
    s = torch.tensor([0.9, 0.5, 0.2, 0.7], dtype=F64)
    q = random_q(40, 4, seed=17)
    out = calibrate(q, _est(name), torch.diag(s), **PARAMS[name])
    torch.testing.assert_close(out, calibrate(q, "ms", s), atol=1e-14, rtol=1e-12)
    if name == "ibu-ms":
        torch.testing.assert_close(calibrate(q, "ibu", torch.diag(s), k=1, start="uniform"), out,
                                   atol=1e-14, rtol=1e-12)


def _planted() -> tuple[torch.Tensor, torch.Tensor, ClassStats]:
    # the asymmetric chain of test_planted_asymmetric_confusion_recovered_by_cm, with noise on log p
    k = 4
    m_true = torch.tensor(
        [[0.40, 0.55, 0.03, 0.02], [0.02, 0.40, 0.55, 0.03],
         [0.02, 0.03, 0.90, 0.05], [0.02, 0.03, 0.05, 0.90]],
        dtype=F64,
    )
    g = torch.Generator().manual_seed(18)
    r = 4000
    y = torch.randint(0, k, (r,), generator=g)
    p_star = torch.softmax(
        3.0 * torch.nn.functional.one_hot(y, k).to(F64) + 0.7 * torch.randn(r, k, generator=g, dtype=F64), 1
    )
    logp = torch.log(p_star @ m_true) + 0.1 * torch.randn(r, k, generator=g, dtype=F64)
    logits = torch.cat([logp, torch.randn(r, 1, generator=g, dtype=F64)], dim=1)
    return torch.softmax(logits, dim=1), y, ClassStats.zeros(k).update(logits, y)


@pytest.mark.parametrize("name", list(PARAMS))
def test_planted_confusion_recovered_better_than_none(name: str) -> None:
    q, y, st = _planted()
    k = q.shape[1] - 1

    def acc(out: torch.Tensor) -> float:
        return float((out[:, :k].argmax(1) == y).double().mean())

    base = acc(calibrate(q, "none", st))
    got = acc(calibrate(q, _est(name), st, **PARAMS[name]))
    assert got > base + 0.1, (base, got)


def test_row_prior_hand_example_and_no_op() -> None:
    # M_HAND with instance counts n = (1, 3, 0) and a = 1:
    #   row 0: (1 * (0.5, 0.5, 0) + (1, 0, 0)) / 2 = (0.75, 0.25, 0); row 1 is e_1 already;
    #   row 2: n = 0 -> e_2.
    # cm on p_a = (0.2, 0.6, 0.2): x0 = 0.2 / 0.75 = 4/15, x1 = 0.6 - 0.25 x0 = 8/15, x2 = 0.2 = 3/15.
    st = ClassStats.zeros(3)
    z = torch.full((3, 4), -5.0, dtype=F64)
    z[:, :3] = torch.log(M_HAND.clamp_min(1e-300))
    st.update(z, torch.tensor([0, 1, 2]))
    st.instances = torch.tensor([1, 3, 0])
    out = calibrate(Q_HAND[:1], "cm", st, row_prior=1.0)
    torch.testing.assert_close(out[0, :3], 0.5 * torch.tensor([4 / 15, 8 / 15, 3 / 15], dtype=F64),
                               atol=1e-12, rtol=0)
    m_prior = torch.tensor([[0.75, 0.25, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    q = random_q(30, 3, seed=19)
    for stat, params in (("ms", {}), ("cm", {}), ("cm-bayes", {}), ("cm-diagshrink", {"lam": 0.3}),
                         ("cm-tikhonov", {"tau": 0.2}), ("ibu", {"k": 2, "start": "ms"})):
        torch.testing.assert_close(calibrate(q, stat, st, row_prior=1.0, **params),
                                   calibrate(q, stat, m_prior, **params), atol=1e-12, rtol=0)
        # a = 0 is a no-op
        torch.testing.assert_close(calibrate(q, stat, st, row_prior=0.0, **params),
                                   calibrate(q, stat, st, **params), atol=0, rtol=0)


def test_estimator_misuse() -> None:
    with pytest.raises(ApiMisuseError, match="missing: lam"):
        calibrate(Q_HAND, "cm-diagshrink", M_HAND)
    with pytest.raises(ApiMisuseError, match="unknown: tau"):
        calibrate(Q_HAND, "cm-diagshrink", M_HAND, lam=0.5, tau=1.0)
    with pytest.raises(ApiMisuseError, match="unknown: lam"):
        calibrate(Q_HAND, "cm", M_HAND, lam=0.5)
    with pytest.raises(ApiMisuseError, match=r"lam must be in \[0.0, 1.0\]"):
        calibrate(Q_HAND, "cm-diagshrink", M_HAND, lam=1.5)
    with pytest.raises(ApiMisuseError, match="tau must be in"):
        calibrate(Q_HAND, "cm-tikhonov", M_HAND, tau=-1.0)
    with pytest.raises(ApiMisuseError, match="k must be an int"):
        calibrate(Q_HAND, "ibu", M_HAND, k=1.5, start="ms")
    with pytest.raises(ApiMisuseError, match="start must be"):
        calibrate(Q_HAND, "ibu", M_HAND, k=1, start="cm")
    with pytest.raises(ApiMisuseError, match="instance counts"):
        calibrate(Q_HAND, "cm", M_HAND, row_prior=1.0)  # a bare matrix has no instance counts
    with pytest.raises(ApiMisuseError, match="instance counts"):
        calibrate(Q_HAND, "cm", ClassStats.zeros(3), row_prior=1.0)
    with pytest.raises(ApiMisuseError, match="row_prior"):
        calibrate(Q_HAND, "cm", M_HAND, row_prior=-1.0)
    # parameterised estimators are library-only: not parameter-free rows of the CLI / study
    assert not {"cm-diagshrink", "cm-tikhonov", "ibu"} & set(ROW_STATISTICS)


def test_ms_eq_hand_example_and_one_iteration_is_ms() -> None:
    # Two classes, three positives (float64 logits = log p, so p is exact):
    #   class 0: p = (0.6, 0.4) and (0.2, 0.8)  -> d_0 = (0.6 + 0.2) / 2 = 0.4
    #   class 1: p = (0.5, 0.5)                 -> d_1 = 0.5
    # iteration 1 (w = 1): mean d = 0.45; eta = 1: w = (0.45/0.4, 0.45/0.5) = (1.125, 0.9)
    #   (∝ 1/d = 1/s: d_j is the mean score s_j, so one iteration with eta = 1 is ms).
    # iteration 2: (w p) renormalised: (0.675, 0.36) -> 0.675/1.035 = 0.6522; (0.225, 0.72) -> 0.225/0.945
    #   = 0.2381; d_0 = 0.44513; class 1: (0.5625, 0.45) -> 0.45/1.0125 = 0.44444 = d_1;
    #   mean 0.44479; w_0 = 1.125 * 0.44479/0.44513, w_1 = 0.9 * 0.44479/0.44444.
    from pcb_analysis.estimators import fit_ms_eq

    p = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]], dtype=F64)
    y = torch.tensor([0, 0, 1])
    logits = torch.cat([torch.log(p), torch.zeros(3, 1, dtype=F64)], dim=1)
    st = ClassStats.zeros(2).update(logits, y)
    w1 = fit_ms_eq((logits, y), st, iterations=1, eta=1.0)
    torch.testing.assert_close(w1, torch.tensor([1.125, 0.9], dtype=F64), atol=1e-12, rtol=0)
    d0 = (0.675 / 1.035 + 0.225 / 0.945) / 2
    d1 = 0.45 / 1.0125
    mean = (d0 + d1) / 2
    w2 = fit_ms_eq((logits, y), st, iterations=2, eta=1.0)
    torch.testing.assert_close(w2, torch.tensor([1.125 * mean / d0, 0.9 * mean / d1], dtype=F64),
                               atol=1e-12, rtol=0)
    q = random_q(30, 2, seed=20)
    torch.testing.assert_close(calibrate(q, "ms-eq", st, iterations=1, eta=1.0), calibrate(q, "ms", st),
                               atol=1e-14, rtol=0)
    # both fits are kept (and saved with the statistics); a setting never fitted is refused
    assert [(f["iterations"], f["eta"]) for f in st.extra["ms_eq"]] == [(1, 1.0), (2, 1.0)]
    with pytest.raises(ApiMisuseError, match="no fit for iterations=10, eta=0.5"):
        calibrate(q, "ms-eq", st, iterations=10, eta=0.5)
    with pytest.raises(ApiMisuseError, match="fit_ms_eq"):
        calibrate(q, "ms-eq", ClassStats.zeros(2), iterations=1, eta=1.0)
    with pytest.raises(ApiMisuseError, match="fit_ms_eq"):
        calibrate(q, "ms-eq", M2, iterations=1, eta=1.0)


def test_ms_eq_properties_and_planted_confusion() -> None:
    from pcb_analysis.estimators import fit_ms_eq

    q, y, st = _planted()
    k = q.shape[1] - 1
    logits = torch.log(q)  # same foreground softmax as the planted logits
    fit_ms_eq((logits, y), st, iterations=10, eta=0.5)
    out = calibrate(q, "ms-eq", st, iterations=10, eta=0.5)
    torch.testing.assert_close(out.sum(1), torch.ones(q.shape[0], dtype=F64), atol=1e-12, rtol=0)
    assert torch.equal(out[:, k], q[:, k]) and (out >= 0).all()
    none = float((q[:, :k].argmax(1) == y).double().mean())
    got = float((out[:, :k].argmax(1) == y).double().mean())
    assert got > none + 0.1, (none, got)
    # positives whose mean scores already agree (symmetric p): w stays 1, ms-eq is a no-op
    p = torch.tensor([[0.7, 0.3], [0.3, 0.7]], dtype=F64)
    sym = torch.cat([torch.log(p), torch.zeros(2, 1, dtype=F64)], dim=1)
    st2 = ClassStats.zeros(2).update(sym, torch.tensor([0, 1]))
    torch.testing.assert_close(fit_ms_eq((sym, torch.tensor([0, 1])), st2, iterations=5, eta=1.0),
                               torch.ones(2, dtype=F64), atol=1e-15, rtol=0)
    q2 = random_q(20, 2, seed=21)
    torch.testing.assert_close(calibrate(q2, "ms-eq", st2, iterations=5, eta=1.0), q2, atol=1e-15, rtol=0)


def test_prepared_estimators_move_and_ms_eq_fit_survives_save_load(tmp_path) -> None:
    from pcb_analysis.estimators import fit_ms_eq

    q, y, st = _planted()
    for stat, params in (("ibu", {"k": 2, "start": "uniform"}), ("cm-tikhonov", {"tau": 0.5})):
        cal = Calibrator.build(stat, st, **params).to("cpu")  # the ibu operand is not a bare tensor
        assert cal.params == tuple(sorted(params.items()))
        torch.testing.assert_close(cal(q), calibrate(q, stat, st, **params), atol=0, rtol=0)
    fit_ms_eq((torch.log(q), y), st, iterations=3, eta=0.5)
    st.save(tmp_path / "s.npz")
    back = ClassStats.load(tmp_path / "s.npz")
    torch.testing.assert_close(calibrate(q, "ms-eq", back, iterations=3, eta=0.5),
                               calibrate(q, "ms-eq", st, iterations=3, eta=0.5), atol=0, rtol=0)


def test_background_norcal_switch() -> None:
    # ms on q_a = (0.1, 0.3, 0.1 | 0.5), s = (0.5, 1, 0.75): the foreground scaled, background not,
    # renormalised over K+1: (0.2, 0.3, 2/15, 0.5) / (34/30) = (6, 9, 4, 15) / 34.
    out = calibrate(Q_HAND[:1], "ms", M_HAND, background="norcal")
    torch.testing.assert_close(out[0], torch.tensor([6, 9, 4, 15], dtype=F64) / 34, atol=1e-12, rtol=0)
    # NorCal with its own background rule is the K+1 softmax of the logit-adjusted logits
    k = 5
    z = torch.randn(40, k + 1, generator=torch.Generator().manual_seed(22), dtype=F64)
    prior = torch.tensor([50.0, 20.0, 5.0, 2.0, 1.0], dtype=F64)
    torch.testing.assert_close(
        calibrate(torch.softmax(z, 1), "norcal", freq=prior, gamma=0.7, background="norcal"),
        torch.softmax(logit_adjust(z, prior, tau=0.7), 1), atol=1e-12, rtol=0,
    )
    # maps whose output already sums to 1 (none, cm-bayes, ibu) are the same under both rules;
    # every rule gives rows that sum to 1 and non-negative entries
    q = random_q(50, 6, seed=23)
    m = random_confusion(6, seed=23)
    for stat, params in (("none", {}), ("cm-bayes", {}), ("ibu", {"k": 2, "start": "ms"})):
        torch.testing.assert_close(calibrate(q, stat, m, background="norcal", **params),
                                   calibrate(q, stat, m, **params), atol=1e-12, rtol=0)
    for stat, params in (("ms", {}), ("cm", {}), ("cm-tikhonov", {"tau": 0.1})):
        out = calibrate(q, stat, m, background="norcal", **params)
        torch.testing.assert_close(out.sum(1), torch.ones(50, dtype=F64), atol=1e-12, rtol=0)
        assert (out >= 0).all()
    with pytest.raises(ApiMisuseError, match="background must be"):
        calibrate(q, "ms", m, background="drop")


def test_ms_source_loce() -> None:
    # Two classes, positives (logits over K+1 = 3, background last):
    #   class 0: z = (log 0.6, log 0.2, log 0.2) -> softmax over K+1 (0.6, 0.2, 0.2): q_0 = 0.6
    #            z = (log 0.3, log 0.3, log 0.4) -> q_0 = 0.3                          s_0 = 0.45
    #   class 1: z = (log 0.1, log 0.5, log 0.4) -> q_1 = 0.5                          s_1 = 0.5
    # (the foreground-only diagonal is (0.75 + 0.5) / 2 = 0.625 and 0.5 / 0.6 = 5/6 instead)
    from pcb_analysis.estimators import fit_loce_score

    q_pos = torch.tensor([[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.1, 0.5, 0.4]], dtype=F64)
    y = torch.tensor([0, 0, 1])
    z = torch.log(q_pos)
    st = ClassStats.zeros(2).update(z, y)
    s = fit_loce_score((z, y), st)
    torch.testing.assert_close(s, torch.tensor([0.45, 0.5], dtype=F64), atol=1e-12, rtol=0)
    q = random_q(20, 2, seed=24)
    torch.testing.assert_close(calibrate(q, "ms", st, ms_source="loce"), calibrate(q, "ms", s),
                               atol=1e-14, rtol=0)
    torch.testing.assert_close(calibrate(q, "ms", st, ms_source="diagonal"), calibrate(q, "ms", st),
                               atol=0, rtol=0)
    with pytest.raises(ApiMisuseError, match="fit_loce_score"):
        calibrate(q, "ms", ClassStats.zeros(2).update(z, y), ms_source="loce")
    with pytest.raises(ApiMisuseError, match="ms only"):
        calibrate(q, "cm", st, ms_source="loce")
    with pytest.raises(PcbkitError, match="differ from the statistics"):
        fit_loce_score((z[:2], y[:2]), st)
