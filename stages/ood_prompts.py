"""ood_prompts: out-of-distribution evaluation prompts for best-of-n and the RL exports (`ood:` section).

Tiny world: `n_prompts` distinct prompts drawn without replacement, seeded by the world's seed, from the world's OOD
prompt space (`pipeline.world.ood_prompt_space`: an unseen verb — show, suggest, mention — or opener — kindly — or a
list length of 6 or 7; the proxies' training pairs and the base policy's demonstrations have none of these). Paper
scale (or whenever `prompts_path` is set): the first `n_prompts` rows of that file.

Either way no OOD prompt may be an in-distribution evaluation prompt (input role `id_prompts`: the world or
eval_prompts artifact): an overlap is an error naming the prompt. Kept apart from the world stage so that turning OOD
evaluation on changes no artifact of an existing study.

Writes eval_prompts.parquet (prompt_id, prompt; the tiny world's also k, category, verb) in the format of the ID
evaluation prompts, which the sampling stages (bon_sample, ppo_sample) read unchanged.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pandas as pd

from pipeline import world as W
from pipeline.config import OODPromptsStageConfig
from pipeline.records import RecordError, load_prompts_file, messages, read_records, user_prompt

VERSION = "1"
log = logging.getLogger("overopt")


def world_ood_prompts(n_prompts: int, seed: int) -> pd.DataFrame:
    """`n_prompts` distinct prompts of the tiny world's OOD prompt space, drawn with a stream of their own seeded by
    `seed` (the world's): prompt_id `oodev<i>`, prompt, k, category, verb."""
    space = W.ood_prompt_space()
    if n_prompts > len(space):
        raise ValueError(f"ood.n_prompts ({n_prompts}) exceeds the tiny world's {len(space)} OOD prompts")
    specs = random.Random(f"ood_prompts:{seed}").sample(space, n_prompts)
    return pd.DataFrame({"prompt_id": [f"oodev{i:04d}" for i in range(len(specs))],
                         "prompt": [user_prompt(s.render()) for s in specs],
                         "k": [s.k for s in specs], "category": [s.category for s in specs],
                         "verb": [s.verb for s in specs]})


def _prompt_key(prompt) -> str:
    return repr([(m["role"], m["content"]) for m in messages(prompt)])


def check_disjoint(ood: pd.DataFrame, id_prompts: pd.DataFrame, source: str) -> None:
    """No OOD prompt is an in-distribution evaluation prompt, by text or by prompt_id (`source` names where the OOD
    prompts came from in the error)."""
    id_texts = {_prompt_key(p) for p in id_prompts.prompt}
    shared = [pid for pid, p in zip(ood.prompt_id, ood.prompt) if _prompt_key(p) in id_texts]
    shared += sorted(set(ood.prompt_id) & set(id_prompts.prompt_id.astype(str)))
    if shared:
        raise RecordError(f"{source}: {len(shared)} OOD prompt(s) are also in-distribution evaluation prompts (by text "
                          f"or prompt_id), e.g. prompt_id {shared[0]!r}; OOD prompts must be held out from them")


def run(cfg: OODPromptsStageConfig, inputs: dict[str, Path], out: Path) -> None:
    if cfg.prompts_path:
        prompts = load_prompts_file(cfg.prompts_path, "ood.prompts_path", cfg.n_prompts)
        if len(prompts) < cfg.n_prompts:
            log.warning("  only %d OOD prompts in %s (ood.n_prompts = %d)", len(prompts), cfg.prompts_path,
                        cfg.n_prompts)
        source = f"ood.prompts_path {cfg.prompts_path}"
    else:
        prompts = world_ood_prompts(cfg.n_prompts, cfg.seed)
        source = "the tiny world's OOD prompts"
    check_disjoint(prompts, read_records(inputs["id_prompts"] / "eval_prompts.parquet", ["prompt_id", "prompt"]),
                   source)
    prompts.to_parquet(out / "eval_prompts.parquet", index=False)
    log.info("  %d OOD evaluation prompts from %s", len(prompts), source)
