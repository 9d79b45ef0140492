"""The regularised confusion-matrix estimators of the statistics table (docs/calibration.md §4).

Each estimator is a map f(p [R, K] float64, operand) -> p~ [R, K] and an operand builder that reads
the validated `StatInputs` (matrix M [K, K] with row prior and ridge applied, its parameters in
`inp.params`) once per statistic. `cm-diagshrink` (lam) inverts M_l = diag(M) + (1 - lam) offdiag(M);
`cm-tikhonov` (tau) solves min ||x M - p||^2 + tau ||x - p D^-1||^2 in closed form, one matrix
W = (M^T + tau D^-1)(M M^T + tau I)^-1; both then clip at 0 and renormalise like `cm`. `ibu`
(k, start) runs k steps of iterative Bayesian unfolding per proposal from a uniform or `ms` start.
`pcb_analysis.calibration` holds the table and applies these in row chunks, keeping the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.calibration_inputs import StatInputs
from pcb_analysis.errors import ApiMisuseError, PcbkitError

MIN_SCORE = 1e-12  # floor of a diagonal entry / mean score (only a hand-made matrix reaches 0)


def renormalise(w: Tensor, fallback: Tensor) -> Tensor:
    """Rows of w [R, K] scaled to sum 1; rows whose sum is <= 0 are replaced by `fallback`."""
    total = w.sum(dim=1, keepdim=True)
    ok = total > 0
    return torch.where(ok, w / torch.where(ok, total, torch.ones_like(total)), fallback)


def clipped_linear(p: Tensor, op: Tensor) -> Tensor:
    """p~ = clip(p W, 0) renormalised; rows where everything clips to 0 keep p (`cm`'s rule)."""
    return renormalise((p @ op).clamp_(min=0.0), p)


def need_matrix(inp: StatInputs, stat: str) -> Tensor:
    if inp.matrix is None:
        raise PcbkitError(
            f"calibration {stat!r} needs a confusion matrix: pass a ClassStats or a [K, K] matrix"
        )
    return inp.matrix


def param(inp: StatInputs, stat: str, name: str) -> Any:
    """A required parameter of `stat` (the table lists them; `Calibrator.build` checks the names)."""
    if name not in inp.params:
        raise ApiMisuseError(f"calibration {stat!r} needs the parameter {name}= (see docs/calibration.md §4)")
    return inp.params[name]


def _finite_float(value: Any, stat: str, name: str, lo: float, hi: float = math.inf) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError) as err:
        raise ApiMisuseError(f"calibration {stat!r}: {name} must be a number, got {value!r}") from err
    if not lo <= x <= hi:  # also rejects NaN
        raise ApiMisuseError(f"calibration {stat!r}: {name} must be in [{lo}, {hi}], got {value!r}")
    return x


def invert(m: Tensor, stat: str) -> Tensor:
    """M^-1, or a one-line PcbkitError when M is singular / the inverse is not finite."""
    try:
        inv = torch.linalg.inv(m)
    except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
        raise PcbkitError(f"{stat}: the matrix is singular ({err}); use a ridge > 0 (e.g. 0.01)") from err
    if not bool(torch.isfinite(inv).all()):
        raise PcbkitError(f"{stat}: the inverse of the matrix is not finite; use a ridge > 0 (e.g. 0.01)")
    return inv


# ------------------------------------------------------------------------------ cm-diagshrink


def diagshrink_matrix(m: Tensor, lam: float) -> Tensor:
    """M_l = diag(M) + (1 - lam) offdiag(M): lam = 0 is M, lam = 1 its diagonal (the `ms` matrix)."""
    diag = torch.diag(torch.diagonal(m))
    return diag + (1.0 - lam) * (m - diag)


def diagshrink_operand(inp: StatInputs) -> Tensor:
    lam = _finite_float(param(inp, "cm-diagshrink", "lam"), "cm-diagshrink", "lam", 0.0, 1.0)
    m = diagshrink_matrix(need_matrix(inp, "cm-diagshrink"), lam)
    if lam == 1.0:  # exactly diag(1 / s), floored like `ms`
        return torch.diag(1.0 / torch.diagonal(m).clamp(min=MIN_SCORE))
    return invert(m, "cm-diagshrink")


# ------------------------------------------------------------------------------ cm-tikhonov


def tikhonov_matrix(m: Tensor, tau: float) -> Tensor:
    """W with argmin_x ||x M - p||^2 + tau ||x - p D^-1||^2 = p W, D = diag(M) (floored).

    Setting the gradient 2 (x M - p) M^T + 2 tau (x - p D^-1) to 0 gives
    x (M M^T + tau I) = p (M^T + tau D^-1), so W = (M^T + tau D^-1)(M M^T + tau I)^-1 (tau = 0 and an
    invertible M: W = M^-1; tau -> inf: W -> D^-1)."""
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    d_inv = torch.diag(1.0 / torch.diagonal(m).clamp(min=MIN_SCORE))
    gram = m @ m.t() + tau * eye  # symmetric positive definite for tau > 0
    rhs = m.t() + tau * d_inv
    # W gram = rhs  <=>  gram W^T = rhs^T (gram symmetric)
    return torch.linalg.solve(gram, rhs.t()).t()


def tikhonov_operand(inp: StatInputs) -> Tensor:
    tau = _finite_float(param(inp, "cm-tikhonov", "tau"), "cm-tikhonov", "tau", 0.0)
    m = need_matrix(inp, "cm-tikhonov")
    if tau == 0.0:
        return invert(m, "cm-tikhonov")
    w = tikhonov_matrix(m, tau)
    if not bool(torch.isfinite(w).all()):
        raise PcbkitError("cm-tikhonov: the solution is not finite; use a larger tau or a ridge > 0")
    return w


# ------------------------------------------------------------------------------ ibu


@dataclass(frozen=True)
class IbuOperand:
    """M [K, K], 1 / efficiency (1 / row sums of M; all 1 for a row-stochastic M), the start
    (`inv_score` 1 / s for start "ms", None for uniform), k iterations."""

    matrix: Tensor
    inv_efficiency: Tensor
    inv_score: Tensor | None
    iterations: int

    def to(self, device: torch.device | str) -> IbuOperand:
        inv = self.inv_score.to(device) if self.inv_score is not None else None
        return IbuOperand(self.matrix.to(device), self.inv_efficiency.to(device), inv, self.iterations)


def ibu_operand(inp: StatInputs) -> IbuOperand:
    k = param(inp, "ibu", "k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ApiMisuseError(f"calibration 'ibu': k must be an int >= 0, got {k!r}")
    start = param(inp, "ibu", "start")
    if start not in ("uniform", "ms"):
        raise ApiMisuseError(f"calibration 'ibu': start must be 'uniform' or 'ms', got {start!r}")
    m = need_matrix(inp, "ibu")
    inv = 1.0 / torch.diagonal(m).clamp(min=MIN_SCORE) if start == "ms" else None
    return IbuOperand(m, 1.0 / m.sum(dim=1).clamp(min=MIN_SCORE), inv, k)


def iterative_unfolding(p: Tensor, op: IbuOperand) -> Tensor:
    """`ibu`: x <- x * ((p / (x M)) M^T) / e, renormalised, `op.iterations` times from x_0 = uniform
    or ms(p); e = row sums of M (D'Agostini's efficiency: 1 for every row-stochastic M, where this is
    exactly the issue's update). A predicted class j with (x M)_j = 0 passes no mass back (its ratio
    is 0); a row whose mass vanishes keeps p."""
    x = torch.full_like(p, 1.0 / p.shape[1]) if op.inv_score is None else renormalise(p * op.inv_score, p)
    m = op.matrix
    for _ in range(op.iterations):
        folded = x @ m  # [R, K]: what x would look like through the channel
        ok = folded > 0
        ratio = torch.where(ok, p / torch.where(ok, folded, torch.ones_like(folded)), torch.zeros_like(p))
        x = renormalise(x * (ratio @ m.t()) * op.inv_efficiency, p)
    return x
