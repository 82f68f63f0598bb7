"""knowledge_pairs: minimal pairs for the knowledge-use diagnostics, independent of any proxy.

Tiny world: on the held-out evaluation prompts that best-of-n uses (never a training prompt), `n_pairs` pairs per kind
(`pipeline.world.minimal_pair`), seeded: `intruder` (a correct list vs the same list with one item replaced by a word
of another category) and `repeat` (the same with one item replaced by a repeat of another item; prompts with k ≥ 2).
Each pair differs in exactly one word and keeps the length, so neither counting nor length separates it. At paper
scale (or whenever `knowledge.pairs_path` is set) the pairs are read from that file instead.

Writes pairs.parquet (pair_id, prompt_id, kind, prompt, clean, flawed) and metrics.json (pairs per kind).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pandas as pd

from pipeline import world as W
from pipeline.config import KnowledgePairsStageConfig
from pipeline.knowledge import load_pairs_file
from pipeline.records import KNOWLEDGE_PAIR_COLUMNS, prompt_text, read_records, write_records

VERSION = "1"
log = logging.getLogger("overopt")


def world_pairs(eval_prompts: pd.DataFrame, n_pairs: int, seed: int) -> pd.DataFrame:
    """`n_pairs` minimal pairs per kind on `eval_prompts` (prompt_id, prompt), prompts drawn with replacement."""
    specs = [(pid, prompt, W.parse_prompt(prompt_text(prompt))) for pid, prompt in zip(eval_prompts.prompt_id,
                                                                                      eval_prompts.prompt)]
    rows = []
    for kind in W.MINIMAL_PAIR_KINDS:
        rng = random.Random(f"{seed}:{kind}")  # one stream per kind: adding a kind leaves the others' pairs as they are
        eligible = [s for s in specs if kind != "repeat" or s[2].k >= 2]
        if not eligible:
            log.warning("  no evaluation prompt can carry a %r minimal pair (all have k = 1): none made", kind)
            continue
        for i in range(n_pairs):
            prompt_id, prompt, spec = rng.choice(eligible)
            clean, flawed = W.minimal_pair(spec, kind, rng)
            rows.append({"pair_id": f"{kind}{i:05d}", "prompt_id": prompt_id, "kind": kind, "prompt": prompt,
                         "clean": " ".join(clean), "flawed": " ".join(flawed)})
    return pd.DataFrame(rows, columns=KNOWLEDGE_PAIR_COLUMNS)


def run(cfg: KnowledgePairsStageConfig, inputs: dict[str, Path], out: Path) -> None:
    if cfg.pairs_path:
        pairs = load_pairs_file(cfg.pairs_path)
    else:
        eval_prompts = read_records(inputs["world"] / "eval_prompts.parquet", ["prompt_id", "prompt"])
        pairs = world_pairs(eval_prompts, cfg.n_pairs, cfg.seed)
    if pairs.empty:
        raise ValueError("knowledge_pairs: no minimal pair was made")
    write_records(pairs, out / "pairs.parquet", KNOWLEDGE_PAIR_COLUMNS)
    counts = {k: int(n) for k, n in pairs.kind.value_counts().sort_index().items()}
    (out / "metrics.json").write_text(json.dumps({"pairs": len(pairs), "per_kind": counts,
                                                  "prompts": int(pairs.prompt_id.nunique())}, indent=2))
    log.info("  %d minimal pairs on %d prompts: %s", len(pairs), pairs.prompt_id.nunique(),
             ", ".join(f"{k} {n}" for k, n in counts.items()))
    for _, r in pairs.drop_duplicates("kind").iterrows():
        log.info("  e.g. %s: %r  clean %r  flawed %r", r.kind, prompt_text(r.prompt), r.clean, r.flawed)
