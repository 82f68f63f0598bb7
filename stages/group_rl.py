"""grpo[p] / rloo[p]: group-baseline RL of the base policy against the frozen proxy p, through TRL's GRPOTrainer or
RLOOTrainer, under the same `accelerate launch` + DeepSpeed as PPO.

Each step samples `group_size` completions for each of `prompts_per_step` training prompts; the proxy scores them
through the project's one scorer interface (`pipeline.scoring.TRLRewardFunction`, from token ids when the proxy shares
the policy's tokenizer), and TRL's trainer does the rest (group baseline: mean of the group for GRPO, leave-one-out
for RLOO). The policy is exported at the same log-spaced steps as PPO, so `ppo_sample`, the gold stage and
`ppo_curve` serve this arm unchanged: its x-axis is the KL the pipeline measures, never TRL's logged per-token KL.

Rank 0 writes:
  exports/step_XXXXX/   the policy after that many updates (0, 1, 2, 4, ..., last; an update is one generation batch,
                        num_iterations × minibatches optimizer steps), HF save_pretrained
  metrics.jsonl         TRL's log of every optimizer step (reward, its std, KL, clip ratios, completion length, ...)
  summary.json          the algorithm, world size, ZeRO stage, prompts, exports
Not resumable: a killed run starts again (TRL's own checkpointing would need its optimizer states in pickles).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from pipeline.config import GroupRLStageConfig
from pipeline.distributed import make_accelerator, zero_stage
from pipeline.generation import stop_token_ids
from pipeline.models import build_policy, checked_local, load_tokenizer
from pipeline.records import messages, training_prompts
from pipeline.scoring import TRLRewardFunction, build_scorer
from pipeline.trl_runs import export_callback, export_policy, write_log_history

VERSION = "1"
log = logging.getLogger("overopt")


def trl_config(cfg: GroupRLStageConfig, output_dir: str, per_device: int):
    """TRL's GRPOConfig or RLOOConfig from overopt's settings; everything TRL would otherwise decide is set here."""
    from trl import GRPOConfig, RLOOConfig

    rl = cfg.rl
    common = dict(
        output_dir=output_dir, max_steps=rl.steps * rl.optimizer_steps_per_update(),
        per_device_train_batch_size=per_device, gradient_accumulation_steps=1, steps_per_generation=rl.minibatches,
        num_generations=rl.group_size, max_completion_length=rl.sampling.max_new_tokens,
        temperature=rl.sampling.temperature, top_p=rl.sampling.top_p, top_k=0, learning_rate=rl.lr,
        lr_scheduler_type="constant",  # as overopt's PPO; TRL's default decays linearly to 0 over max_steps
        warmup_steps=0, weight_decay=0.0, beta=rl.beta, epsilon=rl.epsilon, num_iterations=rl.num_iterations,
        max_grad_norm=rl.max_grad_norm, seed=rl.seed, data_seed=rl.seed, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
        # the Accelerator (and its DeepSpeed plugin, with the CPU process-group backend) is made by
        # pipeline.distributed before TRL's Trainer asks for one
        accelerator_config={"use_configured_state": True})
    args = GRPOConfig(**common) if cfg.algo == "grpo" else RLOOConfig(**common)
    # TrainingArguments builds a second DeepSpeed plugin from the launcher's environment, which accelerate refuses for
    # a second Accelerator: the Trainer's Accelerator takes the configured one's
    args.deepspeed_plugin = None
    return args


def run(cfg: GroupRLStageConfig, inputs: dict[str, Path], out: Path) -> None:
    from datasets import Dataset
    from trl import GRPOTrainer, RLOOTrainer

    rl = cfg.rl
    world = int(os.environ.get("WORLD_SIZE", "1"))
    completions = rl.prompts_per_step * rl.group_size
    if completions % (world * rl.minibatches):
        raise ValueError(f"rl.prompts_per_step × rl.group_size ({completions}) must be divisible by the number of "
                         f"processes × rl.minibatches ({world} × {rl.minibatches})")
    per_device = completions // (world * rl.minibatches)  # one minibatch of one rank
    accelerator = make_accelerator(gradient_clipping=rl.max_grad_norm, micro_batch_size=per_device)

    # ---- models: the policy (TRL wraps it), the frozen proxy behind a reward function
    policy_path = checked_local(cfg.policy.model_id or inputs["policy"] / "model")
    tokenizer = load_tokenizer(policy_path, cfg.policy.trust_remote_code)
    policy = build_policy(policy_path, cfg.policy.dtype, cfg.policy.trust_remote_code)
    stop_ids = stop_token_ids(tokenizer, policy.generation_config)
    policy.generation_config.eos_token_id = stop_ids  # TRL ends a completion at these (gemma: <end_of_turn> too)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    reward = TRLRewardFunction(build_scorer(cfg.scorer, inputs), cfg.scorer.name, tokenizer, stop_ids)

    prompts = training_prompts(inputs["pairs"])
    data = Dataset.from_dict({"prompt": [messages(p) for p in prompts.prompt], "prompt_id": list(prompts.prompt_id)})
    exports = rl.export_steps()
    export_policy(policy, accelerator, tokenizer, out, 0)  # the initial policy
    per_update = rl.optimizer_steps_per_update()  # TRL counts optimizer steps; an update is `per_update` of them
    exporter = export_callback(accelerator, tokenizer, out, per_update, exports)

    trainer_class = GRPOTrainer if cfg.algo == "grpo" else RLOOTrainer
    # TRL's output_dir; nothing in it is kept. Made inside the stage's own staging folder (under the cache's .tmp/),
    # so a killed run leaves nothing in the system's temp folder: the next run sweeps .tmp/
    with tempfile.TemporaryDirectory(prefix="trl-scratch-", dir=out) as scratch:
        trainer = trainer_class(model=policy, reward_funcs=reward, args=trl_config(cfg, scratch, per_device),
                                train_dataset=data, processing_class=tokenizer, callbacks=[exporter])
        trainer.train()
    if accelerator.is_main_process:
        write_log_history(trainer, out / "metrics.jsonl")
        summary = {"algo": cfg.algo, "world_size": accelerator.num_processes, "zero_stage": zero_stage(accelerator),
                   "device": str(accelerator.device), "train_prompts": len(prompts), "exports": exports,
                   "updates": rl.steps, "optimizer_steps": rl.steps * per_update, "completions_per_update": completions,
                   "torch_threads": torch.get_num_threads()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
