"""gold_label: preference pairs labeled by the gold reward, with seeded label noise kept beside the clean label.

Tiny world: sample responses for each training prompt from the base policy, score them with the gold scorer, pair
up responses of the same prompt, drop ties. Paper scale: take pairs in the Unified-Feedback schema and re-score both
sides with a gold RM. Either way `chosen`/`rejected` follow the gold scores (`label_clean` is always 1) and
`label_noisy` is 0 on an exact, seeded fraction of pairs whose preference the noisy annotator flipped.

Writes pairs.parquet (train + test splits), ood_pairs.parquet (tiny world), metrics.json.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import GoldLabelStageConfig, ScorerStageConfig
from pipeline.models import build_scorer
from pipeline.records import PAIR_COLUMNS, messages, prompt_text, write_records
from pipeline.scoring import RewardScorer

VERSION = "1"
log = logging.getLogger("overopt")


def label_pairs(candidates: pd.DataFrame, scorer: RewardScorer) -> tuple[pd.DataFrame, dict]:
    """Score `response_a`/`response_b` of each candidate pair; keep non-tied pairs with chosen = higher gold."""
    prompts = [messages(p) for p in candidates.prompt]
    gold_a = scorer.score(prompts, list(candidates.response_a))
    gold_b = scorer.score(prompts, list(candidates.response_b))
    over_length = np.isnan(gold_a) | np.isnan(gold_b)
    ties = (gold_a == gold_b) & ~over_length
    keep = ~(ties | over_length)
    a_wins = gold_a > gold_b
    df = candidates.loc[keep, ["pair_id", "prompt_id", "prompt"]].copy()
    df["chosen"] = np.where(a_wins, candidates.response_a, candidates.response_b)[keep]
    df["rejected"] = np.where(a_wins, candidates.response_b, candidates.response_a)[keep]
    df["gold_chosen"] = np.maximum(gold_a, gold_b)[keep]
    df["gold_rejected"] = np.minimum(gold_a, gold_b)[keep]
    df["label_clean"] = 1
    return df.reset_index(drop=True), {"candidates": len(candidates), "ties_dropped": int(ties.sum()),
                                       "over_length_dropped": int(over_length.sum())}


def add_label_noise(df: pd.DataFrame, rate: float, seed: int) -> pd.DataFrame:
    """Flip exactly round(rate * n) pairs, chosen by a seeded permutation; the clean label stays."""
    n_flip = int(round(rate * len(df)))
    flipped = np.random.default_rng(seed).permutation(len(df))[:n_flip]
    df = df.copy()
    df["label_noisy"] = 1
    df.loc[df.index[flipped], "label_noisy"] = 0
    return df


def _policy_candidates(cfg: GoldLabelStageConfig, inputs: dict[str, Path]) -> pd.DataFrame:
    """All same-prompt pairs among `samples_per_prompt` policy samples of each training prompt."""
    from pipeline.generation import sample_responses
    from pipeline.models import load_causal_lm, load_tokenizer

    policy_dir = inputs["policy"] / "model"
    tokenizer, model = load_tokenizer(policy_dir), load_causal_lm(policy_dir, cfg.policy.dtype)
    prompts = pd.read_parquet(inputs["world"] / "train_prompts.parquet")
    rows = sample_responses(model, tokenizer, [messages(p) for p in prompts.prompt], cfg.label.samples_per_prompt,
                            cfg.label.sampling, cfg.label.seed, progress=True)
    by_prompt: dict[int, list[str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], []).append(r["response"])
    cands = []
    for i, responses in by_prompt.items():
        for a, b in itertools.combinations(range(len(responses)), 2):
            cands.append({"pair_id": f"{prompts.prompt_id[i]}-{a}-{b}", "prompt_id": prompts.prompt_id[i],
                          "prompt": prompts.prompt[i], "response_a": responses[a], "response_b": responses[b]})
    return pd.DataFrame(cands)


def _split_by_prompt(df: pd.DataFrame, test_fraction: float, seed: int) -> pd.Series:
    prompt_ids = np.array(sorted(df.prompt_id.unique()))
    rng = np.random.default_rng(seed)
    test = set(rng.permutation(prompt_ids)[: max(1, int(round(test_fraction * len(prompt_ids))))])
    return df.prompt_id.map(lambda p: "test" if p in test else "train")


def run(cfg: GoldLabelStageConfig, inputs: dict[str, Path], out: Path) -> None:
    label = cfg.label
    scorer = build_scorer(ScorerStageConfig(name="gold", gold=cfg.gold, batch_size=cfg.gold.batch_size,
                                            max_length=cfg.gold.max_length), {})
    if label.source == "policy_samples":
        candidates = _policy_candidates(cfg, inputs)
    else:
        from pipeline.hf_data import load_unified_feedback

        # n_pairs candidates, as in the paper: gold ties and over-length pairs dropped below leave slightly fewer
        candidates = load_unified_feedback(label.dataset_path, label.dataset_config, label.dataset_split,
                                           label.shuffle_seed, label.n_pairs)
    pairs, stats = label_pairs(candidates, scorer)
    if len(pairs) > label.n_pairs:  # a uniform, seeded subset when the pool is larger than the budget
        pairs = pairs.sample(n=label.n_pairs, random_state=label.seed).reset_index(drop=True)
    elif len(pairs) < label.n_pairs:
        log.warning("  only %d non-tied pairs available (gold_label.n_pairs = %d)", len(pairs), label.n_pairs)
    pairs = add_label_noise(pairs, label.noise_rate, label.noise_seed)
    pairs["split"] = _split_by_prompt(pairs, label.test_fraction, label.seed)
    write_records(pairs, out / "pairs.parquet", PAIR_COLUMNS)
    stats |= {"pairs": len(pairs), "train": int((pairs.split == "train").sum()),
              "test": int((pairs.split == "test").sum()), "noisy_flips": int((pairs.label_noisy == 0).sum()),
              "mean_gold_chosen": float(pairs.gold_chosen.mean()), "mean_gold_rejected": float(pairs.gold_rejected.mean())}

    if "world" in inputs:
        ood, ood_stats = label_pairs(pd.read_parquet(inputs["world"] / "ood_candidates.parquet"), scorer)
        ood = add_label_noise(ood, 0.0, label.noise_seed)  # OOD is judged against clean labels only
        ood["split"] = "ood"
        write_records(ood, out / "ood_pairs.parquet", PAIR_COLUMNS)
        stats["ood"] = {**ood_stats, "pairs": len(ood)}
    (out / "metrics.json").write_text(json.dumps(stats, indent=2))
    log.info("  %d pairs (%d train / %d test), %d ties dropped, %d noisy flips", stats["pairs"], stats["train"],
             stats["test"], stats["ties_dropped"], stats["noisy_flips"])
    for _, r in pairs.sample(n=min(3, len(pairs)), random_state=0).iterrows():
        log.info("  e.g. %r\n     chosen   %+.1f  %r\n     rejected %+.1f  %r", prompt_text(r.prompt), r.gold_chosen,
                 r.chosen, r.gold_rejected, r.rejected)
