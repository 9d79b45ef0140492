"""Confusion-matrix figures: PCB paper Figure 1 and views that stay readable at LVIS scale (K = 1,203).

`cm` is the confusion matrix M, numpy float [K, K]: row i = ground-truth class, column j = predicted
class, M[i, j] = mean foreground probability of class j over the positives of class i (docs/method.md
§2), rows sum to 1; `empty` is an optional bool [K] mask of classes without positives (grey rows,
skipped by the selections). Every function takes plain arrays plus a `CategorySpace`.
- selection.py: which classes to show (`select_block`, `select_head_tail`, `frequency_order`, ...).
- views.py: one figure each (`plot_block`, `plot_zoom`, `plot_overview`, `plot_difference`,
  `plot_diagonal`); heatmap.py: their drawing blocks (the only place matplotlib is imported, lazily).
- pairs.py: `top_confused_pairs` / `write_top_pairs_csv`; render.py: `render_views` draws a set of views.
- sweep.py: `sweep_series` / `plot_sweep`, AP against a calibration knob (metrics rows of `pcbkit calibrate`).
- from_stats.py (not imported here: it needs torch): matrices read from statistics files.
"""

from pcb_analysis.plots.checks import FORMATS, check_figure_path
from pcb_analysis.plots.heatmap import BUCKET_COLOURS, BUCKET_NAMES, LOG2_FLOOR, MAX_ANNOTATED, MAX_NAMED
from pcb_analysis.plots.pairs import PAIR_COLUMNS, top_confused_pairs, write_top_pairs_csv
from pcb_analysis.plots.render import VIEWS, Matrix, RenderedViews, output_paths, render_views
from pcb_analysis.plots.selection import (
    SELECTIONS,
    Selection,
    asymmetric_mass,
    frequency_order,
    resolve_classes,
    select_block,
    select_head_tail,
)
from pcb_analysis.plots.sweep import SweepSeries, plot_sweep, sweep_series
from pcb_analysis.plots.views import plot_block, plot_diagonal, plot_difference, plot_overview, plot_zoom

__all__ = [
    "BUCKET_COLOURS", "BUCKET_NAMES", "FORMATS", "LOG2_FLOOR", "MAX_ANNOTATED", "MAX_NAMED", "PAIR_COLUMNS",
    "SELECTIONS", "VIEWS", "Matrix", "SweepSeries", "plot_sweep", "sweep_series",
    "RenderedViews", "Selection", "asymmetric_mass", "check_figure_path",
    "frequency_order", "output_paths", "plot_block", "plot_diagonal", "plot_difference", "plot_overview",
    "plot_zoom", "render_views", "resolve_classes", "select_block", "select_head_tail", "top_confused_pairs",
    "write_top_pairs_csv",
]
