"""Which classes a view shows: frequency order, class references, the Figure 1 block, the head-tail slice.

Indices are contiguous class indices 0..K-1 of a `CategorySpace`; `cm` is the confusion matrix M
[K, K] (row = ground truth, column = predicted) and `empty` the bool [K] mask of classes without
positives (placeholder rows), which selections skip when they can. The "most-confused" block (the
kind of block Figure 1 shows, docs/method.md §7) maximises the asymmetric mass
A(B) = sum_{i<j in B} |M[i, j] - M[j, i]| greedily (see `select_block`).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_analysis.plots.checks import as_mask, as_matrix

logger = logging.getLogger(__name__)

SELECTIONS = ("random", "most-confused", "frequent", "rare")
Selection = Literal["random", "most-confused", "frequent", "rare"]
_BUCKET_RANK = {"f": 0, "c": 1, "r": 2}


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
    m = as_matrix(cm, categories)
    n_cls = categories.num_classes
    mask = as_mask(empty, n_cls)
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
    np.fill_diagonal(d, -1.0)  # never pick a class twice, even when M is symmetric (D = 0)
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
    m = as_matrix(cm, categories)
    mask = as_mask(empty, categories.num_classes)
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

