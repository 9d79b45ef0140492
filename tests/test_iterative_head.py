"""Tests of pcb_train.iterative_head (docs/method.md §4.4) on tiny dimensions.

R RoIs, C channels, S x S grid, K classes; logits [R, K+1] (background = column K), deltas [R, 4K].
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcb_train.iterative_head import (
    IterativeRoIHead,
    combine_step_losses,
    iterative_cls_loss,
)
from pcb_train.pcb_loss import OnlineConfusion, pcb_loss

R, C, S, K, D = 6, 4, 3, 5, 16


class Predictor(nn.Module):
    def __init__(self, box_dim: int = 4 * K) -> None:
        super().__init__()
        self.cls_score = nn.Linear(D, K + 1)
        self.bbox_pred = nn.Linear(D, box_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def make_head(
    n_iter: int = 3, weights: tuple[float, ...] = (0.2, 0.2, 0.6), box_dim: int = 4 * K, init: str = "default"
) -> IterativeRoIHead:
    torch.manual_seed(0)
    box_head = nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU())
    return IterativeRoIHead(
        box_head, Predictor(box_dim), n_iter, weights, feat_channels=C, roi_size=S, modulation_init=init
    ).double()


def feats(seed: int = 0) -> Tensor:
    return torch.randn(R, C, S, S, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_output_shapes_and_last_step_is_the_prediction() -> None:
    head = make_head()
    out = head(feats())
    assert len(out.step_logits) == len(out.step_deltas) == 3
    for z, d in zip(out.step_logits, out.step_deltas, strict=True):
        assert z.shape == (R, K + 1) and d.shape == (R, 4 * K)
    assert out.logits is out.step_logits[-1] and out.deltas is out.step_deltas[-1]
    assert not torch.allclose(out.step_logits[0], out.step_logits[2])  # the modulation changes something
    agnostic = make_head(box_dim=4)(feats())
    assert agnostic.deltas.shape == (R, 4)
    empty = head(torch.zeros(0, C, S, S, dtype=torch.float64))
    assert empty.logits.shape == (0, K + 1)


def test_single_step_equals_plain_head() -> None:
    head = make_head(n_iter=1, weights=(1.0,))
    assert head.mlp_cls is None and head.mlp_loc is None
    f = feats()
    out = head(f)
    z, d = head.predictor(head.box_head(f))
    assert torch.equal(out.logits, z) and torch.equal(out.deltas, d)
    n_plain = sum(p.numel() for p in head.box_head.parameters()) + sum(
        p.numel() for p in head.predictor.parameters()
    )
    assert sum(p.numel() for p in head.parameters()) == n_plain


def test_modulation_formula_and_weight_sharing() -> None:
    head = make_head()
    calls: list[int] = []
    head.box_head.register_forward_hook(lambda *_: calls.append(1))
    f = feats()
    out = head(f)
    assert len(calls) == 3  # ONE box head, run three times
    # step 1 by hand: F1 = F0 * g + c, g = MLP_loc(deltas_0) as [R,1,S,S], c = MLP_cls(logits_0) as [R,C,1,1]
    z0, d0 = head.predictor(head.box_head(f))
    g = head.mlp_loc(d0).view(R, 1, S, S)
    c = head.mlp_cls(z0).view(R, C, 1, 1)
    f1 = f * g + c
    z1, d1 = head.predictor(head.box_head(f1))
    torch.testing.assert_close(out.step_logits[1], z1)
    torch.testing.assert_close(out.step_deltas[1], d1)
    # parameters: box head + predictor once, plus the two MLPs (in->512->out)
    n_plain = sum(p.numel() for p in head.box_head.parameters()) + sum(
        p.numel() for p in head.predictor.parameters()
    )
    n_mlps = ((K + 1) * 512 + 512 + 512 * C + C) + ((4 * K) * 512 + 512 + 512 * S * S + S * S)
    assert sum(p.numel() for p in head.parameters()) == n_plain + n_mlps


def test_gradients_reach_first_step_features_and_both_mlps() -> None:
    head = make_head()
    f = feats().requires_grad_(True)
    out = head(f)
    # only the LAST step's outputs in the loss: everything earlier gets gradient through the modulation
    (out.logits.square().sum() + out.deltas.square().sum()).backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    for mlp in (head.mlp_cls, head.mlp_loc):
        assert mlp is not None
        for p in mlp.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    # the shared box head gets gradient from all three passes: differs from the last pass alone
    g_all = head.box_head[1].weight.grad.clone()
    head.zero_grad()
    f2 = feats().requires_grad_(True)
    with torch.no_grad():
        z0, d0 = head.predictor(head.box_head(f2))
        f_mod = head.modulate(f2, z0, d0)
        z1, d1 = head.predictor(head.box_head(f_mod))
        f_last = head.modulate(f_mod, z1, d1)
    zl, dl = head.predictor(head.box_head(f_last))
    (zl.square().sum() + dl.square().sum()).backward()
    assert not torch.allclose(g_all, head.box_head[1].weight.grad)


def test_identity_modulation_init_starts_every_step_as_step_zero_and_still_learns() -> None:
    head = make_head(init="identity")
    f = feats()
    z0, d0 = head.predictor(head.box_head(f))
    # g = 1 and c = 0 exactly: the modulation is the identity, every step equals step 0
    assert torch.equal(head.modulate(f, z0, d0), f)
    out = head(f)
    for z, d in zip(out.step_logits, out.step_deltas, strict=True):
        assert torch.equal(z, z0) and torch.equal(d, d0)
    # the MLPs' last layers get gradient (so the modulation moves away from the identity when trained)
    fg = feats(1).requires_grad_(True)
    out = head(fg)
    (out.logits.square().sum() + out.deltas.square().sum()).backward()
    for mlp in (head.mlp_cls, head.mlp_loc):
        assert mlp is not None
        assert mlp[2].weight.grad is not None and mlp[2].weight.grad.abs().sum() > 0
    # the default initialisation does not start at the identity
    plain = make_head()
    assert not torch.allclose(plain.modulate(f, z0, d0), f)
    with pytest.raises(ValueError, match="modulation_init"):
        make_head(init="zeros")


def test_combine_step_losses_golden() -> None:
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    # 0.2 * 1 + 0.2 * 2 + 0.6 * 4 = 0.2 + 0.4 + 2.4 = 3.0
    assert combine_step_losses(losses, (0.2, 0.2, 0.6)).item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        combine_step_losses(losses, (0.5, 0.5))


def _labels() -> Tensor:
    return torch.tensor([0, 1, 2, 3, 4, K])  # every class present, one background


def test_iterative_cls_loss_without_pcb_is_weighted_cross_entropy() -> None:
    head = make_head()
    out = head(feats())
    y = _labels()
    res = iterative_cls_loss(out.step_logits, y, head.step_weights)
    ce = [F.cross_entropy(z, y) for z in out.step_logits]
    torch.testing.assert_close(res.total, 0.2 * ce[0] + 0.2 * ce[1] + 0.6 * ce[2])
    assert res.alphas == (0.0, 0.0, 0.0)
    # confusion given but PCB not started: the matrix still learns (updated every step), loss is CE
    conf = OnlineConfusion(K)
    res2 = iterative_cls_loss(
        out.step_logits, y, head.step_weights, confusion=conf, alpha=0.4, pcb_started=False
    )
    torch.testing.assert_close(res2.total, res.total)
    assert conf.counts.tolist() == [3.0] * K  # one positive per class per step, three steps


def test_iterative_cls_loss_with_pcb_uses_step_alphas_and_updated_matrix() -> None:
    head = make_head()
    f = feats().requires_grad_(True)
    out = head(f)
    y = _labels()
    conf = OnlineConfusion(K, momentum=0.9)
    res = iterative_cls_loss(
        out.step_logits, y, head.step_weights, confusion=conf, alpha=0.4, pcb_started=True
    )
    assert res.alphas == (0.0, 0.2, 0.4)  # step 0 plain CE, a_r = alpha * r / (n_iter - 1)
    # by hand: update with step r's logits, then PCB loss against the matrix after that update
    ref = OnlineConfusion(K, momentum=0.9)
    expected = []
    for r, z in enumerate(out.step_logits):
        ref.update(z, y)
        expected.append(pcb_loss(z, y, ref.matrix, [0.0, 0.2, 0.4][r]))
    for got, want in zip(res.per_step, expected, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(res.total, 0.2 * expected[0] + 0.2 * expected[1] + 0.6 * expected[2])
    assert torch.equal(conf.matrix, ref.matrix)
    res.total.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_iterative_cls_loss_waits_until_every_class_was_seen() -> None:
    head = make_head()
    out = head(feats())
    y = torch.tensor([0, 1, 2, 3, K, K])  # class 4 never seen
    conf = OnlineConfusion(K)
    res = iterative_cls_loss(
        out.step_logits, y, head.step_weights, confusion=conf, alpha=0.4, pcb_started=True
    )
    assert res.alphas == (0.0, 0.0, 0.0) and not conf.ready


def test_constructor_and_input_errors() -> None:
    box_head = nn.Sequential(nn.Flatten(), nn.Linear(C * S * S, D))
    with pytest.raises(ValueError):
        IterativeRoIHead(box_head, Predictor(), 3, (0.5, 0.5), feat_channels=C, roi_size=S)
    with pytest.raises(ValueError):
        IterativeRoIHead(box_head, Predictor(), 0, (), feat_channels=C, roi_size=S)

    class Bare(nn.Module):  # no cls_score / bbox_pred to infer the MLP widths from
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x, x

    with pytest.raises(ValueError, match="num_logits"):
        IterativeRoIHead(box_head, Bare(), feat_channels=C, roi_size=S)
    head = IterativeRoIHead(box_head, Bare(), feat_channels=C, roi_size=S, num_logits=D, box_dim=D)
    assert head.mlp_cls is not None
    with pytest.raises(ValueError, match="features"):
        make_head()(torch.zeros(R, C + 1, S, S, dtype=torch.float64))
