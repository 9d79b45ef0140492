"""The calibration study report: the paper's Table 1 / Table 4 layout, figures and a reading.

Input rows are plain dicts, one per (model, statistics source, statistic):

    {"model": "softmax", "source": "val", "stat": "cm",
     "AP": .., "APr": .., "APc": .., "APf": .., "APb": .., "AP_cap": .., "cap": 12, "classes": 48,
     "AP_fixed": ..}

AP is at the standard 300-per-image cap, AP_cap at the LVIS-equivalent cap `cap` (round(300 K /
1230)), AP_fixed under fixed AP; `budget_note` says which one the paper's numbers compare with.

Metrics are fractions in [0, 1] (or -1 / None when undefined) and are printed as percentages.
`source` is the split the statistics were measured on ("val" = the paper's upper bound, Table 1;
"train" = Table 4); the `none` statistic has source "-".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pcb_analysis.atomic import write_text_atomic
from pcb_analysis.calibration import ROW_STATISTICS, table_label
from pcb_analysis.regime import TABLE_HEADER as REGIME_HEADER
from pcb_analysis.regime import RegimeDiagnostics

METRICS = ("AP", "APr", "APc", "APf", "APb", "AP_cap", "AP_fixed")
STAT_ORDER = ROW_STATISTICS  # the statistics table's order; other statistics after them, by name

# docs/method.md §3, Table 1 of the paper (LVIS v0.5, Mask R-CNN R50-FPN, val-set statistics).
PAPER_TABLE1: tuple[dict[str, Any], ...] = (
    {"sampler": "random", "stat": "none", "AP": 21.9, "APr": 4.6, "APc": 21.7, "APf": 28.9, "APb": 21.9},
    {"sampler": "random", "stat": "ms", "AP": 25.7, "APr": 14.3, "APc": 28.2, "APf": 27.3, "APb": 25.4},
    {"sampler": "random", "stat": "cm", "AP": 26.3, "APr": 23.7, "APc": 27.9, "APf": 26.0, "APb": 25.9},
    {"sampler": "RFS", "stat": "none", "AP": 25.6, "APr": 16.0, "APc": 26.4, "APf": 28.5, "APb": 25.6},
    {"sampler": "RFS", "stat": "ms", "AP": 27.0, "APr": 20.6, "APc": 28.2, "APf": 28.0, "APb": 27.0},
    {"sampler": "RFS", "stat": "cm", "AP": 28.4, "APr": 28.6, "APc": 28.8, "APf": 27.9, "APb": 28.2},
)


def pct(v: float | None) -> str:
    """A metric fraction as a percentage with one decimal; '-' when undefined."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v < 0:
        return "-"
    return f"{100.0 * v:.1f}"


def _stat_key(stat: str) -> tuple[int, str]:
    return (STAT_ORDER.index(stat) if stat in STAT_ORDER else len(STAT_ORDER), stat)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cap_of(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The LVIS-equivalent cap the rows were evaluated at ('?' when the rows carry none)."""
    return next((r["cap"] for r in rows if r.get("cap") is not None), "?")


def _headers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """METRICS as column headers: AP_cap is written AP@<cap>, AP at the 300 cap AP@300."""
    names = {"AP": "AP@300", "AP_cap": f"AP@{_cap_of(rows)}"}
    return [names.get(m, m) for m in METRICS]


def study_table(rows: Sequence[Mapping[str, Any]], source: str, models: Sequence[str]) -> str:
    """Table-1 layout: one row per (model, statistic) with statistics measured on `source`; mask AP at
    the 300 cap (with APr/c/f and APb), at the LVIS-equivalent cap, and fixed AP."""
    body = []
    for model in models:
        mine = [r for r in rows if r["model"] == model and (r["stat"] == "none" or r["source"] == source)]
        for r in sorted(mine, key=lambda r: _stat_key(r["stat"])):
            body.append([model, table_label(r["stat"])] + [pct(r.get(m)) for m in METRICS])
    return markdown_table(["model", "statistic", *_headers(rows)], body)


def train_vs_val_table(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> str:
    """Table-4 layout: for each model and statistic, AP (300 cap, LVIS-equivalent cap, fixed) and APr
    with no calibration, val-set and train-set statistics."""
    body = []
    cap = _cap_of(rows)
    for model in models:
        none = next((r for r in rows if r["model"] == model and r["stat"] == "none"), None)
        stats = sorted({r["stat"] for r in rows if r["model"] == model and r["stat"] != "none"},
                       key=_stat_key)
        for stat in stats:
            by = {r["source"]: r for r in rows if r["model"] == model and r["stat"] == stat}
            val, train = by.get("val", {}), by.get("train", {})
            cells = [model, stat]
            for m in ("AP", "AP_cap", "AP_fixed", "APr"):
                cells += [pct(none.get(m) if none else None), pct(val.get(m)), pct(train.get(m))]
            body.append(cells)
    names = {"AP": "AP@300", "AP_cap": f"AP@{cap}", "AP_fixed": "AP_fixed", "APr": "APr@300"}
    header = ["model", "statistic"]
    for m in ("AP", "AP_cap", "AP_fixed", "APr"):
        header += [f"{names[m]} none", f"{names[m]} val-stat", f"{names[m]} train-stat"]
    return markdown_table(header, body)


def budget_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """Which of the three APs compares with the paper's numbers, and why (docs/evaluation.md §4)."""
    cap = _cap_of(rows)
    num_classes = next((r["classes"] for r in rows if r.get("classes")), None)
    share = (f"; with K = {num_classes} classes that is {300 / num_classes:.1f} detections per class "
             "and image, so the cap hardly binds") if num_classes else ""
    return (
        f"Three budgets. AP@300 is the standard LVIS protocol, 300 detections per image{share}. The "
        "paper's numbers are AP@300 on LVIS v0.5's 1,230 classes, 0.24 detections per class and image: "
        "there the cap binds, and a calibration that lifts rare classes' scores also decides which "
        f"detections exist at all. AP@{cap} (round(300 K / 1230)) keeps that per-class budget, so it is "
        "the column comparable to the paper's AP (only approximately: classes, images and detector "
        "differ). AP_fixed (Dave et al. 2021: no per-image cap, the 10,000 best detections of each class "
        "over the split) removes the coupling of classes through the per-image budget and measures each "
        "class's ranking alone; the paper reports no fixed AP, but AP_fixed against "
        f"AP@{cap} separates a calibration's ranking effect from its budget effect."
    )



def paper_table() -> str:
    body = [[r["sampler"], table_label(r["stat"])]
            + [f"{r[m]:.1f}" for m in ("AP", "APr", "APc", "APf", "APb")] for r in PAPER_TABLE1]
    return markdown_table(["sampler", "statistic", "AP", "APr", "APc", "APf", "APb"], body)


def _get(rows: Sequence[Mapping[str, Any]], model: str, stat: str, source: str) -> Mapping[str, Any] | None:
    for r in rows:
        if r["model"] == model and r["stat"] == stat and (stat == "none" or r["source"] == source):
            return r
    return None


def _delta(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None, m: str) -> float | None:
    if a is None or b is None:
        return None
    va, vb = a.get(m), b.get(m)
    if va is None or vb is None or va < 0 or vb < 0:
        return None
    return 100.0 * (va - vb)


# docs/method.md §5: the released Softmax + PCB model (LVIS v0.5, R50), against Table 1's random/none row.
PAPER_PCB_V05: dict[str, float] = {"AP": 25.1, "APr": 12.6, "APc": 25.5, "APf": 29.5, "APb": 25.2}


def _paper(sampler: str, stat: str) -> Mapping[str, float]:
    return next(r for r in PAPER_TABLE1 if r["sampler"] == sampler and r["stat"] == stat)


def verdict(here: float | None, paper: float, *, noise: float = 1.0) -> str:
    """How a measured change (points) relates to the paper's: same or opposite direction, or within noise."""
    if here is None:
        return "not measurable here"
    if abs(here) < noise:
        return f"no clear effect here (within {noise:g} point)"
    if paper == 0.0:
        return "the paper shows no change"
    return "same direction as the paper" if (here > 0) == (paper > 0) else "the opposite of the paper"


def _spread(r: Mapping[str, Any] | None) -> float | None:
    """max - min of APr, APc, APf in points (a frequency-bias summary); None when one is undefined."""
    if r is None:
        return None
    vals = [r.get(m) for m in ("APr", "APc", "APf")]
    if any(v is None or v < 0 for v in vals):
        return None
    return 100.0 * (max(vals) - min(vals))  # type: ignore[type-var, operator]


def reading(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> list[str]:
    """Plain sentences derived from the numbers, each set against the paper's (docs/method.md §3, §5).

    Only what the rows support is claimed: a change under one point is called noise; a change with
    the paper's sign is "same direction", otherwise "the opposite of the paper"."""
    out: list[str] = []

    def fmt(d: float | None) -> str:
        return "n/a" if d is None else f"{d:+.1f}"

    p_none, p_cm = _paper("random", "none"), _paper("random", "cm")
    paper_cm = {m: p_cm[m] - p_none[m] for m in ("AP", "APr", "APf")}
    paper_cm_ms = {s: _paper(s, "cm")["APr"] - _paper(s, "ms")["APr"] for s in ("random", "RFS")}
    for model in models:
        none = _get(rows, model, "none", "-")
        if none is None:
            continue
        cm_val, ms_val = _get(rows, model, "cm", "val"), _get(rows, model, "ms", "val")
        cm_tr = _get(rows, model, "cm", "train")
        if _delta(none, none, "APr") is not None and _delta(none, none, "APf") is not None:  # both defined
            out.append(
                f"**{model}**: without calibration APr is {pct(none['APr'])} against APf {pct(none['APf'])} "
                f"(a {100 * (none['APf'] - none['APr']):.1f}-point frequency bias; the paper's baseline: "
                f"{p_none['APr']:.1f} against {p_none['APf']:.1f})."
            )
        if cm_val is not None:
            d_apr, d_ap = _delta(cm_val, none, "APr"), _delta(cm_val, none, "AP")
            out.append(
                f"With the val-set matrix (upper bound) CM changes APr by {fmt(d_apr)}, APf by "
                f"{fmt(_delta(cm_val, none, 'APf'))} and AP by {fmt(d_ap)} points "
                f"(paper, random sampler: {paper_cm['APr']:+.1f}, {paper_cm['APf']:+.1f}, "
                f"{paper_cm['AP']:+.1f}); on APr: {verdict(d_apr, paper_cm['APr'])}, "
                f"on AP: {verdict(d_ap, paper_cm['AP'])}."
            )
            if ms_val is not None:
                d_cm_ms = _delta(cm_val, ms_val, "APr")
                out.append(
                    f"CM against MS on APr: {fmt(d_cm_ms)} points (paper: {paper_cm_ms['random']:+.1f} "
                    f"random sampler, {paper_cm_ms['RFS']:+.1f} RFS): "
                    f"{verdict(d_cm_ms, paper_cm_ms['random'])}."
                )
            s0, s1 = _spread(none), _spread(cm_val)
            if s0 is not None and s1 is not None:
                out.append(
                    f"Spread of APr / APc / APf: {s0:.1f} points without calibration, {s1:.1f} with CM "
                    f"(paper: {_spread(_scaled(p_none)):.1f} -> {_spread(_scaled(p_cm)):.1f} random sampler, "
                    f"{_spread(_scaled(_paper('RFS', 'cm'))):.1f} for RFS + CM, 'almost fully unbiased')."
                )
        if cm_tr is not None:
            d_tr, d_val = _delta(cm_tr, none, "APr"), _delta(cm_val, none, "APr") if cm_val else None
            agrees = d_tr is not None and d_val is not None and d_tr < d_val
            out.append(
                f"With the train-set matrix CM changes APr by {fmt(d_tr)} and AP by "
                f"{fmt(_delta(cm_tr, none, 'AP'))} points, against {fmt(d_val)} APr with the val-set matrix "
                "(the paper's Table 4: the train matrix helps much less, because the model fits its training "
                "set and that matrix is close to the identity): "
                f"{'as in the paper' if agrees else 'not as in the paper'}."
            )
    base = _get(rows, models[0], "none", "-") if models else None
    paper_pcb = {m: PAPER_PCB_V05[m] - p_none[m] for m in ("AP", "APr", "APc", "APf")}
    for model in models[1:]:
        other = _get(rows, model, "none", "-")
        if base is not None and other is not None:
            d = {m: _delta(other, base, m) for m in ("AP", "APr", "APc", "APf")}
            out.append(
                f"**{model}** vs **{models[0]}** (no calibration): AP {fmt(d['AP'])}, APr {fmt(d['APr'])}, "
                f"APc {fmt(d['APc'])}, APf {fmt(d['APf'])} points (paper, Softmax + PCB vs Softmax on "
                f"LVIS v0.5: {paper_pcb['AP']:+.1f}, {paper_pcb['APr']:+.1f}, {paper_pcb['APc']:+.1f}, "
                f"{paper_pcb['APf']:+.1f}); on AP: {verdict(d['AP'], paper_pcb['AP'])}, "
                f"on APr: {verdict(d['APr'], paper_pcb['APr'])}."
            )
    return out


def _scaled(r: Mapping[str, float]) -> dict[str, float]:
    """A paper row (percentages) as fractions, the unit of the study rows."""
    return {m: r[m] / 100.0 for m in ("APr", "APc", "APf") if m in r}


def write_study_report(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    models: Sequence[str],
    *,
    title: str,
    preamble: str,
    figures: Mapping[str, str] | None = None,
    pairs_markdown: str | None = None,
    notes: Sequence[str] = (),
    extra_sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write `out_dir/README.md`: the study tables, figures (paths relative to out_dir), a reading."""
    out_dir = Path(out_dir)
    parts = [f"# {title}", "", preamble.strip(), ""]
    parts += ["## Table 1 layout: statistics measured on the evaluated split (upper bound)", "",
              study_table(rows, "val", models), ""]
    parts += ["## Table 4 layout: val-set vs train-set statistics", "", train_vs_val_table(rows, models), ""]
    parts += ["Metrics in %: AP@300, APr, APc, APf are mask AP at the standard 300 detections per image; "
              "APb is box AP; AP@N is mask AP at the LVIS-equivalent cap N; AP_fixed is mask AP under the "
              "fixed-AP protocol (10,000 detections per class, no per-image cap), which is fairer to "
              "calibration because calibration moves scores across classes.", "",
              budget_note(rows), ""]
    parts += ["## The paper's Table 1 (LVIS v0.5, Mask R-CNN R50-FPN, val-set statistics)", "",
              paper_table(), ""]
    for name, rel in (figures or {}).items():
        parts += [f"## {name}", "", f"![{name}]({rel})", ""]
    if pairs_markdown:
        parts += ["## Top confused pairs", "", pairs_markdown, ""]
    for heading, text in extra_sections:
        parts += [f"## {heading}", "", text.strip(), ""]
    parts += ["## Reading", ""]
    parts += [f"- {s}" for s in [*reading(rows, models), *notes]]
    parts.append("")
    path = out_dir / "README.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def regime_section(diagnostics: Sequence[RegimeDiagnostics]) -> str:
    """The regime-diagnostics table of the statistics files (one row each) and how to read it."""
    table = markdown_table(REGIME_HEADER, [d.table_row() for d in diagnostics])
    return table + "\n\n" + (
        "diag: mean of M[i, i] over the bucket's classes with positives (a class without positives has "
        "no row and is left out); cond_2(M) and sigma_min: of the matrix cm inverts; inst. min/med: "
        "ground-truth instances per class on the images the statistics read (min / median over the "
        "bucket); min L1 rare row: the smallest sum_j |M[r, j] - M[o, j]| between a rare class's row and "
        "any other class's row; clipped mass: the share of |p M^-1| (over the statistics' positives) "
        "that cm's clipping removes. Definitions: docs/statistics.md §4."
    )


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["model", "source", "stat", *METRICS]
    lines = [",".join(header)]
    for r in rows:
        vals = [str(r.get("model", "")), str(r.get("source", "")), str(r.get("stat", ""))]
        vals += ["" if r.get(m) is None else f"{r[m]:.6f}" for m in METRICS]
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"
