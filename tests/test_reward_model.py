"""GRMRewardModel on tiny Llama / Gemma / Qwen2 models built from configs (no hub)."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.losses import grm_loss, grm_regulariser, response_logprobs
from pipeline.reward_model import (
    HEAD_CONFIG_FILE,
    HEAD_FILE,
    GRMRewardModel,
    RewardHeadConfig,
    checkpoint_layout,
    is_grm_checkpoint,
)
from pipeline.scoring import ModelScorer
from pipeline.tokenization import collate, encode_conversation, pad_token_id
from pipeline.world import build_tokenizer

ARCHS = ["llama", "gemma", "qwen2"]
PAIRS = [("list 3 fruits", "apple pear plum"),
         ("name 1 animals", "cat"),
         ("please give 5 colors", "red blue green yellow pink"),
         ("write 2 tools", "hammer hammer")]
HEAD = RewardHeadConfig(type="mlp", width=16, dropout=0.1)



@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def tiny_config(arch: str, tok, **overrides):
    from transformers import GemmaConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)  # untied LM head
    if arch == "gemma":
        return GemmaConfig(head_dim=8, **common)  # tied LM head, embedding scaling
    return Qwen2Config(**common)


def build_base(arch: str, tok, directory, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(tiny_config(arch, tok, **overrides))
    lm.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tok):
    return {arch: build_base(arch, tok, tmp_path_factory.mktemp(f"base_{arch}")) for arch in ARCHS}


def new_model(path, head=HEAD, seed=0, **kw) -> GRMRewardModel:
    torch.manual_seed(seed)
    return GRMRewardModel.from_base(path, head=head, **kw)


def batch(tok, pairs=PAIRS, side="right"):
    enc = [encode_conversation(tok, p, r, max_length=64) for p, r in pairs]
    return collate(enc, pad_token_id(tok), side)


def all_eval(module) -> bool:
    return not any(m.training for m in module.modules())


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("arch", ARCHS)
def test_reward_read_at_last_real_token(arch, bases, tok):
    from transformers import AutoModelForCausalLM

    model = new_model(bases[arch])
    assert all_eval(model)
    right, left = batch(tok, side="right"), batch(tok, side="left")
    assert right["attention_mask"].sum(1).unique().numel() > 1  # really padded
    with torch.no_grad():
        r_right = model.rewards(right["input_ids"], right["attention_mask"])
        r_left = model.rewards(left["input_ids"], left["attention_mask"])
        singles = torch.cat([model.rewards(one["input_ids"], one["attention_mask"])
                             for one in (batch(tok, [pr]) for pr in PAIRS)])
        # by hand: the plain causal LM's final (post-norm) hidden state at the sequence's last token
        plain = AutoModelForCausalLM.from_pretrained(bases[arch]).eval()
        by_hand = []
        for p, r in PAIRS:
            ids = torch.tensor([encode_conversation(tok, p, r, 64).input_ids])
            h = plain.model(input_ids=ids).last_hidden_state[0, -1]
            by_hand.append(model.v_head(h))
    assert r_right.shape == (len(PAIRS),) and r_right.dtype == torch.float32
    assert torch.allclose(r_right, r_left, atol=1e-5)
    assert torch.allclose(r_right, singles, atol=1e-5)
    assert torch.allclose(r_right, torch.stack(by_hand), atol=1e-5)
    assert r_right.std() > 0  # different texts, different rewards


def test_padding_side_irrelevant_with_absolute_positions(tok, tmp_path):
    """GPT-2 has learned absolute positions: positions are counted over attended tokens, so left padding works."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path)
    model = new_model(tmp_path)
    right, left = batch(tok, side="right"), batch(tok, side="left")
    with torch.no_grad():
        r_right = model.rewards(right["input_ids"], right["attention_mask"])
        r_left = model.rewards(left["input_ids"], left["attention_mask"])
        out = model(left["input_ids"], left["attention_mask"])
    assert torch.allclose(r_right, r_left, atol=1e-5)
    assert torch.allclose(out.rewards, r_left, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_head_kept_and_logits_equal_plain_causal_lm(arch, bases, tok):
    from transformers import AutoModelForCausalLM

    model = new_model(bases[arch])
    plain = AutoModelForCausalLM.from_pretrained(bases[arch]).eval()
    assert model.backbone.get_output_embeddings() is not None
    b = batch(tok, side="right")
    with torch.no_grad():
        out = model(b["input_ids"], b["attention_mask"])
        ref = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        # the LM head reads the decoder's post-norm output: applying it by hand gives the same logits
        hidden = plain.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        by_hand = plain.get_output_embeddings()(hidden)
    real = b["attention_mask"].bool()
    assert out.logits.shape == (*b["input_ids"].shape, len(tok))
    assert torch.allclose(out.logits[real], ref[real], atol=1e-5)
    assert torch.allclose(ref, by_hand, atol=1e-5)
    # the logits pass and the rewards-only pass give the same rewards
    assert torch.allclose(out.rewards, model.rewards(b["input_ids"], b["attention_mask"]).detach(), atol=1e-6)
    rewards, logits, head = out  # tuple-like
    assert rewards is out.rewards and logits is out.logits and head == {}  # a plain head has no other outputs


def test_dropout_active_in_train_off_in_eval(bases, tok):
    model = new_model(bases["llama"], head=RewardHeadConfig("mlp", 16, dropout=0.5))
    b = batch(tok)
    model.train()
    with torch.no_grad():
        a = model.rewards(b["input_ids"], b["attention_mask"])
        c = model.rewards(b["input_ids"], b["attention_mask"])
    assert not torch.allclose(a, c)
    model.eval()
    with torch.no_grad():
        a = model.rewards(b["input_ids"], b["attention_mask"])
        c = model.rewards(b["input_ids"], b["attention_mask"])
    assert torch.equal(a, c)


def test_model_scorer_uses_rewards(bases, tok):
    model = new_model(bases["qwen2"])
    scorer = ModelScorer(model.rewards, model, tok, batch_size=3, max_length=64)
    scores = scorer.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    b = batch(tok)
    with torch.no_grad():
        direct = model.rewards(b["input_ids"], b["attention_mask"]).numpy()
    assert scores == pytest.approx(direct, abs=1e-5)


# ------------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, bases, tok, tmp_path):
    model = new_model(bases[arch], seed=1)
    b = batch(tok)
    with torch.no_grad():
        before = model.rewards(b["input_ids"], b["attention_mask"])
        logits_before = model(b["input_ids"], b["attention_mask"]).logits
    out = model.save_pretrained(tmp_path / "rm", tokenizer=tok)
    assert (out / HEAD_FILE).is_file() and (out / "model.safetensors").is_file()
    meta = json.loads((out / HEAD_CONFIG_FILE).read_text())
    assert meta["head"] == HEAD.to_dict() and meta["hidden_size"] == 32 and meta["format_version"] == 1
    assert sorted(load_file(out / HEAD_FILE)) == ["v_head.summary.0.bias", "v_head.summary.0.weight",
                                                  "v_head.summary.2.bias", "v_head.summary.2.weight"]
    assert is_grm_checkpoint(out) and checkpoint_layout(out) == "overopt"

    loaded = GRMRewardModel.from_pretrained(out)
    assert all_eval(loaded)
    assert loaded.head_config == HEAD
    with torch.no_grad():
        after = loaded.rewards(b["input_ids"], b["attention_mask"])
        logits_after = loaded(b["input_ids"], b["attention_mask"]).logits
    assert torch.equal(before, after)
    assert torch.equal(logits_before, logits_after)

    from transformers import AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.chat_template == tok.chat_template and len(tok2) == len(tok)


def test_linear_head_round_trip(bases, tok, tmp_path):
    head = RewardHeadConfig(type="linear", dropout=0.0)
    model = new_model(bases["gemma"], head=head)
    model.save_pretrained(tmp_path / "rm")
    assert sorted(load_file(tmp_path / "rm" / HEAD_FILE)) == ["v_head.summary.bias", "v_head.summary.weight"]
    loaded = GRMRewardModel.from_pretrained(tmp_path / "rm", head=RewardHeadConfig(type="linear"))
    b = batch(tok)
    with torch.no_grad():
        assert torch.equal(model.rewards(b["input_ids"], b["attention_mask"]),
                           loaded.rewards(b["input_ids"], b["attention_mask"]))


@pytest.fixture()
def saved_rm(bases, tmp_path):
    return new_model(bases["llama"]).save_pretrained(tmp_path / "rm")


def test_strict_load_missing_head_weight(saved_rm):
    state = load_file(saved_rm / HEAD_FILE)
    del state["v_head.summary.2.bias"]
    save_file(state, saved_rm / HEAD_FILE)
    with pytest.raises(ValueError, match=r"missing \['v_head.summary.2.bias'\]"):
        GRMRewardModel.from_pretrained(saved_rm)


def test_strict_load_unexpected_head_weight(saved_rm):
    state = load_file(saved_rm / HEAD_FILE)
    state["v_head.extra.weight"] = torch.zeros(2)
    save_file(state, saved_rm / HEAD_FILE)
    with pytest.raises(ValueError, match="v_head.extra.weight"):
        GRMRewardModel.from_pretrained(saved_rm)


def test_strict_load_missing_backbone_weight(saved_rm):
    state = load_file(saved_rm / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, saved_rm / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        GRMRewardModel.from_pretrained(saved_rm)


def test_head_type_mismatch_is_an_error(saved_rm):
    # caller expects another head
    with pytest.raises(ValueError, match="was expected"):
        GRMRewardModel.from_pretrained(saved_rm, head=RewardHeadConfig(type="linear"))
    with pytest.raises(ValueError, match="was expected"):
        GRMRewardModel.from_pretrained(saved_rm, head=RewardHeadConfig(type="mlp", width=1024))
    # settings file disagrees with the weights: never a random head
    meta = json.loads((saved_rm / HEAD_CONFIG_FILE).read_text())
    meta["head"]["type"] = "linear"
    (saved_rm / HEAD_CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="reward head weights do not match"):
        GRMRewardModel.from_pretrained(saved_rm)
    meta["head"].update(type="mlp", width=8)
    (saved_rm / HEAD_CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="mismatched"):
        GRMRewardModel.from_pretrained(saved_rm)


def test_plain_causal_lm_is_not_a_grm_checkpoint(bases, tmp_path):
    assert not is_grm_checkpoint(bases["llama"])
    assert not is_grm_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a GRM reward-model checkpoint"):
        GRMRewardModel.from_pretrained(bases["llama"])


# ------------------------------------------------------------------------------------------------ authors' layout
def write_authors_checkpoint(arch, tok, directory, layer_type, width=16, drop_lm_head=False, dropout=None):
    """A checkpoint laid out like Ray2333/GRM-*: causal-LM weights + `v_head.summary.*` in one safetensors file,
    `vhead_*` settings in config.json."""
    from transformers import AutoModelForCausalLM

    build_base(arch, tok, directory, seed=5)
    state = load_file(directory / "model.safetensors")
    if drop_lm_head:
        state.pop("lm_head.weight")
    g = torch.Generator().manual_seed(7)
    if layer_type == "linear":
        head = {"v_head.summary.weight": torch.randn(1, 32, generator=g),
                "v_head.summary.bias": torch.randn(1, generator=g)}
    else:
        head = {"v_head.summary.0.weight": torch.randn(width, 32, generator=g),
                "v_head.summary.0.bias": torch.randn(width, generator=g),
                "v_head.summary.2.weight": torch.randn(1, width, generator=g),
                "v_head.summary.2.bias": torch.randn(1, generator=g)}
    save_file({**state, **head}, directory / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(vhead_layer_type=layer_type, vhead_num_neurons=width, vhead_num_layers=1,
               # as on the hub: custom-code entry for the authors' class, never executed here
               architectures=["GRewardModel"], auto_map={"AutoModelForSequenceClassification": "model.GRewardModel"})
    if dropout is not None:
        cfg["summary_dropout_prob"] = dropout
    (directory / "config.json").write_text(json.dumps(cfg))
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
    return plain, head


def authors_reward(plain, head, ids, mask):
    """The authors' forward, re-implemented: head on the decoder output at index sum(mask) - 1 (right padding)."""
    hidden = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state
    h = hidden[torch.arange(len(ids)), mask.sum(-1) - 1]
    if "v_head.summary.weight" in head:
        return h @ head["v_head.summary.weight"].T[:, 0] + head["v_head.summary.bias"][0]
    z = torch.relu(h @ head["v_head.summary.0.weight"].T + head["v_head.summary.0.bias"])
    return z @ head["v_head.summary.2.weight"][0] + head["v_head.summary.2.bias"][0]


@pytest.mark.parametrize("arch,layer_type", [("gemma", "mlp"), ("llama", "linear"), ("qwen2", "mlp")])
def test_authors_layout_loads_and_scores(arch, layer_type, tok, tmp_path):
    plain, head = write_authors_checkpoint(arch, tok, tmp_path, layer_type)
    assert is_grm_checkpoint(tmp_path) and checkpoint_layout(tmp_path) == "authors"
    model = GRMRewardModel.from_pretrained(tmp_path)
    assert all_eval(model) and model.lm_head_loaded
    assert model.head_config == RewardHeadConfig(layer_type, 16, 0.1, 1)  # authors' default dropout 0.1
    b = batch(tok)
    with torch.no_grad():
        got = model.rewards(b["input_ids"], b["attention_mask"])
        expected = authors_reward(plain, head, b["input_ids"], b["attention_mask"])
        logits = model(b["input_ids"], b["attention_mask"]).logits
        plain_logits = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-5)
    real = b["attention_mask"].bool()
    assert torch.allclose(logits[real], plain_logits[real], atol=1e-5)
    with pytest.raises(ValueError, match="was expected"):
        GRMRewardModel.from_pretrained(tmp_path, head=RewardHeadConfig("linear" if layer_type == "mlp" else "mlp"))


def test_authors_layout_without_untied_lm_head_scores_but_has_no_logits(tok, tmp_path):
    plain, head = write_authors_checkpoint("llama", tok, tmp_path, "mlp", drop_lm_head=True, dropout=0.0)
    model = GRMRewardModel.from_pretrained(tmp_path)
    assert not model.lm_head_loaded and model.head_config.dropout == 0.0
    b = batch(tok)
    with torch.no_grad():
        assert torch.allclose(model.rewards(b["input_ids"], b["attention_mask"]),
                              authors_reward(plain, head, b["input_ids"], b["attention_mask"]), atol=1e-5)
    with pytest.raises(RuntimeError, match="LM head"):
        model(b["input_ids"], b["attention_mask"])


def test_authors_layout_strictness(tok, tmp_path):
    write_authors_checkpoint("gemma", tok, tmp_path, "mlp")
    state = load_file(tmp_path / "model.safetensors")
    del state["v_head.summary.0.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['v_head.summary.0.bias'\]"):
        GRMRewardModel.from_pretrained(tmp_path)
    # config says linear, weights are an mlp
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vhead_layer_type"] = "linear"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="reward head weights do not match"):
        GRMRewardModel.from_pretrained(tmp_path)
    # vhead settings but no v_head weights (e.g. converted to a sequence classifier): not a GRM checkpoint
    save_file({k: v for k, v in state.items() if not k.startswith("v_head.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    assert not is_grm_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ training modes
def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def grm_step(model, tok, lr=1e-2):
    """One GRM (SFT-regularised) optimiser step on two chosen/rejected pairs."""
    pairs = [PAIRS[0], ("list 3 fruits", "apple apple apple"), PAIRS[2], ("please give 5 colors", "red")]
    b = batch(tok, pairs)
    model.train()
    out = model(b["input_ids"], b["attention_mask"])
    logp = response_logprobs(out.logits, b["input_ids"], b["response_mask"])
    loss = grm_loss(out.rewards[0::2], out.rewards[1::2], grm_regulariser("sft", logp[0::2]), alpha=0.5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    model.eval()
    return grads


@pytest.mark.parametrize("arch", ["llama", "gemma"])  # untied and tied LM head
def test_lora_trains_only_lora_and_head_and_merged_save_reloads(arch, bases, tok, tmp_path):
    lora = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = new_model(bases[arch], lora=lora)
    names = trainable(model)
    assert names and all("lora_" in n or n.startswith("v_head.") for n in names)
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    head_names = {n[len("v_head."):] for n in names if n.startswith("v_head.")}
    assert head_names == {n for n, _ in model.v_head.named_parameters()}
    grads = grm_step(model, tok)
    assert any("lora_B" in n for n in grads) and any(n.startswith("v_head.") for n in grads)
    assert grads <= names

    b = batch(tok)
    with torch.no_grad():
        before = model.rewards(b["input_ids"], b["attention_mask"])
        logits_before = model(b["input_ids"], b["attention_mask"]).logits
    model.save_pretrained(tmp_path / "rm", tokenizer=tok)
    saved = load_file(tmp_path / "rm" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in saved)
    assert "model.layers.0.self_attn.q_proj.weight" in saved
    with torch.no_grad():  # saving merged nothing into the training model
        assert torch.equal(before, model.rewards(b["input_ids"], b["attention_mask"]))
    assert model.is_peft and trainable(model) == names

    loaded = GRMRewardModel.from_pretrained(tmp_path / "rm")
    assert not loaded.is_peft
    with torch.no_grad():
        after = loaded.rewards(b["input_ids"], b["attention_mask"])
        logits_after = loaded(b["input_ids"], b["attention_mask"]).logits
    assert torch.allclose(before, after, atol=1e-5)
    real = b["attention_mask"].bool()
    assert torch.allclose(logits_before[real], logits_after[real], atol=1e-4)


def test_freeze_backbone_trains_only_the_head(bases, tok):
    model = new_model(bases["gemma"]).freeze_backbone()
    assert trainable(model) == {f"v_head.{n}" for n, _ in model.v_head.named_parameters()}
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    grads = grm_step(model, tok)
    assert grads and all(n.startswith("v_head.") for n in grads)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone_before.items())


def test_full_finetune_reaches_backbone_and_gradient_checkpointing(bases, tok):
    model = new_model(bases["qwen2"])
    model.gradient_checkpointing_enable()
    grads = grm_step(model, tok)
    assert any(n.startswith("backbone.model.layers.0.") for n in grads)
    assert any(n.startswith("v_head.") for n in grads)


def test_bfloat16_backbone_float32_head(bases, tok, tmp_path):
    model = new_model(bases["qwen2"], dtype=torch.bfloat16)
    assert next(model.backbone.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.v_head.parameters())
    b = batch(tok)
    with torch.no_grad():
        r = model.rewards(b["input_ids"], b["attention_mask"])
    assert r.dtype == torch.float32 and torch.isfinite(r).all()
    model.save_pretrained(tmp_path / "rm")
    loaded = GRMRewardModel.from_pretrained(tmp_path / "rm", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(r, loaded.rewards(b["input_ids"], b["attention_mask"]))


def test_bad_settings_are_errors(bases):
    with pytest.raises(ValueError, match=r"reward head type must be 'mlp' or 'linear'"):
        RewardHeadConfig(type="transformer")
    with pytest.raises(ValueError, match=r"reward head dropout must lie in \[0, 1\)"):
        RewardHeadConfig(dropout=1.0)
    with pytest.raises(ValueError, match="target_modules"):
        new_model(bases["llama"], lora=SimpleNamespace(r=4, alpha=8))
