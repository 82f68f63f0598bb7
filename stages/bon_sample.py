"""bon_sample: N samples per evaluation prompt from the base policy, independent of any proxy.

Prompts are processed in shards of `prompts_per_shard`; each shard is sampled with its own seed (seed + shard index)
and written atomically, so a killed run resumes at the first missing shard and gives the same samples. Data-parallel:
under a launcher the missing shards are dealt round robin to the ranks, each writing its own, so 1, 2 or k ranks (and
a resumed run with any number) write the same shards.

Writes shards/shard_XXXXX.parquet (records keyed by prompt_id, sample_idx; raw response text, token counts, whether
a stop token ended the turn) and samples.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from pipeline.config import BonSampleStageConfig
from pipeline.distributed import data_parallel_ranks
from pipeline.generation import sample_responses
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.records import SAMPLE_COLUMNS, messages, shards_problem, write_shard

VERSION = "2"
RESUMABLE = True  # complete shards survive a killed run (see pipeline.cache.ArtifactCache.staging)
DATA_PARALLEL = True  # shards split over launch.num_processes ranks; the same artifact for any number
resume_problem = shards_problem  # a killed run's shards are checked before resuming
log = logging.getLogger("overopt")


def run(cfg: BonSampleStageConfig, inputs: dict[str, Path], out: Path) -> None:
    model_path = cfg.policy.model_id or str(inputs["policy"] / "model")
    prompts = pd.read_parquet(inputs["prompts"] / "eval_prompts.parquet")  # from the world or eval_prompts stage
    shard_dir = out / "shards"
    ranks = data_parallel_ranks()
    starts = list(range(0, len(prompts), cfg.prompts_per_shard))
    todo = None
    if ranks.main:  # one view of what is missing, taken before any rank writes
        shard_dir.mkdir(exist_ok=True)
        for f in shard_dir.glob("*.tmp"):  # half-written by a killed run
            f.unlink()
        todo = [(i, s) for i, s in enumerate(starts) if not (shard_dir / f"shard_{i:05d}.parquet").exists()]
        if len(todo) < len(starts):
            log.info("  resuming: %d of %d shards already sampled", len(starts) - len(todo), len(starts))
    todo = ranks.mine(ranks.broadcast(todo))
    if not todo:
        sample = None
    elif cfg.backend == "vllm":  # GPU: one engine per rank; a prompt's seed depends on its shard and place only
        from pipeline.vllm_backend import VllmSampler, request_seed

        engine = VllmSampler(model_path, dtype=cfg.policy.dtype, trust_remote_code=cfg.policy.trust_remote_code,
                             seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size, backend_key="bon.backend",
                             tp_key="bon.tensor_parallel_size")

        def sample(chunk_prompts, seed):
            seeds = [request_seed(seed, i) for i in range(len(chunk_prompts))]
            return engine.sample(chunk_prompts, cfg.n_samples, cfg.sampling, seeds)
    else:
        tokenizer = load_tokenizer(model_path, cfg.policy.trust_remote_code)
        model = load_causal_lm(model_path, cfg.policy.dtype, cfg.policy.trust_remote_code)

        def sample(chunk_prompts, seed):
            return sample_responses(model, tokenizer, chunk_prompts, cfg.n_samples, cfg.sampling, seed)

    for shard, start in tqdm(todo, desc="bon_sample shards", leave=False):
        chunk = prompts.iloc[start:start + cfg.prompts_per_shard].reset_index(drop=True)
        rows = sample([messages(p) for p in chunk.prompt], cfg.seed + shard)  # a seed per shard: resumable
        frame = pd.DataFrame(rows)
        frame["prompt_id"] = chunk.prompt_id.to_numpy()[frame.prompt_index]
        frame["prompt"] = chunk.prompt.to_numpy()[frame.prompt_index]
        write_shard(frame[SAMPLE_COLUMNS], shard_dir / f"shard_{shard:05d}.parquet", SAMPLE_COLUMNS)
    if todo and cfg.backend == "vllm":  # an inline stage shares the runner's process with the stages after it
        engine.close()
    ranks.barrier()  # every rank's shards are written
    if ranks.main:
        (out / "samples.json").write_text(json.dumps({"prompts": len(prompts), "n_samples": cfg.n_samples,
                                                      "shards": len(starts)}))

