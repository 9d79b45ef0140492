"""Drawing blocks shared by the views: figures and axes, colour scales, heatmaps, labels, saving.

Matrices are numpy float arrays, rows = ground truth, columns = predicted. Figures are built on
`matplotlib.figure.Figure` directly (no pyplot, no global backend switch, no rcParams change).
`save_figure(fig, out, dpi)` writes png or pdf by the extension of `out` through `atomic_path` (a
failed render never clobbers an existing figure), then clears the figure. matplotlib is imported in
one place, `_matplotlib()`, on the first figure drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from pcb_analysis.atomic import atomic_path, os_errors_named
from pcb_analysis.categories import CategorySpace
from pcb_analysis.plots.checks import check_figure_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize, SymLogNorm
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

logger = logging.getLogger(__name__)

LOG2_FLOOR = -20.0
"""Probabilities below 2^LOG2_FLOOR are drawn at the floor (log2(0) is -inf)."""
MAX_ANNOTATED = 20
"""Per-cell text is drawn only when both sides of the heatmap have at most this many classes."""
MAX_NAMED = 80
"""Class names are written on an axis only when it has at most this many classes."""
BUCKET_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
BUCKET_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def _matplotlib() -> ModuleType:
    """matplotlib with its `colors` and `figure` modules loaded.

    The one lazy import of the package: matplotlib takes about half a second to import and only
    drawing needs it, so selections, pair tables and the commands that import this package stay fast.
    """
    import matplotlib
    import matplotlib.colors
    import matplotlib.figure

    return matplotlib


def class_label(categories: CategorySpace, k: int, empty: np.ndarray) -> str:
    mark = ", no positives" if empty[k] else ""
    return f"{categories.names[k]} ({categories.frequency[k]}{mark})"


def save_figure(fig: Figure, out: Path, dpi: int) -> Path:
    """Write `fig` to `out` atomically (format from the extension), then release it."""
    out = check_figure_path(out)
    fmt = out.suffix.lower().lstrip(".")
    try:
        with atomic_path(out, suffix=out.suffix) as tmp, os_errors_named(out):
            fig.savefig(tmp, format=fmt, dpi=dpi, **_format_kwargs(fmt))
    finally:
        fig.clear()
    logger.info("wrote %s", out)
    return out


def _format_kwargs(fmt: str) -> dict[str, object]:
    # zlib level 4 instead of PIL's default 6: large noisy matrix images save about twice as fast
    return {"pil_kwargs": {"compress_level": 4}, "metadata": {"Software": "pcbkit"}} if fmt == "png" else {}


def new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    return _matplotlib().figure.Figure(figsize=(width, height), layout="constrained" if constrained else None)


def matrix_axes(named: bool) -> tuple[Figure, Axes, Axes]:
    """Figure, main axes and colour-bar axes for a whole-matrix view, laid out by hand.

    A fixed layout (instead of constrained layout, which draws the figure once more to measure it)
    keeps a K = 1,203 render at one rasterisation of the matrix.
    """
    height, top = 9.0, 0.55  # inches
    left, bottom = (2.3, 2.0) if named else (1.1, 0.75)
    side = height - bottom - top  # square matrix axes
    width = left + side + 0.3 + 0.25 + 1.0  # gap, colour bar, its tick labels and label
    fig = new_figure(width, height, constrained=False)
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    cax = fig.add_axes(
        ((left + side + 0.3) / width, (bottom + 0.1 * side) / height, 0.25 / width, 0.8 * side / height)
    )
    return fig, ax, cax


def log2_image(m: np.ndarray, floor: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.maximum(np.log2(np.clip(m, 0.0, None)), floor)


def masked_rows(img: np.ndarray, rows_empty: np.ndarray) -> np.ma.MaskedArray:
    mask = np.zeros(img.shape, dtype=bool)
    mask[rows_empty, :] = True
    return np.ma.masked_array(img, mask=mask)


def annotate_cells(ax: Axes, im: AxesImage, values: np.ndarray, fmt: str) -> None:
    """Write each cell's value in a colour that contrasts with the cell (skipping masked cells)."""
    data = im.get_array()
    rgba = im.cmap(im.norm(np.ma.getdata(data)))
    light = rgba[..., :3] @ np.array([0.299, 0.587, 0.114]) > 0.5
    masked = np.ma.getmaskarray(data)
    for (r, c), v in np.ndenumerate(values):
        if not masked[r, c]:
            ax.text(
                c,
                r,
                format(v, fmt),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if light[r, c] else "white",
            )


def draw_heatmap(
    m: np.ndarray,
    categories: CategorySpace,
    rows: Sequence[int],
    cols: Sequence[int],
    *,
    log2: bool,
    floor: float,
    title: str,
    empty: np.ndarray,
) -> Figure:
    """Shared body of `plot_block` and `plot_zoom`: a rows x cols heatmap with names and a colour bar."""
    r_idx = np.asarray(rows, dtype=np.int64)
    c_idx = np.asarray(cols, dtype=np.int64)
    sub = m[np.ix_(r_idx, c_idx)]
    nr, nc = sub.shape
    named_r, named_c = nr <= MAX_NAMED, nc <= MAX_NAMED
    cell = 0.55 if max(nr, nc) <= MAX_ANNOTATED else 0.16
    label_w = 2.6 if named_r else 0.8
    label_h = 2.4 if named_c else 0.8
    fig = new_figure(min(3.0 + label_w + cell * nc, 30.0), min(1.2 + label_h + cell * nr, 30.0))
    ax = fig.add_subplot()

    if log2:
        img = log2_image(sub, floor)
        norm = log2_norm(floor)
        cbar_label = f"log2 M[i, j]  (floored at $2^{{{floor:g}}}$; lighter = higher)"
        text_fmt, text_values = ".1f", img
    else:
        img = sub
        norm = _matplotlib().colors.Normalize(vmin=0.0, vmax=max(float(sub.max()), 1e-12))
        cbar_label = "M[i, j] = mean probability of predicted class j (lighter = higher)"
        text_fmt, text_values = ".2f", sub
    cmap = sequential_cmap()
    im = ax.imshow(
        masked_rows(img, empty[r_idx]), cmap=cmap, norm=norm, interpolation="nearest", aspect="equal"
    )
    cbar = fig.colorbar(im, ax=ax, shrink=0.9 if nr > 6 else 1.0)
    cbar.set_label(cbar_label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)

    if max(nr, nc) <= MAX_ANNOTATED:
        annotate_cells(ax, im, text_values, text_fmt)
    font = 8 if max(nr, nc) <= MAX_ANNOTATED else 7 if max(nr, nc) <= 40 else 6
    if named_r:
        ax.set_yticks(range(nr), [class_label(categories, int(c), empty) for c in r_idx], fontsize=font)
    else:
        ax.set_yticks([])
    if named_c:
        ax.set_xticks(
            range(nc),
            [class_label(categories, int(c), empty) for c in c_idx],
            fontsize=font,
            rotation=55,
            ha="right",
            rotation_mode="anchor",
        )
    else:
        ax.set_xticks([])
    for label, k in zip(ax.get_yticklabels() if named_r else [], r_idx, strict=False):
        label.set_color(BUCKET_COLOURS[categories.frequency[int(k)]])
    for label, k in zip(ax.get_xticklabels() if named_c else [], c_idx, strict=False):
        label.set_color(BUCKET_COLOURS[categories.frequency[int(k)]])
    ax.set_xticks(np.arange(nc + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(nr + 1) - 0.5, minor=True)
    if max(nr, nc) <= MAX_ANNOTATED:
        ax.grid(which="minor", color="white", linewidth=0.4, alpha=0.35)
    ax.tick_params(which="minor", length=0)
    ax.set_ylabel("ground-truth class (row i)", fontsize=9)
    ax.set_xlabel("predicted class (column j)   [label colour: r = red, c = orange, f = blue]", fontsize=9)
    ax.set_title(title, fontsize=10)
    return fig


def sequential_cmap() -> Colormap:
    """Light = high; grey ("bad") marks the masked rows of classes without positives."""
    return _matplotlib().colormaps["magma"].with_extremes(bad="#bdbdbd")


def diverging_cmap() -> Colormap:
    """Red = positive, blue = negative, white at 0; grey marks masked rows."""
    return _matplotlib().colormaps["RdBu_r"].with_extremes(bad="#bdbdbd")


def log2_norm(floor: float) -> Normalize:
    """Colour scale of a `log2_image`: floor .. 0."""
    return _matplotlib().colors.Normalize(vmin=floor, vmax=0.0)


def symlog_norm(linthresh: float, vmax: float) -> SymLogNorm:
    """Symmetric-log scale -vmax .. vmax in base 2, linear within +-linthresh."""
    return _matplotlib().colors.SymLogNorm(linthresh=linthresh, vmin=-vmax, vmax=vmax, base=2)



def _bucket_spans(categories: CategorySpace, order: np.ndarray) -> list[tuple[str, int, int]]:
    """(bucket, start, stop) runs of the frequency order (contiguous by construction)."""
    spans: list[tuple[str, int, int]] = []
    freq = [categories.frequency[int(c)] for c in order]
    start = 0
    for pos in range(1, len(freq) + 1):
        if pos == len(freq) or freq[pos] != freq[start]:
            spans.append((freq[start], start, pos))
            start = pos
    return spans


def decorate_sorted_axes(
    ax: Axes, categories: CategorySpace, order: np.ndarray, empty: np.ndarray, line_colour: str
) -> None:
    """Bucket separators and labels (or class names for small K) on a frequency-sorted matrix."""
    k = order.size
    spans = _bucket_spans(categories, order)
    for _, _, stop in spans[:-1]:
        ax.axhline(stop - 0.5, color=line_colour, linewidth=0.8)
        ax.axvline(stop - 0.5, color=line_colour, linewidth=0.8)
    if k <= MAX_NAMED:
        labels = [class_label(categories, int(c), empty) for c in order]
        font = 7 if k <= 40 else 5
        ax.set_yticks(range(k), labels, fontsize=font)
        ax.set_xticks(range(k), labels, fontsize=font, rotation=60, ha="right", rotation_mode="anchor")
        for lab_y, lab_x, c in zip(ax.get_yticklabels(), ax.get_xticklabels(), order, strict=True):
            lab_y.set_color(BUCKET_COLOURS[categories.frequency[int(c)]])
            lab_x.set_color(BUCKET_COLOURS[categories.frequency[int(c)]])
        return
    centres = [(start + stop - 1) / 2 for _, start, stop in spans]
    texts = [f"{BUCKET_NAMES[b]}\n({stop - start})" for b, start, stop in spans]
    ax.set_yticks(centres, texts, fontsize=9)
    ax.set_xticks(centres, [t.replace("\n", " ") for t in texts], fontsize=9)
    for lab_y, lab_x, (b, _, _) in zip(ax.get_yticklabels(), ax.get_xticklabels(), spans, strict=True):
        lab_y.set_color(BUCKET_COLOURS[b])
        lab_x.set_color(BUCKET_COLOURS[b])
    ax.tick_params(length=0)

