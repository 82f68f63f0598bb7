"""knowledge_base: the base policy's knowledge on the minimal pairs — its summed log-probability of each response
given the prompt, log π(y|x) (teacher-forced, through the chat template like every scorer), used as a reference
reward. An AUC well above ½ here and near ½ for a proxy means the knowledge was there to keep and the proxy does not
use it.

Writes scores.parquet (pair_id, prompt_id, kind, score_clean, score_flawed) and auc.json (per kind: AUC with its
bootstrap interval, pairs, ties).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import KnowledgeBaseStageConfig
from pipeline.distributed import data_parallel_ranks
from pipeline.knowledge import score_minimal_pairs
from pipeline.records import KNOWLEDGE_PAIR_COLUMNS, read_records
from pipeline.scoring import data_parallel, load_policy_logprob_scorer

VERSION = "1"
DATA_PARALLEL = True  # scoring batches split over launch.num_processes ranks; the same artifact for any number


def run(cfg: KnowledgeBaseStageConfig, inputs: dict[str, Path], out: Path) -> None:
    pairs = read_records(inputs["pairs"] / "pairs.parquet", KNOWLEDGE_PAIR_COLUMNS)
    policy = cfg.policy.model_id or inputs["policy"] / "model"
    ranks = data_parallel_ranks()
    scorer = data_parallel(load_policy_logprob_scorer(policy, cfg.batch_size, cfg.max_length, cfg.policy.dtype,
                                                      cfg.policy.trust_remote_code, strict_length=True), ranks)
    score_minimal_pairs(scorer, "base policy log-prob", pairs, cfg.bootstrap, cfg.seed, out if ranks.main else None,
                        length_hint="knowledge.max_length")
