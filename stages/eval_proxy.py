"""eval_proxy[name]: pairwise accuracy of a proxy in and out of distribution.

Accuracy is strict (r_c > r_r counts, a tie does not) and ties are reported separately. In-distribution: the test
split of the gold-labeled pairs, against the clean labels and, when noise is on, the noisy ones. Out of distribution:
the tiny world's OOD pairs (unseen verbs, openers and list lengths, another sampler), and at paper scale
HHH-Alignment and MT-Bench human judgments when their paths are configured.

Writes accuracy.parquet (one row per evaluation set) and accuracy.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import EvalProxyStageConfig
from pipeline.hf_data import pair_prompts
from pipeline.records import PAIR_COLUMNS, read_records
from pipeline.scoring import build_scorer, check_finite, over_length_check

VERSION = "2"
log = logging.getLogger("overopt")


def pairwise_accuracy(r_c: np.ndarray, r_r: np.ndarray, label: np.ndarray | None = None) -> dict:
    """Strict accuracy of preferring `chosen`; with `label` (1 = chosen preferred, 0 = rejected preferred) the
    accuracy against those labels. Pairs the scorer could not score (NaN) are counted and excluded."""
    ok = ~(np.isnan(r_c) | np.isnan(r_r))
    r_c, r_r = r_c[ok], r_r[ok]
    label = np.ones_like(r_c) if label is None else np.asarray(label)[ok]
    ties = r_c == r_r
    correct = np.where(label == 1, r_c > r_r, r_r > r_c)
    return {"pairs": int(ok.sum()), "unscored": int((~ok).sum()), "accuracy": float(correct.mean()) if ok.any() else
            float("nan"), "ties": int(ties.sum())}


def run(cfg: EvalProxyStageConfig, inputs: dict[str, Path], out: Path) -> None:
    scorer = build_scorer(cfg.scorer, inputs)
    pairs = read_records(inputs["pairs"] / "pairs.parquet", PAIR_COLUMNS)
    sets = {"id_test": pairs[pairs.split == "test"]}
    ood_file = inputs["pairs"] / "ood_pairs.parquet"
    if ood_file.exists():
        sets["ood"] = read_records(ood_file, PAIR_COLUMNS)
    if cfg.eval.hhh_path:
        from pipeline.hf_data import load_hhh_alignment

        hhh = load_hhh_alignment(cfg.eval.hhh_path)
        for subset, frame in hhh.groupby("subset"):
            sets[f"hhh_{subset}"] = frame
        sets["hhh_all"] = hhh
    if cfg.eval.mt_bench_path:
        from pipeline.hf_data import load_mt_bench_human

        sets["mt_bench"] = load_mt_bench_human(cfg.eval.mt_bench_path, keep_ties=False)

    rows = []
    for name, frame in sets.items():
        if frame.empty:  # an accuracy of nothing would be NaN, which is not JSON; say so instead
            log.warning("eval_proxy[%s]: evaluation set %r has no pairs; skipped", cfg.scorer.name, name)
            continue
        prompts_c, prompts_r = pair_prompts(frame)  # MT-Bench turn 2: each side in its own model's conversation
        r_c = scorer.score(prompts_c, list(frame.chosen))
        r_r = scorer.score(prompts_r, list(frame.rejected))
        for side, prompts, responses, r in (("chosen", prompts_c, list(frame.chosen), r_c),
                                            ("rejected", prompts_r, list(frame.rejected), r_r)):
            check_finite(r, cfg.scorer.name, list(frame.pair_id), ("pair_id",),
                         over_length_check(scorer, prompts, responses), where=f"{name}, {side}")
        rows.append({"proxy": cfg.scorer.name, "set": name, "labels": "clean", **pairwise_accuracy(r_c, r_r)})
        if "label_noisy" in frame and (frame.label_noisy == 0).any():
            rows.append({"proxy": cfg.scorer.name, "set": name, "labels": "noisy",
                         **pairwise_accuracy(r_c, r_r, frame.label_noisy.to_numpy())})
    table = pd.DataFrame(rows)
    table.to_parquet(out / "accuracy.parquet", index=False)
    # every pair over the length limit leaves accuracy NaN: null in strict JSON
    (out / "accuracy.json").write_text(json.dumps(
        [{k: None if isinstance(v, float) and np.isnan(v) else v for k, v in r.items()} for r in rows], indent=2))
    for r in rows:
        log.info("  %-12s %-10s %-6s accuracy %.3f (%d pairs, %d ties)", r["proxy"], r["set"], r["labels"],
                 r["accuracy"], r["pairs"], r["ties"])
