"""Every configured local model directory is checked for its role before the first stage runs; a failure names the
config key and the path, in well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.preflight import ModelDirError, check_model_dir, preflight

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def _llama_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       **kw)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.reward_model import GRMRewardModel, RewardHeadConfig
    from pipeline.world import build_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer()
    torch.manual_seed(0)
    out = {}
    out["empty"] = root / "empty"
    out["empty"].mkdir()
    out["causal"] = root / "causal"
    LlamaForCausalLM(_llama_config(tok)).save_pretrained(out["causal"])
    tok.save_pretrained(out["causal"])
    out["seq_cls"] = root / "seq_cls"
    LlamaForSequenceClassification(_llama_config(tok, num_labels=1)).save_pretrained(out["seq_cls"])
    tok.save_pretrained(out["seq_cls"])
    out["two_labels"] = root / "two_labels"
    LlamaForSequenceClassification(_llama_config(tok, num_labels=2)).save_pretrained(out["two_labels"])
    tok.save_pretrained(out["two_labels"])
    out["grm"] = root / "grm"
    GRMRewardModel.from_base(out["causal"], RewardHeadConfig(type="linear")).save_pretrained(out["grm"], tokenizer=tok)
    out["no_template"] = root / "no_template"
    LlamaForSequenceClassification(_llama_config(tok, num_labels=1)).save_pretrained(out["no_template"])
    bare = build_tokenizer()
    bare.chat_template = None
    bare.save_pretrained(out["no_template"])
    for f in out["no_template"].glob("*.jinja"):
        f.unlink()
    out["no_tokenizer"] = root / "no_tokenizer"
    LlamaForSequenceClassification(_llama_config(tok, num_labels=1)).save_pretrained(out["no_tokenizer"])
    return out


@pytest.mark.parametrize("name, role", [("causal", "policy"), ("seq_cls", "reward"), ("grm", "reward"),
                                        ("grm", "policy")])
def test_good_directories_pass(dirs, name, role):
    check_model_dir(dirs[name], role)


@pytest.mark.parametrize("name, role, message", [
    ("empty", "reward", "no config.json"),
    ("causal", "reward", "a causal LM .*without a reward head"),
    ("two_labels", "reward", "has 2 outputs"),
    ("no_template", "reward", "no chat template"),
    ("no_tokenizer", "reward", "tokenizer does not load"),
    ("seq_cls", "policy", "must be a causal LM, but this is a sequence-classification model"),
])
def test_bad_directories_are_named_with_why(dirs, name, role, message):
    with pytest.raises(ModelDirError, match=message):
        check_model_dir(dirs[name], role)


def _study(tmp_path, overrides):
    return load_config(TINY, [f"run.cache_root={tmp_path / 'cache'}", *overrides])


def test_preflight_names_the_config_key_and_path(dirs, tmp_path):
    cfg = _study(tmp_path, [f"proxies=[{{name: bt, type: bt}}, {{name: rel, type: checkpoint, path: {dirs['empty']}}},"
                            f" {{name: lm, type: checkpoint, path: {dirs['causal']}}}]", "ppo.proxies=[bt]"])
    with pytest.raises(ConfigError) as err:
        preflight(cfg)
    msg = str(err.value)
    assert f"proxies.rel.path: {dirs['empty']}: no config.json" in msg
    assert f"proxies.lm.path: {dirs['causal']}: a causal LM" in msg


def test_a_causal_lm_as_gold_fails_before_any_stage(dirs, tmp_path, capsys):
    uf = tmp_path / "uf.parquet"
    uf.write_bytes(b"x")  # never read: the model check comes first
    args = ["run", str(TINY), f"run.cache_root={tmp_path / 'cache'}", "policy.source=hub",
            f"policy.model_id={dirs['causal']}", "gold.type=hf", f"gold.model_id={dirs['causal']}",
            "gold_label.source=unified_feedback", f"gold_label.dataset_path={uf}",
            "ood.enabled=false"]  # tiny.yaml's OOD prompts come from the world, which a hub policy has not
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"gold.model_id: {dirs['causal']}: a causal LM" in err and "policy.model_id" not in err
    assert not (tmp_path / "cache" / "runs").exists()  # no run started, no stage ran


def test_an_empty_checkpoint_dir_fails_before_world(dirs, tmp_path, capsys):
    args = ["run", str(TINY), f"run.cache_root={tmp_path / 'cache'}",
            f"proxies=[{{name: bt, type: bt}}, {{name: rel, type: checkpoint, path: {dirs['empty']}}}]",
            "ppo.proxies=[bt]"]
    assert main(args) == 2
    assert f"proxies.rel.path: {dirs['empty']}: no config.json" in capsys.readouterr().err
    assert not (tmp_path / "cache" / "world").exists()
