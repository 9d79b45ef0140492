"""Draw a set of views of one confusion matrix in one call: what `pcbkit plot-confusion` and the study
report share.

`render_views(paths, main, categories, ...)` draws each view named in `paths` (view -> figure path,
drawn in that order; names from `VIEWS`), then the top-pairs CSV when asked. A `Matrix` is one
confusion matrix M [K, K] (numpy, rows = ground truth) with its bool [K] mask of classes without
positives (or None) and a label; the difference view draws `difference[0] - difference[1]`. The block
view shows the given classes, else `select_block` picks them (default size: 10, at most the number of
classes with positives). `output_paths` turns a `--out` path into one path per view.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.plots.checks import FORMATS, as_mask
from pcb_analysis.plots.pairs import top_confused_pairs, write_top_pairs_csv
from pcb_analysis.plots.selection import Selection, resolve_classes, select_block
from pcb_analysis.plots.views import plot_block, plot_diagonal, plot_difference, plot_overview, plot_zoom

logger = logging.getLogger(__name__)

VIEWS = ("block", "overview", "diagonal", "head-tail", "difference")
"""Every view `render_views` draws, in the order `--view all` draws them."""


@dataclass(frozen=True)
class Matrix:
    """One confusion matrix to draw: M [K, K], its empty-class mask [K] (None: no row greyed), a label."""

    cm: np.ndarray
    empty: np.ndarray | None = None
    label: str = ""


@dataclass(frozen=True)
class RenderedViews:
    """What `render_views` did: the files written (figures, then the CSV), the block's classes
    (contiguous indices, [] without a block view) and the top-pairs table (None unless asked)."""

    written: list[Path]
    block: list[int]
    pairs: pd.DataFrame | None


def output_paths(views: Sequence[str], stats_path: Path, out: Path | None) -> dict[str, Path]:
    """One figure path per view: `out` itself for one view, `<out stem>-<view><ext>` for several;
    without `out`, `<stats stem>-<view>.png` next to the statistics file."""
    if out is None:
        return {v: stats_path.with_name(f"{stats_path.stem}-{v}.png") for v in views}
    if out.suffix.lower() not in FORMATS:
        raise input_error(out, f"figure extension must be .png or .pdf, got {out.suffix or '(none)'!r}")
    if len(views) == 1:
        return {views[0]: out}
    return {v: out.with_name(f"{out.stem}-{v}{out.suffix}") for v in views}


def render_views(
    paths: Mapping[str, Path],
    main: Matrix,
    categories: CategorySpace,
    *,
    block: Sequence[int | str] | None = None,
    select: Selection = "most-confused",
    block_size: int | None = None,
    seed: int = 0,
    log2: bool = True,
    mean_score: np.ndarray | None = None,
    difference: tuple[Matrix, Matrix] | None = None,
    pairs_csv: Path | None = None,
    n_pairs: int = 50,
    titles: Mapping[str, str] | None = None,
    subtitles: Mapping[str, str] | None = None,
    dpi: int = 200,
    source: str | Path = "confusion matrix",
) -> RenderedViews:
    """Draw the views of `paths` for the matrix `main` (and write the top-pairs CSV when `pairs_csv`).

    - block: the classes `block` (indices, names or `id:N`), else `select_block(select, block_size,
      seed)`; log2 scale when `log2`. Also head-tail (`plot_zoom`) follows `log2`.
    - diagonal: `mean_score` [K] (default: the diagonal of `main.cm`) against training image counts.
      Without image counts in `categories` it is an error (prefixed with `source`) when it is the
      only view, else it is skipped with a warning.
    - difference: needs `difference` = (a, b); draws a - b labelled with their labels.
    `titles` overrides a view's default title; `subtitles` adds a second title line to a view (e.g.
    the statistics' regime, `pcb_analysis.regime_line`); `dpi` applies to every figure.
    """
    unknown = [v for v in paths if v not in VIEWS]
    if unknown:
        raise PcbkitError(f"unknown view(s) {', '.join(unknown)}: expected {', '.join(VIEWS)}")
    if "difference" in paths and difference is None:
        raise PcbkitError("the difference view needs a second matrix")
    cm = main.cm
    empty = as_mask(main.empty, categories.num_classes)
    titles = titles or {}
    paths = dict(paths)

    classes: list[int] = []
    if "block" in paths:
        if block is not None:
            classes = resolve_classes(categories, list(block))
        else:
            # by default the block holds only classes with positives (empty rows are placeholders)
            n_defined = int((~empty).sum())
            size = block_size if block_size is not None else min(10, n_defined or categories.num_classes)
            classes = select_block(cm, categories, size, select, seed=seed, empty=empty)
    if "diagonal" in paths and not any(categories.image_count):
        msg = "no training image counts in the category space; pass --categories LVIS_JSON"
        if len(paths) == 1:
            raise PcbkitError(f"{source}: {msg}")
        logger.warning("skipping the diagonal view: %s", msg)
        del paths["diagonal"]

    written: list[Path] = []
    for view, path in paths.items():
        title = titles.get(view)
        sub = (subtitles or {}).get(view)
        if view == "block":
            written.append(
                plot_block(cm, categories, classes, path, log2=log2, title=title, subtitle=sub, empty=empty,
                           dpi=dpi)
            )
        elif view == "overview":
            written.append(plot_overview(cm, categories, path, title=title, subtitle=sub, empty=empty,
                                         dpi=dpi))
        elif view == "diagonal":
            ms = np.diagonal(cm) if mean_score is None else mean_score
            written.append(plot_diagonal(ms, categories, path, title=title, subtitle=sub, empty=empty,
                                         dpi=dpi))
        elif view == "head-tail":
            written.append(plot_zoom(cm, categories, path, log2=log2, title=title, subtitle=sub, empty=empty,
                                     dpi=dpi))
        elif view == "difference":
            assert difference is not None
            a, b = difference
            written.append(
                plot_difference(
                    a.cm,
                    b.cm,
                    categories,
                    path,
                    labels=(a.label, b.label),
                    title=title,
                    subtitle=sub,
                    empty_a=a.empty,
                    empty_b=b.empty,
                    dpi=dpi,
                )
            )
    table = None
    if pairs_csv is not None:
        table = top_confused_pairs(cm, categories, n_pairs, empty=empty)
        written.append(write_top_pairs_csv(table, pairs_csv))
    return RenderedViews(written=written, block=classes, pairs=table)
