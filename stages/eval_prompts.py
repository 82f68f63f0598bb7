"""eval_prompts: held-out evaluation prompts for best-of-n at paper scale (the tiny world makes its own).

As in the paper, the evaluation prompts come from the same Unified-Feedback split as the proxy-training pairs: the
rows that follow the training slice in the same seeded order, keeping only prompts that no training pair uses.

Writes eval_prompts.parquet (prompt_id, prompt) in the world stage's format.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import EvalPromptsStageConfig
from pipeline.hf_data import load_unified_feedback

VERSION = "1"
log = logging.getLogger("overopt")


def run(cfg: EvalPromptsStageConfig, inputs: dict[str, Path], out: Path) -> None:
    # a margin of rows beyond the training slice: some held-out rows repeat a training prompt or each other
    rows = load_unified_feedback(cfg.dataset_path, cfg.dataset_config, cfg.dataset_split, cfg.shuffle_seed,
                                 cfg.n_pairs + 2 * cfg.n_prompts)
    train_prompts = set(rows.prompt_id.iloc[: cfg.n_pairs])
    held_out = rows.iloc[cfg.n_pairs:]
    held_out = held_out[~held_out.prompt_id.isin(train_prompts)].drop_duplicates("prompt_id").head(cfg.n_prompts)
    if len(held_out) < cfg.n_prompts:
        log.warning("  only %d held-out prompts available (bon.n_prompts = %d)", len(held_out), cfg.n_prompts)
    if held_out.empty:
        raise ValueError(f"{cfg.dataset_path}: no held-out prompts after the first {cfg.n_pairs} training rows")
    held_out[["prompt_id", "prompt"]].to_parquet(out / "eval_prompts.parquet", index=False)
    log.info("  %d held-out evaluation prompts", len(held_out))
