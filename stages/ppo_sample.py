"""ppo_sample[p] (and grpo_sample[p], rloo_sample[p]): samples of every policy an RL stage exported (input role `rl`),
on the best-of-n evaluation prompts, with the KL to the initial policy measured on them and the proxy's scores.

The x-axis of an RL over-optimization curve is measured here, never taken from a trainer's log: each export samples
`n_samples` responses per evaluation prompt at temperature 1 (top-p 1), and for every sample the pipeline computes the
teacher-forced log-probs of its tokens (the token that ended the turn included) under the exported policy and under
the initial policy. Per sequence:

    k1 = Σ_t (log π − log π_init)            its mean over samples estimates KL(π ‖ π_init), in nats
    k3 = Σ_t ((r − 1) − log r), r = π_init/π  also unbiased, and ≥ 0 for every sample

Each export samples its prompts in shards of `prompts_per_shard` (default: all of them in one), shard i with seed + i,
the same seeds for every export (common random numbers: differences between exports are less noisy). A shard
(export, prompt shard) is one unit of work, sampled, KL-measured and proxy-scored whole and written atomically, so a
killed run resumes at the missing ones; data-parallel, the missing units are dealt round robin to the ranks, and 1, 2
or k ranks (or a resumed run with any number) write the same shards. The gold scores these samples in its own stage
(ppo_gold[p]), so the gold model never sits in RL memory.

Writes shards/shard_<step>_<prompt shard>.parquet (`RL_SAMPLE_COLUMNS`; against an InfoRM proxy also `outlier`,
each sample's latent outlier score, as in bon_score) and samples.json.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import PPOSampleStageConfig, SamplingConfig
from pipeline.distributed import data_parallel_ranks
from pipeline.exports import export_step, list_exports
from pipeline.generation import sample_responses
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.ppo.core import kl_per_token
from pipeline.ppo.rollout import sequence_logprobs
from pipeline.records import RL_SAMPLE_COLUMNS, messages, read_records, shards_problem, write_shard
from pipeline.scoring import build_scorer, check_finite, score_rollouts
from pipeline.tokenization import pad_token_id, prompt_ids

VERSION = "2"  # 2: sampled per shard of prompts with seed + shard (one shard of all prompts by default)
RESUMABLE = True
DATA_PARALLEL = True  # (export, prompt shard) units split over launch.num_processes ranks; the same artifact for any
resume_problem = shards_problem  # a killed run's shards are checked before resuming
log = logging.getLogger("overopt")


def measured_kl(policy, init_policy, query_rows: list[list[int]], rows: list[dict], pad_id: int,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence k1 and k3 estimates of KL(π ‖ π_init) on samples of π (records of `sample_responses`)."""
    responses = [r["token_ids"] + ([r["stop_id"]] if r["stop_id"] is not None else []) for r in rows]
    logp = sequence_logprobs(policy, query_rows, responses, pad_id, batch_size)
    logp_init = sequence_logprobs(init_policy, query_rows, responses, pad_id, batch_size)
    k1 = np.array([float(kl_per_token(a, b, "k1").sum()) for a, b in zip(logp, logp_init)])
    k3 = np.array([float(kl_per_token(a, b, "k3").sum()) for a, b in zip(logp, logp_init)])
    return k1, k3


def run(cfg: PPOSampleStageConfig, inputs: dict[str, Path], out: Path) -> None:
    init_path = cfg.policy.model_id or str(inputs["policy"] / "model")
    tokenizer = load_tokenizer(init_path, cfg.policy.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    prompts = pd.read_parquet(inputs["prompts"] / "eval_prompts.parquet")  # the best-of-n evaluation prompts
    chat = [messages(p) for p in prompts.prompt]
    prompt_keys = prompts.prompt_id.to_numpy()
    heads = [prompt_ids(tokenizer, m) for m in chat]
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.batch_size)
    exports = list_exports(inputs["rl"])
    per_shard = cfg.prompts_per_shard or len(prompts)
    starts = list(range(0, len(prompts), per_shard))
    shard_dir = out / "shards"
    ranks = data_parallel_ranks()
    todo = None
    if ranks.main:  # one view of what is missing, taken before any rank writes
        shard_dir.mkdir(exist_ok=True)
        for f in shard_dir.glob("*.tmp"):  # half-written by a killed run
            f.unlink()
        todo = [(export, shard) for export in exports for shard in range(len(starts))
                if not (shard_dir / f"shard_{export_step(export):05d}_{shard:05d}.parquet").exists()]
    todo = ranks.mine(ranks.broadcast(todo))
    if todo:
        init_policy = load_causal_lm(init_path, cfg.policy.dtype, cfg.policy.trust_remote_code)
        scorer = build_scorer(cfg.scorer, inputs)
    for export, units in itertools.groupby(todo, key=lambda unit: unit[0]):  # export-major: loaded once per rank
        step, shards = export_step(export), [shard for _, shard in units]
        # vLLM: every shard of the export through one engine, closed before the HF copy is loaded for the KL
        drawn = vllm_samples(cfg, export, [chat[starts[shard]:starts[shard] + per_shard]
                                           for shard in shards], shards, sampling) if cfg.backend == "vllm" else None
        policy = load_causal_lm(export, cfg.policy.dtype, cfg.policy.trust_remote_code)
        for pos, shard in enumerate(shards):
            first = starts[shard]
            indices = list(range(first, min(first + per_shard, len(prompts))))
            rows = drawn[pos] if drawn is not None else sample_responses(
                policy, tokenizer, [chat[i] for i in indices], cfg.n_samples, sampling, cfg.seed + shard)
            for r in rows:  # the shard's prompt index -> the evaluation set's
                r["prompt_index"] = indices[r["prompt_index"]]
            query_rows = [heads[r["prompt_index"]] for r in rows]
            k1, k3 = measured_kl(policy, init_policy, query_rows, rows, pad_id, cfg.batch_size)
            extras = {} if cfg.scorer.proxy is not None and cfg.scorer.proxy.type == "inform" else None
            proxy = score_rollouts(scorer, tokenizer, [chat[r["prompt_index"]] for r in rows], query_rows,
                                   [r["token_ids"] for r in rows], [r["response"] for r in rows], extras)
            check_finite(proxy, cfg.scorer.name,
                         [(prompt_keys[r["prompt_index"]], r["sample_idx"]) for r in rows],
                         ("prompt_id", "sample_idx"), where=f"samples of the step-{step} export")
            frame = pd.DataFrame(rows).drop(columns=["token_ids", "stop_id"])
            frame["prompt_id"] = prompt_keys[frame.prompt_index]
            frame["prompt"] = prompts.prompt.to_numpy()[frame.prompt_index]
            frame = frame.assign(step=step, kl_k1=k1, kl_k3=k3, proxy_score=proxy)
            columns = RL_SAMPLE_COLUMNS + (["outlier"] if extras is not None else [])
            if extras is not None:
                frame["outlier"] = extras["outlier"]
            write_shard(frame[columns], shard_dir / f"shard_{step:05d}_{shard:05d}.parquet", columns)
        del policy
    ranks.barrier()  # every rank's shards are written
    if not ranks.main:
        return
    for export in exports:
        step = export_step(export)
        frame = pd.concat([read_records(f, RL_SAMPLE_COLUMNS)
                           for f in sorted(shard_dir.glob(f"shard_{step:05d}_*.parquet"))])
        log.info("  step %d: KL %.3f (k3 %.3f) nats, proxy %.3f, length %.1f", step, frame.kl_k1.mean(),
                 frame.kl_k3.mean(), frame.proxy_score.mean(), frame.n_tokens.mean())
    (out / "samples.json").write_text(json.dumps({"prompts": len(prompts), "n_samples": cfg.n_samples,
                                                  "exports": [export_step(d) for d in exports]}))


def vllm_samples(cfg: PPOSampleStageConfig, export: Path, shard_prompts: list[list], shards: list[int],
                 sampling: SamplingConfig) -> list[list[dict]]:
    """Each shard's samples from `export` through vLLM (one engine, one `generate` over the shards): records of
    `sample_responses` with prompt_index within the shard. A prompt's request is seeded by its shard and its place
    in it (`request_seed(seed + shard, index)`), the same for every export, rank and batch."""
    from pipeline.vllm_backend import VllmSampler, request_seed

    engine = VllmSampler(str(export), dtype=cfg.policy.dtype, trust_remote_code=cfg.policy.trust_remote_code,
                         seed=cfg.seed, tensor_parallel_size=cfg.tensor_parallel_size,
                         backend_key="{ppo,rl,dpo}.eval.backend", tp_key="{ppo,rl,dpo}.eval.tensor_parallel_size")
    flat = [(pos, i) for pos, chunk in enumerate(shard_prompts) for i in range(len(chunk))]
    rows = engine.sample([shard_prompts[pos][i] for pos, i in flat], cfg.n_samples, sampling,
                         [request_seed(cfg.seed + shards[pos], i) for pos, i in flat])
    engine.close()
    out: list[list[dict]] = [[] for _ in shards]
    for r in rows:
        pos, i = flat[r["prompt_index"]]
        out[pos].append({**r, "prompt_index": i})
    return out
