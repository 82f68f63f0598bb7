"""knowledge[p]: one proxy's rewards on the minimal pairs (clean vs one word made wrong), through the one scoring
function; the AUC P(r(clean) > r(flawed)) per kind, ties counting ½, with a bootstrap interval over pairs. Compare with
knowledge_base (the base policy's log-probability on the same pairs).

Writes scores.parquet (pair_id, prompt_id, kind, score_clean, score_flawed) and auc.json.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import KnowledgeStageConfig
from pipeline.distributed import data_parallel_ranks
from pipeline.knowledge import score_minimal_pairs
from pipeline.records import KNOWLEDGE_PAIR_COLUMNS, read_records
from pipeline.scoring import build_scorer, data_parallel

VERSION = "1"
DATA_PARALLEL = True  # scoring batches split over launch.num_processes ranks; the same artifact for any number


def run(cfg: KnowledgeStageConfig, inputs: dict[str, Path], out: Path) -> None:
    pairs = read_records(inputs["pairs"] / "pairs.parquet", KNOWLEDGE_PAIR_COLUMNS)
    ranks = data_parallel_ranks()
    scorer = data_parallel(build_scorer(cfg.scorer, inputs, strict_length=True), ranks)
    score_minimal_pairs(scorer, cfg.scorer.name, pairs, cfg.bootstrap, cfg.seed, out if ranks.main else None,
                        length_hint=f"the max_length of proxy {cfg.scorer.name!r}")
