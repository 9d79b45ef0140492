"""The evaluated calibration table: one entry per row, where its statistics came from, and its text.

A row entry: {"stat", "family", "param", "knob", "value", "protocol", "results", "detections",
"fixed_results", "fixed_detections", "metrics": {"segm" | "bbox" [+ "_fixed" | "@N"]: {"AP", "APr", ...}}},
metrics as fractions in [0, 1] (NaN / -1 when undefined; None in JSON). family: the estimator
(`cm-diagshrink`, ..., `norcal`, `logit-adj`); knob/value: the swept parameter and its value (None for
a parameter-free row; value = param); protocol: in-sample | train | other-split | cross-fitted.
In-model reports carry mask and box AP, offline ones box AP only. `format_report_table` prints AP in
percent, `table_csv` keeps the fractions. `metrics.json` is `CalibrationReport.to_dict()`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pcb_analysis.lvis_eval import nan_to_none

# table columns: (header, evaluation key, metric)
MODEL_COLUMNS = (
    ("AP", "segm", "AP"),
    ("APr", "segm", "APr"),
    ("APc", "segm", "APc"),
    ("APf", "segm", "APf"),
    ("APb", "bbox", "AP"),
    ("AP-fixed", "segm_fixed", "AP"),
    ("APb-fixed", "bbox_fixed", "AP"),
)
DUMP_COLUMNS = (
    ("APb", "bbox", "AP"),
    ("APb-r", "bbox", "APr"),
    ("APb-c", "bbox", "APc"),
    ("APb-f", "bbox", "APf"),
    ("APb-fixed", "bbox_fixed", "AP"),
)


@dataclass
class CalibrationReport:
    """The evaluated table: one entry per row, plus where everything came from."""

    mode: str  # "model" | "dump"
    split: str
    gt: str
    statistics: dict[str, Any]
    images: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            rows.append({**r, "metrics": {k: nan_to_none(v) for k, v in r["metrics"].items()}})
        return {
            "mode": self.mode,
            "split": self.split,
            "gt": self.gt,
            "statistics": self.statistics,
            "images": self.images,
            "rows": rows,
            "provenance": self.provenance,
            "seconds": self.seconds,
        }


def _columns(report: CalibrationReport) -> tuple[tuple[str, str, str], ...]:
    """The mode's columns, plus AP at the extra per-image cap ("segm@12" -> AP@12) when evaluated."""
    cols = MODEL_COLUMNS if report.mode == "model" else DUMP_COLUMNS
    extra = sorted({k for r in report.rows for k in r["metrics"] if "@" in k})
    for key in extra:
        t, cap = key.split("@")
        cols = (*cols, (f"{'AP' if t == 'segm' else 'APb'}@{cap}", key, "AP"))
    return cols


def _value(row: Mapping[str, Any], key: str, metric: str) -> float:
    v = row["metrics"].get(key, {}).get(metric)
    return float("nan") if v is None else float(v)


def format_report_table(report: CalibrationReport) -> str:
    """One line per statistic (AP in percent; '-' where undefined)."""
    cols = _columns(report)
    width = max([len("stat"), *(len(r["stat"]) for r in report.rows)]) + 2
    lines = [
        f"split {report.split!r}, {report.images} image(s); statistics: {report.statistics.get('label')} "
        f"[{report.statistics.get('file')}]",
        f"{'stat':<{width}}" + "".join(f"{h:>10}" for h, _, _ in cols) + f"{'dets':>10}",
    ]
    for r in report.rows:
        cells = []
        for _, key, metric in cols:
            v = _value(r, key, metric)
            cells.append(f"{'-':>10}" if math.isnan(v) or v < 0 else f"{100 * v:10.2f}")
        lines.append(f"{r['stat']:<{width}}" + "".join(cells) + f"{r['detections']:>10}")
    return "\n".join(lines)


def table_csv(report: CalibrationReport) -> str:
    """The table as CSV (fractions, not percent; empty where undefined)."""
    cols = _columns(report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["stat", *(h for h, _, _ in cols), "detections", "results", "statistics", "family", "knob",
                "value", "protocol"])
    for r in report.rows:
        vals = []
        for _, key, metric in cols:
            v = _value(r, key, metric)
            vals.append("" if math.isnan(v) or v < 0 else repr(v))
        value = r.get("value")
        w.writerow([r["stat"], *vals, r["detections"], r["results"], report.statistics.get("relation"),
                    r.get("family"), r.get("knob") or "", "" if value is None else repr(float(value)),
                    r.get("protocol") or ""])
    return buf.getvalue()
