"""RewardBench and RewardBench 2 in eval_proxy: files written here in both schemas, scored with a fake reward
(the response's length) against hand-computed section-weighted, best-of-4 and Ties scores; schema errors name the
file and the column before anything is scored; the config keys enter fingerprints only when set; and a run with a
tiny sequence-classification reward model writes the rows, over-length answers counted as unscored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stages.eval_proxy as eval_proxy
from pipeline.cache import ArtifactCache
from pipeline.config import (
    ConfigError,
    EvalProxyConfig,
    EvalProxyStageConfig,
    ProxyConfig,
    ScorerStageConfig,
    load_config,
)
from pipeline.records import PAIR_COLUMNS, write_records
from pipeline.runner import Runner, fingerprint_view
from pipeline.study import build_stages, check_local_paths

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


class LengthScorer:
    """A fake reward: the response's length in characters."""

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return np.array([float(len(r)) for r in responses])


def a(n: int) -> str:
    return "a" * n


# (subset, len(chosen), len(rejected)): the fake reward is the length, so each pair's outcome is chosen here
RB_PAIRS = [
    ("alpacaeval-easy", 9, 3), ("alpacaeval-easy", 8, 2),      # 2/2
    ("mt-bench-med", 7, 4), ("mt-bench-med", 5, 5),            # 1/2: a tie counts wrong
    ("llmbar-natural", 2, 6),                                  # 0/1
    ("mt-bench-hard", 6, 1),                                   # 1/1
    ("donotanswer", 4, 3), ("donotanswer", 3, 4),              # 1/2
    ("math-prm", 5, 1), ("math-prm", 6, 2),                    # 2/2
    ("hep-python", 1, 5), ("hep-python", 2, 5),                # 0/2
    ("hep-go", 9, 1),                                          # 1/1
    ("anthropic_helpful", 5, 1),                               # in no section
]
# calculate_scores_per_section with rewardbench/constants.py's EXAMPLE_COUNTS, by hand
CHAT = (100 * 1.0 + 40 * 0.5) / (100 + 40)
CHAT_HARD = (100 * 0.0 + 37 * 1.0) / (100 + 37)
SAFETY = 0.5
REASONING = (984 * 1.0 + 164 * 0.0 + 164 * 1.0) / (984 + 164 + 164)  # math-prm weighted 984, not its 2 rows
RB_OVERALL = (CHAT + CHAT_HARD + SAFETY + REASONING) / 4


def write_rewardbench(path: Path, pairs=RB_PAIRS, drop: str | None = None) -> Path:
    rows = [{"prompt": f"question {i}", "chosen": a(c), "chosen_model": "m1", "rejected": a(r),
             "rejected_model": "m2", "subset": s, "id": 100 + i} for i, (s, c, r) in enumerate(pairs)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.drop_columns([drop]) if drop else table, path)
    return path


# (id, subset, chosen lengths, rejected lengths)
RB2_ROWS = [
    ("0", "Factuality", [10], [3, 4, 5]),          # chosen alone on top: 1
    ("1", "Factuality", [7], [7, 2, 1]),           # top shared with one other: 1/2
    ("2", "Math", [3], [4, 1, 2]),                 # not on top: 0
    ("ref:1", "Ties", [10], [4, 6]),
    ("tied:1", "Ties", [9, 8], [3, 5]),
    ("ref:2", "Ties", [5], [7]),
    ("tied:2", "Ties", [12, 6], [2]),
]


def ties_by_hand() -> float:
    # per prompt: accurate (worst correct > best incorrect), spread (best - worst correct), margin (worst correct -
    # best incorrect). ref:1 yes, margin 4; ref:2 no, margin -2; tied:1 yes, spread 1, margin 3; tied:2 yes,
    # spread 6, margin 4
    ref_acc, tied_acc = 1 / 2, 2 / 2
    preferred = np.mean([3 > 1, 4 > 6])
    preferred_hard = np.mean([min(4, 3) > 1, min(-2, 4) > 6])
    margin_score = np.mean([math.tanh(min(4, 3) / 1 - 1), math.tanh(min(-2, 4) / 6 - 1)])
    return 0.3 * tied_acc + 0.3 * ref_acc + 0.2 * preferred + 0.2 * preferred_hard + 0.01 * margin_score


def write_rewardbench2(path: Path, rows=RB2_ROWS, drop: str | None = None) -> Path:
    with open(path, "w") as fh:
        for example_id, subset, chosen, rejected in rows:
            row = {"id": example_id, "prompt": f"question {example_id}", "chosen": [a(n) for n in chosen],
                   "rejected": [a(n) for n in rejected], "num_correct": len(chosen), "num_rejected": len(rejected),
                   "total_completions": len(chosen) + len(rejected), "models": ["m"], "subset": subset}
            row.pop(drop, None)
            fh.write(json.dumps(row) + "\n")
    return path


def pairs_dir(directory: Path, n: int = 2) -> Path:
    """A gold_label artifact with `n` test pairs (eval_proxy always scores its in-distribution set)."""
    prompt = [{"role": "user", "content": "list 2 fruits"}]
    frame = pd.DataFrame([{"pair_id": f"p{i}", "prompt_id": "q", "prompt": prompt,
                           "chosen": "apple pear", "rejected": "kiwi", "gold_chosen": 1.0, "gold_rejected": 0.0,
                           "label_clean": 1, "label_noisy": 1, "split": "test"} for i in range(n)])
    directory.mkdir()
    write_records(frame, directory / "pairs.parquet", PAIR_COLUMNS)
    return directory


def run_eval(tmp_path, monkeypatch=None, scorer=None, proxy=None, **paths) -> Path:
    if monkeypatch is not None:
        monkeypatch.setattr(eval_proxy, "build_scorer", lambda *a_, **k: scorer)
    where = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    out = where / "out"
    out.mkdir(parents=True)
    cfg = EvalProxyStageConfig(eval=EvalProxyConfig(**{k: str(v) for k, v in paths.items()}),
                               scorer=ScorerStageConfig(name="rm", proxy=proxy or ProxyConfig(name="rm", type="bt"),
                                                        max_length=64))
    eval_proxy.run(cfg, {"pairs": pairs_dir(where / "pairs")}, out)
    return out


def accuracy_rows(out: Path) -> dict[str, dict]:
    rows = json.loads((out / "accuracy.json").read_text())
    assert rows == pd.read_parquet(out / "accuracy.parquet").to_dict(orient="records")
    return {r["set"]: r for r in rows}


# ----------------------------------------------------------------------------------------------------------------
# scores against hand computations


def test_rewardbench_section_weighted_score_matches_a_hand_computation(tmp_path, monkeypatch):
    out = run_eval(tmp_path, monkeypatch, LengthScorer(), rewardbench_path=write_rewardbench(tmp_path / "rb.parquet"))
    rows = accuracy_rows(out)
    expected = {"rewardbench": RB_OVERALL, "rewardbench_chat": CHAT, "rewardbench_chat_hard": CHAT_HARD,
                "rewardbench_safety": SAFETY, "rewardbench_reasoning": REASONING}
    for name, value in expected.items():
        assert rows[name]["accuracy"] == pytest.approx(value, abs=1e-12), name
        assert rows[name]["proxy"] == "rm" and rows[name]["labels"] == "clean"
    assert rows["rewardbench_chat"]["pairs"] == 4 and rows["rewardbench_chat"]["ties"] == 1
    assert rows["rewardbench"]["pairs"] == len(RB_PAIRS) - 1  # the pair outside every section is not in the score
    assert rows["id_test"]["accuracy"] == 1.0  # the existing sets are still there

    table = pd.read_parquet(out / "rewardbench_scores.parquet")
    subsets = table[table.level == "subset"].set_index("name")
    assert subsets.score.to_dict() == {"alpacaeval-easy": 1.0, "mt-bench-med": 0.5, "llmbar-natural": 0.0,
                                       "mt-bench-hard": 1.0, "donotanswer": 0.5, "math-prm": 1.0, "hep-python": 0.0,
                                       "hep-go": 1.0, "anthropic_helpful": 1.0}
    assert subsets.loc["math-prm", "weight"] == 984 and subsets.loc["hep-go", "section"] == "Reasoning"
    assert pd.isna(subsets.loc["anthropic_helpful", "section"])
    assert table[table.level == "overall"].score.item() == pytest.approx(RB_OVERALL, abs=1e-12)


def test_rewardbench2_best_of_4_and_ties_match_a_hand_computation(tmp_path, monkeypatch):
    out = run_eval(tmp_path, monkeypatch, LengthScorer(), rewardbench2_path=write_rewardbench2(tmp_path / "rb2.jsonl"))
    rows = accuracy_rows(out)
    ties = ties_by_hand()
    assert rows["rewardbench2_factuality"]["accuracy"] == pytest.approx(0.75, abs=1e-12)
    assert rows["rewardbench2_factuality"]["ties"] == 1
    assert rows["rewardbench2_math"]["accuracy"] == 0.0
    assert rows["rewardbench2_ties"]["accuracy"] == pytest.approx(ties, abs=1e-12)
    assert rows["rewardbench2"]["accuracy"] == pytest.approx((0.75 + 0.0 + ties) / 3, abs=1e-12)
    assert rows["rewardbench2"]["pairs"] == len(RB2_ROWS)

    table = pd.read_parquet(out / "rewardbench_scores.parquet")
    parts = table[table.level == "ties_component"].set_index("name").score
    assert parts.to_dict() == pytest.approx({"tied_accuracy": 1.0, "ref_accuracy": 0.5, "correctness_preferred": 0.5,
                                             "correctness_preferred_hard": 0.5, "correctness_margin_score":
                                             (math.tanh(2) + math.tanh(-4 / 3)) / 2}, abs=1e-12)


def test_rewardbench2_zero_spread_and_unscored_examples():
    """x/0 in the Ties margin term is tanh(±inf) = ±1 (0/0 is 0), as numpy gives upstream; an example with an
    unscored answer is left out of its subset and counted."""
    frame = pd.DataFrame({"subset": ["Ties"] * 4 + ["Focus"] * 2, "chosen": [["x"], ["x", "y"]] * 2 + [["x"]] * 2,
                          "kind": ["ref", "tied"] * 2 + [""] * 2, "group": ["1", "1", "2", "2", "", ""]})
    scores = [np.array([5.0, 1.0]), np.array([4.0, 4.0, 2.0]),   # spread 0, margin min(4, 2) = 2 > 0: tanh(+inf)
              np.array([1.0, 3.0]), np.array([3.0, 3.0, 3.0]),   # spread 0, margin min(-2, 0) < 0: tanh(-inf)
              np.array([2.0, 1.0]), np.array([np.nan, 1.0])]
    acc, table = eval_proxy.rewardbench2_tables(frame, scores)
    rows = {r["set"]: r for r in acc}
    parts = {r["name"]: r["score"] for r in table if r["level"] == "ties_component"}
    assert parts["correctness_margin_score"] == pytest.approx((1.0 - 1.0) / 2)
    assert parts["correctness_preferred"] == 0.5 and parts["correctness_preferred_hard"] == 0.5
    assert rows["rewardbench2_focus"] == {"set": "rewardbench2_focus", "labels": "clean", "pairs": 1, "unscored": 1,
                                          "accuracy": 1.0, "ties": 0}
    assert rows["rewardbench2_ties"]["ties"] == 1  # tied:2's worst correct equals its best incorrect


# ----------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("key, writer, name, column", [
    ("rewardbench_path", write_rewardbench, "rb.parquet", "subset"),
    ("rewardbench_path", write_rewardbench, "rb.parquet", "rejected"),
    ("rewardbench2_path", write_rewardbench2, "rb2.jsonl", "chosen"),
    ("rewardbench2_path", write_rewardbench2, "rb2.jsonl", "id"),
])
def test_a_missing_column_names_file_and_column_before_scoring(tmp_path, monkeypatch, key, writer, name, column):
    path = writer(tmp_path / name, drop=column)
    monkeypatch.setattr(eval_proxy, "build_scorer", lambda *a_, **k: pytest.fail("scorer built before the check"))
    with pytest.raises(ValueError, match=rf"{name}.*missing required column\(s\) \['{column}'\]"):
        run_eval(tmp_path, **{key: path})


def test_a_file_of_the_other_benchmark_is_refused_naming_the_column(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_proxy, "build_scorer", lambda *a_, **k: pytest.fail("scorer built before the check"))
    with pytest.raises(ValueError, match=r"rb\.parquet: row 0 \(id 100\): column 'chosen' must be a non-empty list"):
        run_eval(tmp_path, rewardbench2_path=write_rewardbench(tmp_path / "rb.parquet"))
    with pytest.raises(ValueError, match=r"rb2\.jsonl: row 0 \(id 0\): column 'chosen' must be a string"):
        run_eval(tmp_path, rewardbench_path=write_rewardbench2(tmp_path / "rb2.jsonl"))


def test_bad_ties_ids_and_several_chosen_outside_ties_are_refused(tmp_path):
    from pipeline.hf_data import load_rewardbench2

    with pytest.raises(ValueError, match=r"row 0 \(id 7\): a Ties id must be 'ref:<n>' or 'tied:<n>'"):
        load_rewardbench2(write_rewardbench2(tmp_path / "a.jsonl", [("7", "Ties", [3], [1])]))
    with pytest.raises(ValueError, match=r"row 0 \(id 3\): column 'chosen' must hold exactly one answer"):
        load_rewardbench2(write_rewardbench2(tmp_path / "b.jsonl", [("3", "Math", [3, 4], [1])]))
    with pytest.raises(ValueError, match=r"a 'tied' example needs two or more chosen answers"):
        load_rewardbench2(write_rewardbench2(tmp_path / "c.jsonl", [("tied:1", "Ties", [3], [1])]))


# ----------------------------------------------------------------------------------------------------------------
# config, fingerprints, missing files


def test_unset_paths_leave_fingerprints_and_set_paths_enter_them(tmp_path):
    assert "rewardbench_path" not in fingerprint_view(EvalProxyConfig())
    assert "rewardbench2_path" not in fingerprint_view(EvalProxyConfig())

    def fingerprints(*overrides):
        cfg = load_config(SMOKE, [f"run.cache_root={tmp_path / 'cache'}", *overrides])
        return Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root)).fingerprints()

    base = fingerprints()
    rb = write_rewardbench(tmp_path / "rb.parquet")
    with_rb = fingerprints(f"eval_proxy.rewardbench_path={rb}")
    changed = {k for k in base if base[k] != with_rb[k]}
    assert changed == {"eval_proxy[bt]", "eval_proxy[grm_sft]", "report"}
    write_rewardbench(rb, RB_PAIRS[:3])  # the file's signature is in the fingerprint, not only its path
    assert fingerprints(f"eval_proxy.rewardbench_path={rb}")["eval_proxy[bt]"] != with_rb["eval_proxy[bt]"]


def test_a_missing_benchmark_file_is_reported_naming_its_key(tmp_path):
    cfg = load_config(SMOKE, [f"eval_proxy.rewardbench_path={tmp_path / 'none.parquet'}",
                              f"eval_proxy.rewardbench2_path={tmp_path / 'none2.jsonl'}"])
    with pytest.raises(ConfigError) as err:
        check_local_paths(cfg)
    assert f"eval_proxy.rewardbench_path: {tmp_path / 'none.parquet'}" in str(err.value)
    assert f"eval_proxy.rewardbench2_path: {tmp_path / 'none2.jsonl'}" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# a real (tiny) reward model


def test_eval_proxy_with_a_tiny_reward_model_writes_the_rows(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.scoring import load_reward_scorer
    from pipeline.world import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    rm = tmp_path / "rm"
    model.save_pretrained(rm, safe_serialization=True)
    tok.save_pretrained(rm)

    words = "apple pear plum kiwi cat dog horse red blue".split()
    text = lambda n, k=0: " ".join(words[(k + j) % len(words)] for j in range(n))  # noqa: E731
    rb = tmp_path / "rb.parquet"
    pq.write_table(pa.Table.from_pylist(
        [{"prompt": "list 3 fruits", "chosen": text(3, i), "rejected": text(2 + i % 3, i + 1), "subset": s, "id": i}
         for i, s in enumerate(["alpacaeval-easy", "alpacaeval-easy", "llmbar-natural", "donotanswer", "math-prm",
                                "hep-cpp"])]
        + [{"prompt": "list 3 fruits", "chosen": text(200), "rejected": "kiwi", "subset": "hep-cpp", "id": 99}]), rb)
    rb2 = tmp_path / "rb2.jsonl"
    rb2.write_text("".join(json.dumps({"id": str(i), "prompt": "name 2 colors", "chosen": [text(2, i)],
                                       "rejected": [text(1, i + 1), text(3, i + 2), text(2, i + 3)],
                                       "subset": s}) + "\n" for i, s in enumerate(["Focus", "Focus", "Math"])))
    proxy = ProxyConfig(name="rm", type="checkpoint", path=str(rm))
    out = run_eval(tmp_path, proxy=proxy, rewardbench_path=rb, rewardbench2_path=rb2)
    rows = accuracy_rows(out)
    assert {"rewardbench", "rewardbench_chat", "rewardbench_chat_hard", "rewardbench_safety", "rewardbench_reasoning",
            "rewardbench2", "rewardbench2_focus", "rewardbench2_math", "id_test"} <= set(rows)
    assert rows["rewardbench"]["unscored"] == 1 and rows["rewardbench_reasoning"]["unscored"] == 1  # over 64 tokens

    # the subset accuracies are the scorer's own strict comparisons
    scorer = load_reward_scorer(rm, max_length=64)
    frame = pq.read_table(rb).to_pandas()
    r_c, r_r = scorer.score(list(frame.prompt), list(frame.chosen)), scorer.score(list(frame.prompt),
                                                                                   list(frame.rejected))
    assert np.ptp(r_c[:-1]) > 1e-3 and np.isnan(r_c[-1])
    table = pd.read_parquet(out / "rewardbench_scores.parquet")
    subsets = table[(table.benchmark == "rewardbench") & (table.level == "subset")].set_index("name")
    for subset, group in frame.iloc[:-1].groupby("subset"):
        assert subsets.loc[subset, "score"] == np.mean(r_c[group.index] > r_r[group.index]), subset
    assert subsets.loc["hep-cpp", "unscored"] == 1 and subsets.loc["hep-cpp", "examples"] == 1
