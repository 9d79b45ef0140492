"""Inputs of post-hoc calibration, validated: confusion matrix, mean score, ridge, frequencies.

K foreground classes. A statistic is given as a `ClassStats`, a row-normalised confusion matrix
M [K, K] or a mean-score vector s [K] (ms only); everything is turned into float64 and checked
(shape against the scores' K, finite, non-negative) before any operand is built. The ridge l in
[0, 1] shrinks M toward the identity, M_l = (1 - l) M + l I (for a vector s: (1 - l) s + l, the
diagonal of M_l). The row prior a >= 0 (applied before the ridge) pulls each row toward its unit
vector by the number n_i of ground-truth instances behind it, M_i <- (n_i M_i + a e_i) / (n_i + a);
it needs a ClassStats with `instances`. Frequencies and priors [K] must be finite and
non-negative, not all zero; a zero entry is raised to the smallest positive one. Used by
`pcb_analysis.calibration` (docs/method.md §3, docs/calibration.md §1 and §6).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.errors import ApiMisuseError, PcbkitError
from pcb_analysis.stats import ClassStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatInputs:
    """What the operand builders may use: the matrix M [K, K] float64 (ridge applied), the mean
    score s [K] when only that was given, class frequencies [K] and gamma (NorCal), and the
    estimator parameters (`params`, e.g. {"lam": 0.5}) checked against the table."""

    num_classes: int
    matrix: Tensor | None = None
    score: Tensor | None = None
    freq: Tensor | None = None
    gamma: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] | None = None  # ClassStats.extra (fits stored with the statistics: ms-eq)
    ms_source: str = "diagonal"  # ms's mean score: "diagonal" of M or "loce" (K+1 softmax, fitted)


def positive_floor(x: Tensor) -> Tensor:
    """Zero entries raised to the smallest positive one (a class never seen in training); negative,
    NaN or all-zero input is refused."""
    if bool((x < 0).any()) or not bool(torch.isfinite(x).all()):
        raise PcbkitError("class frequencies / priors must be finite and non-negative")
    pos = x[x > 0]
    if pos.numel() == 0:
        raise PcbkitError("class frequencies / priors are all zero")
    return x.clamp(min=float(pos.min()))


def check_matrix(m: Tensor, k: int | None) -> Tensor:
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise PcbkitError(f"confusion matrix must be [K, K], got {list(m.shape)}")
    if k is not None and m.shape[0] != k:
        raise PcbkitError(f"confusion matrix has K={m.shape[0]}, the scores have K={k}")
    m = m.detach().to(torch.float64)
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise PcbkitError("confusion matrix must be finite and non-negative")
    worst = float((m.sum(dim=1) - 1).abs().max())
    if worst > 1e-6:  # e.g. diag(s), the mean-score approximation of M: allowed, but say so
        logger.warning("confusion matrix rows do not sum to 1 (worst off by %.3g); used as given", worst)
    return m


def check_ridge(ridge: float) -> float:
    lam = float(ridge)
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise PcbkitError(f"ridge must be in [0, 1], got {ridge}")
    return lam


def ridge_matrix(m: Tensor, ridge: float) -> Tensor:
    """M_l = (1 - l) M + l I (l in [0, 1])."""
    lam = check_ridge(ridge)
    if lam == 0.0:
        return m
    return (1.0 - lam) * m + lam * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


def row_prior_matrix(m: Tensor, instances: Tensor, a: float) -> Tensor:
    """M_i <- (n_i M_i + a e_i) / (n_i + a), n_i = instances[i] (a = 0: M unchanged; n_i = 0 and
    a > 0: the unit row e_i)."""
    if a == 0.0:
        return m
    n = instances.detach().to(torch.float64).to(m.device)[:, None]
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    return (n * m + a * eye) / (n + a)


def _row_prior(stats: ClassStats | Tensor | None, m: Tensor | None, row_prior: float) -> Tensor | None:
    try:
        a = float(row_prior)
    except (TypeError, ValueError) as err:
        raise ApiMisuseError(f"row_prior must be a number >= 0, got {row_prior!r}") from err
    if not 0.0 <= a < float("inf"):  # also rejects NaN
        raise ApiMisuseError(f"row_prior must be a finite number >= 0, got {row_prior!r}")
    if a == 0.0:
        return m
    inst = stats.instances if isinstance(stats, ClassStats) else None
    if inst is None or m is None:
        raise ApiMisuseError(
            "row_prior > 0 needs ground-truth instance counts per class: pass a ClassStats with "
            "`instances` (pcbkit stats --gt, or pcb_analysis.regime), not a bare matrix"
        )
    if tuple(inst.shape) != (m.shape[0],) or bool((torch.as_tensor(inst) < 0).any()):
        raise PcbkitError(f"ClassStats.instances must be [K] = [{m.shape[0]}] non-negative counts")
    return row_prior_matrix(m, torch.as_tensor(inst), a)


def stat_inputs(
    stats: ClassStats | Tensor | None,
    k: int | None,
    ridge: float,
    freq: Tensor | None,
    gamma: float,
    row_prior: float = 0.0,
    params: dict[str, Any] | None = None,
    ms_source: str = "diagonal",
) -> StatInputs:
    """Validate `stats` against K and turn it into operand-builder inputs (row prior, then ridge)."""
    lam = check_ridge(ridge)
    matrix = score = None
    if isinstance(stats, ClassStats):
        matrix = ridge_matrix(_row_prior(stats, check_matrix(stats.confusion(), k), row_prior), lam)
        if freq is None and stats.categories is not None and any(stats.categories.image_count):
            freq = torch.tensor(stats.categories.image_count, dtype=torch.float64)
    else:
        _row_prior(stats, None, row_prior)  # a > 0 raises: no instance counts without a ClassStats
    if isinstance(stats, ClassStats):
        pass
    elif isinstance(stats, Tensor) and stats.dim() == 1:  # a mean-score vector s [K]
        if k is not None and stats.shape[0] != k:
            raise PcbkitError(f"mean score has K={stats.shape[0]}, the scores have K={k}")
        score = stats.detach().to(torch.float64)
        if not bool(torch.isfinite(score).all()) or bool((score < 0).any()) or bool((score > 1 + 1e-6).any()):
            raise PcbkitError("mean score must be finite and in [0, 1]")
        score = (1.0 - lam) * score + lam  # the diagonal of M_l
    elif isinstance(stats, Tensor):
        matrix = ridge_matrix(check_matrix(stats, k), lam)
    elif stats is not None:
        raise PcbkitError(
            f"stats must be a ClassStats, a [K, K] matrix or a [K] mean score, got {type(stats).__name__}"
        )
    if k is None:
        k = matrix.shape[0] if matrix is not None else score.shape[0] if score is not None else 0
    if freq is not None:
        freq = torch.as_tensor(freq).detach().to(torch.float64).flatten()
        if k and freq.shape[0] != k:
            raise PcbkitError(f"freq has {freq.shape[0]} entries, K={k}")
    return StatInputs(num_classes=k, matrix=matrix, score=score, freq=freq, gamma=float(gamma),
                      params=dict(params or {}),
                      extra=stats.extra if isinstance(stats, ClassStats) else None, ms_source=ms_source)
