"""distributed_smoke: proves the multi-process path — a few DeepSpeed ZeRO steps on a tiny causal LM under accelerate.

Runs on every rank (launched by `pipeline.runner.launch_stage` with `--use_deepspeed --deepspeed_config_file ...`).
A randomly initialised Llama (built from a config, nothing downloaded) trains for `cfg.steps` optimizer steps on
synthetic token sequences (arithmetic progressions modulo the vocabulary, so the loss has something to learn), with a
plain `torch.optim.AdamW` created here and handed to DeepSpeed through `accelerator.prepare`.

Rank 0 writes:
  metrics.json  world size, the ZeRO stage of the engine actually in use, per-step losses (mean over ranks), finiteness,
                the trained model's loss on a fixed probe batch (`probe_tokens`)
  model/        the trained weights, gathered from every rank (`accelerator.get_state_dict`, so ZeRO-3 works too),
                saved with `save_pretrained` (safetensors; loadable with AutoModelForCausalLM)
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from pipeline.config import DistributedSmokeConfig
from pipeline.distributed import make_accelerator

VERSION = "1"
log = logging.getLogger("overopt")

VOCAB = 64
SEQ_LEN = 16
MICRO_BATCH = 4  # per process; DeepSpeed's "auto" batch sizes are filled from the dataloader
LR = 3e-3


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN * 2,
                       bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)


def synthetic_tokens(n: int, seed: int) -> torch.Tensor:
    """`n` sequences x_t = (a + b t) mod VOCAB with random a, b: learnable, and identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, VOCAB, (n, 1), generator=g)
    b = torch.randint(1, 8, (n, 1), generator=g)
    return (a + b * torch.arange(SEQ_LEN)) % VOCAB


def probe_tokens(seed: int) -> torch.Tensor:
    """A fixed evaluation batch, disjoint in seed from the training data."""
    return synthetic_tokens(8, seed + 1_000_003)


def _ds_summary(ds_config: dict) -> dict:
    zero = ds_config.get("zero_optimization", {})
    return {
        "zero_stage": zero.get("stage"),
        "train_batch_size": ds_config.get("train_batch_size"),
        "train_micro_batch_size_per_gpu": ds_config.get("train_micro_batch_size_per_gpu"),
        "gradient_accumulation_steps": ds_config.get("gradient_accumulation_steps"),
        "gradient_clipping": ds_config.get("gradient_clipping"),
        "bf16": ds_config.get("bf16", {}).get("enabled"),
        "fp16": ds_config.get("fp16", {}).get("enabled"),
    }


def run(cfg: DistributedSmokeConfig, inputs: dict[str, Path], out: Path) -> None:
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM

    # The DeepSpeed plugin comes from `accelerate launch --use_deepspeed --deepspeed_config_file` (env vars).
    accelerator = make_accelerator(require_deepspeed=True)
    set_seed(cfg.seed)

    # Under ZeRO-3 transformers builds the model inside deepspeed.zero.Init (parameters partitioned at creation).
    model = AutoModelForCausalLM.from_config(tiny_llama_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    data = synthetic_tokens(cfg.steps * MICRO_BATCH * accelerator.num_processes, cfg.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=MICRO_BATCH, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    losses: list[float] = []
    model.train()
    for step, (input_ids,) in enumerate(loader):
        if step >= cfg.steps:
            break
        loss = model(input_ids=input_ids, labels=input_ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = accelerator.reduce(loss.detach().float(), reduction="mean").item()
        losses.append(mean_loss)
        if accelerator.is_main_process:
            log.info("  distributed_smoke step %d/%d  loss %.4f", step + 1, cfg.steps, mean_loss)
    if len(losses) != cfg.steps:
        raise RuntimeError(f"ran {len(losses)} steps, expected {cfg.steps}")

    # Loss of the trained model on a fixed probe batch (every rank: under ZeRO-3 the forward gathers parameters), so a
    # reader of the saved model can check it holds the trained weights.
    model.eval()
    probe = probe_tokens(cfg.seed).to(accelerator.device)
    with torch.no_grad():
        probe_loss = accelerator.reduce(model(input_ids=probe, labels=probe).loss.detach().float(), "mean").item()

    # Collective under ZeRO-3 (every rank gathers its shards), a plain copy otherwise: all ranks must call it.
    state_dict = accelerator.get_state_dict(model)
    ds_config = accelerator.deepspeed_config
    if accelerator.is_main_process:
        n_parameters = sum(t.numel() for t in state_dict.values())  # before saving: save_pretrained may consume it
        out.mkdir(parents=True, exist_ok=True)
        accelerator.unwrap_model(model).save_pretrained(out / "model", state_dict=state_dict, is_main_process=True)
        metrics = {
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type.value),
            "device": str(accelerator.device),
            "zero_stage": int(model.zero_optimization_stage()),  # of the engine in use, not just the file
            "deepspeed_config_file": os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"),
            "deepspeed": _ds_summary(ds_config),
            "steps": cfg.steps,
            "seed": cfg.seed,
            "losses": losses,
            "loss_finite": all(math.isfinite(x) for x in losses),
            "probe_loss": probe_loss,
            "n_parameters": n_parameters,
        }
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()  # no rank leaves (and the launcher returns) before rank 0 has written
    accelerator.end_training()
