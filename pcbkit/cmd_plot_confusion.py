"""`pcbkit plot-confusion`: Figure 1 of the PCB paper and whole-matrix views from a statistics file.

Thin command: parse and validate, load `ClassStats`, call `pcb_analysis.plots`. numpy, torch and
matplotlib are imported inside the body so `pcbkit --help` stays instant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from pcb_analysis.errors import PcbkitError, input_error

logger = logging.getLogger(__name__)

# Literal copies of pcb_analysis.plots.SELECTIONS / the views below (importing plots here would pull
# in numpy at `pcbkit --help` time); a test pins them to the library's tuples.
SELECTIONS = ("random", "most-confused", "frequent", "rare")
VIEWS = ("block", "overview", "diagonal", "head-tail", "difference", "all")
ALL_VIEWS = ("block", "overview", "diagonal", "head-tail", "difference")


def _output_paths(views: list[str], stats_path: Path, out: Path | None) -> dict[str, Path]:
    """One path per view: `out` itself for one view, `<out stem>-<view><ext>` for several;
    by default `<stats stem>-<view>.png` next to the statistics file."""
    if out is None:
        return {v: stats_path.with_name(f"{stats_path.stem}-{v}.png") for v in views}
    if out.suffix.lower() not in (".png", ".pdf"):
        raise input_error(out, f"figure extension must be .png or .pdf, got {out.suffix or '(none)'!r}")
    if len(views) == 1:
        return {views[0]: out}
    return {v: out.with_name(f"{out.stem}-{v}{out.suffix}") for v in views}


def _labels(st: object, other: object, a: Path, b: Path) -> tuple[str, str]:
    """Names of the two matrices in the difference view: their split names when distinct, else file stems."""
    split_a, split_b = getattr(st, "split", None), getattr(other, "split", None)
    if split_a and split_b and split_a != split_b:
        return str(split_a), str(split_b)
    return (a.stem, b.stem) if a.stem != b.stem else (str(a), str(b))


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
    views = (
        [v for v in ALL_VIEWS if v != "difference" or compare_path is not None] if view == "all" else [view]
    )
    paths = _output_paths(views, stats_path, out)

    # --- heavy part --------------------------------------------------------------------------
    import numpy as np

    from pcb_analysis import plots
    from pcb_analysis.categories import CategorySpace
    from pcb_analysis.stats import ClassStats

    st = ClassStats.load(stats_path)
    k = int(st.n.shape[0])
    space: CategorySpace | None = getattr(st, "categories", None)
    if categories_json is not None:
        given = CategorySpace.from_lvis_json(categories_json)
        if space is not None:
            space.check_same(given, f"{categories_json} (--categories)")
        elif given.num_classes != k:
            raise input_error(categories_json, f"{given.num_classes} categories, but {stats_path} has K={k}")
        space = given
    if space is None:
        logger.warning(
            "%s carries no category space: classes are named class_<k>, frequency unknown "
            "(pass --categories LVIS_JSON for names, r/c/f and training image counts)",
            stats_path,
        )
        space = CategorySpace(
            ids=tuple(range(1, k + 1)),
            names=tuple(f"class_{c}" for c in range(k)),
            frequency=("f",) * k,
            image_count=(0,) * k,
        )
    if space.num_classes != k:
        raise input_error(
            stats_path, f"category space has {space.num_classes} classes but the statistics K={k}"
        )

    cm = st.confusion().detach().cpu().numpy()
    empty = st.empty_classes().detach().cpu().numpy().astype(bool)

    other = None
    if compare_path is not None:
        other = ClassStats.load(compare_path)
        k_other = int(other.n.shape[0])
        other_space = getattr(other, "categories", None)
        if k_other != k:
            raise input_error(compare_path, f"K={k_other} classes, but {stats_path} has K={k}")
        if other_space is not None:
            space.check_same(other_space, f"{compare_path} (--compare)")

    classes: list[int] = []
    if "block" in views:
        if class_names is not None:
            classes = plots.resolve_classes(space, [c for c in class_names.split(",") if c.strip()])
        else:
            if n_classes is not None and n_classes > k:
                raise PcbkitError(f"--classes {n_classes}: larger than the number of classes K={k}")
            # by default the block holds only classes with positives (empty rows are placeholders)
            n_defined = int((~empty).sum())
            size = n_classes if n_classes is not None else min(10, n_defined or k)
            classes = plots.select_block(cm, space, size, how, seed=seed or 0, empty=empty)
        chosen = "given" if class_names is not None else how
        click.echo(f"block ({chosen}): {', '.join(space.names[c] for c in classes)}")
    if "diagonal" in views and not any(space.image_count):
        msg = "no training image counts in the category space; pass --categories LVIS_JSON"
        if view != "all":
            raise PcbkitError(f"{stats_path}: {msg}")
        logger.warning("skipping the diagonal view: %s", msg)
        del paths["diagonal"]

    written: list[Path] = []
    for v, path in paths.items():
        if v == "block":
            written.append(plots.plot_block(cm, space, classes, path, log2=log2, empty=empty))
        elif v == "overview":
            written.append(plots.plot_overview(cm, space, path, empty=empty))
        elif v == "diagonal":
            written.append(plots.plot_diagonal(np.diagonal(cm), space, path, empty=empty))
        elif v == "head-tail":
            written.append(plots.plot_zoom(cm, space, path, log2=log2, empty=empty))
        elif v == "difference":
            assert other is not None and compare_path is not None
            written.append(
                plots.plot_difference(
                    cm,
                    other.confusion().detach().cpu().numpy(),
                    space,
                    path,
                    labels=_labels(st, other, stats_path, compare_path),
                    empty_a=empty,
                    empty_b=other.empty_classes().detach().cpu().numpy().astype(bool),
                )
            )
    if pairs_csv is not None:
        table = plots.top_confused_pairs(cm, space, n_pairs, empty=empty)
        written.append(plots.write_top_pairs_csv(table, pairs_csv))
    for path in written:
        click.echo(f"wrote {path}")
