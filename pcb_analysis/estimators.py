"""The regularised confusion-matrix estimators of the statistics table (docs/calibration.md §6).

Each estimator is a map f(p [R, K] float64, operand) -> p~ [R, K] and an operand builder that reads
the validated `StatInputs` (matrix M [K, K] with row prior and ridge applied, its parameters in
`inp.params`) once per statistic. `cm-diagshrink` (lam) inverts M_l = diag(M) + (1 - lam) offdiag(M);
`cm-tikhonov` (tau) solves min ||x M - p||^2 + tau ||x - p D^-1||^2 in closed form, one matrix
W = (M^T + tau D^-1)(M M^T + tau I)^-1; both then clip at 0 and renormalise like `cm`. `ibu`
(k, start) runs k steps of iterative Bayesian unfolding per proposal from a uniform or `ms` start.
`ms-eq` (iterations, eta) applies a class weight w, p~ ∝ w p, that `fit_ms_eq` fits on the
positives of a dump and stores in `ClassStats.extra["ms_eq"]`; `fit_loce_score` fits LOCE's mean
score (ms_source="loce"). The frequency maps (NorCal, logit adjustment) live here too, re-exported
by `pcb_analysis.calibration`, which holds the table and applies all maps in row chunks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pcb_analysis.calibration_inputs import StatInputs, positive_floor
from pcb_analysis.class_sums import foreground_probs
from pcb_analysis.dumps import DumpReader
from pcb_analysis.errors import ApiMisuseError, PcbkitError
from pcb_analysis.stats import ClassStats

logger = logging.getLogger(__name__)

MIN_SCORE = 1e-12  # floor of a diagonal entry / mean score (only a hand-made matrix reaches 0)


def renormalise(w: Tensor, fallback: Tensor) -> Tensor:
    """Rows of w [R, K] scaled to sum 1; rows whose sum is <= 0 are replaced by `fallback`."""
    total = w.sum(dim=1, keepdim=True)
    ok = total > 0
    return torch.where(ok, w / torch.where(ok, total, torch.ones_like(total)), fallback)


def clipped_linear(p: Tensor, op: Tensor) -> Tensor:
    """p~ = clip(p W, 0) renormalised; rows where everything clips to 0 keep p (`cm`'s rule)."""
    return renormalise((p @ op).clamp_(min=0.0), p)


def raw_scale(p: Tensor, w: Tensor) -> Tensor:
    """p * w before renormalisation (`ms`, `norcal`, `ms-eq`): the foreground for background="norcal"."""
    return p * w


def raw_linear(p: Tensor, op: Tensor) -> Tensor:
    """p W before renormalisation (`cm-bayes`)."""
    return p @ op


def raw_clipped_linear(p: Tensor, op: Tensor) -> Tensor:
    """clip(p W, 0) before renormalisation (`cm`, `cm-diagshrink`, `cm-tikhonov`)."""
    return (p @ op).clamp_(min=0.0)


BACKGROUND_MODES = ("keep", "norcal")


def with_background(q: Tensor, u: Tensor, mode: str) -> Tensor:
    """q [r, K+1] and the estimator's foreground u [r, K] (p~ for "keep", the unnormalised map for
    "norcal") -> q~. keep: q~[:K] = (1 - q[K]) p~, q~[K] = q[K]. norcal: q~ ∝ ((1 - q[K]) u, q[K]),
    renormalised over K+1 (rows whose u has no mass use p)."""
    k = q.shape[1] - 1
    bg = q[:, k:]
    fg = (1.0 - bg).clamp(min=0.0) * u
    if mode == "keep":
        return torch.cat([fg, bg], dim=1)
    out = torch.cat([fg, bg], dim=1)
    return out / out.sum(dim=1, keepdim=True).clamp(min=torch.finfo(out.dtype).tiny)


def need_matrix(inp: StatInputs, stat: str) -> Tensor:
    if inp.matrix is None:
        raise PcbkitError(
            f"calibration {stat!r} needs a confusion matrix: pass a ClassStats or a [K, K] matrix"
        )
    return inp.matrix


def param(inp: StatInputs, stat: str, name: str) -> Any:
    """A required parameter of `stat` (the table lists them; `Calibrator.build` checks the names)."""
    if name not in inp.params:
        raise ApiMisuseError(f"calibration {stat!r} needs the parameter {name}= (see docs/calibration.md §6)")
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
        raise PcbkitError(
            f"{stat}: the confusion matrix is singular ({err}); use a ridge > 0 (e.g. 0.01)"
        ) from err
    if not bool(torch.isfinite(inv).all()):
        raise PcbkitError(
            f"{stat}: the inverse of the confusion matrix is not finite; use a ridge > 0 (e.g. 0.01)"
        )
    return inv


# ------------------------------------------------------------------------------ NorCal, logit adjustment


def frequency_correction(p: Tensor, weight: Tensor) -> Tensor:
    """`norcal`: p~[j] ∝ p[j] * w[j] with w = freq^-gamma (operand w [K])."""
    return renormalise(p * weight, p)


def norcal(p: Tensor, freq: Tensor, gamma: float = 1.0) -> Tensor:
    """NorCal (Pan et al., NeurIPS 2021) on foreground probabilities p [R, K]:
    p~[j] ∝ p[j] / freq[j]^gamma."""
    return frequency_correction(p.to(torch.float64), frequency_weight(freq, gamma).to(p.device))


def logit_adjust(logits: Tensor, prior: Tensor, tau: float = 1.0) -> Tensor:
    """Logit adjustment (Menon et al., ICLR 2021) of the foreground logits: z[:K] - tau * log(prior).

    logits [R, K+1] -> new [R, K+1]; the background logit is unchanged. The foreground-only softmax
    of the result equals `norcal(p, prior, gamma=tau)`; unlike `calibrate`, a softmax over all K+1
    adjusted logits also moves the background probability.
    """
    k = logits.shape[1] - 1
    if prior.shape != (k,):
        raise PcbkitError(f"logit_adjust: prior must be [K] = [{k}], got {list(prior.shape)}")
    log_prior = torch.log(positive_floor(prior.to(torch.float64))).to(logits.device)
    out = logits.to(torch.promote_types(logits.dtype, torch.float32)).clone()
    out[:, :k] -= float(tau) * log_prior.to(out.dtype)
    return out


def frequency_weight(freq: Tensor, gamma: float) -> Tensor:
    return positive_floor(freq.to(torch.float64)).pow(-float(gamma))


def norcal_operand(inp: StatInputs) -> Tensor:
    if inp.freq is None:
        raise PcbkitError("calibration 'norcal' needs class frequencies: pass freq= or a ClassStats whose "
                          "category space has training image counts")
    return frequency_weight(inp.freq, inp.gamma)


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


# ------------------------------------------------------------------------------ ms-eq

MS_EQ_KEY = "ms_eq"  # ClassStats.extra[MS_EQ_KEY]: list of {"iterations", "eta", "weights" [K]}


def _positive_chunks(source: Any, k: int, chunk_rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(logits [r, K+1] float64, y [r]) of the positives (0 <= label < K) of a dump or (logits, labels)."""
    if isinstance(source, tuple):
        logits, labels = source
        chunks: Iterable[dict[str, Tensor]] = [{"logits": logits, "labels": labels}]
    else:
        reader = source if isinstance(source, DumpReader) else DumpReader(source)
        chunks = reader.iter_chunks(rows=chunk_rows, columns=("logits", "labels"), as_torch=True)
    for chunk in chunks:
        logits = torch.as_tensor(chunk["logits"])
        if logits.dim() != 2 or logits.shape[1] != k + 1:
            raise PcbkitError(f"fit_ms_eq: logits must be [R, K+1] = [R, {k + 1}], got {list(logits.shape)}")
        y = torch.as_tensor(chunk["labels"]).long()
        pos = (y >= 0) & (y < k)
        if bool(pos.any()):
            yield logits[pos].to(torch.float64), y[pos]


def _check_counts(n: Tensor, stats: ClassStats, what: str) -> None:
    if not torch.equal(n.to(torch.int64), stats.n.to(torch.int64).cpu()):
        raise PcbkitError(f"{what}: the source's positives per class differ from the statistics' n "
                          "(fit on the dump the statistics were built from)")


def fit_ms_eq(
    source: str | Path | DumpReader | tuple[Tensor, Tensor],
    stats: ClassStats,
    iterations: int,
    eta: float,
    *,
    chunk_rows: int = 65536,
) -> Tensor:
    """Fit the `ms-eq` class weight w [K] on the positives of `source` (the dump `stats` was built
    from, or (logits [N, K+1], labels [N])) and store it in `stats.extra["ms_eq"]` (saved with it).

    w_0 = 1; each iteration: d_j = mean over class-j positives of (w p)_j / sum_k (w p)_k, and
    w_j <- w_j (mean_k d_k / d_j)^eta over the classes with positives (others keep w_j = 1). One
    pass over the positives per iteration; a class whose d_j is 0 is floored at 1e-12.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ApiMisuseError(f"fit_ms_eq: iterations must be an int >= 0, got {iterations!r}")
    eta_f = _finite_float(eta, "ms-eq", "eta", 0.0)
    k = stats.num_classes
    w = torch.ones(k, dtype=torch.float64)
    for it in range(iterations):
        d = torch.zeros(k, dtype=torch.float64)
        n = torch.zeros(k, dtype=torch.float64)
        for z, y in _positive_chunks(source, k, chunk_rows):
            p = foreground_probs(z, k)
            pw = renormalise(p * w, p)
            d.index_add_(0, y, pw.gather(1, y[:, None])[:, 0])
            n.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        _check_counts(n, stats, "fit_ms_eq")
        has = n > 0
        if not bool(has.any()):
            raise PcbkitError("fit_ms_eq: the source has no positive proposals")
        d = (d / n.clamp(min=1)).clamp(min=MIN_SCORE)
        w = torch.where(has, w * (d[has].mean() / d).pow(eta_f), w)
        logger.info("ms-eq iteration %d/%d: spread of d max/min %.3g", it + 1, iterations,
                    float(d[has].max() / d[has].min()))
    fits = [f for f in stats.extra.get(MS_EQ_KEY, []) if (f["iterations"], f["eta"]) != (iterations, eta_f)]
    stats.extra[MS_EQ_KEY] = [*fits, {"iterations": iterations, "eta": eta_f, "weights": w.tolist()}]
    return w


def ms_eq_operand(inp: StatInputs) -> Tensor:
    """The weight w [K] that `fit_ms_eq` stored for exactly these (iterations, eta)."""
    iterations, eta = param(inp, "ms-eq", "iterations"), param(inp, "ms-eq", "eta")
    fits = inp.extra.get(MS_EQ_KEY) if inp.extra is not None else None
    if fits is None:
        raise ApiMisuseError(
            "calibration 'ms-eq' needs a ClassStats fitted on its positives: call "
            "pcb_analysis.estimators.fit_ms_eq(dump, stats, iterations, eta) first"
        )
    for fit in fits:
        if fit["iterations"] == iterations and fit["eta"] == float(eta):
            w = torch.tensor(fit["weights"], dtype=torch.float64)
            if w.shape != (inp.num_classes,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise PcbkitError(
                    f"ClassStats.extra['ms_eq']: weights must be [K] = [{inp.num_classes}], finite, >= 0"
                )
            return w
    have = ", ".join(f"(iterations={f['iterations']}, eta={f['eta']})" for f in fits) or "none"
    raise ApiMisuseError(
        f"calibration 'ms-eq': no fit for iterations={iterations}, eta={eta} (fitted: {have}); call fit_ms_eq"
    )


def class_weight(p: Tensor, w: Tensor) -> Tensor:
    """p~ ∝ w * p (rows with no mass keep p)."""
    return renormalise(p * w, p)


# ------------------------------------------------------------------------------ ms_source="loce"

LOCE_KEY = "loce_score"  # ClassStats.extra[LOCE_KEY]: s [K], mean K+1-softmax score of the positives


def fit_loce_score(
    source: str | Path | DumpReader | tuple[Tensor, Tensor], stats: ClassStats, *, chunk_rows: int = 65536
) -> Tensor:
    """LOCE's mean score s_j = mean over class-j positives of softmax(z over K+1)_j (classes without
    positives: 1), from the dump `stats` was built from; stored in `stats.extra["loce_score"]`."""
    k = stats.num_classes
    total = torch.zeros(k, dtype=torch.float64)
    n = torch.zeros(k, dtype=torch.float64)
    for z, y in _positive_chunks(source, k, chunk_rows):
        q = torch.softmax(z, dim=1)
        total.index_add_(0, y, q.gather(1, y[:, None])[:, 0])
        n.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    _check_counts(n, stats, "fit_loce_score")
    s = torch.where(n > 0, total / n.clamp(min=1), torch.ones_like(total))
    stats.extra[LOCE_KEY] = s.tolist()
    return s


def loce_score(inp: StatInputs) -> Tensor:
    """The stored LOCE mean score [K], or ApiMisuseError naming `fit_loce_score`."""
    stored = inp.extra.get(LOCE_KEY) if inp.extra is not None else None
    if stored is None:
        raise ApiMisuseError(
            "ms_source='loce' needs a ClassStats carrying LOCE's mean score: call "
            "pcb_analysis.estimators.fit_loce_score(dump, stats) first"
        )
    s = torch.tensor(stored, dtype=torch.float64)
    if s.shape != (inp.num_classes,) or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise PcbkitError(f"ClassStats.extra['loce_score'] must be [K] = [{inp.num_classes}], finite, >= 0")
    return s
