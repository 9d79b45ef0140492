"""The figures: Figure 1 block, head-tail zoom, whole-matrix overview, train-vs-val difference, diagonal.

K foreground classes. `cm` is the confusion matrix M as a numpy array [K, K]: row i = ground-truth
class, column j = predicted class, M[i, j] = mean foreground probability of class j over the
positives of class i (docs/method.md §2), rows sum to 1; `ms` [K] is its diagonal (mean score).
`empty` is an optional bool [K] mask of classes without positives: their rows are placeholders, drawn
grey. Every view takes plain arrays plus a `CategorySpace` (names, r/c/f, training image count), writes
`out` (.png or .pdf) atomically and returns its path. `plot_block` is Figure 1 (docs/method.md §7);
the other views keep a K = 1,203 matrix readable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pcb_analysis.categories import FREQUENCIES, CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_analysis.plots.checks import as_mask, as_matrix, check_figure_path
from pcb_analysis.plots.heatmap import (
    BUCKET_COLOURS,
    BUCKET_NAMES,
    LOG2_FLOOR,
    MAX_NAMED,
    decorate_sorted_axes,
    diverging_cmap,
    draw_heatmap,
    log2_image,
    log2_norm,
    masked_rows,
    matrix_axes,
    new_figure,
    save_figure,
    sequential_cmap,
    symlog_norm,
)
from pcb_analysis.plots.selection import asymmetric_mass, frequency_order, resolve_classes, select_head_tail


def with_subtitle(title: str, subtitle: str | None) -> str:
    """`title`, with `subtitle` (e.g. the statistics' regime line) on a second line when given."""
    return f"{title}\n{subtitle}" if subtitle else title


def plot_block(
    cm: np.ndarray,
    categories: CategorySpace,
    classes: Sequence[int | str],
    out: str | Path,
    *,
    log2: bool = True,
    floor: float = LOG2_FLOOR,
    title: str | None = None,
    subtitle: str | None = None,
    empty: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """Figure 1 of the PCB paper: the confusion matrix restricted to `classes` (indices or names).

    Rows = ground truth, columns = predicted, values taken from the full matrix (a block row need
    not sum to 1). `log2` draws log2 M (floored at 2^floor) with a light-is-high colormap; cells
    are annotated when the block has <= 20 classes. Rows of classes without positives are grey.
    """
    m = as_matrix(cm, categories)
    mask = as_mask(empty, categories.num_classes)
    idx = resolve_classes(categories, list(classes))
    if title is None:
        scale = "log2 scale" if log2 else "linear scale"
        title = (
            f"Confusion block of {len(idx)} of K={categories.num_classes} classes ({scale}); "
            f"asymmetric mass $\\sum_{{i<j}}|M_{{ij}} - M_{{ji}}|$ = {asymmetric_mass(m, idx):.3g}"
        )
    path = check_figure_path(out)
    fig = draw_heatmap(m, categories, idx, idx, log2=log2, floor=floor,
                       title=with_subtitle(title, subtitle), empty=mask)
    return save_figure(fig, path, dpi)


def plot_zoom(
    cm: np.ndarray,
    categories: CategorySpace,
    out: str | Path,
    *,
    rows: Sequence[int | str] | None = None,
    cols: Sequence[int | str] | None = None,
    n_rows: int = 40,
    n_cols: int = 40,
    log2: bool = True,
    floor: float = LOG2_FLOOR,
    title: str | None = None,
    subtitle: str | None = None,
    empty: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """A rows x cols slice of the matrix; by default the head-vs-tail slice of `select_head_tail`."""
    m = as_matrix(cm, categories)
    mask = as_mask(empty, categories.num_classes)
    default_rows, default_cols = (None, None)
    if rows is None or cols is None:
        default_rows, default_cols = select_head_tail(m, categories, n_rows, n_cols, mask)
    r_idx = resolve_classes(categories, list(rows)) if rows is not None else default_rows
    c_idx = resolve_classes(categories, list(cols)) if cols is not None else default_cols
    if title is None:
        if rows is None and cols is None:
            title = (
                f"Tail vs head: {len(r_idx)} rare classes (rows) most confused with "
                f"{len(c_idx)} frequent classes (columns)"
            )
        else:
            title = f"Confusion slice: {len(r_idx)} ground-truth x {len(c_idx)} predicted classes"
    path = check_figure_path(out)
    fig = draw_heatmap(m, categories, r_idx, c_idx, log2=log2, floor=floor,
                       title=with_subtitle(title, subtitle), empty=mask)
    return save_figure(fig, path, dpi)



def plot_overview(
    cm: np.ndarray,
    categories: CategorySpace,
    out: str | Path,
    *,
    floor: float = LOG2_FLOOR,
    title: str | None = None,
    subtitle: str | None = None,
    empty: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """The whole matrix, classes sorted by training frequency (`frequency_order`), log2 colour scale.

    r/c/f blocks are separated by lines and labelled with their size; no per-cell text; one
    raster image (imshow), so K = 1,203 renders in about a second. Rows of classes without
    positives are grey.
    """
    out = check_figure_path(out)
    m = as_matrix(cm, categories)
    mask = as_mask(empty, categories.num_classes)
    order = frequency_order(categories)
    img = log2_image(m[np.ix_(order, order)], floor)
    fig, ax, cax = matrix_axes(named=categories.num_classes <= MAX_NAMED)
    im = ax.imshow(
        masked_rows(img, mask[order]),
        cmap=sequential_cmap(),
        norm=log2_norm(floor),
        interpolation="nearest",
        aspect="equal",
    )
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label(f"log2 M[i, j]  (floored at $2^{{{floor:g}}}$; lighter = higher)", fontsize=9)
    decorate_sorted_axes(ax, categories, order, mask, line_colour="#4dd0e1")
    ax.set_ylabel("ground-truth class i (sorted by training images, most first)", fontsize=9)
    ax.set_xlabel("predicted class j (same order)", fontsize=9)
    n_empty = int(mask.sum())
    ax.set_title(
        with_subtitle(
            title
            or (
                f"Confusion matrix, K={categories.num_classes}"
                + (f" ({n_empty} classes without positives in grey)" if n_empty else "")
            ),
            subtitle,
        ),
        fontsize=11,
    )
    return save_figure(fig, out, dpi)


def plot_difference(
    cm_a: np.ndarray,
    cm_b: np.ndarray,
    categories: CategorySpace,
    out: str | Path,
    *,
    labels: tuple[str, str] = ("train", "val"),
    linthresh: float = 2.0**-12,
    title: str | None = None,
    subtitle: str | None = None,
    empty_a: np.ndarray | None = None,
    empty_b: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """M_a - M_b, sorted like `plot_overview`, diverging colormap centred at 0.

    Entries range from -1 to 1 but most off-diagonal differences are tiny, so the colour scale is
    symmetric-logarithmic (linear within +-`linthresh`). Red: higher in `labels[0]`; blue: higher
    in `labels[1]`. Rows of a class empty in either matrix are grey.
    """
    out = check_figure_path(out)
    a = as_matrix(cm_a, categories, f"confusion matrix ({labels[0]})")
    b = as_matrix(cm_b, categories, f"confusion matrix ({labels[1]})")
    k = categories.num_classes
    mask = as_mask(empty_a, k) | as_mask(empty_b, k)
    order = frequency_order(categories)
    diff = (a - b)[np.ix_(order, order)]
    shown = np.abs(diff[~mask[order]])
    vmax = float(shown.max()) if shown.size and shown.max() > 0 else 1.0
    vmax = max(vmax, linthresh * 2)
    fig, ax, cax = matrix_axes(named=categories.num_classes <= MAX_NAMED)
    im = ax.imshow(
        masked_rows(diff, mask[order]),
        cmap=diverging_cmap(),
        norm=symlog_norm(linthresh, vmax),
        interpolation="nearest",
        aspect="equal",
    )
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label(
        f"M_{labels[0]} - M_{labels[1]}  (symmetric log, linear within $\\pm 2^{{{np.log2(linthresh):g}}}$)",
        fontsize=9,
    )
    decorate_sorted_axes(ax, categories, order, mask, line_colour="#555555")
    ax.set_ylabel("ground-truth class i (sorted by training images, most first)", fontsize=9)
    ax.set_xlabel("predicted class j (same order)", fontsize=9)
    diag = np.diagonal(a - b)[~mask]
    summary = (
        f"mean diagonal difference {diag.mean():+.3f}" if diag.size else "no class with positives in both"
    )
    ax.set_title(
        with_subtitle(
            title
            or (
                f"Confusion difference {labels[0]} - {labels[1]}, K={k}; red = higher in "
                f"{labels[0]}, blue = higher in {labels[1]}; {summary}"
            ),
            subtitle,
        ),
        fontsize=10,
    )
    return save_figure(fig, out, dpi)


def plot_diagonal(
    ms: np.ndarray,
    categories: CategorySpace,
    out: str | Path,
    *,
    title: str | None = None,
    subtitle: str | None = None,
    empty: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """Mean score s[i] = M[i, i] against training image count (log x), one colour per r/c/f bucket.

    Classes without positives, or with an unknown (0) image count, cannot be placed and are left
    out (their number is in the title). Each bucket's mean score is a dashed line and in the legend.
    """
    out = check_figure_path(out)
    k = categories.num_classes
    s = np.asarray(ms, dtype=np.float64)
    if s.shape != (k,):
        raise PcbkitError(f"mean score: shape {tuple(s.shape)} does not match the category space (K={k})")
    if not np.isfinite(s).all():
        raise PcbkitError("mean score: contains NaN or inf")
    mask = as_mask(empty, k)
    count = np.array(categories.image_count, dtype=np.float64)
    freq = np.array(categories.frequency)
    fig = new_figure(8.0, 5.0)
    ax = fig.add_subplot()
    placed = (~mask) & (count > 0)
    for b in FREQUENCIES:
        sel = placed & (freq == b)
        members = (~mask) & (freq == b)
        if not members.any():
            continue
        mean = float(s[members].mean())
        ax.scatter(
            count[sel],
            s[sel],
            s=9,
            alpha=0.65,
            color=BUCKET_COLOURS[b],
            linewidths=0,
            label=f"{BUCKET_NAMES[b]} ({int(members.sum())} classes, mean {mean:.3f})",
        )
        if sel.any():
            ax.hlines(
                mean,
                count[sel].min(),
                count[sel].max(),
                colors=BUCKET_COLOURS[b],
                linestyles="--",
                linewidth=1.2,
            )
    if placed.any():
        ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("training images containing the class (log scale)", fontsize=9)
    ax.set_ylabel("mean score M[i, i] (mean p of the true class)", fontsize=9)
    ax.grid(alpha=0.3, which="both", linewidth=0.5)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", title="bucket (dashed: bucket mean)", title_fontsize=8)
    left_out = int((~placed).sum())
    ax.set_title(
        with_subtitle(
            title
            or (
                f"Mean score vs training frequency, K={k}"
                + (f" ({left_out} classes without positives or image count left out)" if left_out else "")
            ),
            subtitle,
        ),
        fontsize=10,
    )
    return save_figure(fig, out, dpi)

