"""Confusion matrices to plot, read from statistics files (`pcbkit stats` output, .npz).

`load_matrices(stats_path, categories_json, compare_path)` -> `StatsMatrices`: the category space
that labels the classes (the file's own, checked against `categories_json` when both exist; else
placeholder names `class_<k>` with unknown frequency), the file's `Matrix` (M as numpy float [K, K],
empty-class mask) and, with `compare_path`, the second file's matrix (same K and category space).
The two matrices are labelled by their split names when these differ, else by their file names.
Not imported by `pcb_analysis.plots` itself: this module imports torch (through `ClassStats`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import input_error
from pcb_analysis.plots.render import Matrix
from pcb_analysis.stats import ClassStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsMatrices:
    """The category space and the matrix of a statistics file, plus the matrix of a second one."""

    categories: CategorySpace
    main: Matrix
    other: Matrix | None


def category_space(st: ClassStats, stats_path: Path, categories_json: Path | None) -> CategorySpace:
    """The space that labels the classes of `st`: its own, or `categories_json`'s (they must agree),
    or placeholders (with a warning) when there is neither."""
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
    return space


def difference_labels(st: ClassStats, other: ClassStats, a: Path, b: Path) -> tuple[str, str]:
    """Names of two matrices: their split names when distinct, else their file stems (or paths)."""
    split_a, split_b = getattr(st, "split", None), getattr(other, "split", None)
    if split_a and split_b and split_a != split_b:
        return str(split_a), str(split_b)
    return (a.stem, b.stem) if a.stem != b.stem else (str(a), str(b))


def _matrix(st: ClassStats, label: str, path: Path) -> Matrix:
    if int(st.n.sum()) == 0:
        raise input_error(path, "the statistics hold no positives (every class is empty): no confusion "
                                "matrix to plot (was the dump empty of labelled proposals?)")
    cm = st.confusion().detach().cpu().numpy()
    empty = st.empty_classes().detach().cpu().numpy().astype(bool)
    return Matrix(cm, empty, label)


def load_matrices(
    stats_path: Path, categories_json: Path | None = None, compare_path: Path | None = None
) -> StatsMatrices:
    """Read `stats_path` (and `compare_path`, which must have the same K and category space)."""
    st = ClassStats.load(stats_path)
    k = int(st.n.shape[0])
    space = category_space(st, stats_path, categories_json)
    main = _matrix(st, stats_path.stem, stats_path)
    if compare_path is None:
        return StatsMatrices(space, main, None)
    other = ClassStats.load(compare_path)
    k_other = int(other.n.shape[0])
    other_space = getattr(other, "categories", None)
    if k_other != k:
        raise input_error(compare_path, f"K={k_other} classes, but {stats_path} has K={k}")
    if other_space is not None:
        space.check_same(other_space, f"{compare_path} (--compare)")
    label_a, label_b = difference_labels(st, other, stats_path, compare_path)
    return StatsMatrices(space, replace(main, label=label_a), _matrix(other, label_b, compare_path))
