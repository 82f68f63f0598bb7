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


PROXY_TYPES: dict[str, ProxyTypeSpec] = {s.name: s for s in (
    ProxyTypeSpec("bt", frozenset(), True, _bt),
    ProxyTypeSpec("margin", frozenset({"margin_scale"}), True, _margin),
    ProxyTypeSpec("label_smoothing", frozenset({"epsilon"}), True, _label_smoothing),
    ProxyTypeSpec("grm", frozenset({"reg", "alpha", "beta"}), True, _grm, needs_logits=True,
                  needs_reference=lambda proxy: proxy.reg == "dpo"),
    ProxyTypeSpec("frozen", frozenset(), True, _bt, frozen_backbone=True),
    # `members` copies of `member_type`; the fields that member type uses count too (see `used_fields`)
    ProxyTypeSpec("ensemble", frozenset({"members", "member_type", "combine"}), False),
    # an existing reward model (local dir or hub id): no training stage
    ProxyTypeSpec("checkpoint", frozenset({"path", "trust_remote_code", "dtype", "double_bos"}), False),
)}

ALL_TYPES: tuple[str, ...] = tuple(PROXY_TYPES)
TRAINED_TYPES: tuple[str, ...] = tuple(n for n, s in PROXY_TYPES.items() if s.trained)


def spec(proxy_type: str) -> ProxyTypeSpec:
    if proxy_type not in PROXY_TYPES:
        raise ValueError(f"unknown proxy type {proxy_type!r} (known: {', '.join(ALL_TYPES)})")
    return PROXY_TYPES[proxy_type]


def used_fields(proxy) -> set[str]:
    """The ProxyConfig fields that can change what `proxy` is (the rest are reset by `canonical`)."""
    used = set(COMMON_FIELDS) | spec(proxy.type).fields
    if proxy.type == "ensemble":  # its members inherit the fields their member_type uses
        used |= spec(proxy.member_type).fields
        used |= {"uwo_lambda"} if proxy.combine == "uwo" else set()
    return used


def training_loss(proxy, r_c, r_r, batch: dict, out, ref_model=None):
    """The loss `train_proxy` minimises for a proxy of a trained type."""
    s = spec(proxy.type)
    if not s.trained or s.loss is None:
        raise ValueError(f"proxy type {proxy.type!r} is not trained by train_proxy")
    return s.loss(proxy, r_c, r_r, batch, out, ref_model)


# How a legend or a table names a GRM regulariser (`ProxyConfig.reg`).
GRM_REGULARISERS = {"sft": "SFT", "sft_nll": "SFT-NLL", "dpo": "DPO", "dpo_noref": "DPO-noref"}


def _describe_type(proxy) -> str:
    """What a proxy's type and its type-specific fields make it, without training settings."""
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
    if t == "ensemble":
        combine = f"uwo λ={proxy.uwo_lambda:g}" if proxy.combine == "uwo" else proxy.combine
        # the members' type-specific fields live on the ensemble's entry (`used_fields`)
        member = "" if proxy.member_type == "bt" else " " + _describe_type(_as_type(proxy, proxy.member_type))
        return f"ensemble ({combine}) of {proxy.members}{member}"
    if t == "checkpoint":
        return f"checkpoint {str(proxy.path).rstrip('/').split('/')[-1]}"
    return t


def _as_type(proxy, proxy_type: str):
    """A view of `proxy` with another type (an ensemble's member type), its other fields unchanged."""
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(proxy), "type": proxy_type})


def describe_proxy(proxy, training=None) -> str:
    """A proxy in words, for legends and tables: its type and the fields that make it what it is ("GRM-SFT α=0.01",
    "BT", "label smoothing ε=0.1", "ensemble (mean) of 3"), then what its training settings `training` (resolved, an
    `RMTrainingConfig`; None: not stated) change from full fine-tuning on every training pair: ", LoRA r=8",
    ", 300 pairs", ", clean labels". A checkpoint is not trained here, so no training settings are stated for it."""
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
