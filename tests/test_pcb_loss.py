"""Tests of pcb_train.pcb_loss: fightback targets, PCB loss, OnlineConfusion (docs/method.md §4.1-§4.3).

Logits [N, K+1], background = column K; labels 0..K-1 positive, K background, -1 ignored.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcb_analysis.errors import PcbkitError
from pcb_analysis.stats import ClassStats
from pcb_train.pcb_loss import (
    OnlineConfusion,
    cross_entropy_loss,
    fightback_targets,
    pcb_active,
    pcb_loss,
    pcb_started,
    step_alpha,
)

D = torch.float64

# Hand-worked case, K = 2 (logits [N, 3], background = column 2).
#   cm = [[0.6, 0.4],
#         [0.2, 0.8]]
#   column 0 = (0.6, 0.2), sum 0.8 -> t(y=0) = (0.75, 0.25, 0)
#   column 1 = (0.4, 0.8), sum 1.2 -> t(y=1) = (1/3, 2/3, 0)
CM2 = torch.tensor([[0.6, 0.4], [0.2, 0.8]], dtype=D)
# logits = log of probabilities, so q = softmax(z) is exactly these rows
Q = torch.tensor(
    [
        [0.50, 0.25, 0.25],  # row 0: positive of class 0
        [0.25, 0.50, 0.25],  # row 1: positive of class 1
        [0.25, 0.25, 0.50],  # row 2: background (label K = 2)
        [0.10, 0.20, 0.70],  # row 3: ignored (label -1): contributes nothing, not counted in N
    ],
    dtype=D,
)
Z = Q.log()
Y = torch.tensor([0, 1, 2, -1])


def test_fightback_targets_golden() -> None:
    t = fightback_targets(CM2, torch.tensor([0, 1, 0]))
    expected = torch.tensor([[0.75, 0.25, 0.0], [1 / 3, 2 / 3, 0.0], [0.75, 0.25, 0.0]], dtype=D)
    assert t.shape == (3, 3)
    torch.testing.assert_close(t, expected, rtol=0, atol=1e-15)


def test_fightback_targets_background_zero_rows_one_and_column_normalised() -> None:
    g = torch.Generator().manual_seed(0)
    k = 7
    cm = torch.softmax(torch.randn(k, k, generator=g, dtype=D), dim=1)
    y = torch.randint(0, k, (50,), generator=g)
    t = fightback_targets(cm, y)
    assert t.shape == (50, k + 1)
    assert torch.all(t[:, k] == 0)
    torch.testing.assert_close(t.sum(1), torch.ones(50, dtype=D))
    for p in range(50):  # t[p, j] = M[j, y] / sum_i M[i, y]
        col = cm[:, y[p]]
        torch.testing.assert_close(t[p, :k], col / col.sum())


def test_fightback_targets_identity_is_one_hot_and_empty_column_falls_back() -> None:
    k = 4
    t = fightback_targets(torch.eye(k, dtype=D), torch.tensor([0, 3, 2]))
    torch.testing.assert_close(t, F.one_hot(torch.tensor([0, 3, 2]), k + 1).to(D))
    # column 1 all zero (nothing ever predicted as class 1): one-hot fallback; column 0 normal
    cm = torch.tensor(
        [[0.5, 0.0, 0.5, 0.0], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0, 0, 0, 1.0]], dtype=D
    )
    t = fightback_targets(cm, torch.tensor([1, 0]))
    torch.testing.assert_close(t[0], torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=D))
    torch.testing.assert_close(t[1], torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0], dtype=D))
    assert torch.isfinite(fightback_targets(torch.zeros(k, k), torch.arange(k))).all()


def test_fightback_targets_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        fightback_targets(torch.eye(3), torch.tensor([3]))  # background is not a positive
    with pytest.raises(ValueError):
        fightback_targets(torch.ones(2, 3), torch.tensor([0]))


def test_pcb_loss_golden() -> None:
    # a = 0.5, N = 3 (the ignored row does not count); every CE below is -ln 0.5 = ln 2:
    #   background row 2:        CE = ln 2                      (weight 1)
    #   positives rows 0, 1:     (1 - a) * (ln 2 + ln 2) = ln 2
    #   KL row 0: t = (.75, .25, 0), q = (.5, .25, .25): .75 ln(.75/.5) + .25 ln(1) = .75 ln 1.5
    #   KL row 1: t = (1/3, 2/3, 0), q = (.25, .5, .25): 1/3 ln(4/3) + 2/3 ln(4/3) = ln(4/3)
    #   L = [ln 2 + ln 2 + .5 (.75 ln 1.5 + ln 4/3)] / 3
    #     = [1.3862944 + 0.1520494 + 0.1438410] / 3 = 0.5607283
    expected = (2 * math.log(2) + 0.5 * (0.75 * math.log(1.5) + math.log(4 / 3))) / 3
    z = Z.clone().requires_grad_(True)
    loss = pcb_loss(z, Y, CM2, 0.5)
    assert loss.dtype == D
    assert loss.item() == pytest.approx(expected, rel=1e-13)
    assert loss.item() == pytest.approx(0.5607283, abs=1e-7)
    loss.backward()
    # d/dz = (q - target) / N with target = (1 - a) one-hot(y) + a t for positives, one-hot(K) for negatives:
    #   row 0: q - (.5 (1,0,0) + .5 (.75,.25,0)) = (.5,.25,.25) - (.875,.125,0) = (-.375, .125, .25)
    #   row 1: (.25,.5,.25) - (.5 (0,1,0) + .5 (1/3,2/3,0)) = (.25 - 1/6, .5 - 5/6, .25) = (1/12, -1/3, 1/4)
    #   row 2: (.25,.25,.5) - (0,0,1) = (.25, .25, -.5);  row 3 (ignored): 0
    grad = torch.tensor(
        [[-0.375, 0.125, 0.25], [1 / 12, -1 / 3, 0.25], [0.25, 0.25, -0.5], [0.0, 0.0, 0.0]], dtype=D
    ) / 3
    torch.testing.assert_close(z.grad, grad, rtol=0, atol=1e-14)


def _random_batch(n: int, k: int, seed: int, dtype: torch.dtype = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k + 1, generator=g, dtype=dtype) * 2
    y = torch.randint(0, k + 1, (n,), generator=g)
    y[::5] = k  # plenty of background
    return z, y


def test_alpha_zero_is_cross_entropy() -> None:
    z, y = _random_batch(40, 6, seed=1)
    cm = torch.softmax(torch.randn(6, 6, dtype=D), dim=1)
    torch.testing.assert_close(pcb_loss(z, y, cm, 0.0), F.cross_entropy(z, y), rtol=0, atol=1e-14)
    # and the general path tends to CE as alpha -> 0 (no special casing hides a wrong formula)
    torch.testing.assert_close(pcb_loss(z, y, cm, 1e-12), F.cross_entropy(z, y), rtol=0, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.2, 0.4, 1.0])
def test_identity_matrix_is_cross_entropy(alpha: float) -> None:
    z, y = _random_batch(40, 6, seed=2)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    loss = pcb_loss(z1, y, torch.eye(6, dtype=D), alpha)
    ref = F.cross_entropy(z2, y)
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-13)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=1e-14)


def _soft_target_ce(z: torch.Tensor, y: torch.Tensor, cm: torch.Tensor, a: float) -> torch.Tensor:
    """Reference: dense soft-target CE, target = one-hot(y) mixed with a * fightback target on positives."""
    k = z.shape[1] - 1
    onehot = F.one_hot(y, k + 1).to(z.dtype)
    pos = y < k
    target = onehot.clone()
    target[pos] = (1 - a) * onehot[pos] + a * fightback_targets(cm, y[pos]).to(z.dtype)
    return F.cross_entropy(z, target, reduction="sum") / len(y)


def test_kl_and_soft_target_ce_have_the_same_gradient() -> None:
    k, a = 6, 0.4
    z, y = _random_batch(40, k, seed=3)
    cm = torch.softmax(torch.randn(k, k, dtype=D) * 2, dim=1)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    loss = pcb_loss(z1, y, cm, a)
    ref = _soft_target_ce(z2, y, cm, a)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=1e-14)
    # values differ by exactly the (constant) entropy term: KL = CE(t, q) - H(t) = CE(t, q) + sum t log t
    t = fightback_targets(cm, y[y < k])
    torch.testing.assert_close(loss, ref + a * torch.xlogy(t, t).sum() / len(y), rtol=0, atol=1e-13)
    # and the KL term itself matches torch's kl_div
    w = torch.where(y < k, torch.tensor(1 - a, dtype=D), torch.tensor(1.0, dtype=D))
    kl = F.kl_div(F.log_softmax(z[y < k], dim=1), t, reduction="sum")
    ce_part = (F.cross_entropy(z, y, reduction="none") * w).sum()
    torch.testing.assert_close(loss, (ce_part + a * kl) / len(y), rtol=0, atol=1e-13)


def test_fused_gradient_passes_gradcheck() -> None:
    k = 4
    z, y = _random_batch(12, k, seed=8)
    y[3] = -1
    cm = torch.softmax(torch.randn(k, k, dtype=D), dim=1)
    assert torch.autograd.gradcheck(lambda x: pcb_loss(x, y, cm, 0.3) * 2.5, (z.requires_grad_(True),))


def test_pcb_loss_edge_cases() -> None:
    k = 3
    cm = torch.softmax(torch.randn(k, k, dtype=D), dim=1)
    z = torch.randn(5, k + 1, dtype=D)
    only_bg = torch.full((5,), k)
    torch.testing.assert_close(pcb_loss(z, only_bg, cm, 0.4), F.cross_entropy(z, only_bg))  # no positives
    all_ignored = torch.full((5,), -1)
    zi = z.clone().requires_grad_(True)
    loss = pcb_loss(zi, all_ignored, cm, 0.4)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(zi.grad == 0)
    assert cross_entropy_loss(z, all_ignored).item() == 0.0
    empty = pcb_loss(torch.zeros(0, k + 1, requires_grad=True), torch.zeros(0, dtype=torch.long), cm, 0.4)
    assert empty.item() == 0.0
    # AMP-style half logits are computed in float32
    zh, yh = _random_batch(16, k, seed=4, dtype=torch.float32)
    zb = zh.to(torch.bfloat16).requires_grad_(True)
    out = pcb_loss(zb, yh, cm, 0.4)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert zb.grad is not None and zb.grad.dtype == torch.bfloat16
    for bad in (
        lambda: pcb_loss(z, torch.full((5,), k + 1), cm, 0.4),
        lambda: pcb_loss(z, only_bg, torch.eye(k + 1), 0.4),
        lambda: pcb_loss(z, only_bg, cm, 1.5),
        lambda: pcb_loss(z, only_bg[:4], cm, 0.4),
    ):
        with pytest.raises(ValueError):
            bad()


def test_step_alpha_and_start_condition() -> None:
    assert [step_alpha(0.4, r, 3) for r in range(3)] == [0.0, 0.2, 0.4]
    assert step_alpha(0.4, 0, 1) == 0.4  # [choice] single step: alpha itself
    with pytest.raises(ValueError):
        step_alpha(0.4, 3, 3)
    assert not pcb_started(iteration=9, start_iter=10)
    assert pcb_started(iteration=10, start_iter=10)
    assert pcb_started(epoch=17, start_epoch=17) and not pcb_started(epoch=16.99, start_epoch=17)
    assert not pcb_active(False, iteration=100, start_iter=10)
    assert pcb_active(True, iteration=100, start_iter=10)
    assert not pcb_active(True, iteration=5, start_iter=10)
    with pytest.raises(ValueError):
        pcb_started(iteration=3)
    with pytest.raises(ValueError):
        pcb_started(epoch=1, start_epoch=1, iteration=3, start_iter=2)


# ----------------------------------------------------------------------------- OnlineConfusion


def _fg_softmax(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z[:, :-1].to(D), dim=1)


def test_online_confusion_first_update_is_the_batch_mean_and_equals_class_stats() -> None:
    k, mu = 5, 0.99
    z, y = _random_batch(60, k, seed=5)
    y[y == 3] = k  # class 3 absent from the batch
    y[7] = -1
    conf = OnlineConfusion(k, momentum=mu)
    n_b = conf.update(z, y)
    p = _fg_softmax(z)
    for i in range(k):
        sel = y == i
        if i == 3:
            assert n_b[i] == 0 and torch.all(conf.matrix[i] == 0) and conf.counts[i] == 0
            continue
        # from zero: M[i] = normalise((1 - mu) * mean p) = mean p
        torch.testing.assert_close(conf.matrix[i], p[sel].mean(0), rtol=0, atol=1e-15)
        assert conf.counts[i] == sel.sum()
    # the offline analysis on the same batch gives the same rows (same code: pcb_analysis.stats)
    st = ClassStats.zeros(k).update(z, y)
    seen = st.n > 0
    torch.testing.assert_close(conf.matrix[seen], st.confusion(warn=False)[seen], rtol=0, atol=1e-15)
    torch.testing.assert_close(conf.counts, st.n.to(D))


def test_online_confusion_ema_touches_only_present_classes() -> None:
    k, mu = 4, 0.9
    conf = OnlineConfusion(k, momentum=mu)
    z1, y1 = _random_batch(30, k, seed=6)
    y1[:4] = torch.arange(4)  # every class present
    conf.update(z1, y1)
    before = conf.matrix.clone()
    counts_before = conf.counts.clone()
    z2, _ = _random_batch(6, k, seed=7)
    y2 = torch.tensor([1, 1, 4, -1, 1, 4])  # only class 1 present
    conf.update(z2, y2)
    for i in (0, 2, 3):
        assert torch.equal(conf.matrix[i], before[i])  # bit-identical: not touched
    # hand EMA of row 1: mu * M + (1 - mu) * mean p of the three class-1 rows, renormalised
    mean = _fg_softmax(z2)[y2 == 1].mean(0)
    row = mu * before[1] + (1 - mu) * mean
    torch.testing.assert_close(conf.matrix[1], row / row.sum(), rtol=0, atol=1e-15)
    torch.testing.assert_close(conf.matrix.sum(1), torch.ones(k, dtype=D), rtol=0, atol=1e-14)
    assert torch.equal(conf.counts, counts_before + torch.tensor([0, 3, 0, 0], dtype=D))


def test_online_confusion_ready_state_dict_and_dtype() -> None:
    k = 3
    conf = OnlineConfusion(k)
    assert conf.matrix.dtype == D and conf.counts.dtype == D
    assert not conf.ready
    z = torch.randn(4, k + 1)
    conf.update(z, torch.tensor([0, 1, 3, 3]))
    assert not conf.ready
    conf.update(z, torch.tensor([3, 3, 3, 3]))  # no positives: nothing changes
    assert not conf.ready and conf.counts.tolist() == [1.0, 1.0, 0.0]
    conf.update(z, torch.tensor([2, -1, 3, 0]))
    assert conf.ready and conf.counts.tolist() == [2.0, 1.0, 1.0]
    sd = conf.state_dict()
    assert set(sd) == {"matrix", "counts"}
    other = OnlineConfusion(k)
    other.load_state_dict(sd)
    assert other.ready and torch.equal(other.matrix, conf.matrix) and torch.equal(other.counts, conf.counts)
    with pytest.raises(ValueError):
        conf.update(torch.randn(4, k + 2), torch.tensor([0, 1, 2, 3]))  # K mismatch


def test_online_confusion_scratch_stays_zero_and_bad_logits_leave_state_unchanged() -> None:
    k = 4
    conf = OnlineConfusion(k)
    for seed in range(3):
        z, y = _random_batch(20, k, seed=20 + seed)
        conf.update(z, y)
        assert not conf._sum_s.any() and not conf._sum_n.any() and not conf._sum_h.any()
    before = {name: b.clone() for name, b in conf.state_dict().items()}
    z, y = _random_batch(20, k, seed=30)
    y[0] = 1
    z[0, 2] = float("nan")  # a positive row with a NaN logit: refused, nothing folded in
    with pytest.raises(PcbkitError, match="NaN"):
        conf.update(z, y)
    assert not conf._sum_s.any() and not conf._sum_n.any() and not conf._sum_h.any()
    for name, b in conf.state_dict().items():
        assert torch.equal(b, before[name])
    assert "_sum_s" not in conf.state_dict()


def test_pcb_loss_under_cpu_autocast() -> None:
    k = 4
    fc = torch.nn.Linear(8, k + 1)
    x = torch.randn(10, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 4, 4, 0, 1, 2])
    conf = OnlineConfusion(k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = fc(x)
        conf.update(z, y)
        loss = pcb_loss(z, y, conf.matrix, 0.4)
    assert z.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert fc.weight.grad is not None and torch.isfinite(fc.weight.grad).all()


# ------------------------------------------------------------------------- 2-process gloo test

K_DIST = 4
MU_DIST = 0.9


def _dist_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three steps per rank; rank 1 has ZERO positives in step 1."""
    out = []
    for step in range(3):
        z, y = _random_batch(8 + rank, K_DIST, seed=100 + 10 * rank + step)
        if rank == 1 and step == 1:
            y = torch.where(torch.arange(len(y)) % 2 == 0, K_DIST, -1)
        out.append((z, y))
    return out


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        conf = OnlineConfusion(K_DIST, momentum=MU_DIST)
        for z, y in _dist_batches(rank):
            conf.update(z, y)
        torch.save(conf.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_online_confusion_two_process_gloo_equals_single_process_union(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0["matrix"], r1["matrix"]) and torch.equal(r0["counts"], r1["counts"])
    single = OnlineConfusion(K_DIST, momentum=MU_DIST)
    for (z0, y0), (z1, y1) in zip(_dist_batches(0), _dist_batches(1), strict=True):
        single.update(torch.cat([z0, z1]), torch.cat([y0, y1]))
    torch.testing.assert_close(r0["matrix"], single.matrix, rtol=0, atol=1e-15)
    assert torch.equal(r0["counts"], single.counts)
    assert single.counts.sum() > 0
