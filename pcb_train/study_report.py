"""The study's report: figures, tables, regime notes and README of one study or demo run.

Input: the models (`StudyModel`), their statistics files (model -> split -> path), the metrics rows of
every calibrate run (one dict per statistic, protocol and seed), the bootstrap files and the step log.
Output: `report/` with README.md, results.csv / results.json, top_confused_pairs.csv and PNG figures
(`pcb_analysis.report` renders the markdown; `pcb_analysis.plots` the figures). Nothing here computes
a result: it reads what the pipeline's steps (`pcb_train.study`) wrote.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcb_analysis import plots
from pcb_analysis.atomic import write_json_atomic, write_text_atomic
from pcb_analysis.errors import PcbkitError
from pcb_analysis.reading import comparisons
from pcb_analysis.regime import RegimeDiagnostics, diagnose
from pcb_analysis.regime_line import regime_fields, regime_text
from pcb_analysis.report import regime_section, rows_to_csv, seeds_section, sweep_rows, write_study_report
from pcb_analysis.stats import ClassStats
from pcb_analysis.study_stats import aggregate_seeds
from pcb_train.study_bootstrap import load_bootstrap, paired_effects

if TYPE_CHECKING:
    from pcb_train.study import StepLog, StudyInputs, StudyModel

REPORT_DPI = 120  # committed report figures: readable and small


def regime_diagnostics(
    models: Sequence[StudyModel], stats: Mapping[str, Mapping[str, Path]], suffix: str = ""
) -> list[RegimeDiagnostics]:
    """`pcb_analysis.regime.diagnose` of every statistics file (val, then train, of each model);
    `suffix` is appended to the labels (e.g. the seed)."""
    return [diagnose(ClassStats.load(stats[m.name][split]), label=f"{m.name} {split}{suffix}")
            for m in models for split in ("val", "train") if split in stats[m.name]]


def matrix_notes(models: Sequence[StudyModel], stats: Mapping[str, Mapping[str, Path]]) -> list[str]:
    """What the val-set matrices look like to an inversion (docs/statistics.md §4): mean diagonal per
    r/c/f over the classes with positives (a class without positives has no row and is not counted),
    cond_2 and sigma_min (CM applies M^-1, so a large condition number amplifies noise), the nearest
    rare row and the mass cm's clipping removes."""
    out = []
    for m in models:
        d = diagnose(ClassStats.load(stats[m.name]["val"]))
        per = ", ".join(f"{b.bucket} {_fmt(b.mean_diagonal, '.2f')} ({b.with_rows}/{b.classes} classes)"
                        for b in d.buckets)
        near = "" if d.rare_l1 is None else f"; a rare row lies {d.rare_l1:.3f} (L1) from another row"
        clip = "" if d.clipped_fraction is None else (
            f"; cm's clipping removes {d.clipped_fraction:.2f} of |p M^-1| over the val positives")
        out.append(
            f"**{m.name}**'s val-set matrix: mean diagonal {per} over the classes with positives, "
            f"cond_2(M) {_fmt(d.cond2, '.2g')} (smallest singular value {_fmt(d.sigma_min, '.2g')}){near}"
            f"{clip}. CM applies M^-1: rows whose mass sits on a sibling class rather than the diagonal make "
            "the inverse large, and clipping its negative outputs removes score from the classes they are "
            "confused with."
        )
    return out


def _fmt(x: float, spec: str) -> str:
    return "-" if math.isnan(x) else "inf" if math.isinf(x) else format(x, spec)


def write_report(
    models: Sequence[StudyModel],
    stats: Mapping[str, Mapping[str, Path]],
    rows: list[dict[str, Any]],
    inp: StudyInputs,
    log: StepLog,
    *,
    title: str,
    preamble: str,
    notes: Sequence[str] = (),
    sections: Sequence[tuple[str, str]] = (),
    boot: Mapping[int, Sequence[Path]] | None = None,
    seed_stats: Mapping[int, Mapping[str, Mapping[str, Path]]] | None = None,
    demo: bool = False,
) -> Path:
    """Figures (Figure 1 block, overview, diagonal, train-vs-val difference; `stats`: the first seed's),
    pairs CSV, tables of the per-seed `rows`, the paired effects from the bootstrap files (`boot`:
    seed -> files), README; `seed_stats` (seed -> stats) adds every seed's statistics to the regime
    table; `sections` (heading, markdown) go before the wall times."""
    rep = inp.report
    rep.mkdir(parents=True, exist_ok=True)
    first = models[0].name
    val = ClassStats.load(stats[first]["val"])
    train = ClassStats.load(stats[first]["train"])
    space = val.categories
    if space is None:
        raise PcbkitError(f"{stats[first]['val']}: statistics carry no category space")
    cm_val = val.confusion(warn=False).numpy()
    empty = val.empty_classes().numpy()
    views = {"block": "figure1_block.png", "overview": "overview.png", "diagonal": "diagonal.png",
             "difference": "train_vs_val.png"}
    if not any(space.image_count):
        del views["diagonal"]
    captions = {
        "block": f"Figure 1 analogue: 10-class block of the {first} model's val confusion matrix (log2)",
        "overview": f"Whole-matrix overview ({first}, val)",
        "diagonal": f"Mean score (diagonal) against training images ({first}, val)",
        "difference": f"Train-set minus val-set matrix ({first})",
    }
    cm_train = train.confusion(warn=False).numpy()
    pairs = plots.render_views(
        {v: rep / f for v, f in views.items()}, plots.Matrix(cm_val, empty), space,
        mean_score=val.mean_score(warn=False).numpy(),
        difference=(plots.Matrix(cm_train, label="train"), plots.Matrix(cm_val, label="val")),
        pairs_csv=rep / "top_confused_pairs.csv", n_pairs=50, dpi=REPORT_DPI,
        titles={"block": f"Figure 1 analogue: {first}, val, most-confused 10-class block (log2)",
                "overview": f"{first}: whole val confusion matrix"},
        subtitles=_regime_subtitles(stats[first]),
    ).pairs
    assert pairs is not None  # pairs_csv was given
    figs = {captions[v]: f for v, f in views.items()}
    show = pairs.head(10)
    pairs_md = "\n".join(
        ["| true class | predicted as | M[i,j] | M[j,i] | asymmetry |", "|---|---|---|---|---|"]
        + [f"| {r.name_i} ({r.frequency_i}) | {r.name_j} ({r.frequency_j}) | {r.M_ij:.3f} | {r.M_ji:.3f} | "
           f"{r.asymmetry:+.3f} |" for r in show.itertuples()]
    ) + "\n\nAll 50 in `top_confused_pairs.csv`."
    notes = [*matrix_notes(models, stats), *notes]
    names = [m.name for m in models]
    effects = None
    if boot:
        loaded = {seed: {k: v for f in files for k, v in load_bootstrap(f).items()}
                  for seed, files in boot.items()}
        effects = paired_effects(rows, loaded, comparisons(aggregate_seeds(rows), names))
    seeds = sorted({int(r.get("seed", 0)) for r in rows})
    if seed_stats is None or len(seed_stats) < 2:
        diagnostics = regime_diagnostics(models, stats)
    else:
        diagnostics = [d for s, st in seed_stats.items()
                       for d in regime_diagnostics(models, st, f" (seed {s})")]
    write_text_atomic(rep / "results.csv", rows_to_csv(rows))
    write_json_atomic(rep / "results.json", rows, indent=2)
    return write_study_report(
        rep, rows, names, title=title, preamble=preamble, figures=figs,
        pairs_markdown=pairs_md, notes=notes, effects=effects,
        intervals=seeds_section(len(seeds), inp.bootstrap, demo=demo),
        extra_sections=[
            *([("Knob sweeps: figures", sweeps)] if (sweeps := sweep_figures(rows, names, rep)) else []),
            ("Regime diagnostics of the statistics", regime_section(diagnostics)),
            *sections,
            ("Wall time per step", log.markdown()),
        ],
    )


def sweep_figures(rows: Sequence[Mapping[str, Any]], models: Sequence[str], rep: Path) -> str:
    """One figure per model and knob of the sweep rows (seed means), as markdown; "" without sweeps."""
    agg = aggregate_seeds(rows)
    parts = []
    for model in models:
        ends, grid = sweep_rows(agg, model)
        mine = [{"stat": r["stat"], "family": r.get("family", r["stat"]), "knob": r.get("knob"),
                 "value": r.get("value"), "metrics": {"segm": {m: r.get(m) for m in ("AP", "APr", "APf")}}}
                for r in [*ends, *grid]]
        for knob in dict.fromkeys(str(r["knob"]) for r in mine if r["knob"]):
            name = f"sweep_{model}_{knob}.png"
            plots.plot_sweep(mine, knob, rep / name, dpi=REPORT_DPI,
                             title=f"{model}: {knob} sweep, val statistics in sample (mean over seeds)")
            parts += [f"![{model}: {knob} sweep]({name})", ""]
    return "\n".join(parts)


def _regime_subtitles(stats: Mapping[str, Path]) -> dict[str, str]:
    """The figures' second title line: the val statistics' regime; both files' under the difference."""
    val, train = (regime_text(regime_fields(diagnose(ClassStats.load(stats[s]))), sigma=False)
                  for s in ("val", "train"))
    return {"block": val, "overview": val, "diagonal": val, "difference": f"train: {train}\nval: {val}"}
