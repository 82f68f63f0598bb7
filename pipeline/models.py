"""The one model-loading module: tokenizers, policies and reward models, local directories or hub ids.

Weights load from safetensors only, and `trust_remote_code` is passed through only when the config asks for it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from pipeline.hf_data import looks_local
from pipeline.tokenization import last_token_index

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_local(name_or_path: str | Path) -> None:
    """Fail fast, naming the path, when a local model directory is missing (instead of asking the hub for it)."""
    p = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")


def checked_local(name_or_path: str | Path) -> str:
    """`name_or_path` as the string transformers wants, after checking a local directory exists."""
    _check_local(name_or_path)
    return str(name_or_path)


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_local(name_or_path)
    tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    if tok.chat_template is None:
        raise ValueError(f"tokenizer of {name_or_path} has no chat template; overopt formats every prompt with it")
    return tok


def default_device() -> torch.device:
    """Where inference runs: this process's GPU when there is one (each rank of a launch has its own), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_causal_lm(name_or_path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """A policy (or reference policy) as AutoModelForCausalLM, in eval mode, on `default_device()`."""
    from transformers import AutoModelForCausalLM

    _check_local(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=DTYPES[dtype], use_safetensors=True,
                                                 trust_remote_code=trust_remote_code)
    return model.to(default_device()).eval()


def tiny_llama_config(policy, tokenizer):
    """The tiny world's base-policy architecture: a small Llama sized by `policy` (a `PolicyConfig`) over the world's
    word-level `tokenizer`, embeddings tied to the LM head."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=policy.hidden_size,
                       intermediate_size=policy.intermediate_size, num_hidden_layers=policy.num_layers,
                       num_attention_heads=policy.num_heads, num_key_value_heads=policy.num_heads,
                       max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def build_policy(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False, lora=None):
    """A causal LM to train with RL (PPO, GRPO, RLOO): loaded from safetensors in `dtype`, wrapped in LoRA adapters
    when `lora` (a `pipeline.config.LoraConfig`) is given."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(checked_local(path), dtype=DTYPES[dtype], use_safetensors=True,
                                                  trust_remote_code=trust_remote_code)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                   target_modules=list(lora.target_modules), bias="none",
                                                   task_type="CAUSAL_LM"))
    return policy


def seq_cls_rewards(model):
    """rewards(input_ids, attention_mask) for an AutoModelForSequenceClassification reward model.

    Reads the score head at the last *attended* token ourselves instead of the model's pooling, which locates the
    last token through `config.pad_token_id` and goes wrong when pad == eos or the config's pad differs from the
    tokenizer's.
    """
    head = getattr(model, "score", None)  # decoder RMs; encoders' `classifier` heads pool differently
    if head is None:
        raise ValueError(f"{type(model).__name__} has no `score` head: overopt reads decoder-only reward models")
    base = getattr(model, model.base_model_prefix)
    # Positions count attended tokens only, so a left-padded batch scores like an unpadded one (without this, models
    # with absolute position embeddings, e.g. GPT-2, read left-padded rows at shifted positions).
    takes_positions = "position_ids" in inspect.signature(base.forward).parameters

    def rewards(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)} if takes_positions else {}
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        last = last_token_index(attention_mask)
        return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])[:, 0]

    return rewards


def load_seq_cls_reward_model(name_or_path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """A Hugging Face sequence-classification reward model; refuses a checkpoint whose score head is untrained."""
    from transformers import AutoModelForSequenceClassification

    _check_local(name_or_path)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(name_or_path), dtype=DTYPES[dtype], use_safetensors=True,
        trust_remote_code=trust_remote_code, output_loading_info=True)
    if getattr(model, "score", None) is None:
        raise ValueError(f"{name_or_path}: {type(model).__name__} has no `score` head; overopt reads decoder-only RMs")
    missing_head = [k for k in info.get("missing_keys", []) if k.split(".")[0] == "score"]
    if missing_head:
        raise ValueError(f"{name_or_path} has no trained score head (missing {sorted(missing_head)}): "
                         f"it is not a sequence-classification reward model")
    if model.config.num_labels != 1:
        raise ValueError(f"{name_or_path} has num_labels={model.config.num_labels}; a reward model has 1")
    return model.to(default_device()).eval()


def merged_state_dict(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A causal LM's state dict with every active LoRA delta folded into its base weight (the model is untouched):
    what `save_pretrained` should write for a LoRA-trained model to load as a plain one. `lm` is the transformers
    model with LoRA layers injected (`PeftModel.get_base_model()`); without LoRA layers, its plain state dict."""
    from peft.tuners.lora import LoraLayer

    lora_modules = {name: m for name, m in lm.named_modules() if isinstance(m, LoraLayer)}
    merged: dict[str, torch.Tensor] = {}
    for key, value in lm.state_dict().items():
        owner = next((n for n in lora_modules if key.startswith(n + ".")), None)
        if owner is None:
            merged[key] = value
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base_layer."):
            continue  # lora_A / lora_B / ... weights
        name = rest[len("base_layer."):]
        module = lora_modules[owner]
        if name == "weight" and not module.merged:
            value = value.clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    value += module.get_delta_weight(adapter).to(value.dtype)
        merged[f"{owner}.{name}"] = value.detach()
    return merged
