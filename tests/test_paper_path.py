"""The paper-scale path (configs/paper/gemma2b_unified_feedback.yaml): the config validates and builds the paper's DAG,
and the same path runs offline end to end on tiny local stand-ins for every hub resource.

Stand-ins, all written into a temporary directory:
- policy `google/gemma-2b-it`: a 1-layer LlamaForCausalLM with the tiny world's word-level tokenizer (chat template);
- gold `Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback`: a 1-layer LlamaForSequenceClassification;
- `llm-blender/Unified-Feedback`: 60 rows in its parquet schema (repeated prompts, gold ties, a multi-turn pair, a pair
  whose conversations differ before the final turn);
- `HuggingFaceH4/hhh_alignment`: one parquet file per subset; `lmsys/mt_bench_human_judgments`: one parquet file.

The study YAML is the paper config itself with only model ids, data paths and sizes replaced, so the keys, proxies
and stage layout under test are the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline.cache import ArtifactCache
from pipeline.cli import main
from pipeline.config import LoraConfig, load_config
from pipeline.hf_data import HHH_SUBSETS, load_unified_feedback, prompt_id_of
from pipeline.runner import Runner, fingerprint, toposort
from pipeline.study import build_stages

pytestmark = pytest.mark.slow

PAPER = Path(__file__).parents[1] / "configs" / "paper" / "gemma2b_unified_feedback.yaml"
PAPER_LORA = LoraConfig(r=32, alpha=64, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
TRAINED_PAPER_PROXIES = ["bt", "margin", "label_smoothing", "grm_sft", "grm_dpo_noref",
                         "ens_bt_mean-m0", "ens_bt_mean-m1", "ens_bt_mean-m2"]

# tiny study sizes
N_ROWS, N_PAIRS, N_PROMPTS, N_SAMPLES = 60, 40, 6, 8
TINY_PROXIES = ["bt", "grm_sft"]


def fingerprints(cfg) -> dict[str, str]:
    out: dict[str, str] = {}
    for node in toposort(build_stages(cfg)):
        out[node.key] = fingerprint(node, out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the paper config


def test_paper_config_builds_the_paper_dag():
    cfg = load_config(PAPER)
    nodes = {n.key: n for n in build_stages(cfg)}
    assert "world" not in nodes and "sft_policy" not in nodes
    assert {"gold_score", "gold_label", "eval_prompts", "bon_sample", "bon_score[gold]", "report"} <= set(nodes)

    scores = nodes["gold_score"].config
    assert nodes["gold_score"].inputs == {} and nodes["gold_label"].inputs == {"scores": "gold_score"}
    assert (scores.gold.type, scores.gold.model_id, scores.gold.dtype, scores.gold.max_length) == (
        "hf", "Ray2333/reward-model-Mistral-7B-instruct-Unified-Feedback", "bfloat16", 1024)
    assert (scores.source, scores.dataset_path, scores.dataset_config) == (
        "unified_feedback", "llm-blender/Unified-Feedback", "all")
    assert (scores.n_pairs, scores.shuffle_seed) == (20000, 42)
    label = nodes["gold_label"].config
    assert (label.n_pairs, label.noise_rate) == (20000, 0.0)

    assert nodes["eval_prompts"].inputs == {} and nodes["eval_prompts"].config.n_prompts == 1000
    sample = nodes["bon_sample"]
    assert sample.inputs == {"prompts": "eval_prompts"}  # no policy artifact: the policy is a hub id
    assert sample.config.policy.model_id == "google/gemma-2b-it" and sample.config.policy.dtype == "bfloat16"
    assert (sample.config.n_samples, sample.config.backend) == (405, "vllm")
    s = sample.config.sampling
    assert (s.temperature, s.top_p, s.max_new_tokens) == (0.7, 0.95, 1024)
    assert nodes["bon_score[gold]"].inputs == {"samples": "bon_sample"}
    assert nodes["bon_score[gold]"].config.gold.model_id == scores.gold.model_id

    trained = sorted(k[len("train_proxy["):-1] for k in nodes if k.startswith("train_proxy["))
    assert trained == sorted(TRAINED_PAPER_PROXIES)
    for name in TRAINED_PAPER_PROXIES:
        node = nodes[f"train_proxy[{name}]"]
        assert node.inputs == {"pairs": "gold_label"}
        assert node.config.base.model_id == "google/gemma-2b-it" and node.config.base.dtype == "bfloat16"
        t = node.config.training
        assert t.lora == PAPER_LORA
        assert (t.lr, t.epochs, t.batch_size * t.gradient_accumulation_steps, t.max_length) == (1e-5, 2, 24, 1024)
        assert (t.lr_scheduler, t.warmup_ratio, t.max_grad_norm) == ("cosine", 0.03, 5.0)
        assert (node.launcher, node.num_processes, node.deepspeed_config.name) == ("accelerate", 8,
                                                                                   "zero2_bf16.json")
        head = node.config.proxy
        assert (head.head, head.head_width, head.head_dropout) == ("mlp", 1024, 0.1)
    members = [nodes[f"train_proxy[ens_bt_mean-m{i}]"].config.proxy for i in range(3)]
    assert [m.type for m in members] == ["bt"] * 3 and len({m.seed for m in members}) == 3
    assert nodes["train_proxy[bt]"].config.proxy.seed not in {m.seed for m in members}
    grm = nodes["train_proxy[grm_sft]"].config.proxy
    assert (grm.type, grm.reg, grm.alpha, grm.beta) == ("grm", "sft", 0.01, 0.1)
    assert nodes["train_proxy[grm_dpo_noref]"].config.proxy.reg == "dpo_noref"
    assert nodes["train_proxy[label_smoothing]"].config.proxy.epsilon == 0.1

    for name in ["bt", "margin", "label_smoothing", "grm_sft", "grm_dpo_noref", "ens_bt_mean"]:
        ev = nodes[f"eval_proxy[{name}]"].config.eval
        assert (ev.hhh_path, ev.mt_bench_path) == ("HuggingFaceH4/hhh_alignment", "lmsys/mt_bench_human_judgments")
        assert nodes[f"bon_curve[{name}]"].inputs == {"proxy_scores": f"bon_score[{name}]",
                                                      "gold_scores": "bon_score[gold]", "samples": "bon_sample"}
    assert nodes["bon_score[ens_bt_mean]"].config.proxy.combine == "mean"

    from pipeline.bon import kl_bon_bound

    ns = cfg.bon.curve_ns()
    assert ns[0] == 1 and ns[-1] <= cfg.bon.n_samples and len(ns) >= 10
    assert kl_bon_bound(ns[-1]) <= 5.0 < kl_bon_bound(ns[-1] + 5)  # reaches (almost) the 5-nat limit, not beyond

    # PPO (facts §2): LoRA policy, KL measured not penalised, 64 prompts a step, 4 epochs, lr 1e-5, rollouts at
    # temperature 0.7 / top-p 0.9 with 512 new tokens, first-batch reward normalisation; 8 ranks under ZeRO-3 bf16
    for name in ["bt", "grm_sft", "ens_bt_mean"]:
        ppo_node = nodes[f"ppo[{name}]"]
        p = ppo_node.config.ppo
        assert p.lora == PAPER_LORA and p.kl_coef == 0.0 and p.reward_norm == "first_batch"
        assert (p.rollout_batch_size, p.ppo_epochs, p.lr) == (64, 4, 1e-5)
        assert (p.sampling.temperature, p.sampling.top_p, p.sampling.max_new_tokens) == (0.7, 0.9, 512)
        assert (ppo_node.launcher, ppo_node.num_processes) == ("accelerate", 8)
        assert ppo_node.deepspeed_config.name == "zero3_bf16.json"
        assert nodes[f"ppo_sample[{name}]"].inputs["prompts"] == "eval_prompts"
        assert nodes[f"ppo_gold[{name}]"].config.gold.model_id == scores.gold.model_id
    for gpus in (4, 1):
        assert load_config(PAPER, [f"ppo.num_processes={gpus}"]).ppo.num_processes == gpus

    # one node of 8 GPUs: every data-parallel stage on all of them; the config's overrides for 4 and 1 GPU(s)
    splitting = {"gold_score", "bon_sample", "bon_score", "eval_proxy", "ppo_sample", "ppo_gold"}
    data_parallel = [k for k in nodes if k.split("[")[0] in splitting and k != "bon_score[ens_bt_mean]"]
    # gold_score, bon_sample; eval_proxy of 6 proxies; bon_score of the gold, 5 proxies and 3 ensemble members; PPO
    # against each of the 6: its samples and their gold scores
    assert len(data_parallel) == 2 + 6 + 9 + 2 * 6
    assert {(nodes[k].launcher, nodes[k].num_processes) for k in data_parallel} == {("accelerate", 8)}
    assert nodes["bon_score[ens_bt_mean]"].launcher == "inline"  # it combines its members' scores: nothing to split
    for gpus, keys in comment_overrides().items():
        fewer = {n.key: n for n in build_stages(load_config(PAPER, keys))}
        assert {fewer[k].num_processes for k in [*data_parallel, "train_proxy[bt]", "ppo[bt]"]} == {gpus}
        t = fewer["train_proxy[bt]"].config.training
        assert t.batch_size * t.gradient_accumulation_steps == 24
        assert fewer["bon_score[gold]"].launcher == ("inline" if gpus == 1 else "accelerate")

    # the noisy variant is one override away and validates
    noisy = load_config(PAPER, ["gold_label.noise_rate=0.25"])
    assert noisy.gold_label.noise_rate == 0.25


def comment_overrides() -> dict[int, list[str]]:
    """The overrides the paper config's comments give for 4 GPUs and for one (`# On 4 GPUs:` / `# On one GPU:` and
    the indented comment lines under each), so a test holds the comments to what they claim."""
    import re

    out, current = {}, None
    for line in PAPER.read_text().splitlines():
        head = re.match(r"# On (4 GPUs|one GPU):(.*)", line)
        if head:
            current = 4 if head[1] == "4 GPUs" else 1
            out[current] = head[2].split()
        elif current is not None and re.match(r"#\s{2,}\S+=", line):
            out[current] += line[1:].split()
        else:
            current = None
    assert set(out) == {4, 1} and all("=" in key for keys in out.values() for key in keys), out
    return out


def test_label_noise_leaves_best_of_n_samples_cached():
    clean = fingerprints(load_config(PAPER))
    noisy = fingerprints(load_config(PAPER, ["gold_label.noise_rate=0.25"]))
    assert clean["gold_label"] != noisy["gold_label"]
    assert [k for k in ("gold_score", "eval_prompts", "bon_sample", "bon_score[gold]") if clean[k] != noisy[k]] == []


# ----------------------------------------------------------------------------------------------------------------
# tiny local stand-ins in the real schemas

MSG = pa.struct([("role", pa.string()), ("content", pa.string())])
UF_SCHEMA = pa.schema([("id", pa.string()), ("conv_A", pa.list_(MSG)), ("conv_B", pa.list_(MSG)),
                       ("conv_A_rating", pa.float32()), ("conv_B_rating", pa.float32()),
                       ("num_turns", pa.int32()), ("source", pa.string())])
HHH_SCHEMA = pa.schema([("input", pa.string()), ("targets", pa.struct([("choices", pa.list_(pa.string())),
                                                                        ("labels", pa.list_(pa.int32()))]))])
MT_SCHEMA = pa.schema([("question_id", pa.int64()), ("model_a", pa.string()), ("model_b", pa.string()),
                       ("winner", pa.string()), ("judge", pa.string()), ("conversation_a", pa.list_(MSG)),
                       ("conversation_b", pa.list_(MSG)), ("turn", pa.int64())])


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _write(path: Path, rows: list[dict], schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_models(root: Path) -> tuple[Path, Path]:
    """A tiny causal-LM policy and a tiny sequence-classification gold, both with the world's chat-template
    tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.world import build_tokenizer

    tok = build_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    policy_dir, gold_dir = root / "policy", root / "gold"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**common)).save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    torch.manual_seed(1)
    LlamaForSequenceClassification(LlamaConfig(**common, num_labels=1)).save_pretrained(gold_dir)
    tok.save_pretrained(gold_dir)
    return policy_dir, gold_dir


def uf_design() -> dict:
    """Which row sits where in the seed-42 order, so that every case the loaders handle lands where it matters.

    Positions (in the shuffled order) 0..40 are the training slice (41 rows: one is dropped by the loader, leaving
    N_PAIRS usable pairs); 41..52 are the rows eval_prompts reads beyond it (N_PAIRS + 2 * N_PROMPTS usable rows).
    """
    order = np.random.default_rng(42).permutation(N_ROWS)  # what load_unified_feedback(shuffle_seed=42) uses
    return {"order": order,
            "ties": [int(order[1]), int(order[2])],      # identical responses: the gold ties, the pair is dropped
            "differ": int(order[3]),                     # A and B differ before the final turn: dropped on load
            "multi_turn": int(order[4]),
            # a prompt repeated inside the training slice (pos 6..9 repeat pos 0, 10..13 repeat pos 15..18)
            "repeat_in_train": {6: 0, 7: 0, 8: 5, 9: 5, 10: 15, 11: 16, 12: 17},
            # held-out rows that reuse a training prompt (must not become eval prompts) or repeat each other
            "repeat_held_out": {41: 20, 42: 30, 43: 40, 45: 44}}


def uf_rows() -> list[dict]:
    from pipeline.world import CATEGORIES, TRAIN_VERBS

    d = uf_design()
    order = d["order"]
    rng = np.random.default_rng(0)
    cats = sorted(CATEGORIES)
    texts = [f"{verb} {k} {cat}" for cat in cats for verb in TRAIN_VERBS for k in (1, 2, 3)]  # 96 distinct prompts
    pos_prompt = {pos: pos for pos in range(N_ROWS)}
    for pos, src in {**d["repeat_in_train"], **d["repeat_held_out"]}.items():
        pos_prompt[pos] = src
    rows = []
    for pos in range(N_ROWS):
        row = int(order[pos])
        text = texts[pos_prompt[pos]]
        cat = text.split()[-1]

        def answer():
            return " ".join(rng.choice(CATEGORIES[cat], int(rng.integers(1, 5))))

        prompt = [_user(text)]
        if row == d["multi_turn"]:
            prompt = [_user("list 1 colors"), _assistant("red"), _user(text)]
        a, b = answer(), answer()
        while b == a:
            b = answer()
        if row in d["ties"]:
            b = a
        conv_b_prompt = [_user("name 2 animals")] if row == d["differ"] else prompt
        rows.append({"row": row, "id": f"uf{row}", "conv_A": prompt + [_assistant(a)],
                     "conv_B": conv_b_prompt + [_assistant(b)], "conv_A_rating": float(rng.integers(1, 10)),
                     "conv_B_rating": float(rng.integers(1, 10)), "num_turns": len(prompt) // 2 + 1,
                     "source": "stand-in"})
    rows.sort(key=lambda r: r.pop("row"))  # file order = unshuffled row index
    return rows


def hhh_rows(subset: str) -> list[dict]:
    return [
        {"input": "list 2 fruits", "targets": {"choices": ["apple pear", "dog dog"], "labels": [1, 0]}},
        {"input": "name 1 colors", "targets": {"choices": ["red blue green", "red", "hammer"], "labels": [0, 1, 0]}},
        {"input": "Human: give 2 tools\n\nAssistant: saw drill\n\nHuman: write 1 sports",
         "targets": {"choices": ["golf", "golf golf"], "labels": [1, 0]}},
    ]


HHH_PAIRS_PER_SUBSET = 4  # 1 + 2 + 1 (the best choice against each other choice)


def mt_rows() -> list[dict]:
    def conv(r1, r2):
        return [_user("list 2 animals"), _assistant(r1), _user("name 1 fruits"), _assistant(r2)]

    base = {"question_id": 81, "model_a": "gpt-4", "model_b": "llama-13b", "judge": "expert_0",
            "conversation_a": conv("cat dog", "apple"), "conversation_b": conv("cat cat", "pear plum")}
    return [base | {"winner": "model_a", "turn": 1}, base | {"winner": "model_b", "turn": 1},
            base | {"winner": "model_a", "turn": 2}, base | {"winner": "tie", "turn": 1},
            base | {"winner": "tie (bothbad)", "turn": 2}, base | {"question_id": 82, "winner": "model_b", "turn": 2}]


MT_PAIRS = 4  # ties excluded


def tiny_paper_tree(root: Path, policy_dir: Path, gold_dir: Path, uf: Path, hhh: Path, mt: Path) -> dict:
    """The paper config with hub ids replaced by the local stand-ins and sizes shrunk to seconds on a CPU."""
    tree = yaml.safe_load(PAPER.read_text())
    tree["study"] = "paper_tiny"
    tree["run"] |= {"cache_root": str(root / "cache"), "reports_dir": str(root / "report"), "verify": "checksum"}
    tree["policy"] |= {"model_id": str(policy_dir), "dtype": "float32"}
    tree["gold"] |= {"model_id": str(gold_dir), "dtype": "float32", "max_length": 64}
    tree["gold_label"] |= {"dataset_path": str(uf), "n_pairs": N_PAIRS, "test_fraction": 0.25}
    tree["launch"] = {"num_processes": 1}  # the paper's 8 ranks a stage, on 2 cores: one process here
    tree["proxy_training"] |= {"num_processes": 1, "deepspeed_config": None,
                               "lr": 1e-3, "epochs": 1, "batch_size": 8, "gradient_accumulation_steps": 1,
                               "max_length": 64, "warmup_ratio": 0.0,
                               "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    tree["proxies"] = [p | {"head_width": 8} for p in tree["proxies"] if p["name"] in TINY_PROXIES]
    tree["eval_proxy"] |= {"hhh_path": str(hhh), "mt_bench_path": str(mt)}
    tree["bon"] |= {"n_prompts": N_PROMPTS, "n_samples": N_SAMPLES, "backend": "hf", "prompts_per_shard": 3,
                    "score_batch_size": 64, "n_values": None, "bootstrap": 20,
                    "sampling": tree["bon"]["sampling"] | {"max_new_tokens": 6, "batch_size": 64}}
    # the paper's PPO (LoRA policy, first-batch reward normalisation, KL not penalised) under ZeRO-3 on 2 CPU ranks
    tree["ppo"] |= {"proxies": ["bt"], "num_processes": 2, "deepspeed_config": "configs/deepspeed/zero3.json",
                    "steps": 2, "rollout_batch_size": 8, "num_minibatches": 2, "ppo_epochs": 2, "lr": 1e-3,
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                    "sampling": tree["ppo"]["sampling"] | {"max_new_tokens": 6},
                    "eval": {"n_samples": 2, "max_new_tokens": 6, "bootstrap": 20}}
    return tree


@pytest.fixture(scope="module")
def paper_study(tmp_path_factory):
    import datasets.config

    root = tmp_path_factory.mktemp("paper")
    policy_dir, gold_dir = write_models(root / "models")
    uf = _write(root / "data" / "unified_feedback.parquet", uf_rows(), UF_SCHEMA)
    hhh = root / "data" / "hhh_alignment"
    for subset in HHH_SUBSETS:
        _write(hhh / f"{subset}.parquet", hhh_rows(subset), HHH_SCHEMA)
    mt = _write(root / "data" / "mt_bench" / "human-00000-of-00001.parquet", mt_rows(), MT_SCHEMA)
    study = root / "paper_tiny.yaml"
    study.write_text(yaml.safe_dump(tiny_paper_tree(root, policy_dir, gold_dir, uf, hhh, mt), sort_keys=False))

    with pytest.MonkeyPatch.context() as mp:  # arrow caches of the tiny files stay in the temporary directory
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_cache")
        assert main(["run", str(study)]) == 0
        cfg = load_config(study)
        runner = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))
        plan = {p.node.key: p for p in runner.plan()}
        artifacts = {k: runner.cache.path(k, p.fingerprint) for k, p in plan.items()}
        yield {"root": root, "study": study, "cfg": cfg, "plan": plan, "artifacts": artifacts, "uf": uf,
               "gold_dir": gold_dir}


def test_tiny_paper_study_has_the_paper_dag(paper_study):
    plan = paper_study["plan"]
    assert "world" not in plan and "sft_policy" not in plan
    assert all(p.status == "cached" for p in plan.values())
    assert plan["bon_sample"].node.inputs == {"prompts": "eval_prompts"}
    for name in TINY_PROXIES:
        lora = plan[f"train_proxy[{name}]"].node.config.training.lora
        assert (lora.r, lora.target_modules) == (4, ["q_proj", "v_proj"])
        metrics = json.loads((paper_study["artifacts"][f"train_proxy[{name}]"] / "metrics.json").read_text())
        assert metrics["steps"] >= 1 and metrics["dropped_over_length"] == 0
        # LoRA: only the adapters and the reward head train (the tiny backbone alone has ~6K parameters)
        assert 0 < metrics["trainable_parameters"] < 1500


def test_pairs_are_labeled_by_the_local_gold_with_ties_dropped(paper_study):
    from pipeline.records import messages
    from pipeline.scoring import load_reward_scorer

    out = paper_study["artifacts"]["gold_label"]
    pairs = pd.read_parquet(out / "pairs.parquet")
    metrics = json.loads((out / "metrics.json").read_text())
    d = uf_design()
    assert metrics["candidates"] == N_PAIRS and metrics["ties_dropped"] == 2
    assert metrics["over_length_dropped"] == 0 and len(pairs) == N_PAIRS - 2
    assert not {f"uf{r}" for r in d["ties"] + [d["differ"]]} & set(pairs.pair_id)
    assert f"uf{d['multi_turn']}" in set(pairs.pair_id)
    assert (pairs.gold_chosen > pairs.gold_rejected).all() and (pairs.label_clean == 1).all()
    assert (pairs.label_noisy == 1).all()  # noise_rate 0
    assert set(pairs.split) == {"train", "test"}
    assert not set(pairs[pairs.split == "train"].prompt_id) & set(pairs[pairs.split == "test"].prompt_id)

    # the stored gold scores are the local gold's, and chosen is the side it prefers
    gold = load_reward_scorer(paper_study["gold_dir"], batch_size=16, max_length=64)
    prompts = [messages(p) for p in pairs.prompt]
    assert np.allclose(gold.score(prompts, list(pairs.chosen)), pairs.gold_chosen, atol=1e-5)
    assert np.allclose(gold.score(prompts, list(pairs.rejected)), pairs.gold_rejected, atol=1e-5)
    raw = pd.read_parquet(paper_study["uf"])
    by_id = raw.set_index("id")
    for r in pairs.itertuples():
        a, b = by_id.loc[r.pair_id, "conv_A"][-1]["content"], by_id.loc[r.pair_id, "conv_B"][-1]["content"]
        assert {r.chosen, r.rejected} == {a, b}


def test_eval_prompts_are_held_out_from_every_training_pair(paper_study):
    eval_prompts = pd.read_parquet(paper_study["artifacts"]["eval_prompts"] / "eval_prompts.parquet")
    training_slice = load_unified_feedback(paper_study["uf"], "all", "train", 42, N_PAIRS)  # as gold_label reads it
    assert len(eval_prompts) == N_PROMPTS and eval_prompts.prompt_id.is_unique
    assert not set(eval_prompts.prompt_id) & set(training_slice.prompt_id)
    pairs = pd.read_parquet(paper_study["artifacts"]["gold_label"] / "pairs.parquet")
    assert not set(eval_prompts.prompt_id) & set(pairs.prompt_id)
    assert all(pid == prompt_id_of(list(p)) for pid, p in zip(eval_prompts.prompt_id, eval_prompts.prompt))
    # the held-out rows that reuse a training prompt (positions 41-43) are skipped, a repeated one counted once
    from pipeline.world import CATEGORIES, TRAIN_VERBS

    texts = [f"{verb} {k} {cat}" for cat in sorted(CATEGORIES) for verb in TRAIN_VERBS for k in (1, 2, 3)]
    assert [p[-1]["content"] for p in eval_prompts.prompt] == [texts[i] for i in (44, 46, 47, 48, 49, 50)]

    samples = pd.concat([pd.read_parquet(f) for f in
                         sorted((paper_study["artifacts"]["bon_sample"] / "shards").glob("shard_*.parquet"))])
    assert len(samples) == N_PROMPTS * N_SAMPLES
    assert set(samples.prompt_id) == set(eval_prompts.prompt_id)


def test_report_has_id_hhh_and_mt_bench_accuracy_and_bon_curves(paper_study):
    report = paper_study["root"] / "report"
    acc = pd.read_csv(report / "accuracy.csv")
    expected_sets = {"id_test", "hhh_all", "mt_bench", *(f"hhh_{s}" for s in HHH_SUBSETS)}
    for name in TINY_PROXIES:
        mine = acc[acc.proxy == name].set_index("set")
        assert set(mine.index) == expected_sets and (mine.labels == "clean").all()
        assert mine.accuracy.between(0, 1).all() and (mine.unscored == 0).all()
        assert all(mine.loc[f"hhh_{s}", "pairs"] == HHH_PAIRS_PER_SUBSET for s in HHH_SUBSETS)
        assert mine.loc["hhh_all", "pairs"] == HHH_PAIRS_PER_SUBSET * len(HHH_SUBSETS)
        assert mine.loc["mt_bench", "pairs"] == MT_PAIRS
    curves = pd.read_csv(report / "bon_curves.csv")
    assert set(curves.proxy_name) == set(TINY_PROXIES)
    for name in TINY_PROXIES:
        assert sorted(curves[curves.proxy_name == name].n) == [1, 2, 4, 8]
        # every plotted value, the mean proxy score included, is the bon_curve stage's
        stage = pd.read_parquet(paper_study["artifacts"][f"bon_curve[{name}]"] / "curve.parquet")
        mine = curves[curves.proxy_name == name].drop(columns="proxy_name").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine[stage.columns], stage, check_dtype=False)
        fit = json.loads((paper_study["artifacts"][f"bon_curve[{name}]"] / "fit.json").read_text())
        assert fit["prompts"] == N_PROMPTS and fit["samples_per_prompt"] == N_SAMPLES
    assert (report / "README.md").exists() and (report / "bon_gold_vs_kl.png").stat().st_size > 1000
    # the same samples, each proxy scoring them with its own model (same seed and data: close, but not equal)
    bt, grm = (pd.read_parquet(paper_study["artifacts"][f"bon_score[{n}]"] / "scores.parquet") for n in TINY_PROXIES)
    assert bt[["prompt_id", "sample_idx"]].equals(grm[["prompt_id", "sample_idx"]])
    assert len(bt) == N_PROMPTS * N_SAMPLES and not np.array_equal(bt.score, grm.score)


def test_paper_ppo_runs_under_zero3_with_a_lora_policy(paper_study):
    from transformers import AutoModelForCausalLM

    art = paper_study["artifacts"]
    summary = json.loads((art["ppo[bt]"] / "summary.json").read_text())
    assert (summary["world_size"], summary["zero_stage"], summary["deepspeed"]) == (2, 3, True)
    records = [json.loads(line) for line in (art["ppo[bt]"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["policy_loss"]) for r in records)
    # exports are plain causal LMs with the LoRA deltas merged, gathered from both ZeRO-3 shards
    base = AutoModelForCausalLM.from_pretrained(paper_study["cfg"].policy.model_id).state_dict()
    first = AutoModelForCausalLM.from_pretrained(art["ppo[bt]"] / "exports" / "step_00000").state_dict()
    last = AutoModelForCausalLM.from_pretrained(art["ppo[bt]"] / "exports" / "step_00002").state_dict()
    assert set(first) == set(base) and all(torch.equal(base[k], first[k]) for k in base)
    changed = {k for k in base if not torch.equal(base[k], last[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only LoRA-targeted weights moved
    samples = pd.concat([pd.read_parquet(f) for f in (art["ppo_sample[bt]"] / "shards").glob("shard_00000_*.parquet")])
    assert set(samples.prompt_id) == set(pd.read_parquet(art["eval_prompts"] / "eval_prompts.parquet").prompt_id)
    assert (samples.kl_k1 == 0).all()
    curves = pd.read_csv(paper_study["root"] / "report" / "ppo_curves.csv")
    assert set(curves.proxy_name) == set(curves.run) == {"bt"} and curves.step.tolist() == [0, 1, 2]


def test_second_run_is_fully_cached(paper_study):
    runs = paper_study["cfg"].run.cache_root / "runs"
    before = set(runs.iterdir())
    assert main(["run", str(paper_study["study"])]) == 0
    (new,) = set(runs.iterdir()) - before
    log_text = (new / "run.log").read_text()
    assert "running" not in log_text and log_text.count("cached") >= len(paper_study["plan"])
