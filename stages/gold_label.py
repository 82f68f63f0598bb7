"""gold_label: preference pairs from gold-scored candidates, with seeded label noise kept beside the clean label.

`chosen`/`rejected` follow the gold scores (`label_clean` is always 1); ties and pairs the gold could not score
(over its max length) are dropped, never truncated. `label_noisy` is 0 on an exact, seeded fraction of pairs whose
preference the noisy annotator flipped. The split is by prompt, so test pairs have prompts no training pair has.

Writes pairs.parquet (train + test splits), ood_pairs.parquet (tiny world; clean labels only), metrics.json, and
logs a few labeled examples so a person can check the world by eye (`overopt show` prints more).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import GoldLabelStageConfig
from pipeline.records import CANDIDATE_COLUMNS, PAIR_COLUMNS, prompt_text, read_records, write_records
from pipeline.scoring import check_finite

VERSION = "2"
log = logging.getLogger("overopt")


def label_pairs(scored: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Non-tied, scored candidate pairs with chosen = the side of higher gold."""
    gold_a, gold_b = scored.gold_a.to_numpy(), scored.gold_b.to_numpy()
    for side, values in (("gold_a", gold_a), ("gold_b", gold_b)):  # gold_score lets through only over-length NaNs
        check_finite(values, "gold", list(scored.pair_id), over_length=lambda i, v=values: bool(np.isnan(v[i])),
                     where=side)
    over_length = np.isnan(gold_a) | np.isnan(gold_b)
    ties = (gold_a == gold_b) & ~over_length
    keep = ~(ties | over_length)
    a_wins = gold_a > gold_b
    df = scored.loc[keep, ["pair_id", "prompt_id", "prompt"]].copy()
    df["chosen"] = np.where(a_wins, scored.response_a, scored.response_b)[keep]
    df["rejected"] = np.where(a_wins, scored.response_b, scored.response_a)[keep]
    df["gold_chosen"] = np.maximum(gold_a, gold_b)[keep]
    df["gold_rejected"] = np.minimum(gold_a, gold_b)[keep]
    df["label_clean"] = 1
    return df.reset_index(drop=True), {"candidates": len(scored), "ties_dropped": int(ties.sum()),
                                       "over_length_dropped": int(over_length.sum())}


def add_label_noise(df: pd.DataFrame, rate: float, seed: int) -> pd.DataFrame:
    """Flip exactly round(rate * n) pairs, chosen by a seeded permutation; the clean label stays."""
    n_flip = int(round(rate * len(df)))
    flipped = np.random.default_rng(seed).permutation(len(df))[:n_flip]
    df = df.copy()
    df["label_noisy"] = 1
    df.loc[df.index[flipped], "label_noisy"] = 0
    return df


def split_by_prompt(df: pd.DataFrame, test_fraction: float, seed: int) -> pd.Series:
    prompt_ids = np.array(sorted(df.prompt_id.unique()))
    rng = np.random.default_rng(seed)
    test = set(rng.permutation(prompt_ids)[: max(1, int(round(test_fraction * len(prompt_ids))))])
    return df.prompt_id.map(lambda p: "test" if p in test else "train")


def run(cfg: GoldLabelStageConfig, inputs: dict[str, Path], out: Path) -> None:
    candidates_file = inputs["scores"] / "candidates.parquet"
    scored = read_records(candidates_file, CANDIDATE_COLUMNS)
    pairs, stats = label_pairs(scored)
    if len(pairs) == 0:  # never commit a 0-pair artifact: every later stage would fail for a reason it cannot name
        raise ValueError(f"gold_label: no usable pair in {candidates_file}: of {stats['candidates']} candidate "
                         f"pair(s), {stats['over_length_dropped']} are over gold.max_length and "
                         f"{stats['ties_dropped']} are gold ties")
    if len(pairs) > cfg.n_pairs:  # a uniform, seeded subset when the pool is larger than the budget
        pairs = pairs.sample(n=cfg.n_pairs, random_state=cfg.seed).reset_index(drop=True)
    elif len(pairs) < cfg.n_pairs:
        log.warning("  only %d non-tied pairs available (gold_label.n_pairs = %d)", len(pairs), cfg.n_pairs)
    pairs = add_label_noise(pairs, cfg.noise_rate, cfg.noise_seed)
    pairs["split"] = split_by_prompt(pairs, cfg.test_fraction, cfg.seed)
    write_records(pairs, out / "pairs.parquet", PAIR_COLUMNS)
    stats |= {"pairs": len(pairs), "train": int((pairs.split == "train").sum()),
              "test": int((pairs.split == "test").sum()), "noisy_flips": int((pairs.label_noisy == 0).sum()),
              "mean_gold_chosen": float(pairs.gold_chosen.mean()),
              "mean_gold_rejected": float(pairs.gold_rejected.mean())}

    ood_file = inputs["scores"] / "ood_candidates.parquet"
    if ood_file.exists():
        ood, ood_stats = label_pairs(read_records(ood_file, CANDIDATE_COLUMNS))
        ood = add_label_noise(ood, 0.0, cfg.noise_seed)  # OOD is judged against clean labels only
        ood["split"] = "ood"
        write_records(ood, out / "ood_pairs.parquet", PAIR_COLUMNS)
        stats["ood"] = {**ood_stats, "pairs": len(ood)}
    (out / "metrics.json").write_text(json.dumps(stats, indent=2, allow_nan=False))  # strict JSON
    log.info("  %d pairs (%d train / %d test), %d ties dropped, %d noisy flips", stats["pairs"], stats["train"],
             stats["test"], stats["ties_dropped"], stats["noisy_flips"])
    for _, r in pairs.sample(n=min(3, len(pairs)), random_state=0).iterrows():
        log.info("  e.g. %r\n     chosen   %+.1f  %r\n     rejected %+.1f  %r", prompt_text(r.prompt), r.gold_chosen,
                 r.chosen, r.gold_rejected, r.rejected)
