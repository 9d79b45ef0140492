"""Post-hoc calibration of detector scores (docs/method.md §3, docs/calibration.md §1).

R proposals, K foreground classes. `q` [R, K+1] are probabilities (softmax over all K+1 logits,
background = column K). Calibration maps the foreground distribution p = q[:K] / sum(q[:K]) to
p~ = f(p) and keeps the background ("objectness"): q~[:K] = (1 - q[K]) p~, q~[K] = q[K].

Every statistic is ONE entry of the literal table `STATISTICS` (a `Statistic`: the map f on
float64 [R, K] rows, the builder of its operand, computed once per statistic, whether it reads the
confusion statistics, a one-line description, and how the tools offer it). Every other list of
statistic names (CLI choices, calibration rows, report order, study) is derived from the table;
a new estimator is one function, one operand builder and one table entry (the regularised
estimators' math lives in `pcb_analysis.estimators`; their parameters are keyword arguments of
`calibrate`). For every matrix statistic `row_prior` a pulls row i toward e_i by its instance
count, then `ridge` l shrinks the matrix toward I, M_l = (1 - l) M + l I.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.calibration_inputs import StatInputs, stat_inputs
from pcb_analysis.calibration_inputs import ridge_matrix as ridge_matrix  # public here since before the split
from pcb_analysis.dumps import DumpReader
from pcb_analysis.errors import ApiMisuseError, PcbkitError
from pcb_analysis.estimators import (
    BACKGROUND_MODES,
    class_weight,
    clipped_linear,
    diagshrink_operand,
    frequency_correction,
    ibu_operand,
    invert,
    iterative_unfolding,
    loce_score,
    ms_eq_operand,
    norcal_operand,
    raw_clipped_linear,
    raw_linear,
    raw_scale,
    tikhonov_operand,
    with_background,
)
from pcb_analysis.estimators import logit_adjust as logit_adjust  # public here since before the split
from pcb_analysis.estimators import need_matrix as _need_matrix
from pcb_analysis.estimators import norcal as norcal  # public here since before the split
from pcb_analysis.estimators import renormalise as _renormalise
from pcb_analysis.stats import ClassStats

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 4096  # float64 [4096, 1203] temporaries: ~40 MB each
_MIN_SCORE = 1e-12  # floor of a mean score s[j] (only a hand-made matrix can have s[j] = 0)


# ------------------------------------------------------------------------------ p -> p~


def unchanged(p: Tensor, operand: Tensor | None = None) -> Tensor:
    """`none`: p~ = p (the model's own distribution)."""
    return p


def mean_score_correction(p: Tensor, inv_score: Tensor) -> Tensor:
    """`ms`: p~[j] = (p[j] / s[j]) / sum_k (p[k] / s[k]); operand `inv_score` = 1 / s [K]."""
    return _renormalise(p * inv_score, p)


def confusion_inverse(p: Tensor, m_inv: Tensor) -> Tensor:
    """`cm`: p~ = clip(p M^-1, 0) renormalised; rows where everything clips to 0 keep p.

    Operand M^-1 [K, K]."""
    return _renormalise((p @ m_inv).clamp_(min=0.0), p)


def confusion_bayes(p: Tensor, redistribution: Tensor) -> Tensor:
    """`cm-bayes`: p~[i] = sum_j p[j] D[j, i] with D[j, i] = M[i, j] / sum_k M[k, j] (operand D [K, K])."""
    return _renormalise(p @ redistribution, p)


# ------------------------------------------------------------------------------ operands


def _no_operand(inp: StatInputs) -> None:
    return None


def _mean_score_operand(inp: StatInputs) -> Tensor:
    if inp.ms_source == "loce":
        s = loce_score(inp)
    else:
        s = inp.score if inp.score is not None else torch.diagonal(_need_matrix(inp, "ms"))
    if bool((s < _MIN_SCORE).any()):
        logger.warning("ms: %d mean score(s) below %g floored (no positive mass on the true class)",
                       int((s < _MIN_SCORE).sum()), _MIN_SCORE)
    return 1.0 / s.clamp(min=_MIN_SCORE)


def _inverse_operand(inp: StatInputs) -> Tensor:
    return invert(_need_matrix(inp, "cm"), "cm")


def _bayes_operand(inp: StatInputs) -> Tensor:
    m = _need_matrix(inp, "cm-bayes")
    col = m.sum(dim=0)  # [K]: total mass predicted as j
    empty = col <= 0
    post = m / torch.where(empty, torch.ones_like(col), col)[None, :]  # post[i, j] = P(true i | predicted j)
    if bool(empty.any()):  # no class ever predicted as j: keep its mass where it is (identity column)
        eye = torch.eye(inp.num_classes, dtype=m.dtype, device=m.device)
        post = torch.where(empty[None, :], eye, post)
    return post.t().contiguous()  # D[j, i], so that p~ = p @ D


# ------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Statistic:
    """One calibration statistic (docs/calibration.md §1).

    transform: f(p [R, K] float64, operand) -> p~ [R, K]; operand: builds f's operand once from
    `StatInputs`; needs_matrix: reads the confusion statistics (M, or its diagonal s; the ridge
    applies); row: a parameter-free row of the calibration table (`pcbkit calibrate --stat`, the
    study, the report's order); default: evaluated when `pcbkit calibrate` is given no statistic;
    label: its name in the study's tables (the paper's spelling); params: the names of its required
    keyword parameters (a statistic with parameters is not a parameter-free row); raw: the map before
    its renormalisation (background="norcal"; None: the transform's output, which sums to 1)."""

    transform: Callable[[Tensor, Any], Tensor]
    operand: Callable[[StatInputs], Tensor | None]
    needs_matrix: bool
    description: str
    row: bool = True
    default: bool = False
    label: str = ""
    params: tuple[str, ...] = ()
    raw: Callable[[Tensor, Any], Tensor] | None = None


STATISTICS: dict[str, Statistic] = {
    "none": Statistic(unchanged, _no_operand, False, "the model's own scores", default=True),
    "ms": Statistic(mean_score_correction, _mean_score_operand, True,
                    "divide by the class's mean score s = diag(M)", default=True, label="MS",
                    raw=raw_scale),
    "cm": Statistic(confusion_inverse, _inverse_operand, True,
                    "undo the confusion channel: clip(p M^-1, 0), renormalised", default=True, label="CM",
                    raw=raw_clipped_linear),
    "cm-bayes": Statistic(confusion_bayes, _bayes_operand, True,
                          "hand each predicted class's mass back by P(true | predicted)", raw=raw_linear),
    "norcal": Statistic(frequency_correction, norcal_operand, False,
                        "divide by the training frequency^gamma (NorCal; --gamma, --tau)", row=False,
                        raw=raw_scale),
    "cm-diagshrink": Statistic(clipped_linear, diagshrink_operand, True,
                               "clip(p M_lam^-1, 0), off-diagonal shrunk by (1 - lam): lam=1 ms, lam=0 cm",
                               row=False, params=("lam",), raw=raw_clipped_linear),
    "cm-tikhonov": Statistic(clipped_linear, tikhonov_operand, True,
                             "argmin ||x M - p||^2 + tau ||x - p/diag(M)||^2, clipped: tau=0 cm, tau->inf ms",
                             row=False, params=("tau",), raw=raw_clipped_linear),
    "ibu": Statistic(iterative_unfolding, ibu_operand, True,
                     "k steps of iterative Bayesian unfolding from uniform (k=1 cm-bayes) or ms (k=0 ms)",
                     row=False, params=("k", "start")),
    "ms-eq": Statistic(class_weight, ms_eq_operand, False,
                       "class weight equalising the mean renormalised score of the positives (fit_ms_eq)",
                       row=False, params=("iterations", "eta"), raw=raw_scale),
}
"""Statistic name -> `Statistic`, in the report's order. The one list of calibration statistics."""

CALIBRATORS: dict[str, Callable[[Tensor, Any], Tensor]] = {n: s.transform for n, s in STATISTICS.items()}
"""stat name -> f(p [R, K] float64, operand) -> p~ [R, K]."""
OPERANDS: dict[str, Callable[[StatInputs], Tensor | None]] = {n: s.operand for n, s in STATISTICS.items()}
"""stat name -> builder of the operand its `CALIBRATORS` function takes (computed once)."""
ROW_STATISTICS: tuple[str, ...] = tuple(n for n, s in STATISTICS.items() if s.row)
"""Parameter-free rows, in report order: `--stat` choices, the study's statistics."""
DEFAULT_STATISTICS: tuple[str, ...] = tuple(n for n, s in STATISTICS.items() if s.default)
MATRIX_STATISTICS: tuple[str, ...] = tuple(n for n, s in STATISTICS.items() if s.needs_matrix)


def table_label(stat: str) -> str:
    """A statistic's name in the study's tables ("CM", "MS", ...); unknown names as they are."""
    entry = STATISTICS.get(stat)
    return entry.label or stat if entry is not None else stat


# ------------------------------------------------------------------------------ application


@dataclass(frozen=True)
class Calibrator:
    """One statistic with its operand prepared once: `cal(q)` -> q~, `cal.from_logits(z)` -> q~."""

    stat: str
    num_classes: int
    operand: Any  # a Tensor, None, or an object with .to(device) (ibu)
    params: tuple[tuple[str, Any], ...] = ()  # the estimator's parameters (provenance), sorted
    background: str = "keep"  # "keep" (q~[K] = q[K]) or "norcal" (renormalised over K+1)

    @classmethod
    def build(
        cls,
        stat: str,
        stats: ClassStats | Tensor | None = None,
        ridge: float = 0.0,
        *,
        num_classes: int | None = None,
        freq: Tensor | None = None,
        gamma: float = 1.0,
        row_prior: float = 0.0,
        background: str = "keep",
        ms_source: str = "diagonal",
        **params: Any,
    ) -> Calibrator:
        """Prepare `stat` from `stats` (a ClassStats, a row-normalised M [K, K], or a mean score s [K]).

        `freq` (NorCal) defaults to the training image counts of `stats.categories`; `row_prior` needs
        a ClassStats with `instances`; `params` are the statistic's own (e.g. lam=0.5 for cm-diagshrink).
        """
        if stat not in STATISTICS:
            raise PcbkitError(
                f"unknown calibration statistic {stat!r}; choose one of {', '.join(STATISTICS)}"
            )
        if background not in BACKGROUND_MODES:
            raise ApiMisuseError(f"background must be 'keep' or 'norcal', got {background!r}")
        if ms_source not in ("diagonal", "loce") or (ms_source == "loce" and stat != "ms"):
            raise ApiMisuseError(
                f"ms_source must be 'diagonal' or 'loce' (ms only), got {ms_source!r} for {stat!r}"
            )
        wanted = STATISTICS[stat].params
        unknown = sorted(set(params) - set(wanted))
        missing = [n for n in wanted if n not in params]
        if unknown or missing:
            raise ApiMisuseError(
                f"calibration {stat!r} takes the parameters ({', '.join(wanted) or 'none'}); "
                + (f"unknown: {', '.join(unknown)}" if unknown else f"missing: {', '.join(missing)}")
            )
        inp = stat_inputs(stats, num_classes, ridge, freq, gamma, row_prior, params, ms_source)
        k = num_classes if num_classes is not None else inp.num_classes
        if stat != "none" and not k:
            raise PcbkitError(f"calibration {stat!r} needs statistics (stats=...)")
        return cls(stat=stat, num_classes=int(k), operand=STATISTICS[stat].operand(inp),
                   params=tuple(sorted(params.items())), background=background)

    def to(self, device: torch.device | str) -> Calibrator:
        """A copy whose operand lives on `device` (move once, then calibrate many batches there)."""
        op = self.operand.to(device) if self.operand is not None else None
        return Calibrator(self.stat, self.num_classes, op, self.params, self.background)

    def foreground(self, p: Tensor) -> Tensor:
        """f(p): p [R, K] foreground distributions -> p~ [R, K] float64 (no chunking)."""
        op = self.operand.to(p.device) if self.operand is not None else None
        return STATISTICS[self.stat].transform(p.to(torch.float64), op)

    def _apply(self, q: Tensor) -> Tensor:
        """One chunk: q [r, K+1] (any float dtype) -> q~ [r, K+1] float64."""
        q = q.to(torch.float64)
        k = q.shape[1] - 1
        fg = q[:, :k]
        mass = fg.sum(dim=1, keepdim=True)
        has = mass > 0
        uniform = torch.full_like(fg, 1.0 / k)
        # q[K] = 1 (no foreground mass): uniform p
        p = torch.where(has, fg / torch.where(has, mass, torch.ones_like(mass)), uniform)
        raw = STATISTICS[self.stat].raw
        if self.background == "keep" or raw is None:
            return with_background(q, self.foreground(p), self.background)
        op = self.operand.to(p.device) if self.operand is not None else None
        u = raw(p, op)
        return with_background(q, torch.where(u.sum(dim=1, keepdim=True) > 0, u, p), self.background)

    def __call__(self, q: Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
        """q [R, K+1] probabilities (background last) -> q~ [R, K+1] (float32, float64 for float64 q)."""
        k = _check_scores(q, self.num_classes, "q")
        lo, hi = torch.aminmax(q) if q.numel() else (torch.zeros(()), torch.zeros(()))
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise PcbkitError("calibrate: q contains NaN/inf")
        if float(lo) < -1e-6 or float(hi) > 1 + 1e-6:
            raise PcbkitError(
                f"calibrate: q must be probabilities in [0, 1] (softmax over K+1={k + 1}); "
                f"got values in [{float(lo):.3g}, {float(hi):.3g}] (pass logits to from_logits)"
            )
        out = torch.empty(q.shape, dtype=_out_dtype(q), device=q.device)
        for start in range(0, q.shape[0], max(1, int(chunk_rows))):
            out[start : start + chunk_rows] = self._apply(q[start : start + chunk_rows])
        return out

    def from_logits(self, logits: Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
        """logits [R, K+1] (background last) -> q~ [R, K+1]: softmax over K+1, then calibration,
        in chunks."""
        _check_scores(logits, self.num_classes, "logits")
        out = torch.empty(logits.shape, dtype=_out_dtype(logits), device=logits.device)
        for start in range(0, logits.shape[0], max(1, int(chunk_rows))):
            z = logits[start : start + chunk_rows].to(torch.float64)
            if not bool(torch.isfinite(z).all()):
                bad = start + int((~torch.isfinite(z)).any(dim=1).nonzero()[0])
                raise PcbkitError(f"calibrate: logits contain NaN/inf (first at row {bad})")
            out[start : start + chunk_rows] = self._apply(torch.softmax(z, dim=1))
        return out


def _out_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_scores(t: Tensor, k: int, what: str) -> int:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] < 2 or not t.is_floating_point():
        shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise PcbkitError(f"calibrate: {what} must be a float tensor [R, K+1] with K >= 1, got {shape}")
    if k and t.shape[1] != k + 1:
        raise PcbkitError(
            f"calibrate: {what} have K={t.shape[1] - 1} foreground classes, the statistics K={k}"
        )
    return t.shape[1] - 1


def calibrate(
    q: Tensor,
    stat: str,
    stats: ClassStats | Tensor | None = None,
    ridge: float = 0.0,
    *,
    freq: Tensor | None = None,
    gamma: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    row_prior: float = 0.0,
    background: str = "keep",
    ms_source: str = "diagonal",
    **params: Any,
) -> Tensor:
    """Calibrate probabilities q [R, K+1] (softmax over K+1, background last) -> q~ [R, K+1].

    stat a key of `STATISTICS` ("none", "ms", "cm", "cm-bayes", "norcal", "cm-diagshrink" (lam=),
    "cm-tikhonov" (tau=), "ibu" (k=, start=)); `stats` a ClassStats, a row-normalised confusion
    matrix [K, K] or (for "ms") a mean score [K]; `row_prior` a pulls each row toward I by its
    instance count (ClassStats with `instances` only), then `ridge` shrinks the matrix toward I.
    `background="norcal"` renormalises the unnormalised foreground map with q[K] over K+1 instead
    (docs/calibration.md §6); by default the background column is returned unchanged. Rows sum to
    1. For many batches with one statistic build a `Calibrator` once instead (one matrix inverse).
    """
    cal = Calibrator.build(stat, stats, ridge, num_classes=q.shape[1] - 1 if q.dim() == 2 else None,
                           freq=freq, gamma=gamma, row_prior=row_prior,
                           background=background, ms_source=ms_source, **params)
    return cal(q, chunk_rows=chunk_rows)


def calibrate_logits(
    logits: Tensor,
    stat: str,
    stats: ClassStats | Tensor | None = None,
    ridge: float = 0.0,
    *,
    freq: Tensor | None = None,
    gamma: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    row_prior: float = 0.0,
    background: str = "keep",
    ms_source: str = "diagonal",
    **params: Any,
) -> Tensor:
    """`calibrate` on raw logits [R, K+1] (e.g. a dump's): softmax over K+1 per chunk, then calibration."""
    cal = Calibrator.build(stat, stats, ridge, num_classes=logits.shape[1] - 1 if logits.dim() == 2 else None,
                           freq=freq, gamma=gamma, row_prior=row_prior,
                           background=background, ms_source=ms_source, **params)
    return cal.from_logits(logits, chunk_rows=chunk_rows)


# ------------------------------------------------------------------------------ offline, on dumps


def calibrate_dump(
    dump: str | Path | DumpReader,
    calibrators: dict[str, Calibrator],
    *,
    columns: tuple[str, ...] = ("image_ids", "labels"),
    chunk_rows: int = 8192,
) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """Stream a logit dump and calibrate every chunk with each calibrator (no model needed).

    Yields `(chunk, {name: q~ [r, K+1] float32})` per chunk of the dump; `chunk` holds `columns`
    plus `logits` (torch tensors). Memory is bounded by the chunk size, whatever the dump size.
    """
    reader = dump if isinstance(dump, DumpReader) else DumpReader(dump)
    for name, cal in calibrators.items():
        if cal.num_classes and cal.num_classes != reader.num_classes:
            raise PcbkitError(
                f"{reader.dump_dir}: dump has K={reader.num_classes} classes, "
                f"calibrator {name!r} K={cal.num_classes}"
            )
    wanted = tuple(dict.fromkeys((*columns, "logits")))
    for chunk in reader.iter_chunks(rows=chunk_rows, columns=wanted, as_torch=True):
        logits = chunk["logits"].float()
        yield chunk, {name: cal.from_logits(logits) for name, cal in calibrators.items()}


def positive_accuracy(
    dump: str | Path | DumpReader,
    calibrators: dict[str, Calibrator],
    frequency: tuple[str, ...] | None = None,
) -> dict[str, dict[str, float]]:
    """Top-1 accuracy of the foreground arg-max on a dump's positive proposals, per calibrator.

    Returns {name: {"all": acc, "r": acc, "c": acc, "f": acc}} (buckets from `frequency`, the r/c/f
    label of each class, or from the dump's category space); accuracy is averaged over classes
    (each class with positives weighs the same), the balanced view that APr/APc/APf also take.
    """
    reader = dump if isinstance(dump, DumpReader) else DumpReader(dump)
    k = reader.num_classes
    freq = frequency if frequency is not None else reader.categories.frequency
    hits = {name: torch.zeros(k, dtype=torch.float64) for name in calibrators}
    seen = torch.zeros(k, dtype=torch.float64)
    for chunk, out in calibrate_dump(reader, calibrators, columns=("labels",)):
        labels = chunk["labels"].long()
        pos = (labels >= 0) & (labels < k)
        if not bool(pos.any()):
            continue
        y = labels[pos]
        seen.index_add_(0, y, torch.ones(y.shape[0], dtype=torch.float64))
        for name, q in out.items():
            pred = q[pos][:, :k].argmax(dim=1)
            hits[name].index_add_(0, y, (pred == y).to(torch.float64))
    result: dict[str, dict[str, float]] = {}
    has = seen > 0
    for name in calibrators:
        acc = torch.where(has, hits[name] / seen.clamp(min=1), torch.zeros_like(seen))
        row = {"all": float(acc[has].mean()) if bool(has.any()) else float("nan")}
        for b in ("r", "c", "f"):
            idx = torch.tensor([i for i in range(k) if freq[i] == b], dtype=torch.long)
            sel = idx[has[idx]] if idx.numel() else idx
            row[b] = float(acc[sel].mean()) if sel.numel() else float("nan")
        result[name] = row
    return result
