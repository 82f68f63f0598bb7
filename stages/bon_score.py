"""bon_score[scorer] (and ppo_gold[p]): score every sample of a sampling stage with one scorer (the gold, or one
proxy). Best-of-n samples are keyed (prompt_id, sample_idx); samples of RL exports also by their `step`.

Data-parallel: under a launcher each rank computes whole scoring batches (`pipeline.scoring.data_parallel`) and rank 0
writes the table, the same bytes for any number of ranks.

Cached per (samples, scorer), so adding a proxy scores only with that proxy. An ensemble does not re-score: it
combines its members' bon_score artifacts, each standardised with the member's reference-set statistics.

Writes scores.parquet ((step,) prompt_id, sample_idx, score); an InfoRM proxy's also has `outlier`, the Mahalanobis
distance of each sample's latent mean to the latent distribution on the proxy's training responses
(`pipeline.scoring.mahalanobis`), a detector of over-optimization.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import ScorerStageConfig
from pipeline.distributed import data_parallel_ranks
from pipeline.records import SCORE_COLUMNS, read_records, read_sample_shards, sample_chats, sample_keys, write_records
from pipeline.scoring import (
    SequenceTooLongError,
    build_scorer,
    check_finite,
    combine_members,
    data_parallel,
    load_member_stats,
)

VERSION = "1"
DATA_PARALLEL = True  # scoring batches split over launch.num_processes ranks; the same artifact for any number
log = logging.getLogger("overopt")


def _ensemble_scores(cfg: ScorerStageConfig, inputs: dict[str, Path]) -> pd.DataFrame:
    proxy = cfg.proxy
    frames = [read_records(inputs[f"member{i}_scores"] / "scores.parquet", SCORE_COLUMNS) for i in range(proxy.members)]
    keys = frames[0][["prompt_id", "sample_idx"]]
    for f in frames[1:]:
        if not f[["prompt_id", "sample_idx"]].equals(keys):
            raise ValueError(f"ensemble {proxy.name!r}: member score tables are not aligned on (prompt_id, sample_idx)")
    stats = [load_member_stats(inputs[f"member{i}"]) for i in range(proxy.members)]
    return keys.assign(score=combine_members([f.score.to_numpy() for f in frames], stats, proxy.combine,
                                             proxy.uwo_lambda))


def run(cfg: ScorerStageConfig, inputs: dict[str, Path], out: Path) -> None:
    ranks = data_parallel_ranks()
    if cfg.proxy is not None and cfg.proxy.type == "ensemble":
        scores = _ensemble_scores(cfg, inputs)
    else:
        samples = read_sample_shards(inputs["samples"])
        # an unscored sample cannot be dropped (best-of-n would favour short ones): over-length is an error, found
        # before any forward pass
        scorer = data_parallel(build_scorer(cfg, inputs, strict_length=True), ranks)
        extras = {} if cfg.proxy is not None and cfg.proxy.type == "inform" else None
        try:
            texts = sample_chats(samples), list(samples.response)
            values = scorer.score(*texts) if extras is None else scorer.score(*texts, extras=extras)
        except SequenceTooLongError as e:
            raise SequenceTooLongError(f"{cfg.name}: {e}; raise bon.score_max_length") from None
        scores = samples[sample_keys(samples)].assign(score=values)
        if extras is not None:
            scores["outlier"] = extras["outlier"]
    keys = sample_keys(scores)
    check_finite(scores.score, cfg.name, list(scores[keys].itertuples(index=False, name=None)), keys)
    if not ranks.main:  # every rank holds every score; one writes them
        return
    write_records(scores, out / "scores.parquet", SCORE_COLUMNS)
    log.info("  %s: %d samples scored, mean %.3f", cfg.name, len(scores), float(np.nanmean(scores.score)))
