"""Class statistics shared by the analysis and the trainer (docs/method.md §2, §4.1).

R proposals, K foreground classes; logits [R, K+1], background = column K.
labels [R] (integer): -1 ignore, 0..K-1 positive of that class, K background.

    p = softmax(logits[:, :K])              foreground-only softmax [R, K] (background logit dropped)
    S[i, :] = sum of p over positives of class i        [K, K] float64
    n[i]    = number of positives of class i            [K]    int64
    H[i, j] = number of class-i positives with argmax_j p = j   [K, K] int64 (ties -> lowest index)
    M[i, j] = S[i, j] / n[i]   confusion matrix (row = true class, column = predicted class);
                               rows with n[i] = 0 are undefined and replaced by identity rows
    s[i]    = M[i, i]          mean score (diagonal special case of M)

Plain functions on tensors (device of the inputs, never `.cuda()`), used by both sides:
`foreground_probs`, `batch_sums` (the one implementation of the matrix math), `row_normalise`,
`ema_update_` (the trainer's online EMA, §4.1). `ClassStats` is the offline state: it accumulates
`batch_sums` shard by shard (sums are additive: merge of shards == one pass), derives M and s, and
saves/loads an `.npz` with provenance.

Speed (CPU, K = 1,203): `batch_sums` reads only the positive rows, 2,048 at a time into reused
per-thread buffers (cache-sized, no page faults), float32 softmax with `out=`, arg-max with numpy
(SIMD, ~8x torch's row argmax on CPU), `index_add_` into a float32 window that is flushed into the
float64 S every <= 64 terms per class (no dense one-hot, no [R, K, K] temporaries), and adds into
the caller's accumulators (`out=`) instead of allocating K x K sums per call. Measured on 2 shared
cores: ~0.5x the time of a read + `torch.softmax(fp16, dtype=float32)` pass and ~10x a numpy
`np.add.at` baseline (bench/stats_speed.py prints the current figures).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pcb_analysis.atomic import write_with_atomic
from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE_KIND = "pcbkit.class_stats"
IGNORE_LABEL = -1
DEFAULT_CHUNK_ROWS = 2048  # [2048, 1203] float32 = 9.9 MB working buffer: cache-friendly, few Python steps
_ARRAYS = ("S", "n", "H", "CM", "MS", "empty")


# ------------------------------------------------------------------------------ validation


def _where(source: str | Path | None, problem: str) -> PcbkitError:
    return input_error(source, problem)


def check_logits_labels(
    logits: Tensor, labels: Tensor, num_classes: int | None = None, source: str | Path | None = None
) -> int:
    """Check shapes, dtypes, K and the label range; return K. Errors name `source` (e.g. a shard)."""
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise _where(source, "logits and labels must be torch tensors")
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise _where(source, f"logits must be [R, K+1] with K >= 1, got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise _where(source, f"logits must be floating point, got {logits.dtype}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise _where(source, f"labels must be [R] = [{logits.shape[0]}], got shape {list(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise _where(source, f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != logits.device:
        raise _where(source, f"logits on {logits.device} but labels on {labels.device}")
    k = logits.shape[1] - 1
    if num_classes is not None and k != num_classes:
        raise _where(source, f"logits have K={k} foreground classes (+1 background), expected K={num_classes}")
    if labels.numel():
        lo_t, hi_t = torch.aminmax(labels)
        lo, hi = int(lo_t), int(hi_t)
        if lo < IGNORE_LABEL or hi > k:
            bad = lo if lo < IGNORE_LABEL else hi
            raise _where(source, f"label {bad} out of range: expected -1 (ignore), 0..{k - 1} (positive) or {k} (background)")
    return k


def _raise_non_finite(rows: Tensor, row_ids: Tensor | None, source: str | Path | None) -> None:
    """Locate the first row with a NaN/inf logit (slow path, only on failure) and raise."""
    bad = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten()
    if bad.numel() == 0:  # a sum overflowed (huge finite float32/float64 logits): that's allowed
        return
    r = int(bad[0])
    rid = int(row_ids[r]) if row_ids is not None else r
    cols = (~torch.isfinite(rows[r])).nonzero().flatten().tolist()
    raise _where(
        source,
        f"logits contain NaN/inf: {bad.numel()} bad row(s) in this batch, first at row {rid} "
        f"(column(s) {cols[:5]}{' ...' if len(cols) > 5 else ''})",
    )


def check_finite(logits: Tensor, source: str | Path | None = None, chunk_rows: int = 8192) -> None:
    """Raise a `PcbkitError` naming `source` and the row if any logit is NaN or +-inf.

    One `aminmax` pass per chunk (NaN propagates, no temporaries); the row is searched only on failure.
    """
    for start in range(0, logits.shape[0], chunk_rows):
        rows = logits[start : start + chunk_rows]
        if rows.numel() == 0:
            continue
        lo, hi = torch.aminmax(rows)
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            _raise_non_finite(rows, torch.arange(start, start + rows.shape[0]), source)


# ------------------------------------------------------------------------------ the math


def _work_dtype(logits: Tensor) -> torch.dtype:
    """Softmax precision: float32 for half/bfloat16/float32 logits, float64 stays float64."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def foreground_probs(logits: Tensor, num_classes: int | None = None) -> Tensor:
    """Foreground-only softmax p = softmax(logits[:, :K]) -> [R, K] (docs/method.md §1).

    Computed in float32 (float64 for float64 logits) by `torch.softmax` (max-subtracted, stable),
    exactly the p that `batch_sums` accumulates; a new tensor.
    """
    k = logits.shape[1] - 1 if num_classes is None else num_classes
    if logits.dim() != 2 or logits.shape[1] != k + 1:
        raise PcbkitError(f"foreground_probs: logits must be [R, K+1] = [R, {k + 1}], got {list(logits.shape)}")
    return torch.softmax(logits[:, :k].to(_work_dtype(logits)), dim=1)


class BatchSums(NamedTuple):
    """Sums of one batch: S [K, K] float64, n [K] int64, H [K, K] int64 (unpacks as a 3-tuple)."""

    S: Tensor
    n: Tensor
    H: Tensor


_scratch = threading.local()  # per-thread reusable CPU buffers (no page faults, no re-zeroing per call)


def _cpu_buffer(name: str, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """A reusable [rows, cols] CPU buffer (contents undefined), grown on demand."""
    bufs: dict[tuple[str, torch.dtype], Tensor] = _scratch.__dict__.setdefault("bufs", {})
    t = bufs.get((name, dtype))
    if t is None or t.shape[0] < rows or t.shape[1] != cols:
        t = torch.empty(rows, cols, dtype=dtype)
        bufs[(name, dtype)] = t
    return t[:rows]


def _zero_sums(k: int, device: torch.device) -> BatchSums:
    return BatchSums(
        torch.zeros(k, k, dtype=torch.float64, device=device),
        torch.zeros(k, dtype=torch.int64, device=device),
        torch.zeros(k, k, dtype=torch.int64, device=device),
    )


def batch_sums(
    logits: Tensor,
    labels: Tensor,
    num_classes: int | None = None,
    *,
    out: BatchSums | tuple[Tensor, Tensor, Tensor] | None = None,
    source: str | Path | None = None,
    validate: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> BatchSums:
    """S_b, n_b, H_b of one batch (docs/method.md §2): positives only, on the device of `logits`.

    logits [R, K+1] any float dtype (half/bfloat16 upcast to float32 per chunk), labels [R] integer
    in {-1, 0..K-1, K}. Returns new zero-based sums, or adds into `out` = (S [K, K] float64,
    n [K] int64, H [K, K] int64, on the device of `logits`) in place and returns it: the
    accumulator form avoids allocating three K x K tensors per call (at K = 1,203 that costs more
    than the math of a few thousand rows).

    Only the positive rows are read, `chunk_rows` at a time (bounded extra memory for any R).
    `validate` checks shapes, K and the label range, and rejects a NaN or +inf foreground logit or
    a non-finite background logit in the rows read (a `PcbkitError` naming `source` and the row).
    A -inf foreground logit is a probability of exactly 0 and passes here (`check_finite` rejects
    it; `ClassStats.update` runs that too). On error, `out` may hold part of the batch.

    Precision: p in float32 (float64 logits: float64), S in float64. On CPU, p is first added into
    a float32 [K, K] window that is flushed into S before any class exceeds `_WINDOW_TERMS` = 64
    terms (relative rounding of a partial sum <= 64 * 2^-24 ~ 4e-6, typically ~5e-7), and a class
    with more rows than that in one chunk is cascade-summed over its rows: converting every p to
    float64 for `index_add_` would cost as much as the softmax. On other devices (GPU) p is added
    in float64 directly.
    """
    if validate:
        k = check_logits_labels(logits, labels, num_classes, source)
    else:
        k = logits.shape[1] - 1 if num_classes is None else num_classes
    dev = logits.device
    if out is None:
        sums = _zero_sums(k, dev)
    else:
        sums = BatchSums(*out)
        if (
            sums.S.shape != (k, k) or sums.n.shape != (k,) or sums.H.shape != (k, k)
            or sums.S.dtype != torch.float64 or sums.n.dtype != torch.int64 or sums.H.dtype != torch.int64
            or not (sums.S.device == sums.n.device == sums.H.device == dev)
        ):
            raise PcbkitError(f"batch_sums: `out` must be float64 [K, K], int64 [K], int64 [K, K] on {dev} with K={k}")
    S, n = sums.S, sums.n
    H = sums.H.view(k * k)
    labels = labels.to(torch.int64)
    pos = (labels >= 0) & (labels < k)
    n_pos = int(pos.sum())
    if n_pos == 0:
        return sums
    all_pos = n_pos == labels.shape[0]
    idx = None if all_pos else pos.nonzero().flatten()
    lab = labels if idx is None else labels.index_select(0, idx)
    n += torch.bincount(lab, minlength=k)

    c = min(max(1, int(chunk_rows)), n_pos)
    work = _work_dtype(logits)
    on_cpu = dev.type == "cpu"

    def fetch(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Positive rows lo..hi-1 and their row numbers in `logits` (for error messages)."""
        if idx is None:
            return logits[lo:hi], torch.arange(lo, hi)
        return logits.index_select(0, idx[lo:hi]), idx[lo:hi].cpu()

    if on_cpu:
        zbuf = _cpu_buffer("z", c, k, work)
        pbuf = _cpu_buffer("p", c, k, work)
        rowbuf = None if idx is None else _cpu_buffer("rows", c, k + 1, logits.dtype)
    else:
        zbuf = torch.empty(c, k, dtype=work, device=dev)
        pbuf = torch.empty(c, k, dtype=work, device=dev)
        rowbuf = None if idx is None else torch.empty(c, k + 1, dtype=logits.dtype, device=dev)
    window = _Window(S, fetch, validate, source) if on_cpu and work == torch.float32 else None

    for start in range(0, n_pos, c):
        m = min(c, n_pos - start)
        lab_c = lab[start : start + m]
        if idx is None:
            rows = logits[start : start + m]
        else:
            assert rowbuf is not None
            rows = torch.index_select(logits, 0, idx[start : start + m], out=rowbuf[:m])
        if validate and not bool(torch.isfinite(rows[:, k].sum(dtype=work))):
            _raise_non_finite(rows[:, k : k + 1], fetch(start, start + m)[1], source)
        z = zbuf[:m]
        z.copy_(rows[:, :k])
        p = torch.softmax(z, dim=1, out=pbuf[:m])
        # H: arg-max over p (ties -> lowest index); numpy's SIMD argmax is ~8x torch's on CPU
        am = torch.from_numpy(p.numpy().argmax(axis=1)) if on_cpu else p.argmax(dim=1)
        H.index_add_(0, lab_c * k + am, torch.ones_like(am))
        if window is None:
            if validate and not bool(torch.isfinite(p.sum())):
                _raise_non_finite(rows[:, :k], fetch(start, start + m)[1], source)
            S.index_add_(0, lab_c, p.to(torch.float64))
        else:
            window.add(lab_c, p, start)
    if window is not None:
        window.close()
    return sums


_WINDOW_TERMS = 64  # at most this many float32 index_add terms per class before a flush into float64


class _Window:
    """CPU helper of `batch_sums`: a float32 [K, K] accumulator flushed into the float64 S.

    Positive rows [lo, hi) are in the window; a NaN found at flush time (one `isfinite` of the
    window instead of one per chunk) is traced back to its row through `fetch(lo, hi) -> (rows,
    row_ids)`. A chunk with more than `_WINDOW_TERMS` rows of one class goes to S in float64 directly.
    """

    def __init__(self, S: Tensor, fetch: Callable[[int, int], tuple[Tensor, Tensor]], validate: bool, source: Any) -> None:
        self.S = S
        self.k = S.shape[0]
        self.fetch = fetch
        self.validate = validate
        self.source = source
        # a cached all-zero float32 [K, K] buffer, taken out of the cache while in use and given
        # back (all-zero again) by `close`: an error leaves it out, so a dirty buffer is never reused
        bufs: dict[tuple[str, torch.dtype], Tensor] = _scratch.__dict__.setdefault("bufs", {})
        acc = bufs.pop(("acc", torch.float32), None)
        self.acc = acc if acc is not None and acc.shape == (self.k, self.k) else torch.zeros(self.k, self.k)
        self.terms = torch.zeros(self.k, dtype=torch.int64)
        self.lo = self.hi = 0

    def _check(self, total: Tensor, lo: int, hi: int) -> None:
        if self.validate and not bool(torch.isfinite(total)):
            rows, ids = self.fetch(lo, hi)
            _raise_non_finite(rows[:, : self.k], ids, self.source)

    def add(self, lab: Tensor, p: Tensor, start: int) -> None:
        m = lab.shape[0]
        cnt = torch.bincount(lab, minlength=self.k)
        if int(cnt.max()) > _WINDOW_TERMS:
            # classes with many rows in this chunk (image-ordered dumps): a float32 sum over their
            # rows (torch's cascade summation, error ~log2(rows) * 2^-24), added to S in float64
            heavy = cnt > _WINDOW_TERMS
            heavy_row = heavy[lab]
            for c in heavy.nonzero().flatten().tolist():
                part = p[lab == c].sum(dim=0)
                self._check(part.sum(), start, start + m)
                self.S[c] += part.to(torch.float64)
            light = ~heavy_row
            lab, p = lab[light], p[light]
            cnt = cnt.masked_fill(heavy, 0)
            if lab.numel() == 0:
                return
        if self.hi > self.lo and int((self.terms + cnt).max()) > _WINDOW_TERMS:
            self.flush()
        if self.hi == self.lo:
            self.lo = start
        self.acc.index_add_(0, lab, p)
        self.terms += cnt
        self.hi = start + m

    def flush(self) -> None:
        if self.hi == self.lo:
            return
        self._check(self.acc.sum(), self.lo, self.hi)
        touched = (self.terms > 0).nonzero().flatten()
        if touched.numel() * 4 < self.k:  # few classes (e.g. image-ordered rows): move only their rows
            self.S.index_add_(0, touched, self.acc.index_select(0, touched).to(torch.float64))
            self.acc.index_fill_(0, touched, 0.0)
        else:
            self.S.add_(self.acc)
            self.acc.zero_()
        self.terms.zero_()
        self.lo = self.hi = 0

    def close(self) -> None:
        self.flush()
        _scratch.__dict__.setdefault("bufs", {})[("acc", torch.float32)] = self.acc


def row_normalise(S: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Confusion matrix from sums: M[i] = S[i] / n[i]; rows with n[i] = 0 become identity rows.

    S [K, K], n [K] -> (M [K, K] float64 (float32/other float S keeps its dtype if wider), empty [K] bool).
    No logging here (callers decide whether to warn).
    """
    k = S.shape[0]
    if S.dim() != 2 or S.shape[1] != k or n.shape != (k,):
        raise PcbkitError(f"row_normalise: S must be [K, K] and n [K], got {list(S.shape)} and {list(n.shape)}")
    dtype = torch.promote_types(S.dtype, torch.float64) if S.is_floating_point() else torch.float64
    empty = n <= 0
    denom = torch.where(empty, torch.ones_like(n), n).to(dtype)
    M = S.to(dtype) / denom[:, None]
    eye = torch.eye(k, dtype=dtype, device=S.device)
    M = torch.where(empty[:, None], eye, M)
    return M, empty


def ema_update_(matrix: Tensor, sums: Tensor, counts: Tensor, momentum: float) -> Tensor:
    """Online EMA of docs/method.md §4.1, in place; returns `matrix`.

    For every class with counts[i] > 0 only: M[i] <- mu * M[i] + (1 - mu) * sums[i] / counts[i],
    then row i renormalised to sum 1. Rows of classes absent from the batch are untouched. From a
    zero matrix the first update of a class sets its row to that batch's mean (the renormalisation
    undoes the (1 - mu) factor). matrix [K, K] float, sums [K, K] (S_b), counts [K] (n_b, any numeric
    dtype). One host synchronisation (finding the present rows).
    """
    mu = float(momentum)
    if not 0.0 <= mu < 1.0:
        raise PcbkitError(f"ema_update_: momentum must be in [0, 1), got {momentum}")
    k = matrix.shape[0]
    if matrix.shape != (k, k) or sums.shape != (k, k) or counts.shape != (k,):
        raise PcbkitError(
            f"ema_update_: expected matrix [K, K], sums [K, K], counts [K]; got {list(matrix.shape)}, "
            f"{list(sums.shape)}, {list(counts.shape)}"
        )
    # Only the rows of classes present in the batch are read and written: at LVIS size a batch
    # touches a few dozen of 1,203 rows, and a dense update costs ~10x the loss itself.
    rows = torch.nonzero(counts > 0).squeeze(1).to(matrix.device)
    if rows.numel() == 0:
        return matrix
    dtype = torch.promote_types(matrix.dtype, sums.dtype)
    old = matrix.index_select(0, rows).to(dtype)
    mean = sums.to(matrix.device).index_select(0, rows).to(dtype)
    mean = mean / counts.to(matrix.device).index_select(0, rows).to(dtype)[:, None]
    new = old * mu + mean * (1.0 - mu)
    row = new.sum(dim=1, keepdim=True)
    new = new / torch.where(row > 0, row, torch.ones_like(row))
    matrix.index_copy_(0, rows, new.to(matrix.dtype))
    return matrix


# ------------------------------------------------------------------------------ the state


@dataclass
class ClassStats:
    """Offline class statistics over a split: S [K, K] float64, n [K] int64, H [K, K] int64 (CPU).

    Provenance travels with the sums: `categories` (optional `CategorySpace`), `source` (what was
    read, e.g. a dump directory), `split` (e.g. "val"), and row counts (`rows`, `background`,
    `ignored` seen by `update`).
    """

    S: Tensor
    n: Tensor
    H: Tensor
    categories: CategorySpace | None = None
    source: str = ""
    split: str | None = None
    rows: int = 0
    background: int = 0
    ignored: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = self.S.shape[0]
        if self.S.shape != (k, k) or self.n.shape != (k,) or self.H.shape != (k, k):
            raise PcbkitError(
                f"ClassStats: S must be [K, K], n [K], H [K, K]; got {list(self.S.shape)}, "
                f"{list(self.n.shape)}, {list(self.H.shape)}"
            )
        if self.categories is not None and self.categories.num_classes != k:
            raise PcbkitError(f"ClassStats: category space has {self.categories.num_classes} classes, statistics K={k}")

    # -------------------------------------------------------------------- construction
    @classmethod
    def zeros(
        cls,
        num_classes: int,
        categories: CategorySpace | None = None,
        source: str = "",
        split: str | None = None,
    ) -> ClassStats:
        """Empty statistics for K = `num_classes`."""
        k = int(num_classes)
        if k < 1:
            raise PcbkitError(f"ClassStats.zeros: K must be >= 1, got {num_classes}")
        return cls(
            S=torch.zeros(k, k, dtype=torch.float64),
            n=torch.zeros(k, dtype=torch.int64),
            H=torch.zeros(k, k, dtype=torch.int64),
            categories=categories,
            source=source,
            split=split,
        )

    @property
    def num_classes(self) -> int:
        return int(self.S.shape[0])

    @property
    def category_hash(self) -> str | None:
        return self.categories.hash if self.categories is not None else None

    # -------------------------------------------------------------------- accumulation
    def update(
        self,
        logits: Tensor | np.ndarray,
        labels: Tensor | np.ndarray,
        source: str | None = None,
        check_finite_logits: bool = True,
    ) -> ClassStats:
        """Fold in one batch: logits [R, K+1] (background last), labels [R] in {-1, 0..K-1, K}.

        Only positives accumulate. Bad input (shape, K, label range, NaN/inf in any row) raises a
        `PcbkitError` whose message starts with `source` (e.g. the shard). A caller that has
        already verified finiteness (the dump reader does, per chunk) may pass
        `check_finite_logits=False` to skip the full scan (~10% of the time); NaN/+inf in the rows
        used are still caught by `batch_sums`. Returns self.
        """
        logits_t = torch.as_tensor(logits)
        labels_t = torch.as_tensor(labels)
        k = check_logits_labels(logits_t, labels_t, self.num_classes, source)
        bg = int((labels_t == k).sum())
        ign = int((labels_t == IGNORE_LABEL).sum())
        if check_finite_logits:  # every row, -inf included (one cheap reduction per chunk)
            check_finite(logits_t, source)
        if logits_t.device == self.S.device:
            batch_sums(logits_t, labels_t, k, out=(self.S, self.n, self.H), source=source)
        else:
            b = batch_sums(logits_t, labels_t, k, source=source)
            self.S += b.S.to(self.S.device)
            self.n += b.n.to(self.n.device)
            self.H += b.H.to(self.H.device)
        r = int(labels_t.shape[0])
        self.rows += r
        self.background += bg
        self.ignored += ign
        return self

    @staticmethod
    def merge(a: ClassStats, b: ClassStats) -> ClassStats:
        """Sum two statistics of the same category space (e.g. shards, workers): S, n, H and row counts add."""
        if a.num_classes != b.num_classes:
            raise PcbkitError(f"ClassStats.merge: K differs ({a.num_classes} vs {b.num_classes})")
        if a.categories is not None and b.categories is not None:
            a.categories.check_same(b.categories, f"ClassStats.merge ({b.source or 'second operand'})")
        if a.split == b.split or b.split is None:
            split = a.split
        elif a.split is None:
            split = b.split
        else:
            split = f"{a.split}+{b.split}"
        sources = [s for s in (a.source, b.source) if s]
        return ClassStats(
            S=a.S + b.S.to(a.S.device),
            n=a.n + b.n.to(a.n.device),
            H=a.H + b.H.to(a.H.device),
            categories=a.categories if a.categories is not None else b.categories,
            source=" + ".join(dict.fromkeys(sources)),
            split=split,
            rows=a.rows + b.rows,
            background=a.background + b.background,
            ignored=a.ignored + b.ignored,
        )

    def __add__(self, other: ClassStats) -> ClassStats:
        if not isinstance(other, ClassStats):
            return NotImplemented
        return ClassStats.merge(self, other)

    # -------------------------------------------------------------------- derived
    def empty_classes(self) -> Tensor:
        """[K] bool: classes with no positive (their confusion row is undefined)."""
        return self.n <= 0

    def confusion(self, warn: bool = True) -> Tensor:
        """Row-normalised confusion matrix M [K, K] float64; empty rows -> identity rows (one warning)."""
        M, empty = row_normalise(self.S, self.n)
        n_empty = int(empty.sum())
        if warn and n_empty:
            logger.warning(
                "%d of %d classes have no positives%s: their confusion rows are undefined and replaced by "
                "identity rows (no correction for them)",
                n_empty,
                self.num_classes,
                f" in {self.source}" if self.source else "",
            )
        return M

    def mean_score(self, warn: bool = True) -> Tensor:
        """Mean score s [K] float64: the diagonal of `confusion()` (1.0 for empty classes)."""
        return torch.diagonal(self.confusion(warn=warn)).clone()

    def hard_confusion(self) -> Tensor:
        """Row-normalised arg-max counts H[i] / n[i] [K, K] float64 (identity rows for empty classes)."""
        M, _ = row_normalise(self.H.to(torch.float64), self.n)
        return M

    def bucket_mean_scores(self) -> dict[str, float]:
        """Mean of the diagonal over non-empty classes per r/c/f bucket (needs `categories`); NaN if none."""
        if self.categories is None:
            raise PcbkitError("ClassStats.bucket_mean_scores: no category space attached")
        s = self.mean_score(warn=False)
        empty = self.empty_classes()
        out: dict[str, float] = {}
        for f in ("r", "c", "f"):
            idx = [i for i in self.categories.bucket_indices(f) if not bool(empty[i])]
            out[f] = float(s[idx].mean()) if idx else float("nan")
        return out

    # -------------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        """Provenance stored beside the arrays (JSON-serialisable)."""
        return {
            "kind": FILE_KIND,
            "schema_version": SCHEMA_VERSION,
            "num_classes": self.num_classes,
            "categories": self.categories.to_dict() if self.categories is not None else None,
            "category_hash": self.category_hash,
            "source": self.source,
            "split": self.split,
            "counts": {
                "rows": self.rows,
                "positives": int(self.n.sum()),
                "background": self.background,
                "ignored": self.ignored,
                "empty_classes": int(self.empty_classes().sum()),
            },
            "torch_version": torch.__version__,
            "extra": self.extra,
        }

    def save(self, path: str | Path) -> Path:
        """Write an `.npz` atomically: S, n, H, CM (= confusion()), MS (= mean_score()), empty, meta (JSON)."""
        path = Path(path)
        cm = self.confusion(warn=False)
        arrays = {
            "S": self.S.detach().cpu().numpy(),
            "n": self.n.detach().cpu().numpy(),
            "H": self.H.detach().cpu().numpy(),
            "CM": cm.cpu().numpy(),
            "MS": torch.diagonal(cm).cpu().numpy().copy(),
            "empty": self.empty_classes().cpu().numpy(),
            "meta": np.array(json.dumps(self.metadata())),
        }

        def _write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: numpy appends no ".npz" to the temp name
                np.savez_compressed(f, **arrays)

        write_with_atomic(path, _write)
        return path

    @classmethod
    def load(cls, path: str | Path, categories: CategorySpace | None = None) -> ClassStats:
        """Read a file written by `save`, validating it; with `categories`, refuse a different space."""
        path = Path(path)
        if not path.is_file():
            raise input_error(path, "statistics file not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [a for a in (*_ARRAYS, "meta") if a not in data.files]
                if missing:
                    raise input_error(path, f"not a pcbkit statistics file: missing array(s) {missing}")
                arrays = {a: np.asarray(data[a]) for a in ("S", "n", "H", "meta")}
        except PcbkitError:
            raise
        except Exception as err:  # zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error ...
            raise input_error(path, f"unreadable statistics file (corrupted or truncated?): {err}") from err
        try:
            meta = json.loads(str(arrays["meta"]))
        except (json.JSONDecodeError, TypeError) as err:
            raise input_error(path, f"field 'meta': not valid JSON ({err})") from err
        if not isinstance(meta, dict) or meta.get("kind") != FILE_KIND:
            raise input_error(path, f"field 'meta.kind': expected {FILE_KIND!r}, got {meta.get('kind') if isinstance(meta, dict) else meta!r}")
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise input_error(
                path, f"field 'meta.schema_version': {meta.get('schema_version')!r}, this pcbkit reads {SCHEMA_VERSION}"
            )
        S, n, H = arrays["S"], arrays["n"], arrays["H"]
        k = int(meta.get("num_classes", -1))
        if S.shape != (k, k) or n.shape != (k,) or H.shape != (k, k):
            raise input_error(
                path, f"array shapes S {S.shape}, n {n.shape}, H {H.shape} do not match K={k} in 'meta.num_classes'"
            )
        if S.dtype != np.float64 or n.dtype != np.int64 or H.dtype != np.int64:
            raise input_error(path, f"array dtypes S {S.dtype}, n {n.dtype}, H {H.dtype}; expected float64, int64, int64")
        if not np.isfinite(S).all() or (S < 0).any() or (n < 0).any() or (H < 0).any():
            raise input_error(path, "arrays S, n, H must be finite and non-negative")
        space = None
        if meta.get("categories") is not None:
            space = CategorySpace.from_dict(meta["categories"], source=path)
            if meta.get("category_hash") not in (None, space.hash):
                raise input_error(path, f"field 'meta.category_hash' {meta['category_hash']} does not match its category space")
        if categories is not None:
            if space is None:
                raise input_error(path, f"carries no category space; expected hash {categories.hash} (K={categories.num_classes})")
            categories.check_same(space, str(path))
        counts = meta.get("counts") or {}
        return cls(
            S=torch.from_numpy(S.copy()),
            n=torch.from_numpy(n.copy()),
            H=torch.from_numpy(H.copy()),
            categories=space,
            source=str(meta.get("source") or ""),
            split=meta.get("split"),
            rows=int(counts.get("rows", 0)),
            background=int(counts.get("background", 0)),
            ignored=int(counts.get("ignored", 0)),
            extra=dict(meta.get("extra") or {}),
        )
