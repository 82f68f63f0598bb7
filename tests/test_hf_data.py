"""Loaders for the paper-scale datasets, on tiny local files written in the real Hugging Face schemas."""

from __future__ import annotations

import json
import logging

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import hf_data
from pipeline.hf_data import load_hhh_alignment, load_mt_bench_human, load_unified_feedback, pair_prompts, prompt_id_of


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Arrow caches of the tiny files go to tmp_path, not the user's cache (read by datasets at call time)."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _msg(role, content):
    return {"role": role, "content": content}


# ----------------------------------------------------------------------------------------------------------------
# Unified-Feedback: id, conv_A, conv_B, conv_A_rating, conv_B_rating, num_turns, source


def uf_rows(n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = [_msg("user", f"question {i}")]
        rows.append({"id": f"uf_{i}", "conv_A": prompt + [_msg("assistant", f"answer A{i}")],
                     "conv_B": prompt + [_msg("assistant", f"answer B{i}")],
                     "conv_A_rating": float(i % 3), "conv_B_rating": 1.0, "num_turns": 1, "source": "src/x"})
    # multi-turn: the prompt is every turn before the last assistant turn, shared by A and B
    if n <= 8:
        return rows
    ctx = [_msg("user", "hi"), _msg("assistant", "hello"), _msg("user", "and now?")]
    rows[3]["conv_A"] = ctx + [_msg("assistant", "now A")]
    rows[3]["conv_B"] = ctx + [_msg("assistant", "now B")]
    rows[3]["num_turns"] = 2
    # A and B disagree before the final turn: dropped
    rows[5]["conv_B"] = [_msg("user", "a different question"), _msg("assistant", "answer B5")]
    # ids repeat within a split in the real data (UltraFeedback gives two pairs per id)
    rows[8]["id"] = rows[7]["id"]
    return rows


UF_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("conv_A", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("conv_B", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("conv_A_rating", pa.float32()), ("conv_B_rating", pa.float32()),
    ("num_turns", pa.int32()), ("source", pa.string()),
])


def write_parquet(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unified_feedback_parquet(tmp_path, caplog):
    f = write_parquet(tmp_path / "uf.parquet", uf_rows(), UF_SCHEMA)
    with caplog.at_level(logging.WARNING, logger="overopt"):
        df = load_unified_feedback(f)
    assert list(df.columns) == hf_data.UNIFIED_FEEDBACK_COLUMNS
    assert len(df) == 11  # row 5 dropped
    assert "uf_5" not in set(df.pair_id)
    assert any("differ before the final assistant turn" in r.message and "1 row" in r.message for r in caplog.records)
    by_id = df.set_index("pair_id")
    r0 = by_id.loc["uf_0"]
    assert r0.prompt == [{"role": "user", "content": "question 0"}]
    assert (r0.response_a, r0.response_b) == ("answer A0", "answer B0")
    assert (r0.rating_a, r0.rating_b, r0.source) == (0.0, 1.0, "src/x")
    assert r0.prompt_id == prompt_id_of(r0.prompt)
    r3 = by_id.loc["uf_3"]
    assert [m["role"] for m in r3.prompt] == ["user", "assistant", "user"]
    assert r3.prompt[-1]["content"] == "and now?" and r3.response_a == "now A"
    # repeated ids get the row index, so pair_id stays unique and stable
    assert {"uf_7#7", "uf_7#8"} <= set(df.pair_id) and df.pair_id.is_unique
    assert set(df.row_index) == set(range(12)) - {5}


def test_unified_feedback_shuffle_is_seeded_and_matches_datasets_shuffle(tmp_path):
    from datasets import Dataset

    rows = uf_rows(40)
    f = write_parquet(tmp_path / "uf.parquet", rows, UF_SCHEMA)
    a = load_unified_feedback(f, shuffle_seed=42)
    b = load_unified_feedback(f, shuffle_seed=42)
    c = load_unified_feedback(f, shuffle_seed=7)
    assert list(a.row_index) == list(b.row_index)
    assert list(a.row_index) != list(c.row_index)
    assert list(a.row_index) != sorted(a.row_index)
    # the same order as `Dataset.shuffle(seed=42)` (what the paper's scripts use), minus the dropped row
    expected = [r["num"] for r in Dataset.from_list([{"num": i} for i in range(40)]).shuffle(seed=42) if r["num"] != 5]
    assert list(a.row_index) == expected


def test_unified_feedback_n_pairs_is_a_prefix_of_the_shuffled_order(tmp_path):
    f = write_parquet(tmp_path / "uf.parquet", uf_rows(), UF_SCHEMA)
    full = load_unified_feedback(f)
    for n in (1, 4, 11):
        part = load_unified_feedback(f, n_pairs=n)
        assert len(part) == n  # counts usable pairs: a dropped row does not shorten the result
        assert list(part.pair_id) == list(full.pair_id[:n])
    with pytest.raises(ValueError, match="n_pairs"):
        load_unified_feedback(f, n_pairs=0)


def test_unified_feedback_jsonl_equals_parquet(tmp_path):
    rows = uf_rows()
    from_parquet = load_unified_feedback(write_parquet(tmp_path / "uf.parquet", rows, UF_SCHEMA))
    from_jsonl = load_unified_feedback(write_jsonl(tmp_path / "uf.jsonl", rows))
    pd.testing.assert_frame_equal(from_parquet, from_jsonl)


def test_unified_feedback_directory_picks_config_and_split(tmp_path):
    root = tmp_path / "Unified-Feedback"
    write_parquet(root / "all" / "train-00000-of-00001.parquet", uf_rows(6), UF_SCHEMA)
    val = uf_rows(3)
    for r in val:
        r["id"] = "val_" + r["id"]
    write_parquet(root / "all" / "val-00000-of-00001.parquet", val, UF_SCHEMA)
    other = uf_rows(2)
    for r in other:
        r["id"] = "hh_" + r["id"]
    write_parquet(root / "hh-rlhf" / "train-00000-of-00001.parquet", other, UF_SCHEMA)
    train = load_unified_feedback(root, "all", "train")
    assert len(train) == 6 and all(p.startswith("uf_") for p in train.pair_id)
    assert all(p.startswith("val_") for p in load_unified_feedback(root, "all", "val").pair_id)
    assert all(p.startswith("hh_") for p in load_unified_feedback(root, "hh-rlhf", "train").pair_id)
    with pytest.raises(FileNotFoundError, match=r"no data files for split 'test'"):
        load_unified_feedback(root, "all", "test")


def test_unified_feedback_without_id_uses_row_index(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "id"} for r in uf_rows(4)]
    df = load_unified_feedback(write_jsonl(tmp_path / "uf.jsonl", rows))
    assert sorted(df.pair_id) == ["0", "1", "2", "3"]


def test_missing_column_names_file_and_column_before_loading(tmp_path, monkeypatch):
    rows = [{k: v for k, v in r.items() if k != "conv_B_rating"} for r in uf_rows(3)]
    pq_file = write_parquet(tmp_path / "bad.parquet", rows)
    jl_file = write_jsonl(tmp_path / "bad.jsonl", rows)
    import datasets

    def no_load(*a, **k):
        raise AssertionError("load_dataset called before the column check")

    monkeypatch.setattr(datasets, "load_dataset", no_load)
    for f in (pq_file, jl_file):
        with pytest.raises(ValueError, match="conv_B_rating") as e:
            load_unified_feedback(f)
        assert str(f) in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    for path in (tmp_path / "nope.parquet", tmp_path / "no_such_dir", "./relative/missing.jsonl"):
        with pytest.raises(FileNotFoundError, match="not found"):
            load_unified_feedback(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet/json/jsonl"):
        load_unified_feedback(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_mt_bench_human(tmp_path / "mt.parquet")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_hhh_alignment(tmp_path / "hhh")


def test_hub_id_that_cannot_be_reached_fails_once_with_a_clear_error(monkeypatch):
    import datasets

    calls = []

    def unreachable(*a, **k):
        calls.append(a)
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset_builder", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ConnectionError, match="not a local file or directory"):
        load_unified_feedback("owner/name")
    assert len(calls) == 1  # the column peek failed; no second round of network retries


def test_prompt_id_is_stable_and_content_based():
    p = [{"role": "user", "content": "x"}]
    assert prompt_id_of(p) == prompt_id_of([{"content": "x", "role": "user"}])
    assert prompt_id_of(p) != prompt_id_of([{"role": "user", "content": "y"}])
    assert prompt_id_of(p) == "p" + __import__("hashlib").sha256(b'[["user","x"]]').hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# HHH-Alignment: input, targets {choices, labels}; one file per subset


HHH_SCHEMA = pa.schema([("input", pa.string()),
                        ("targets", pa.struct([("choices", pa.list_(pa.string())),
                                               ("labels", pa.list_(pa.int32()))]))])


def hhh_rows(subset: str) -> list[dict]:
    return [
        {"input": f"{subset} question?", "targets": {"choices": [f"{subset} bad", f"{subset} good"], "labels": [0, 1]}},
        {"input": f"Human: tell me about {subset}\n\nAssistant: sure, what part?\n\nHuman: the best part",
         "targets": {"choices": ["good answer", "meh", "worse"], "labels": [1, 0, 0]}},
        {"input": "no single best", "targets": {"choices": ["a", "b"], "labels": [1, 1]}},  # dropped
    ]


def test_hhh_directory_with_one_file_per_subset(tmp_path, caplog):
    root = tmp_path / "hhh"
    write_parquet(root / "harmless.parquet", hhh_rows("harmless"), HHH_SCHEMA)
    write_jsonl(root / "helpful.jsonl", hhh_rows("helpful"))
    write_parquet(root / "honest" / "test-00000-of-00001.parquet", hhh_rows("honest"), HHH_SCHEMA)
    write_parquet(root / "other.parquet", hhh_rows("other"), HHH_SCHEMA)
    with caplog.at_level(logging.WARNING, logger="overopt"):
        df = load_hhh_alignment(root)
    assert list(df.columns) == hf_data.HHH_COLUMNS
    assert df.groupby("subset").size().to_dict() == {s: 3 for s in hf_data.HHH_SUBSETS}
    assert df.pair_id.is_unique
    assert any("exactly one choice best" in r.message for r in caplog.records)
    first = df[(df.subset == "helpful") & (df.pair_id == "hhh-helpful-0-0")].iloc[0]
    assert first.prompt == [{"role": "user", "content": "helpful question?"}]
    assert (first.chosen, first.rejected) == ("helpful good", "helpful bad")
    multi = df[df.pair_id.str.startswith("hhh-honest-1-")]
    assert list(multi.rejected) == ["meh", "worse"] and set(multi.chosen) == {"good answer"}
    assert multi.iloc[0].prompt == [{"role": "user", "content": "tell me about honest"},
                                    {"role": "assistant", "content": "sure, what part?"},
                                    {"role": "user", "content": "the best part"}]
    assert multi.iloc[0].prompt_id == prompt_id_of(multi.iloc[0].prompt)


def test_hhh_missing_subset_or_column(tmp_path):
    root = tmp_path / "hhh"
    for s in ("harmless", "helpful", "honest"):
        write_parquet(root / f"{s}.parquet", hhh_rows(s), HHH_SCHEMA)
    with pytest.raises(FileNotFoundError, match="'other'"):
        load_hhh_alignment(root)
    assert set(load_hhh_alignment(root, subsets=("harmless", "honest")).subset) == {"harmless", "honest"}
    bad = write_jsonl(tmp_path / "bad" / "harmless.jsonl", [{"input": "q", "choices": ["a", "b"]}])
    with pytest.raises(ValueError, match="targets") as e:
        load_hhh_alignment(bad)
    assert "harmless.jsonl" in str(e.value)


def test_hhh_dialogue_input_becomes_messages():
    df_rows = hhh_rows("harmless")
    msgs = hf_data.hhh_input_messages(df_rows[1]["input"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert hf_data.hhh_input_messages("Human: only a question\n\nAssistant:") == [
        {"role": "user", "content": "only a question"}]


def test_hhh_single_file_takes_subset_from_name(tmp_path):
    f = write_parquet(tmp_path / "harmless.parquet", hhh_rows("harmless"), HHH_SCHEMA)
    df = load_hhh_alignment(f)
    assert set(df.subset) == {"harmless"} and len(df) == 3


# ----------------------------------------------------------------------------------------------------------------
# MT-Bench human judgments: question_id, model_a, model_b, winner, judge, conversation_a, conversation_b, turn


def mt_rows() -> list[dict]:
    def conv(model):
        return [_msg("user", "q1"), _msg("assistant", f"{model} turn1"),
                _msg("user", "q2"), _msg("assistant", f"{model} turn2")]

    base = {"question_id": 81, "model_a": "gpt-4", "model_b": "llama-13b", "judge": "expert_0",
            "conversation_a": conv("gpt-4"), "conversation_b": conv("llama-13b")}
    return [
        base | {"winner": "model_a", "turn": 1},
        base | {"winner": "model_b", "turn": 2},
        base | {"winner": "tie", "turn": 1},
        base | {"winner": "tie (bothbad)", "turn": 2, "judge": "author_1"},
        base | {"question_id": 82, "winner": "model_b", "turn": 1},
    ]


def test_mt_bench_ties_excluded_by_default(tmp_path, caplog):
    f = write_parquet(tmp_path / "human-00000-of-00001.parquet", mt_rows())
    with caplog.at_level(logging.WARNING, logger="overopt"):
        df = load_mt_bench_human(f)
    assert list(df.columns) == hf_data.MT_BENCH_COLUMNS
    assert len(df) == 3 and not df.tie.any() and set(df.subset) == {"mt_bench"}
    assert any("ties" in r.message and "2 row" in r.message for r in caplog.records)
    t1 = df.iloc[0]
    assert t1.turn == 1 and t1.prompt == [{"role": "user", "content": "q1"}]
    assert (t1.chosen, t1.rejected, t1.model_chosen, t1.model_rejected) == ("gpt-4 turn1", "llama-13b turn1",
                                                                           "gpt-4", "llama-13b")
    assert t1.prompt_rejected == t1.prompt
    # turn 2: each response continues its own model's turn-1 answer
    t2 = df.iloc[1]
    assert t2.turn == 2 and (t2.chosen, t2.rejected) == ("llama-13b turn2", "gpt-4 turn2")
    assert [m["content"] for m in t2.prompt] == ["q1", "llama-13b turn1", "q2"]
    assert [m["content"] for m in t2.prompt_rejected] == ["q1", "gpt-4 turn1", "q2"]
    chosen_prompts, rejected_prompts = pair_prompts(df)
    assert rejected_prompts[1][1]["content"] == "gpt-4 turn1" and chosen_prompts[1][1]["content"] == "llama-13b turn1"
    assert df.pair_id.is_unique
    only_first = load_mt_bench_human(f, turns=(1,))
    assert list(only_first.turn) == [1, 1]
    assert all(p == r for p, r in zip(only_first.prompt, only_first.prompt_rejected))


def test_mt_bench_keep_ties_and_directory_split(tmp_path):
    root = tmp_path / "mt_bench_human_judgments" / "data"
    write_jsonl(root / "human-00000-of-00001.jsonl", mt_rows())
    write_jsonl(root / "gpt4_pair-00000-of-00001.jsonl", mt_rows()[:1])
    df = load_mt_bench_human(root.parent, keep_ties=True)
    assert len(df) == 5 and df.tie.sum() == 2
    tie = df[df.tie].iloc[0]
    assert (tie.chosen, tie.rejected) == ("gpt-4 turn1", "llama-13b turn1")  # A/B order for ties
    assert len(load_mt_bench_human(root.parent, split="gpt4_pair")) == 1


def test_mt_bench_missing_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "winner"} for r in mt_rows()]
    f = write_parquet(tmp_path / "mt.parquet", rows)
    with pytest.raises(ValueError, match="winner") as e:
        load_mt_bench_human(f)
    assert "mt.parquet" in str(e.value)


def test_pair_prompts_without_prompt_rejected():
    df = pd.DataFrame({"prompt": [[{"role": "user", "content": "x"}]], "chosen": ["a"], "rejected": ["b"]})
    chosen, rejected = pair_prompts(df)
    assert chosen == rejected == [[{"role": "user", "content": "x"}]]
