"""ppo_curve[p] (and grpo_curve[p], rloo_curve[p]): the RL over-optimization curve of one run against proxy p — gold
and proxy against the measured √KL, beside p's best-of-n curve.

For each export: the mean over evaluation prompts of the per-prompt mean KL (k1 and k3), proxy and gold scores;
proxy and gold also relative to step 0 (the initial policy), with percentile-bootstrap CIs over prompts (the relative
CIs resample per-prompt differences, so prompt difficulty cancels). Gao et al.'s RL form R(d) = d(α − β log d) is
fitted to the relative gold against d = √KL (k1; a negative estimate near 0 counts as 0); the same fit bootstrapped
over prompts (each resample's mean per-prompt relative gold refitted at the measured d) gives CIs of α, β and the peak
d*, and its R² on the mean curve (`gao_fit_bootstrap`).

proxy_rel_std (with _lo/_hi) is proxy_rel in units of the standard deviation of the step-0 per-sample proxy scores
(all prompts pooled): (proxy − proxy at step 0) / sd, each proxy on its own spread over the initial policy's samples,
so proxies with different scales can share an axis (raw proxy and proxy_rel kept); the same column, defined once
(`gao.with_proxy_rel_std`), as best-of-n's.

Is the fit a description of the data? fit.json's `empirical_peak_ci` is the empirical gold peak (first maximum of the
mean curve, in √KL) with a bootstrap CI over prompts (`gao.empirical_peak`, same resamples as the fit), and
`fit_check` (`gao.check_fit`) says whether the fitted d*'s CI meets it and whether the fit passes through the points'
CIs. A failing check is logged as a warning; its d* is not a finding. (The RL form usually fails here: its shape is
fixed, crossing zero at e·d*, and in the committed tiny RL studies gold falls through zero at 1.1–2.7× the peak, so
least squares pulls d* well below the empirical peak.)

Examples (`examples.json`, see `pipeline.examples`): for the same few evaluation prompts as best-of-n's, one sample
(the lowest sample_idx) of the step-0 export, the export of the empirical gold peak and the last export, with its
proxy and gold scores and its KL, from the sample records.

Against an InfoRM proxy the curve also carries the mean latent outlier score of each export's samples, outlier (with
_lo/_hi), from ppo_sample's `outlier` column.

Writes curve.parquet, fit.json, curve.png and examples.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.bon import bootstrap_ci
from pipeline.config import PPOCurveStageConfig
from pipeline.examples import example, example_prompt_ids, lookup, write_examples
from pipeline.gao import bootstrap_fit, check_curve_fit, fit_rl, peak_row, with_proxy_rel_std
from pipeline.plots import plot_rl_curves
from pipeline.records import (
    SCORE_COLUMNS,
    RecordError,
    read_curve,
    read_records,
    read_sample_shards,
    write_curve,
)

VERSION = "5"  # 5: proxy_std renamed proxy_rel_std (best-of-n's name), its sd taken by numpy
log = logging.getLogger("overopt")

QUANTITIES = ["kl_k1", "kl_k3", "proxy", "gold"]


def per_prompt_means(samples: pd.DataFrame, quantities: list[str] = QUANTITIES) -> dict[str, np.ndarray]:
    """(steps, prompts) matrices of each quantity's mean over a prompt's samples; steps and prompts sorted."""
    means = samples.groupby(["step", "prompt_id"])[quantities].mean()
    return {q: means[q].unstack("prompt_id").sort_index().to_numpy() for q in quantities}


def rl_curve_table(samples: pd.DataFrame, n_boot: int, ci: float, seed: int,
                   source: Path | str = "RL samples") -> pd.DataFrame:
    """One row per export step: kl_k1, kl_k3, sqrt_kl, proxy, gold, proxy_rel, gold_rel, each with _lo/_hi CIs, and
    proxy_rel_std(_lo, _hi): proxy_rel over the standard deviation of the step-0 samples' proxy scores. Samples with an
    `outlier` column (an InfoRM proxy's latent outlier score) add its mean, outlier(_lo, _hi), as the last columns."""
    extra = ["outlier"] if "outlier" in samples.columns else []
    m = per_prompt_means(samples, QUANTITIES + extra)
    steps = np.sort(samples.step.unique())
    if steps[0] != 0:
        raise RecordError(f"{source}: no samples of the step-0 export (the initial policy) to measure gains against; "
                          f"steps present: {steps.tolist()}")
    blocks = {**{q: m[q] for q in QUANTITIES}, "proxy_rel": m["proxy"] - m["proxy"][0],
              "gold_rel": m["gold"] - m["gold"][0], **{q: m[q] for q in extra}}
    S = len(steps)
    # one bootstrap over prompts for every quantity and step: columns are (quantity, step) pairs
    mean, lo, hi = bootstrap_ci(np.concatenate([b.T for b in blocks.values()], axis=1), n_boot, ci, seed)
    table = {"step": steps}
    for j, name in enumerate(blocks):
        sl = slice(j * S, (j + 1) * S)
        table[name], table[f"{name}_lo"], table[f"{name}_hi"] = mean[sl], lo[sl], hi[sl]
    table = pd.DataFrame(table)
    table.insert(1, "sqrt_kl", np.sqrt(table.kl_k1.clip(lower=0.0)))
    return with_proxy_rel_std(table, samples.proxy[samples.step == 0].to_numpy())


def run(cfg: PPOCurveStageConfig, inputs: dict[str, Path], out: Path) -> None:
    samples = read_sample_shards(inputs["samples"])
    gold_file = inputs["gold_scores"] / "scores.parquet"
    gold = read_records(gold_file, ["step", *SCORE_COLUMNS])
    merged = samples.merge(gold, on=["step", "prompt_id", "sample_idx"], how="left", validate="one_to_one")
    if merged.score.isna().any():
        raise RecordError(f"{gold_file}: no gold score for {int(merged.score.isna().sum())} RL samples")
    merged = merged.rename(columns={"proxy_score": "proxy", "score": "gold"})
    table = rl_curve_table(merged, cfg.bootstrap, cfg.ci, cfg.seed, source=inputs["samples"] / "shards")

    peak, far = peak_row(table), table.loc[table.kl_k1.idxmax()]
    summary = {"prompts": int(merged.prompt_id.nunique()), "samples_per_prompt": int(merged.groupby(
        ["step", "prompt_id"]).size().iloc[0]), "steps": table.step.tolist(),
        "empirical_peak": {"step": int(peak.step), "kl": float(peak.kl_k1), "gold": float(peak.gold)},
        "gold_at_last_step": float(table.gold.iloc[-1]), "kl_at_last_step": float(table.kl_k1.iloc[-1]),
        "gold_at_step0": float(table.gold.iloc[0]),
        "at_max_kl": {"step": int(far.step), "kl": float(far.kl_k1), "gold": float(far.gold)}}
    try:
        summary["gao_fit_gold_rel"] = fit_rl(table.sqrt_kl.to_numpy(), table.gold_rel.to_numpy())
    except ValueError as e:  # fewer than two exports with KL > 0: no curve to fit
        summary["gao_fit_gold_rel"] = None
        log.warning("  %s: no Gao fit (%s)", cfg.proxy, e)
    g = per_prompt_means(merged)["gold"]  # (steps, prompts), steps sorted as in the table
    gold_rel, d = (g - g[0]).T, table.sqrt_kl.to_numpy()
    summary["gao_fit_bootstrap"] = None
    if summary["gao_fit_gold_rel"] is not None:  # the same fit with CIs: prompts resampled, each mean curve refitted
        summary["gao_fit_bootstrap"] = bootstrap_fit("rl", gold_rel, d, n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    # the empirical peak with its CI stands with or without a fit; the check needs one
    summary["empirical_peak_ci"], summary["fit_check"] = check_curve_fit(
        "rl", gold_rel, d, table.gold_rel, table.gold_rel_lo, table.gold_rel_hi, summary["gao_fit_bootstrap"],
        n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    summary["empirical_peak_ci"]["step"] = int(table.step.iloc[summary["empirical_peak_ci"]["index"]])
    write_curve(table, out, summary)
    write_rl_examples(cfg, merged, table, int(peak.step), inputs["samples"] / "shards", out / "examples.json")
    bon = read_curve(inputs["bon_curve"]) if "bon_curve" in inputs else None
    plot_rl_curves({cfg.proxy: [table]}, {cfg.proxy: bon} if bon is not None else {}, out / "curve.png",
                   f"RL and best-of-n against proxy {cfg.proxy}", fits={cfg.proxy: [summary]})
    log.info("  gold peaks at step %d (KL %.2f, gold %.3f); last step %d: KL %.2f, gold %.3f, proxy %.3f → %.3f",
             int(peak.step), float(peak.kl_k1), float(peak.gold), int(table.step.iloc[-1]),
             float(table.kl_k1.iloc[-1]), float(table.gold.iloc[-1]), float(table.proxy.iloc[0]),
             float(table.proxy.iloc[-1]))
    if summary["fit_check"] is not None and not summary["fit_check"]["ok"]:
        log.warning("  %s: the Gao fit does not describe the data, its d* is no finding (%s)", cfg.proxy,
                    summary["fit_check"]["reason"])


def write_rl_examples(cfg: PPOCurveStageConfig, merged: pd.DataFrame, table: pd.DataFrame, peak_step: int,
                      source: Path, path: Path) -> None:
    """examples.json: per example prompt, the sample of lowest sample_idx at step 0, the peak step and the last step
    (every export samples with the same seed, so these are the same draw of each policy: the change is the
    policy's, not the sampler's)."""
    chosen = example_prompt_ids(merged.prompt_id)
    first = merged.sort_values("sample_idx").drop_duplicates(["step", "prompt_id"]).set_index(["step", "prompt_id"])
    kl = dict(zip(table.step.astype(int), table.kl_k1))
    points = []
    for point, step in (("low", 0), ("peak", peak_step), ("high", int(table.step.iloc[-1]))):
        examples = []
        for pid in chosen:
            r = lookup(first, (step, pid), source)
            examples.append(example(pid, r.sample_idx, r, r.proxy, r.gold, kl_k1=float(r.kl_k1)))
        points.append({"point": point, "step": step, "kl": float(kl[step]), "examples": examples})
    write_examples(path, cfg.proxy, "rl", chosen, points)
