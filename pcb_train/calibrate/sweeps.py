"""Knob sweeps of the parameterised estimators: `--grid KNOB=v1,v2,...` -> one table row per value.

A knob is the user-facing name of one estimator parameter (docs/calibration.md §7):

    lambda  cm-diagshrink's lam, in [0, 1]     (1 = ms, 0 = cm)
    tau     cm-tikhonov's tau, >= 0            (0 = cm, -> inf: ms)
    k       ibu's iteration count, int >= 0    (start fixed by --ibu-start; k = 0 from "ms" = ms)
    eta     ms-eq's step exponent, >= 0        (iterations fixed by --ms-eq-iterations)
    a       the row prior of every selected matrix statistic, >= 0 (0 = the statistic itself)

Every value becomes a `KnobRow` named `stat(knob=value)` with a file-safe slug `stat-knob<value>`; the
rows share the calibration's one inference pass like every other row. `parse_grids` turns the option
strings into validated `Grid`s (one-line `PcbkitError`s naming the option); `grid_rows` lists the rows
of the selected statistics. No estimator math lives here: the values go to `Calibrator.build`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pcb_analysis.calibration import MATRIX_STATISTICS, STATISTICS
from pcb_analysis.errors import PcbkitError

IBU_STARTS = ("ms", "uniform")
DEFAULT_IBU_START = "ms"
"""ibu's start in a k sweep: from `ms`, so that k = 0 is the `ms` row and the sweep leaves a Table-1 point."""
DEFAULT_MS_EQ_ITERATIONS = 10
"""ms-eq's iterations in an eta sweep (eta = 1 with ONE iteration equals `ms`)."""


@dataclass(frozen=True)
class Knob:
    """One sweepable parameter: the estimator it belongs to, its keyword in `Calibrator.build`, its domain."""

    stat: str  # "*" for the row prior (any matrix statistic)
    keyword: str
    low: float
    high: float = math.inf
    integer: bool = False


KNOBS: dict[str, Knob] = {
    "lambda": Knob("cm-diagshrink", "lam", 0.0, 1.0),
    "tau": Knob("cm-tikhonov", "tau", 0.0),
    "k": Knob("ibu", "k", 0.0, integer=True),
    "eta": Knob("ms-eq", "eta", 0.0),
    "a": Knob("*", "row_prior", 0.0),
}
"""Knob name -> `Knob`. The knob names of `--grid`."""
SWEEP_STATISTICS: tuple[str, ...] = tuple(k.stat for k in KNOBS.values() if k.stat != "*")
"""The parameterised statistics `--stat` accepts (each needs its knob's --grid)."""


@dataclass(frozen=True)
class Grid:
    """A validated `--grid`: knob name and its values (in the given order, duplicates dropped)."""

    knob: str
    values: tuple[float, ...]


@dataclass(frozen=True)
class KnobRow:
    """One grid point: statistic, knob, value, the keyword arguments for `Calibrator.build`."""

    stat: str
    knob: str
    value: float
    build: tuple[tuple[str, Any], ...]  # sorted (keyword, value) pairs

    @property
    def name(self) -> str:
        return f"{self.stat}({self.knob}={value_text(self.value)})"

    @property
    def slug(self) -> str:
        return f"{self.stat}-{self.knob}{value_text(self.value)}"


def value_text(x: float) -> str:
    """0.5 -> '0.5', 1.0 -> '1', 1e-05 -> '1e-05' (names and file names: never '/', '(' or '=')."""
    return f"{x:g}"


def parse_values(text: str | None, option: str, *, low: float = 0.0, high: float = math.inf,
                 integer: bool = False) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0); None -> (). Empty parts are skipped, but a list with no value at
    all (',,' or '') is an error, as are non-numbers, non-finite values, values outside [low, high]
    and (integer) fractional ones."""
    if text is None:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise PcbkitError(f"{option}: {part!r} is not a number (expected e.g. 0,0.5,1)") from None
        if not math.isfinite(v) or not low <= v <= high:
            bound = f"in [{value_text(low)}, {value_text(high)}]" if math.isfinite(high) else f">= {low:g}"
            raise PcbkitError(f"{option}: values must be finite and {bound} (got {part})")
        if integer and v != int(v):
            raise PcbkitError(f"{option}: values must be integers (got {part})")
        out.append(v)
    if not out:
        raise PcbkitError(f"{option}: no value given (expected a comma list, e.g. 0,0.5,1)")
    return tuple(dict.fromkeys(out))


def parse_grids(texts: Sequence[str]) -> tuple[Grid, ...]:
    """`--grid` option strings ('lambda=0,0.5,1', ...) -> validated `Grid`s (a knob at most once)."""
    grids: dict[str, Grid] = {}
    for text in texts:
        knob, sep, values = text.partition("=")
        knob = knob.strip()
        if not sep or not knob:
            raise PcbkitError(f"--grid: expected KNOB=v1,v2,... (e.g. lambda=0,0.5,1), got {text!r}")
        if knob not in KNOBS:
            raise PcbkitError(f"--grid: unknown knob {knob!r}; choose from {', '.join(KNOBS)}")
        if knob in grids:
            raise PcbkitError(f"--grid: knob {knob!r} given twice (put all its values in one list)")
        spec = KNOBS[knob]
        grids[knob] = Grid(knob, parse_values(values, f"--grid {knob}", low=spec.low, high=spec.high,
                                              integer=spec.integer))
    return tuple(grids.values())


def check_sweep(stat_names: Sequence[str], grids: Sequence[Grid], ibu_start: str = DEFAULT_IBU_START,
                ms_eq_iterations: int = DEFAULT_MS_EQ_ITERATIONS) -> None:
    """Every grid's knob belongs to a selected statistic, every selected parameterised statistic has
    its grid, and the fixed parameters are valid (ibu k = 0 from a uniform start is refused: it
    would replace every proposal's scores by the uniform distribution)."""
    knobs = {g.knob: g for g in grids}
    for g in grids:
        spec = KNOBS[g.knob]
        if spec.stat == "*":
            if not any(s in MATRIX_STATISTICS for s in stat_names):
                raise PcbkitError(f"--grid a: the row prior needs a matrix statistic among --stat "
                                  f"({', '.join(s for s in MATRIX_STATISTICS if STATISTICS[s].row)})")
        elif spec.stat not in stat_names:
            raise PcbkitError(
                f"--grid {g.knob}: its estimator {spec.stat!r} is not selected (add --stat {spec.stat})"
            )
    for s in stat_names:
        mine = [k for k, spec in KNOBS.items() if spec.stat == s]
        if mine and not any(k in knobs for k in mine):
            raise PcbkitError(f"--stat {s}: give its values with --grid {mine[0]}=v1,v2,...")
    if ibu_start not in IBU_STARTS:
        raise PcbkitError(f"--ibu-start must be one of {', '.join(IBU_STARTS)} (got {ibu_start!r})")
    if "k" in knobs and ibu_start == "uniform" and 0.0 in knobs["k"].values:
        raise PcbkitError("--grid k: k = 0 from --ibu-start uniform would discard the scores (uniform "
                          "output); start from ms or use k >= 1")
    if isinstance(ms_eq_iterations, bool) or not isinstance(ms_eq_iterations, int) or ms_eq_iterations < 1:
        raise PcbkitError(f"--ms-eq-iterations must be an integer >= 1 (got {ms_eq_iterations!r})")


def grid_rows(stat_names: Sequence[str], grids: Sequence[Grid], ibu_start: str = DEFAULT_IBU_START,
              ms_eq_iterations: int = DEFAULT_MS_EQ_ITERATIONS) -> list[KnobRow]:
    """The grid points, knob by knob in `grids` order: a knob of an estimator gives that estimator's
    rows; the row prior `a` gives a row per selected parameter-free matrix statistic and value."""
    check_sweep(stat_names, grids, ibu_start, ms_eq_iterations)
    rows: list[KnobRow] = []
    for g in grids:
        spec = KNOBS[g.knob]
        if spec.stat == "*":
            for s in dict.fromkeys(stat_names):
                if s in MATRIX_STATISTICS and STATISTICS[s].row:
                    rows += [KnobRow(s, g.knob, v, (("row_prior", v),)) for v in g.values]
            continue
        fixed: dict[str, Any] = {}
        if spec.stat == "ibu":
            fixed["start"] = ibu_start
        if spec.stat == "ms-eq":
            fixed["iterations"] = ms_eq_iterations
        for v in g.values:
            value: Any = int(v) if spec.integer else v
            rows.append(KnobRow(spec.stat, g.knob, v, tuple(sorted({**fixed, spec.keyword: value}.items()))))
    return rows
