"""The rows of a calibration table and the statistics they are built from.

A row is one score transform q [R, K+1] -> q~ [R, K+1] (background last, kept; docs/method.md §3)
with a display name and a file-safe slug:

    none, ms, cm, cm-bayes   the parameter-free statistics of `pcb_analysis.calibration.STATISTICS`
    stat(knob=v)             one grid point of a knob sweep (`sweeps`: cm-diagshrink(lambda=0.5), ...)
    norcal(gamma)            p~[j] ∝ p[j] / n_img[j]^gamma, n_img = training IMAGE counts
    logit-adj(tau)           z[:K] - tau * log(prior), prior = training INSTANCE counts

logit-adj with the image prior would equal norcal(gamma = tau), so the two differ only by their
prior (docs/calibration.md §2). Statistics come from a `ClassStats` file whose category space must
be the ground truth's; `statistics_relation` says whether they are of the evaluated split (the
paper's upper bound, Table 1) or of the training split (Table 4's train-set matrix; §4).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.calibration import DEFAULT_STATISTICS, ROW_STATISTICS, Calibrator
from pcb_analysis.categories import CategorySpace
from pcb_analysis.dumps import MANIFEST_NAME
from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.estimators import MS_EQ_KEY, fit_ms_eq
from pcb_analysis.stats import ClassStats
from pcb_train.backends import ScoreTransform, identity
from pcb_train.calibrate.sweeps import (
    DEFAULT_IBU_START,
    DEFAULT_MS_EQ_ITERATIONS,
    SWEEP_STATISTICS,
    Grid,
    KnobRow,
    grid_rows,
    parse_values,
)
from pcb_train.data import load_lvis_json

STAT_CHOICES: tuple[str, ...] = (*ROW_STATISTICS, *SWEEP_STATISTICS)
"""`--stat` choices: the parameter-free rows of the statistics table, and the estimators swept by --grid."""
DEFAULT_STATS: tuple[str, ...] = DEFAULT_STATISTICS
"""Rows evaluated when neither --stat, --gamma nor --tau is given."""
UPPER_BOUND = "upper bound (same split, Table 1)"
TRAIN_MATRIX = "train-set matrix (Table 4)"


@dataclass(frozen=True)
class StatRow:
    """One statistic of the table: display name, file-safe slug, and its score transform."""

    name: str
    slug: str
    transform: ScoreTransform
    family: str  # the statistic (estimator) name | "norcal" | "logit-adj"
    param: float | None = None  # the knob's value (None: a parameter-free row)
    knob: str | None = None  # "lambda", "tau", "k", "eta", "a" (sweeps), "gamma" (norcal), "tau" (logit-adj)


def _num(x: float) -> str:
    """0.5 -> '0.5', 1.0 -> '1' (names and file names)."""
    return f"{x:g}"


def parse_grid(text: str | None, option: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0); None -> (). Values must be finite and >= 0; a list without any
    value (',,', '') is an error (`sweeps.parse_values`)."""
    return parse_values(text, option)


def select_stats(names: Sequence[str], gammas: Sequence[float], taus: Sequence[float]) -> tuple[str, ...]:
    """The statistics asked for; none at all means the defaults, unless --gamma or --tau gave rows."""
    if names:
        return tuple(names)
    return () if (gammas or taus) else DEFAULT_STATS


def instance_prior(
    categories: Sequence[Mapping[str, Any]], space: CategorySpace, source: str | Path
) -> Tensor:
    """Training instance counts [K] (contiguous order) from an LVIS `categories` list."""
    by_id = {}
    for c in categories:
        try:
            by_id[int(c["id"])] = c.get("instance_count")
        except (KeyError, TypeError, ValueError) as err:
            raise input_error(source, f"field 'categories': malformed entry ({err!r})") from err
    counts = [by_id.get(cid) for cid in space.ids]
    if any(v is None for v in counts):
        raise input_error(
            source,
            "field 'categories[].instance_count' is missing: logit adjustment (--tau) needs training "
            "instance counts (with image counts it equals norcal: use --gamma)",
        )
    try:
        return torch.tensor([float(v) for v in counts], dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise input_error(source, f"field 'categories[].instance_count': not a number ({err})") from err


def tau_prior(gt: str | Path, taus: Sequence[float], categories: CategorySpace) -> Tensor | None:
    """The instance prior of `gt`'s categories when logit-adjustment rows are asked for, else None."""
    if not taus:
        return None
    return instance_prior(load_lvis_json(gt)["categories"], categories, gt)


def _ensure_ms_eq_fit(stats: ClassStats, iterations: int, eta: float) -> None:
    """Fit ms-eq's class weight on the positives of the dump `stats` was read from, unless stored."""
    fits = stats.extra.get(MS_EQ_KEY, [])
    if any(f["iterations"] == iterations and f["eta"] == float(eta) for f in fits):
        return
    if "fold" in stats.extra:
        raise PcbkitError("--grid eta (ms-eq) is not available with fold statistics (its fit reads the "
                          "positives of all the dump's images)")
    source = Path(stats.source) if stats.source else None
    if source is None or not (source / MANIFEST_NAME).is_file():
        raise PcbkitError(
            f"--grid eta (ms-eq) fits a class weight on the statistics' positives, but their dump "
            f"{stats.source or '(none recorded)'} is not readable here"
        )
    fit_ms_eq(source, stats, iterations, float(eta))


def _knob_row(stats: ClassStats, kr: KnobRow, ridge: float, device: torch.device | str) -> StatRow:
    build = dict(kr.build)
    if kr.stat == "ms-eq":
        _ensure_ms_eq_fit(stats, int(build["iterations"]), float(build["eta"]))
    if float(build.get("row_prior", 0.0)) > 0 and stats.instances is None:
        raise PcbkitError("--grid a: the row prior needs ground-truth instance counts in the statistics "
                          "(write them with `pcbkit stats --gt`)")
    cal = Calibrator.build(kr.stat, stats, ridge, **build).to(device)
    return StatRow(kr.name, kr.slug, cal, kr.stat, kr.value, kr.knob)


def build_rows(
    stats: ClassStats,
    stat_names: Sequence[str],
    *,
    ridge: float = 0.0,
    gammas: Sequence[float] = (),
    taus: Sequence[float] = (),
    prior: Tensor | None = None,
    device: torch.device | str = "cpu",
    grids: Sequence[Grid] = (),
    ibu_start: str = DEFAULT_IBU_START,
    ms_eq_iterations: int = DEFAULT_MS_EQ_ITERATIONS,
) -> list[StatRow]:
    """The table's rows, each calibrator prepared once (M^-1 computed once) and moved to `device` once.

    Order: the parameter-free statistics of `stat_names`, the knob sweeps (`grids`, one row per value,
    `sweeps.grid_rows`), norcal(gamma), logit-adj(tau). `none` is the backend's identity transform
    (the model's own scores, bit for bit). norcal rows use the training image counts of
    `stats.categories`; logit-adj rows use `prior` (instances). ms-eq rows fit their class weight on
    the statistics' dump when `stats` has no stored fit (`_ensure_ms_eq_fit`).
    """
    rows: list[StatRow] = []
    k = stats.num_classes
    names = tuple(dict.fromkeys(stat_names))
    for name in names:
        if name not in STAT_CHOICES:
            raise PcbkitError(f"--stat: unknown statistic {name!r}; choose from {', '.join(STAT_CHOICES)}")
    knob_rows = grid_rows(names, grids, ibu_start, ms_eq_iterations)
    for name in names:
        if name in SWEEP_STATISTICS:
            continue  # its rows are the grid's
        if name == "none":
            rows.append(StatRow("none", "none", identity, "none"))
            continue
        cal = Calibrator.build(name, stats, ridge).to(device)
        rows.append(StatRow(name, name, cal, name))
    rows += [_knob_row(stats, kr, ridge, device) for kr in knob_rows]
    if gammas:
        image_counts = stats.categories.image_count if stats.categories is not None else ()
        if not any(image_counts):
            raise PcbkitError(
                "--gamma (norcal) needs training image counts: the statistics' category space has none "
                "(its ground truth's categories carry no 'image_count')"
            )
        freq = torch.tensor(image_counts, dtype=torch.float64)
        for g in gammas:
            cal = Calibrator.build("norcal", None, num_classes=k, freq=freq, gamma=g).to(device)
            rows.append(StatRow(f"norcal({_num(g)})", f"norcal-g{_num(g)}", cal, "norcal", g, "gamma"))
    if taus:
        if prior is None:
            raise PcbkitError("--tau (logit adjustment) needs the training instance counts of the categories")
        for t in taus:
            cal = Calibrator.build("norcal", None, num_classes=k, freq=prior, gamma=t).to(device)
            rows.append(StatRow(f"logit-adj({_num(t)})", f"logit-adj-t{_num(t)}", cal, "logit-adj", t, "tau"))
    if not rows:
        raise PcbkitError("nothing to evaluate: give --stat, --gamma or --tau")
    return rows


def load_statistics(path: str | Path, categories: CategorySpace, gt: str | Path) -> ClassStats:
    """Load a statistics file and refuse one whose category space is not the ground truth's."""
    stats = ClassStats.load(path)
    if stats.categories is None:
        raise input_error(path, f"carries no category space; cannot check it against the ground truth {gt}")
    if stats.categories.hash != categories.hash:
        raise input_error(
            gt,
            f"categories (hash {categories.hash}, K={categories.num_classes}) differ from the statistics' "
            f"category space in {path} (hash {stats.categories.hash}, K={stats.categories.num_classes})",
        )
    return stats


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def statistics_relation(stats: ClassStats, eval_split: str, gt: str | Path) -> dict[str, Any]:
    """Which study the statistics serve: the same split (upper bound) or another (train-set matrix).

    Same split: the split names agree, or the dump the statistics were read from records this very
    ground-truth file."""
    same = stats.split is not None and stats.split == eval_split
    if not same and stats.source:
        manifest = Path(stats.source) / MANIFEST_NAME
        try:
            prov = json.loads(manifest.read_text(encoding="utf-8")).get("provenance", {})
            same = bool(prov.get("gt")) and _same_file(prov["gt"], gt)
        except (OSError, ValueError, AttributeError):
            pass
    split = stats.split if stats.split is not None else "?"
    if same:
        relation, label = "same-split", UPPER_BOUND
    elif "train" in split.lower():
        relation, label = "train-split", f"{TRAIN_MATRIX}, statistics of split {split!r}"
    else:
        relation, label = "other-split", f"statistics of split {split!r}"
    return {"split": stats.split, "source": stats.source, "relation": relation, "label": label}
