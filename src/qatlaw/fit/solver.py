"""The solver every law of :mod:`qatlaw.fit` is fitted with, and why its result is a property of the data
rather than of the machine:

- Every law minimizes the summed Huber loss of its log-space residuals log(predicted) − log(observed).
- **δ laws** (unified, no_D, epm) are fitted to the QAT loss as the paper's law writes it, L_QAT = L_BF16 + δ̂:
  the residual of a run is log(L_BF16 + δ̂) − log(L_QAT), with its own BF16 baseline's measured loss (the δ
  table's ``baseline`` column; :class:`QatLoss`). A run whose δ came out ≤ 0 has a QAT loss like any other, so
  it enters the fit; leaving it out would drop the smallest δ, which sit at the largest N, and bias γN down. δ̂
  is linear in its log parameters (log k, γ; or log(eff^−α − 1)); without a baseline column the residual is
  log δ̂ − log δ, whose objective is convex, and a δ ≤ 0 cannot enter. The Huber threshold is set from the
  data's own scale: c = 1.345 σ̂, with σ̂ = 1.4826 · median |r| · √(n / (n − p)) from the least-squares
  residuals r (at least ``MIN_THRESHOLD``). A threshold of 1e-3 on residuals of 0.1–1 (δ's seed noise at small
  scale) would make the loss almost L1, which is flat along whole segments, so its minimizer is not unique; at
  1.345 σ̂ most runs sit in the quadratic part (the usual choice: 95% efficiency for Gaussian noise, bounded
  influence for the runs far off the law).
- **Chinchilla** keeps the paper's and Hoffmann et al.'s threshold, 1e-3 on log-loss residuals. It is not
  convex: L-BFGS-B runs from a quasi-random (Halton) grid of starts with α, β ≥ 0.
- Every candidate optimum is then **polished with Newton's method** on the exact gradient and Hessian until the
  step is below 1e-12 of the parameters, so it is the optimum itself, not wherever an optimizer's tolerances
  stopped. It counts as **identified** only if the Hessian is positive definite with every Jacobi-scaled
  eigenvalue above ``MIN_CURVATURE`` (for a δ law: enough runs strictly inside the threshold, spanning every
  parameter), and, for Chinchilla, if no other local optimum comes within a relative 1e-9 of its objective.
  A law that fails this is reported as not identified (NaN constants and a warning), never as a number.
- Signs of the γ are not constrained, so a wrong-signed exponent shows that the data disagree with the law.

The solver works on parameter vectors θ; :mod:`qatlaw.fit.forms` names their constants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares, minimize
from scipy.special import expit
from scipy.stats import qmc
from threadpoolctl import ThreadpoolController

from qatlaw.errors import QatlawError

HUBER_K = 1.345  # δ laws: Huber threshold in units of the residuals' robust standard deviation
MAD_TO_SD = 1.4826  # robust standard deviation per median absolute residual (Gaussian)
MIN_THRESHOLD = 1e-6  # δ laws: the threshold never falls below this (exact data: residuals of rounding size)
NEWTON_MAXITER = 100
NEWTON_XTOL = 1e-12  # polish until the Newton step is below this share of the parameters,
NEWTON_HALVINGS = 40  # or until no step halved up to this many times decreases the objective
KINK_RTOL = 1e-8  # a residual this close (relative) to the Huber threshold counts as on its edge
MIN_CURVATURE = 1e-10  # smallest Jacobi-scaled Hessian eigenvalue of an identified optimum
TIE_RTOL = 1e-9  # two distinct local optima this close in objective leave the law not identified
BOOT_STARTS = 4  # the best this many distinct L-BFGS end points are polished by Newton's method


_BLAS: ThreadpoolController | None = None


def one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread while a fit runs (many tiny BLAS calls: waking threads costs 10-30x). The
    controller that finds the BLAS libraries is made once, at the first fit (numpy's and scipy's are loaded by
    then): ``threadpool_limits`` made a new one per call, which reads the process's library map each time,
    0.4-2 ms per solve."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


class FitError(QatlawError):
    """A law cannot be fitted: missing columns, too few valid runs, or constants the data cannot identify."""


def huber(r: np.ndarray, c: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Summed Huber loss of residuals r at threshold c, its derivative per residual, and which residuals lie
    inside the quadratic part, clear of its edge by KINK_RTOL (the Hessian counts only those: a residual on the
    edge adds no curvature in the direction that moves it outwards)."""
    psi = np.clip(r, -c, c)
    return float(psi @ (r - 0.5 * psi)), psi, np.abs(r) < c * (1.0 - KINK_RTOL)


# An objective maps parameters to (value, gradient, Hessian or None when not asked for), scaled by 1/c² so the
# optimizers see O(1) values.
Objective = Callable[[np.ndarray, bool], tuple[float, np.ndarray, np.ndarray | None]]


def _newton(objective: Objective, theta: np.ndarray) -> tuple[np.ndarray, float]:
    """The optimum near theta, polished with Newton steps (halved until they do not increase the objective)
    until a step is below NEWTON_XTOL of the parameters. FitError if it does not converge or is not identified:
    its Hessian is not positive definite with every Jacobi-scaled eigenvalue above MIN_CURVATURE."""
    theta = minimize(lambda t: objective(t, False)[:2], theta, jac=True, hess=lambda t: objective(t, True)[2],
                     method="trust-exact", options={"gtol": 1e-12, "maxiter": NEWTON_MAXITER}).x
    for _ in range(NEWTON_MAXITER):
        f, g, h = objective(theta, True)
        step = np.linalg.lstsq(h, -g, rcond=None)[0]
        if np.abs(step).max() <= NEWTON_XTOL * (1.0 + np.abs(theta).max()):
            break
        for t in 0.5 ** np.arange(NEWTON_HALVINGS):
            if objective(theta + t * step, False)[0] < f:
                theta = theta + t * step
                break
        else:
            break  # no step decreases the objective: it is at its optimum to rounding
    else:
        raise FitError(f"not identified: Newton's method did not converge in {NEWTON_MAXITER} steps")
    diag = np.diag(h)
    if not (np.isfinite(h).all() and (diag > 0).all()):
        raise FitError("not identified: the objective is flat along some constant at the optimum")
    inv_sqrt = 1.0 / np.sqrt(diag)  # Jacobi scaling; the outer product of the diagonal itself may underflow
    scaled = h * np.outer(inv_sqrt, inv_sqrt)
    if not np.isfinite(scaled).all():
        raise FitError("not identified: the Hessian's scale spans more than floating point holds")
    curvature = np.linalg.eigvalsh(scaled).min()
    if not curvature > MIN_CURVATURE:
        raise FitError(f"not identified: the optimum is not unique (scaled Hessian eigenvalue {curvature:.1e})")
    return theta, f


def _lbfgs(objective: Objective, start: np.ndarray, bounds: list | None) -> tuple[np.ndarray, float]:
    res = minimize(lambda t: objective(t, False)[:2], start, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 1000})
    return res.x, float(res.fun)


def identified_optima(objective: Objective, starts: np.ndarray, bounds: list,
                      degenerate: Callable[[np.ndarray], str | None]) -> list[tuple[float, np.ndarray]]:
    """L-BFGS-B from every start, then Newton on the best BOOT_STARTS distinct end points: the identified
    optima (not ``degenerate``), best first. FitError if none is identified, or if the best is tied with a
    distinct other one."""
    ends: dict[str, np.ndarray] = {}
    with one_blas_thread():  # many tiny BLAS calls: waking threads costs 10-30x
        finite = [(x, f) for x, f in (_lbfgs(objective, s, bounds) for s in starts) if np.isfinite(f)]
        for x, f in sorted(finite, key=lambda end: end[1]):
            if len(ends) < BOOT_STARTS:
                ends.setdefault(f"{f:.6g}", x)
        optima, why = [], "no start reached a finite objective"
        for x in ends.values():
            try:
                theta, f = _newton(objective, x)
            except FitError as exc:
                why = str(exc)
                continue
            if reason := degenerate(theta):
                why = f"not identified: {reason}"
                continue
            if not any(np.allclose(theta, other, rtol=1e-6, atol=1e-9) for _, other in optima):
                optima.append((f, theta))
    if not optima:
        raise FitError(why)
    optima.sort(key=lambda o: o[0])
    if len(optima) > 1 and optima[1][0] - optima[0][0] <= TIE_RTOL * abs(optima[0][0]):
        raise FitError("not identified: two distinct optima have the same objective")
    return optima


def halton(n: int, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """n deterministic quasi-random points in the box [low, high]."""
    if n < 1:
        raise FitError(f"inits must be at least 1, got {n}")
    return low + (high - low) * qmc.Halton(len(low), scramble=False).random(n)


def _law_objective(x: np.ndarray, log_base: np.ndarray, log_obs: np.ndarray, c: float,
                   offset: np.ndarray | float = 0.0) -> Objective:
    """Huber objective of the log-loss residuals r = log(b + exp(x·θ + o)) − log(observed loss) of a law whose
    quantization error exp(x·θ + o) adds to a baseline loss b (log b = −inf: r = x·θ + o − log(observed), a law
    linear in its log parameters, whose objective is convex)."""
    def objective(theta: np.ndarray, hessian: bool) -> tuple[float, np.ndarray, np.ndarray | None]:
        u = x @ theta + offset
        share = expit(u - log_base)  # ∂r/∂u: the error's share of the predicted loss (1 without a baseline)
        loss, psi, inside = huber(np.logaddexp(log_base, u) - log_obs, c)
        grad = x.T @ (psi * share) / c**2
        if not hessian:
            return loss / c**2, grad, None
        weight = np.where(inside, share**2, 0.0) + psi * share * (1.0 - share)
        return loss / c**2, grad, (x * weight[:, None]).T @ x / c**2
    return objective


def _threshold(r: np.ndarray, p: int) -> float:
    """The δ laws' Huber threshold from the least-squares residuals r of p parameters: 1.345 robust standard
    deviations."""
    n = len(r)
    if n <= p:
        return MIN_THRESHOLD
    return max(MIN_THRESHOLD, HUBER_K * MAD_TO_SD * float(np.median(np.abs(r))) * np.sqrt(n / (n - p)))


def huber_threshold(x: np.ndarray, y: np.ndarray) -> float:
    """The Huber threshold of a law linear in its log parameters (x·θ ≈ y)."""
    return _threshold(x @ np.linalg.lstsq(x, y, rcond=None)[0] - y, x.shape[1])


def solve_loglinear(x: np.ndarray, y: np.ndarray, c: float,
                    start: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The unique minimizer of the Huber loss (threshold c) of x·θ − y and its objective (in units of c²);
    FitError when it is not unique. Starts from ``start`` or the least-squares solution."""
    if start is None:
        start = np.linalg.lstsq(x, y, rcond=None)[0]
    return _solve(_law_objective(x, np.full(len(y), -np.inf), y, c), start)


def _solve(objective: Objective, start: np.ndarray) -> tuple[np.ndarray, float]:
    with one_blas_thread():
        return _newton(objective, _lbfgs(objective, start, None)[0])


@dataclass(frozen=True)
class QatLoss:
    """The runs of a δ law as the paper's law writes them, L_QAT = L_BF16 + δ: per run its design row x
    (log δ̂ = x·θ + offset), the log of its baseline loss (−inf without one) and the log of its observed QAT
    loss (log δ without a baseline). A run whose δ ≤ 0 still has a QAT loss, so it enters the fit like any
    other run."""

    x: np.ndarray
    log_base: np.ndarray
    log_obs: np.ndarray
    offset: np.ndarray

    def take(self, idx: np.ndarray) -> QatLoss:
        return QatLoss(self.x[idx], self.log_base[idx], self.log_obs[idx], self.offset[idx])

    def objective(self, c: float) -> Objective:
        return _law_objective(self.x, self.log_base, self.log_obs, c, self.offset)

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        return np.logaddexp(self.log_base, self.x @ theta + self.offset) - self.log_obs

    def start(self) -> np.ndarray:
        """The least-squares θ: of log δ on the runs with δ > 0 (every run without a baseline), then, with a
        baseline, of every run's log QAT loss from there."""
        with_base = np.isfinite(self.log_base).any()
        delta = np.exp(self.log_obs) - np.exp(self.log_base) if with_base else np.exp(self.log_obs)
        x, p, positive = self.x, self.x.shape[1], delta > 0
        if positive.sum() >= p and np.linalg.matrix_rank(x[positive]) == p:
            theta = np.linalg.lstsq(x[positive], np.log(delta[positive]) - self.offset[positive], rcond=None)[0]
        else:
            floor = np.log(max(float(np.abs(delta).mean()), 1e-6))
            theta = np.linalg.lstsq(x, floor - self.offset, rcond=None)[0]
        if not with_base:
            return theta

        def jac(t: np.ndarray) -> np.ndarray:
            return expit(x @ t + self.offset - self.log_base)[:, None] * x
        with one_blas_thread():
            return least_squares(self.residuals, theta, jac=jac, method="trf", x_scale="jac").x

    def threshold(self, theta: np.ndarray) -> float:
        """The Huber threshold from the residuals at the least-squares θ."""
        return _threshold(self.residuals(theta), self.x.shape[1])

    def solve(self, c: float, start: np.ndarray) -> tuple[np.ndarray, float]:
        """The Huber optimum (threshold c) from ``start`` and its objective in units of c²; FitError when it is
        not identified."""
        return _solve(self.objective(c), start)

    def optimum(self) -> tuple[np.ndarray, float, float]:
        """The Huber optimum from the least-squares θ, at the threshold of the residuals there: θ, the threshold
        and the objective in units of its square; FitError when it is not identified."""
        theta = self.start()
        c = self.threshold(theta)
        theta, objective = self.solve(c, theta)
        return theta, c, objective

