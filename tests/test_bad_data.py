"""Bad data and bad scores are stopped in the stage that meets them, with the file / scorer / key named, and nothing
is written: empty dataset files, rows with an empty prompt or response, files with no usable pair, and reward models
that return NaN or inf (the one rule of `pipeline.scoring.check_finite`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import stages.bon_score as bon_score
import stages.eval_proxy as eval_proxy
import stages.gold_label as gold_label
import stages.gold_score as gold_score
from pipeline.config import (
    EvalProxyConfig,
    EvalProxyStageConfig,
    GoldConfig,
    GoldLabelStageConfig,
    GoldScoreStageConfig,
    ProxyConfig,
    ScorerStageConfig,
)
from pipeline.hf_data import load_unified_feedback
from pipeline.records import CANDIDATE_COLUMNS, PAIR_COLUMNS, SAMPLE_COLUMNS, write_records
from pipeline.scoring import NonFiniteScoreError, check_finite

MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
UF_SCHEMA = pa.schema([("id", pa.string()), ("conv_A", MSG), ("conv_B", MSG), ("conv_A_rating", pa.float32()),
                       ("conv_B_rating", pa.float32()), ("num_turns", pa.int32()), ("source", pa.string())])


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def uf_row(i, prompt="list 2 fruits", a="apple pear", b="kiwi"):
    user = {"role": "user", "content": prompt}
    return {"id": f"uf{i}", "conv_A": [user, {"role": "assistant", "content": a}],
            "conv_B": [user, {"role": "assistant", "content": b}], "conv_A_rating": 1.0, "conv_B_rating": 2.0,
            "num_turns": 1, "source": "test"}


def write_uf(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=UF_SCHEMA), path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# dataset files


@pytest.mark.parametrize("kind", ["no_rows_parquet", "zero_byte_parquet", "zero_byte_jsonl", "json_empty_array"])
def test_an_empty_unified_feedback_file_is_a_clear_error_naming_it(tmp_path, kind):
    if kind == "no_rows_parquet":
        f = write_uf(tmp_path / "uf.parquet", [])
    elif kind == "json_empty_array":
        f = tmp_path / "uf.json"
        f.write_text("[]")
    else:
        f = tmp_path / ("uf.parquet" if kind == "zero_byte_parquet" else "uf.jsonl")
        f.write_bytes(b"")
    with pytest.raises(ValueError, match="empty|no rows|could not be read") as err:
        load_unified_feedback(f)
    assert str(f) in str(err.value) and type(err.value) is ValueError  # not datasets' DatasetGenerationError


def test_rows_with_an_empty_prompt_or_response_are_dropped_and_counted(tmp_path, caplog):
    rows = [uf_row(i) for i in range(10)]
    rows[1] = uf_row(1, prompt="")
    rows[2] = uf_row(2, prompt="   ")
    rows[3] = uf_row(3, a="")
    rows[4] = uf_row(4, b=" \n")
    f = write_uf(tmp_path / "uf.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="overopt"):
        df = load_unified_feedback(f)
    assert sorted(df.pair_id) == sorted(f"uf{i}" for i in (0, 5, 6, 7, 8, 9))
    log = caplog.text
    assert str(f) in log and "dropped 2 row(s): empty prompt" in log and "dropped 2 row(s): empty response" in log


def test_a_file_with_no_usable_pair_is_an_error_naming_it(tmp_path):
    f = write_uf(tmp_path / "uf.parquet", [uf_row(i, prompt="") for i in range(5)])
    with pytest.raises(ValueError, match=r"no usable pair among its 5 row\(s\) \(5 empty prompt") as err:
        load_unified_feedback(f)
    assert str(f) in str(err.value)


def _tiny_gold(path: Path, nan: bool = False) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from pipeline.world import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id))
    if nan:
        with torch.no_grad():
            model.score.weight.fill_(float("nan"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def golds(tmp_path_factory):
    root = tmp_path_factory.mktemp("golds")
    return {"ok": _tiny_gold(root / "ok"), "nan": _tiny_gold(root / "nan", nan=True)}


def _run_gold_score(tmp_path, data: Path, gold_dir: Path, max_length=64) -> Path:
    cfg = GoldScoreStageConfig(source="unified_feedback", dataset_path=str(data), n_pairs=30,
                               gold=GoldConfig(type="hf", model_id=str(gold_dir), batch_size=4, max_length=max_length))
    out = tmp_path / "scores"
    out.mkdir()
    gold_score.run(cfg, {}, out)
    return out


def test_gold_score_with_only_gold_ties_is_an_error_naming_the_file(tmp_path, golds):
    data = write_uf(tmp_path / "uf.parquet", [uf_row(i, a="apple", b="apple") for i in range(6)])
    with pytest.raises(ValueError, match=r"no usable pair in .*uf\.parquet: of 6 candidate pair\(s\), 0 are over "
                                         r"gold\.max_length=64 tokens and 6 are gold ties"):
        _run_gold_score(tmp_path, data, golds["ok"])
    assert not any((tmp_path / "scores").iterdir())


def test_gold_label_never_commits_zero_pairs(tmp_path):
    cands = pd.DataFrame([{"pair_id": f"p{i}", "prompt_id": "q", "prompt": [{"role": "user", "content": "x"}],
                           "response_a": "a", "response_b": "b", "gold_a": 1.0, "gold_b": 1.0 if i else np.nan}
                          for i in range(4)])
    scores = tmp_path / "scores"
    scores.mkdir()
    write_records(cands, scores / "candidates.parquet", CANDIDATE_COLUMNS)
    out = tmp_path / "out"
    out.mkdir()
    cfg = GoldLabelStageConfig(n_pairs=10, test_fraction=0.2, noise_rate=0.0, noise_seed=0, seed=0)
    with pytest.raises(ValueError, match=r"no usable pair in .*candidates\.parquet: of 4 candidate pair\(s\), 1 are "
                                         r"over gold\.max_length and 3 are gold ties"):
        gold_label.run(cfg, {"scores": scores}, out)
    assert not any(out.iterdir())


# ----------------------------------------------------------------------------------------------------------------
# non-finite scores


def test_a_gold_that_returns_nan_fails_in_gold_score_naming_the_pair(tmp_path, golds):
    data = write_uf(tmp_path / "uf.parquet", [uf_row(i) for i in range(8)])
    with pytest.raises(NonFiniteScoreError, match=r"scorer 'gold' returned a non-finite score \(nan\) for "
                                                  r"pair_id='uf\d' \(response_a\); 8 of 8"):
        _run_gold_score(tmp_path, data, golds["nan"])
    assert not any((tmp_path / "scores").iterdir())  # nothing written, so nothing can be committed


def test_over_length_nan_is_not_an_error_but_a_model_nan_is(tmp_path, golds):
    rows = [uf_row(i) for i in range(6)]
    rows[0] = uf_row(0, a=" ".join(["apple"] * 80))  # over gold.max_length=64
    data = write_uf(tmp_path / "uf.parquet", rows)
    out = _run_gold_score(tmp_path, data, golds["ok"])
    cands = pd.read_parquet(out / "candidates.parquet")
    assert cands.gold_a.isna().sum() == 1 and np.isfinite(cands.gold_b).all()
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    gold_label.run(GoldLabelStageConfig(n_pairs=10, test_fraction=0.3, noise_rate=0.0, noise_seed=0, seed=0),
                   {"scores": out}, labelled)
    metrics = json.loads((labelled / "metrics.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}: not strict JSON"))
    assert metrics["over_length_dropped"] == 1
    # the same data through a NaN gold: the over-length pair is skipped, the next one is named
    (tmp_path / "scores").rename(tmp_path / "scores_ok")
    with pytest.raises(NonFiniteScoreError, match=r"pair_id='uf[1-5]'.*5 of 6 scores"):
        _run_gold_score(tmp_path, data, golds["nan"])


def test_gold_label_refuses_an_infinite_gold_score(tmp_path):
    cands = pd.DataFrame([{"pair_id": f"p{i}", "prompt_id": "q", "prompt": [{"role": "user", "content": "x"}],
                           "response_a": "a", "response_b": "b", "gold_a": float(i),
                           "gold_b": np.inf if i == 2 else -1.0}
                          for i in range(4)])
    with pytest.raises(NonFiniteScoreError, match=r"pair_id='p2' \(gold_b\)"):
        gold_label.label_pairs(cands)


class FixedScorer:
    """A scorer that returns fixed values (one per call, in order)."""

    def __init__(self, *values):
        self.values = list(values)

    def score(self, prompts, responses):
        v = np.asarray(self.values.pop(0), dtype=np.float64)
        assert len(v) == len(responses)
        return v


def test_bon_score_refuses_an_infinite_proxy_score_naming_prompt_and_sample(tmp_path, monkeypatch):
    samples = tmp_path / "samples"
    (samples / "shards").mkdir(parents=True)
    frame = pd.DataFrame([{"prompt_id": f"q{p}", "sample_idx": s, "prompt": [{"role": "user", "content": "x"}],
                           "response": "y", "n_tokens": 1, "finished": True} for p in range(2) for s in range(3)])
    write_records(frame, samples / "shards" / "shard_00000.parquet", SAMPLE_COLUMNS)
    monkeypatch.setattr(bon_score, "build_scorer", lambda *a, **k: FixedScorer([0, 1, 2, 3, np.inf, 5]))
    out = tmp_path / "out"
    out.mkdir()
    cfg = ScorerStageConfig(name="bt", proxy=ProxyConfig(name="bt", type="bt"))
    with pytest.raises(NonFiniteScoreError, match=r"scorer 'bt' returned a non-finite score \(inf\) for "
                                                  r"prompt_id='q1', sample_idx=1; 1 of 6"):
        bon_score.run(cfg, {"samples": samples, "model": tmp_path}, out)
    assert not any(out.iterdir())


def _test_pairs(directory: Path, n: int) -> pd.DataFrame:
    """`n` gold-labelled test pairs p0, p1, ... written as directory/pairs.parquet, as gold_label writes them."""
    pairs = pd.DataFrame([{"pair_id": f"p{i}", "prompt_id": "q", "prompt": [{"role": "user", "content": "x"}],
                           "chosen": "a", "rejected": "b", "gold_chosen": 1.0, "gold_rejected": 0.0,
                           "label_clean": 1, "label_noisy": 1, "split": "test"} for i in range(n)])
    directory.mkdir()
    write_records(pairs, directory / "pairs.parquet", PAIR_COLUMNS)
    return pairs


def test_eval_proxy_refuses_a_nan_proxy_score_naming_the_pair(tmp_path, monkeypatch):
    _test_pairs(tmp_path / "pairs", 3)
    monkeypatch.setattr(eval_proxy, "build_scorer", lambda *a, **k: FixedScorer([1, 2, 3], [0, np.nan, 0]))
    out = tmp_path / "out"
    out.mkdir()
    cfg = EvalProxyStageConfig(eval=EvalProxyConfig(), scorer=ScorerStageConfig(
        name="bt", proxy=ProxyConfig(name="bt", type="bt")))
    with pytest.raises(NonFiniteScoreError, match=r"'bt'.*pair_id='p1' \(id_test, rejected\)"):
        eval_proxy.run(cfg, {"pairs": tmp_path / "pairs"}, out)
    assert not any(out.iterdir())


def test_eval_proxy_skips_an_empty_set_instead_of_writing_nan(tmp_path, monkeypatch):
    pairs = _test_pairs(tmp_path / "pairs", 2)
    write_records(pairs.iloc[:0], tmp_path / "pairs" / "ood_pairs.parquet", PAIR_COLUMNS)  # an empty OOD set
    monkeypatch.setattr(eval_proxy, "build_scorer", lambda *a, **k: FixedScorer([1, 2], [0, 3]))
    out = tmp_path / "out"
    out.mkdir()
    cfg = EvalProxyStageConfig(eval=EvalProxyConfig(), scorer=ScorerStageConfig(
        name="bt", proxy=ProxyConfig(name="bt", type="bt")))
    eval_proxy.run(cfg, {"pairs": tmp_path / "pairs"}, out)
    rows = json.loads((out / "accuracy.json").read_text())  # strict JSON: no bare NaN
    assert [(r["set"], r["accuracy"]) for r in rows] == [("id_test", 0.5)]


def test_check_finite_allows_only_over_length_nan():
    check_finite([1.0, np.nan], "s", ["a", "b"], over_length=lambda i: i == 1)
    with pytest.raises(NonFiniteScoreError, match="pair_id='b'"):
        check_finite([1.0, np.nan], "s", ["a", "b"], over_length=lambda i: False)
    with pytest.raises(NonFiniteScoreError, match="-inf"):
        check_finite([-np.inf, 1.0], "s", ["a", "b"], over_length=lambda i: True)
