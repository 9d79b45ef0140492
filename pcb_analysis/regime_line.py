"""The regime of a statistics file in one line: beside each result of the study report and in the
titles of `pcbkit plot-confusion`'s figures.

`regime_fields(diagnostics)` -> the flat numbers a study row carries (`cond2`, `sigma_min`, mean
diagonal `diag_r` / `diag_c` / `diag_f` over the bucket's classes with positives, `clipped`: the
share of |p M^-1| cm's clipping removes; None where not measured), `regime_text(fields)` the compact
text, e.g. "cond 1.9e3 · σmin 5.7e-4 · diag r/c/f 0.04/0.07/0.14 · clip 47%" (parts that were not
measured are left out). `stats_regime_text(path)` reads a statistics file. Definitions:
docs/statistics.md §4 (`pcb_analysis.regime.diagnose`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pcb_analysis.categories import CategorySpace
from pcb_analysis.regime import RegimeDiagnostics, diagnose
from pcb_analysis.stats import ClassStats


def regime_fields(d: RegimeDiagnostics) -> dict[str, float | None]:
    """The row fields of `d` (see the module doc)."""
    def diag(bucket: str) -> float | None:
        b = d.bucket(bucket)
        return None if b is None or math.isnan(b.mean_diagonal) else b.mean_diagonal

    return {"cond2": d.cond2, "sigma_min": d.sigma_min, "diag_r": diag("r"), "diag_c": diag("c"),
            "diag_f": diag("f"), "clipped": d.clipped_fraction}


def sci(x: float | None) -> str:
    """Compact number: 3 significant digits in [0.01, 1000), else mantissa e exponent ('1.9e3')."""
    if x is None or math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0 or 0.01 <= abs(x) < 1000:
        return f"{x:.3g}"
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def regime_text(fields: Mapping[str, Any], sigma: bool = True) -> str:
    """The compact line of a row's regime fields ('' when it has none, e.g. the `none` row)."""
    parts = []
    if fields.get("cond2") is not None:
        parts.append(f"cond {sci(fields['cond2'])}")
    if sigma and fields.get("sigma_min") is not None:
        parts.append(f"σmin {sci(fields['sigma_min'])}")
    diags = [fields.get(f"diag_{b}") for b in ("r", "c", "f")]
    if any(v is not None for v in diags):
        parts.append("diag r/c/f " + "/".join("-" if v is None else f"{v:.2f}" for v in diags))
    if fields.get("clipped") is not None:
        parts.append(f"clip {100 * fields['clipped']:.0f}%")
    return " · ".join(parts)


def stats_regime_text(path: str | Path, categories: CategorySpace | None = None, sigma: bool = True) -> str:
    """`regime_text` of a statistics file; `categories` labels a file that carries no category space
    (without either only the whole-matrix parts: no r/c/f buckets)."""
    st = ClassStats.load(path)
    if st.categories is None and categories is not None:
        st = replace(st, categories=categories)
    if st.categories is None:
        return regime_text(_matrix_only(st), sigma)
    return regime_text(regime_fields(diagnose(st)), sigma)


def _matrix_only(st: ClassStats) -> dict[str, float | None]:
    sv = torch.linalg.svdvals(st.confusion(warn=False).to(torch.float64))
    s_min, s_max = float(sv.min()), float(sv.max())
    return {"cond2": s_max / s_min if s_min > 0 else math.inf, "sigma_min": s_min}
