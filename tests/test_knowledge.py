"""Knowledge-use diagnostics: minimal pairs, what decides a preference pair, the paired AUC and its bootstrap
interval, the base policy's log-probability scorer, the pairs file, the stages and their place in the study."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import world as W
from pipeline.config import ConfigError, load_config
from pipeline.knowledge import auc_interval, load_pairs_file, paired_auc, score_minimal_pairs
from pipeline.records import KNOWLEDGE_SCORE_COLUMNS, RecordError, prompt_text, read_records, user_prompt
from pipeline.scoring import NonFiniteScoreError, PolicyLogProbScorer, WorldGoldScorer
from pipeline.study import build_stages

CONFIGS = Path(__file__).parents[1] / "configs"
SMOKE = CONFIGS / "smoke.yaml"


# ---------------------------------------------------------------------------------------------------------------
# minimal pairs and deciding differences (pipeline.world)


@pytest.mark.parametrize("kind", W.MINIMAL_PAIR_KINDS)
def test_minimal_pairs_differ_in_exactly_one_word_and_keep_length(kind):
    rng = random.Random(0)
    for spec in W.all_prompts(W.TRAIN_VERBS, W.TRAIN_OPENERS, [2, 3, 4, 5]):
        clean, flawed = W.minimal_pair(spec, kind, rng)
        assert len(clean) == len(flawed) == spec.k
        diff = [i for i, (a, b) in enumerate(zip(clean, flawed)) if a != b]
        assert len(diff) == 1
        prompt = spec.render()
        assert W.gold_reward(prompt, " ".join(clean)) == spec.k  # clean is correct
        assert W.gold_reward(prompt, " ".join(flawed)) == spec.k - 2
        new = flawed[diff[0]]
        if kind == "intruder":
            assert W.ITEM_CATEGORY[new] != spec.category
            assert W.deciding_difference(prompt, " ".join(clean), " ".join(flawed)) == "intruders"
        else:
            assert new in clean
            assert W.deciding_difference(prompt, " ".join(clean), " ".join(flawed)) == "repeats"


def test_minimal_pair_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        W.minimal_pair(W.PromptSpec("", "list", 1, "fruits"), "repeat", random.Random(0))
    with pytest.raises(ValueError, match="unknown minimal-pair kind"):
        W.minimal_pair(W.PromptSpec("", "list", 3, "fruits"), "typo", random.Random(0))
    assert W.minimal_pair(W.PromptSpec("", "list", 1, "fruits"), "intruder", random.Random(0))[1][0] not in \
        W.CATEGORIES["fruits"]


@pytest.mark.parametrize("prompt, chosen, rejected, expected", [
    ("list 2 fruits", "apple pear", "apple dog", "intruders"),        # an item swapped for another category's word
    ("list 3 fruits", "apple pear dog", "apple dog cat", "intruders"),
    ("list 3 fruits", "apple pear plum", "apple pear pear", "repeats"),  # an item swapped for a repeat
    ("list 2 fruits", "apple pear", "apple", "count"),                # one short
    ("list 2 fruits", "apple pear", "apple pear plum", "count"),      # one beyond k
    ("list 2 fruits", "apple pear", "apple pear dog", "several"),     # an added intruder: length and intruders differ
    ("list 3 fruits", "apple pear", "apple apple apple", "several"),
    ("list 2 fruits", "apple pear", "pear apple", "none"),
])
def test_deciding_difference(prompt, chosen, rejected, expected):
    assert W.deciding_difference(prompt, chosen, rejected) == expected
    assert W.gold_reward(prompt, chosen) > W.gold_reward(prompt, rejected) or expected == "none"


def test_deciding_shares_sum_to_one():
    share = W.deciding_shares(["list 2 fruits"] * 4, ["apple pear"] * 4,
                              ["apple dog", "apple", "apple dog", "apple pear dog"])
    assert share == {"intruders": 0.5, "repeats": 0.0, "count": 0.25, "several": 0.25, "none": 0.0}
    with pytest.raises(ValueError, match="no pairs"):
        W.deciding_shares([], [], [])


# ---------------------------------------------------------------------------------------------------------------
# the paired AUC and its bootstrap interval


def test_auc_known_answers():
    assert paired_auc([2, 3, 4], [1, 2, 3]) == 1.0  # perfect separation
    assert paired_auc([1, 2, 3], [2, 3, 4]) == 0.0  # reversed
    assert paired_auc([1, 1, 1], [1, 1, 1]) == 0.5  # all ties
    assert paired_auc([3, 1, 2, 2], [1, 2, 2, 0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # by hand: 0.625
    with pytest.raises(ValueError, match="shape"):
        paired_auc([1, 2], [1])


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    clean, flawed = rng.normal(0.3, 1, 300), rng.normal(0, 1, 300)
    r = auc_interval(clean, flawed, n_boot=1000, seed=0)
    assert r["lo"] <= r["auc"] <= r["hi"] and r["hi"] - r["lo"] < 0.25 and r["pairs"] == 300
    assert auc_interval(clean, flawed, n_boot=1000, seed=0) == r
    assert auc_interval(clean, flawed, n_boot=1000, seed=1) != r
    one_chunk = auc_interval(clean, flawed, n_boot=50, seed=0)
    assert one_chunk["lo"] <= one_chunk["auc"] <= one_chunk["hi"]
    perfect = auc_interval([1, 2, 3], [0, 1, 2], n_boot=100, seed=0)
    assert perfect["auc"] == perfect["lo"] == perfect["hi"] == 1.0
    none = auc_interval(clean, flawed, n_boot=0, seed=0)
    assert np.isnan(none["lo"]) and np.isnan(none["hi"]) and none["auc"] == r["auc"]
    assert auc_interval([1, 1], [1, 0], n_boot=0, seed=0)["ties"] == 1


# ---------------------------------------------------------------------------------------------------------------
# scoring minimal pairs


def world_pairs(n: int = 40, seed: int = 0) -> pd.DataFrame:
    import stages.knowledge_pairs as stage

    specs = W.all_prompts(["list"], [""], [1, 2, 3])[:12]
    prompts = pd.DataFrame({"prompt_id": [f"ev{i:04d}" for i in range(len(specs))],
                            "prompt": [user_prompt(s.render()) for s in specs]})
    return stage.world_pairs(prompts, n, seed)


def test_world_pairs_are_seeded_and_repeats_need_two_items():
    pairs = world_pairs()
    assert pairs.kind.value_counts().to_dict() == {"intruder": 40, "repeat": 40}
    assert pairs.pair_id.is_unique
    assert all(W.parse_prompt(prompt_text(p)).k >= 2 for p in pairs[pairs.kind == "repeat"].prompt)
    pd.testing.assert_frame_equal(pairs, world_pairs())
    assert not pairs.equals(world_pairs(seed=1))


class Negated:
    """A scorer that prefers what the gold does not: the flawed side of every minimal pair."""

    def score(self, prompts, responses):
        return -WorldGoldScorer().score(prompts, responses)


class NaNFor:
    def __init__(self, response: str):
        self.response = response

    def score(self, prompts, responses):
        return np.array([np.nan if r == self.response else 1.0 for r in responses])


def test_score_minimal_pairs_gold_right_negated_reversed(tmp_path):
    pairs = world_pairs()
    tree = score_minimal_pairs(WorldGoldScorer(), "gold", pairs, 200, 0, tmp_path, "x")
    assert {k: v["auc"] for k, v in tree["kinds"].items()} == {"intruder": 1.0, "repeat": 1.0}
    assert json.loads((tmp_path / "auc.json").read_text()) == tree
    scores = read_records(tmp_path / "scores.parquet", KNOWLEDGE_SCORE_COLUMNS)
    assert list(scores.pair_id) == list(pairs.pair_id) and (scores.score_clean > scores.score_flawed).all()
    (tmp_path / "neg").mkdir()
    tree = score_minimal_pairs(Negated(), "flawed-favouring", pairs, 200, 0, tmp_path / "neg", "x")
    assert {k: (v["auc"], v["lo"], v["hi"]) for k, v in tree["kinds"].items()} == \
        {"intruder": (0.0, 0.0, 0.0), "repeat": (0.0, 0.0, 0.0)}


def test_non_finite_score_names_scorer_and_pair(tmp_path):
    pairs = world_pairs()
    bad = pairs.iloc[7]
    with pytest.raises(NonFiniteScoreError, match=rf"scorer 'broken'.*pair_id='{bad.pair_id}'.*flawed side"):
        score_minimal_pairs(NaNFor(bad.flawed), "broken", pairs.iloc[7:8], 10, 0, tmp_path, "x")
    assert not any(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------------------------------------------------------
# pairs from a file (paper scale)


def test_pairs_file_jsonl_and_parquet(tmp_path):
    rows = [{"prompt": "What is 2+2?", "clean": "4", "flawed": "5", "kind": "arithmetic"},
            {"prompt": [{"role": "user", "content": "Capital of France?"}], "clean": "Paris", "flawed": "Lyon",
             "kind": "fact"},
            {"prompt": "What is 2+2?", "clean": "four", "flawed": "five", "kind": "arithmetic"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_pairs_file(path)
    assert list(pairs.pair_id) == ["kp00000", "kp00001", "kp00002"]
    assert list(pairs.prompt_id) == ["kpp00000", "kpp00001", "kpp00000"]
    assert pairs.prompt.iloc[0] == [{"role": "user", "content": "What is 2+2?"}]
    pd.DataFrame(pairs).to_parquet(tmp_path / "pairs.parquet")
    again = load_pairs_file(tmp_path / "pairs.parquet")
    assert list(again.pair_id) == list(pairs.pair_id) and prompt_text(again.prompt.iloc[1]) == "Capital of France?"


def test_pairs_file_schema_errors_name_file_and_column(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "clean": "a", "flawed": "b"}))
    with pytest.raises(RecordError, match=r"pairs\.jsonl: missing column 'kind'"):
        load_pairs_file(path)
    path.write_text(json.dumps({"prompt": "q", "clean": "a", "flawed": None, "kind": "k"}))
    with pytest.raises(RecordError, match=r"pairs\.jsonl: column 'flawed' must hold strings \(row 0"):
        load_pairs_file(path)
    pd.DataFrame({"prompt": ["q"], "clean": ["a"], "kind": ["k"]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(RecordError, match=r"p\.parquet: missing column 'flawed'"):
        load_pairs_file(tmp_path / "p.parquet")
    with pytest.raises(RecordError, match="not found"):
        load_pairs_file(tmp_path / "absent.jsonl")
    (tmp_path / "p.csv").write_text("prompt,clean,flawed,kind\n")
    with pytest.raises(RecordError, match="jsonl, .json or .parquet"):
        load_pairs_file(tmp_path / "p.csv")


# ---------------------------------------------------------------------------------------------------------------
# the base policy's log-probability as a scorer


def test_policy_logprob_scorer_equals_teacher_forced_sum():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tokenization import encode_conversation

    tok = W.build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=tok.pad_token_id)).eval()
    prompts = ["list 3 fruits", "list 1 animals", "name 2 tools"]
    responses = ["apple pear plum", "dog", "saw saw axe drill"]
    scorer = PolicyLogProbScorer(model, tok, batch_size=2, max_length=64)
    got = scorer.score(prompts, responses)
    for p, r, g in zip(prompts, responses, got):
        enc = encode_conversation(tok, p, r, max_length=64)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        want = sum(logp[t - 1, enc.input_ids[t]].item() for t in range(enc.response_start, len(enc.input_ids)))
        assert g == pytest.approx(want, abs=1e-4)  # response words and the closing EOS, each given its prefix
    assert got[0] == pytest.approx(scorer.score(prompts[:1], responses[:1])[0], abs=1e-5)  # batching irrelevant


# ---------------------------------------------------------------------------------------------------------------
# configuration and the study's DAG


def test_knowledge_stages_in_the_study():
    nodes = {n.key: n for n in build_stages(load_config(SMOKE))}
    assert {"knowledge_pairs", "knowledge_base", "knowledge[bt]", "knowledge[grm_sft]"} <= set(nodes)
    assert nodes["knowledge_pairs"].inputs == {"world": "world"}
    assert nodes["knowledge_base"].inputs == {"pairs": "knowledge_pairs", "policy": "sft_policy"}
    assert nodes["knowledge[bt]"].inputs == {"pairs": "knowledge_pairs", "model": "train_proxy[bt]"}
    report = nodes["report"].inputs
    assert report["knowledge_base"] == "knowledge_base" and report["knowledge[grm_sft]"] == "knowledge[grm_sft]"
    off = {n.key for n in build_stages(load_config(SMOKE, ["knowledge.enabled=false"]))}
    assert not {k for k in off if k.startswith("knowledge")}


def test_knowledge_at_paper_scale_needs_a_pairs_file(tmp_path):
    paper = CONFIGS / "paper" / "gemma2b_unified_feedback.yaml"
    assert not any(n.key.startswith("knowledge") for n in build_stages(load_config(paper)))  # off by default there
    with pytest.raises(ConfigError, match="knowledge.pairs_path is not set"):
        load_config(paper, ["knowledge.enabled=true"])
    path = tmp_path / "pairs.jsonl"
    nodes = {n.key: n for n in build_stages(load_config(paper, [f"knowledge.pairs_path={path}"]))}
    assert nodes["knowledge_pairs"].inputs == {} and nodes["knowledge_pairs"].external == (str(path),)
    assert nodes["knowledge_base"].inputs == {"pairs": "knowledge_pairs"}


# ---------------------------------------------------------------------------------------------------------------
# end to end on the smoke study (about 20 s): stages, then the report's section


def test_knowledge_stages_and_report_on_the_smoke_study(tmp_path, capsys):
    import stages.report as report
    from pipeline.cache import ArtifactCache
    from pipeline.config import ReportStageConfig
    from pipeline.runner import Runner

    cfg = load_config(SMOKE, [f"run.cache_root={tmp_path / 'cache'}", "knowledge.n_pairs=40",
                              "knowledge.bootstrap=100"])
    cache = ArtifactCache(cfg.run.cache_root)
    plan = Runner(build_stages(cfg), cache).run(until={"knowledge[bt]", "knowledge_base", "eval_proxy[bt]"})
    art = {p.node.key: cache.path(p.node.key, p.fingerprint) for p in plan if p.status == "cached"}
    pairs = pd.read_parquet(art["knowledge_pairs"] / "pairs.parquet")
    assert pairs.kind.value_counts().to_dict() == {"intruder": 40, "repeat": 40}
    eval_ids = set(pd.read_parquet(art["world"] / "eval_prompts.parquet").prompt_id)
    assert set(pairs.prompt_id) <= eval_ids  # held-out evaluation prompts only
    for key in ("knowledge_base", "knowledge[bt]"):
        tree = json.loads((art[key] / "auc.json").read_text())
        assert set(tree["kinds"]) == {"intruder", "repeat"}
        assert all(0 <= r["lo"] <= r["auc"] <= r["hi"] <= 1 for r in tree["kinds"].values())
    base = pd.read_parquet(art["knowledge_base"] / "scores.parquet")
    assert (base[["score_clean", "score_flawed"]] < 0).all().all()  # log-probabilities

    out = tmp_path / "report"
    out.mkdir()
    report.run(ReportStageConfig(study="smoke", proxies=["bt"]),
               {"policy": art["sft_policy"], "pairs": art["gold_label"], "eval[bt]": art["eval_proxy[bt]"],
                "knowledge_base": art["knowledge_base"], "knowledge[bt]": art["knowledge[bt]"]}, out)
    table = pd.read_csv(out / "knowledge.csv")
    assert list(table.scorer.unique()) == [report.BASE_SCORER, "bt"] and set(table.kind) == {"intruder", "repeat"}
    readme = (out / "README.md").read_text()
    assert "## Knowledge use" in readme and "decided by an intruder difference alone" in readme

    from pipeline.cli import main  # `overopt show` prints the same shares as the report

    capsys.readouterr()
    assert main(["show", str(SMOKE), f"run.cache_root={tmp_path / 'cache'}", "-n", "1"]) == 0
    shown = capsys.readouterr().out.splitlines()[-1]
    assert "decided by an intruder difference alone" in shown and shown.split("%")[0].split()[-1] in readme
