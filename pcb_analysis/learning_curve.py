"""Learning curves: val AP per evaluation of a training run, read from its `metrics.jsonl`.

`read_curve(metrics_path)` -> the run's `"type": "eval"` records as `CurvePoint`s (0-based iteration
of the last step before the evaluation, AP / APr / APc / APf / APb in [0, 1], None where absent),
sorted by iteration; a later record for the same iteration (a resumed run) replaces the earlier one.
`curve_markdown(curves, max_iter)` -> a table with one row per model and one column per evaluation
(mask AP, and APr / APf in parentheses), the last column optionally the final evaluation.
`plot_curves(curves, path)` -> a PNG of AP, APr and APf against the iteration (matplotlib, lazily).
A missing file gives an empty curve; a malformed line raises `PcbkitError` naming the file and line.
`demo_section` adds each model's final evaluation (the study's `none` row) and returns the report
section; the demo report shows it to tell whether training reached its plateau (docs/synth.md §7).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcb_analysis.errors import PcbkitError
from pcb_analysis.plots.heatmap import new_figure, save_figure

METRICS = ("AP", "APr", "APc", "APf", "APb")


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation: the iteration it followed (0-based) and its metrics in [0, 1] (None: absent)."""

    iteration: int
    metrics: Mapping[str, float | None]


def read_curve(metrics_path: str | Path) -> list[CurvePoint]:
    """The eval records of a run's metrics.jsonl, by iteration (empty when the file does not exist)."""
    path = Path(metrics_path)
    if not path.is_file():
        return []
    by_iter: dict[int, CurvePoint] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PcbkitError(f"{path}: line {n} is not JSON ({err.msg})") from err
        if not isinstance(record, dict) or record.get("type") != "eval":
            continue
        it = record.get("iteration")
        if not isinstance(it, int) or isinstance(it, bool):
            raise PcbkitError(f"{path}: line {n}: eval record without an integer 'iteration'")
        values = {k: (None if record.get(k) is None else float(record[k])) for k in METRICS}
        by_iter[it] = CurvePoint(it, values)
    return [by_iter[i] for i in sorted(by_iter)]


def _cell(p: CurvePoint) -> str:
    def pct(k: str) -> str:
        v = p.metrics.get(k)
        return "-" if v is None else f"{100 * v:.1f}"

    return f"{pct('AP')} ({pct('APr')} / {pct('APf')})"


def curve_markdown(curves: Mapping[str, Sequence[CurvePoint]], max_iter: int | None = None) -> str:
    """One row per model, one column per evaluation: 'AP (APr / APf)' in %. Columns are the union
    of the iterations evaluated; headed 'it N' (and 'N/max' of the run when `max_iter` is given)."""
    iters = sorted({p.iteration for pts in curves.values() for p in pts})
    if not iters:
        return "No evaluation during training (`eval_period` 0 or longer than the run)."

    def head(i: int) -> str:
        return f"it {i + 1}" + (f" ({(i + 1) / max_iter:.2f} of the run)" if max_iter else "")

    lines = ["| model | " + " | ".join(head(i) for i in iters) + " |", "|---|" + "---|" * len(iters)]
    for name, pts in curves.items():
        at = {p.iteration: p for p in pts}
        lines.append(f"| {name} | " + " | ".join(_cell(at[i]) if i in at else "" for i in iters) + " |")
    return "\n".join(lines)


def plot_curves(curves: Mapping[str, Sequence[CurvePoint]], path: str | Path, dpi: int = 120) -> Path:
    """AP (solid), APr (dashed) and APf (dotted) in % against the iteration, one colour per model."""
    fig = new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"AP": "-", "APr": "--", "APf": ":"}
    for c, (name, pts) in enumerate(curves.items()):
        xs = [p.iteration + 1 for p in pts]
        for key, style in styles.items():
            ys = [100 * v if (v := p.metrics.get(key)) is not None else float("nan") for p in pts]
            ax.plot(xs, ys, style, marker="o", color=f"C{c}", label=f"{name} {key}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mask AP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, Path(path), dpi)


def demo_section(
    run_dirs: Mapping[str, Path],
    rows: Sequence[Mapping[str, object]],
    max_iter: int,
    figure: Path,
    dpi: int = 120,
) -> str:
    """The report's learning-curve section: each run's mid-run evaluations plus its final model's
    plain evaluation (the row with `stat` 'none' of that model, at iteration max_iter - 1); writes
    `figure` when there is something to draw and links it by its file name."""
    curves: dict[str, list[CurvePoint]] = {}
    for name, run_dir in run_dirs.items():
        pts = [p for p in read_curve(Path(run_dir) / "metrics.jsonl") if p.iteration < max_iter - 1]
        final = [r for r in rows if r.get("model") == name and r.get("stat") == "none"]
        if final:
            metrics = {k: (None if final[0].get(k) is None else float(final[0][k])) for k in METRICS}  # type: ignore[arg-type]
            pts.append(CurvePoint(max_iter - 1, metrics))
        curves[name] = pts
    text = curve_markdown(curves, max_iter) + (
        "\n\nVal mask AP (APr / APf) in %, after each evaluation during training and for the final model "
        "(the `none` row above). A curve that is flat over its last third has converged at this learning "
        "rate schedule."
    )
    if any(len(p) > 1 for p in curves.values()):
        plot_curves(curves, figure, dpi)
        text += f"\n\n![learning curves]({Path(figure).name})"
    return text
