"""Knob sweeps: AP / APr / APf of a calibration's grid rows against the knob (issue 12, item 2).

Input: the rows of a calibration's metrics.json (`pcbkit calibrate --grid ...`; each row has "stat",
"family", "knob", "value", "protocol", "metrics": {"segm" | "bbox" ...: {"AP", "APr", ...}}).
`sweep_series` (pure, no matplotlib) picks the rows of one knob, sorts them by value per estimator
family, and reads the parameter-free reference rows (`marks`: none, ms, cm by default) as horizontal
lines; metrics are fractions (None / NaN where undefined). `plot_sweep` draws one panel per metric,
values in percent, references dashed, and writes the figure atomically (`heatmap.save_figure`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcb_analysis.errors import PcbkitError
from pcb_analysis.plots.checks import check_figure_path
from pcb_analysis.plots.heatmap import _matplotlib, save_figure


@dataclass(frozen=True)
class SweepSeries:
    """knob, evaluation key ("segm" / "bbox"), per family the sorted knob values and each metric's values,
    and per reference row (mark) each metric's value."""

    knob: str
    key: str
    lines: dict[str, tuple[tuple[float, ...], dict[str, tuple[float, ...]]]]
    references: dict[str, dict[str, float]]
    metrics: tuple[str, ...]


def _metric(row: Mapping[str, Any], key: str, metric: str) -> float:
    v = (row.get("metrics") or {}).get(key, {}).get(metric)
    return float("nan") if v is None or (isinstance(v, float) and v < 0) else float(v)


def _default_key(rows: Sequence[Mapping[str, Any]]) -> str:
    keys = {k for r in rows for k in (r.get("metrics") or {})}
    if "segm" in keys:
        return "segm"
    if "bbox" in keys:
        return "bbox"
    raise PcbkitError("sweep: the rows carry neither 'segm' nor 'bbox' metrics")


def sweep_series(
    rows: Sequence[Mapping[str, Any]], knob: str, *, metrics: Sequence[str] = ("AP", "APr", "APf"),
    marks: Sequence[str] = ("none", "ms", "cm"), key: str | None = None, protocol: str | None = None,
    family: str | None = None,
) -> SweepSeries:
    """The series of `knob` in metrics rows: per family (e.g. "cm-diagshrink"), values sorted ascending.

    `key` the evaluation ("segm", "bbox", "segm_fixed", ...; default segm when present, else bbox);
    `protocol` keeps only rows of that protocol, `family` only that estimator's grid rows (e.g. "tau"
    is the knob of both cm-tikhonov and logit-adj); marks missing from the rows are left out. No row
    of the knob is an error."""
    if protocol is not None:
        rows = [r for r in rows if r.get("protocol") == protocol]
    key = key or _default_key(rows)
    mine = [r for r in rows if r.get("knob") == knob and r.get("value") is not None
            and (family is None or r.get("family") == family)]
    if not mine:
        where = f" in family {family!r}" if family else ""
        knobs = sorted({str(r.get("knob")) for r in rows if r.get("knob")}) or "none"
        raise PcbkitError(f"sweep: no row of knob {knob!r}{where} (rows of knobs: {knobs})")
    lines: dict[str, tuple[tuple[float, ...], dict[str, tuple[float, ...]]]] = {}
    for family in dict.fromkeys(str(r.get("family")) for r in mine):
        fam = sorted((r for r in mine if str(r.get("family")) == family), key=lambda r: float(r["value"]))
        xs = tuple(float(r["value"]) for r in fam)
        if len(set(xs)) != len(xs):
            raise PcbkitError(f"sweep: {family} has knob {knob} values repeated ({list(xs)}); one protocol "
                              "at a time (protocol=...)")
        lines[family] = (xs, {m: tuple(_metric(r, key, m) for r in fam) for m in metrics})
    references: dict[str, dict[str, float]] = {}
    for mark in marks:
        ref = [r for r in rows if r.get("stat") == mark and r.get("knob") is None]
        if ref:
            references[mark] = {m: _metric(ref[0], key, m) for m in metrics}
    return SweepSeries(knob, key, lines, references, tuple(metrics))


_MARK_STYLES = {"none": "#7f7f7f", "ms": "#2ca02c", "cm": "#d62728"}


def plot_sweep(
    rows: Sequence[Mapping[str, Any]], knob: str, out_path: str | Path, *,
    metrics: Sequence[str] = ("AP", "APr", "APf"), marks: Sequence[str] = ("none", "ms", "cm"),
    key: str | None = None, protocol: str | None = None, family: str | None = None,
    title: str | None = None, dpi: int = 120,
) -> Path:
    """One panel per metric (percent) against `knob`, a line per estimator family, the `marks` rows as
    dashed horizontal lines; a log-scaled x axis when every value is > 0 and they span > 2 decades."""
    out = check_figure_path(out_path)
    s = sweep_series(rows, knob, metrics=metrics, marks=marks, key=key, protocol=protocol, family=family)
    mpl = _matplotlib()
    fig = mpl.figure.Figure(figsize=(3.6 * len(s.metrics), 3.2), constrained_layout=True)
    axes = fig.subplots(1, len(s.metrics), squeeze=False)[0]
    xs_all = [x for xs, _ in s.lines.values() for x in xs]
    log_x = min(xs_all) > 0 and max(xs_all) / min(xs_all) > 100
    for ax, m in zip(axes, s.metrics, strict=True):
        for family, (xs, ys) in s.lines.items():
            ax.plot(xs, [100 * y for y in ys[m]], marker="o", label=family)
        for mark, vals in s.references.items():
            if not math.isnan(vals[m]):
                ax.axhline(100 * vals[m], linestyle="--", linewidth=1, color=_MARK_STYLES.get(mark, "black"),
                           label=mark)
        ax.set_xlabel(knob)
        ax.set_ylabel(f"{m} ({s.key}, %)")
        if log_x:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title or f"sweep of {knob}" + (f" ({protocol})" if protocol else ""))
    return save_figure(fig, out, dpi)
