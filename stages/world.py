"""world: make the embedded tiny world from a seed (tokenizer, corpora, prompt sets, OOD candidates).

Writes
  tokenizer/                 word-level HF tokenizer with a chat template
  pretrain.parquet           clean, correct lists for every verb, opener and k (knowledge worth preserving)
  demonstrations.parquet     flawed lists (wrong counts, repeats, intruders) for in-distribution prompts only
  train_prompts.parquet      prompts whose samples become preference pairs
  eval_prompts.parquet       held-out in-distribution prompts for best-of-n / RL
  ood_candidates.parquet     response pairs of another sampler for unseen verbs, openers and k in {6, 7}
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from pipeline import world as W
from pipeline.config import WorldConfig
from pipeline.records import user_prompt

VERSION = "1"


def _prompt_frame(specs: list[W.PromptSpec], prefix: str) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": [f"{prefix}{i:04d}" for i in range(len(specs))],
                         "prompt": [user_prompt(s.render()) for s in specs],
                         "k": [s.k for s in specs], "category": [s.category for s in specs],
                         "verb": [s.verb for s in specs]})


def run(cfg: WorldConfig, inputs: dict[str, Path], out: Path) -> None:
    rng = random.Random(cfg.seed)
    W.build_tokenizer().save_pretrained(out / "tokenizer")

    # in-distribution prompt space, split into prompts for pairs and held-out evaluation prompts
    id_specs = W.all_prompts(W.TRAIN_VERBS, W.TRAIN_OPENERS, W.TRAIN_KS)
    rng.shuffle(id_specs)
    _, n_eval = W.prompt_split_sizes(len(id_specs), cfg.n_eval_prompts, cfg.eval_prompt_fraction)
    eval_specs, train_specs = id_specs[:n_eval], id_specs[n_eval:]
    _prompt_frame(train_specs, "tr").to_parquet(out / "train_prompts.parquet", index=False)
    _prompt_frame(eval_specs, "ev").to_parquet(out / "eval_prompts.parquet", index=False)

    # pretraining corpus: every verb and opener (OOD ones too) and k up to 7, always correct
    all_specs = W.all_prompts(W.TRAIN_VERBS + W.OOD_VERBS, W.TRAIN_OPENERS + W.OOD_OPENERS, W.OOD_KS)
    pre = [rng.choice(all_specs) for _ in range(cfg.n_pretrain_examples)]
    pd.DataFrame({"prompt": [user_prompt(s.render()) for s in pre],
                  "response": [" ".join(W.correct_response(s, rng)) for s in pre]}
                 ).to_parquet(out / "pretrain.parquet", index=False)

    # demonstrations: in-distribution training prompts only, with an annotator's flaws
    demos = [rng.choice(train_specs) for _ in range(cfg.n_demonstrations)]
    pd.DataFrame({"prompt": [user_prompt(s.render()) for s in demos],
                  "response": [" ".join(W.flawed_demonstration(s, rng, cfg.demo_p_short, cfg.demo_p_long,
                                                               cfg.demo_p_duplicate, cfg.demo_p_intruder))
                               for s in demos]}).to_parquet(out / "demonstrations.parquet", index=False)

    # OOD: unseen verbs and opener, k up to 7, responses from another sampler
    ood_space = W.ood_prompt_space()
    ood = [rng.choice(ood_space) for _ in range(cfg.n_ood_pairs)]
    pd.DataFrame({"pair_id": [f"ood{i:05d}" for i in range(len(ood))],
                  "prompt_id": [f"ood:{s.render()}" for s in ood],
                  "prompt": [user_prompt(s.render()) for s in ood],
                  "response_a": [" ".join(W.ood_response(s, rng)) for s in ood],
                  "response_b": [" ".join(W.ood_response(s, rng)) for s in ood]}
                 ).to_parquet(out / "ood_candidates.parquet", index=False)

    (out / "world.json").write_text(json.dumps({
        "vocabulary_size": len(W.vocabulary()), "categories": list(W.CATEGORIES), "train_verbs": W.TRAIN_VERBS,
        "ood_verbs": W.OOD_VERBS, "train_ks": W.TRAIN_KS, "ood_ks": W.OOD_KS, "n_train_prompts": len(train_specs),
        "n_eval_prompts": len(eval_specs), "gold_reward": W.__doc__}, indent=2))
