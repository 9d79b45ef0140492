"""The study report's reading: each measured difference set against the paper, stated as an effect
only where it is detectable.

`comparisons(rows, models)` lists the study's key paired comparisons (b, a, label) between table
rows: every statistic against `none` per model and source, CM against MS (val statistics), CM with
train against val statistics, every other model's `none` against the first model's, and each
`<base>_pcb` model's `none` against its `<base>` (any number of models; `model_pairs`). The study
computes an `Effect` (pcb_analysis.study_stats) per comparison and metric from the results files;
`reading(rows, models, effects)` writes the sentences. The rule (`effect_verdict`): "same direction
as the paper" / "the opposite of the paper" only where the 95% paired-bootstrap interval over val
images excludes 0 and every seed's difference has the sign of the mean; otherwise "no detectable
effect". The MS / CM sentences are repeated at the LVIS-equivalent cap (`*_cap` metrics) where the rows
carry it. Rows are the seed-aggregated rows (`aggregate_seeds`); metrics are fractions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pcb_analysis.lvis_protocol import MAX_DETS
from pcb_analysis.study_stats import Effect, effect_verdict, format_effect, mean_cell, row_key

Key = tuple[Any, ...]
CROSS_FITTED = "cross-fitted"  # protocol of rows whose val statistics come from the other half of val
SWEEP = "sweep"  # protocol of knob-sweep rows: plotted and tabled, not compared (no bootstrap)
Effects = Mapping[tuple[Key, Key], Mapping[str, Effect]]

# docs/method.md §3, Table 1 of the paper (LVIS v0.5, Mask R-CNN R50-FPN, val-set statistics).
PAPER_TABLE1: tuple[dict[str, Any], ...] = (
    {"sampler": "random", "stat": "none", "AP": 21.9, "APr": 4.6, "APc": 21.7, "APf": 28.9, "APb": 21.9},
    {"sampler": "random", "stat": "ms", "AP": 25.7, "APr": 14.3, "APc": 28.2, "APf": 27.3, "APb": 25.4},
    {"sampler": "random", "stat": "cm", "AP": 26.3, "APr": 23.7, "APc": 27.9, "APf": 26.0, "APb": 25.9},
    {"sampler": "RFS", "stat": "none", "AP": 25.6, "APr": 16.0, "APc": 26.4, "APf": 28.5, "APb": 25.6},
    {"sampler": "RFS", "stat": "ms", "AP": 27.0, "APr": 20.6, "APc": 28.2, "APf": 28.0, "APb": 27.0},
    {"sampler": "RFS", "stat": "cm", "AP": 28.4, "APr": 28.6, "APc": 28.8, "APf": 27.9, "APb": 28.2},
)
# docs/method.md §5: the released Softmax + PCB model (LVIS v0.5, R50), against Table 1's random/none row.
PAPER_PCB_V05: dict[str, float] = {"AP": 25.1, "APr": 12.6, "APc": 25.5, "APf": 29.5, "APb": 25.2}
# the one model pair the paper's Softmax + PCB vs Softmax numbers describe (the demo's default names)
PCB_PAIR = ("pcb", "softmax")


def paper_row(sampler: str, stat: str) -> Mapping[str, float]:
    return next(r for r in PAPER_TABLE1 if r["sampler"] == sampler and r["stat"] == stat)


def find_row(rows: Sequence[Mapping[str, Any]], model: str, stat: str, source: str = "-",
             protocol: str | None = None) -> Mapping[str, Any] | None:
    """The row of (model, stat, source) (`none`: any source) under `protocol` (None: today's rows)."""
    for r in rows:
        if (r["model"] == model and r["stat"] == stat and (stat == "none" or r["source"] == source)
                and (stat == "none" or r.get("protocol") == protocol)):
            return r
    return None


def comparisons(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> list[tuple[Key, Key, str]]:
    """The key comparisons (b key, a key, label), b - a, in report order (module doc)."""
    out: list[tuple[Key, Key, str]] = []
    for model in models:
        none = find_row(rows, model, "none")
        if none is None:
            continue
        for r in rows:
            if r["model"] == model and r["stat"] != "none" and r.get("protocol") != SWEEP:
                proto = f", {r['protocol']}" if r.get("protocol") else ""
                out.append((row_key(r), row_key(none), f"{r['stat']} ({r['source']}-stat{proto}) - none"))
        pairs = ((("cm", "val"), ("ms", "val"), "cm - ms (val-stat)"),
                 (("cm", "train"), ("cm", "val"), "cm train-stat - cm val-stat"))
        for (sb, srcb), (sa, srca), label in pairs:
            b, a = find_row(rows, model, sb, srcb), find_row(rows, model, sa, srca)
            if a is not None and b is not None:
                out.append((row_key(b), row_key(a), label))
    for model, ref in model_pairs(models):
        other, base = find_row(rows, model, "none"), find_row(rows, ref, "none")
        if base is not None and other is not None:
            out.append((row_key(other), row_key(base), f"{model} - {ref} (none)"))
    return out


def model_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """(model, reference) pairs compared without calibration, for any number of models: every other
    model against the first, then each `<base>_pcb` against its `<base>` when both are present and
    `<base>` is not the first (e.g. seesaw_pcb - seesaw: does PCB help on top of that loss)."""
    if not models:
        return []
    pairs = [(m, models[0]) for m in models[1:]]
    pairs += [(m, m.removesuffix("_pcb")) for m in models[1:]
              if m.endswith("_pcb") and m.removesuffix("_pcb") in models[1:]]
    return pairs


def _effect(effects: Effects, b: Mapping[str, Any] | None, a: Mapping[str, Any] | None,
            m: str) -> Effect | None:
    if a is None or b is None:
        return None
    return effects.get((row_key(b), row_key(a)), {}).get(m)


def _spread(r: Mapping[str, Any] | None) -> float | None:
    """max - min of APr, APc, APf in points (a frequency-bias summary); None when one is undefined."""
    if r is None:
        return None
    vals = [r.get(m) for m in ("APr", "APc", "APf")]
    if any(v is None or v < 0 for v in vals):
        return None
    return 100.0 * (max(vals) - min(vals))  # type: ignore[type-var, operator]


def _scaled(r: Mapping[str, float]) -> dict[str, float]:
    """A paper row (percentages) as fractions, the unit of the study rows."""
    return {m: r[m] / 100.0 for m in ("APr", "APc", "APf") if m in r}


def _row_delta(b: Mapping[str, Any] | None, a: Mapping[str, Any] | None, m: str) -> float | None:
    """b - a of the rows' (seed-mean) values; None when either is missing or undefined."""
    if a is None or b is None:
        return None
    va, vb = a.get(m), b.get(m)
    if va is None or vb is None or va < 0 or vb < 0 or math.isnan(va) or math.isnan(vb):
        return None
    return vb - va


def _has_cap(r: Mapping[str, Any]) -> bool:
    """The row carries metrics at an LVIS-equivalent cap other than the standard 300."""
    return r.get("cap") is not None and int(r["cap"]) != MAX_DETS and r.get("APr_cap") is not None


def _at_cap(
    none: Mapping[str, Any], ms_val: Mapping[str, Any] | None, cm_val: Mapping[str, Any] | None,
    eff: Callable[..., str], ver: Callable[..., str], paper_ms: Mapping[str, float],
    paper_cm: Mapping[str, float], paper_cm_ms: float,
) -> list[str]:
    """The same reading at the LVIS-equivalent cap (the budget comparable to the paper's AP, whose
    300 detections per image bind on 1,230 classes); nothing when the rows carry no capped metrics or
    the cap is the standard 300 (K ~ 1,230: the sentences above already are at that budget)."""
    cap = none.get("cap")
    if not _has_cap(none) or none.get("APf_cap") is None:
        return []
    if none["APr_cap"] < 0 or none["APf_cap"] < 0:
        return []
    out = [f"At the LVIS-equivalent cap of {cap} detections per image (the budget comparable to the "
           f"paper's): without calibration APr@{cap} is {mean_cell(none, 'APr_cap')} against APf@{cap} "
           f"{mean_cell(none, 'APf_cap')} (a {100 * (none['APf_cap'] - none['APr_cap']):.1f}-point "
           "frequency bias)."]
    for row, name, paper in ((ms_val, "MS", paper_ms), (cm_val, "CM", paper_cm)):
        if row is not None:
            out.append(
                f"At that cap, with the val-set statistics, {name} changes APr@{cap} by "
                f"{eff(row, none, 'APr_cap')}, APf@{cap} by {eff(row, none, 'APf_cap')} and AP@{cap} by "
                f"{eff(row, none, 'AP_cap')} points (paper: {paper['APr']:+.1f}, {paper['APf']:+.1f}, "
                f"{paper['AP']:+.1f}); on APr: {ver(row, none, 'APr_cap', paper['APr'])}, on AP: "
                f"{ver(row, none, 'AP_cap', paper['AP'])}."
            )
    if cm_val is not None and ms_val is not None:
        out.append(f"At that cap, CM against MS on APr@{cap}: {eff(cm_val, ms_val, 'APr_cap')} points "
                   f"(paper: {paper_cm_ms:+.1f}): {ver(cm_val, ms_val, 'APr_cap', paper_cm_ms)}.")
    return out


def reading(
    rows: Sequence[Mapping[str, Any]], models: Sequence[str], effects: Effects | None = None
) -> list[str]:
    """Plain sentences derived from the rows and the paired effects (module doc for the rule).

    Each difference is printed as 'Δ [low, high]' in points (the seeds' mean and the 95% interval);
    without an effect for a comparison (no bootstrap) the verdict says it was not tested."""
    effects = effects or {}
    out: list[str] = []
    p_none, p_cm, p_ms = paper_row("random", "none"), paper_row("random", "cm"), paper_row("random", "ms")
    paper_cm = {m: p_cm[m] - p_none[m] for m in ("AP", "APr", "APf")}
    paper_ms = {m: p_ms[m] - p_none[m] for m in ("AP", "APr", "APf")}
    paper_cm_ms = {s: paper_row(s, "cm")["APr"] - paper_row(s, "ms")["APr"] for s in ("random", "RFS")}

    def eff(b: Mapping[str, Any] | None, a: Mapping[str, Any] | None, m: str) -> str:
        e = _effect(effects, b, a, m)
        if e is None:  # no bootstrap: the point difference alone
            d = _row_delta(b, a, m)
            return "n/a" if d is None else f"{100 * d:+.1f}"
        return format_effect(e).removesuffix(" *")

    def ver(b: Mapping[str, Any] | None, a: Mapping[str, Any] | None, m: str, paper: float | None) -> str:
        e = _effect(effects, b, a, m)
        if e is None:
            missing = _row_delta(b, a, m) is None
            return "not measurable here" if missing else "not tested (no bootstrap interval)"
        return effect_verdict(e, paper)

    for model in models:
        none = find_row(rows, model, "none")
        if none is None:
            continue
        cm_val, ms_val, cm_tr = (find_row(rows, model, s, src)
                                 for s, src in (("cm", "val"), ("ms", "val"), ("cm", "train")))
        if none.get("APr") is not None and none.get("APf") is not None and none["APr"] >= 0 <= none["APf"]:
            out.append(
                f"**{model}**: without calibration APr is {mean_cell(none, 'APr')} against APf "
                f"{mean_cell(none, 'APf')} "
                f"(a {100 * (none['APf'] - none['APr']):.1f}-point frequency bias; the paper's baseline: "
                f"{p_none['APr']:.1f} against {p_none['APf']:.1f})."
            )
        for row, name, paper in ((ms_val, "MS", paper_ms), (cm_val, "CM", paper_cm)):
            if row is None:
                continue
            out.append(
                f"With the val-set statistics (upper bound) {name} changes APr by {eff(row, none, 'APr')}, "
                f"APf by {eff(row, none, 'APf')} and AP by {eff(row, none, 'AP')} points "
                f"(paper, random sampler: {paper['APr']:+.1f}, {paper['APf']:+.1f}, {paper['AP']:+.1f}); "
                f"on APr: {ver(row, none, 'APr', paper['APr'])}, on AP: {ver(row, none, 'AP', paper['AP'])}."
            )
        out += _at_cap(none, ms_val, cm_val, eff, ver, paper_ms, paper_cm, paper_cm_ms["random"])
        if cm_val is not None and ms_val is not None:
            out.append(
                f"CM against MS on APr: {eff(cm_val, ms_val, 'APr')} points (paper: "
                f"{paper_cm_ms['random']:+.1f} random sampler, {paper_cm_ms['RFS']:+.1f} RFS): "
                f"{ver(cm_val, ms_val, 'APr', paper_cm_ms['random'])}."
            )
        s0, s1 = _spread(none), _spread(cm_val)
        if s0 is not None and s1 is not None:
            out.append(
                f"Spread of APr / APc / APf (seed means): {s0:.1f} points without calibration, {s1:.1f} "
                "with CM "
                f"(paper: {_spread(_scaled(p_none)):.1f} -> {_spread(_scaled(p_cm)):.1f} random sampler, "
                f"{_spread(_scaled(paper_row('RFS', 'cm'))):.1f} for RFS + CM, 'almost fully unbiased')."
            )
        if cm_tr is not None:
            out.append(
                f"With the train-set matrix CM changes APr by {eff(cm_tr, none, 'APr')} and AP by "
                f"{eff(cm_tr, none, 'AP')} points; against CM with the val-set matrix, APr "
                f"{eff(cm_tr, cm_val, 'APr')} (the paper's Table 4: the train matrix helps much less, "
                "because the model fits its training set and that matrix is close to the identity; a "
                f"negative difference is the paper's direction): {ver(cm_tr, cm_val, 'APr', -1.0)}."
            )
    paper_pcb = {m: PAPER_PCB_V05[m] - p_none[m] for m in ("AP", "APr", "APc", "APf")}
    for model, ref in model_pairs(models):
        other, base = find_row(rows, model, "none"), find_row(rows, ref, "none")
        if base is None or other is None:
            continue
        d = {m: eff(other, base, m) for m in ("AP", "APr", "APc", "APf")}
        text = (f"**{model}** vs **{ref}** (no calibration): AP {d['AP']}, APr {d['APr']}, APc {d['APc']}, "
                f"APf {d['APf']} points")
        if (model, ref) == PCB_PAIR:  # the paper's number is for Softmax + PCB against Softmax only
            out.append(
                f"{text} (paper, Softmax + PCB vs Softmax on LVIS v0.5: {paper_pcb['AP']:+.1f}, "
                f"{paper_pcb['APr']:+.1f}, {paper_pcb['APc']:+.1f}, {paper_pcb['APf']:+.1f}); on AP: "
                f"{ver(other, base, 'AP', paper_pcb['AP'])}, on APr: "
                f"{ver(other, base, 'APr', paper_pcb['APr'])}."
            )
        else:  # the paper gives no number for this pair in pcbkit's tables
            out.append(f"{text}; on AP: {ver(other, base, 'AP', None)}, "
                       f"on APr: {ver(other, base, 'APr', None)}.")
        cap = base.get("cap")
        if _has_cap(base) and _has_cap(other):
            paper_r = paper_pcb["APr"] if (model, ref) == PCB_PAIR else None
            paper_a = paper_pcb["AP"] if (model, ref) == PCB_PAIR else None
            out.append(
                f"**{model}** vs **{ref}** at the LVIS-equivalent cap of {cap}: AP@{cap} "
                f"{eff(other, base, 'AP_cap')}, APr@{cap} {eff(other, base, 'APr_cap')}, APf@{cap} "
                f"{eff(other, base, 'APf_cap')} points; on AP: {ver(other, base, 'AP_cap', paper_a)}, "
                f"on APr: {ver(other, base, 'APr_cap', paper_r)}."
            )
    return out
