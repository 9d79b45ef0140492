"""Tests of the training samplers: repeat factors (hand-computed), plans, distributed split, resume."""

from __future__ import annotations

import math
from itertools import islice

import numpy as np
import pytest

from pcb_train.distributed import shard_indices
from pcb_train.samplers import (
    DistributedBatchSampler,
    RandomSampler,
    RepeatFactorSampler,
    SamplerPosition,
    category_repeat_factors,
    image_repeat_factors,
)


def test_repeat_factors_hand_case() -> None:
    # 4 images: {0}, {0, 1}, {0, 0}, {2}; t = 1.
    # f(0) = 3/4 -> r = sqrt(1 / 0.75) = sqrt(4/3) = 1.1547005; f(1) = f(2) = 1/4 -> r = sqrt(4) = 2.
    # images: max over their categories -> [1.1547, 2, 1.1547, 2] (duplicates in an image count once).
    cats = [[0], [0, 1], [0, 0], [2]]
    per_cat = category_repeat_factors(cats, threshold=1.0)
    assert per_cat == pytest.approx({0: math.sqrt(4 / 3), 1: 2.0, 2: 2.0})
    np.testing.assert_allclose(
        image_repeat_factors(cats, 1.0), [math.sqrt(4 / 3), 2.0, math.sqrt(4 / 3), 2.0]
    )


def test_repeat_factors_lvis_threshold() -> None:
    # N = 2000 images, t = 1e-3: a class in 1 image has f = 5e-4 -> r = sqrt(1e-3 / 5e-4) = sqrt(2);
    # a class in 2 images has f = 1e-3 -> r = 1; a class in 500 images -> 1 (never below 1).
    # An image without annotations counts in N and gets factor 1.
    cats: list[list[int]] = [[] for _ in range(2000)]
    cats[0] = [7]  # the single-image class, together with a frequent one
    cats[1].append(8)
    cats[2].append(8)
    for i in range(500):
        cats[i].append(9)
    per_cat = category_repeat_factors(cats)
    assert per_cat[7] == pytest.approx(math.sqrt(2.0))
    assert per_cat[8] == pytest.approx(1.0)
    assert per_cat[9] == 1.0
    factors = image_repeat_factors(cats)
    assert factors[0] == pytest.approx(math.sqrt(2.0))  # max(sqrt 2, 1)
    assert factors[1] == 1.0 and factors[1999] == 1.0


def test_repeat_factor_errors() -> None:
    with pytest.raises(ValueError, match="threshold"):
        category_repeat_factors([[0]], 0.0)
    with pytest.raises(ValueError, match="no images"):
        category_repeat_factors([])
    with pytest.raises(ValueError, match=">= 1"):
        RepeatFactorSampler([1.0, 0.5])


def test_random_plan_is_a_seeded_permutation() -> None:
    a = RandomSampler(50, seed=3)
    b = RandomSampler(50, seed=3)
    for epoch in range(3):
        assert sorted(a.plan(epoch).indices.tolist()) == list(range(50))
        np.testing.assert_array_equal(a.plan(epoch).indices, b.plan(epoch).indices)
    assert not np.array_equal(a.plan(0).indices, a.plan(1).indices)
    assert not np.array_equal(a.plan(0).indices, RandomSampler(50, seed=4).plan(0).indices)
    assert a.nominal_epoch_length == 50.0


def test_flip_probabilities() -> None:
    assert not RandomSampler(100, flip_prob=0.0).plan(0).flips.any()
    assert RandomSampler(100, flip_prob=1.0).plan(0).flips.all()
    half = RandomSampler(4000, flip_prob=0.5).plan(0).flips.mean()
    assert 0.45 < half < 0.55


def test_rfs_ceil_rounding_hand_case() -> None:
    # factors [1, 2.5, 1.25] -> ceil -> copies [1, 3, 2]: 6 entries per epoch, every epoch
    s = RepeatFactorSampler([1.0, 2.5, 1.25], seed=0, rounding="ceil")
    for epoch in range(3):
        counts = np.bincount(s.plan(epoch).indices, minlength=3)
        assert counts.tolist() == [1, 3, 2]
    assert s.nominal_epoch_length == 6.0


def test_rfs_stochastic_rounding() -> None:
    # factors [1, 2.5, 1.25]: image 0 always once, image 1 two or three times (mean 2.5), image 2
    # once or twice (mean 1.25); the epoch's plan holds exactly those copies.
    s = RepeatFactorSampler([1.0, 2.5, 1.25], seed=1)
    reps = np.stack([s.repeats(e) for e in range(4000)])
    assert set(reps[:, 0].tolist()) == {1}
    assert set(reps[:, 1].tolist()) == {2, 3}
    assert set(reps[:, 2].tolist()) == {1, 2}
    np.testing.assert_allclose(reps.mean(0), [1.0, 2.5, 1.25], atol=0.03)
    for e in range(5):
        np.testing.assert_array_equal(np.bincount(s.plan(e).indices, minlength=3), s.repeats(e))
    assert s.nominal_epoch_length == pytest.approx(4.75)
    # a pure function of (seed, epoch)
    np.testing.assert_array_equal(
        RepeatFactorSampler([1.0, 2.5, 1.25], seed=1).plan(7).indices, s.plan(7).indices
    )


def stream(sampler: RandomSampler, n: int) -> list[tuple[int, bool]]:
    out: list[tuple[int, bool]] = []
    epoch = 0
    while len(out) < n:
        p = sampler.plan(epoch)
        out.extend(zip(p.indices.tolist(), p.flips.tolist(), strict=True))
        epoch += 1
    return out[:n]


@pytest.mark.parametrize("rfs", [False, True])
def test_batches_walk_the_concatenated_epochs(rfs: bool) -> None:
    # 7 images, batch 3: batches straddle epoch ends; the batches are the stream cut in threes
    s = (
        RepeatFactorSampler([1, 2.2, 1, 1.7, 1, 1, 3], seed=5, flip_prob=0.5)
        if rfs
        else RandomSampler(7, 5, 0.5)
    )
    batches = list(DistributedBatchSampler(s, 3, num_batches=10))
    flat = [e for b in batches for e in b]
    assert flat == stream(s, 30)


def test_distributed_split_keeps_the_global_order() -> None:
    s = RandomSampler(10, seed=2, flip_prob=0.5)
    single = list(DistributedBatchSampler(s, 4, num_batches=6))
    r0 = list(DistributedBatchSampler(s, 4, rank=0, world_size=2, num_batches=6))
    r1 = list(DistributedBatchSampler(s, 4, rank=1, world_size=2, num_batches=6))
    for whole, a, b in zip(single, r0, r1, strict=True):
        assert len(a) == len(b) == 2
        assert a + b == whole
    with pytest.raises(ValueError, match="does not split"):
        DistributedBatchSampler(s, 3, world_size=2)


def test_resume_from_a_position() -> None:
    s = RepeatFactorSampler([1, 2.5, 1, 1.5, 1], seed=9, flip_prob=0.5)
    full = list(DistributedBatchSampler(s, 4, num_batches=12))
    pos = SamplerPosition(0, 0)
    for _ in range(5):
        pos = s.advance(pos, 4)
    # the position after 5 batches is (epoch, index) inside its epoch
    assert 0 <= pos.index < s.epoch_length(pos.epoch)
    assert pos == s.normalise(SamplerPosition(0, 20))
    fresh = RepeatFactorSampler([1, 2.5, 1, 1.5, 1], seed=9, flip_prob=0.5)  # a new process
    tail = list(DistributedBatchSampler(fresh, 4, start=pos, num_batches=7))
    assert tail == full[5:]


def test_take_and_advance_agree() -> None:
    s = RandomSampler(5, seed=0)
    entries, after = s.take(SamplerPosition(0, 3), 9)  # 2 of epoch 0, 5 of epoch 1, 2 of epoch 2
    assert after == SamplerPosition(2, 2) == s.advance(SamplerPosition(0, 3), 9)
    assert entries == stream(s, 12)[3:]
    with pytest.raises(ValueError):
        s.normalise(SamplerPosition(-1, 0))


def test_infinite_batches_and_len() -> None:
    s = RandomSampler(3)
    assert len(list(islice(iter(DistributedBatchSampler(s, 2)), 5))) == 5
    with pytest.raises(TypeError):
        len(DistributedBatchSampler(s, 2))
    assert len(DistributedBatchSampler(s, 2, num_batches=4)) == 4


def test_shard_indices_cover_everything_once() -> None:
    shards = [shard_indices(10, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(i for s in shards for i in s) == list(range(10))
