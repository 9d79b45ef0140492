"""The calibration study report: the paper's Table 1 / Table 4 layout, figures and a reading.

Input rows are plain dicts, one per (seed, protocol, model, statistics source, statistic):

    {"model": "softmax", "source": "val", "stat": "cm", "seed": 0,
     "AP": .., "APr": .., "APc": .., "APf": .., "APb": .., "AP_cap": .., "cap": 12, "classes": 48,
     "AP_fixed": .., "cond2": .., "sigma_min": .., "diag_r": .., "diag_c": .., "diag_f": .., "clipped": ..}

AP is at the standard 300-per-image cap, AP_cap at the LVIS-equivalent cap `cap` (round(300 K /
1230)), AP_fixed under fixed AP (`budget_note`). Metrics are fractions (-1 / None: undefined),
printed as percentages. `source`: the split of the statistics ("val" = Table 1's upper bound,
"train" = Table 4; "-" for `none`); an optional `protocol` names another way of measuring them
(absent: today's val / train sources); the regime fields (`pcb_analysis.regime_line`) describe the
statistics file the row used (none for `none`). The tables show each row's mean ± std over its
seeds (`aggregate_seeds`); the paired effects with their intervals and the reading come from
`pcb_analysis.reading`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pcb_analysis.atomic import write_text_atomic
from pcb_analysis.calibration import ROW_STATISTICS, table_label
from pcb_analysis.reading import (
    CROSS_FITTED,
    PAPER_PCB_V05,
    PAPER_TABLE1,
    SWEEP,
    Effects,
    comparisons,
    reading,
)
from pcb_analysis.regime import TABLE_HEADER as REGIME_HEADER
from pcb_analysis.regime import RegimeDiagnostics
from pcb_analysis.regime_line import regime_text
from pcb_analysis.study_stats import METRICS, aggregate_seeds, format_effect, mean_cell, pct

__all__ = [
    "METRICS", "PAPER_PCB_V05", "PAPER_TABLE1", "budget_note", "chance_note", "effects_table",
    "markdown_table", "paper_table", "pct", "reading", "regime_section", "rows_to_csv", "seeds_section",
    "study_table", "sweep_rows", "train_vs_val_table", "write_study_report",
]
STAT_ORDER = ROW_STATISTICS  # the statistics table's order; other statistics after them, by name

def _stat_key(stat: str) -> tuple[int, str]:
    return (STAT_ORDER.index(stat) if stat in STAT_ORDER else len(STAT_ORDER), stat)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cap_of(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The LVIS-equivalent cap the rows were evaluated at ('?' when the rows carry none)."""
    return next((r["cap"] for r in rows if r.get("cap") is not None), "?")


def _column(m: str, cap: Any) -> str:
    """A metric's column header: AP at the 300 cap is AP@300, <m>_cap is written <m>@<cap>."""
    return "AP@300" if m == "AP" else m.replace("_cap", f"@{cap}")


def _headers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """METRICS as column headers (`_column`)."""
    cap = _cap_of(rows)
    return [_column(m, cap) for m in METRICS]


def _regime(r: Mapping[str, Any] | None) -> str:
    return (regime_text(r) or "-") if r is not None and r.get("stat") != "none" else "-"


def study_table(rows: Sequence[Mapping[str, Any]], source: str, models: Sequence[str],
                protocol: str | None = None) -> str:
    """Table-1 layout: one row per (model, statistic) with statistics measured on `source` under
    `protocol` (None: today's in-sample rows); mask AP at the 300 cap (with APr/c/f and APb), at the
    LVIS-equivalent cap, fixed AP, and the regime of the statistics file. `rows` are aggregated rows
    (cells: mean ± std over the seeds)."""
    body = []
    for model in models:
        mine = [r for r in rows if r["model"] == model and (r["stat"] == "none" or (
            r["source"] == source and r.get("protocol") == protocol))]
        for r in sorted(mine, key=lambda r: _stat_key(r["stat"])):
            body.append([model, table_label(r["stat"])] + [mean_cell(r, m) for m in METRICS] + [_regime(r)])
    return markdown_table(["model", "statistic", *_headers(rows), "regime of the statistics"], body)


def train_vs_val_table(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> str:
    """Table-4 layout: for each model and statistic, AP (300 cap, LVIS-equivalent cap, fixed) and APr
    with no calibration, val-set and train-set statistics, then the regime of both statistics files."""
    body = []
    cap = _cap_of(rows)
    for model in models:
        none = next((r for r in rows if r["model"] == model and r["stat"] == "none"), None)
        stats = sorted({r["stat"] for r in rows if r["model"] == model and r["stat"] != "none"
                        and not r.get("protocol")}, key=_stat_key)
        for stat in stats:
            by = {r["source"]: r for r in rows
                  if r["model"] == model and r["stat"] == stat and not r.get("protocol")}
            val, train = by.get("val", {}), by.get("train", {})
            cells = [model, stat]
            for m in ("AP", "AP_cap", "AP_fixed", "APr"):
                cells += [mean_cell(none, m) if none else "-", mean_cell(val, m), mean_cell(train, m)]
            body.append(cells + [_regime(by.get("val")), _regime(by.get("train"))])
    names = {"AP": "AP@300", "AP_cap": f"AP@{cap}", "AP_fixed": "AP_fixed", "APr": "APr@300"}
    header = ["model", "statistic"]
    for m in ("AP", "AP_cap", "AP_fixed", "APr"):
        header += [f"{names[m]} none", f"{names[m]} val-stat", f"{names[m]} train-stat"]
    return markdown_table([*header, "val-stat regime", "train-stat regime"], body)


EFFECT_METRICS = ("AP", "APr", "APc", "APf", "APb", "AP_cap", "APr_cap", "APf_cap")


def effects_table(rows: Sequence[Mapping[str, Any]], models: Sequence[str], effects: Effects) -> str:
    """The key comparisons (`pcb_analysis.reading.comparisons`): b - a in points, the seeds' mean and
    its 95% paired-bootstrap interval; '*' marks a detectable effect (the reading's rule). Columns at
    the 300 cap, then at the LVIS-equivalent cap (where the effects were bootstrapped there)."""
    body = []
    capped = any(m.endswith("_cap") for per in effects.values() for m in per)
    metrics = [m for m in EFFECT_METRICS if capped or not m.endswith("_cap")]
    for b, a, label in comparisons(rows, models):
        eff = effects.get((b, a), {})
        body.append([str(b[1]), label] + [format_effect(eff.get(m)) for m in metrics])
    cap = _cap_of(rows)
    return markdown_table(["model", "comparison (b - a)", *(_column(m, cap) for m in metrics)], body)


def chance_note(effects: Effects) -> str:
    """How many of the intervals mark an effect, against how many would by chance alone."""
    tested = [e for per in effects.values() for e in per.values() if e.has_interval]
    marked = sum(e.excludes_zero and e.seeds_agree for e in tested)
    return (f"{marked} of {len(tested)} intervals mark an effect ('*'). Where nothing differs, about 1 in "
            f"20 95% intervals still excludes 0 ({len(tested) / 20:.1f} expected here), so a lone '*' among "
            "many is weak evidence; an effect that holds across metrics, statistics and seeds is not.")


def seeds_section(n_seeds: int, resamples: int, *, demo: bool) -> str:
    """Where the variation comes from, the intervals, the reading's rule and what reproduces."""
    if demo:
        source = (
            f"**Seeds.** {n_seeds} training seed{'s' if n_seeds != 1 else ''} per model: the training seed "
            "(model initialisation, sampler order, augmentation stream) is the source of variation; there "
            "is one synthetic dataset (its seed is fixed), so the spread says nothing about a different "
            "draw of the data. Tables: mean ± sample standard deviation over the seeds (n = "
            f"{n_seeds}; per-seed values in `results.csv`)."
            + ("" if n_seeds > 1 else " With one seed there is no spread: the tables show the value alone.")
        )
    else:
        source = (
            "**One model instance.** `pcbkit study` evaluates one trained checkpoint: the intervals below "
            "cover the choice of val images only, not the training run (another seed can move AP by more)."
        )
    boot = (
        f"**Intervals.** Paired bootstrap over val images (`pcb_analysis.bootstrap`, {resamples} resamples, "
        "the same resamples for both sides and for every seed): each difference b - a is given as the "
        "seeds' mean with the 95% percentile interval of its per-resample seed mean. Bootstrapped: AP@300, "
        "APr, APc, APf (mask) and APb, and mask AP, APr, APc, APf at the LVIS-equivalent cap from the same "
        "results files; not fixed AP."
        if resamples > 0 else
        "**Intervals.** None: the bootstrap was switched off (`--bootstrap 0`), so no difference is "
        "tested and the reading states none as an effect."
    )
    rule = (
        "**Reading rule.** A difference is called an effect (\"same direction as the paper\" or \"the "
        "opposite of the paper\") only where its 95% interval excludes 0"
        + (" and every seed's difference has the sign of the mean" if demo else "")
        + "; otherwise it reads \"no detectable effect\". In the table a '*' marks such effects."
    )
    if not demo:
        return "\n\n".join([source, boot, rule])
    repro = (
        "**Reproducibility.** The same machine and seed reproduce bit for bit (two 60-iteration runs gave "
        "identical weights). Another CPU's floating point, amplified by training, does not: a fresh "
        "`make demo` on another 2-core machine moved softmax AP from 23.9 to 25.3 and pcb with the "
        "val-set CM from 15.2 to 9.1 AP, and flipped three of the report's verdicts. A single run is one "
        "draw: the across-seed spread, not a rerun elsewhere, is the yardstick for what a difference means."
    )
    return "\n\n".join([source, boot, rule, repro])


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
    effects: Effects | None = None,
    intervals: str | None = None,
) -> Path:
    """Write `out_dir/README.md`: the study tables (per-seed `rows` aggregated), the paired effects
    (`effects`, with `intervals` the text on seeds and intervals), figures (paths relative to
    out_dir), a reading."""
    out_dir = Path(out_dir)
    agg = aggregate_seeds(rows)
    parts = [f"# {title}", "", preamble.strip(), ""]
    parts += ["## Table 1 layout: statistics measured on the evaluated split (upper bound)", "",
              study_table(agg, "val", models), ""]
    if any(r.get("protocol") == CROSS_FITTED for r in agg):
        parts += ["## Table 1 layout: cross-fitted val statistics (out of sample)", "",
                  "The val images are split in two halves by a seeded hash of the image id; the statistics "
                  "of one half calibrate the other half and vice versa, and the two halves' results are "
                  "evaluated together (docs/calibration.md §8). An in-sample inverse can map a rare val "
                  "instance onto its own class (an oracle); out of fold it cannot. Regime: of the full val "
                  "statistics.", "", study_table(agg, "val", models, CROSS_FITTED), ""]
    if any(r.get("source") == "train" and not r.get("protocol") for r in agg):
        parts += ["## Table 1 layout: train-set statistics (Table 4's protocol)", "",
                  study_table(agg, "train", models), ""]
    parts += ["## Table 4 layout: val-set vs train-set statistics", "", train_vs_val_table(agg, models), ""]
    if any(r.get("protocol") == SWEEP for r in agg):
        parts += ["## Knob sweeps (val statistics, in sample)", "", sweep_table(agg, models), ""]
    parts += ["Metrics in %: AP@300, APr, APc, APf are mask AP at the standard 300 detections per image; "
              "APb is box AP; AP@N is mask AP at the LVIS-equivalent cap N; AP_fixed is mask AP under the "
              "fixed-AP protocol (10,000 detections per class, no per-image cap), which is fairer to "
              "calibration because calibration moves scores across classes. Regime: cond_2(M) and the "
              "smallest singular value of the statistics' matrix, its mean diagonal per r/c/f bucket and "
              "the share of |p M^-1| that cm's clipping removes (docs/statistics.md §4).", "",
              budget_note(agg), ""]
    if effects is not None or intervals:
        parts += ["## Differences with 95% intervals", ""]
        if effects is not None:
            parts += [effects_table(agg, models, effects), "", chance_note(effects), ""]
        if intervals:
            parts += [intervals.strip(), ""]
    parts += ["## The paper's Table 1 (LVIS v0.5, Mask R-CNN R50-FPN, val-set statistics)", "",
              paper_table(), ""]
    for name, rel in (figures or {}).items():
        parts += [f"## {name}", "", f"![{name}]({rel})", ""]
    if pairs_markdown:
        parts += ["## Top confused pairs", "", pairs_markdown, ""]
    for heading, text in extra_sections:
        parts += [f"## {heading}", "", text.strip(), ""]
    parts += ["## Reading", ""]
    parts += [f"- {s}" for s in [*reading(agg, models, effects), *notes]]
    parts.append("")
    path = out_dir / "README.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def sweep_rows(
    rows: Sequence[Mapping[str, Any]], model: str
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """One model's sweep: the parameter-free rows at the knobs' ends (none, and ms / cm with val
    statistics in sample; statistics order) and its SWEEP rows (by estimator family, then value)."""
    ends = [r for r in rows if r["model"] == model and r["stat"] in ("none", "ms", "cm")
            and not r.get("protocol") and r["source"] in ("-", "val")]
    grid = [r for r in rows if r["model"] == model and r.get("protocol") == SWEEP]
    return (sorted(ends, key=lambda r: _stat_key(r["stat"])),
            sorted(grid, key=lambda r: (str(r.get("family")), float(r.get("value") or 0.0))))


def sweep_table(rows: Sequence[Mapping[str, Any]], models: Sequence[str]) -> str:
    """The knob sweeps (rows of protocol SWEEP) beside the parameter-free rows at their ends (none,
    ms, cm with val statistics, in sample): mask AP@300, APr, APf, fixed AP, mean ± std over seeds."""
    body = []
    for model in models:
        ends, grid = sweep_rows(rows, model)
        for r in [*ends, *grid]:
            body.append([model, r["stat"]] + [mean_cell(r, m) for m in ("AP", "APr", "APf", "AP_fixed")])
    return markdown_table(["model", "statistic", "AP@300", "APr", "APf", "AP_fixed"], body) + "\n\n" + (
        "Ends of each knob: cm-diagshrink lambda = 1 is ms, lambda = 0 is cm; cm-tikhonov tau = 0 is cm "
        "and tau -> infinity is ms; ibu from ms with k = 0 is ms (docs/calibration.md §7). Figures per "
        "model below; sweeps are not bootstrapped (read them against the intervals above).")


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
    """Per-seed rows as CSV: a `protocol` column when a row has one, a `seed` column when the rows span
    more than one seed (so a one-seed study writes today's columns)."""
    keys = ["model", "source", "stat"]
    if any(r.get("protocol") for r in rows):
        keys.insert(0, "protocol")
    if len({r.get("seed", 0) for r in rows}) > 1:
        keys.insert(0, "seed")
    lines = [",".join([*keys, *METRICS])]
    for r in rows:
        vals = [str(r.get(k) if r.get(k) is not None else "") for k in keys]
        vals += ["" if r.get(m) is None else f"{r[m]:.6f}" for m in METRICS]
        lines.append(",".join(vals))
    return "\n".join(lines) + "\n"
