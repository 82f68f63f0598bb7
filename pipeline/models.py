"""The one model-loading module: tokenizers, policies and reward models, local directories or hub ids.

Weights load from safetensors only, and `trust_remote_code` is passed through only when the config asks for it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from pipeline.hf_data import looks_local

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


def seq_cls_rewards(model):
    """rewards(input_ids, attention_mask) for an AutoModelForSequenceClassification reward model.

    Reads the score head at the last *attended* token ourselves instead of the model's pooling, which locates the
    last token through `config.pad_token_id` and goes wrong when pad == eos or the config's pad differs from the
    tokenizer's.
    """
    from pipeline.tokenization import last_token_index

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


def load_reward_scorer(name_or_path: str | Path, batch_size: int = 32, max_length: int = 1024, dtype: str = "float32",
                       trust_remote_code: bool = False, strict_length: bool = False, double_bos: bool = False):
    """A `ModelScorer` for any reward model: an overopt/GRM-authors GRM directory or an HF sequence classifier.
    `double_bos`: tokenize as the GRM authors' released checkpoints were trained (see `encode_conversation`)."""
    from pipeline.reward_model import GRMRewardModel, is_grm_checkpoint
    from pipeline.scoring import ModelScorer

    _check_local(name_or_path)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    if Path(name_or_path).is_dir() and is_grm_checkpoint(name_or_path):
        model = GRMRewardModel.from_pretrained(name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        model.to(default_device())
        return ModelScorer(model.rewards, model, tokenizer, batch_size, max_length, strict_length=strict_length,
                           double_bos=double_bos)
    model = load_seq_cls_reward_model(name_or_path, dtype, trust_remote_code)
    return ModelScorer(seq_cls_rewards(model), model, tokenizer, batch_size, max_length, strict_length=strict_length,
                       double_bos=double_bos)


def load_policy_logprob_scorer(name_or_path: str | Path, batch_size: int = 32, max_length: int = 1024,
                               dtype: str = "float32", trust_remote_code: bool = False, strict_length: bool = False):
    """A `PolicyLogProbScorer`: a causal LM's summed response log-probability log π(y|x) through the one scoring
    path (the policy's own tokenizer and chat template)."""
    from pipeline.scoring import PolicyLogProbScorer

    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model = load_causal_lm(name_or_path, dtype, trust_remote_code)
    return PolicyLogProbScorer(model, tokenizer, batch_size, max_length, strict_length=strict_length)


def build_scorer(cfg, inputs: dict[str, Path], strict_length: bool = False):
    """The `RewardScorer` a `ScorerStageConfig` names: the gold, or a proxy (trained, checkpoint or ensemble).

    Trained proxies are read from their `train_proxy` artifacts in `inputs` ("model", or "member<i>" for an
    ensemble, whose members are standardised with the reference-set statistics saved beside them). `strict_length`:
    a sequence over the scorer's max length is an error raised before any forward pass, instead of a NaN score.
    """

    from pipeline.scoring import EnsembleScorer, WorldGoldScorer, load_member_stats

    if cfg.gold is not None:
        gold = cfg.gold
        if gold.type == "world":
            return WorldGoldScorer()
        return load_reward_scorer(gold.model_id, cfg.batch_size, cfg.max_length, gold.dtype, gold.trust_remote_code,
                                  strict_length, double_bos=gold.double_bos)
    proxy = cfg.proxy
    if proxy is None:
        raise ValueError(f"scorer {cfg.name!r} names neither a gold nor a proxy")
    if proxy.type == "checkpoint":
        return load_reward_scorer(proxy.path, cfg.batch_size, cfg.max_length, proxy.dtype, proxy.trust_remote_code,
                                  strict_length, double_bos=proxy.double_bos)
    if proxy.type == "ensemble":
        dirs = [inputs[f"member{i}"] for i in range(proxy.members)]
        members = [load_reward_scorer(d / "model", cfg.batch_size, cfg.max_length, cfg.dtype,
                                      strict_length=strict_length) for d in dirs]
        stats = [load_member_stats(d) for d in dirs]
        return EnsembleScorer(members, stats, proxy.combine, proxy.uwo_lambda)
    return load_reward_scorer(inputs["model"] / "model", cfg.batch_size, cfg.max_length, cfg.dtype,
                              strict_length=strict_length)


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
