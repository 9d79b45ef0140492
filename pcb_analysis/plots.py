"""Confusion-matrix figures (PCB paper Figure 1 and views that stay readable at LVIS scale).

K foreground classes. `cm` is the confusion matrix `M` as a numpy array [K, K] float: row i =
ground-truth class, column j = predicted class, `M[i, j]` = mean foreground probability of class j
over the positives of class i (docs/method.md §2), rows sum to 1. `ms` [K] is its diagonal (mean score).
`empty` is an optional bool mask [K] of classes without positives: their rows are placeholder
identity rows, so the figures grey them out and the selections skip them.

Every function takes plain arrays plus a `CategorySpace` (names, r/c/f, training image count); none
depends on `ClassStats`. Figures are built on `matplotlib.figure.Figure` directly (no pyplot, no
global backend switch, no rcParams change), saved as png or pdf by the extension of `out` through
`atomic_path` (a failed render never clobbers an existing figure), then cleared.

Views:
- `plot_block`: Figure 1, a small block (default 10 classes), log2 scale, per-cell text up to 20 classes.
- `plot_overview`: the whole matrix sorted by training frequency with r/c/f separators (imshow, fast at K=1203).
- `plot_zoom`: a rows x columns slice, by default rare classes (rows) vs frequent classes (columns).
- `plot_diagonal`: mean score against training image count (log x), coloured by r/c/f.
- `plot_difference`: M_a - M_b (e.g. train - val) on a symmetric-log diverging scale, sorted like the overview.
- `top_confused_pairs` / `write_top_pairs_csv`: the largest off-diagonal entries as a table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pcb_analysis.atomic import atomic_path, write_text_atomic
from pcb_analysis.categories import FREQUENCIES, CategorySpace
from pcb_analysis.errors import PcbkitError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

logger = logging.getLogger(__name__)

LOG2_FLOOR = -20.0
"""Probabilities below 2^LOG2_FLOOR are drawn at the floor (log2(0) is -inf)."""
MAX_ANNOTATED = 20
"""Per-cell text is drawn only when both sides of the heatmap have at most this many classes."""
MAX_NAMED = 80
"""Class names are written on an axis only when it has at most this many classes."""
FORMATS = (".png", ".pdf")
SELECTIONS = ("random", "most-confused", "frequent", "rare")
BUCKET_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
BUCKET_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
_BUCKET_RANK = {"f": 0, "c": 1, "r": 2}

Selection = Literal["random", "most-confused", "frequent", "rare"]


# ----------------------------------------------------------------------------------------------
# checks and small helpers
# ----------------------------------------------------------------------------------------------
def check_figure_path(out: str | Path) -> Path:
    """Return `out` as a Path; raise when its extension is not .png or .pdf."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise PcbkitError(f"{out}: figure extension must be .png or .pdf, got {out.suffix or '(none)'!r}")
    return out


def _as_matrix(cm: object, categories: CategorySpace, what: str = "confusion matrix") -> np.ndarray:
    m = np.asarray(cm, dtype=np.float64)
    k = categories.num_classes
    if m.shape != (k, k):
        raise PcbkitError(f"{what}: shape {tuple(m.shape)} does not match the category space (K={k})")
    if not np.isfinite(m).all():
        raise PcbkitError(f"{what}: contains NaN or inf")
    return m


def _as_mask(empty: object | None, k: int) -> np.ndarray:
    if empty is None:
        return np.zeros(k, dtype=bool)
    mask = np.asarray(empty, dtype=bool)
    if mask.shape != (k,):
        raise PcbkitError(f"empty-class mask: shape {tuple(mask.shape)}, expected ({k},)")
    return mask


def frequency_order(categories: CategorySpace) -> np.ndarray:
    """Contiguous indices sorted by training frequency: bucket f, c, r, then image_count desc, then index.

    In LVIS the buckets are defined by image count (r: 1-10, c: 11-100, f: >100 images), so this is
    the image-count-descending order with contiguous r/c/f blocks; the bucket key keeps the blocks
    contiguous when image counts are unknown (0).
    """
    k = categories.num_classes
    rank = np.array([_BUCKET_RANK[f] for f in categories.frequency], dtype=np.int64)
    count = np.array(categories.image_count, dtype=np.int64)
    return np.lexsort((np.arange(k), -count, rank))


def resolve_classes(categories: CategorySpace, items: Sequence[str | int]) -> list[int]:
    """Map class references to contiguous indices.

    An int is a contiguous index (0..K-1); a str is a class name, or `id:N` for LVIS category id N.
    Unknown references raise one PcbkitError listing them (with close name matches).
    """
    import difflib

    by_name = {name: k for k, name in enumerate(categories.names)}
    by_id = categories.index_of()
    out: list[int] = []
    unknown: list[str] = []
    for item in items:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if 0 <= int(item) < categories.num_classes:
                out.append(int(item))
            else:
                unknown.append(f"index {int(item)} (K={categories.num_classes})")
            continue
        text = str(item).strip()
        if text in by_name:
            out.append(by_name[text])
        elif text.startswith("id:") and text[3:].strip().isdigit() and int(text[3:]) in by_id:
            out.append(by_id[int(text[3:])])
        else:
            close = difflib.get_close_matches(text, list(by_name), n=3)
            unknown.append(repr(text) + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if unknown:
        raise PcbkitError(f"unknown class(es): {'; '.join(unknown)}")
    if len(set(out)) != len(out):
        raise PcbkitError("class list: a class is named more than once")
    if not out:
        raise PcbkitError("class list: empty")
    return out


def _label(categories: CategorySpace, k: int, empty: np.ndarray) -> str:
    mark = ", no positives" if empty[k] else ""
    return f"{categories.names[k]} ({categories.frequency[k]}{mark})"


def _save(fig: Figure, out: Path, dpi: int) -> Path:
    """Write `fig` to `out` atomically (format from the extension), then release it."""
    out = check_figure_path(out)
    fmt = out.suffix.lower().lstrip(".")
    try:
        with atomic_path(out, suffix=out.suffix) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, **_format_kwargs(fmt))
    finally:
        fig.clear()
    logger.info("wrote %s", out)
    return out


def _format_kwargs(fmt: str) -> dict[str, object]:
    # zlib level 4 instead of PIL's default 6: large noisy matrix images save about twice as fast
    return {"pil_kwargs": {"compress_level": 4}, "metadata": {"Software": "pcbkit"}} if fmt == "png" else {}


def _new_figure(width: float, height: float, constrained: bool = True) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


def _matrix_axes(named: bool) -> tuple[Figure, Axes, Axes]:
    """Figure, main axes and colour-bar axes for a whole-matrix view, laid out by hand.

    A fixed layout (instead of constrained layout, which draws the figure once more to measure it)
    keeps a K = 1,203 render at one rasterisation of the matrix.
    """
    height, top = 9.0, 0.55  # inches
    left, bottom = (2.3, 2.0) if named else (1.1, 0.75)
    side = height - bottom - top  # square matrix axes
    width = left + side + 0.3 + 0.25 + 1.0  # gap, colour bar, its tick labels and label
    fig = _new_figure(width, height, constrained=False)
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    cax = fig.add_axes(
        ((left + side + 0.3) / width, (bottom + 0.1 * side) / height, 0.25 / width, 0.8 * side / height)
    )
    return fig, ax, cax


def _log2_image(m: np.ndarray, floor: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.maximum(np.log2(np.clip(m, 0.0, None)), floor)


def _masked_rows(img: np.ndarray, rows_empty: np.ndarray) -> np.ma.MaskedArray:
    mask = np.zeros(img.shape, dtype=bool)
    mask[rows_empty, :] = True
    return np.ma.masked_array(img, mask=mask)


def _annotate_cells(ax: Axes, im: AxesImage, values: np.ndarray, fmt: str) -> None:
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


# ----------------------------------------------------------------------------------------------
# block selection
# ----------------------------------------------------------------------------------------------
def asymmetric_mass(cm: np.ndarray, classes: Sequence[int]) -> float:
    """A(B) = sum over unordered pairs {i, j} in B of |M[i, j] - M[j, i]| (the block's pairwise bias)."""
    idx = np.asarray(classes, dtype=np.int64)
    sub = np.asarray(cm, dtype=np.float64)[np.ix_(idx, idx)]
    return float(np.abs(sub - sub.T).sum() / 2.0)


def select_block(
    cm: np.ndarray,
    categories: CategorySpace,
    k: int = 10,
    how: Selection = "random",
    seed: int = 0,
    empty: np.ndarray | None = None,
) -> list[int]:
    """Pick `k` classes (contiguous indices, in display order) for `plot_block`.

    - `most-confused`: the block with the largest asymmetric off-diagonal mass A(B) (see
      `asymmetric_mass`), found greedily: D = |M - M^T| with a zero diagonal; seed with the pair
      argmax D[i, j] (the most asymmetric pair), then repeatedly add the class c maximising the
      gain sum_{b in B} D[c, b]. (Exact maximisation is the NP-hard densest-k-subgraph problem.)
      Display order = pick order, so the most asymmetric pair is in the top-left corner.
    - `frequent`: the k classes with the most training images (bucket f first); `rare`: the fewest
      (bucket r first); ties by index.
    - `random`: k classes drawn with `np.random.default_rng(seed)`, shown in index order.

    Classes in `empty` (no positives: placeholder rows) are skipped when enough others remain.
    """
    m = _as_matrix(cm, categories)
    n_cls = categories.num_classes
    mask = _as_mask(empty, n_cls)
    if how not in SELECTIONS:
        raise PcbkitError(f"block selection {how!r}: expected one of {', '.join(SELECTIONS)}")
    if not 1 <= k <= n_cls:
        raise PcbkitError(f"block size {k}: must be between 1 and the number of classes K={n_cls}")
    eligible = np.flatnonzero(~mask)
    if eligible.size < k:
        logger.warning(
            "only %d classes have positives; the %d-class block includes empty ones", eligible.size, k
        )
        eligible = np.arange(n_cls)

    if how == "random":
        rng = np.random.default_rng(seed)
        return sorted(int(c) for c in rng.choice(eligible, size=k, replace=False))
    if how in ("frequent", "rare"):
        order = frequency_order(categories)
        order = order[np.isin(order, eligible)]
        picked = order[:k] if how == "frequent" else order[::-1][:k]
        return [int(c) for c in picked]

    # most-confused
    d = np.abs(m - m.T)
    np.fill_diagonal(d, 0.0)
    outside = np.setdiff1d(np.arange(n_cls), eligible)
    d[outside, :] = -1.0
    d[:, outside] = -1.0
    if k == 1:
        return [int(eligible[np.argmax(d[eligible].max(axis=1))])]
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    block = [int(i), int(j)]
    gain = d[:, i] + d[:, j]
    taken = np.zeros(n_cls, dtype=bool)
    taken[block] = True
    taken[outside] = True
    while len(block) < k:
        cand = np.where(taken, -np.inf, gain)
        c = int(np.argmax(cand))
        block.append(c)
        taken[c] = True
        gain += d[:, c]
    return block


def select_head_tail(
    cm: np.ndarray,
    categories: CategorySpace,
    n_rows: int = 40,
    n_cols: int = 40,
    empty: np.ndarray | None = None,
) -> tuple[list[int], list[int]]:
    """Default slice for `plot_zoom`: rare classes (rows) vs frequent classes (columns).

    Rows: the `n_rows` rare classes with positives whose mass predicted as frequent classes,
    sum_{f} M[r, f], is largest (the tail classes swallowed by the head). Columns: the `n_cols`
    frequent classes receiving the most mass from those rows. When the space has no rare (or no
    frequent) classes, the least (most) frequent third of the frequency order stands in.
    Both lists are returned in frequency order (most images first).
    """
    m = _as_matrix(cm, categories)
    mask = _as_mask(empty, categories.num_classes)
    order = frequency_order(categories)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    tail = np.array([c for c in categories.bucket_indices("r") if not mask[c]], dtype=np.int64)
    head = np.array(categories.bucket_indices("f"), dtype=np.int64)
    third = max(1, order.size // 3)
    if tail.size == 0:
        tail = np.array([c for c in order[-third:] if not mask[c]] or list(order[-third:]), dtype=np.int64)
    if head.size == 0:
        head = order[:third]
    mass = m[np.ix_(tail, head)]
    rows = tail[np.argsort(-mass.sum(axis=1), kind="stable")[:n_rows]]
    mass_rows = m[np.ix_(rows, head)]
    cols = head[np.argsort(-mass_rows.sum(axis=0), kind="stable")[:n_cols]]
    return sorted(rows.tolist(), key=lambda c: rank[c]), sorted(cols.tolist(), key=lambda c: rank[c])


# ----------------------------------------------------------------------------------------------
# heatmaps
# ----------------------------------------------------------------------------------------------
def _heatmap(
    m: np.ndarray,
    categories: CategorySpace,
    rows: Sequence[int],
    cols: Sequence[int],
    out: Path,
    *,
    log2: bool,
    floor: float,
    title: str,
    empty: np.ndarray,
    dpi: int,
) -> Path:
    """Shared body of `plot_block` and `plot_zoom`: a rows x cols heatmap with names and a colour bar."""
    from matplotlib.colors import Normalize

    r_idx = np.asarray(rows, dtype=np.int64)
    c_idx = np.asarray(cols, dtype=np.int64)
    sub = m[np.ix_(r_idx, c_idx)]
    nr, nc = sub.shape
    named_r, named_c = nr <= MAX_NAMED, nc <= MAX_NAMED
    cell = 0.55 if max(nr, nc) <= MAX_ANNOTATED else 0.16
    label_w = 2.6 if named_r else 0.8
    label_h = 2.4 if named_c else 0.8
    fig = _new_figure(min(3.0 + label_w + cell * nc, 30.0), min(1.2 + label_h + cell * nr, 30.0))
    ax = fig.add_subplot()

    if log2:
        img = _log2_image(sub, floor)
        norm = Normalize(vmin=floor, vmax=0.0)
        cbar_label = f"log2 M[i, j]  (floored at $2^{{{floor:g}}}$; lighter = higher)"
        text_fmt, text_values = ".1f", img
    else:
        img = sub
        norm = Normalize(vmin=0.0, vmax=max(float(sub.max()), 1e-12))
        cbar_label = "M[i, j] = mean probability of predicted class j (lighter = higher)"
        text_fmt, text_values = ".2f", sub
    cmap = _sequential_cmap()
    im = ax.imshow(
        _masked_rows(img, empty[r_idx]), cmap=cmap, norm=norm, interpolation="nearest", aspect="equal"
    )
    cbar = fig.colorbar(im, ax=ax, shrink=0.9 if nr > 6 else 1.0)
    cbar.set_label(cbar_label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)

    if max(nr, nc) <= MAX_ANNOTATED:
        _annotate_cells(ax, im, text_values, text_fmt)
    font = 8 if max(nr, nc) <= MAX_ANNOTATED else 7 if max(nr, nc) <= 40 else 6
    if named_r:
        ax.set_yticks(range(nr), [_label(categories, int(c), empty) for c in r_idx], fontsize=font)
    else:
        ax.set_yticks([])
    if named_c:
        ax.set_xticks(
            range(nc),
            [_label(categories, int(c), empty) for c in c_idx],
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
    return _save(fig, out, dpi)


def _sequential_cmap() -> Colormap:
    import matplotlib

    # light = high; grey ("bad") marks the masked rows of classes without positives
    return matplotlib.colormaps["magma"].with_extremes(bad="#bdbdbd")


def plot_block(
    cm: np.ndarray,
    categories: CategorySpace,
    classes: Sequence[int | str],
    out: str | Path,
    *,
    log2: bool = True,
    floor: float = LOG2_FLOOR,
    title: str | None = None,
    empty: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """Figure 1 of the PCB paper: the confusion matrix restricted to `classes` (indices or names).

    Rows = ground truth, columns = predicted, values taken from the full matrix (a block row need
    not sum to 1). `log2` draws log2 M (floored at 2^floor) with a light-is-high colormap; cells
    are annotated when the block has <= 20 classes. Rows of classes without positives are grey.
    """
    m = _as_matrix(cm, categories)
    mask = _as_mask(empty, categories.num_classes)
    idx = resolve_classes(categories, list(classes))
    if title is None:
        scale = "log2 scale" if log2 else "linear scale"
        title = (
            f"Confusion block of {len(idx)} of K={categories.num_classes} classes ({scale}); "
            f"asymmetric mass $\\sum_{{i<j}}|M_{{ij}} - M_{{ji}}|$ = {asymmetric_mass(m, idx):.3g}"
        )
    return _heatmap(
        m,
        categories,
        idx,
        idx,
        check_figure_path(out),
        log2=log2,
        floor=floor,
        title=title,
        empty=mask,
        dpi=dpi,
    )


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
    empty: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """A rows x cols slice of the matrix; by default the head-vs-tail slice of `select_head_tail`."""
    m = _as_matrix(cm, categories)
    mask = _as_mask(empty, categories.num_classes)
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
    return _heatmap(
        m,
        categories,
        r_idx,
        c_idx,
        check_figure_path(out),
        log2=log2,
        floor=floor,
        title=title,
        empty=mask,
        dpi=dpi,
    )


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


def _decorate_sorted_axes(
    ax: Axes, categories: CategorySpace, order: np.ndarray, empty: np.ndarray, line_colour: str
) -> None:
    """Bucket separators and labels (or class names for small K) on a frequency-sorted matrix."""
    k = order.size
    spans = _bucket_spans(categories, order)
    for _, _, stop in spans[:-1]:
        ax.axhline(stop - 0.5, color=line_colour, linewidth=0.8)
        ax.axvline(stop - 0.5, color=line_colour, linewidth=0.8)
    if k <= MAX_NAMED:
        labels = [_label(categories, int(c), empty) for c in order]
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


def plot_overview(
    cm: np.ndarray,
    categories: CategorySpace,
    out: str | Path,
    *,
    floor: float = LOG2_FLOOR,
    title: str | None = None,
    empty: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """The whole matrix, classes sorted by training frequency (`frequency_order`), log2 colour scale.

    r/c/f blocks are separated by lines and labelled with their size; no per-cell text; one
    raster image (imshow), so K = 1,203 renders in about a second. Rows of classes without
    positives are grey.
    """
    from matplotlib.colors import Normalize

    out = check_figure_path(out)
    m = _as_matrix(cm, categories)
    mask = _as_mask(empty, categories.num_classes)
    order = frequency_order(categories)
    img = _log2_image(m[np.ix_(order, order)], floor)
    fig, ax, cax = _matrix_axes(named=categories.num_classes <= MAX_NAMED)
    im = ax.imshow(
        _masked_rows(img, mask[order]),
        cmap=_sequential_cmap(),
        norm=Normalize(floor, 0.0),
        interpolation="nearest",
        aspect="equal",
    )
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label(f"log2 M[i, j]  (floored at $2^{{{floor:g}}}$; lighter = higher)", fontsize=9)
    _decorate_sorted_axes(ax, categories, order, mask, line_colour="#4dd0e1")
    ax.set_ylabel("ground-truth class i (sorted by training images, most first)", fontsize=9)
    ax.set_xlabel("predicted class j (same order)", fontsize=9)
    n_empty = int(mask.sum())
    ax.set_title(
        title
        or (
            f"Confusion matrix, K={categories.num_classes}"
            + (f" ({n_empty} classes without positives in grey)" if n_empty else "")
        ),
        fontsize=11,
    )
    return _save(fig, out, dpi)


def plot_difference(
    cm_a: np.ndarray,
    cm_b: np.ndarray,
    categories: CategorySpace,
    out: str | Path,
    *,
    labels: tuple[str, str] = ("train", "val"),
    linthresh: float = 2.0**-12,
    title: str | None = None,
    empty_a: np.ndarray | None = None,
    empty_b: np.ndarray | None = None,
    dpi: int = 200,
) -> Path:
    """M_a - M_b, sorted like `plot_overview`, diverging colormap centred at 0.

    Entries range from -1 to 1 but most off-diagonal differences are tiny, so the colour scale is
    symmetric-logarithmic (linear within +-`linthresh`). Red: higher in `labels[0]`; blue: higher
    in `labels[1]`. Rows of a class empty in either matrix are grey.
    """
    from matplotlib.colors import SymLogNorm

    out = check_figure_path(out)
    a = _as_matrix(cm_a, categories, f"confusion matrix ({labels[0]})")
    b = _as_matrix(cm_b, categories, f"confusion matrix ({labels[1]})")
    k = categories.num_classes
    mask = _as_mask(empty_a, k) | _as_mask(empty_b, k)
    order = frequency_order(categories)
    diff = (a - b)[np.ix_(order, order)]
    shown = np.abs(diff[~mask[order]])
    vmax = float(shown.max()) if shown.size and shown.max() > 0 else 1.0
    vmax = max(vmax, linthresh * 2)
    fig, ax, cax = _matrix_axes(named=categories.num_classes <= MAX_NAMED)
    import matplotlib

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#bdbdbd")
    im = ax.imshow(
        _masked_rows(diff, mask[order]),
        cmap=cmap,
        norm=SymLogNorm(linthresh=linthresh, vmin=-vmax, vmax=vmax, base=2),
        interpolation="nearest",
        aspect="equal",
    )
    cbar = fig.colorbar(im, cax=cax)
    cbar.set_label(
        f"M_{labels[0]} - M_{labels[1]}  (symmetric log, linear within $\\pm 2^{{{np.log2(linthresh):g}}}$)",
        fontsize=9,
    )
    _decorate_sorted_axes(ax, categories, order, mask, line_colour="#555555")
    ax.set_ylabel("ground-truth class i (sorted by training images, most first)", fontsize=9)
    ax.set_xlabel("predicted class j (same order)", fontsize=9)
    diag = np.diagonal(a - b)[~mask]
    summary = (
        f"mean diagonal difference {diag.mean():+.3f}" if diag.size else "no class with positives in both"
    )
    ax.set_title(
        title
        or (
            f"Confusion difference {labels[0]} - {labels[1]}, K={k}; red = higher in "
            f"{labels[0]}, blue = higher in {labels[1]}; {summary}"
        ),
        fontsize=10,
    )
    return _save(fig, out, dpi)


def plot_diagonal(
    ms: np.ndarray,
    categories: CategorySpace,
    out: str | Path,
    *,
    title: str | None = None,
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
    mask = _as_mask(empty, k)
    count = np.array(categories.image_count, dtype=np.float64)
    freq = np.array(categories.frequency)
    fig = _new_figure(8.0, 5.0)
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
        title
        or (
            f"Mean score vs training frequency, K={k}"
            + (f" ({left_out} classes without positives or image count left out)" if left_out else "")
        ),
        fontsize=10,
    )
    return _save(fig, out, dpi)


# ----------------------------------------------------------------------------------------------
# top confused pairs
# ----------------------------------------------------------------------------------------------
PAIR_COLUMNS = (
    "rank",
    "i",
    "j",
    "name_i",
    "name_j",
    "cat_id_i",
    "cat_id_j",
    "M_ij",
    "M_ji",
    "asymmetry",
    "frequency_i",
    "frequency_j",
    "image_count_i",
    "image_count_j",
)


def top_confused_pairs(
    cm: np.ndarray,
    categories: CategorySpace,
    n: int = 50,
    empty: np.ndarray | None = None,
) -> pd.DataFrame:
    """The `n` largest off-diagonal entries M[i, j] > 0 (ground truth i mistaken for j), as a table.

    Ordered by M[i, j] descending, ties by asymmetry M[i, j] - M[j, i] descending, then (i, j).
    Pairs are directed: (i, j) and (j, i) are separate rows. Rows i without positives are skipped.
    Columns: `PAIR_COLUMNS` (i, j contiguous indices; cat_id = LVIS category id; frequency = r/c/f).
    """
    import pandas as pd

    m = _as_matrix(cm, categories)
    k = categories.num_classes
    mask = _as_mask(empty, k)
    if n < 1:
        raise PcbkitError(f"number of pairs {n}: must be at least 1")
    off = m.copy()
    np.fill_diagonal(off, 0.0)
    off[mask, :] = 0.0
    flat = off.ravel()
    positive = np.count_nonzero(flat > 0)
    take = min(n, positive)
    if take:
        threshold = np.partition(flat, flat.size - take)[flat.size - take]
        cand = np.flatnonzero(flat >= max(threshold, np.nextafter(0.0, 1.0)))
        ci, cj = np.divmod(cand, k)
        asym = m[ci, cj] - m[cj, ci]
        keys = np.lexsort((cj, ci, -asym, -m[ci, cj]))[:take]
        ci, cj = ci[keys], cj[keys]
    else:
        ci = cj = np.zeros(0, dtype=np.int64)
    names = np.array(categories.names, dtype=object)
    ids = np.array(categories.ids, dtype=np.int64)
    freq = np.array(categories.frequency, dtype=object)
    count = np.array(categories.image_count, dtype=np.int64)
    table = pd.DataFrame(
        {
            "rank": np.arange(1, ci.size + 1, dtype=np.int64),
            "i": ci.astype(np.int64),
            "j": cj.astype(np.int64),
            "name_i": names[ci],
            "name_j": names[cj],
            "cat_id_i": ids[ci],
            "cat_id_j": ids[cj],
            "M_ij": m[ci, cj],
            "M_ji": m[cj, ci],
            "asymmetry": m[ci, cj] - m[cj, ci],
            "frequency_i": freq[ci],
            "frequency_j": freq[cj],
            "image_count_i": count[ci],
            "image_count_j": count[cj],
        },
        columns=list(PAIR_COLUMNS),
    )
    return table


def write_top_pairs_csv(table: pd.DataFrame, out: str | Path) -> Path:
    """Write a `top_confused_pairs` table as CSV (full float precision) atomically."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise PcbkitError(f"{out}: pairs table extension must be .csv, got {out.suffix or '(none)'!r}")
    write_text_atomic(out, table.to_csv(index=False, float_format="%.9g"))
    logger.info("wrote %s", out)
    return out
