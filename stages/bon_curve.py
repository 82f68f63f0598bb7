"""bon_curve[proxy]: the best-of-n over-optimization curve of one proxy against the gold.

For each n the unbiased best-of-n expectation of proxy and gold (all N samples, subset weights in log space, records
sorted whole), averaged over prompts with bootstrap CIs over prompts; x-axis d = √KL with KL the analytic *upper
bound* log n − (n−1)/n. Gold and proxy are also given relative to n = 1, and a Gao fit R(d) = d(α − βd) of the
relative gold locates its peak; the same fit bootstrapped over prompts gives CIs of α, β and the peak d*, and its R²
on the mean curve (`gao_fit_bootstrap`).

Beside the bound, the KL best-of-n actually has, estimated from the samples (`with_kl_estimated`, plug-in of Beirami et
al.'s exact formula; identical response texts of a prompt are one outcome): kl_estimated with its bootstrap CI and
sqrt_kl_estimated, the x-axis to use when best-of-n is put beside RL's measured KL. The bound is ≥ the estimate.

proxy_rel_std (with _lo/_hi) is proxy_rel in units of the proxy's standard deviation over all samples (every prompt's
N samples pooled): best-of-n draws from the initial policy, so these are the initial policy's samples, and proxies
with different scales become comparable (raw proxy_rel kept).

Is the fit a description of the data? fit.json's `empirical_peak_ci` is the empirical gold peak (first maximum of the
mean curve) with a bootstrap CI over prompts (`gao.empirical_peak`; same resamples as the fit), and `fit_check`
(`gao.check_fit`) says whether the fitted d*'s CI meets it and whether the fit passes through the points' CIs; a
failing check is logged as a warning, and its d* is not a finding.

Examples (`examples.json`, see `pipeline.examples`): for a few evaluation prompts, the response best-of-n picks among
the first n samples (`nested_picks`: one concrete draw, the proxy's argmax) for n = 1, the n of the empirical gold
peak and the largest n, with its proxy and gold scores; text and keys come from the `samples` records (bon_sample).

An InfoRM proxy's scores carry each sample's latent outlier score (bon_score's `outlier`); its curve then also has
outlier (with _lo/_hi), the expected outlier score of the picked response per n (`with_outlier`).

Writes curve.parquet, fit.json, curve.png and examples.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.bon import (
    bon_curve_table,
    bon_per_prompt,
    bootstrap_ci,
    kl_bon_bound,
    nested_picks,
    unbiased_bon,
    with_kl_estimated,
)
from pipeline.config import BonCurveStageConfig
from pipeline.examples import example, example_prompt_ids, lookup, write_examples
from pipeline.gao import bootstrap_fit, check_curve_fit, fit_bon, peak_row, with_proxy_rel_std
from pipeline.plots import plot_bon_curves
from pipeline.records import (
    SCORE_COLUMNS,
    RecordError,
    read_records,
    read_sample_shards,
    score_matrix,
    write_curve,
)

VERSION = "5"
log = logging.getLogger("overopt")


def run(cfg: BonCurveStageConfig, inputs: dict[str, Path], out: Path) -> None:
    proxy_file, gold_file = inputs["proxy_scores"] / "scores.parquet", inputs["gold_scores"] / "scores.parquet"
    proxy_records = read_records(proxy_file, SCORE_COLUMNS)
    proxy, prompt_ids = score_matrix(proxy_records, proxy_file)
    gold, _ = score_matrix(read_records(gold_file, SCORE_COLUMNS), gold_file, prompt_ids)  # same rows and columns
    sample_ids = sorted(proxy_records.sample_idx.unique())  # column j of the matrices is the j-th smallest
    samples = read_sample_shards(inputs["samples"])
    ns = [n for n in cfg.ns if n <= proxy.shape[1]]
    table = bon_curve_table(proxy, gold, ns, n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    if cfg.nested_estimator:
        nested = bon_curve_table(proxy, gold, ns, n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed, estimator="nested")
        table = table.merge(nested[["n", "gold", "proxy"]].rename(columns={"gold": "gold_nested",
                                                                           "proxy": "proxy_nested"}), on="n")
    table = with_kl_estimated(table, proxy, response_matrix(samples, prompt_ids, sample_ids, inputs["samples"]),
                              n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    table = with_proxy_rel_std(table, proxy)
    if "outlier" in proxy_records.columns:  # an InfoRM proxy: the latent outlier score of the picked responses
        outlier, _ = score_matrix(proxy_records[["prompt_id", "sample_idx"]].assign(score=proxy_records.outlier),
                                  proxy_file, prompt_ids)
        table = with_outlier(table, proxy, outlier, ns, cfg.bootstrap, cfg.ci, cfg.seed)
    fit = fit_bon(table.sqrt_kl_bound.to_numpy(), table.gold_rel.to_numpy())
    # the same fit with CIs: prompts resampled, each resample's mean relative-gold curve refitted
    gold_rel = bon_per_prompt(proxy, gold, ns)["gold_rel"]
    d = table.sqrt_kl_bound.to_numpy()
    boot = bootstrap_fit("bon", gold_rel, d, n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    empirical, check = check_curve_fit("bon", gold_rel, d, table.gold_rel, table.gold_rel_lo, table.gold_rel_hi, boot,
                                       n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    empirical["n"] = {k: int(table.n[np.isclose(d, empirical[k])].iloc[0]) for k in ("estimate", "lo", "hi")}
    peak, last = peak_row(table), table.iloc[-1]
    summary = {"prompts": proxy.shape[0], "samples_per_prompt": proxy.shape[1], "gao_fit_gold_rel": fit,
               "empirical_peak": {"n": int(peak.n), "kl_bound": float(peak.kl_bound), "gold": float(peak.gold)},
               "gold_at_max_n": float(table.gold.iloc[-1]),
               "gold_at_n1": float((table.gold - table.gold_rel).iloc[0]),  # the baseline, even if 1 is not in ns
               "at_max_kl": {"n": int(last.n), "kl_bound": float(last.kl_bound), "gold": float(last.gold)},
               "gao_fit_bootstrap": boot,
               "kl_estimated": {"at_peak": kl_estimated_at(peak), "at_max_n": kl_estimated_at(last)},
               "empirical_peak_ci": empirical, "fit_check": check}
    write_curve(table, out, summary)
    write_bon_examples(cfg, samples, inputs["samples"], proxy, gold, prompt_ids, sample_ids, int(peak.n), ns[-1],
                       out / "examples.json")
    plot_bon_curves({cfg.proxy: table}, out / "curve.png", f"best-of-n against proxy {cfg.proxy}",
                    fits={cfg.proxy: summary})
    log.info("  gold peaks at n=%d (%.3f; KL bound %.2f, estimated %.2f); gold at n=%d: %.3f; proxy rises %.3f → %.3f",
             int(peak.n), float(peak.gold), float(peak.kl_bound), float(peak.kl_estimated), int(table.n.iloc[-1]),
             float(table.gold.iloc[-1]), float(table.proxy.iloc[0]), float(table.proxy.iloc[-1]))
    if not check["ok"]:
        log.warning("  %s: the Gao fit does not describe the data, its d* is no finding (%s)", cfg.proxy,
                    check["reason"])


def response_matrix(samples: pd.DataFrame, prompt_ids: list[str], sample_ids: list, source: Path) -> np.ndarray:
    """(P, N) response texts aligned with the score matrices (rows `prompt_ids`, columns `sample_ids`): the identity
    of each sample for the KL estimate, so that repeats of one response in a prompt count as one outcome."""
    texts = samples.pivot(index="prompt_id", columns="sample_idx", values="response").reindex(
        index=prompt_ids, columns=sample_ids)
    if texts.isna().any().any():
        holes = texts.isna().stack()
        raise RecordError(f"{source}: no sample record for scored (prompt_id, sample_idx) "
                          f"{holes[holes].index[:3].tolist()}; the scores were not made from these samples")
    return texts.to_numpy(dtype=object)


def with_outlier(table: pd.DataFrame, proxy: np.ndarray, outlier: np.ndarray, ns: list[int], n_boot: int, ci: float,
                 seed: int) -> pd.DataFrame:
    """The table with outlier(_lo, _hi) last: the expected outlier score of the response best-of-n picks (the
    unbiased estimator's weights, as for gold), averaged over prompts with a bootstrap CI over prompts."""
    _, per_prompt = unbiased_bon(proxy, outlier, ns)
    mean, lo, hi = bootstrap_ci(per_prompt, n_boot, ci, seed)
    return table.assign(outlier=mean, outlier_lo=lo, outlier_hi=hi)


def kl_estimated_at(row: pd.Series) -> dict:
    """A curve row's n, KL bound and estimated KL with its CI, for fit.json."""
    return {"n": int(row.n), "kl_bound": float(row.kl_bound), "kl_estimated": float(row.kl_estimated),
            "kl_estimated_lo": float(row.kl_estimated_lo), "kl_estimated_hi": float(row.kl_estimated_hi)}


def write_bon_examples(cfg: BonCurveStageConfig, samples: pd.DataFrame, samples_dir: Path, proxy: np.ndarray,
                       gold: np.ndarray, prompt_ids: list[str], sample_ids: list, peak_n: int, max_n: int,
                       path: Path) -> None:
    """examples.json: the picks of n = 1, the peak n and the largest n for the example prompts. Column j of the
    score matrices is the j-th smallest sample_idx (how `score_matrix` orders them), so "the first n samples" are
    the n of lowest sample_idx."""
    samples = samples.set_index(["prompt_id", "sample_idx"])
    chosen = example_prompt_ids(prompt_ids)
    rows = [prompt_ids.index(p) for p in chosen]
    points = [("low", 1), ("peak", peak_n), ("high", max_n)]
    picks = nested_picks(proxy[rows], [n for _, n in points])
    out = []
    for k, (point, n) in enumerate(points):
        examples = []
        for i, (pid, r) in enumerate(zip(chosen, rows)):
            j = int(picks[i, k])
            record = lookup(samples, (pid, sample_ids[j]), samples_dir / "shards")
            examples.append(example(pid, sample_ids[j], record, proxy[r, j], gold[r, j]))
        out.append({"point": point, "n": n, "kl": float(kl_bon_bound(n)), "examples": examples})
    write_examples(path, cfg.proxy, "best-of-n", chosen, out)
