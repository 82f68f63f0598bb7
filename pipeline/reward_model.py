"""The GRM reward model: any Hugging Face causal LM, its LM head kept, plus a reward head.

The reward head reads the final hidden state - the tensor the LM head reads, i.e. after the final norm - at the last
real (attended) token of each sequence, whatever the padding side. The same forward pass also returns the LM logits,
which GRM's text-generation regulariser needs (`pipeline.losses.response_logprobs`).

Checkpoint layouts
------------------
overopt (written by `save_pretrained`)::

    DIR/config.json, generation_config.json, model*.safetensors[.index.json]
        the backbone as a plain AutoModelForCausalLM (LoRA merged in), LM head included
    DIR/reward_head.safetensors
        the head's weights, named `v_head.summary.*` (the same names as the GRM authors' checkpoints)
    DIR/reward_head.json
        {"format": "overopt-grm-reward-head", "format_version": 1,
         "head": {"type": "mlp"|"linear", "width": W, "dropout": p, "num_layers": L[, "outputs": 2][, "ib_dim": D]},
         "hidden_size": H, "weights": "reward_head.safetensors"}
    DIR/tokenizer files (when a tokenizer is given)

The backbone directory is an ordinary causal LM: it loads as a policy (`AutoModelForCausalLM`) unchanged.

Two head variants (settings written only when used, so a plain head's reward_head.json is as it always was):
`outputs: 2` (ODIN): the head's last Linear has two rows on the same features, row 0 the quality reward (the only
one that scores) and row 1 the length reward (trained, never scored); `ib_dim: D` (InfoRM): the last Linear gives
a Gaussian latent's mean and log-variance (2·D values) and `v_head.decoder` maps the latent to the reward.

GRM authors' layout (Ray2333/GRM-* on the hub; `AutoModelForCausalLMWithValueHead` / `GRewardModel` in
YangRui2015/Generalizable-Reward-Model): one set of safetensors files holding the causal LM's weights (`model.*`, plus
`lm_head.weight` unless tied or dropped) and the value head's weights `v_head.summary.*`; config.json carries
`vhead_layer_type` ("mlp" | "linear"), `vhead_num_neurons` (MLP width, 1024), `vhead_num_layers` (hidden layers, 1),
optionally `vhead_num_output` (must be 1) and `summary_dropout_prob` (head dropout; absent means 0.1 in their code).
Their head is Dropout → Linear(H, 1) for "linear", and Dropout → [Linear(·, W) → ReLU] × L → Linear(W, 1) for "mlp"
(weights `v_head.summary.{0,2,...,2L}.*`). Their `GRewardModel` keeps only the decoder, so an untied model may lack
`lm_head.weight`: such a checkpoint loads and scores, but `forward(..., return_logits=True)` refuses to run.

Loading is strict in both layouts: a missing, unexpected or mis-shaped weight in the backbone or the head is an
error naming the keys, and a head whose settings do not match its weights (or the settings the caller expects) is an
error - never a silently random head. Weights load from safetensors only; remote code runs only when asked.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from pipeline.models import merged_state_dict
from pipeline.tokenization import last_token_index

HEAD_FILE = "reward_head.safetensors"
HEAD_CONFIG_FILE = "reward_head.json"
HEAD_FORMAT = "overopt-grm-reward-head"
HEAD_FORMAT_VERSION = 1
HEAD_PREFIX = "v_head."  # weight-name prefix of the head, in our files and in the authors' checkpoints
AUTHORS_DEFAULT_DROPOUT = 0.1  # `summary_dropout_prob` default of the authors' ValueHead


@dataclass(frozen=True)
class RewardHeadConfig:
    """Reward head settings.

    type "mlp" (paper default): Dropout(p) → [Linear(·, width) → ReLU] × num_layers → Linear(width, k);
    type "linear": Dropout(p) → Linear(H, k) (`width` and `num_layers` unused).

    k = 1 for a plain head. `outputs` = 2 (ODIN, Chen et al. 2024): two reward heads on the same features, output 0
    the quality reward (what scores), output 1 the length reward (training only). `ib_dim` = D > 0 (InfoRM, Miao et
    al. 2024): k = 2·D, the mean μ and log-variance of a Gaussian latent z, and the reward is Linear(D, 1)(z) with
    z = μ + σ·ε in training and z = μ in eval mode.
    """

    type: str = "mlp"
    width: int = 1024
    dropout: float = 0.1
    num_layers: int = 1
    outputs: int = 1
    ib_dim: int = 0

    def __post_init__(self):
        if self.type not in ("mlp", "linear"):
            raise ValueError(f"reward head type must be 'mlp' or 'linear', got {self.type!r}")
        if self.type == "mlp" and (int(self.width) < 1 or int(self.num_layers) < 1):
            raise ValueError(f"an mlp reward head needs width >= 1 and num_layers >= 1, got {self}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"reward head dropout must lie in [0, 1), got {self.dropout}")
        if self.outputs not in (1, 2):
            raise ValueError(f"reward head outputs must be 1 or 2 (ODIN's quality and length heads), "
                             f"got {self.outputs}")
        if int(self.ib_dim) < 0 or (self.ib_dim and self.outputs != 1):
            raise ValueError(f"reward head ib_dim must be >= 0 and cannot be combined with outputs=2, got {self}")

    @property
    def final_width(self) -> int:
        """Width of the head's last Linear: 1, 2 (ODIN) or 2·ib_dim (InfoRM's mean and log-variance)."""
        return 2 * self.ib_dim if self.ib_dim else self.outputs

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("outputs", "ib_dim"):  # written only when used: a plain head's json stays as it always was
            if d[name] == getattr(RewardHeadConfig, name):
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RewardHeadConfig":
        unknown = set(d) - {"type", "width", "dropout", "num_layers", "outputs", "ib_dim"}
        if unknown:
            raise ValueError(f"unknown reward head settings {sorted(unknown)}")
        return cls(**d)

    def same_shape(self, other: "RewardHeadConfig") -> bool:
        """Same weights layout (dropout does not matter)."""
        if (self.type, self.outputs, self.ib_dim) != (other.type, other.outputs, other.ib_dim):
            return False
        return self.type == "linear" or (self.width, self.num_layers) == (other.width, other.num_layers)


class RewardHead(nn.Module):
    """The reward head; parameter names (`summary.*`) match the GRM authors' `ValueHead` (InfoRM's latent-to-reward
    map is `decoder.*`)."""

    def __init__(self, hidden_size: int, config: RewardHeadConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        if config.type == "linear":
            self.summary = nn.Linear(hidden_size, config.final_width)
        else:
            layers: list[nn.Module] = []
            width_in = hidden_size
            for _ in range(config.num_layers):
                layers += [nn.Linear(width_in, config.width), nn.ReLU()]
                width_in = config.width
            layers.append(nn.Linear(width_in, config.final_width))
            self.summary = nn.Sequential(*layers)
        if config.ib_dim:
            self.decoder = nn.Linear(config.ib_dim, 1)

    def final_linear(self) -> nn.Linear:
        """The head's last Linear (ODIN: its two rows are the quality and length heads' weights)."""
        return self.summary if isinstance(self.summary, nn.Linear) else self.summary[-1]

    def outputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(..., H) -> the (...,) rewards that score, and what else the head computes: ODIN's "length_rewards" (...,)
        and "head_weight_dot" (W_q · W_l, a scalar); InfoRM's "latent_mean" and "latent_logvar" (..., D)."""
        out = self.summary(self.dropout(hidden))
        cfg = self.config
        if cfg.ib_dim:
            mean, logvar = out[..., :cfg.ib_dim], out[..., cfg.ib_dim:]
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
            return self.decoder(z).squeeze(-1), {"latent_mean": mean, "latent_logvar": logvar}
        if cfg.outputs == 2:
            w = self.final_linear().weight
            return out[..., 0], {"length_rewards": out[..., 1], "head_weight_dot": w[0] @ w[1]}
        return out.squeeze(-1), {}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (...,) rewards (ODIN: the quality head only; InfoRM: the reward of z, z = μ in eval mode)."""
        return self.outputs(hidden)[0]


class RewardModelOutput(NamedTuple):
    rewards: torch.Tensor  # (B,) float32, head applied at the last real token
    logits: torch.Tensor | None  # (B, T, V) LM logits of the same pass (None when not requested)
    head: dict[str, torch.Tensor] = {}  # the head's other outputs (`RewardHead.outputs`; never mutated)


def _get(obj, *names, default=None):
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if not isinstance(obj, dict) and hasattr(obj, n):
            return getattr(obj, n)
    return default


@functools.lru_cache(maxsize=None)
def _accepts_position_ids(lm_class: type) -> bool:
    return "position_ids" in inspect.signature(lm_class.forward).parameters


def _hidden_size(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


class GRMRewardModel(nn.Module):
    """A causal LM (`backbone`, LM head intact, optionally LoRA-wrapped) plus a reward head (`v_head`).

    The head is kept in float32 whatever the backbone's dtype; rewards are float32.
    """

    def __init__(self, backbone: nn.Module, head: RewardHeadConfig | None = None):
        super().__init__()
        head = head or RewardHeadConfig()
        self.backbone = backbone
        self.head_config = head
        self.v_head = RewardHead(_hidden_size(backbone.config), head).to(
            device=next(backbone.parameters()).device, dtype=torch.float32)
        self.lm_head_loaded = True  # False for an authors' checkpoint whose untied LM head was not saved

    # ------------------------------------------------------------------------------------------------ structure
    @property
    def is_peft(self) -> bool:
        return hasattr(self.backbone, "get_base_model") and hasattr(self.backbone, "peft_config")

    def causal_lm(self) -> nn.Module:
        """The transformers causal LM (inside the PEFT wrapper, LoRA layers injected, when LoRA is on)."""
        return self.backbone.get_base_model() if self.is_peft else self.backbone

    def decoder(self) -> nn.Module:
        lm = self.causal_lm()
        return getattr(lm, lm.base_model_prefix)

    @property
    def device(self) -> torch.device:
        return next(self.v_head.parameters()).device

    def freeze_backbone(self) -> "GRMRewardModel":
        """The "frozen classifier" baseline: only the reward head trains."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for p in self.v_head.parameters():
            p.requires_grad_(True)
        return self

    def apply_lora(self, lora) -> "GRMRewardModel":
        """Wrap the backbone with peft LoRA; `lora` has r, alpha, dropout, target_modules (attributes or keys).

        peft freezes every backbone weight but the LoRA matrices; the reward head stays fully trainable.
        """
        from peft import LoraConfig, get_peft_model

        if self.is_peft:
            raise ValueError("the backbone is already LoRA-wrapped")
        r = _get(lora, "r")
        alpha = _get(lora, "alpha", "lora_alpha")
        dropout = _get(lora, "dropout", "lora_dropout", default=0.0)
        targets = _get(lora, "target_modules")
        if r is None or alpha is None or targets is None:
            raise ValueError(f"LoRA settings need r, alpha and target_modules, got {lora!r}")
        cfg = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(targets),
                         bias="none", task_type="CAUSAL_LM")
        self.backbone = get_peft_model(self.backbone, cfg)
        for p in self.v_head.parameters():
            p.requires_grad_(True)
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing of the decoder layers (non-reentrant, so LoRA needs no input-grad hooks)."""
        lm = self.causal_lm()
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------------------------------------ forward
    def _position_kwargs(self, lm: nn.Module, attention_mask: torch.Tensor) -> dict:
        # Positions count attended tokens only, so left and right padding give the same positions (as in generate);
        # this matters for absolute position embeddings (RoPE models are shift-invariant anyway).
        if not _accepts_position_ids(type(lm)):
            return {}
        return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}

    def _reward_at_last(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        last = last_token_index(attention_mask)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        # float32, the head's dtype, except under a DeepSpeed bf16/fp16 engine, which casts every parameter to 16 bits
        return self.v_head.outputs(h.to(next(self.v_head.parameters()).dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                return_logits: bool = True) -> RewardModelOutput:
        """Rewards (B,) read at the last real token, the head's other outputs (ODIN's length head, InfoRM's latent;
        see `RewardHead.outputs`) and, when `return_logits`, the LM logits (B, T, V) of the same forward pass (GRM's
        text-generation loss needs both)."""
        lm = self.causal_lm()
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                      **self._position_kwargs(lm, attention_mask))
        if not return_logits:
            hidden = getattr(lm, lm.base_model_prefix)(**kwargs).last_hidden_state
            rewards, head = self._reward_at_last(hidden, attention_mask)
            return RewardModelOutput(rewards, None, head)
        if not self.lm_head_loaded:
            raise RuntimeError("this reward model was loaded from a checkpoint without its LM head weights; "
                               "it can score (return_logits=False) but not compute LM logits")
        # The LM head's input is, by construction, the final (post-norm) hidden state; capture it with a hook rather
        # than trusting `hidden_states[-1]` (which transformers lets a config redefine).
        captured: list[torch.Tensor] = []
        handle = lm.get_output_embeddings().register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
        try:
            out = self.backbone(**kwargs)
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].shape[:2] != input_ids.shape:
            raise RuntimeError("could not capture the LM head's input for every position")
        rewards, head = self._reward_at_last(captured[0], attention_mask)
        return RewardModelOutput(rewards, out.logits, head)

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) rewards only (no LM logits computed); the `rewards_fn` of `pipeline.scoring.ModelScorer`."""
        return self.forward(input_ids, attention_mask, return_logits=False).rewards

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_base(cls, name_or_path, head: RewardHeadConfig | None = None, dtype: torch.dtype = torch.float32,
                  trust_remote_code: bool = False, lora=None) -> "GRMRewardModel":
        """A new reward model on a pretrained causal LM: random head, optional LoRA. Returned in eval mode (call
        `.train()` to train); seed torch before calling for a reproducible head initialisation."""
        from transformers import AutoModelForCausalLM

        backbone = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, use_safetensors=True,
                                                        trust_remote_code=trust_remote_code)
        model = cls(backbone, head)
        if lora is not None:
            model.apply_lora(lora)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                        head: RewardHeadConfig | None = None) -> "GRMRewardModel":
        """Load a saved reward model (overopt or GRM-authors layout) strictly, in eval mode.

        `head`, when given, is the head the caller expects; a checkpoint with a different head type/width/layers is
        an error (the saved dropout is used).
        """
        from transformers import AutoModelForCausalLM

        path = Path(path)
        layout = checkpoint_layout(path)
        if layout is None:
            raise ValueError(f"{path} is not a GRM reward-model checkpoint (no {HEAD_CONFIG_FILE}, and no vhead_* "
                             f"settings with v_head.* weights)")
        if layout == "overopt":
            saved = _read_head_json(path)
            cfg, hidden_size = saved["head"], saved["hidden_size"]
            head_state = _load_safetensors(path / HEAD_FILE)
            allowed_unexpected, allowed_missing = set(), set()
        else:
            cfg, hidden_size = _authors_head_config(path), None
            head_state = _authors_head_state(path)
            allowed_unexpected, allowed_missing = set(head_state), {"lm_head.weight"}
        if head is not None and not head.same_shape(cfg):
            raise ValueError(f"{path}: the checkpoint's reward head is {cfg}, but {head} was expected")

        backbone, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            output_loading_info=True)
        missing = set(info.get("missing_keys", ())) - allowed_missing
        unexpected = set(info.get("unexpected_keys", ())) - allowed_unexpected
        mismatched = list(info.get("mismatched_keys", ()))
        errors = list(info.get("error_msgs", ()))
        if missing or unexpected or mismatched or errors:
            raise ValueError(f"{path}: backbone weights do not match {type(backbone).__name__}: "
                             f"missing {sorted(missing)}, unexpected {sorted(unexpected)}, "
                             f"mismatched {mismatched}, errors {errors}")
        model = cls(backbone, cfg)
        if hidden_size is not None and hidden_size != _hidden_size(backbone.config):
            raise ValueError(f"{path}: reward head was saved for hidden size {hidden_size}, backbone has "
                             f"{_hidden_size(backbone.config)}")
        if "lm_head.weight" in set(info.get("missing_keys", ())):
            model.lm_head_loaded = False
        _load_head_strict(model.v_head, head_state, path, cfg)
        return model.eval()

    # ------------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, directory, tokenizer=None) -> Path:
        """Write the overopt layout (see the module docstring): merged backbone, head weights + settings, tokenizer."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lm = self.causal_lm()
        if self.is_peft:
            lm.save_pretrained(directory, state_dict=self._merged_state_dict(), safe_serialization=True)
        else:
            lm.save_pretrained(directory, safe_serialization=True)
        head_state = {HEAD_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
                      for k, v in self.v_head.state_dict().items()}
        save_file(head_state, str(directory / HEAD_FILE), metadata={"format": "pt"})
        meta = {"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "head": self.head_config.to_dict(),
                "hidden_size": _hidden_size(lm.config), "weights": HEAD_FILE,
                "reads": "final (post-norm) hidden state, i.e. the LM head's input, at the last attended token"}
        (directory / HEAD_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return directory

    def _merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The causal LM's state dict with every active LoRA delta folded into its base weight (model untouched)."""

        return merged_state_dict(self.causal_lm())


# ---------------------------------------------------------------------------------------------- weight averaging
def average_state_dicts(state_dicts: Iterable[Mapping[str, torch.Tensor]],
                        labels: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The uniform average of K ≥ 2 state dicts (WARM, Ramé et al. 2024): each floating tensor is the mean of its K
    values (summed in float32, returned in the first dict's dtype); every other tensor (an integer buffer) must be
    equal in all K and is kept as it is.

    The dicts are read one at a time, so an iterable that loads each model lazily holds only the running sum and one
    model. Members whose tensor names or shapes differ from the first's are refused (ValueError naming the member,
    `labels[i]`, and the first differing names) - they are not the same architecture and cannot be averaged.
    """
    total: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    count = 0
    for i, state in enumerate(state_dicts):
        name = labels[i] if labels is not None else f"member {i}"
        if count == 0:
            first = {k: v.detach() for k, v in state.items()}
            total = {k: v.detach().to(torch.float32, copy=True) for k, v in first.items() if v.is_floating_point()}
            first_name = name
        else:
            missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
            shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(first[k].shape)}" for k in first
                      if k in state and state[k].shape != first[k].shape]
            if missing or extra or shapes:
                raise ValueError(f"cannot average the weights of {name} with those of {first_name}: different "
                                 f"parameters (missing {missing[:5]}, extra {extra[:5]}, shapes {shapes[:5]}); "
                                 f"weight averaging needs members of one architecture and reward head")
            for k, v in state.items():
                if k in total:
                    total[k] += v.detach().to(torch.float32)
                elif not torch.equal(v.detach().cpu(), first[k].cpu()):
                    raise ValueError(f"cannot average {name} with {first_name}: their non-floating tensor {k!r} "
                                     f"differs (only floating-point weights are averaged)")
        count += 1
    if count < 2:
        raise ValueError(f"weight averaging needs at least 2 members, got {count}")
    return {k: (total[k].div_(count).to(v.dtype) if k in total else v) for k, v in first.items()}


def weight_averaged_reward_model(paths: Sequence[str | Path], dtype: torch.dtype = torch.float32) -> "GRMRewardModel":
    """One `GRMRewardModel` whose weights (backbone, LM head and reward head) are the uniform average of the saved
    reward models at `paths` (`average_state_dicts`), loaded one at a time. Every member's head must have the first's
    settings. LoRA-trained members are saved with their adapters merged, so this averages the merged weights:
    base + mean of the members' low-rank deltas."""
    if len(paths) < 2:
        raise ValueError(f"weight averaging needs at least 2 members, got {len(paths)}")
    model = GRMRewardModel.from_pretrained(paths[0], dtype=dtype)

    def others():
        for path in paths[1:]:
            yield GRMRewardModel.from_pretrained(path, dtype=dtype, head=model.head_config).state_dict()

    averaged = average_state_dicts(itertools.chain([model.state_dict()], others()), [str(p) for p in paths])
    model.load_state_dict(averaged, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- checkpoints
def _read_json(p: Path) -> dict:
    return json.loads(p.read_text())


def _read_head_json(path: Path) -> dict:
    meta = _read_json(path / HEAD_CONFIG_FILE)
    if meta.get("format") != HEAD_FORMAT:
        raise ValueError(f"{path / HEAD_CONFIG_FILE}: format {meta.get('format')!r}, expected {HEAD_FORMAT!r}")
    if meta.get("format_version") != HEAD_FORMAT_VERSION:
        raise ValueError(f"{path / HEAD_CONFIG_FILE}: format_version {meta.get('format_version')!r} is not supported "
                         f"(this code reads version {HEAD_FORMAT_VERSION})")
    if not (path / HEAD_FILE).is_file():
        raise ValueError(f"{path}: {HEAD_FILE} is missing")
    return {"head": RewardHeadConfig.from_dict(meta["head"]), "hidden_size": int(meta["hidden_size"])}


def _weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _safetensors_keys(path: Path) -> dict[str, Path]:
    """Every tensor name in the directory's model safetensors files -> its file (the head file excluded)."""
    from safetensors import safe_open

    keys: dict[str, Path] = {}
    for f in _weight_files(path):
        if f.name == HEAD_FILE:
            continue
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                keys[k] = f
    return keys


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file))


def _authors_config(path: Path) -> dict | None:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    cfg = _read_json(cfg_file)
    return cfg if any(k.startswith("vhead_") for k in cfg) else None


def _authors_head_config(path: Path) -> RewardHeadConfig:
    cfg = _authors_config(path) or {}
    n_out = cfg.get("vhead_num_output", 1)
    if n_out != 1:
        raise ValueError(f"{path}: vhead_num_output={n_out}; a scalar reward head has 1 output")
    dropout = cfg.get("summary_dropout_prob")
    return RewardHeadConfig(type=cfg.get("vhead_layer_type", "mlp"), width=int(cfg.get("vhead_num_neurons", 1024)),
                            dropout=AUTHORS_DEFAULT_DROPOUT if dropout is None else float(dropout),
                            num_layers=int(cfg.get("vhead_num_layers", 1)))


def _authors_head_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for key, file in _safetensors_keys(path).items():
        if key.startswith(HEAD_PREFIX):
            with safe_open(str(file), framework="pt") as sf:
                out[key] = sf.get_tensor(key)
    return out


def _load_head_strict(head: RewardHead, state: dict[str, torch.Tensor], path: Path, cfg: RewardHeadConfig) -> None:
    state = {k[len(HEAD_PREFIX):] if k.startswith(HEAD_PREFIX) else k: v for k, v in state.items()}
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: saved {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise ValueError(f"{path}: reward head weights do not match the head settings {cfg}: "
                         f"missing {[HEAD_PREFIX + k for k in missing]}, "
                         f"unexpected {[HEAD_PREFIX + k for k in unexpected]}, mismatched {mismatched}")
    head.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


def checkpoint_layout(path) -> str | None:
    """"overopt", "authors" (GRM authors' hub layout) or None (not a GRM checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / HEAD_CONFIG_FILE).is_file():
        return "overopt"
    if _authors_config(path) is not None:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            keys = _read_json(index).get("weight_map", {})
        else:
            keys = _safetensors_keys(path)
        if any(k.startswith(HEAD_PREFIX) for k in keys):
            return "authors"
    return None


def is_grm_checkpoint(path) -> bool:
    """True for a directory holding a GRM reward model, in our layout or the GRM authors' layout.

    A config with vhead_* settings but no v_head.* weights (e.g. a sequence classifier converted from a GRM) is not one.
    """
    return checkpoint_layout(path) is not None
