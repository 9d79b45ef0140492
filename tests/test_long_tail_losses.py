"""Seesaw / EQLv2 (+ PCB) pieces: hand-worked goldens, limiting identities, the test-time mapping,
and a 2-process gloo run (identical matrices and statistics on both ranks). docs/losses.md."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcb_analysis.errors import ApiMisuseError
from pcb_train.long_tail_losses import (
    eqlv2_scores,
    eqlv2_test_logits,
    one_hot_rows,
    seesaw_scores,
    seesaw_test_logits,
)
from pcb_train.loss_families import EQLv2Loss, SeesawLoss
from pcb_train.pcb_loss import EQLv2GradStats, OnlineConfusion, eqlv2_targets, seesaw_ce

LN = math.log


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------- seesaw_ce


def test_seesaw_ce_golden_mitigation_and_compensation() -> None:
    # K = 3, cum_samples [4, 1, 16], logits [0, 0, ln 2]: softmax s = [1/4, 1/4, 1/2]
    z = _t([[0.0, 0.0, LN(2)], [0.0, 0.0, LN(2)]])
    y = torch.tensor([0, 2])
    cum = torch.tensor([4.0, 1.0, 16.0])
    out = seesaw_ce(z, y, cum, p=0.5, q=2.0, eps=0.01)
    # row 0 (y = 0, c_y = 4): mitigation j=1 (1/4)^0.5 = 0.5, j=2 1 (more samples);
    # compensation j=1 (1/4)/(1/4) = 1 -> 1, j=2 (1/2)/(1/4) = 2 -> 4. z~ = [0, ln .5, ln 8]
    # loss = -log(1 / (1 + 0.5 + 8)) = ln 9.5
    # row 1 (y = 2, c_y = 16): mitigation (4/16)^.5 = .5, (1/16)^.5 = .25; compensation 1, 1
    # z~ = [ln .5, ln .25, ln 2] -> loss = -log(2 / 2.75)
    torch.testing.assert_close(out, _t([[LN(9.5), LN(2.75 / 2)]])[0], rtol=0, atol=1e-12)
    # soft target [0.5, 0.5, 0] on row 0: -(0.5 log(1/9.5) + 0.5 log(0.5/9.5))
    soft = _t([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    out = seesaw_ce(z, y, cum, p=0.5, q=2.0, soft_target=soft)
    torch.testing.assert_close(out[0], torch.tensor(LN(9.5) - 0.5 * LN(0.5), dtype=torch.float64))


def test_seesaw_ce_golden_eps_clamp_and_default_p() -> None:
    z = _t([[0.0, LN(0.002), 0.0]])
    y = torch.tensor([1])
    cum = torch.tensor([4.0, 1.0, 16.0])
    # s_y = 0.002 / 2.002 < eps = 0.01: the compensation divides by 0.01
    s0 = 1.0 / 2.002
    comp = (s0 / 0.01) ** 2
    expected = -LN(0.002 / (2 * comp + 0.002))  # mitigation 1: every other class has more samples
    torch.testing.assert_close(seesaw_ce(z, y, cum)[0], torch.tensor(expected, dtype=torch.float64))
    # default p = 0.8 with label 0 (c = 4): j = 1 gets (1/4)^0.8, compensation off (q = 0)
    z = _t([[0.0, 0.0, 0.0]])
    expected = -LN(1.0 / (1.0 + 0.25**0.8 + 1.0))
    torch.testing.assert_close(
        seesaw_ce(z, torch.tensor([0]), cum, q=0.0)[0], torch.tensor(expected, dtype=torch.float64)
    )


def test_seesaw_ce_identities() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 6, generator=g) * 3
    y = torch.randint(0, 6, (20,), generator=g)
    cum = torch.randint(0, 50, (6,), generator=g).float()
    # p = q = 0: plain cross-entropy
    torch.testing.assert_close(
        seesaw_ce(z, y, cum, p=0.0, q=0.0), F.cross_entropy(z, y, reduction="none"), rtol=0, atol=1e-6
    )
    # one-hot soft target: the hard-label loss
    onehot = F.one_hot(y, 6).float()
    torch.testing.assert_close(seesaw_ce(z, y, cum, soft_target=onehot), seesaw_ce(z, y, cum), rtol=0, atol=0)
    # the loss is linear in the target: (1 - a) hard + a soft = soft target (1 - a) e_y + a t
    t = torch.softmax(torch.randn(20, 6, generator=g), 1)
    a = 0.3
    mixed = seesaw_ce(z, y, cum, soft_target=(1 - a) * onehot + a * t)
    torch.testing.assert_close(
        mixed, (1 - a) * seesaw_ce(z, y, cum) + a * seesaw_ce(z, y, cum, soft_target=t)
    )
    # gradients reach the logits; the weights themselves are detached
    zz = z.clone().requires_grad_(True)
    seesaw_ce(zz, y, cum).sum().backward()
    assert zz.grad is not None and torch.isfinite(zz.grad).all()


def test_seesaw_ce_bad_input() -> None:
    with pytest.raises(ApiMisuseError, match="labels"):
        seesaw_ce(torch.zeros(2, 3), torch.tensor([0, 3]), torch.ones(3))
    with pytest.raises(ApiMisuseError, match="cum_samples"):
        seesaw_ce(torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(4))


def test_seesaw_family_loss_golden() -> None:
    # K = 3; rows: positive of class 0, negative (label 3), ignored (-1). Logits [N, K+2].
    z = _t([[0.0, 0.0, 0.0, 0.0, 0.0], [5.0, -1.0, 2.0, 0.0, LN(3)], [9.0, 9.0, 9.0, 9.0, 9.0]])
    labels = torch.tensor([0, 3, -1])
    loss = SeesawLoss(3)(z, labels)
    # counts after the update [1, 0, 0 | 1]: clamped at 1, so no mitigation; uniform class scores:
    # no compensation. class CE ln 3; objectness: positive [0, 0] -> ln 2, negative [0, ln 3] with
    # label background -> -log(3/4); N = 2 sampled RoIs
    expected = (LN(3) + LN(2) + LN(4 / 3)) / 2
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


def test_seesaw_family_pcb_identities() -> None:
    g = torch.Generator().manual_seed(1)
    k = 4
    z = torch.randn(12, k + 2, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 1, 0, -1, 2, 4, 3])
    base = SeesawLoss(k)(z, labels)
    # alpha_r = 0: the base loss exactly, whatever the matrix
    cm = torch.rand(k, k, generator=g, dtype=torch.float64)
    assert torch.equal(SeesawLoss(k)(z, labels, cm, 0.0), base)
    # identity matrix: every fightback target is one-hot, so the loss is the base loss
    torch.testing.assert_close(SeesawLoss(k)(z, labels, torch.eye(k, dtype=torch.float64), 0.05), base)
    # with a real matrix the loss changes, by (a / N) sum_P [SeesawCE(t) - SeesawCE(y)]
    fam = SeesawLoss(k)
    got = fam(z, labels, cm, 0.5)
    pos = (labels >= 0) & (labels < k)
    y = labels[pos]
    cols = cm.t()[y]
    t = (cols / cols.sum(1, keepdim=True)).float()
    cum = fam.counts.counts[:k]
    diff = (seesaw_ce(z[pos, :k], y, cum, soft_target=t) - seesaw_ce(z[pos, :k], y, cum)).sum() * 0.5 / 11
    torch.testing.assert_close(got, base + diff)


# ----------------------------------------------------------------------------------- EQLv2


def test_eqlv2_targets_golden_and_identity() -> None:
    cm = _t([[0.6, 0.2], [0.1, 0.5]])
    t = eqlv2_targets(cm, torch.tensor([1, 0, 2]), 0.25)
    # label 1: 0.25 [0.2, 0.5] + 0.75 [0, 1]; label 0: 0.25 [0.6, 0.1] + 0.75 [1, 0]; bg: onehot(K)
    torch.testing.assert_close(t, _t([[0.05, 0.875, 0.0], [0.9, 0.025, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(
        eqlv2_targets(cm, torch.tensor([1, 0, 2]), 0.0), F.one_hot(torch.tensor([1, 0, 2]), 3).double()
    )
    # dtype=: the same targets built directly in float32 (what EQLv2Loss asks for its logits)
    t32 = eqlv2_targets(cm, torch.tensor([1, 0, 2]), 0.25, dtype=torch.float32)
    assert t32.dtype == torch.float32 and torch.equal(t32, t.float())
    with pytest.raises(ApiMisuseError):
        eqlv2_targets(cm, torch.tensor([-1]), 0.2)


def test_eqlv2_targets_repeated_classes_row_by_row() -> None:
    """Positives that repeat classes (as a detector's do) get each their own column of M."""
    gen = torch.Generator().manual_seed(3)
    cm = torch.rand(6, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([4, 6, 1, 4, 4, 0, 6, 1])
    t = eqlv2_targets(cm, labels, 0.3)
    for row, y in zip(t, labels.tolist(), strict=True):
        want = torch.zeros(7, dtype=torch.float64)
        want[y] = 1.0
        if y < 6:
            want[:6] = 0.3 * cm[:, y] + 0.7 * want[:6]
        torch.testing.assert_close(row, want, rtol=0, atol=1e-15)


def test_one_hot_rows_equals_one_hot() -> None:
    labels = torch.tensor([3, 0, 0, 2])
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        got = one_hot_rows(labels, 5, dtype)
        assert got.dtype == dtype and torch.equal(got, F.one_hot(labels, 5).to(dtype))


def test_eqlv2_grad_stats_golden() -> None:
    stats = EQLv2GradStats(2, sync=False)
    pos_w, neg_w = stats.weights(torch.device("cpu"), torch.float64)
    assert torch.equal(pos_w, torch.ones(3, dtype=torch.float64)) and torch.equal(neg_w, pos_w)
    # logits 0 -> sigmoid 0.5 -> |grad| 0.5 in every cell; rows: class 0, background
    z = torch.zeros(2, 3, dtype=torch.float64)
    target = _t([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    stats.collect(z, target, torch.ones(2, 3, dtype=torch.float64))
    assert stats.pos_grad.tolist() == [0.5, 0.0] and stats.neg_grad.tolist() == [0.5, 1.0]
    pos_w, neg_w = stats.weights(torch.device("cpu"), torch.float64)
    r0 = 0.5 / (0.5 + 1e-10)
    n0 = 1.0 / (1.0 + math.exp(-12.0 * (r0 - 0.8)))
    n1 = 1.0 / (1.0 + math.exp(-12.0 * (0.0 - 0.8)))
    torch.testing.assert_close(neg_w, _t([[n0, n1, 1.0]])[0])
    torch.testing.assert_close(pos_w, _t([[1 + 4 * (1 - n0), 1 + 4 * (1 - n1), 1.0]])[0])


def test_eqlv2_family_loss_golden_two_calls() -> None:
    fam = EQLv2Loss(2)
    fam.stats.sync = False
    z = torch.zeros(3, 3, dtype=torch.float64)
    labels = torch.tensor([0, 2, -1])
    # first call: weights 1, BCE(0, t) = ln 2 in each of 2 x 3 cells, N = 2
    torch.testing.assert_close(fam(z, labels), torch.tensor(3 * LN(2), dtype=torch.float64))
    # the second call uses the statistics of the first (see test_eqlv2_grad_stats_golden)
    r0 = 0.5 / (0.5 + 1e-10)
    n0 = 1.0 / (1.0 + math.exp(-12.0 * (r0 - 0.8)))
    n1 = 1.0 / (1.0 + math.exp(-12.0 * (-0.8)))
    p0 = 1 + 4 * (1 - n0)
    # row class 0: pos_w[0] + neg_w[1] + neg_w[bg] = p0 + n1 + 1; row bg: n0 + n1 + pos_w[bg] = n0 + n1 + 1
    expected = LN(2) * (p0 + n1 + 1 + n0 + n1 + 1) / 2
    torch.testing.assert_close(fam(z, labels), torch.tensor(expected, dtype=torch.float64))


def test_eqlv2_family_pcb_golden() -> None:
    fam = EQLv2Loss(2)
    fam.stats.sync = False
    cm = _t([[0.6, 0.2], [0.1, 0.5]])
    # target of a class-1 positive at a_r = 0.25: [0.05, 0.875, 0]; logits 0 -> BCE ln 2 per cell
    loss = fam(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([1]), cm, 0.25)
    torch.testing.assert_close(loss, torch.tensor(3 * LN(2), dtype=torch.float64))
    # statistics with the soft target and weight 1: |grad| = |0.5 - t|, pos = g t, neg = g (1 - t)
    torch.testing.assert_close(fam.stats.pos_grad, _t([[0.45 * 0.05, 0.375 * 0.875]])[0])
    torch.testing.assert_close(fam.stats.neg_grad, _t([[0.45 * 0.95, 0.375 * 0.125]])[0])


def test_eqlv2_family_pcb_identities() -> None:
    g = torch.Generator().manual_seed(2)
    k = 4
    z = torch.randn(10, k + 1, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 4, -1, 2, 4, 3])
    cm = torch.rand(k, k, generator=g, dtype=torch.float64)
    a, b = EQLv2Loss(k), EQLv2Loss(k)
    for fam in (a, b):
        fam.stats.sync = False
    # alpha_r = 0 and an identity matrix both give the base loss; the statistics stay identical
    assert torch.equal(a(z, labels), b(z, labels, cm, 0.0))
    torch.testing.assert_close(a(z, labels), b(z, labels, torch.eye(k, dtype=torch.float64), 0.2))
    assert torch.equal(a.stats.pos_grad, b.stats.pos_grad) and torch.equal(a.stats.neg_grad, b.stats.neg_grad)
    assert not torch.equal(a(z, labels), b(z, labels, cm, 0.2))


def test_online_confusion_sigmoid_unnormalised_golden() -> None:
    conf = OnlineConfusion(2, 0.99, activation="sigmoid", normalize_rows=False, sync=False)
    z = _t([[0.0, LN(3), 0.0], [LN(3), 0.0, 0.0], [7.0, 7.0, 7.0]])
    y = torch.tensor([0, 0, 2])
    conf.update(z, y)  # sigmoids [0.5, 0.75] and [0.75, 0.5]: mean [0.625, 0.625]
    torch.testing.assert_close(conf.matrix, _t([[0.00625, 0.00625], [0.0, 0.0]]))
    conf.update(z, y)
    v = 0.99 * 0.00625 + 0.01 * 0.625
    torch.testing.assert_close(conf.matrix, _t([[v, v], [0.0, 0.0]]))
    # the default (softmax, renormalised rows) is unchanged: first update = the batch mean
    soft = OnlineConfusion(2, 0.99, sync=False)
    soft.update(z, y)
    torch.testing.assert_close(soft.matrix, _t([[0.5, 0.5], [0.0, 0.0]]))
    with pytest.raises(ApiMisuseError):
        OnlineConfusion(2, activation="tanh")


# ------------------------------------------------------------------------- test-time mapping


def test_seesaw_mapping_golden_and_reproduces_scores() -> None:
    raw = _t([[0.0, LN(3), LN(3), 0.0]])  # classes [0, ln 3] -> [1/4, 3/4]; objectness [3/4, 1/4]
    q = torch.softmax(seesaw_test_logits(raw), 1)
    torch.testing.assert_close(q, _t([[0.1875, 0.5625, 0.25]]))
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(50, 7, generator=g) * 4
    z = seesaw_test_logits(raw)
    torch.testing.assert_close(torch.softmax(z, 1), seesaw_scores(raw), rtol=1e-6, atol=1e-7)
    # the foreground-only softmax (what the statistics use) is softmax(classes)
    torch.testing.assert_close(torch.softmax(z[:, :5], 1), torch.softmax(raw[:, :5], 1))


def test_eqlv2_mapping_golden_and_reproduces_scores() -> None:
    # sigmoids [1/2, 3/4], background 1/4: scores [3/8, 9/16] (sum 15/16 <= 1), column K 1/16
    q = torch.softmax(eqlv2_test_logits(_t([[0.0, LN(3), LN(1 / 3)]])), 1)
    torch.testing.assert_close(q, _t([[0.375, 0.5625, 0.0625]]))
    # scores summing past 1 ([0.675, 0.675]): scaled to sum 1, background ~0, still finite
    z = eqlv2_test_logits(_t([[LN(3), LN(3), LN(1 / 9)]]))
    assert torch.isfinite(z).all()
    torch.testing.assert_close(torch.softmax(z, 1), _t([[0.5, 0.5, 0.0]]))
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(200, 6, generator=g) * 3 - 2
    s = eqlv2_scores(raw)
    q = torch.softmax(eqlv2_test_logits(raw), 1)
    under = s[:, :5].sum(1) <= 1
    assert under.sum() > 20 and (~under).sum() > 20
    torch.testing.assert_close(q[under, :5], s[under, :5], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q[~under, :5], s[~under, :5] / s[~under, :5].sum(1, keepdim=True))
    assert torch.isfinite(eqlv2_test_logits(torch.tensor([[-200.0, 200.0, 200.0]]))).all()


# ------------------------------------------------------------------------- 2-process gloo test

K_DIST = 4


def _batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for step in range(3):
        g = torch.Generator().manual_seed(500 + 10 * rank + step)
        n = 9 + rank
        z = torch.randn(n, K_DIST + 1, generator=g, dtype=torch.float64)
        y = torch.randint(0, K_DIST + 1, (n,), generator=g)
        if rank == 1 and step == 1:  # no positives on this rank in this step
            y = torch.full_like(y, K_DIST)
        out.append((z, y))
    return out


def _run_eqlv2(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[EQLv2Loss, OnlineConfusion]:
    fam = EQLv2Loss(K_DIST)
    conf = fam.make_confusion(0.9)
    for z, y in batches:
        conf.update(fam.matrix_logits(z), y)
        fam(z, y, conf.matrix, 0.2 if conf.ready else 0.0)
    return fam, conf


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        fam, conf = _run_eqlv2(_batches(rank))
        seesaw = SeesawLoss(K_DIST)
        for z, y in _batches(rank):
            seesaw(torch.cat([z, z[:, :1]], 1), y)
        state = {**{f"eqlv2.{k}": v for k, v in fam.state_dict().items()}, **conf.state_dict()}
        state["seesaw_counts"] = seesaw.counts.counts
        torch.save(state, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_identical_matrix_and_eqlv2_statistics(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys()
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert r0["eqlv2.stats.steps"] == 3 and r0["eqlv2.stats.pos_grad"].sum() > 0
    # the statistics are those of the union of both ranks' rows; the gradient sums are the sums of
    # each rank's sums (both ranks weight with the same all-reduced statistics)
    conf = OnlineConfusion(K_DIST, 0.9, activation="sigmoid", normalize_rows=False, sync=False)
    for (z0, y0), (z1, y1) in zip(_batches(0), _batches(1), strict=True):
        conf.update(torch.cat([z0, z1]), torch.cat([y0, y1]))
    torch.testing.assert_close(r0["matrix"], conf.matrix, rtol=0, atol=1e-15)
    expected_counts = sum(torch.bincount(y, minlength=K_DIST + 1) for r in (0, 1) for _, y in _batches(r))
    assert r0["seesaw_counts"].tolist() == expected_counts.double().tolist()
