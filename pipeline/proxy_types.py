"""The one table of proxy types: adding a type is one entry here (plus its loss in `pipeline.losses` if it is new).

Each entry says which `ProxyConfig` fields the type uses (the others are reset by `ProxyConfig.canonical`, so they
do not enter fingerprints), whether `train_proxy` trains it, its training loss, and what its loss needs from the
forward pass. `pipeline.config` builds its type Literals and `canonical` from this table; `stages/train_proxy` takes
the loss, the backbone freezing and the reference model from it.

Light to import (no torch at import time): `pipeline.config` imports it to validate a study before any stage runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# Fields every proxy uses whatever its type (the reward head and the shared training settings).
COMMON_FIELDS = frozenset({"name", "type", "seed", "head", "head_width", "head_dropout", "training"})
# Fields every trained type uses on top of its own: the reward-centering coefficient (an auxiliary term added to any
# trained loss, `training_loss`) and the seed of the initialisation (reward head, LoRA matrices) when it is not `seed`.
TRAINED_FIELDS = frozenset({"center_coef", "init_seed"})


def _bt(proxy, r_c, r_r, batch, out, ref_model):
    from pipeline import losses

    return losses.bt_loss(r_c, r_r)


def _margin(proxy, r_c, r_r, batch, out, ref_model):
    from pipeline import losses

    return losses.margin_loss(r_c, r_r, batch["margin"])


def _label_smoothing(proxy, r_c, r_r, batch, out, ref_model):
    from pipeline import losses

    return losses.label_smoothing_loss(r_c, r_r, proxy.epsilon)


def _grm(proxy, r_c, r_r, batch, out, ref_model):
    import torch

    from pipeline import losses

    logp_c, logp_r = losses.response_logprobs(out.logits, batch["input_ids"], batch["response_mask"]).chunk(2)
    ref_c = ref_r = None
    if proxy.reg == "dpo":
        ref_model.to(batch["input_ids"].device)  # the Trainer only places the trained model
        with torch.no_grad():
            ref_logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ref_c, ref_r = losses.response_logprobs(ref_logits, batch["input_ids"], batch["response_mask"]).chunk(2)
    reg = losses.grm_regulariser(proxy.reg, logp_c, logp_r, proxy.beta, ref_c, ref_r)
    return losses.grm_loss(r_c, r_r, reg, proxy.alpha)


def _odin(proxy, r_c, r_r, batch, out, ref_model):
    from pipeline import losses

    len_c, len_r = out.head["length_rewards"].chunk(2)
    lengths = batch["response_mask"].sum(-1).to(r_c.device)  # response length in tokens, chosen rows first
    return losses.odin_loss(r_c, r_r, len_c, len_r, lengths, out.head["head_weight_dot"], proxy.odin_length_weight,
                            proxy.odin_ortho_weight)


def _inform(proxy, r_c, r_r, batch, out, ref_model):
    from pipeline import losses

    return losses.inform_loss(r_c, r_r, out.head["latent_mean"], out.head["latent_logvar"], proxy.ib_beta)


# loss(proxy, r_c, r_r, batch, out, ref_model) -> scalar tensor; `batch` is the collated PairCollator batch (chosen
# rows first), `out` the model's RewardModelOutput, `ref_model` a frozen copy of the base LM (or None).
LossFn = Callable[[Any, Any, Any, dict, Any, Any], Any]


@dataclass(frozen=True)
class ProxyTypeSpec:
    name: str
    fields: frozenset[str]  # type-specific ProxyConfig fields (on top of COMMON_FIELDS)
    trained: bool  # train_proxy trains one model of this type (an ensemble's members are trained models)
    loss: LossFn | None = None
    needs_logits: bool = False  # the loss reads the LM logits of the same forward pass
    frozen_backbone: bool = False  # only the reward head trains
    needs_reference: Callable[[Any], bool] = lambda proxy: False  # a frozen copy of the base LM for the loss
    # made of `members` trained models of `member_type` (`ProxyConfig.member_specs`), each with its own train_proxy
    # stage; the members inherit the fields their type uses from the entry (`used_fields`)
    composite: bool = False
    # extra `RewardHeadConfig` settings of the type's head (ODIN: two outputs; InfoRM: a Gaussian latent)
    head_settings: Callable[[Any], dict] = lambda proxy: {}
    summary: str = ""  # what the type is, in a line (`overopt show`, the README's proxy table)
    reference: str = ""  # the paper it comes from


PROXY_TYPES: dict[str, ProxyTypeSpec] = {s.name: s for s in (
    ProxyTypeSpec("bt", frozenset(), True, _bt, summary="Bradley-Terry: −log σ(r_c − r_r)",
                  reference="Bradley & Terry 1952; Ouyang et al. 2022"),
    ProxyTypeSpec("margin", frozenset({"margin_scale"}), True, _margin,
                  summary="BT with a margin m = margin_scale·|gold_c − gold_r|", reference="Touvron et al. 2023"),
    ProxyTypeSpec("label_smoothing", frozenset({"epsilon"}), True, _label_smoothing,
                  summary="BT with labels smoothed by epsilon", reference="Wang et al. 2024 (Secrets of RLHF II)"),
    ProxyTypeSpec("grm", frozenset({"reg", "alpha", "beta"}), True, _grm, needs_logits=True,
                  needs_reference=lambda proxy: proxy.reg == "dpo",
                  summary="(1 − α)·BT + α·text-generation regulariser (sft, sft_nll, dpo, dpo_noref) on the kept LM "
                          "head",
                  reference="Yang et al. 2024 (GRM)"),
    ProxyTypeSpec("frozen", frozenset(), True, _bt, frozen_backbone=True,
                  summary="BT with the backbone frozen: only the reward head trains",
                  reference="Yang et al. 2024 (GRM), baseline"),
    ProxyTypeSpec("odin", frozenset({"odin_length_weight", "odin_ortho_weight"}), True, _odin,
                  head_settings=lambda proxy: {"outputs": 2},
                  summary="quality and length heads, length decorrelated; only the quality head scores",
                  reference="Chen et al. 2024 (ODIN)"),
    ProxyTypeSpec("inform", frozenset({"ib_dim", "ib_beta"}), True, _inform,
                  head_settings=lambda proxy: {"ib_dim": proxy.ib_dim},
                  summary="information-bottleneck head (Gaussian latent, KL to N(0, I)); latent outlier score on "
                          "curves",
                  reference="Miao et al. 2024 (InfoRM)"),
    # `members` copies of `member_type` whose standardised scores are combined (Coste et al. 2023)
    ProxyTypeSpec("ensemble", frozenset({"members", "member_type", "combine"}), False, composite=True,
                  summary="members' standardised scores combined: mean, min (WCO) or uwo",
                  reference="Coste et al. 2023"),
    # `members` copies of `member_type` from one shared initialisation, seen in different data orders, whose weights
    # are averaged into one model (Ramé et al. 2024, WARM; stage warm_average)
    ProxyTypeSpec("warm", frozenset({"members", "member_type"}), False, composite=True,
                  summary="members from one initialisation, different data orders, weights averaged into one model",
                  reference="Ramé et al. 2024 (WARM)"),
    # an existing reward model (local dir or hub id): no training stage
    ProxyTypeSpec("checkpoint", frozenset({"path", "trust_remote_code", "dtype", "double_bos"}), False,
                  summary="an existing reward model (HF sequence classifier or GRM layout), not trained here"),
)}

ALL_TYPES: tuple[str, ...] = tuple(PROXY_TYPES)

# Options every trained proxy takes on top of its type's loss: field -> (what it does, where it comes from).
PROXY_OPTIONS = {
    "center_coef": ("reward centering: + c·mean((r_c + r_r)²) pulls the mean reward to 0",
                    "Eisenstein et al. 2023; TRL's center_rewards_coefficient"),
}
TRAINED_TYPES: tuple[str, ...] = tuple(n for n, s in PROXY_TYPES.items() if s.trained)


def spec(proxy_type: str) -> ProxyTypeSpec:
    if proxy_type not in PROXY_TYPES:
        raise ValueError(f"unknown proxy type {proxy_type!r} (known: {', '.join(ALL_TYPES)})")
    return PROXY_TYPES[proxy_type]


def used_fields(proxy) -> set[str]:
    """The ProxyConfig fields that can change what `proxy` is (the rest are reset by `canonical`)."""
    kind = spec(proxy.type)
    used = set(COMMON_FIELDS) | kind.fields
    if kind.trained:
        used |= TRAINED_FIELDS
    if kind.composite:  # its members inherit the fields their member_type uses (their init seeds are set per member)
        used |= spec(proxy.member_type).fields | (TRAINED_FIELDS - {"init_seed"})
    if proxy.type == "ensemble" and proxy.combine == "uwo":
        used |= {"uwo_lambda"}
    return used


def training_loss(proxy, r_c, r_r, batch: dict, out, ref_model=None):
    """The loss `train_proxy` minimises for a proxy of a trained type: its type's loss, plus the reward-centering
    term c·mean((r_c + r_r)²) when `center_coef` c > 0 (`losses.reward_centering`)."""
    s = spec(proxy.type)
    if not s.trained or s.loss is None:
        raise ValueError(f"proxy type {proxy.type!r} is not trained by train_proxy")
    loss = s.loss(proxy, r_c, r_r, batch, out, ref_model)
    if proxy.center_coef:
        from pipeline import losses

        loss = loss + losses.reward_centering(r_c, r_r, proxy.center_coef)
    return loss


# How a legend or a table names a GRM regulariser (`ProxyConfig.reg`).
GRM_REGULARISERS = {"sft": "SFT", "sft_nll": "SFT-NLL", "dpo": "DPO", "dpo_noref": "DPO-noref"}


def _describe_type(proxy) -> str:
    """What a proxy's type and its type-specific fields make it, without training settings."""
    text = _describe_loss(proxy)
    if spec(proxy.type).trained and proxy.center_coef:
        text += f", centred c={proxy.center_coef:g}"
    return text


def _describe_members(proxy) -> str:
    """A composite proxy's member type in words ("" for plain BT), from the fields its members inherit."""
    member = _as_type(proxy, proxy.member_type)
    return "" if proxy.member_type == "bt" and not proxy.center_coef else " " + _describe_type(member)


def _describe_loss(proxy) -> str:
    t = proxy.type
    if t == "bt":
        return "BT"
    if t == "margin":
        return "BT with margin" + ("" if proxy.margin_scale == 1 else f" ×{proxy.margin_scale:g}")
    if t == "label_smoothing":
        return f"label smoothing ε={proxy.epsilon:g}"
    if t == "grm":
        beta = f" β={proxy.beta:g}" if proxy.reg in ("dpo", "dpo_noref") else ""
        return f"GRM-{GRM_REGULARISERS[proxy.reg]} α={proxy.alpha:g}{beta}"
    if t == "frozen":
        return "BT, frozen backbone"
    if t == "odin":
        weights = "" if (proxy.odin_length_weight, proxy.odin_ortho_weight) == (1, 1) else \
            f" λ_L={proxy.odin_length_weight:g} λ_O={proxy.odin_ortho_weight:g}"
        return "ODIN (quality head)" + weights
    if t == "inform":
        return f"InfoRM β={proxy.ib_beta:g}, {proxy.ib_dim}-dim latent"
    if t == "ensemble":
        combine = f"uwo λ={proxy.uwo_lambda:g}" if proxy.combine == "uwo" else proxy.combine
        # the members' type-specific fields live on the ensemble's entry (`used_fields`)
        return f"ensemble ({combine}) of {proxy.members}{_describe_members(proxy)}"
    if t == "warm":
        return f"WARM of {proxy.members}{_describe_members(proxy)}"
    if t == "checkpoint":
        return f"checkpoint {str(proxy.path).rstrip('/').split('/')[-1]}"
    return t


def _as_type(proxy, proxy_type: str):
    """A view of `proxy` with another type (a composite's member type), its other fields unchanged."""
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(proxy), "type": proxy_type})


def describe_proxy(proxy, training=None) -> str:
    """A proxy in words, for legends and tables: its type and the fields that make it what it is ("GRM-SFT α=0.01",
    "BT", "BT, centred c=0.01", "label smoothing ε=0.1", "ensemble (mean) of 3", "WARM of 3"), then what its
    training settings `training` (resolved, an `RMTrainingConfig`; None: not stated) change from full fine-tuning on
    every training pair: ", LoRA r=8", ", 300 pairs", ", clean labels". A checkpoint is not trained here, so no
    training settings are stated for it."""
    text = _describe_type(proxy)
    if training is None or proxy.type == "checkpoint":
        return text
    if training.lora is not None:
        text += f", LoRA r={training.lora.r}"
    if training.n_train_pairs is not None:
        text += f", {training.n_train_pairs} pairs"
    if training.labels == "clean":
        text += ", clean labels"
    return text
