"""bon_curve[proxy]: the best-of-n over-optimization curve of one proxy against the gold.

For each n the unbiased best-of-n expectation of proxy and gold (all N samples, subset weights in log space, records
sorted whole), averaged over prompts with bootstrap CIs over prompts; x-axis d = √KL with KL the analytic *upper
bound* log n − (n−1)/n. Gold and proxy are also given relative to n = 1, and a Gao fit R(d) = d(α − βd) of the
relative gold locates its peak; the same fit bootstrapped over prompts gives CIs of α, β and the peak d*, and its R²
on the mean curve (`gao_fit_bootstrap`).

Examples (`examples.json`, see `pipeline.examples`): for a few evaluation prompts, the response best-of-n picks among
the first n samples (`nested_picks`: one concrete draw, the proxy's argmax) for n = 1, the n of the empirical gold
peak and the largest n, with its proxy and gold scores; text and keys come from the `samples` records (bon_sample).

Writes curve.parquet, fit.json, curve.png and examples.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline.bon import bon_curve_table, bon_per_prompt, kl_bon_bound, nested_picks
from pipeline.config import BonCurveStageConfig
from pipeline.examples import example, example_prompt_ids, lookup, write_examples
from pipeline.gao import bootstrap_fit, fit_bon
from pipeline.plots import plot_bon_curves
from pipeline.records import SCORE_COLUMNS, finite_or_none, read_records, read_sample_shards, score_matrix

VERSION = "4"
log = logging.getLogger("overopt")


def run(cfg: BonCurveStageConfig, inputs: dict[str, Path], out: Path) -> None:
    proxy_file, gold_file = inputs["proxy_scores"] / "scores.parquet", inputs["gold_scores"] / "scores.parquet"
    proxy_records = read_records(proxy_file, SCORE_COLUMNS)
    proxy, prompt_ids = score_matrix(proxy_records, proxy_file)
    gold, _ = score_matrix(read_records(gold_file, SCORE_COLUMNS), gold_file, prompt_ids)  # same rows and columns
    ns = [n for n in cfg.ns if n <= proxy.shape[1]]
    table = bon_curve_table(proxy, gold, ns, n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    if cfg.nested_estimator:
        nested = bon_curve_table(proxy, gold, ns, n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed, estimator="nested")
        table = table.merge(nested[["n", "gold", "proxy"]].rename(columns={"gold": "gold_nested",
                                                                           "proxy": "proxy_nested"}), on="n")
    table.to_parquet(out / "curve.parquet", index=False)
    fit = fit_bon(table.sqrt_kl_bound.to_numpy(), table.gold_rel.to_numpy())
    # the same fit with CIs: prompts resampled, each resample's mean relative-gold curve refitted
    boot = bootstrap_fit("bon", bon_per_prompt(proxy, gold, ns)["gold_rel"], table.sqrt_kl_bound.to_numpy(),
                         n_boot=cfg.bootstrap, ci=cfg.ci, seed=cfg.seed)
    peak, last = table.loc[table.gold.idxmax()], table.iloc[-1]
    summary = {"prompts": proxy.shape[0], "samples_per_prompt": proxy.shape[1], "gao_fit_gold_rel": fit,
               "empirical_peak": {"n": int(peak.n), "kl_bound": float(peak.kl_bound), "gold": float(peak.gold)},
               "gold_at_max_n": float(table.gold.iloc[-1]),
               "gold_at_n1": float((table.gold - table.gold_rel).iloc[0]),  # the baseline, even if 1 is not in ns
               "at_max_kl": {"n": int(last.n), "kl_bound": float(last.kl_bound), "gold": float(last.gold)},
               "gao_fit_bootstrap": boot}
    (out / "fit.json").write_text(json.dumps(finite_or_none(summary), indent=2, allow_nan=False))
    write_bon_examples(cfg, inputs["samples"], proxy, gold, prompt_ids, sorted(proxy_records.sample_idx.unique()),
                       int(peak.n), ns[-1], out / "examples.json")
    plot_bon_curves({cfg.proxy: table}, out / "curve.png", f"best-of-n against proxy {cfg.proxy}")
    log.info("  gold peaks at n=%d (%.3f); gold at n=%d: %.3f; proxy rises %.3f → %.3f", int(peak.n),
             float(peak.gold), int(table.n.iloc[-1]), float(table.gold.iloc[-1]), float(table.proxy.iloc[0]),
             float(table.proxy.iloc[-1]))


def write_bon_examples(cfg: BonCurveStageConfig, samples_dir: Path, proxy: np.ndarray, gold: np.ndarray,
                       prompt_ids: list[str], sample_ids: list, peak_n: int, max_n: int, path: Path) -> None:
    """examples.json: the picks of n = 1, the peak n and the largest n for the example prompts. Column j of the
    score matrices is the j-th smallest sample_idx (how `score_matrix` orders them), so "the first n samples" are
    the n of lowest sample_idx."""
    samples = read_sample_shards(samples_dir).set_index(["prompt_id", "sample_idx"])
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
