"""The most confused class pairs of a confusion matrix, as a table and a CSV file.

`top_confused_pairs(cm, categories, n)` -> pandas DataFrame with columns `PAIR_COLUMNS`, one row per
directed pair (i, j), i != j, M[i, j] > 0 (ground truth i mistaken for j): i, j contiguous indices,
cat_id = LVIS category id, frequency = r/c/f, image_count = training images. Rows of classes without
positives (`empty`) are skipped. `write_top_pairs_csv` writes it atomically at full float precision.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pcb_analysis.atomic import write_text_atomic
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError
from pcb_analysis.plots.checks import as_mask, as_matrix

logger = logging.getLogger(__name__)

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
    m = as_matrix(cm, categories)
    k = categories.num_classes
    mask = as_mask(empty, k)
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
