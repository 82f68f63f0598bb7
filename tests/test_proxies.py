"""Proxy reward models on the smoke study: train_proxy for every trained type, seeds, label noise, LoRA, and
eval_proxy (trained vs checkpoint scorer, accuracy by hand, `pairwise_accuracy` edge cases).

The smoke study runs once per module up to `gold_label` (clean labels, and a second `gold_label` with 25% label
noise in the same cache); each test then calls the stage modules' `run(cfg, inputs, out)` directly with small
training budgets (64 pairs, 2 optimiser steps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import pipeline.preference_pairs as preference_pairs
import stages.eval_proxy as eval_proxy
import stages.train_proxy as train_proxy
from pipeline.cache import ArtifactCache
from pipeline.config import (
    BaseModelRef,
    EvalProxyConfig,
    EvalProxyStageConfig,
    LoraConfig,
    ProxyConfig,
    RMTrainingConfig,
    ScorerStageConfig,
    TrainProxyStageConfig,
    load_config,
)
from pipeline.records import PAIR_COLUMNS, messages, read_records
from pipeline.reward_model import HEAD_FILE, GRMRewardModel, RewardHeadConfig, is_grm_checkpoint
from pipeline.runner import Runner
from pipeline.scoring import build_scorer, load_reward_scorer
from pipeline.study import build_stages

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
N_TRAIN = 64
MAX_LEN = 64
HEAD_WIDTH = 16
SCORE_BATCH = 64  # the batch size train_proxy scores its training pairs with (reference stats, train accuracy)


# ------------------------------------------------------------------------------------------------------------ fixtures



@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """world, sft_policy and two gold_label artifacts (noise 0 and 0.25) of the smoke study, in one cache."""
    root = tmp_path_factory.mktemp("proxies_cache")

    def build(*overrides):
        cfg = load_config(SMOKE, [f"run.cache_root={root}", *overrides])
        cache = ArtifactCache(cfg.run.cache_root)
        plan = Runner(build_stages(cfg), cache).run(until={"gold_label"})
        return {p.node.key: cache.path(p.node.key, p.fingerprint) for p in plan if p.status == "cached"}

    clean = build()
    noisy = build("gold_label.noise_rate=0.25")
    assert noisy["gold_score"] == clean["gold_score"]  # only gold_label re-ran: no re-sampling, no re-scoring
    assert noisy["gold_label"] != clean["gold_label"]
    return SimpleNamespace(world=clean["world"], policy=clean["sft_policy"], pairs=clean["gold_label"],
                           noisy_pairs=noisy["gold_label"], tmp=tmp_path_factory)


def stage_cfg(proxy: ProxyConfig, **training) -> TrainProxyStageConfig:
    tr = dict(epochs=1, batch_size=32, max_length=MAX_LEN, n_train_pairs=N_TRAIN) | training
    return TrainProxyStageConfig(proxy=proxy, training=RMTrainingConfig(**tr), base=BaseModelRef())


@pytest.fixture(scope="module")
def trained(smoke):
    """`trained(label, proxy, pairs=..., **training)` -> train_proxy artifact dir, memoised by label."""
    memo: dict[str, Path] = {}

    def get(label: str, proxy: ProxyConfig, pairs: Path | None = None, **training) -> Path:
        if label not in memo:
            out = smoke.tmp.mktemp(f"train_{label}")
            train_proxy.run(stage_cfg(proxy, **training), {"pairs": pairs or smoke.pairs, "policy": smoke.policy},
                            out)
            memo[label] = out
        return memo[label]

    return get


def proxy(name: str, type_: str, **kw) -> ProxyConfig:
    return ProxyConfig(name=name, type=type_, head_width=HEAD_WIDTH, **kw)


TRAINED = {  # label -> proxy of each trained type (GRM with each regulariser)
    "bt": proxy("bt", "bt"),
    "margin": proxy("margin", "margin"),
    "label_smoothing": proxy("label_smoothing", "label_smoothing", epsilon=0.2),
    "frozen": proxy("frozen", "frozen"),
    "grm_sft": proxy("grm_sft", "grm", reg="sft", alpha=0.1),
    "grm_sft_nll": proxy("grm_sft_nll", "grm", reg="sft_nll", alpha=0.1),
    "grm_dpo_noref": proxy("grm_dpo_noref", "grm", reg="dpo_noref", alpha=0.1),
    "grm_dpo": proxy("grm_dpo", "grm", reg="dpo", alpha=0.1),
}


def read_pairs(artifact: Path) -> pd.DataFrame:
    return read_records(artifact / "pairs.parquet", PAIR_COLUMNS)


def score_pairs(scorer, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    prompts = [messages(p) for p in frame.prompt]
    return scorer.score(prompts, list(frame.chosen)), scorer.score(prompts, list(frame.rejected))


def safetensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        if f.name != HEAD_FILE:
            out |= load_file(str(f))
    return out


def head_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / HEAD_FILE))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_rescoring(art: Path, pairs_artifact: Path, labels: str, tol_pairs: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The saved model, loaded through the one scorer interface, reproduces the recorded training accuracy and the
    reference statistics (both computed by train_proxy from the in-memory model)."""
    metrics = json.loads((art / "metrics.json").read_text())
    stats = json.loads((art / "reference_stats.json").read_text())
    scorer = load_reward_scorer(art / "model", batch_size=SCORE_BATCH, max_length=MAX_LEN)
    train = preference_pairs.training_pairs(read_pairs(pairs_artifact), labels, N_TRAIN)
    r_c, r_r = score_pairs(scorer, train)
    assert not np.isnan(r_c).any() and not np.isnan(r_r).any()
    assert abs(float(np.mean(r_c > r_r)) - metrics["train_accuracy"]) <= tol_pairs / len(train) + 1e-12
    both = np.concatenate([r_c, r_r])
    assert stats["n"] == both.size
    assert stats["mean"] == pytest.approx(both.mean(), abs=1e-5)
    assert stats["std"] == pytest.approx(both.std(), abs=1e-5, rel=1e-4)
    return r_c, r_r


# --------------------------------------------------------------------------------------------------------- train_proxy


@pytest.mark.parametrize("label", list(TRAINED))
def test_train_proxy_every_type_writes_a_loadable_model(smoke, trained, label):
    art = trained(label, TRAINED[label])
    model_dir = art / "model"
    for f in ["config.json", "model.safetensors", "reward_head.json", HEAD_FILE, "tokenizer.json"]:
        assert (model_dir / f).is_file(), f
    assert is_grm_checkpoint(model_dir)
    GRMRewardModel.from_pretrained(model_dir, head=RewardHeadConfig(type="mlp", width=HEAD_WIDTH))  # strict load

    stats = json.loads((art / "reference_stats.json").read_text())
    assert math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] > 0
    assert stats["n"] == 2 * N_TRAIN

    metrics = json.loads((art / "metrics.json").read_text())
    assert metrics["train_pairs"] == N_TRAIN and metrics["dropped_over_length"] == 0
    assert metrics["steps"] == N_TRAIN // 32
    assert math.isfinite(metrics["train_loss"]) and 0.0 <= metrics["train_accuracy"] <= 1.0
    head_params = sum(t.numel() for t in head_of(model_dir).values())
    backbone_params = sum(t.numel() for t in safetensors_of(model_dir).values())
    if label == "frozen":
        assert metrics["trainable_parameters"] == head_params
    else:  # tied embeddings: the saved backbone holds every trainable backbone weight once
        assert metrics["trainable_parameters"] == head_params + backbone_params
    assert isinstance(json.loads((art / "train_log.json").read_text()), list)

    check_rescoring(art, smoke.pairs, "noisy")


def test_each_loss_trains_a_different_model(trained):
    """Same seed, data and init for every type: only the loss (or, for frozen, what trains) differs, so every saved
    model must differ. (Heads alone need not: the first step is a warmup step at lr 0, and the one effective step
    gives bt and frozen the same head gradient, and every GRM variant the same (1 - α)-scaled BT head gradient.)"""
    weights = {label: safetensors_of(trained(label, p) / "model") | head_of(trained(label, p) / "model")
               for label, p in TRAINED.items()}
    labels = list(weights)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert not same_tensors(weights[a], weights[b]), f"{a} and {b} trained identical models"


def test_frozen_keeps_the_base_backbone_bit_for_bit(smoke, trained):
    art = trained("frozen", TRAINED["frozen"])
    base = safetensors_of(smoke.policy / "model")
    saved = safetensors_of(art / "model")
    assert base.keys() == saved.keys()
    for k in base:
        assert torch.equal(base[k], saved[k]), k

    # the head trained: it differs from the seeded initialisation train_proxy starts from
    from transformers import set_seed

    p = TRAINED["frozen"]
    inits = []
    for _ in range(2):
        set_seed(p.seed)
        init = GRMRewardModel.from_base(smoke.policy / "model",
                                        RewardHeadConfig(type=p.head, width=p.head_width, dropout=p.head_dropout))
        inits.append({"v_head." + k: v for k, v in init.v_head.state_dict().items()})
    assert same_tensors(inits[0], inits[1])  # the reproduction of the initialisation is deterministic
    head = head_of(art / "model")
    assert head.keys() == inits[0].keys()
    assert not same_tensors(head, inits[0])
    # ... while a non-frozen proxy moved its backbone
    bt = safetensors_of(trained("bt", TRAINED["bt"]) / "model")
    assert not same_tensors(bt, base)


def test_same_seed_same_weights_other_seed_other_weights(trained):
    a = trained("bt", TRAINED["bt"]) / "model"
    b = trained("bt_again", TRAINED["bt"]) / "model"
    c = trained("bt_seed1", proxy("bt", "bt", seed=1)) / "model"
    assert same_tensors(safetensors_of(a), safetensors_of(b)) and same_tensors(head_of(a), head_of(b))
    assert not same_tensors(head_of(a), head_of(c))
    assert not same_tensors(safetensors_of(a), safetensors_of(c))
    assert json.loads((a.parent / "reference_stats.json").read_text()) == \
        json.loads((b.parent / "reference_stats.json").read_text())


# ------------------------------------------------------------------------------------------------------ label noise


def test_training_pairs_swap_exactly_the_flipped_pairs(smoke):
    pairs = read_pairs(smoke.noisy_pairs)
    assert (pairs.label_noisy == 0).sum() == round(0.25 * len(pairs))
    for n in (None, N_TRAIN):
        clean = preference_pairs.training_pairs(pairs, "clean", n)
        noisy = preference_pairs.training_pairs(pairs, "noisy", n)
        assert (clean.split == "train").all() and len(clean) == len(noisy)
        assert len(clean) == (N_TRAIN if n else int((pairs.split == "train").sum()))
        assert list(clean.pair_id) == list(noisy.pair_id)  # the same subset, in the same order
        flipped = (clean.label_noisy == 0).to_numpy()
        assert flipped.any() and (~flipped).any()
        assert (noisy.chosen[flipped].to_numpy() == clean.rejected[flipped].to_numpy()).all()
        assert (noisy.rejected[flipped].to_numpy() == clean.chosen[flipped].to_numpy()).all()
        other = [c for c in clean.columns if c not in ("chosen", "rejected")]
        pd.testing.assert_frame_equal(noisy[~flipped], clean[~flipped])
        pd.testing.assert_frame_equal(noisy[other], clean[other])
        # clean pairs are ordered by the gold, so every flipped pair is now ordered against it
        g = read_pairs(smoke.noisy_pairs).set_index("pair_id")
        assert (clean.chosen.to_numpy() == g.loc[clean.pair_id, "chosen"].to_numpy()).all()

    # without noise, both label columns give the same pairs
    pairs0 = read_pairs(smoke.pairs)
    assert (pairs0.label_noisy == 1).all()
    pd.testing.assert_frame_equal(preference_pairs.training_pairs(pairs0, "noisy", None),
                                  preference_pairs.training_pairs(pairs0, "clean", None))


def test_proxies_train_on_the_label_column_they_name(smoke, trained):
    on_noisy = trained("bt_noisy", TRAINED["bt"], pairs=smoke.noisy_pairs, labels="noisy")
    on_clean = trained("bt_clean", TRAINED["bt"], pairs=smoke.noisy_pairs, labels="clean")
    assert not same_tensors(head_of(on_noisy / "model"), head_of(on_clean / "model"))
    # each recorded training accuracy is against the orientation it trained on
    check_rescoring(on_noisy, smoke.noisy_pairs, "noisy")
    check_rescoring(on_clean, smoke.noisy_pairs, "clean")
    # with noise 0, "clean" trains exactly the model "noisy" does
    clean_on_clean = trained("bt_clean_no_noise", TRAINED["bt"], labels="clean")
    assert same_tensors(head_of(clean_on_clean / "model"), head_of(trained("bt", TRAINED["bt"]) / "model"))


# ----------------------------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("label", ["bt", "grm_dpo"])
def test_lora_trains_and_saves_a_merged_model_that_loads_strictly(smoke, trained, label):
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    art = trained(f"{label}_lora", TRAINED[label], lora=lora)
    model_dir = art / "model"
    base = safetensors_of(smoke.policy / "model")
    saved = safetensors_of(model_dir)
    assert saved.keys() == base.keys()  # merged: no lora_A/lora_B/base_layer names, nothing missing
    for k in base:
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            assert not torch.equal(base[k], saved[k]), f"{k}: LoRA delta not merged"
        else:
            assert torch.equal(base[k], saved[k]), f"{k} changed although only q/v carry LoRA"

    model = GRMRewardModel.from_pretrained(model_dir)  # strict: raises on missing/unexpected/mismatched keys
    assert not model.is_peft
    metrics = json.loads((art / "metrics.json").read_text())
    head_params = sum(t.numel() for t in head_of(model_dir).values())
    layers = model.causal_lm().config.num_hidden_layers
    hidden = model.causal_lm().config.hidden_size
    lora_params = layers * 2 * 4 * (hidden + hidden)  # q and v: A (r x H) + B (H x r), both square projections
    assert metrics["trainable_parameters"] == head_params + lora_params
    # the merged weights score like the in-memory LoRA model did (train accuracy and reference statistics)
    check_rescoring(art, smoke.pairs, "noisy", tol_pairs=1)


# ----------------------------------------------------------------------------------------------------------- eval_proxy


def run_eval(smoke, scorer_cfg: ScorerStageConfig, inputs: dict) -> pd.DataFrame:
    out = smoke.tmp.mktemp(f"eval_{scorer_cfg.name}")
    eval_proxy.run(EvalProxyStageConfig(eval=EvalProxyConfig(), scorer=scorer_cfg), inputs, out)
    table = pd.read_parquet(out / "accuracy.parquet")
    assert json.loads((out / "accuracy.json").read_text()) == table.to_dict(orient="records")
    return table


def test_eval_proxy_trained_and_checkpoint_agree_and_match_a_hand_computation(smoke, trained):
    p = TRAINED["bt"]
    art = trained("bt_noisy", p, pairs=smoke.noisy_pairs, labels="noisy")
    as_trained = run_eval(smoke, ScorerStageConfig(name="rm", proxy=p, batch_size=64, max_length=MAX_LEN),
                          {"model": art, "pairs": smoke.noisy_pairs})
    ckpt = ProxyConfig(name="rm", type="checkpoint", path=str(art / "model"))
    as_checkpoint = run_eval(smoke, ScorerStageConfig(name="rm", proxy=ckpt, batch_size=64, max_length=MAX_LEN),
                             {"pairs": smoke.noisy_pairs})
    pd.testing.assert_frame_equal(as_trained, as_checkpoint)

    rows = {(r.set, r.labels): r for r in as_trained.itertuples()}
    assert set(rows) == {("id_test", "clean"), ("id_test", "noisy"), ("ood", "clean")}
    assert (as_trained.proxy == "rm").all()

    scorer = load_reward_scorer(art / "model", batch_size=64, max_length=MAX_LEN)
    pairs = read_pairs(smoke.noisy_pairs)
    sets = {"id_test": pairs[pairs.split == "test"],
            "ood": read_records(smoke.noisy_pairs / "ood_pairs.parquet", PAIR_COLUMNS)}
    for name, frame in sets.items():
        r_c, r_r = score_pairs(scorer, frame)
        assert not np.isnan(r_c).any() and not np.isnan(r_r).any()
        row = rows[(name, "clean")]
        assert row.pairs == len(frame) and row.unscored == 0
        assert row.accuracy == pytest.approx(np.mean(r_c > r_r), abs=1e-12)
        assert row.ties == int((r_c == r_r).sum())
        if name == "id_test":
            lab = frame.label_noisy.to_numpy()
            assert (lab == 0).any()
            correct = [(c > r) if y == 1 else (r > c) for c, r, y in zip(r_c, r_r, lab)]
            assert rows[(name, "noisy")].accuracy == pytest.approx(np.mean(correct), abs=1e-12)


def test_pairwise_accuracy_cases():
    acc = preference_pairs.pairwise_accuracy
    nan = float("nan")
    # strict: a tie is counted as a tie and is not correct
    r = acc(np.array([1.0, 2.0, 3.0, 5.0]), np.array([0.0, 2.0, 4.0, 1.0]))
    assert r == {"pairs": 4, "unscored": 0, "accuracy": 0.5, "ties": 1}
    # NaN on either side: counted as unscored and excluded from the accuracy and the ties
    r = acc(np.array([1.0, nan, 3.0, 2.0, 7.0]), np.array([0.0, 1.0, nan, 2.0, 9.0]))
    assert r == {"pairs": 3, "unscored": 2, "accuracy": pytest.approx(1 / 3), "ties": 1}
    # noisy labels: 0 means the rejected side was preferred; the labels of NaN pairs are dropped with them
    r_c = np.array([1.0, 0.0, 5.0, nan, 2.0])
    r_r = np.array([0.0, 1.0, 4.0, 3.0, 2.0])
    r = acc(r_c, r_r, np.array([1, 0, 0, 0, 0]))
    assert r == {"pairs": 4, "unscored": 1, "accuracy": 0.5, "ties": 1}  # correct: pair 0 and pair 1
    r = acc(r_c, r_r, np.array([0, 1, 1, 1, 1]))
    assert r["accuracy"] == 0.25  # only pair 2; the tie is wrong whatever the label
    # all unscored
    r = acc(np.array([nan, nan]), np.array([1.0, nan]))
    assert r["pairs"] == 0 and r["unscored"] == 2 and math.isnan(r["accuracy"]) and r["ties"] == 0
    # all labels 1 is the same as no labels
    x, y = np.array([0.3, 0.1, 0.2]), np.array([0.2, 0.4, 0.2])
    assert acc(x, y) == acc(x, y, np.ones(3, dtype=int))


def test_bad_checkpoint_path_names_the_path(smoke, tmp_path):
    missing = tmp_path / "no_such_rm" / "model"
    bad = ProxyConfig(name="ck", type="checkpoint", path=str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_rm"):
        build_scorer(ScorerStageConfig(name="ck", proxy=bad), {})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        eval_proxy.run(EvalProxyStageConfig(eval=EvalProxyConfig(), scorer=ScorerStageConfig(name="ck", proxy=bad)),
                       {"pairs": smoke.pairs}, out)
    assert str(missing) in str(e.value)
    assert not any(out.iterdir())
    # a relative local path too
    rel = ProxyConfig(name="ck", type="checkpoint", path="./no_such_rm_dir")
    with pytest.raises(FileNotFoundError, match="no_such_rm_dir"):
        build_scorer(ScorerStageConfig(name="ck", proxy=rel), {})
