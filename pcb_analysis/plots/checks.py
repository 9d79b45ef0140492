"""Input checks shared by the plot modules: matrix and mask shapes, figure file extensions.

`as_matrix(cm, categories)` -> float64 [K, K] (K from the category space), finite; `as_mask(empty, K)`
-> bool [K] (all False when None). A bad input raises one `PcbkitError` that says what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError

FORMATS = (".png", ".pdf")


def check_figure_path(out: str | Path) -> Path:
    """Return `out` as a Path; raise when its extension is not .png or .pdf."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise PcbkitError(f"{out}: figure extension must be .png or .pdf, got {out.suffix or '(none)'!r}")
    return out


def as_matrix(cm: object, categories: CategorySpace, what: str = "confusion matrix") -> np.ndarray:
    m = np.asarray(cm, dtype=np.float64)
    k = categories.num_classes
    if m.shape != (k, k):
        raise PcbkitError(f"{what}: shape {tuple(m.shape)} does not match the category space (K={k})")
    if not np.isfinite(m).all():
        raise PcbkitError(f"{what}: contains NaN or inf")
    return m


def as_mask(empty: object | None, k: int) -> np.ndarray:
    if empty is None:
        return np.zeros(k, dtype=bool)
    mask = np.asarray(empty, dtype=bool)
    if mask.shape != (k,):
        raise PcbkitError(f"empty-class mask: shape {tuple(mask.shape)}, expected ({k},)")
    return mask

