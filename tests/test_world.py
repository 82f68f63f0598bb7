"""The tiny world: gold reward semantics, tokenizer + chat template, determinism of the world stage."""

import random

import pandas as pd
import pytest

from pipeline import world as W
from pipeline.config import WorldConfig
from pipeline.scoring import WorldGoldScorer
from pipeline.tokenization import encode_conversation, prompt_ids


@pytest.mark.parametrize("response, expected", [
    ("apple pear plum", 3),          # exactly k distinct fruits: the best answer
    ("apple pear", 2),               # one short
    ("apple pear plum kiwi", 2),     # one beyond k
    ("apple apple pear", 1),         # a repeat
    ("apple dog plum", 1),           # an intruder
    ("", -1),                        # empty
    ("apple pear plum kiwi lemon mango", 0),
])
def test_gold_reward_rules(response, expected):
    assert W.gold_reward("list 3 fruits", response) == expected


def test_gold_reward_reads_prompt_like_a_grader():
    assert W.gold_reward("please name 1 animals", "dog") == 1
    assert W.gold_reward("kindly mention 6 colors", "red blue green yellow pink gray") == 6
    with pytest.raises(ValueError, match="not a prompt"):
        W.gold_reward("hello there", "dog")
    b = W.gold_breakdown("list 2 tools", "saw saw axe drill dog")
    assert b == {"k": 2, "length": 5, "correct": 2, "beyond_k": 1, "repeats": 1, "intruders": 1}


def test_gold_scorer_interface():
    scores = WorldGoldScorer().score(["list 3 fruits", [{"role": "user", "content": "list 1 fruits"}]],
                                     ["apple pear plum", "apple pear"])
    assert scores.tolist() == [3.0, 0.0]


def test_tokenizer_chat_template_single_bos_and_response_span(tmp_path):
    tok = W.build_tokenizer()
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = prompt_ids(tok, "list 3 fruits")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "<|user|>", "list", "3", "fruits", "<|assistant|>"]
    enc = encode_conversation(tok, "list 3 fruits", "apple pear plum", max_length=64)
    toks = tok.convert_ids_to_tokens(enc.input_ids)
    assert toks.count("<s>") == 1 and toks[-1] == "</s>"
    assert toks[enc.response_start:] == ["apple", "pear", "plum", "</s>"]
    assert tok.decode(enc.input_ids[enc.response_start:-1]) == "apple pear plum"
    assert encode_conversation(tok, "list 3 fruits", "apple pear plum", max_length=5).truncated


def test_world_stage_is_deterministic_and_splits_prompts(tmp_path):
    import stages.world as stage

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    cfg = WorldConfig(n_pretrain_examples=200, n_demonstrations=100, n_ood_pairs=50, n_eval_prompts=8)
    stage.run(cfg, {}, a)
    stage.run(cfg, {}, b)
    for f in ["pretrain", "demonstrations", "train_prompts", "eval_prompts", "ood_candidates"]:
        pd.testing.assert_frame_equal(pd.read_parquet(a / f"{f}.parquet"), pd.read_parquet(b / f"{f}.parquet"))
    train = pd.read_parquet(a / "train_prompts.parquet")
    ev = pd.read_parquet(a / "eval_prompts.parquet")
    texts = lambda frame: set(frame.prompt.map(lambda p: p[0]["content"]))  # noqa: E731
    assert len(ev) == 8 and not texts(train) & texts(ev)
    ood = pd.read_parquet(a / "ood_candidates.parquet")
    for p in ood.prompt:  # every OOD prompt has an unseen verb, opener or list length
        spec = W.parse_prompt(p[0]["content"])
        assert spec.verb in W.OOD_VERBS or spec.opener in W.OOD_OPENERS or spec.k > max(W.TRAIN_KS)
    demos = pd.read_parquet(a / "demonstrations.parquet")
    gold = [W.gold_reward(p[0]["content"], r) for p, r in zip(demos.prompt, demos.response)]
    best = [W.parse_prompt(p[0]["content"]).k for p in demos.prompt]
    assert sum(gold) < sum(best)  # demonstrations are flawed
    pre = pd.read_parquet(a / "pretrain.parquet")
    assert all(W.gold_reward(p[0]["content"], r) == W.parse_prompt(p[0]["content"]).k
               for p, r in zip(pre.prompt, pre.response))  # the pretraining corpus is clean


def test_flawed_demonstrations_undercount_more_than_overcount():
    rng = random.Random(0)
    spec = W.PromptSpec("", "list", 4, "fruits")
    lengths = [len(set(W.flawed_demonstration(spec, rng, 0.35, 0.1, 0.0, 0.0))) for _ in range(2000)]
    short = sum(n < 4 for n in lengths) / len(lengths)
    long = sum(n > 4 for n in lengths) / len(lengths)
    assert short > 2 * long > 0  # the shortcut: among pairs, more items usually looks better
