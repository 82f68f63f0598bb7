"""vLLM, the optional GPU backend of every sampler: `bon_sample` (`bon.backend`), `ppo_sample` and its GRPO/RLOO/DPO
uses (`ppo.eval.backend`, `rl.eval.backend`, `dpo.eval.backend`) and `gold_score`'s tiny-world candidate sampling
(`gold_label.sampling_backend`).

One place builds the engine (`VllmSampler`), seeds the requests (`request_seed`) and turns vLLM's outputs into the
records of the Hugging Face path (`pipeline.generation.sample_responses`): prompt_index, sample_idx, response,
n_tokens, finished, token_ids, stop_id. Prompts are encoded by the project's tokenizer (`prompt_ids`), so both
backends see the same prompt tokens, and stop at the same tokens (`stop_token_ids`).

Seeds: each prompt is one request carrying all its `n` samples, seeded with `request_seed(shard seed, index of the
prompt in its shard)`, the shard seed being the stage seed + the shard index (gold_score: one shard of every
prompt). A sample thus depends on (stage seed, prompt position fixed by the config, sample index), not on which
prompts share a batch or which rank draws it; on GPU, equal up to kernel nondeterminism.

Devices: one engine per data-parallel rank. With `tensor_parallel_size` t, the rank with local rank r builds its
engine on visible GPUs r·t … r·t + t − 1 (vLLM's engine process is started with only those visible), so
`launch.num_processes` × t must not exceed the GPUs of a machine. The engine takes 90 % of the memory free on its
GPU when it is built (the rank's Hugging Face models, e.g. ppo_sample's KL models, keep theirs).

`vllm` is imported only when a backend asks for it (`load_vllm`; `pip install -e '.[vllm]'`): tests swap
`load_vllm` for a fake module.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import Iterator, Sequence

from pipeline.config import SamplingConfig
from pipeline.generation import finish_response, stop_token_ids
from pipeline.tokenization import Prompt, prompt_ids

SEED_STRIDE = 100_003  # a prime > any shard's prompt count: distinct (shard seed, index) give distinct seeds
FREE_MEMORY_FRACTION = 0.9  # of the GPU memory free when the engine is built
# a launcher's variables: the engine process must set up its own (one-process) torch.distributed world
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def request_seed(shard_seed: int, index: int) -> int:
    """The vLLM seed of the request of a shard's `index`-th prompt (bon_sample's derivation since it had vLLM)."""
    return shard_seed * SEED_STRIDE + index


def load_vllm(backend_key: str):
    """The `vllm` module, or an ImportError naming the config key that asked for it."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{backend_key} is 'vllm' but vllm is not installed (pip install -e '.[vllm]'), "
                          f"or set {backend_key}: hf") from e
    return vllm


def engine_devices(local_rank: int, tensor_parallel_size: int, visible: Sequence[str], tp_key: str) -> list[str]:
    """The visible GPUs (CUDA_VISIBLE_DEVICES entries) of the engine of the rank with `local_rank`."""
    first, end = local_rank * tensor_parallel_size, (local_rank + 1) * tensor_parallel_size
    if end > len(visible):
        raise ValueError(f"{tp_key}={tensor_parallel_size}: local rank {local_rank}'s vLLM engine needs GPUs "
                         f"{first}..{end - 1}, but {len(visible)} are visible; lower {tp_key} or "
                         f"launch.num_processes (ranks × {tp_key} GPUs per machine)")
    return list(visible[first:end])


@contextmanager
def _engine_environment(tensor_parallel_size: int, tp_key: str) -> Iterator[dict]:
    """While vLLM builds its engine: only this rank's GPUs visible and no launcher variables (vLLM's engine process
    inherits the environment). Yields the extra `LLM` arguments for the device (none without CUDA)."""
    import torch

    saved = {k: os.environ.get(k) for k in (*_LAUNCHER_ENV, "CUDA_VISIBLE_DEVICES")}
    extra = {}
    try:
        if torch.cuda.is_available():
            visible = (os.environ["CUDA_VISIBLE_DEVICES"].split(",") if os.environ.get("CUDA_VISIBLE_DEVICES")
                       else [str(i) for i in range(torch.cuda.device_count())])
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            devices = engine_devices(local_rank, tensor_parallel_size, visible, tp_key)
            first = local_rank * tensor_parallel_size  # index of the engine's first GPU in this process's torch
            share = min(torch.cuda.mem_get_info(first + i)[0] / torch.cuda.mem_get_info(first + i)[1]
                        for i in range(tensor_parallel_size))
            extra["gpu_memory_utilization"] = FREE_MEMORY_FRACTION * share
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        for k in _LAUNCHER_ENV:
            os.environ.pop(k, None)
        yield extra
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class VllmSampler:
    """A vLLM engine on one policy (a hub id or a local HF checkpoint by path), sampling like `sample_responses`.

    `backend_key` / `tp_key`: the config keys that chose vLLM and its tensor parallelism, named in errors."""

    def __init__(self, model_path: str, *, dtype: str, trust_remote_code: bool, seed: int,
                 tensor_parallel_size: int = 1, backend_key: str, tp_key: str):
        from transformers import GenerationConfig

        from pipeline.models import load_tokenizer

        vllm = load_vllm(backend_key)  # before any model is read: a missing vllm fails at once
        self.params_class = vllm.SamplingParams
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        try:
            gen_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's and the template's stop tokens
            gen_config = None
        self.stop_ids = stop_token_ids(self.tokenizer, gen_config)
        with _engine_environment(tensor_parallel_size, tp_key) as device_args:
            self.llm = vllm.LLM(model=str(model_path), seed=seed, dtype=dtype, load_format="safetensors",
                                trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                                **device_args)

    def sample(self, prompts: Sequence[Prompt], n_per_prompt: int, sampling: SamplingConfig,
               seeds: Sequence[int]) -> list[dict]:
        """`n_per_prompt` samples of each prompt, prompt i's request seeded with `seeds[i]`: the records of
        `sample_responses` (prompt_index, sample_idx, response, n_tokens, finished, token_ids, stop_id)."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        # vLLM's default top_k is no cut, as the HF path's top_k=0
        params = [self.params_class(n=n_per_prompt, temperature=sampling.temperature, top_p=sampling.top_p,
                                    max_tokens=sampling.max_new_tokens, seed=int(s), stop_token_ids=self.stop_ids)
                  for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": prompt_ids(self.tokenizer, p)} for p in prompts], params)
        return [{"prompt_index": i, "sample_idx": j, **self._record(c)}
                for i, o in enumerate(outs) for j, c in enumerate(o.outputs)]

    def _record(self, completion) -> dict:
        """One completion as a record. A stop vLLM reports without returning its token (the token it names in
        `stop_reason`, else EOS) is put back, so `stop_id` holds the token that ended the turn, as on the HF path
        (ppo_sample's KL counts it)."""
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and not any(t in self.stop_ids for t in ids):
            reason = completion.stop_reason
            token = reason if isinstance(reason, int) else self.tokenizer.eos_token_id
            ids += [token] if token is not None else []
        return finish_response(ids, self.stop_ids, self.tokenizer, stopped=completion.finish_reason == "stop")

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (before the next engine, or the HF models, need it)."""
        llm, self.llm = self.llm, None
        shutdown = getattr(llm, "shutdown", None)  # where vLLM has one; else the V1 engine core's own
        if shutdown is None:
            shutdown = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
