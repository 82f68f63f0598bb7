"""Gao et al. (2022)'s functional forms of over-optimization, fitted to best-of-n and RL curves.

With d = √KL and scores relative to the initial policy (R(0) = 0):
    R_bon(d) = d(α − β d),        peak d* = α / (2β)
    R_RL(d)  = d(α − β log d),    peak d* = exp(α/β − 1)
Both are linear in (α, β); the fits use scipy's `curve_fit` started at the linear least-squares solution.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import xlogy


def gao_bon(d, alpha: float, beta: float):
    """Gao et al.'s BoN form R(d) = d(α − β d), d = √KL, R relative to the initial policy."""
    d = np.asarray(d, dtype=float)
    return d * (alpha - beta * d)


def gao_rl(d, alpha: float, beta: float):
    """Gao et al.'s RL form R(d) = d(α − β log d); R(0) = 0 (d log d → 0, taken via `xlogy`)."""
    d = np.asarray(d, dtype=float)
    return alpha * d - beta * xlogy(d, d)


def _fit(model, d, r) -> tuple[float, float, float, float]:
    """Least-squares fit of `model(d, α, β)` on the points with d > 0; returns α, β and their standard errors."""
    d = np.asarray(d, dtype=float).ravel()
    r = np.asarray(r, dtype=float).ravel()
    if d.shape != r.shape:
        raise ValueError(f"d and r differ in length: {d.size} vs {r.size}")
    keep = (d > 0) & np.isfinite(d) & np.isfinite(r)  # d = 0 carries no information: R(0) = 0 by construction
    if keep.sum() < 2:
        raise ValueError(f"need at least 2 points with d > 0 to fit (α, β), got {int(keep.sum())}")
    d, r = d[keep], r[keep]
    # Both forms are linear in (α, β): start curve_fit at the linear least-squares solution so it cannot stall.
    design = np.stack([model(d, 1.0, 0.0), model(d, 0.0, 1.0)], axis=1)  # columns ∂R/∂α, ∂R/∂β
    p0 = np.linalg.lstsq(design, r, rcond=None)[0]
    with warnings.catch_warnings():
        # With exactly 2 points (or a perfect fit) the covariance is undefined; the estimates are still right.
        warnings.simplefilter("ignore", OptimizeWarning)
        popt, pcov = curve_fit(model, d, r, p0=p0)
    se = np.sqrt(np.clip(np.diag(pcov), 0.0, None))
    return float(popt[0]), float(popt[1]), float(se[0]), float(se[1])


def fit_bon(d, r) -> dict:
    """Fit R(d) = d(α − β d) to a BoN curve (d = √KL, r relative to the initial policy, so R(0) = 0).

    Returns a dict with alpha, beta, alpha_se, beta_se (from the fit covariance; inf/NaN when undefined), the peak
    distance d_star = α/(2β) and peak score r_star = α²/(4β). With β ≤ 0 the curve has no interior maximum:
    d_star = r_star = inf.
    """
    alpha, beta, alpha_se, beta_se = _fit(gao_bon, d, r)
    if beta > 0:
        d_star = alpha / (2.0 * beta)
        r_star = alpha * alpha / (4.0 * beta)
    else:
        d_star = r_star = math.inf
    return {"alpha": alpha, "beta": beta, "alpha_se": alpha_se, "beta_se": beta_se,
            "d_star": d_star, "r_star": r_star}


def fit_rl(d, r) -> dict:
    """Fit R(d) = d(α − β log d) to an RL curve (d = √KL, r relative to the initial policy, so R(0) = 0).

    Returns a dict with alpha, beta, alpha_se, beta_se, the peak distance d_star = exp(α/β − 1) (where
    dR/dd = α − β(log d + 1) = 0) and peak score r_star = R(d*) = β·d*. With β ≤ 0 there is no interior maximum:
    d_star = r_star = inf.
    """
    alpha, beta, alpha_se, beta_se = _fit(gao_rl, d, r)
    if beta > 0:
        with np.errstate(over="ignore"):
            d_star = float(np.exp(alpha / beta - 1.0))  # may overflow to inf for a peak far beyond the data
        r_star = beta * d_star
    else:
        d_star = r_star = math.inf
    return {"alpha": alpha, "beta": beta, "alpha_se": alpha_se, "beta_se": beta_se,
            "d_star": d_star, "r_star": r_star}
