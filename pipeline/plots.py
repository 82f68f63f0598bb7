"""Plots of over-optimization curves (matplotlib, headless)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

BON_XLABEL = "√KL  (KL = log n − (n−1)/n, an upper bound)"


def plot_bon_curves(curves: dict[str, pd.DataFrame], path: Path, title: str,
                    groups: dict[str, list[str]] | None = None) -> None:
    """Gold (solid, with CI band) and proxy (dashed) relative to n = 1 against √KL, one colour per proxy. With
    `groups` (label -> proxies of `curves`, e.g. the seeds of one proxy), one colour per group: a group of several
    runs is drawn as thinner lines without CI bands (its spread over seeds is what to read), labelled once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups or {name: [name] for name in curves}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, names) in enumerate(groups.items()):
        color, runs = f"C{i}", [n for n in names if n in curves]
        for j, name in enumerate(runs):
            c, single = curves[name], len(runs) == 1
            tag = (label if single else f"{label} ({len(runs)} seeds)") if j == 0 else None
            style = {} if single else {"alpha": 0.7, "lw": 1.0}  # a single run is drawn exactly as before groups
            axes[0].plot(c.sqrt_kl_bound, c.gold_rel, "-o", ms=3, color=color, label=tag and f"{tag}: gold", **style)
            if single:
                axes[0].fill_between(c.sqrt_kl_bound, c.gold_rel_lo, c.gold_rel_hi, color=color, alpha=0.2)
            axes[1].plot(c.sqrt_kl_bound, c.proxy_rel, "--s", ms=3, color=color, label=tag and f"{tag}: proxy",
                         **style)
    _finish(fig, axes, ("gold score − gold at n=1", "proxy score − proxy at n=1"), BON_XLABEL, 8, title, path)


def plot_bon_seed_bands(bands: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """Per proxy trained with several seeds: the mean best-of-n curve over its seeds (gold left, proxy right, both
    relative to n = 1) with a band from the seeds' minimum to their maximum at each n. A band table has the columns
    sqrt_kl_bound, seeds, {gold_rel,proxy_rel}_{mean,min,max} (the report's bon_curves_over_seeds.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, b) in enumerate(bands.items()):
        color = f"C{i}"
        for ax, col, style in ((axes[0], "gold_rel", "-o"), (axes[1], "proxy_rel", "--s")):
            ax.plot(b.sqrt_kl_bound, b[f"{col}_mean"], style, ms=3, color=color,
                    label=f"{label}: mean of {int(b.seeds.iloc[0])} seeds, band min–max")
            ax.fill_between(b.sqrt_kl_bound, b[f"{col}_min"], b[f"{col}_max"], color=color, alpha=0.2)
    _finish(fig, axes, ("gold score − gold at n=1", "proxy score − proxy at n=1"), BON_XLABEL, 8, title, path)


def _finish(fig, axes, ylabels: tuple[str, str], xlabel: str, legend_size: int, title: str, path: Path) -> None:
    """Labels, a zero line and legends on both panels; title; save and close."""
    import matplotlib.pyplot as plt

    axes[0].set_ylabel(ylabels[0])
    axes[1].set_ylabel(ylabels[1])
    for ax in axes:
        ax.set_xlabel(xlabel)
        ax.axhline(0, color="gray", lw=0.5)
        if ax.get_legend() is None:  # a plot that built its own legend (plot_overlay) keeps it
            ax.legend(fontsize=legend_size)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rl_curves(runs: dict[str, list[pd.DataFrame]], bon: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """RL runs (solid; √ of the KL measured on samples; the CI band when a label has one run) and best-of-n curves
    (dashed; √ of the KL upper bound) on shared axes: gold relative to the initial policy (left), proxy relative to
    it (right). One colour per label; a best-of-n curve with the same label as some runs shares their colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys([*runs, *bon]))}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, tables in runs.items():
        for j, rl in enumerate(tables):
            name = (label + (f" ({len(tables)} seeds)" if len(tables) > 1 else "")) if j == 0 else None
            alpha = 0.9 if len(tables) == 1 else 0.6
            axes[0].plot(rl.sqrt_kl, rl.gold_rel, "-o", ms=3, color=colors[label], alpha=alpha, label=name)
            axes[1].plot(rl.sqrt_kl, rl.proxy_rel, "-o", ms=3, color=colors[label], alpha=alpha, label=name)
            if len(tables) == 1:
                axes[0].fill_between(rl.sqrt_kl, rl.gold_rel_lo, rl.gold_rel_hi, color=colors[label], alpha=0.2)
    for label, table in bon.items():
        name = f"{label}: best-of-n" if label in runs else label
        axes[0].plot(table.sqrt_kl_bound, table.gold_rel, "--", color=colors[label], alpha=0.7, label=name)
        axes[1].plot(table.sqrt_kl_bound, table.proxy_rel, "--", color=colors[label], alpha=0.7, label=name)
    _finish(fig, axes, ("gold score − initial policy's", "proxy score − initial policy's"),
            "√KL to the initial policy (RL: measured; best-of-n: upper bound)", 7, title, path)


@dataclass(frozen=True)
class Overlay:
    """One curve of `plot_overlay`: its table, the column of its x-axis, its colour key (a proxy) and its line-style
    key (a study)."""

    table: pd.DataFrame
    x: str
    colour: str
    style: str


LINE_STYLES = ("-", "--", ":", "-.")


def plot_overlay(curves: list[Overlay], path: Path, title: str, xlabel: str) -> None:
    """Curves of several studies on shared axes: gold with its CI band (left) and gold relative to the initial policy
    (right), against each curve's x column. One colour per proxy, one line style per study; the legends name the
    colours (left) and the styles (right) once each instead of every pair. Absolute gold is drawn as well as the
    relative: studies with different base policies start from different gold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colour_keys = list(dict.fromkeys(c.colour for c in curves))
    style_keys = list(dict.fromkeys(c.style for c in curves))
    cmap = plt.get_cmap("tab10" if len(colour_keys) <= 10 else "tab20")
    colours = {k: cmap(i % cmap.N) for i, k in enumerate(colour_keys)}
    styles = {k: LINE_STYLES[i % len(LINE_STYLES)] for i, k in enumerate(style_keys)}
    per_pair = pd.Series([(c.colour, c.style) for c in curves]).value_counts()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in curves:
        x, colour, style = c.table[c.x], colours[c.colour], styles[c.style]
        axes[0].plot(x, c.table.gold, style, marker="o", ms=2.5, color=colour, alpha=0.85)
        axes[1].plot(x, c.table.gold_rel, style, marker="o", ms=2.5, color=colour, alpha=0.85)
        if per_pair[(c.colour, c.style)] == 1 and len(curves) <= 8:  # more bands than that blur into one
            axes[0].fill_between(x, c.table.gold_lo, c.table.gold_hi, color=colour, alpha=0.12)
    axes[0].legend(handles=[Line2D([], [], color=colours[k], label=k) for k in colour_keys], fontsize=7,
                   ncol=2 if len(colour_keys) > 8 else 1)
    axes[1].legend(handles=[Line2D([], [], color="black", ls=styles[k], label=k) for k in style_keys], fontsize=7)
    _finish(fig, axes, ("gold score", "gold score − initial policy's"), xlabel, 7, title, path)
