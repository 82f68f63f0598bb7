"""Plots of over-optimization curves (matplotlib, headless).

Conventions shared by the curve plots: x is d = √KL; gold is drawn relative to the initial policy with its CI over
prompts; the proxy panel shows the proxy standardised by its spread over the initial policy's samples when every
table has that column (proxy_rel_std, of best-of-n's and the RL curves alike), so different reward models share a
scale, and the raw relative proxy otherwise. A Gao fit passed in `fits` (a curve stage's fit.json) is drawn over its
points, dashed, with its residuals (mean − fit, error bars the points' CIs) in a panel under the gold panel; a fit
whose `fit_check` failed is drawn dotted and labelled "fit fails check". `labels` maps run / proxy names to what the
legend should say (e.g. "GRM-SFT α=0.01"); a name without an entry is shown as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.gao import FORMS

BON_XLABEL = "√KL  (KL = log n − (n−1)/n, an upper bound)"
BON_STD_YLABEL = "proxy score − at n=1\n(in sd of its scores on initial-policy samples)"
RL_STD_YLABEL = "proxy score − initial policy's\n(in sd of its scores on initial-policy samples)"
FIT_FAILS = "fit fails check"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layout(residuals: bool, size: tuple[float, float]):
    """(fig, gold axis, proxy axis, residual axis or None): two panels side by side; with `residuals`, a short
    residual panel under the gold panel sharing its x-axis, the proxy panel spanning the full height."""
    plt = _pyplot()
    if not residuals:
        fig, (gold, proxy) = plt.subplots(1, 2, figsize=size)
        return fig, gold, proxy, None
    fig = plt.figure(figsize=(size[0], size[1] + 1.4))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1])
    gold = fig.add_subplot(grid[0, 0])
    return fig, gold, fig.add_subplot(grid[:, 1]), fig.add_subplot(grid[1, 0], sharex=gold)


def _has_fit(fit: dict | None) -> bool:
    return bool(fit) and fit.get("gao_fit_gold_rel") is not None


def _draw_fit(gold_ax, residual_ax, form: str, points: pd.DataFrame, x: str, fit: dict, color, name: str) -> None:
    """The fitted Gao curve of a fit.json over the gold panel (dashed; dotted and labelled when its fit_check failed)
    and the points' residuals mean − fit with their CIs as error bars in the residual panel."""
    alpha, beta = fit["gao_fit_gold_rel"]["alpha"], fit["gao_fit_gold_rel"]["beta"]
    check = fit.get("fit_check")
    fails = check is not None and not check.get("ok", True)
    d = points[x].to_numpy(dtype=float)
    grid = np.linspace(0.0, float(np.nanmax(d)) * 1.05, 200)
    gold_ax.plot(grid, FORMS[form](grid, alpha, beta), ":" if fails else "--", color=color, lw=1.2,
                 label=f"{name}: Gao fit" + (f" ({FIT_FAILS})" if fails else ""))
    used = d > 0  # the points the fit was made on (R(0) = 0 by construction)
    points, d = points[used], d[used]
    mean = points.gold_rel.to_numpy(dtype=float)
    yerr = np.clip([mean - points.gold_rel_lo.to_numpy(dtype=float), points.gold_rel_hi.to_numpy(dtype=float) - mean],
                   0.0, None)
    residual_ax.errorbar(d, mean - FORMS[form](d, alpha, beta), yerr=yerr, fmt="o" if not fails else "x", ms=3,
                         color=color, elinewidth=0.8, capsize=2)


def _finish(fig, axes, ylabels, xlabel: str, legend_size: int, title: str, path: Path, residual_ax=None) -> None:
    """Labels, a zero line and legends on every panel; title; save and close. With a residual panel, it carries the
    gold panel's x label."""
    plt = _pyplot()
    for ax, ylabel in zip(axes, ylabels):
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel)
        ax.axhline(0, color="gray", lw=0.5)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:  # own legends (plot_overlay) are kept
            ax.legend(fontsize=legend_size)
    if residual_ax is not None:
        axes[0].set_xlabel("")
        axes[0].tick_params(labelbottom=False)
        residual_ax.set_xlabel(xlabel)
        residual_ax.set_ylabel("mean − fit")
        residual_ax.axhline(0, color="gray", lw=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bon_curves(curves: dict[str, pd.DataFrame], path: Path, title: str,
                    groups: dict[str, list[str]] | None = None, fits: dict[str, dict] | None = None,
                    labels: dict[str, str] | None = None) -> None:
    """Gold (solid, with CI band) and proxy (dashed) relative to n = 1 against √KL bound, one colour per proxy. With
    `groups` (label -> proxies of `curves`, e.g. the seeds of one proxy), one colour per group: a group of several
    runs is drawn as thinner lines without CI bands (its spread over seeds is what to read), labelled once.

    `fits` (proxy -> its bon_curve fit.json) draws each given fit over its points with a residual panel; a single
    run with a sqrt_kl_estimated column also gets its gold against the estimated KL (thin, × markers), to show how
    far the bound is from the KL best-of-n has. The proxy panel is standardised when every table has
    proxy_rel_std. `labels` names proxies and groups in the legends."""
    fits = {p: f for p, f in (fits or {}).items() if p in curves and _has_fit(f)}
    labels = labels or {}
    groups = groups or {name: [name] for name in curves}
    standardised = all("proxy_rel_std" in c for c in curves.values())
    proxy_col = "proxy_rel_std" if standardised else "proxy_rel"
    fig, gold_ax, proxy_ax, residual_ax = _layout(bool(fits), (10, 4))
    for i, (label, names) in enumerate(groups.items()):
        color, runs = f"C{i}", [n for n in names if n in curves]
        for j, name in enumerate(runs):
            c, single = curves[name], len(runs) == 1
            shown = labels.get(label, label)
            tag = (shown if single else f"{shown} ({len(runs)} seeds)") if j == 0 else None
            style = {} if single else {"alpha": 0.7, "lw": 1.0}  # a single run is drawn exactly as before groups
            gold_ax.plot(c.sqrt_kl_bound, c.gold_rel, "-o", ms=3, color=color, label=tag and f"{tag}: gold", **style)
            if single:
                gold_ax.fill_between(c.sqrt_kl_bound, c.gold_rel_lo, c.gold_rel_hi, color=color, alpha=0.2)
                if "sqrt_kl_estimated" in c:
                    gold_ax.plot(c.sqrt_kl_estimated, c.gold_rel, "-x", ms=4, lw=0.7, color=color, alpha=0.6,
                                 label=f"{shown}: gold at estimated KL")
            if name in fits:
                _draw_fit(gold_ax, residual_ax, "bon", c, "sqrt_kl_bound", fits[name], color, labels.get(name, name))
            proxy_ax.plot(c.sqrt_kl_bound, c[proxy_col], "--s", ms=3, color=color, label=tag and f"{tag}: proxy",
                          **style)
    proxy_label = BON_STD_YLABEL if standardised else "proxy score − proxy at n=1"
    _finish(fig, [gold_ax, proxy_ax], ("gold score − gold at n=1", proxy_label), BON_XLABEL, 8, title, path,
            residual_ax)


def plot_seed_bands(bands: dict[str, pd.DataFrame], path: Path, title: str, xlabel: str,
                    ylabel: str = "gold score − initial policy's", labels: dict[str, str] | None = None,
                    proxy_bands: dict[str, pd.DataFrame] | None = None,
                    proxy_ylabel: str = "proxy score − initial policy's", x: str | None = None,
                    band: tuple[str, str] = ("ci_lo", "ci_hi"), band_label: str = "95 % t-interval over seeds") -> None:
    """Per label (a proxy or an arm run with several seeds): the mean curve over seeds with a shaded band.

    A band table has an x column (`x`, default sqrt_kl, else sqrt_kl_bound), mean, the two `band` columns (default
    ci_lo/ci_hi: the 95 % Student-t interval for the mean) and the seed count in n (or seeds): the columns of
    `matched_kl.over_seeds`. Points no run covers (mean NaN) are left out. With `proxy_bands` (same form) a second
    panel shows them; `labels` names the labels in the legend."""
    labels = labels or {}
    plt = _pyplot()
    panels = [(bands, ylabel)] + ([(proxy_bands, proxy_ylabel)] if proxy_bands else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 0.5, 4), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys([*bands, *(proxy_bands or {})]))}
    for k, (ax, (tables, _)) in enumerate(zip(axes[0], panels)):
        for label, b in tables.items():
            b = b[b["mean"].notna()]
            col = x or ("sqrt_kl" if "sqrt_kl" in b else "sqrt_kl_bound")
            seeds = int(b["n" if "n" in b else "seeds"].max()) if len(b) else 0
            ax.plot(b[col], b["mean"], "-o", ms=3, color=colors[label],  # one legend: the panels share colours
                    label=f"{labels.get(label, label)}: mean of {seeds} seeds, band {band_label}" if k == 0 else None)
            ax.fill_between(b[col], b[band[0]], b[band[1]], color=colors[label], alpha=0.2)
    _finish(fig, list(axes[0]), [p[1] for p in panels], xlabel, 8, title, path)


def plot_bon_seed_bands(bands: dict[str, pd.DataFrame], path: Path, title: str,
                        labels: dict[str, str] | None = None) -> None:
    """Per proxy trained with several seeds: the mean best-of-n curve over its seeds (gold left, proxy right, both
    relative to n = 1) with a band at each n. A band table has the columns sqrt_kl_bound, seeds and
    {gold_rel,proxy_rel}_mean with either {..}_ci_lo/_ci_hi (drawn as the 95 % t-interval over seeds) or
    {..}_min/_max (the report's bon_curves_over_seeds.csv: drawn as the seeds' min–max)."""
    def panel(col: str) -> dict[str, pd.DataFrame]:
        out = {}
        for label, b in bands.items():
            lo, hi = (f"{col}_ci_lo", f"{col}_ci_hi") if f"{col}_ci_lo" in b else (f"{col}_min", f"{col}_max")
            out[label] = pd.DataFrame({"sqrt_kl_bound": b.sqrt_kl_bound, "mean": b[f"{col}_mean"],
                                       "lo": b[lo], "hi": b[hi], "seeds": b.seeds})
        return out

    t_band = all("gold_rel_ci_lo" in b for b in bands.values())
    standardised = all("proxy_rel_std_mean" in b for b in bands.values())
    proxy_col, proxy_ylabel = ("proxy_rel", "proxy score − proxy at n=1")
    if standardised:
        proxy_col = "proxy_rel_std"
        proxy_ylabel = "proxy score − at n=1\n(in sd of its scores on initial-policy samples)"
    plot_seed_bands(panel("gold_rel"), path, title, BON_XLABEL, "gold score − gold at n=1", labels,
                    proxy_bands=panel(proxy_col), proxy_ylabel=proxy_ylabel, x="sqrt_kl_bound",
                    band=("lo", "hi"), band_label="95 % t-interval over seeds" if t_band else "min–max over seeds")


def _kl_xerr(rl: pd.DataFrame) -> np.ndarray | None:
    """Horizontal error bars of RL points in √KL: the measured KL's CI (kl_k1_lo/hi) taken to √, as distances from
    the point (clipped at 0: a CI endpoint below 0 nats is 0 in √KL)."""
    if "kl_k1_lo" not in rl or "kl_k1_hi" not in rl:
        return None
    d = rl.sqrt_kl.to_numpy(dtype=float)
    lo = np.sqrt(rl.kl_k1_lo.clip(lower=0.0).to_numpy(dtype=float))
    hi = np.sqrt(rl.kl_k1_hi.clip(lower=0.0).to_numpy(dtype=float))
    return np.clip([d - lo, hi - d], 0.0, None)


def plot_rl_curves(runs: dict[str, list[pd.DataFrame]], bon: dict[str, pd.DataFrame], path: Path, title: str,
                   fits: dict[str, list[dict | None] | dict] | None = None,
                   labels: dict[str, str] | None = None) -> None:
    """RL runs (solid; √ of the KL measured on samples, with its CI as horizontal error bars; the gold CI band when a
    label has one run) and best-of-n curves (dash-dot, squares) on shared axes: gold relative to the initial policy
    (left), proxy relative to it (right; standardised when every table has proxy_rel_std). RL points are
    joined in order of their measured KL, which can drop between exports, not in step order. Best-of-n is drawn at its
    estimated KL when every best-of-n table has sqrt_kl_estimated (the KL it has, comparable with RL's
    measurement), else at the bound. One colour per label; a best-of-n curve with the same label as some runs shares
    their colour.

    `fits` (label -> the ppo_curve fit.json of each of its runs, in the order of `runs`; a single dict for a
    one-run label) draws those fits with a residual panel. `labels` names the labels in the legends."""
    fits = {k: v if isinstance(v, list) else [v] for k, v in (fits or {}).items()}
    labels = labels or {}
    standardised = all("proxy_rel_std" in t for t in [*(t for ts in runs.values() for t in ts), *bon.values()])
    bon_x = "sqrt_kl_estimated" if bon and all("sqrt_kl_estimated" in t for t in bon.values()) else "sqrt_kl_bound"
    any_fit = any(_has_fit(f) for label, fs in fits.items() if label in runs for f in fs)
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys([*runs, *bon]))}
    fig, gold_ax, proxy_ax, residual_ax = _layout(any_fit, (11, 4.2))
    for label, tables in runs.items():
        shown = labels.get(label, label)
        for j, rl in enumerate(tables):
            rl = rl.sort_values("sqrt_kl", kind="stable")  # KL order: measured KL can drop between exports
            name = (shown + (f" ({len(tables)} seeds)" if len(tables) > 1 else "")) if j == 0 else None
            style = {"ms": 3, "color": colors[label], "alpha": 0.9 if len(tables) == 1 else 0.6, "elinewidth": 0.7,
                     "capsize": 0}
            xerr = _kl_xerr(rl)
            gold_ax.errorbar(rl.sqrt_kl, rl.gold_rel, xerr=xerr, fmt="-o", label=name, **style)
            proxy_ax.errorbar(rl.sqrt_kl, rl.proxy_rel_std if standardised else rl.proxy_rel, xerr=xerr, fmt="-o",
                              label=name, **style)
            if len(tables) == 1:
                gold_ax.fill_between(rl.sqrt_kl, rl.gold_rel_lo, rl.gold_rel_hi, color=colors[label], alpha=0.2)
            fit = fits.get(label, [])[j] if j < len(fits.get(label, [])) else None
            if _has_fit(fit):
                run_name = shown if len(tables) == 1 else f"{shown} seed {j}"
                _draw_fit(gold_ax, residual_ax, "rl", rl, "sqrt_kl", fit, colors[label], run_name)
    for label, table in bon.items():
        shown = labels.get(label, label)
        name = f"{shown}: best-of-n" if label in runs else shown
        # dash-dot with squares: dashed lines are the fits
        style = {"color": colors[label], "alpha": 0.7, "ms": 3, "label": name}
        gold_ax.plot(table[bon_x], table.gold_rel, "-.s", **style)
        proxy_ax.plot(table[bon_x], table.proxy_rel_std if standardised else table.proxy_rel, "-.s", **style)
    bon_kl = "estimated from its samples" if bon_x == "sqrt_kl_estimated" else "upper bound"
    xlabel = "√KL to the initial policy\n(RL: measured" + (f"; best-of-n: {bon_kl})" if bon else ")")
    _finish(fig, [gold_ax, proxy_ax], ("gold score − initial policy's",
                                        RL_STD_YLABEL if standardised else "proxy score − initial policy's"),
            xlabel, 7, title, path, residual_ax)


@dataclass(frozen=True)
class Overlay:
    """One curve of `plot_overlay`: its table, the column of its x-axis, its colour key (a proxy) and its line-style
    key (a study)."""

    table: pd.DataFrame
    x: str
    colour: str
    style: str


def plot_overlay(curves: list[Overlay], path: Path, title: str, xlabel: str) -> None:
    """Curves of several studies as small multiples: one column of panels per proxy (the curves' colour key), gold
    with its CI band on top and gold relative to the initial policy below, against each curve's x column; one colour
    per study (the style key), shared by every panel, so each panel compares the studies for one proxy. Several runs
    of a proxy in a study (seeds) are thin lines of the study's colour; a single run gets its CI band. Absolute gold
    is drawn as well as the relative: studies with different base policies start from different gold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    proxies = list(dict.fromkeys(c.colour for c in curves))
    studies = list(dict.fromkeys(c.style for c in curves))
    cmap = plt.get_cmap("tab10")
    colours = {k: cmap(i % cmap.N) for i, k in enumerate(studies)}
    runs = pd.Series([(c.colour, c.style) for c in curves]).value_counts()
    fig, axes = plt.subplots(2, len(proxies), figsize=(3.6 * len(proxies) + 1.2, 6.4), sharex=True, sharey="row",
                             squeeze=False)
    for c in curves:
        top, bottom = axes[0, proxies.index(c.colour)], axes[1, proxies.index(c.colour)]
        x, colour, single = c.table[c.x], colours[c.style], runs[(c.colour, c.style)] == 1
        width, alpha = (1.4, 0.9) if single else (0.8, 0.6)
        top.plot(x, c.table.gold, "-", marker="o", ms=2.5, lw=width, color=colour, alpha=alpha)
        bottom.plot(x, c.table.gold_rel, "-", marker="o", ms=2.5, lw=width, color=colour, alpha=alpha)
        if single:
            top.fill_between(x, c.table.gold_lo, c.table.gold_hi, color=colour, alpha=0.15)
    for j, proxy in enumerate(proxies):
        axes[0, j].set_title(proxy, fontsize=9)
        axes[1, j].axhline(0, color="grey", lw=0.6)
        axes[1, j].set_xlabel(xlabel, fontsize=8)
    axes[0, 0].set_ylabel("gold score")
    axes[1, 0].set_ylabel("gold score − initial policy's")
    counts = {s: int(runs[[k for k in runs.index if k[1] == s]].max()) for s in studies}
    handles = [Line2D([], [], color=colours[s], label=f"{s}" + (f" ({counts[s]} runs per proxy)" if counts[s] > 1
                                                                else "")) for s in studies]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(studies), 4), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep_x(values: pd.Series) -> tuple[pd.Series, list | None, bool]:
    """Positions of a swept key's values on the x-axis: the values themselves when all are numbers (log scale when
    they are positive and span a factor of 10 or more), else 0, 1, ... with the values as tick labels."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        x = values.astype(float)
        return x, None, bool((x > 0).all() and x.max() >= 10 * x.min())
    ticks = list(dict.fromkeys(map(str, values)))
    return values.map(lambda v: ticks.index(str(v))).astype(float), ticks, False


def plot_sweep_differences(table: pd.DataFrame, x: str, others: list[str], path: Path, title: str,
                           ylabel: str) -> None:
    """A sweep's differences in one measure (rows of `pipeline.sweep`'s differences table: `group`, the swept keys'
    columns, `difference`, `ci_lo`, `ci_hi`): one panel per compared entry (`group`), the difference against the
    value of key `x` with its 95 % interval as error bars, one line per combination of the `others` keys' values,
    and a line at 0 (no difference)."""
    plt = _pyplot()
    entries = list(dict.fromkeys(table.group))
    fig, axes = plt.subplots(1, len(entries), figsize=(4.2 * len(entries) + 0.8, 3.8), sharey=True, squeeze=False)
    xs, ticks, log = _sweep_x(table[x])
    table = table.assign(_x=xs.to_numpy())
    lines = pd.Series([tuple(map(str, r)) for r in table[others].itertuples(index=False)], index=table.index,
                      dtype=object)
    names = list(dict.fromkeys(lines))
    for ax, entry in zip(axes[0], entries):
        for i, name in enumerate(names):
            sub = table[(table.group == entry) & lines.map(lambda line, name=name: line == name)].sort_values("_x")
            # a small shift per line keeps the intervals of lines at one x apart
            shift = (i - (len(names) - 1) / 2) * 0.04
            px = sub._x * np.exp(shift) if log else sub._x + shift
            err = np.vstack([sub.difference - sub.ci_lo, sub.ci_hi - sub.difference])
            label = ", ".join(f"{k}={v}" for k, v in zip(others, name)) if others else None
            ax.errorbar(px, sub.difference, yerr=np.nan_to_num(err), fmt="-o", ms=4, capsize=3, color=f"C{i}",
                        label=label)
        ax.axhline(0, color="grey", lw=0.7)
        ax.set_title(entry, fontsize=9)
        ax.set_xlabel(x)
        if log:
            ax.set_xscale("log")
            ax.minorticks_off()  # the swept values are the ticks
            ax.set_xticks(sorted(set(table._x)), [f"{v:g}" for v in sorted(set(table._x))])
        elif ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks)
    axes[0, 0].set_ylabel(ylabel)
    if others:
        axes[0, -1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_world_differences(by_world: pd.DataFrame, overall: pd.DataFrame, path: Path, title: str,
                           ylabel: str) -> None:
    """An entry-minus-baseline difference in one measure over worlds (`pipeline.worlds`): one panel per compared entry
    (`group`); each world's difference with its 95 % interval over that world's seeds (`by_world` rows: `group`,
    `world`, `difference`, `ci_lo`, `ci_hi`), then the mean over worlds with the interval that treats worlds as the
    unit and, beside it, the pooled interval over every seed (`overall` rows: `group`, `difference`, `ci_lo`,
    `ci_hi`, `pooled_difference`, `pooled_ci_lo`, `pooled_ci_hi`); a line at 0. An interval that is not defined
    (one seed, one world) is left out: the point alone."""
    plt = _pyplot()
    entries = list(dict.fromkeys(overall.group))
    worlds = list(dict.fromkeys(by_world.world))
    fig, axes = plt.subplots(1, len(entries), figsize=(1.1 * (len(worlds) + 2) * len(entries) + 1.5, 3.8),
                             sharey=True, squeeze=False)

    def bar(ax, x, d, lo, hi, **kw):
        err = np.nan_to_num(np.array([[d - lo], [hi - d]]))
        ax.errorbar([x], [d], yerr=err, fmt="o", ms=5, capsize=3, **kw)

    for ax, entry in zip(axes[0], entries):
        sub = by_world[by_world.group == entry].set_index("world")
        for i, w in enumerate(worlds):
            if w in sub.index:
                r = sub.loc[w]
                bar(ax, i, r.difference, r.ci_lo, r.ci_hi, color="C0",
                    label="each world (over its seeds)" if i == 0 else None)
        o = overall[overall.group == entry].iloc[0]
        bar(ax, len(worlds) + 0.35, o.difference, o.ci_lo, o.ci_hi, color="C3", label="over worlds (worlds as unit)")
        bar(ax, len(worlds) + 0.85, o.pooled_difference, o.pooled_ci_lo, o.pooled_ci_hi, color="C7",
            label="pooled seeds (reference)")
        ax.axhline(0, color="grey", lw=0.7)
        ax.axvline(len(worlds) - 0.3, color="grey", lw=0.5, ls=":")
        ax.set_xticks([*range(len(worlds)), len(worlds) + 0.6], [*worlds, "all"])
        ax.set_title(entry, fontsize=9)
    axes[0, 0].set_ylabel(ylabel)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
