"""grpo[p] / rloo[p]: group-baseline RL of the base policy against the frozen proxy p, through TRL's GRPOTrainer or
RLOOTrainer, under the same `accelerate launch` + DeepSpeed as PPO.

Each step samples `group_size` completions for each of `prompts_per_step` training prompts; the proxy scores them
through the project's one scorer interface (`pipeline.scoring.TRLRewardFunction`, from token ids when the proxy shares
the policy's tokenizer), and TRL's trainer does the rest (group baseline: mean of the group for GRPO, leave-one-out
for RLOO). `rl.reward_transform` (clip, par, log_sigmoid; `pipeline.reward_transforms`, as PPO's) transforms the
proxy's rewards before TRL sees them (`TransformedReward`); par and log_sigmoid centre them on the proxy's score of one
response per prompt sampled from the initial policy in the same update, drawn from a seed of (rl.seed, update, prompt)
so that every process centres a prompt's completions on the same response. The policy is exported at the same
log-spaced steps as PPO, so `ppo_sample`, the gold stage and
`ppo_curve` serve this arm unchanged: its x-axis is the KL the pipeline measures, never TRL's logged per-token KL.

Rank 0 writes:
  exports/step_XXXXX/   the policy after that many updates (0, 1, 2, 4, ..., last; an update is one generation batch,
                        num_iterations × minibatches optimizer steps), HF save_pretrained
  metrics.jsonl         TRL's log of every optimizer step (reward, its std, KL, clip ratios, completion length, ...);
                        with a reward transform TRL's `reward` is the transformed one, `score_raw` the proxy's raw
                        score and (par, log_sigmoid) `score_reference` the reference responses'
  summary.json          the algorithm, world size, ZeRO stage, prompts, exports
Not resumable: a killed run starts again (TRL's own checkpointing would need its optimizer states in pickles).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline import reward_transforms
from pipeline.config import GroupRLStageConfig, RewardTransformConfig, SamplingConfig
from pipeline.distributed import frozen_model_loading, make_accelerator, trainer_precision, zero_stage
from pipeline.exports import export_policy
from pipeline.generation import stop_token_ids
from pipeline.models import build_policy, checked_local, load_causal_lm, load_tokenizer
from pipeline.ppo.rollout import proxy_scores, sample_rollout
from pipeline.records import messages, training_prompts
from pipeline.scoring import TRLRewardFunction, build_scorer
from pipeline.tokenization import as_messages, pad_token_id, prompt_ids
from pipeline.trl_runs import export_callback, write_log_history

VERSION = "1"
log = logging.getLogger("overopt")


# (chats of distinct prompts, their prompt ids, update) -> the proxy's score of one reference response to each
ReferenceScores = Callable[[list, list, int], torch.Tensor]


class TransformedReward:
    """A TRL reward function: the rewards of `raw` (the proxy's, a `TRLRewardFunction`) transformed by `transform`
    (`rl.reward_transform`) through `pipeline.reward_transforms.transform_rewards`, PPO's one implementation. For par
    and log_sigmoid, `reference(chats, prompt_ids, update)` gives the proxy's score of one reference response per
    distinct prompt of the batch; TRL calls a reward function once per generation batch (one update) on every process,
    so the calls count the updates. Logs the raw score's mean (`score_raw`) and the references' (`score_reference`)
    beside TRL's `reward`, the transformed one."""

    def __init__(self, raw, transform: RewardTransformConfig, reference: ReferenceScores | None = None):
        if transform.kind not in reward_transforms.GROUP_RL_KINDS:
            raise ValueError(f"rl.reward_transform.kind {transform.kind!r} is not for group-baseline RL (one of "
                             f"{', '.join(reward_transforms.GROUP_RL_KINDS)})")
        if transform.kind in reward_transforms.REFERENCE_TRANSFORMS and reference is None:
            raise ValueError(f"rl.reward_transform.kind {transform.kind!r} needs the reference responses' scores")
        self.raw, self.transform, self.reference = raw, transform, reference
        self.__name__ = raw.__name__
        self.updates = 0

    def __call__(self, prompts, completions, completion_ids, prompt_id=None, log_metric=None, **kwargs) -> list[float]:
        raw = torch.tensor(self.raw(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                    prompt_id=prompt_id, **kwargs), dtype=torch.float32)
        keys = list(prompt_id) if prompt_id is not None else [repr(p) for p in prompts]
        distinct = list(dict.fromkeys(keys))
        row_prompt = torch.tensor([distinct.index(k) for k in keys])
        reference = None
        if self.transform.kind in reward_transforms.REFERENCE_TRANSFORMS:
            chats = [as_messages(prompts[keys.index(k)]) for k in distinct]
            reference = torch.as_tensor(self.reference(chats, distinct, self.updates), dtype=torch.float32)[row_prompt]
        out = reward_transforms.transform_rewards(self.transform.kind, raw, reference, row_prompt, self.transform)
        self.updates += 1
        if log_metric is not None:
            log_metric("score_raw", float(raw.mean()))
            if reference is not None:
                log_metric("score_reference", float(reference.mean()))
        return [float(r) for r in out]


def reference_seed(seed: int, update: int, prompt_id) -> int:
    """The sampling seed of update `update`'s reference response to `prompt_id`: the same on every process, so the
    completions of one prompt are centred on one response wherever TRL placed them."""
    return int(np.random.SeedSequence([seed, update, zlib.crc32(str(prompt_id).encode())]).generate_state(1)[0])


def reference_scorer(ref_policy, tokenizer, scorer, scorer_name: str, sampling: SamplingConfig,
                     stop_ids: Sequence[int], seed: int) -> ReferenceScores:
    """`ReferenceScores` as PPO makes them: one response per prompt sampled from the frozen initial policy
    (`sample_rollout`, at the rollouts' sampling settings) and scored by the proxy (`proxy_scores`), each drawn from
    its own `reference_seed` in a forked RNG (TRL's sampling stream is left as it was)."""
    pad_id = pad_token_id(tokenizer)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []

    @torch.no_grad()
    def scores(chats: list, ids: list, update: int) -> torch.Tensor:
        out = []
        for chat, pid in zip(chats, ids):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(reference_seed(seed, update, pid))
                rollout = sample_rollout(ref_policy, [prompt_ids(tokenizer, chat)], sampling, pad_id, stop_ids)
            out.append(proxy_scores(scorer, tokenizer, rollout, [chat], [pid], scorer_name,
                                    where=f"reference response of update {update + 1}"))
        return torch.cat(out)

    return scores


def trl_config(cfg: GroupRLStageConfig, output_dir: str, per_device: int, accelerator=None):
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
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, **trainer_precision(accelerator),
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
    scorer = build_scorer(cfg.scorer, inputs)
    reward = TRLRewardFunction(scorer, cfg.scorer.name, tokenizer, stop_ids)
    transform = rl.reward_transform
    if transform.kind != "none":
        reference = None
        if transform.kind in reward_transforms.REFERENCE_TRANSFORMS:
            with frozen_model_loading(accelerator):  # the initial policy, whole on every rank, never trained
                ref_policy = load_causal_lm(policy_path, cfg.policy.dtype, cfg.policy.trust_remote_code)
            reference = reference_scorer(ref_policy, tokenizer, scorer, cfg.scorer.name, rl.sampling, stop_ids,
                                         rl.seed)
        reward = TransformedReward(reward, transform, reference)

    prompts = training_prompts(inputs["pairs"])
    data = Dataset.from_dict({"prompt": [messages(p) for p in prompts.prompt], "prompt_id": list(prompts.prompt_id)})
    exports = rl.export_steps()
    export_policy(policy, accelerator, tokenizer, out, 0)  # the initial policy
    per_update = rl.optimizer_steps_per_update()  # TRL counts optimizer steps; an update is `per_update` of them
    exporter = export_callback(accelerator, tokenizer, out, exports, per_update)

    trainer_class = GRPOTrainer if cfg.algo == "grpo" else RLOOTrainer
    # TRL's output_dir; nothing in it is kept. Made inside the stage's own staging folder (under the cache's .tmp/),
    # so a killed run leaves nothing in the system's temp folder: the next run sweeps .tmp/
    with tempfile.TemporaryDirectory(prefix="trl-scratch-", dir=out) as scratch:
        args = trl_config(cfg, scratch, per_device, accelerator)
        trainer = trainer_class(model=policy, reward_funcs=reward, args=args, train_dataset=data,
                                processing_class=tokenizer, callbacks=[exporter])
        trainer.train()
    if accelerator.is_main_process:
        write_log_history(trainer, out / "metrics.jsonl")
        summary = {"algo": cfg.algo, "world_size": accelerator.num_processes, "zero_stage": zero_stage(accelerator),
                   "device": str(accelerator.device), "train_prompts": len(prompts), "exports": exports,
                   "updates": rl.steps, "optimizer_steps": rl.steps * per_update, "completions_per_update": completions,
                   "torch_threads": torch.get_num_threads()}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
