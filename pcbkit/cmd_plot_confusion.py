"""`pcbkit plot-confusion`: Figure 1 of the PCB paper and whole-matrix views from a statistics file.

Thin command: parse and validate the options, then `pcb_analysis.plots.render_views` draws and
this prints what was written. Only click is imported at module level (numpy, torch and matplotlib
load inside the command) so `pcbkit --help` stays instant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.paths import check_output_path

logger = logging.getLogger(__name__)

# Literal copies of pcb_analysis.plots.SELECTIONS / VIEWS (importing plots here would pull in numpy at
# `pcbkit --help` time); a test pins them to the library's tuples.
SELECTIONS = ("random", "most-confused", "frequent", "rare")
ALL_VIEWS = ("block", "overview", "diagonal", "head-tail", "difference")
VIEWS = (*ALL_VIEWS, "all")


@click.command("plot-confusion")
@click.option(
    "--stats",
    "stats_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Statistics file written by `pcbkit stats` (.npz).",
)
@click.option(
    "--classes",
    "n_classes",
    type=int,
    default=None,
    help="Number of classes in the block view  [default: 10, or K when K < 10].",
)
@click.option(
    "--select",
    "how",
    type=click.Choice(SELECTIONS),
    default=None,
    help="How to pick the block: most-confused (largest asymmetric off-diagonal mass; the default), "
    "random (the default when --seed is given), frequent or rare.",
)
@click.option("--seed", type=int, default=None, help="Seed of the random block (implies --select random).")
@click.option(
    "--class-names",
    default=None,
    help="Comma-separated class names (or id:N for LVIS category id N) for the block; overrides --select.",
)
@click.option(
    "--log2/--no-log2",
    default=True,
    show_default=True,
    help="log2 colour scale for the block and head-tail views (overview and difference are always log).",
)
@click.option(
    "--view",
    type=click.Choice(VIEWS),
    default="block",
    show_default=True,
    help="block (Figure 1), overview (whole matrix), diagonal (mean score vs training images), "
    "head-tail (rare rows vs frequent columns), difference (needs --compare), or all.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Figure path (.png or .pdf); with several views, <stem>-<view><ext>. "
    "Default: <stats stem>-<view>.png next to the statistics file.",
)
@click.option(
    "--compare",
    "compare_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Second statistics file (e.g. train vs val) for the difference view.",
)
@click.option(
    "--pairs-csv",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the top confused pairs (i -> j) as CSV.",
)
@click.option("--pairs", "n_pairs", type=int, default=50, show_default=True, help="Rows of --pairs-csv.")
@click.option(
    "--categories",
    "categories_json",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="LVIS annotation file whose categories (names, r/c/f, training image_count) label the classes; "
    "needed when the statistics file carries no category space.",
)
def plot_confusion_cmd(
    stats_path: Path,
    n_classes: int | None,
    how: str | None,
    seed: int | None,
    class_names: str | None,
    log2: bool,
    view: str,
    out: Path | None,
    compare_path: Path | None,
    pairs_csv: Path | None,
    n_pairs: int,
    categories_json: Path | None,
) -> None:
    """Plot the confusion matrix of a statistics file (PCB Figure 1 and views readable at K = 1,203)."""
    # --- validation that needs no heavy import ----------------------------------------------
    if not stats_path.is_file():
        raise input_error(stats_path, "statistics file not found")
    if compare_path is not None and not compare_path.is_file():
        raise input_error(compare_path, "statistics file (--compare) not found")
    if view == "difference" and compare_path is None:
        raise PcbkitError("--view difference needs --compare OTHER_STATS.npz")
    if compare_path is not None and view not in ("difference", "all"):
        raise PcbkitError("--compare is used by --view difference or --view all")
    if how is None:
        how = "random" if seed is not None else "most-confused"
    elif seed is not None and how != "random":
        raise PcbkitError(f"--seed only applies to --select random (got --select {how})")
    if n_classes is not None and n_classes < 1:
        raise PcbkitError(f"--classes {n_classes}: must be at least 1")
    if n_pairs < 1:
        raise PcbkitError(f"--pairs {n_pairs}: must be at least 1")
    if pairs_csv is not None and pairs_csv.suffix.lower() != ".csv":
        raise input_error(
            pairs_csv, f"--pairs-csv extension must be .csv, got {pairs_csv.suffix or '(none)'!r}"
        )
    for path, option in ((out, "--out"), (pairs_csv, "--pairs-csv")):
        if path is not None:
            check_output_path(path, option)
    views = (
        [v for v in ALL_VIEWS if v != "difference" or compare_path is not None] if view == "all" else [view]
    )
    # heavy imports (numpy, torch, matplotlib) only once the options are valid
    from pcb_analysis import plots
    from pcb_analysis.plots.from_stats import load_matrices
    from pcb_analysis.regime_line import stats_regime_text

    paths = plots.output_paths(views, stats_path, out)
    loaded = load_matrices(stats_path, categories_json, compare_path)
    k = loaded.categories.num_classes
    if "block" in views and class_names is None and n_classes is not None and n_classes > k:
        raise PcbkitError(f"--classes {n_classes}: larger than the number of classes K={k}")
    # the regime of each statistics file as a second title line (docs/statistics.md §4)
    given = loaded.categories if categories_json is not None else None
    regime = stats_regime_text(stats_path, given, sigma=False)
    subtitles = {v: regime for v in views if v != "difference"}
    if loaded.other is not None and compare_path is not None:
        other = stats_regime_text(compare_path, given, sigma=False)
        subtitles["difference"] = f"{loaded.main.label}: {regime}\n{loaded.other.label}: {other}"
    done = plots.render_views(
        paths,
        loaded.main,
        loaded.categories,
        block=None if class_names is None else [c for c in class_names.split(",") if c.strip()],
        select=how,
        block_size=n_classes,
        seed=seed or 0,
        log2=log2,
        difference=None if loaded.other is None else (loaded.main, loaded.other),
        pairs_csv=pairs_csv,
        n_pairs=n_pairs,
        source=stats_path,
        subtitles=subtitles,
    )
    if "block" in views:
        chosen = "given" if class_names is not None else how
        click.echo(f"block ({chosen}): {', '.join(loaded.categories.names[c] for c in done.block)}")
    for path in done.written:
        click.echo(f"wrote {path}")
