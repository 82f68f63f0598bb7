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
from pipeline.generation import finish_response, sample_responses, stop_token_ids
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.records import SAMPLE_COLUMNS, messages, shards_problem, write_shard

VERSION = "2"
RESUMABLE = True  # complete shards survive a killed run (see pipeline.cache.ArtifactCache.staging)
DATA_PARALLEL = True  # shards split over launch.num_processes ranks; the same artifact for any number
resume_problem = shards_problem  # a killed run's shards are checked before resuming
log = logging.getLogger("overopt")


class VllmSampler:
    """Optional GPU backend, one engine per stage run; prompts go through the same chat template as the HF path."""

    def __init__(self, cfg: BonSampleStageConfig, model_path: str):
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - GPU users only
            raise ImportError("bon.backend is 'vllm' but vllm is not installed (pip install 'overopt[vllm]')") from e
        from transformers import GenerationConfig

        self.cfg = cfg
        self.llm = LLM(model=model_path, seed=cfg.seed, dtype=cfg.policy.dtype, load_format="safetensors",
                       trust_remote_code=cfg.policy.trust_remote_code)
        self.tokenizer = self.llm.get_tokenizer()
        try:
            gen_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            gen_config = None
        self.stop_ids = stop_token_ids(self.tokenizer, gen_config)

    def sample(self, prompts: list, seed: int) -> list[dict]:  # pragma: no cover - GPU users only
        from vllm import SamplingParams

        from pipeline.tokenization import prompt_ids

        s = self.cfg.sampling
        # one seed per prompt: requests sharing a seed would draw correlated samples across prompts
        params = [SamplingParams(n=self.cfg.n_samples, temperature=s.temperature, top_p=s.top_p,
                                 max_tokens=s.max_new_tokens, seed=seed * 100_003 + i, stop_token_ids=self.stop_ids)
                  for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": prompt_ids(self.tokenizer, p)} for p in prompts], params)
        return [{"prompt_index": i, "sample_idx": j, **finish_response(c.token_ids, self.stop_ids, self.tokenizer,
                                                                      stopped=c.finish_reason == "stop")}
                for i, o in enumerate(outs) for j, c in enumerate(o.outputs)]


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
    elif cfg.backend == "vllm":
        sample = VllmSampler(cfg, model_path).sample
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
    ranks.barrier()  # every rank's shards are written
    if ranks.main:
        (out / "samples.json").write_text(json.dumps({"prompts": len(prompts), "n_samples": cfg.n_samples,
                                                      "shards": len(starts)}))

