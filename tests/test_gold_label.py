"""Gold labeling: exact seeded noise, clean labels kept, ties dropped, the Unified-Feedback path."""

import json

import numpy as np
import pandas as pd
import pytest

import stages.gold_label as stage
import stages.gold_score as gold_score
from pipeline.config import GoldConfig, GoldLabelStageConfig, GoldScoreStageConfig
from pipeline.records import PAIR_COLUMNS
from pipeline.scoring import WorldGoldScorer


def candidates(n=100, seed=0):
    rng = np.random.default_rng(seed)
    fruits = ["apple", "pear", "plum", "kiwi", "lemon", "mango"]
    rows = []
    for i in range(n):
        a = " ".join(rng.choice(fruits, rng.integers(1, 6)))
        b = " ".join(rng.choice(fruits, rng.integers(1, 6)))
        rows.append({"pair_id": f"p{i}", "prompt_id": f"q{i % 10}",
                     "prompt": [{"role": "user", "content": "list 3 fruits"}],
                     "response_a": a, "response_b": b})
    return pd.DataFrame(rows)


def scored(cands):
    return gold_score.score_candidates(cands, WorldGoldScorer())


def test_label_pairs_orders_by_gold_and_drops_ties():
    cands = candidates()
    cands.loc[0, "response_b"] = cands.loc[0, "response_a"]  # an exact tie
    pairs, stats = stage.label_pairs(scored(cands))
    assert stats["ties_dropped"] >= 1 and len(pairs) == len(cands) - stats["ties_dropped"]
    assert (pairs.gold_chosen > pairs.gold_rejected).all()
    assert "p0" not in set(pairs.pair_id)
    gold = WorldGoldScorer()
    assert np.allclose(gold.score(list(pairs.prompt), list(pairs.chosen)), pairs.gold_chosen)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.5])
def test_noise_rate_is_exact_and_seeded_and_clean_labels_kept(rate):
    pairs, _ = stage.label_pairs(scored(candidates(400)))
    a = stage.add_label_noise(pairs, rate, seed=7)
    b = stage.add_label_noise(pairs, rate, seed=7)
    c = stage.add_label_noise(pairs, rate, seed=8)
    assert (a.label_noisy == 0).sum() == round(rate * len(pairs))
    assert (a.label_noisy == b.label_noisy).all()
    if 0 < rate < 0.5:
        assert not (a.label_noisy == c.label_noisy).all()
    assert (a.label_clean == 1).all() and (a[["chosen", "rejected"]] == pairs[["chosen", "rejected"]]).all().all()


def test_unified_feedback_path_with_a_local_seq_cls_gold(tmp_path):
    """UF-schema parquet + a tiny local sequence-classification gold RM, through the stage's run()."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.world import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    gold_dir = tmp_path / "gold"
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                       pad_token_id=tok.pad_token_id))
    model.save_pretrained(gold_dir)
    tok.save_pretrained(gold_dir)
    rows = []
    for i in range(40):
        prompt = {"role": "user", "content": "list 2 fruits"}
        rows.append({"id": f"uf{i}",
                     "conv_A": [prompt, {"role": "assistant", "content": "apple pear" if i % 2 else "kiwi"}],
                     "conv_B": [prompt, {"role": "assistant", "content": "plum" if i % 3 else "apple apple"}],
                     "conv_A_rating": 1.0, "conv_B_rating": 2.0, "num_turns": 1, "source": "test"})
    data = tmp_path / "uf.parquet"
    pd.DataFrame(rows).to_parquet(data)
    score_cfg = GoldScoreStageConfig(source="unified_feedback", dataset_path=str(data), n_pairs=30,
                                     gold=GoldConfig(type="hf", model_id=str(gold_dir), batch_size=4, max_length=64))
    scores = tmp_path / "scores"
    scores.mkdir()
    gold_score.run(score_cfg, {}, scores)
    cfg = GoldLabelStageConfig(n_pairs=30, test_fraction=0.2, noise_rate=0.2, noise_seed=0, seed=0)
    out = tmp_path / "out"
    out.mkdir()
    stage.run(cfg, {"scores": scores}, out)
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert set(PAIR_COLUMNS) <= set(pairs.columns)
    assert 0 < len(pairs) <= 30 and (pairs.gold_chosen > pairs.gold_rejected).all()
    assert (pairs.label_noisy == 0).sum() == round(0.2 * len(pairs))
    assert set(pairs.split) <= {"train", "test"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == len(pairs)


def test_over_length_pairs_are_dropped_not_truncated():
    cands = candidates(20)
    sc = scored(cands)
    sc.loc[[0, 1], "gold_a"] = np.nan  # what a scorer returns for a pair over its max length
    pairs, stats = stage.label_pairs(sc)
    assert stats["over_length_dropped"] == 2 and not {"p0", "p1"} & set(pairs.pair_id)
