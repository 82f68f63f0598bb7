"""sft_policy: the tiny world's base policy — a small Llama pretrained on the clean corpus, then SFT'd on flawed
demonstrations. Saved with `save_pretrained` (loadable with AutoModelForCausalLM) next to its tokenizer.

Writes model/ (weights + tokenizer), train_log.json (losses), metrics.json (well-formed rate and mean gold of samples
on the held-out evaluation prompts at temperature 1).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline import world as W
from pipeline.config import PolicyConfig, SamplingConfig, TrainLoopConfig
from pipeline.generation import sample_responses
from pipeline.models import load_tokenizer, tiny_llama_config
from pipeline.records import messages
from pipeline.tokenization import ConversationEncoder, collate, pad_token_id

VERSION = "1"
log = logging.getLogger("overopt")


def _train(model, tokenizer, frame: pd.DataFrame, loop: TrainLoopConfig, seed: int, desc: str) -> list[float]:
    """Next-token loss on response tokens only (prompt and padding masked)."""
    from transformers import get_cosine_schedule_with_warmup

    encoded = ConversationEncoder(tokenizer, max_length=64).encode([messages(p) for p in frame.prompt],
                                                                   frame.response.tolist())
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(loop.warmup_ratio * loop.steps), loop.steps)
    rng = np.random.default_rng(seed)
    pad = pad_token_id(tokenizer)
    losses = []
    model.train()
    for _ in tqdm(range(loop.steps), desc=desc, leave=False):
        batch = collate([encoded[i] for i in rng.integers(0, len(encoded), loop.batch_size)], pad)
        labels = batch["input_ids"].masked_fill(batch["response_mask"] == 0, -100)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def policy_sample_quality(model, tokenizer, prompts: list, n: int, seed: int) -> dict:
    """Well-formed rate (finished, non-empty, only item words) and mean gold of samples at temperature 1."""
    rows = sample_responses(model, tokenizer, prompts, n, SamplingConfig(temperature=1.0), seed)
    texts = [messages(prompts[r["prompt_index"]])[-1]["content"] for r in rows]
    gold = [W.gold_reward(t, r["response"]) for t, r in zip(texts, rows)]
    well = [bool(r["finished"] and r["response"]) and all(w in W.ITEM_CATEGORY for w in r["response"].split())
            for r in rows]
    best = [W.parse_prompt(t).k for t in texts]
    return {"n_samples": len(rows), "well_formed_rate": float(np.mean(well)), "mean_gold": float(np.mean(gold)),
            "best_achievable_mean_gold": float(np.mean(best)),
            "mean_length": float(np.mean([r["n_tokens"] for r in rows]))}


def run(cfg: PolicyConfig, inputs: dict[str, Path], out: Path) -> None:
    from transformers import LlamaForCausalLM

    world = inputs["world"]
    tokenizer = load_tokenizer(world / "tokenizer")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    config = tiny_llama_config(cfg, tokenizer)
    model = LlamaForCausalLM(config)
    log.info("  tiny Llama: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    pretrain = pd.read_parquet(world / "pretrain.parquet")
    demos = pd.read_parquet(world / "demonstrations.parquet")
    pre_losses = _train(model, tokenizer, pretrain, cfg.pretrain, cfg.seed, "pretrain")
    eval_prompts = list(pd.read_parquet(world / "eval_prompts.parquet").prompt)
    pretrained_quality = policy_sample_quality(model, tokenizer, eval_prompts, 8, cfg.seed)
    sft_losses = _train(model, tokenizer, demos, cfg.sft, cfg.seed + 1, "sft")
    quality = policy_sample_quality(model, tokenizer, eval_prompts, 16, cfg.seed)

    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    (out / "train_log.json").write_text(json.dumps({"pretrain_loss": pre_losses, "sft_loss": sft_losses}))
    metrics = {"parameters": sum(p.numel() for p in model.parameters()), "after_pretraining": pretrained_quality,
               "base_policy": quality, "final_pretrain_loss": float(np.mean(pre_losses[-20:])),
               "final_sft_loss": float(np.mean(sft_losses[-20:]))}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("  pretrained: well-formed %.0f%%, mean gold %.2f | base policy (after SFT): well-formed %.0f%%, "
             "mean gold %.2f (best achievable %.2f)", 100 * pretrained_quality["well_formed_rate"],
             pretrained_quality["mean_gold"], 100 * quality["well_formed_rate"], quality["mean_gold"],
             quality["best_achievable_mean_gold"])
