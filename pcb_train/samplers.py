"""Training samplers: random and repeat-factor sampling (RFS), deterministic, distributed, resumable.

N images in the training set (dataset indices 0..N-1), B images per global batch, W ranks.

An *epoch plan* lists the dataset indices one epoch visits, in order, with a horizontal-flip
decision per entry:

    EpochPlan.indices   [L] int64   dataset indices (L = N for random sampling; L varies per epoch
                                    with RFS and stochastic rounding)
    EpochPlan.flips     [L] bool    flip this entry (drawn with probability `flip_prob`)

A plan is a pure function of (seed, epoch): numpy's PCG64 seeded with `SeedSequence([seed, epoch])`,
no global RNG state. Training walks the concatenation of the plans of epochs 0, 1, 2, ... and
takes B consecutive entries per iteration (a batch may straddle two epochs); the position of the
next entry is a `SamplerPosition(epoch, index)`, which is all a checkpoint needs to resume.

Distributed: every rank computes the same global batches; rank r takes entries
`[r * B / W, (r + 1) * B / W)` of each, so the union over ranks is exactly the single-process batch
and the global order does not depend on W.

Repeat-factor sampling (docs/method.md §5; LVIS paper, Gupta et al. 2019), threshold t = 1e-3:

    f(c) = (images containing c) / N            r(c) = max(1, sqrt(t / f(c)))
    r(image) = max over its categories of r(c)  (1 for an image without annotations)

Each epoch an image appears floor(r) + Bernoulli(r - floor(r)) times ("stochastic" rounding,
redrawn every epoch) or ceil(r) times ("ceil"); the repeated list is then shuffled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch.utils.data

from pcb_analysis.errors import ApiMisuseError

logger = logging.getLogger(__name__)

Rounding = Literal["stochastic", "ceil"]
DEFAULT_RFS_THRESHOLD = 1e-3
# SeedSequence words that separate the draws of one epoch (so adding a draw never shifts another)
_STREAM_ORDER, _STREAM_ROUNDING, _STREAM_FLIP = 0, 1, 2
_PLAN_CACHE = 2  # plans kept per sampler (the current epoch and the next one)


# ----------------------------------------------------------------------------- repeat factors


def category_repeat_factors(
    image_categories: Sequence[Sequence[int]], threshold: float = DEFAULT_RFS_THRESHOLD
) -> dict[int, float]:
    """r(c) = max(1, sqrt(t / f(c))) for every category c present in at least one image.

    image_categories[i]: the category indices (any hashable ints) of image i (duplicates count
    once); f(c) = (images containing c) / N with N = len(image_categories), images without
    categories included in N (the fraction is over the training set as sampled).
    """
    if threshold <= 0:
        raise ApiMisuseError(f"category_repeat_factors: threshold must be > 0, got {threshold}")
    n = len(image_categories)
    if n == 0:
        raise ApiMisuseError("category_repeat_factors: no images")
    image_count: dict[int, int] = {}
    for cats in image_categories:
        for c in set(cats):
            image_count[int(c)] = image_count.get(int(c), 0) + 1
    return {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in sorted(image_count.items())}


def image_repeat_factors(
    image_categories: Sequence[Sequence[int]], threshold: float = DEFAULT_RFS_THRESHOLD
) -> np.ndarray:
    """Per-image repeat factors [N] float64: max of r(c) over the image's categories (1 if none)."""
    per_cat = category_repeat_factors(image_categories, threshold)
    return np.array(
        [max((per_cat[int(c)] for c in cats), default=1.0) for cats in image_categories], dtype=np.float64
    )


# ----------------------------------------------------------------------------- epoch plans


class SamplerPosition(NamedTuple):
    """Where the stream stands: the next entry is `plan(epoch).indices[index]`."""

    epoch: int = 0
    index: int = 0


class EpochPlan(NamedTuple):
    """One epoch's visit order: indices [L] int64 into the dataset, flips [L] bool."""

    indices: np.ndarray
    flips: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def _epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), stream])))


class RandomSampler:
    """Every image once per epoch, in a fresh random order per epoch (seeded by (seed, epoch)).

    Args:
        num_items: N, the dataset size.
        seed: the run's seed (same on every rank).
        flip_prob: probability of a horizontal flip per entry.
    """

    kind = "random"

    def __init__(self, num_items: int, seed: int = 0, flip_prob: float = 0.0) -> None:
        if num_items < 1:
            raise ApiMisuseError(f"{type(self).__name__}: the dataset is empty")
        if not 0.0 <= flip_prob <= 1.0:
            raise ApiMisuseError(f"{type(self).__name__}: flip_prob must be in [0, 1], got {flip_prob}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.flip_prob = float(flip_prob)
        self._cache: dict[int, EpochPlan] = {}

    @property
    def nominal_epoch_length(self) -> float:
        """Expected entries per epoch (N here): defines the iterations of an epoch-based schedule."""
        return float(self.num_items)

    def _order(self, epoch: int) -> np.ndarray:
        return _epoch_rng(self.seed, epoch, _STREAM_ORDER).permutation(self.num_items).astype(np.int64)

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of `epoch` (>= 0): a pure function of (seed, epoch); cached for the last two epochs."""
        if epoch < 0:
            raise ApiMisuseError(f"plan: epoch must be >= 0, got {epoch}")
        cached = self._cache.get(epoch)
        if cached is not None:
            return cached
        indices = self._order(epoch)
        flips = _epoch_rng(self.seed, epoch, _STREAM_FLIP).random(indices.shape[0]) < self.flip_prob
        plan = EpochPlan(indices, flips)
        if len(plan) == 0:
            raise ApiMisuseError(f"{type(self).__name__}: epoch {epoch} has no entries")
        self._cache[epoch] = plan
        for old in sorted(self._cache)[:-_PLAN_CACHE]:
            del self._cache[old]
        return plan

    def epoch_length(self, epoch: int) -> int:
        return len(self.plan(epoch))

    def normalise(self, position: SamplerPosition) -> SamplerPosition:
        """The same position with `index` inside its epoch (moving past finished epochs)."""
        epoch, index = int(position.epoch), int(position.index)
        if epoch < 0 or index < 0:
            raise ApiMisuseError(f"sampler position must be non-negative, got {tuple(position)}")
        while index >= self.epoch_length(epoch):
            index -= self.epoch_length(epoch)
            epoch += 1
        return SamplerPosition(epoch, index)

    def advance(self, position: SamplerPosition, count: int) -> SamplerPosition:
        """The position `count` entries after `position`."""
        p = self.normalise(position)
        return self.normalise(SamplerPosition(p.epoch, p.index + int(count)))

    def take(self, position: SamplerPosition, count: int) -> tuple[list[tuple[int, bool]], SamplerPosition]:
        """The next `count` entries (dataset index, flip) from `position`, and the position after them."""
        out: list[tuple[int, bool]] = []
        epoch, index = self.normalise(position)
        while len(out) < count:
            plan = self.plan(epoch)
            stop = min(len(plan), index + count - len(out))
            out.extend(zip(plan.indices[index:stop].tolist(), plan.flips[index:stop].tolist(), strict=True))
            epoch, index = (epoch + 1, 0) if stop == len(plan) else (epoch, stop)
        return out, SamplerPosition(epoch, index)


class RepeatFactorSampler(RandomSampler):
    """Repeat-factor sampling: image i appears about `repeat_factors[i]` times per epoch (module docstring).

    Args:
        repeat_factors: [N] per-image factors >= 1 (see `image_repeat_factors`).
        seed, flip_prob: as `RandomSampler`.
        rounding: "stochastic" (floor + Bernoulli of the fraction, redrawn each epoch) or "ceil".
    """

    kind = "rfs"

    def __init__(
        self,
        repeat_factors: Sequence[float] | np.ndarray,
        seed: int = 0,
        flip_prob: float = 0.0,
        rounding: Rounding = "stochastic",
    ) -> None:
        factors = np.asarray(repeat_factors, dtype=np.float64).reshape(-1)
        super().__init__(int(factors.shape[0]), seed, flip_prob)
        if not np.all(np.isfinite(factors)) or bool((factors < 1.0).any()):
            raise ApiMisuseError("RepeatFactorSampler: repeat factors must be finite and >= 1")
        if rounding not in ("stochastic", "ceil"):
            raise ApiMisuseError(f"RepeatFactorSampler: unknown rounding {rounding!r}")
        self.repeat_factors = factors
        self.rounding = rounding
        self._floor = np.floor(factors)
        self._frac = factors - self._floor

    @property
    def nominal_epoch_length(self) -> float:
        """sum of the repeat factors (stochastic rounding's expectation) or of their ceilings."""
        if self.rounding == "ceil":
            return float(np.ceil(self.repeat_factors).sum())
        return float(self.repeat_factors.sum())

    def repeats(self, epoch: int) -> np.ndarray:
        """Copies of each image in `epoch`: [N] int64."""
        if self.rounding == "ceil":
            return np.ceil(self.repeat_factors).astype(np.int64)
        u = _epoch_rng(self.seed, epoch, _STREAM_ROUNDING).random(self.num_items)
        return (self._floor + (u < self._frac)).astype(np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        expanded = np.repeat(np.arange(self.num_items, dtype=np.int64), self.repeats(epoch))
        return expanded[_epoch_rng(self.seed, epoch, _STREAM_ORDER).permutation(expanded.shape[0])]


# ----------------------------------------------------------------------------- batches


class DistributedBatchSampler(torch.utils.data.Sampler[list[tuple[int, bool]]]):
    """This rank's share of each global batch, from a start position, for `num_batches` batches.

    Yields lists of `(dataset index, flip)` of length `batch_size // world_size` (a DataLoader
    `batch_sampler`; the dataset's `__getitem__` receives the pairs). Global batch j holds entries
    `[j * B, (j + 1) * B)` of the stream after `start`; rank r takes its contiguous slice.
    `num_batches=None` never ends.
    """

    def __init__(
        self,
        sampler: RandomSampler,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start: SamplerPosition | None = None,
        num_batches: int | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ApiMisuseError(
                f"DistributedBatchSampler: bad batch_size={batch_size} / rank={rank} / "
                f"world_size={world_size}"
            )
        if batch_size % world_size:
            raise ApiMisuseError(
                f"DistributedBatchSampler: the global batch {batch_size} does not split over "
                f"{world_size} ranks"
            )
        if num_batches is not None and num_batches < 0:
            raise ApiMisuseError(f"DistributedBatchSampler: num_batches must be >= 0, got {num_batches}")
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.per_rank = self.batch_size // self.world_size
        self.start = sampler.normalise(SamplerPosition(*start) if start is not None else SamplerPosition())
        self.num_batches = num_batches

    def __len__(self) -> int:
        if self.num_batches is None:
            raise ApiMisuseError("DistributedBatchSampler without num_batches has no length")
        return self.num_batches

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        position = self.start
        done = 0
        lo = self.rank * self.per_rank
        while self.num_batches is None or done < self.num_batches:
            batch, position = self.sampler.take(position, self.batch_size)
            yield batch[lo : lo + self.per_rank]
            done += 1
