"""Seeds and intervals of the calibration study: mean ± std across seeds, paired bootstrap effects.

`aggregate_seeds(rows)` turns per-seed study rows (`pcb_analysis.report` rows with a `seed`) into
one row per (protocol, model, source, stat): each metric's mean over the seeds where it is defined,
its sample standard deviation (`<metric>_std`, ddof 1; None with fewer than two values) and count
(`<metric>_n`), the seeds and, for the regime fields, their mean (`cond2` and `sigma_min`: the
geometric mean, they live on a log scale). `paired_effect(per_seed)` is a paired difference b - a
with a 95% percentile interval over image resamples shared by every seed: per resample, the mean
over seeds of b - a (resamples where a side is undefined in some seed are left out); with one seed
it equals `pcb_analysis.bootstrap.compare`. `effect_verdict` is the reading's rule: an effect only
where the interval excludes 0 and every seed's difference has the mean's sign. docs/evaluation.md §7.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pcb_analysis.bootstrap import percentile_interval
from pcb_analysis.errors import ApiMisuseError

METRICS = ("AP", "APr", "APc", "APf", "APb", "AP_cap", "APr_cap", "APc_cap", "APf_cap", "AP_fixed")
KEY_FIELDS = ("protocol", "model", "source", "stat")  # a missing protocol: today's val / train sources
REGIME_FIELDS = ("cond2", "sigma_min", "diag_r", "diag_c", "diag_f", "clipped")
LOG_FIELDS = ("cond2", "sigma_min")  # averaged geometrically
NO_EFFECT = "no detectable effect"


def _defined(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v >= 0


def pct(v: float | None) -> str:
    """A metric fraction as a percentage with one decimal; '-' when undefined."""
    if not _defined(v):
        return "-"
    return f"{100.0 * v:.1f}"  # type: ignore[operator]


def mean_cell(r: Mapping[str, Any], m: str) -> str:
    """A table cell of an aggregated row: 'mean ± std' in % ('mean' alone with one seed)."""
    std = r.get(f"{m}_std")
    return pct(r.get(m)) + ("" if std is None or not _defined(r.get(m)) else f" ± {100 * std:.1f}")


def row_key(r: Mapping[str, Any]) -> tuple[Any, ...]:
    """The identity of a table row across seeds: (protocol or None, model, source, stat)."""
    return tuple(r.get(f) for f in KEY_FIELDS)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with ddof 1) of `values`; (None, None) when empty, std None
    with one value."""
    if not values:
        return None, None
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def _regime_mean(field: str, values: Sequence[float]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return None
    if field in LOG_FIELDS:
        if any(x <= 0 or math.isinf(x) for x in v):
            return math.inf if any(math.isinf(x) for x in v) else min(v)
        return float(math.exp(sum(math.log(x) for x in v) / len(v)))
    return float(sum(v) / len(v))


def aggregate_seeds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per `row_key`, in first-seen order: metric means, `_std`, `_n`, `seeds`, regime means.

    A row without a `seed` counts as seed 0. Non-metric fields (cap, classes, protocol, ...) are
    taken from the key's first row."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(row_key(r), []).append(r)
    out = []
    for group in groups.values():
        seeds = [int(r.get("seed", 0)) for r in group]
        if len(set(seeds)) != len(seeds):
            raise ApiMisuseError(f"aggregate_seeds: row {row_key(group[0])} appears twice for one seed")
        agg: dict[str, Any] = {k: v for k, v in group[0].items()
                               if k not in METRICS and k not in REGIME_FIELDS and k != "seed"}
        agg["seeds"] = seeds
        for m in METRICS:
            vals = [float(r[m]) for r in group if _defined(r.get(m))]
            agg[m], agg[f"{m}_std"] = mean_std(vals)
            agg[f"{m}_n"] = len(vals)
        for f in REGIME_FIELDS:
            if any(f in r for r in group):
                agg[f] = _regime_mean(f, [r.get(f) for r in group])  # type: ignore[misc]
        out.append(agg)
    return out


# --------------------------------------------------------------------------- paired effects


@dataclass(frozen=True)
class SeedSample:
    """One seed's side of a comparison for one metric: the full-data values of a and b and their
    values on the shared image resamples ([n], NaN where undefined)."""

    full_a: float
    full_b: float
    resamples_a: np.ndarray
    resamples_b: np.ndarray


@dataclass(frozen=True)
class Effect:
    """b - a (fractions): the mean over seeds, its 95% interval over image resamples (NaN: none) and
    each seed's difference."""

    delta: float
    low: float
    high: float
    seed_deltas: tuple[float, ...]

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    @property
    def excludes_zero(self) -> bool:
        return self.has_interval and (self.low > 0 or self.high < 0)

    @property
    def seeds_agree(self) -> bool:
        """Every seed's difference is non-zero with the sign of the mean."""
        s = np.sign(self.delta)
        return s != 0 and all(np.sign(d) == s for d in self.seed_deltas)


def _undefined(x: float) -> bool:
    return x is None or math.isnan(x) or x <= -1


def paired_effect(per_seed: Sequence[SeedSample], level: float = 0.95) -> Effect:
    """b - a averaged over seeds with a percentile interval over the shared resamples (module doc)."""
    if not per_seed:
        raise ApiMisuseError("paired_effect: no seed")
    deltas = tuple(math.nan if _undefined(s.full_a) or _undefined(s.full_b) else s.full_b - s.full_a
                   for s in per_seed)
    delta = math.nan if any(math.isnan(d) for d in deltas) else float(np.mean(deltas))
    sizes = {s.resamples_a.shape for s in per_seed} | {s.resamples_b.shape for s in per_seed}
    if len(sizes) != 1:
        raise ApiMisuseError(f"paired_effect: the seeds need the same resamples, got shapes {sorted(sizes)}")
    n = per_seed[0].resamples_a.shape[0]
    if n == 0:
        return Effect(delta, math.nan, math.nan, deltas)
    diff = np.stack([_clean(s.resamples_b) - _clean(s.resamples_a) for s in per_seed])  # [seeds, n]
    ok = ~np.isnan(diff).any(axis=0)
    low, high = percentile_interval(diff[:, ok].mean(axis=0), level)
    return Effect(delta, low, high, deltas)


def _clean(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).copy()
    v[v <= -1] = np.nan
    return v


def effect_verdict(effect: Effect | None, paper: float | None) -> str:
    """The reading's rule: 'same direction as the paper' / 'the opposite of the paper' only where the
    95% interval excludes 0 and every seed agrees in sign with the mean; otherwise 'no detectable
    effect'. `paper` is the paper's change (its sign matters; None: the paper has no number)."""
    if effect is None or math.isnan(effect.delta):
        return "not measurable here"
    if not effect.has_interval:
        return "not tested (no bootstrap interval)"
    if not effect.excludes_zero:
        return NO_EFFECT
    if not effect.seeds_agree:
        return f"{NO_EFFECT} (the seeds disagree in sign)"
    if paper is None:
        return "an effect (the paper gives no number)"
    if paper == 0.0:
        return "an effect; the paper shows no change"
    return "same direction as the paper" if (effect.delta > 0) == (paper > 0) else "the opposite of the paper"


def format_effect(effect: Effect | None) -> str:
    """'+1.2 [-0.3, +2.5]' in points (the interval omitted when there is none); '-' when undefined;
    a trailing ' *' marks a detectable effect (interval excludes 0, seeds agree)."""
    if effect is None or math.isnan(effect.delta):
        return "-"
    text = f"{100 * effect.delta:+.1f}"
    if effect.has_interval:
        text += f" [{100 * effect.low:+.1f}, {100 * effect.high:+.1f}]"
        if effect.excludes_zero and effect.seeds_agree:
            text += " *"
    return text
