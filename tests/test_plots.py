"""Curve plots: fits drawn with a residual panel, a failed fit labelled, RL points in KL order, standardised proxy."""

from __future__ import annotations

import numpy as np
import pandas as pd

import pipeline.plots as plots


def rl_table() -> pd.DataFrame:
    kl = np.array([0.0, 0.3, 0.9, 0.7, 2.0])  # the KL drops between the third and fourth export
    t = pd.DataFrame({"step": [0, 1, 2, 4, 8], "kl_k1": kl, "kl_k1_lo": kl * 0.8, "kl_k1_hi": kl * 1.2,
                      "sqrt_kl": np.sqrt(kl), "gold_rel": [0.0, 0.2, 0.1, 0.25, -0.3],
                      "proxy_rel": [0.0, 1.0, 2.0, 1.5, 3.0]})
    return t.assign(gold_rel_lo=t.gold_rel - 0.05, gold_rel_hi=t.gold_rel + 0.05, proxy_rel_std=t.proxy_rel / 2)


def capture(monkeypatch) -> dict:
    """Keep the axes `_finish` gets, then let it save the figure as usual."""
    seen, finish = {}, plots._finish

    def recording(fig, axes, ylabels, xlabel, legend_size, title, path, residual_ax=None):
        finish(fig, axes, ylabels, xlabel, legend_size, title, path, residual_ax)
        seen.update(axes=list(axes), residual=residual_ax)

    monkeypatch.setattr(plots, "_finish", recording)
    return seen


def test_rl_plot_draws_a_failed_fit_dotted_and_labelled(monkeypatch, tmp_path):
    seen = capture(monkeypatch)
    fit = {"gao_fit_gold_rel": {"alpha": 0.5, "beta": 0.6}, "fit_check": {"ok": False}}
    plots.plot_rl_curves({"bt": [rl_table()]}, {}, tmp_path / "rl.png", "t", fits={"bt": [fit]},
                         labels={"bt": "BT, 300 pairs"})
    assert (tmp_path / "rl.png").stat().st_size > 1000
    gold, proxy = seen["axes"]
    legend = [t.get_text() for t in gold.get_legend().get_texts()]
    assert "BT, 300 pairs: Gao fit (fit fails check)" in legend and "BT, 300 pairs" in legend
    fit_line = next(line for line in gold.get_lines() if line.get_label().endswith("(fit fails check)"))
    assert fit_line.get_linestyle() == ":"
    assert seen["residual"] is not None and len(seen["residual"].collections) > 0  # residuals with error bars
    # points joined in KL order; the proxy panel shows the standardised score and says so
    points = next(c for c in gold.containers if c.get_label() == "BT, 300 pairs")  # errorbar: line + KL bars
    xs = points.lines[0].get_xdata()
    assert np.all(np.diff(np.asarray(xs, dtype=float)) >= 0)
    assert "in sd" in proxy.get_ylabel()


def test_plots_without_fits_keep_two_panels(monkeypatch, tmp_path):
    seen = capture(monkeypatch)
    plots.plot_rl_curves({"bt": [rl_table(), rl_table()]}, {}, tmp_path / "rl.png", "t")
    assert seen["residual"] is None
    assert "in sd" in seen["axes"][1].get_ylabel()
    plots.plot_rl_curves({"bt": [rl_table().drop(columns="proxy_rel_std")]}, {}, tmp_path / "raw.png", "t")
    assert "in sd" not in seen["axes"][1].get_ylabel()  # a table without the column: raw relative proxy


def test_seed_bands_draw_mean_and_t_band(monkeypatch, tmp_path):
    from pipeline.matched_kl import common_grid, over_seeds

    seen = capture(monkeypatch)
    runs = [rl_table().assign(gold=lambda t, k=k: t.gold_rel + 0.05 * k) for k in range(3)]
    band = over_seeds(runs, common_grid(runs, 10))
    plots.plot_seed_bands({"ppo": band}, tmp_path / "band.png", "t", "√KL (measured)", labels={"ppo": "PPO vs BT"})
    ax = seen["axes"][0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "PPO vs BT: mean of 3 seeds, band 95 % t-interval over seeds"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), band["mean"])
