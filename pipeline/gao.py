"""Gao et al. (2022)'s functional forms of over-optimization, fitted to best-of-n and RL curves.

With d = √KL and scores relative to the initial policy (R(0) = 0):
    R_bon(d) = d(α − β d),        peak d* = α / (2β)
    R_RL(d)  = d(α − β log d),    peak d* = exp(α/β − 1)
Both are linear in (α, β); the fits use scipy's `curve_fit` started at the linear least-squares solution.

`check_fit` says whether a fit describes its curve: whether the fitted peak agrees with the empirical one
(`empirical_peak`, bootstrap over prompts) and whether the fitted values pass through the points' CIs.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import xlogy

from pipeline.bon import resampled_means


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


FORMS = {"bon": gao_bon, "rl": gao_rl}


def _peak(form: str, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The peak distance d* of each (α, β): α/(2β) (BoN) or exp(α/β − 1) (RL); inf where β ≤ 0 (no interior peak)."""
    alpha, beta = np.asarray(alpha, dtype=float), np.asarray(beta, dtype=float)
    safe = np.where(beta > 0, beta, 1.0)
    with np.errstate(over="ignore"):
        d_star = alpha / (2.0 * safe) if form == "bon" else np.exp(alpha / safe - 1.0)
    return np.where(beta > 0, d_star, math.inf)


def bootstrap_fit(form: str, per_prompt, d, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """Gao et al.'s `form` ("bon": d(α − βd), "rl": d(α − β log d)) fitted to the mean over prompts of `per_prompt`,
    with percentile-bootstrap CIs over prompts.

    `per_prompt` is the (prompts, points) matrix of each prompt's score relative to the initial policy at the
    distances `d` (points, d = √KL). The point estimates are the fit of the mean curve (what `fit_bon` / `fit_rl`
    give for it). Prompts are resampled with replacement `n_boot` times (numpy Generator seeded with `seed`); each
    resample's mean curve is refitted, and α, β and the peak d* get the (1 − ci)/2 and (1 + ci)/2 quantiles of the
    refits. The x positions are held fixed: for RL they are the measured mean KLs, whose own uncertainty is not
    propagated. Points with d ≤ 0 carry no information (R(0) = 0) and are left out, as in `fit_bon` / `fit_rl`.

    Returns alpha, beta, d_star, kl_star (= d*²), each a dict {estimate, lo, hi}; r2, the coefficient of
    determination of the fit on the mean curve (1 − SS_res/SS_tot over the fitted points); peak_fraction, the share
    of resamples with β > 0 (an interior peak); and form, n_boot, ci, prompts, points. A d* without a peak is inf
    (null in strict JSON); its CI bounds are order statistics of the resamples, so an upper bound of inf says that
    more than (1 − ci)/2 of the resamples have no peak.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
    model = FORMS[form]
    x = np.asarray(per_prompt, dtype=float)
    d = np.asarray(d, dtype=float).ravel()
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != d.size:
        raise ValueError(f"per_prompt must be a (prompts, points) matrix with one column per d ({d.size}), "
                         f"got shape {x.shape}")
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    keep = (d > 0) & np.isfinite(d)
    if keep.sum() < 2:
        raise ValueError(f"need at least 2 points with d > 0 to fit (α, β), got {int(keep.sum())}")
    d, x = d[keep], x[:, keep]
    if not np.isfinite(x).all():
        raise ValueError(f"per_prompt has {int((~np.isfinite(x)).sum())} non-finite entries at points with d > 0")

    P = x.shape[0]
    mean = x.mean(axis=0)
    point = (fit_bon if form == "bon" else fit_rl)(d, mean)
    residual = mean - model(d, point["alpha"], point["beta"])
    ss_tot = float(((mean - mean.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan

    out = {"form": form, "n_boot": int(n_boot), "ci": ci, "prompts": P, "points": int(d.size), "r2": r2}
    est = {"alpha": point["alpha"], "beta": point["beta"], "d_star": point["d_star"]}
    if n_boot == 0:
        bounds = {k: (v, v) for k, v in est.items()}
        out["peak_fraction"] = float(point["beta"] > 0)
    else:
        # Both forms are linear in (α, β), so each resample's least-squares fit (what curve_fit converges to from
        # the linear solution) is one column of a single multi-target lstsq.
        curves = resampled_means(x, n_boot, seed)
        design = np.stack([model(d, 1.0, 0.0), model(d, 0.0, 1.0)], axis=1)
        (alpha_b, beta_b) = np.linalg.lstsq(design, curves.T, rcond=None)[0]
        d_star_b = _peak(form, alpha_b, beta_b)
        q = [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0]
        bounds = {"alpha": np.quantile(alpha_b, q), "beta": np.quantile(beta_b, q),
                  # order statistics, no interpolation: resamples without a peak (inf) stay inf
                  "d_star": np.quantile(d_star_b, q, method="inverted_cdf")}
        out["peak_fraction"] = float((beta_b > 0).mean())
    for k, v in est.items():
        out[k] = {"estimate": float(v), "lo": float(bounds[k][0]), "hi": float(bounds[k][1])}
    # KL = d²; a d* < 0 (BoN with α < 0: gold falls from the start) counts as a peak at KL 0
    out["kl_star"] = {k: max(v, 0.0) ** 2 for k, v in out["d_star"].items()}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Checks of a fit against the curve it was fitted to
# ---------------------------------------------------------------------------------------------------------------------

def peak_row(curve):
    """The row of a curve table (a DataFrame with a `gold` column, one row per n or export) at its empirical gold
    peak: the first maximum of the mean gold, as `empirical_peak` takes it. The one definition the curve stages
    write to fit.json and the reports and `overopt compare` read from a table."""
    return curve.loc[curve.gold.idxmax()]


def with_proxy_rel_std(table, initial_proxy: np.ndarray):
    """The curve table with proxy_rel_std(_lo, _hi) after proxy_rel_hi: proxy_rel (and its CI) in units of the
    sample standard deviation of the initial policy's proxy scores (every prompt's samples pooled), so proxies of
    different scales share an axis. One definition for the best-of-n and the RL curves."""
    initial_proxy = np.asarray(initial_proxy)
    sd = float(np.std(initial_proxy, ddof=1)) if initial_proxy.size > 1 else float("nan")
    out = table.copy()
    at = list(out.columns).index("proxy_rel_hi") + 1
    for offset, suffix in enumerate(("", "_lo", "_hi")):
        out.insert(at + offset, f"proxy_rel_std{suffix}", out[f"proxy_rel{suffix}"] / sd)
    return out


def empirical_peak(per_prompt, d, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> dict:
    """The curve's empirical peak (the distance of the first maximum of the mean curve) with a bootstrap CI.

    `per_prompt` is the (prompts, points) matrix of scores at the distances `d` (all points, d = 0 included: a curve
    that only falls peaks there). Prompts are resampled as in `bootstrap_fit` (same seed, same resamples); the CI is
    the (1 − ci)/2 and (1 + ci)/2 order statistics of the resamples' peak distances. The peak can only land on a
    point of the grid, so the CI is a set of grid points; `check_fit` widens it to the neighbouring points.

    Returns {estimate, lo, hi} (distances) and index, the column of the estimate.
    """
    x = np.asarray(per_prompt, dtype=float)
    d = np.asarray(d, dtype=float).ravel()
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != d.size or d.size < 1:
        raise ValueError(f"per_prompt must be a (prompts, points) matrix with one column per d ({d.size}), "
                         f"got shape {x.shape}")
    if not (np.isfinite(x).all() and np.isfinite(d).all()):
        raise ValueError("per_prompt and d must be finite")
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 0:
        raise ValueError(f"n_boot must be a non-negative integer, got {n_boot!r}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")
    index = int(np.argmax(x.mean(axis=0)))  # argmax returns the first maximum, as the stages' empirical_peak
    if n_boot == 0:
        lo = hi = d[index]
    else:
        peaks = d[np.argmax(resampled_means(x, n_boot, seed), axis=1)]
        lo, hi = np.quantile(peaks, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0], method="inverted_cdf")
    return {"estimate": float(d[index]), "lo": float(lo), "hi": float(hi), "index": index}


def _interval(value) -> tuple[float, float, float]:
    """(estimate, lo, hi) of a bootstrap_fit-style {estimate, lo, hi} dict, or of a plain number (lo = hi)."""
    if isinstance(value, dict):
        return float(value["estimate"]), float(value["lo"]), float(value["hi"])
    return float(value), float(value), float(value)


def _grid_neighbours(grid: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The grid point just below `lo` (0 if none) and just above `hi` (inf if none): where a peak found on the grid
    at lo … hi can really lie."""
    below, above = grid[grid < lo], grid[grid > hi]
    return (float(below.max()) if below.size else 0.0), (float(above.min()) if above.size else math.inf)


def check_fit(form: str, d, mean, lo, hi, fit: dict, empirical: dict, *, max_outside_fraction: float = 0.25,
              max_rel_residual: float = 2.0, widen_to_grid: bool = True) -> dict:
    """Whether a Gao fit describes the curve it was fitted to: does it put the peak where the data has it, and does
    it pass through the points' confidence intervals?

    Args:
        form: "bon" or "rl", the form of `fit`.
        d, mean, lo, hi: the curve's points: distance d = √KL, mean score relative to the initial policy and the
            point's own CI (e.g. gold_rel, gold_rel_lo, gold_rel_hi of a curve table).
        fit: alpha, beta and d_star of the fit, each a number or an {estimate, lo, hi} dict (`bootstrap_fit`'s
            output can be passed as is; with plain numbers, e.g. from `fit_rl`, the d* interval is one point).
        empirical: the empirical peak's distance as {estimate, lo, hi} (`empirical_peak`).
        max_outside_fraction: the largest share of points whose fitted value may lie outside their CI. A correct
            form with 95% CIs leaves about 5% outside; neighbouring points share prompts, so misses come in runs.
        max_rel_residual: the largest allowed |mean − fitted| in units of the CI half-width on the fitted value's
            side (1 is the CI's edge; the default 2 is about 4 standard errors).
        widen_to_grid: widen the empirical interval to the neighbouring grid points (see below).

    Definitions:
        peak_consistent: the fitted d*'s CI and the empirical peak's interval overlap (max of the lower ends ≤ min of
            the upper ends); this includes either estimate lying inside the other's interval. The empirical peak is
            an argmax over the grid, which only places the true peak between the grid points next to it, so with
            `widen_to_grid` its interval runs from the grid point below its CI to the one above (0 below the first
            point, inf above the last: a curve still rising at its end does not bound its peak).
        misfit: over the points with d > 0 (those the fit used), the count and fraction whose fitted value lies
            outside [lo, hi], each point's relative residual |mean − fitted| / half-width (half-width = hi − mean
            when the fitted value is above the mean, mean − lo otherwise, so > 1 exactly when outside; inf for a
            zero-width CI that the fit misses) and their maximum. `misfit["ok"]` holds when the fraction is
            ≤ max_outside_fraction and the maximum ≤ max_rel_residual.
        ok: peak_consistent and misfit["ok"]; reason: "" when ok, else one line naming what failed with numbers.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
    d, mean, lo, hi = (np.asarray(v, dtype=float).ravel() for v in (d, mean, lo, hi))
    if not d.size == mean.size == lo.size == hi.size:
        raise ValueError(f"d, mean, lo and hi differ in length: {d.size}, {mean.size}, {lo.size}, {hi.size}")
    if np.any(lo > mean) or np.any(mean > hi):
        raise ValueError("each point needs lo <= mean <= hi")
    alpha, beta = _interval(fit["alpha"])[0], _interval(fit["beta"])[0]
    f_est, f_lo, f_hi = _interval(fit["d_star"])
    f_est, f_lo, f_hi = (max(v, 0.0) for v in (f_est, f_lo, f_hi))  # BoN d* < 0 (gold falls at once): peak at 0
    e_est, e_lo, e_hi = _interval(empirical)
    grid = np.unique(d[np.isfinite(d)])
    if widen_to_grid:
        e_lo, e_hi = _grid_neighbours(grid, e_lo, e_hi)
    peak_consistent = bool(max(f_lo, e_lo) <= min(f_hi, e_hi))

    used = (d > 0) & np.isfinite(d) & np.isfinite(mean)
    fitted = FORMS[form](d[used], alpha, beta)
    m, lo_u, hi_u = mean[used], lo[used], hi[used]
    half = np.where(fitted > m, hi_u - m, m - lo_u)
    gap = np.abs(m - fitted)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(gap == 0, 0.0, gap / half)  # a zero-width CI that the fit misses gives inf
    outside = (fitted < lo_u) | (fitted > hi_u)
    count, points = int(outside.sum()), int(used.sum())
    fraction = count / points if points else math.nan
    max_rel = float(rel.max()) if points else math.nan
    misfit_ok = bool(fraction <= max_outside_fraction and max_rel <= max_rel_residual)  # NaN (no points) fails
    misfit = {"count": count, "points": points, "fraction": fraction, "max_rel_residual": max_rel,
              "rel_residuals": rel.tolist(), "ok": misfit_ok}

    reasons = []
    if not peak_consistent:
        reasons.append(f"fitted peak d*={f_est:.3g} (CI {f_lo:.3g}..{f_hi:.3g}) misses the empirical peak "
                       f"d={e_est:.3g} (interval {e_lo:.3g}..{e_hi:.3g})")
    if not misfit["ok"]:
        reasons.append(f"{count}/{points} points' fitted values lie outside their CI (max |residual| "
                       f"{max_rel:.3g} CI half-widths; allowed {max_outside_fraction:.0%} and {max_rel_residual:g})")
    return {"form": form, "ok": peak_consistent and misfit["ok"], "reason": "; ".join(reasons),
            "peak_consistent": peak_consistent,
            "peak": {"fitted": {"estimate": f_est, "lo": f_lo, "hi": f_hi},
                     "empirical": {"estimate": e_est, "lo": e_lo, "hi": e_hi}},
            "misfit": misfit}


def check_curve_fit(form: str, per_prompt, d, mean, lo, hi, fit: dict | None, n_boot: int = 1000, ci: float = 0.95,
                    seed: int = 0) -> tuple[dict, dict | None]:
    """The empirical peak of a curve with its bootstrap CI, and `check_fit` of `fit` against the curve: what the
    curve stages write to fit.json as `empirical_peak_ci` and `fit_check`.

    `per_prompt` (prompts, points) are the per-prompt scores relative to the initial policy at the distances `d`
    that `fit` (a `bootstrap_fit` result, fitted to them with the same n_boot and seed, so the peak CI uses the
    same resamples) was made from; mean, lo, hi are the curve's points and their CIs. A percentile CI can exclude
    the mean (few prompts, skewed resamples; or by rounding when every prompt is equal), which `check_fit`
    refuses, so each CI is first widened to include its mean.

    Returns (empirical, check): empirical is `empirical_peak`'s {estimate, lo, hi, index} in d, plus kl, the same
    three as KL = d²; check is `check_fit`'s verdict, None when there is no fit (`fit` None: too few points).
    """
    empirical = empirical_peak(per_prompt, d, n_boot=n_boot, ci=ci, seed=seed)
    empirical["kl"] = {k: empirical[k] ** 2 for k in ("estimate", "lo", "hi")}
    if fit is None:
        return empirical, None
    mean = np.asarray(mean, dtype=float)
    lo, hi = np.minimum(np.asarray(lo, dtype=float), mean), np.maximum(np.asarray(hi, dtype=float), mean)
    return empirical, check_fit(form, d, mean, lo, hi, fit, empirical)
