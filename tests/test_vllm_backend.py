"""The vLLM backend's plumbing (pipeline/vllm_backend.py) on CPU, with a fake `vllm` module in place of the real one:
ppo_sample and gold_score write well-formed artifacts through it, each request's seed is the designed one and does
not depend on the rank, tensor_parallel_size reaches the engine, launcher variables stay out of the engine's process,
a missing vllm is an error naming the config key, and the new keys leave existing fingerprints alone.

The fake engine draws each completion from (prompt token ids, request seed, sample index) alone, so the expected
records are computed here independently of the stage code.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import pipeline.vllm_backend as vllm_backend
import stages.gold_score as gold_score
import stages.ppo_sample as ppo_sample
from pipeline.cache import ArtifactCache
from pipeline.config import (
    BaseModelRef,
    ConfigError,
    GoldConfig,
    GoldScoreStageConfig,
    PPOSampleStageConfig,
    SamplingConfig,
    ScorerStageConfig,
    load_config,
)
from pipeline.distributed import Ranks
from pipeline.generation import stop_token_ids
from pipeline.models import load_tokenizer
from pipeline.preflight import check_vllm
from pipeline.records import CANDIDATE_COLUMNS, RL_SAMPLE_COLUMNS, messages, read_records
from pipeline.runner import Runner
from pipeline.study import build_stages
from pipeline.tokenization import prompt_ids
from pipeline.vllm_backend import SEED_STRIDE, VllmSampler, engine_devices, request_seed

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
MAX_NEW = 6


# ------------------------------------------------------------------------------------------------- the fake engine


def fake_tokens(prompt: tuple[int, ...], seed: int, j: int, max_tokens: int, words: list[int],
                stops: list[int]) -> tuple[list[int], str, int | None]:
    """(token ids, finish reason, stop reason) of a fake completion: a function of its arguments only. A third of the
    completions end with a returned stop token, a third with an EOS vLLM does not return, a third at max_tokens."""
    rng = np.random.default_rng([seed, j, *prompt])
    kind = int(rng.integers(3))
    if kind == 2:
        return [int(t) for t in rng.choice(words, max_tokens)], "length", None
    body = [int(t) for t in rng.choice(words, int(rng.integers(0, max_tokens)))]
    return (body + [stops[0]], "stop", None) if kind == 0 else (body, "stop", None)


class FakeLLM:
    """Records its construction arguments, the environment it was built in and every request."""

    built: list["FakeLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        self.requests: list[tuple[tuple[int, ...], int, int]] = []
        self.closed = False
        tok = load_tokenizer(kwargs["model"])
        self.stops = stop_token_ids(tok)
        self.words = [i for i in range(len(tok)) if i not in set(tok.all_special_ids) | set(self.stops)]
        FakeLLM.built.append(self)

    def generate(self, prompts, params):
        outs = []
        for p, sp in zip(prompts, params):
            ids = tuple(p["prompt_token_ids"])
            self.requests.append((ids, sp.seed, sp.n))
            completions = []
            for j in range(sp.n):
                tokens, reason, stop = fake_tokens(ids, sp.seed, j, sp.max_tokens, self.words, self.stops)
                completions.append(SimpleNamespace(token_ids=tokens, finish_reason=reason, stop_reason=stop))
            outs.append(SimpleNamespace(outputs=completions))
        return outs

    def shutdown(self):
        self.closed = True


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    FakeLLM.built = []
    asked = []

    def load(key):
        asked.append(key)
        return SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams)

    monkeypatch.setattr(vllm_backend, "load_vllm", load)
    return SimpleNamespace(engines=FakeLLM.built, asked=asked)


def expected_record(tok, stops, words, prompt, seed, j) -> dict:
    """What the HF path's record of the fake completion is: cut at the stop, decoded; `scored`: the tokens the KL
    counts (the response and the token that ended the turn: the returned stop, or EOS where vLLM did not return it)."""
    tokens, reason, _ = fake_tokens(tuple(prompt), seed, j, MAX_NEW, words, stops)
    kept = [t for t in itertools.takewhile(lambda t: t not in stops, tokens)]
    stop = tokens[len(kept)] if len(kept) < len(tokens) else tok.eos_token_id if reason == "stop" else None
    return {"response": tok.decode(kept, skip_special_tokens=True).strip(), "n_tokens": len(kept),
            "finished": reason == "stop", "scored": kept + ([stop] if stop is not None else [])}


def summed_logprob(model, head: list[int], response: list[int]) -> float:
    """log π(response | head), one unpadded forward pass."""
    ids = torch.tensor([head + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(head) - 1:-1].double(), -1)
    return float(logp[torch.arange(len(response)), torch.tensor(response)].sum())


# ---------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study's world and sft_policy; an RL artifact whose exports are the policy (step 0) and a perturbed
    copy of it (step 1), as an RL stage exports them (full HF checkpoints with their tokenizer)."""
    root = tmp_path_factory.mktemp("vllm_cache")
    cfg = load_config(SMOKE, [f"run.cache_root={root}"])
    cache = ArtifactCache(cfg.run.cache_root)
    plan = Runner(build_stages(cfg), cache).run(until={"sft_policy"})
    art = {p.node.key: cache.path(p.node.key, p.fingerprint) for p in plan}
    rl = tmp_path_factory.mktemp("rl")
    model_dir = art["sft_policy"] / "model"
    shutil.copytree(model_dir, rl / "exports" / "step_00000")
    from transformers import AutoModelForCausalLM

    moved = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        noise = torch.randn(moved.lm_head.weight.shape, generator=torch.Generator().manual_seed(0))
        moved.lm_head.weight.add_(0.5 * noise)
    moved.save_pretrained(rl / "exports" / "step_00001")
    load_tokenizer(model_dir).save_pretrained(rl / "exports" / "step_00001")
    return SimpleNamespace(world=art["world"], policy=art["sft_policy"], rl=rl, cfg=cfg, tmp=tmp_path_factory)


def ppo_sample_cfg(backend: str = "vllm", tp: int = 1) -> PPOSampleStageConfig:
    return PPOSampleStageConfig(n_samples=3, max_new_tokens=MAX_NEW, batch_size=16, seed=5, prompts_per_shard=2,
                                policy=BaseModelRef(), scorer=ScorerStageConfig(name="gold", gold=GoldConfig()),
                                backend=backend, tensor_parallel_size=tp)


class OneRankOfTwo(Ranks):
    """Rank `rank` of 2 without a process group: it finds the missing units itself and keeps its round-robin share."""

    @property
    def main(self) -> bool:
        return True

    def broadcast(self, obj):
        return obj

    def barrier(self) -> None:
        pass


def run_ppo_sample(smoke, cfg, monkeypatch, ranks: Ranks = Ranks()) -> Path:
    out = smoke.tmp.mktemp("ppo_sample")
    monkeypatch.setattr(ppo_sample, "data_parallel_ranks", lambda: ranks)
    ppo_sample.run(cfg, {"rl": smoke.rl, "prompts": smoke.world, "policy": smoke.policy}, out)
    return out


def shard_hashes(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (out / "shards").glob("*.parquet")}


# -------------------------------------------------------------------------------------------------------- ppo_sample


def test_ppo_sample_through_vllm_writes_the_hf_paths_records_with_designed_seeds(smoke, fake_vllm, monkeypatch):
    cfg = ppo_sample_cfg()
    out = run_ppo_sample(smoke, cfg, monkeypatch)
    prompts = pd.read_parquet(smoke.world / "eval_prompts.parquet")
    tok = load_tokenizer(smoke.policy / "model")
    heads = [prompt_ids(tok, messages(p)) for p in prompts.prompt]

    # one engine per export, by path, closed before the next; the keys it would name in errors
    assert [Path(e.kwargs["model"]).name for e in fake_vllm.engines] == ["step_00000", "step_00001"]
    assert all(e.closed for e in fake_vllm.engines) and fake_vllm.asked == ["{ppo,rl,dpo}.eval.backend"] * 2
    # every prompt's request: seed (stage seed + shard) * stride + place in the shard, the same for every export
    designed = {(tuple(heads[i]), (cfg.seed + i // 2) * SEED_STRIDE + i % 2, 3) for i in range(len(prompts))}
    assert all(set(e.requests) == designed and len(e.requests) == len(prompts) for e in fake_vllm.engines)

    engine = fake_vllm.engines[0]
    from transformers import AutoModelForCausalLM

    init, moved = (AutoModelForCausalLM.from_pretrained(smoke.rl / "exports" / d) for d in ("step_00000", "step_00001"))
    for step in (0, 1):
        frame = pd.concat([read_records(f, RL_SAMPLE_COLUMNS)
                           for f in sorted((out / "shards").glob(f"shard_{step:05d}_*.parquet"))])
        assert list(frame.columns) == RL_SAMPLE_COLUMNS and len(frame) == len(prompts) * 3
        for row in frame.itertuples():
            i = int(prompts.index[prompts.prompt_id == row.prompt_id][0])
            want = expected_record(tok, engine.stops, engine.words, heads[i], request_seed(cfg.seed + i // 2, i % 2),
                                   row.sample_idx)
            assert (row.response, row.n_tokens, row.finished) == (want["response"], want["n_tokens"],
                                                                  want["finished"])
            # the KL stays with the HF models, on the response and the token that ended the turn
            k1 = summed_logprob(moved if step else init, heads[i], want["scored"]) \
                - summed_logprob(init, heads[i], want["scored"])
            assert row.kl_k1 == pytest.approx(k1, abs=1e-3)
        assert (frame.kl_k1 == 0).all() if step == 0 else (frame.kl_k3 > 0).all()
        assert np.isfinite(frame.proxy_score).all()


def test_ppo_sample_shards_and_seeds_do_not_depend_on_the_rank(smoke, fake_vllm, monkeypatch):
    """Two simulated ranks (each its round-robin share of the (export, shard) units, its own engines) write the
    shards one process writes, byte for byte, each prompt's request carrying the same seed."""
    cfg = ppo_sample_cfg()
    whole = shard_hashes(run_ppo_sample(smoke, cfg, monkeypatch))
    seeds_one = {r for e in fake_vllm.engines for r in e.requests}
    n_one = len(fake_vllm.engines)
    halves = [shard_hashes(run_ppo_sample(smoke, cfg, monkeypatch, OneRankOfTwo(rank, 2))) for rank in (0, 1)]
    assert set(halves[0]).isdisjoint(halves[1]) and halves[0] | halves[1] == whole
    assert abs(len(halves[0]) - len(halves[1])) <= 1 and halves[0] and halves[1]  # each rank its round-robin share
    assert {r for e in fake_vllm.engines[n_one:] for r in e.requests} == seeds_one


def test_tensor_parallel_size_reaches_the_engine_and_launcher_variables_stay_out(smoke, fake_vllm, monkeypatch):
    for k, v in {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(k, v)
    engine = VllmSampler(str(smoke.policy / "model"), dtype="float32", trust_remote_code=False, seed=3,
                         tensor_parallel_size=2, backend_key="bon.backend", tp_key="bon.tensor_parallel_size")
    built = fake_vllm.engines[-1]
    assert (built.kwargs["tensor_parallel_size"], built.kwargs["seed"], built.kwargs["dtype"]) == (2, 3, "float32")
    assert built.env == {"RANK": None, "LOCAL_RANK": None, "WORLD_SIZE": None, "MASTER_PORT": None}
    assert (os.environ["RANK"], os.environ["MASTER_PORT"]) == ("1", "29555")  # restored for the stage's own use
    engine.close()
    assert built.closed and engine.llm is None


def test_a_stop_vllm_does_not_return_is_put_back_as_the_hf_path_keeps_it(smoke, fake_vllm):
    engine = VllmSampler(str(smoke.policy / "model"), dtype="float32", trust_remote_code=False, seed=0,
                         backend_key="bon.backend", tp_key="bon.tensor_parallel_size")
    tok, eos = engine.tokenizer, engine.tokenizer.eos_token_id
    word = fake_vllm.engines[-1].words[0]
    returned = engine._record(SimpleNamespace(token_ids=[word, eos], finish_reason="stop", stop_reason=None))
    dropped = engine._record(SimpleNamespace(token_ids=[word], finish_reason="stop", stop_reason=None))
    cut = engine._record(SimpleNamespace(token_ids=[word, word], finish_reason="length", stop_reason=None))
    assert returned == dropped == {"response": tok.decode([word], skip_special_tokens=True).strip(), "n_tokens": 1,
                                   "finished": True, "token_ids": [word], "stop_id": eos}
    assert (cut["finished"], cut["stop_id"], cut["n_tokens"]) == (False, None, 2)


def test_engine_devices_give_each_rank_its_own_gpus():
    visible = ["0", "1", "2", "3"]
    assert engine_devices(0, 1, visible, "k") == ["0"] and engine_devices(3, 1, visible, "k") == ["3"]
    assert engine_devices(1, 2, visible, "k") == ["2", "3"]
    with pytest.raises(ValueError, match=r"bon.tensor_parallel_size=2: local rank 2's vLLM engine needs GPUs 4..5, "
                                         r"but 4 are visible"):
        engine_devices(2, 2, visible, "bon.tensor_parallel_size")


# -------------------------------------------------------------------------------------------------------- gold_score


def test_gold_score_samples_candidates_through_vllm(smoke, fake_vllm, monkeypatch):
    monkeypatch.setattr(gold_score, "data_parallel_ranks", lambda: Ranks())
    cfg = GoldScoreStageConfig(source="policy_samples", gold=GoldConfig(), policy=BaseModelRef(), samples_per_prompt=3,
                               sampling=SamplingConfig(max_new_tokens=MAX_NEW), seed=7, sampling_backend="vllm",
                               tensor_parallel_size=1)
    out = smoke.tmp.mktemp("gold_score")
    gold_score.run(cfg, {"world": smoke.world, "policy": smoke.policy}, out)
    (engine,) = fake_vllm.engines
    assert engine.closed and fake_vllm.asked == ["gold_label.sampling_backend"]
    prompts = pd.read_parquet(smoke.world / "train_prompts.parquet")
    tok = load_tokenizer(smoke.policy / "model")
    heads = [prompt_ids(tok, messages(p)) for p in prompts.prompt]
    assert engine.requests == [(tuple(h), 7 * SEED_STRIDE + i, 3) for i, h in enumerate(heads)]
    cands = read_records(out / "candidates.parquet", CANDIDATE_COLUMNS)
    assert len(cands) == 3 * len(prompts)  # C(3, 2) pairs per prompt
    row = cands.iloc[-1]  # the last prompt's pair (1, 2)
    i = len(prompts) - 1
    assert row.pair_id == f"{prompts.prompt_id[i]}-1-2"
    for side, j in (("a", 1), ("b", 2)):
        assert row[f"response_{side}"] == expected_record(tok, engine.stops, engine.words, heads[i],
                                                          7 * SEED_STRIDE + i, j)["response"]
    assert cands[["gold_a", "gold_b"]].notna().all().all()
    assert (out / "ood_candidates.parquet").exists()


# ------------------------------------------------------------------------------------- a missing vllm, fingerprints


def test_a_missing_vllm_names_the_config_key(smoke, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    monkeypatch.setattr(gold_score, "data_parallel_ranks", lambda: Ranks())
    cfg = GoldScoreStageConfig(source="policy_samples", gold=GoldConfig(), policy=BaseModelRef(), samples_per_prompt=2,
                               sampling=SamplingConfig(max_new_tokens=MAX_NEW), sampling_backend="vllm")
    with pytest.raises(ImportError, match=r"gold_label.sampling_backend is 'vllm' but vllm is not installed"):
        gold_score.run(cfg, {"world": smoke.world, "policy": smoke.policy}, smoke.tmp.mktemp("missing"))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    check_vllm(load_config(SMOKE))  # nothing asks for vLLM: no error
    with pytest.raises(ConfigError, match=r"^bon.backend, ppo.eval.backend: 'vllm', but vllm is not installed"):
        check_vllm(load_config(SMOKE, ["bon.backend=vllm", "ppo.eval.backend=vllm"]))
    with pytest.raises(ConfigError, match=r"gold_label.sampling_backend is for source 'policy_samples'"):
        load_config(SMOKE, ["gold_label.source=unified_feedback", "gold_label.dataset_path=x.parquet",
                            "gold_label.sampling_backend=vllm"])


def test_the_new_keys_leave_existing_fingerprints_alone(tmp_path):
    def prints(*overrides):
        cfg = load_config(SMOKE, [f"run.cache_root={tmp_path}", *overrides])
        return Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).fingerprints()

    base = prints()
    explicit = prints("ppo.eval.backend=hf", "gold_label.sampling_backend=hf", "bon.tensor_parallel_size=4",
                      "ppo.eval.tensor_parallel_size=4", "gold_label.tensor_parallel_size=4")
    assert explicit == base  # defaults and tensor parallelism: in no fingerprint
    rl_vllm = prints("ppo.eval.backend=vllm")
    changed = {k for k in base if rl_vllm[k] != base[k]}
    assert "ppo_sample[bt]" in changed and "ppo[bt]" not in changed and "bon_sample" not in changed
    assert all(k.startswith(("ppo_sample", "ppo_gold", "ppo_curve", "report")) for k in changed)
    gold_vllm = prints("gold_label.sampling_backend=vllm")
    assert gold_vllm["gold_score"] != base["gold_score"] and gold_vllm["world"] == base["world"]
