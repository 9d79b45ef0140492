"""The sums S, n, H of one batch and what is derived from them (docs/method.md §2, §4.1).

R proposals, K foreground classes; logits [R, K+1], background = column K; labels [R] integer:
-1 ignore, 0..K-1 positive of that class, K background. p = softmax(logits[:, :K]) [R, K];
S[i, :] = sum of p over the positives of class i [K, K] float64; n[i] = their number [K] int64;
H[i, j] = class-i positives with argmax p = j [K, K] int64 (ties -> lowest index);
M = S / n row-wise (empty rows -> identity rows). Plain functions on tensors (device of the inputs,
never `.cuda()`), shared by the offline analysis (`pcb_analysis.stats.ClassStats`) and the
trainer's online matrix (`pcb_train.pcb_loss`): `check_logits_labels`, `check_finite`,
`foreground_probs`, `batch_sums`, `row_normalise`, `ema_update_`. Speed and precision notes of
`batch_sums`: docs/statistics.md §1-§2.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from pcb_analysis.errors import PcbkitError, input_error

IGNORE_LABEL = -1
ACTIVATIONS = ("softmax", "sigmoid")  # what `batch_sums` accumulates per positive
DEFAULT_CHUNK_ROWS = 2048  # [2048, 1203] float32 = 9.9 MB working buffer: cache-friendly, few Python steps


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
        raise _where(
            source, f"logits have K={k} foreground classes (+1 background), expected K={num_classes}"
        )
    if labels.numel():
        lo_t, hi_t = torch.aminmax(labels)
        lo, hi = int(lo_t), int(hi_t)
        if lo < IGNORE_LABEL or hi > k:
            bad = lo if lo < IGNORE_LABEL else hi
            raise _where(
                source,
                f"label {bad} out of range: expected -1 (ignore), 0..{k - 1} (positive) or {k} (background)",
            )
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
        raise PcbkitError(
            f"foreground_probs: logits must be [R, K+1] = [R, {k + 1}], got {list(logits.shape)}"
        )
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
    activation: str = "softmax",
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

    `activation="sigmoid"` sums the per-class sigmoids of the K foreground logits instead of their
    softmax (the EQLv2 + PCB matrix, docs/losses.md §3); everything else is the same.
    """
    if activation not in ACTIVATIONS:
        raise PcbkitError(f"batch_sums: activation must be one of {ACTIVATIONS}, got {activation!r}")
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
            raise PcbkitError(
                f"batch_sums: `out` must be float64 [K, K], int64 [K], int64 [K, K] on {dev} with K={k}"
            )
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
        if activation == "softmax":
            p = torch.softmax(z, dim=1, out=pbuf[:m])
        else:
            p = torch.sigmoid(z, out=pbuf[:m])
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

    def __init__(
        self, S: Tensor, fetch: Callable[[int, int], tuple[Tensor, Tensor]], validate: bool, source: Any
    ) -> None:
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
        touched = (self.terms > 0).nonzero().flatten()
        if touched.numel() * 4 < self.k:  # few classes (a training batch, image-ordered rows): only
            # their rows are read (the others are 0): the finiteness check and the move into S never
            # walk the whole [K, K] window, which at K = 1,203 would cost more than the batch's math
            rows = self.acc.index_select(0, touched)
            self._check(rows.sum(), self.lo, self.hi)
            self.S.index_add_(0, touched, rows.to(torch.float64))
            self.acc.index_fill_(0, touched, 0.0)
        else:
            self._check(self.acc.sum(), self.lo, self.hi)
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
        raise PcbkitError(
            f"row_normalise: S must be [K, K] and n [K], got {list(S.shape)} and {list(n.shape)}"
        )
    dtype = torch.promote_types(S.dtype, torch.float64) if S.is_floating_point() else torch.float64
    empty = n <= 0
    denom = torch.where(empty, torch.ones_like(n), n).to(dtype)
    M = S.to(dtype) / denom[:, None]
    eye = torch.eye(k, dtype=dtype, device=S.device)
    M = torch.where(empty[:, None], eye, M)
    return M, empty


def ema_update_(
    matrix: Tensor, sums: Tensor, counts: Tensor, momentum: float, *, normalize: bool = True
) -> Tensor:
    """Online EMA of docs/method.md §4.1, in place; returns `matrix`.

    For every class with counts[i] > 0 only: M[i] <- mu * M[i] + (1 - mu) * sums[i] / counts[i],
    then row i renormalised to sum 1. Rows of classes absent from the batch are untouched. From a
    zero matrix the first update of a class sets its row to that batch's mean (the renormalisation
    undoes the (1 - mu) factor). matrix [K, K] float, sums [K, K] (S_b), counts [K] (n_b, any numeric
    dtype). One host synchronisation (finding the present rows). `normalize=False` skips the row
    renormalisation (the EQLv2 + PCB matrix: rows are EMAs of mean sigmoid scores, starting at
    (1 - mu) x the first batch's mean).
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
    if normalize:
        row = new.sum(dim=1, keepdim=True)
        new = new / torch.where(row > 0, row, torch.ones_like(row))
    matrix.index_copy_(0, rows, new.to(matrix.dtype))
    return matrix
