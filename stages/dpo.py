"""dpo[p]: direct preference optimisation of the base policy on the study's gold-labelled pairs, through TRL 1.16's
DPOTrainer, under the same launcher (inline, or `accelerate launch` + DeepSpeed) as the RL arms.

The pairs are the ones every proxy trains on (`pipeline.preference_pairs.training_pairs`: the train split, the label
column `labels`, the `n_train_pairs` budget), tokenized by the proxies' own path (`PairDataset`: one chat-template
encoding per side, a pair longer than `max_length` dropped rather than truncated), so TRL's tokenization is skipped: the
trainer receives prompt / chosen / rejected token ids. The reference is a frozen copy of the base policy. With
TRL's loss "sigmoid" the loss of a batch of B pairs is

    L = −mean log σ(β · ((log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))))

with log π(y) summed over the response tokens (the template's end-of-turn tokens included). No proxy is in the loop:
the run is keyed by a proxy only so its evaluation stages (dpo_sample, dpo_gold, dpo_curve) can score its samples and
draw it beside that proxy's best-of-n curve. The policy is exported at optimizer steps 0, 1, 2, 4, ..., last
(`pipeline.trl_runs`), so `ppo_sample` measures its KL to the initial policy like every RL arm's.

Rank 0 writes:
  exports/step_XXXXX/   the policy after that many optimizer steps, HF save_pretrained
  metrics.jsonl         TRL's log of every optimizer step (loss, rewards/chosen, rewards/margins, accuracies,
                        logps, ...)
  summary.json          world size, ZeRO stage, pairs used and dropped, optimizer steps, exports
Not resumable: a killed run starts again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from pipeline.config import DPOStageConfig
from pipeline.distributed import make_accelerator, trainer_precision, zero_stage
from pipeline.exports import export_policy
from pipeline.models import build_policy, checked_local, load_tokenizer
from pipeline.preference_pairs import PairDataset, training_pairs
from pipeline.records import PAIR_COLUMNS, read_records
from pipeline.trl_runs import export_callback, write_log_history

VERSION = "1"
log = logging.getLogger("overopt")


def preference_rows(dataset: PairDataset) -> dict[str, list[list[int]]]:
    """TRL's tokenized preference columns (prompt_ids, chosen_ids, rejected_ids) from encoded pairs: both sides of a
    pair render the same prompt, so the prompt is the tokens before the response."""
    rows: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i, (c, j, _) in enumerate(dataset.items):
        start = min(c.response_start, j.response_start)
        if c.input_ids[:start] != j.input_ids[:start] or c.response_start != j.response_start:
            raise ValueError(f"training pair {i}: the chosen and rejected sides tokenize the prompt differently")
        rows["prompt_ids"].append(c.input_ids[:start])
        rows["chosen_ids"].append(c.input_ids[start:])
        rows["rejected_ids"].append(j.input_ids[start:])
    return rows


def trainer_class():
    """TRL's DPOTrainer taking an already tokenized dataset (its chat-template tokenization skipped: the pairs are
    encoded as the proxies encode them)."""
    from trl import DPOTrainer

    class TokenizedPairsDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return TokenizedPairsDPOTrainer


def trl_config(cfg: DPOStageConfig, output_dir: str, per_device: int, accelerator=None):
    """TRL's DPOConfig from overopt's settings; everything TRL would otherwise decide is set here."""
    from trl import DPOConfig

    d = cfg.dpo
    args = DPOConfig(
        output_dir=output_dir, num_train_epochs=d.epochs, max_steps=d.steps or -1,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=1, learning_rate=d.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=d.max_grad_norm,
        beta=d.beta, loss_type=[d.loss_type], max_length=d.max_length, precompute_ref_log_probs=False,
        seed=d.seed, data_seed=d.seed, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, **trainer_precision(accelerator),  # bf16/fp16 as the DeepSpeed config says
        # the Accelerator (and its DeepSpeed plugin) is made by pipeline.distributed before the Trainer asks for one
        accelerator_config={"use_configured_state": True})
    args.deepspeed_plugin = None  # as in stages.group_rl: the Trainer's Accelerator takes the configured one's
    return args


def build_trainer(cfg: DPOStageConfig, inputs: dict[str, Path], scratch: str, accelerator, per_device: int,
                  callbacks=()):
    """The DPO trainer of a run: the base policy (trained), its frozen copy (the reference), the training pairs.
    Returns (trainer, tokenizer, encoded pairs)."""
    from datasets import Dataset

    policy_path = checked_local(cfg.policy.model_id or inputs["policy"] / "model")
    tokenizer = load_tokenizer(policy_path, cfg.policy.trust_remote_code)
    pairs = read_records(inputs["pairs"] / "pairs.parquet", PAIR_COLUMNS)
    encoded = PairDataset(training_pairs(pairs, cfg.labels, cfg.n_train_pairs), tokenizer, cfg.dpo.max_length, 0.0)
    if len(encoded) == 0:
        raise ValueError(f"dpo: no training pair fits dpo.max_length={cfg.dpo.max_length}")
    policy = build_policy(policy_path, cfg.policy.dtype, cfg.policy.trust_remote_code)
    reference = build_policy(policy_path, cfg.policy.dtype, cfg.policy.trust_remote_code).eval().requires_grad_(False)
    trainer = trainer_class()(model=policy, ref_model=reference, args=trl_config(cfg, scratch, per_device, accelerator),
                              train_dataset=Dataset.from_dict(preference_rows(encoded)), processing_class=tokenizer,
                              callbacks=list(callbacks))
    return trainer, tokenizer, encoded


def run(cfg: DPOStageConfig, inputs: dict[str, Path], out: Path) -> None:
    d = cfg.dpo
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if d.batch_size % world:
        raise ValueError(f"dpo.batch_size ({d.batch_size}) must be divisible by the number of processes ({world})")
    per_device = d.batch_size // world
    accelerator = make_accelerator(gradient_clipping=d.max_grad_norm, micro_batch_size=per_device)
    # TRL's output_dir; nothing in it is kept (made inside the stage's staging folder, as in stages.group_rl)
    with tempfile.TemporaryDirectory(prefix="trl-scratch-", dir=out) as scratch:
        trainer, tokenizer, encoded = build_trainer(cfg, inputs, scratch, accelerator, per_device)
        export_policy(accelerator.unwrap_model(trainer.model), accelerator, tokenizer, out, 0)  # the initial policy
        exporter = export_callback(accelerator, tokenizer, out, d.export_steps(len(encoded)))  # plan's schedule too
        trainer.add_callback(exporter)
        trainer.train()
    if accelerator.is_main_process:
        write_log_history(trainer, out / "metrics.jsonl")
        summary = {"algo": "dpo", "loss_type": d.loss_type, "beta": d.beta, "labels": cfg.labels,
                   "world_size": accelerator.num_processes, "zero_stage": zero_stage(accelerator),
                   "device": str(accelerator.device), "train_pairs": len(encoded),
                   "dropped_over_length": encoded.dropped, "optimizer_steps": trainer.state.global_step,
                   "pairs_per_step": d.batch_size, "exports": exporter.units, "torch_threads": torch.get_num_threads()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("  dpo: %d pairs (%d over length dropped), %d optimizer steps, exports %s", len(encoded),
                 encoded.dropped, trainer.state.global_step, exporter.units)
    accelerator.wait_for_everyone()
