"""gold_score: candidate response pairs, both sides scored by the gold reward (the expensive half of labeling).

Tiny world: sample `samples_per_prompt` responses for each training prompt from the base policy and pair up every
two responses of the same prompt; the world's OOD candidates are scored too. Paper scale: the first `n_pairs` rows of
a Unified-Feedback-schema dataset in its seeded order, both conversations re-scored by the gold RM.

Kept apart from `gold_label` so that label noise and the split (and, in the tiny world, the pair budget) can change
without re-sampling or re-scoring; at paper scale `gold_label.n_pairs` picks the candidates and so is scored here.
Data-parallel: under a launcher each rank computes whole batches of the gold's scoring
(`pipeline.scoring.data_parallel`; the tiny world's programmatic gold is not split) and rank 0 writes. The tiny world's
candidate sampling stays on rank 0 (its random stream is one seed over all prompts: split, it would draw other
samples) and is sent to every rank; with `gold_label.sampling_backend: vllm` it is rank 0's vLLM engine
(`pipeline.vllm_backend`).
Writes candidates.parquet (and ood_candidates.parquet in the tiny world): pair_id, prompt_id, prompt, response_a,
response_b, gold_a, gold_b (NaN where the pair is longer than the gold's max length).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pandas as pd

from pipeline.config import GoldScoreStageConfig, ScorerStageConfig
from pipeline.distributed import data_parallel_ranks
from pipeline.records import CANDIDATE_COLUMNS, messages, write_records
from pipeline.scoring import RewardScorer, build_scorer, check_finite, data_parallel, over_length_check

VERSION = "1"
DATA_PARALLEL = True  # the gold's scoring batches split over launch.num_processes ranks; the same artifact for any
log = logging.getLogger("overopt")


def score_candidates(candidates: pd.DataFrame, scorer: RewardScorer, name: str = "gold") -> pd.DataFrame:
    """Both sides of every candidate pair scored by `scorer`; a non-finite score (other than the NaN of a pair over
    the scorer's max length) raises `NonFiniteScoreError` naming the pair."""
    prompts = [messages(p) for p in candidates.prompt]
    sides = {}
    for side in ("a", "b"):
        responses = list(candidates[f"response_{side}"])
        sides[f"gold_{side}"] = scorer.score(prompts, responses)
        check_finite(sides[f"gold_{side}"], name, list(candidates.pair_id), ("pair_id",),
                     over_length_check(scorer, prompts, responses), where=f"response_{side}")
    return candidates.assign(**sides)


def _require_usable(scored: pd.DataFrame, source: str, max_length: int) -> None:
    """At least one candidate pair must be labelable: both sides scored (not over length) and not a tie."""
    unscored = scored.gold_a.isna() | scored.gold_b.isna()
    ties = ~unscored & (scored.gold_a == scored.gold_b)
    if (~unscored & ~ties).any():
        return
    raise ValueError(f"gold_score: no usable pair in {source}: of {len(scored)} candidate pair(s), "
                     f"{int(unscored.sum())} are over gold.max_length={max_length} tokens and {int(ties.sum())} "
                     f"are gold ties; raise gold.max_length or use other data")


def _policy_candidates(cfg: GoldScoreStageConfig, inputs: dict[str, Path]) -> pd.DataFrame:
    """All same-prompt pairs among `samples_per_prompt` policy samples of each training prompt."""
    from pipeline.generation import sample_responses
    from pipeline.models import load_causal_lm, load_tokenizer

    policy_dir = inputs["policy"] / "model"
    prompts = pd.read_parquet(inputs["world"] / "train_prompts.parquet")
    chat = [messages(p) for p in prompts.prompt]
    if cfg.sampling_backend == "vllm":  # a request per prompt, seeded by the seed and the prompt's place
        from pipeline.vllm_backend import VllmSampler, request_seed

        engine = VllmSampler(str(policy_dir), dtype=cfg.policy.dtype, trust_remote_code=False, seed=cfg.seed,
                             tensor_parallel_size=cfg.tensor_parallel_size,
                             backend_key="gold_label.sampling_backend", tp_key="gold_label.tensor_parallel_size")
        rows = engine.sample(chat, cfg.samples_per_prompt, cfg.sampling,
                             [request_seed(cfg.seed, i) for i in range(len(chat))])
        engine.close()
    else:
        tokenizer, model = load_tokenizer(policy_dir), load_causal_lm(policy_dir, cfg.policy.dtype)
        rows = sample_responses(model, tokenizer, chat, cfg.samples_per_prompt, cfg.sampling, cfg.seed,
                                progress=True)
    by_prompt: dict[int, list[str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_index"], []).append(r["response"])
    cands = []
    for i, responses in by_prompt.items():
        for a, b in itertools.combinations(range(len(responses)), 2):
            cands.append({"pair_id": f"{prompts.prompt_id[i]}-{a}-{b}", "prompt_id": prompts.prompt_id[i],
                          "prompt": prompts.prompt[i], "response_a": responses[a], "response_b": responses[b]})
    return pd.DataFrame(cands)


def run(cfg: GoldScoreStageConfig, inputs: dict[str, Path], out: Path) -> None:
    ranks = data_parallel_ranks()
    # the candidates first: a bad dataset fails before the gold model is loaded
    if cfg.source == "policy_samples":
        candidates = ranks.broadcast(_policy_candidates(cfg, inputs) if ranks.main else None)
    else:
        from pipeline.hf_data import load_unified_feedback

        candidates = load_unified_feedback(cfg.dataset_path, cfg.dataset_config, cfg.dataset_split,
                                           cfg.shuffle_seed, cfg.n_pairs)
    source = cfg.dataset_path if cfg.source == "unified_feedback" else "the base policy's samples"
    if len(candidates) == 0:
        raise ValueError(f"gold_score: no candidate pair in {source}")
    gold = data_parallel(build_scorer(ScorerStageConfig(name="gold", gold=cfg.gold, batch_size=cfg.gold.batch_size,
                                                        max_length=cfg.gold.max_length), {}), ranks)
    scored = score_candidates(candidates, gold)
    _require_usable(scored, source, cfg.gold.max_length)
    ood = None
    if "world" in inputs:
        ood = score_candidates(pd.read_parquet(inputs["world"] / "ood_candidates.parquet"), gold)
    if not ranks.main:  # every rank holds every score; one writes them
        return
    write_records(scored, out / "candidates.parquet", CANDIDATE_COLUMNS)
    if ood is not None:
        write_records(ood, out / "ood_candidates.parquet", CANDIDATE_COLUMNS)
    log.info("  %d candidate pairs scored by the gold", len(candidates))
