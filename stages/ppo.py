"""ppo[p]: PPO of the base policy against the frozen proxy p, under accelerate + DeepSpeed ZeRO.

One update, as in Ziegler et al. 2019 / Stiennon et al. 2020 (details after Huang et al. 2024):

  1. rollout   each rank samples one response for each of its share of `rollout_batch_size` training prompts
  2. score     the proxy scores the responses (from token ids when it shares the policy's tokenizer) and
               `ppo.reward_transform` transforms the scores (par / log_sigmoid centre them on the proxy's score of one
               response per prompt sampled from the reference policy in the same update)
  3. forward   log-probs of the sampled tokens under the policy and the reference (= initial) policy, values
  4. rewards   −β_KL · KL per token, the proxy's score on the token that ends the turn; GAE(γ, λ) advantages,
               whitened over the whole batch across ranks
  5. update    `ppo_epochs` passes over `num_minibatches` minibatches: clipped ratio + clipped value loss

Runs on every rank (launched by the runner with `accelerate launch`, or inline in one process without DeepSpeed).
Training prompts are the prompts of the training split of the gold-labeled pairs; evaluation prompts are never seen.

Rank 0 writes:
  exports/step_XXXXX/   the policy after that many updates (log-spaced: 0, 1, 2, 4, ..., last), HF save_pretrained
                        (LoRA merged), loadable with AutoModelForCausalLM
  metrics.jsonl         one line per update: proxy score (raw, less any missing-EOS penalty), transformed score
                        (`score_transformed`; the reference responses' `score_reference` for par / log_sigmoid), KL
                        penalty, losses, clip fractions, approx-KL, entropy, response length, seconds per phase
  summary.json          settings actually used (world size, ZeRO stage), prompts, exports
Checkpoints under `resume/` (policy, value, optimizer, RNG of every rank, KL controller, reward statistics and the
metrics rows so far; `pipeline.distributed.Checkpointer`) let a killed run resume where it stopped. Update N's metrics
row is appended before checkpoint N is taken and is inside it, so a resumed run ends with the metrics of an
uninterrupted one. The last update is checkpointed too, and `resume/` is scratch (`SCRATCH`): the runner removes it
only once the artifact is committed, so a kill after the last update does not restart training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import reward_transforms
from pipeline.config import PPOConfig, PPOStageConfig
from pipeline.distributed import (
    RESUME_DIR,
    Checkpointer,
    all_reduce_sum,
    checkpoint_problem,
    frozen_model_loading,
    gathered_for_generation,
    make_accelerator,
    memory_per_rank,
    uses_deepspeed,
    zero_stage,
)
from pipeline.durable import append_jsonl, read_jsonl, write_jsonl_atomically, write_text_atomically
from pipeline.exports import EXPORTS_DIR, export_policy, export_step, list_exports
from pipeline.generation import stop_token_ids
from pipeline.models import build_policy, checked_local, load_causal_lm, load_tokenizer
from pipeline.ppo import core
from pipeline.ppo.models import PolicyAndValue, ValueModel
from pipeline.ppo.rollout import prompt_batch, proxy_scores, sample_reference_rollout, sample_rollout, sampling_seed
from pipeline.ppo.update import ppo_epochs, rollout_logprobs_values
from pipeline.records import messages, training_prompts
from pipeline.scoring import build_scorer
from pipeline.tokenization import pad_token_id, prompt_ids

VERSION = "1"
RESUMABLE = True  # resume/ survives a killed run (see pipeline.cache.ArtifactCache.staging)
SCRATCH = (RESUME_DIR,)  # resumption state, not artifact: removed by the runner after the commit
resume_problem = checkpoint_problem  # the runner sets aside a partial output whose checkpoint cannot be resumed
log = logging.getLogger("overopt")


def value_source(cfg: PPOStageConfig, inputs: dict[str, Path], policy_path: str) -> str:
    """The directory the value model's decoder comes from: the initial policy, or the proxy's backbone."""
    if cfg.ppo.value_init == "policy":
        return policy_path
    proxy = cfg.scorer.proxy
    if proxy.type == "checkpoint":
        return proxy.path
    return str((inputs["member0"] if proxy.type == "ensemble" else inputs["model"]) / "model")


def kl_controller(ppo: PPOConfig) -> core.FixedKLController:
    if ppo.adaptive_kl is not None:
        return core.AdaptiveKLController(ppo.kl_coef, ppo.adaptive_kl.target, ppo.adaptive_kl.horizon)
    return core.FixedKLController(ppo.kl_coef)


# ------------------------------------------------------------------------------------------------------ the loop


def run(cfg: PPOStageConfig, inputs: dict[str, Path], out: Path) -> None:
    from accelerate.utils import set_seed

    ppo, transform = cfg.ppo, cfg.ppo.reward_transform
    needs_reference = transform.kind in reward_transforms.REFERENCE_TRANSFORMS
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ppo.rollout_batch_size % world:
        raise ValueError(f"ppo.rollout_batch_size ({ppo.rollout_batch_size}) must be divisible by the number of "
                         f"processes ({world})")
    local_batch = ppo.rollout_batch_size // world
    minibatch = local_batch // ppo.num_minibatches
    accelerator = make_accelerator(gradient_clipping=ppo.max_grad_norm, micro_batch_size=minibatch,
                                   log_with=list(ppo.report_to), project_dir=str(out / "tracking"))
    rank, main = accelerator.process_index, accelerator.is_main_process
    all_reduce = all_reduce_sum(accelerator)
    use_deepspeed = uses_deepspeed(accelerator)

    # ---- models: the trained policy + value (one engine), and the frozen reference policy and proxy
    policy_path = checked_local(cfg.policy.model_id or inputs["policy"] / "model")
    tokenizer = load_tokenizer(policy_path, cfg.policy.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    set_seed(ppo.seed)  # the value head's initialisation: identical on every rank
    policy = build_policy(policy_path, cfg.policy.dtype, cfg.policy.trust_remote_code, ppo.lora)
    stop_ids = stop_token_ids(tokenizer, getattr(policy, "generation_config", None))
    value = ValueModel.from_pretrained(value_source(cfg, inputs, policy_path), cfg.policy.dtype,
                                       cfg.policy.trust_remote_code)
    model = PolicyAndValue(policy, value)
    model.eval()  # dropout off throughout: the update's log-probs must be those of the policy that sampled
    with frozen_model_loading(accelerator):
        scorer = build_scorer(cfg.scorer, inputs)
        # with LoRA the reference is the policy with its adapters switched off: no second copy of the weights
        ref_policy = None if ppo.lora is not None else load_causal_lm(policy_path, cfg.policy.dtype,
                                                                      cfg.policy.trust_remote_code)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ppo.lr, eps=1e-5,
                                  weight_decay=ppo.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    prompts = training_prompts(inputs["pairs"])
    chats = [messages(p) for p in prompts.prompt]
    query_rows = [prompt_ids(tokenizer, chat) for chat in chats]
    controller, normaliser = kl_controller(ppo), core.RewardNormaliser(ppo.reward_norm)
    exports = ppo.export_steps()
    (out / EXPORTS_DIR).mkdir(parents=True, exist_ok=True)
    metrics_file = out / "metrics.jsonl"

    # ---- resume from the last checkpoint of a killed run, or start afresh
    checkpointer = Checkpointer(out, accelerator, model, optimizer)
    state = checkpointer.load()
    if state is not None:
        start, rows = state["step"], state["metrics"]
        controller.load_state_dict(state["kl_controller"])
        normaliser.load_state_dict(state["reward_norm"])
        if main:
            log.info("  resuming PPO from its checkpoint at update %d", start)
            on_disk = read_jsonl(metrics_file)  # warns about a torn last line
            if [r["step"] for r in on_disk[:start]] != list(range(1, start + 1)):
                log.warning("  %s held %d row(s) up to update %d; rewritten from the checkpoint's own record",
                            metrics_file, len(on_disk), start)
            write_jsonl_atomically(metrics_file, rows)  # the checkpoint's rows are the record
            for d in list_exports(out):
                if export_step(d) > start:
                    shutil.rmtree(d)
    else:
        start, rows = 0, []
        torch.manual_seed(sampling_seed(ppo.seed, rank))  # each rank draws its own rollouts
        if main:  # whatever a run killed before its first checkpoint left
            checkpointer.clear()
            shutil.rmtree(out / EXPORTS_DIR)
            (out / EXPORTS_DIR).mkdir()
            write_jsonl_atomically(metrics_file, [])
        accelerator.wait_for_everyone()
        export_policy(accelerator.unwrap_model(model).policy, accelerator, tokenizer, out, 0)
    accelerator.wait_for_everyone()
    if ppo.report_to:
        accelerator.init_trackers("overopt-ppo")  # needs Accelerator(log_with=...); see make_accelerator

    for step in range(start, ppo.steps):
        t0 = time.perf_counter()
        timing = {}
        # 1. rollout: this rank's share of the global batch; for par / log_sigmoid also one response per distinct
        #    prompt from the reference policy, the centre of that prompt's transform
        batch = prompt_batch(step, len(prompts), ppo.rollout_batch_size, ppo.seed,
                             transform.rollouts_per_prompt)[rank * local_batch:(rank + 1) * local_batch]
        distinct, row_prompt = np.unique(batch, return_inverse=True)
        with torch.no_grad(), gathered_for_generation(model, accelerator) as unwrapped:
            rollout = sample_rollout(unwrapped.policy, [query_rows[i] for i in batch], ppo.sampling, pad_id, stop_ids)
            ref_rollout = sample_reference_rollout(ref_policy, unwrapped.policy, [query_rows[i] for i in distinct],
                                                   ppo.sampling, pad_id, stop_ids) if needs_reference else None
        timing["rollout"] = time.perf_counter() - t0

        # 2. score with the frozen proxy, transform, penalise a missing EOS, normalise
        t = time.perf_counter()
        raw = proxy_scores(scorer, tokenizer, rollout, [chats[i] for i in batch],
                           [prompts.prompt_id[i] for i in batch], cfg.scorer.name,
                           where=f"rollout of PPO update {step + 1}")
        reference = None if ref_rollout is None else proxy_scores(
            scorer, tokenizer, ref_rollout, [chats[i] for i in distinct], [prompts.prompt_id[i] for i in distinct],
            cfg.scorer.name, where=f"reference responses of PPO update {step + 1}")[torch.as_tensor(row_prompt)]
        transformed = reward_transforms.transform_rewards(transform.kind, raw, reference, torch.as_tensor(batch),
                                                          transform)
        penalty = 0.0 if ppo.missing_eos_penalty is None else ppo.missing_eos_penalty * (~rollout.finished).float()
        scores = raw - penalty
        normalised = normaliser(transformed - penalty, all_reduce)
        timing["score"] = time.perf_counter() - t

        # 3. log-probs (policy, reference) and values of the sampled tokens
        t = time.perf_counter()
        ids, attn = rollout.input_ids.to(device), rollout.attention_mask.to(device)
        responses, mask = rollout.response_ids.to(device), rollout.response_mask.to(device).float()
        Q = rollout.context_length
        logprobs, ref_logprobs, values = rollout_logprobs_values(
            model, ref_policy, ids, attn, responses, Q, ppo.sampling.temperature, minibatch,
            disable_adapter=accelerator.unwrap_model(model).policy.disable_adapter if ref_policy is None else None)
        timing["forward"] = time.perf_counter() - t

        # 4. per-token rewards, advantages, returns
        kl = core.kl_per_token(logprobs, ref_logprobs, ppo.kl_estimator) * mask
        rewards = core.token_rewards(normalised.to(device), kl, mask, controller.value)
        advantages, returns = core.gae(rewards, values, mask, ppo.gamma, ppo.lam)
        advantages = core.masked_whiten(advantages, mask, all_reduce)

        # 5. PPO epochs over minibatches
        t = time.perf_counter()
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([ppo.seed, step]).generate_state(1)[0]))
        stats = ppo_epochs(model, optimizer, accelerator, ids, attn, responses, mask, logprobs, values, advantages,
                           returns, Q, ppo, generator, all_reduce, clip_grad=not use_deepspeed)
        timing["update"] = time.perf_counter() - t

        # 6. metrics over every rank, the KL controller, exports and checkpoints
        seq_kl = (core.kl_per_token(logprobs, ref_logprobs, "k1") * mask).sum(1)
        local_means = torch.tensor([scores.mean(), transformed.mean(), normalised.mean(), seq_kl.mean(),
                                    (kl.sum(1)).mean(), mask.sum(1).mean(), rollout.finished.float().mean(),
                                    *stats.values()], dtype=torch.float64, device=device)
        means = (all_reduce(local_means) / accelerator.num_processes).tolist()
        record = {"step": step + 1, "episodes": (step + 1) * ppo.rollout_batch_size, "score": means[0],
                  "score_transformed": means[1], "score_normalised": means[2], "kl_seq_k1": means[3],
                  "kl_penalty": -controller.value * means[4], "kl_coef": controller.value,
                  "response_length": means[5], "finished_rate": means[6], **dict(zip(stats, means[7:])),
                  **{f"time_{k}_s": round(v, 4) for k, v in timing.items()}}
        if reference is not None:  # every rank holds the same number of rows, so the mean of means is the mean
            ref_mean = all_reduce(reference.mean().double().reshape(1).to(device)) / accelerator.num_processes
            record["score_reference"] = float(ref_mean[0])
        controller.update(record["kl_seq_k1"], ppo.rollout_batch_size)
        t = time.perf_counter()
        if step + 1 in exports:
            export_policy(accelerator.unwrap_model(model).policy, accelerator, tokenizer, out, step + 1)
        record["time_export_s"] = round(time.perf_counter() - t, 4)
        record["time_total_s"] = round(time.perf_counter() - t0, 4)
        rows.append(record)
        if main:  # durable before checkpoint N, which holds it too
            append_jsonl(metrics_file, record)
            log.info("  ppo %d/%d  proxy %.3f  KL %.3f  entropy %.3f  length %.1f  (%.2fs)", step + 1, ppo.steps,
                     record["score"], record["kl_seq_k1"], record["entropy"], record["response_length"],
                     record["time_total_s"])
        if (step + 1) % ppo.checkpoint_every == 0 or step + 1 in exports:  # the last update is an export
            checkpointer.save({"step": step + 1, "kl_controller": controller.state_dict(),
                               "reward_norm": normaliser.state_dict(), "metrics": rows})
        if ppo.report_to:
            accelerator.log(record, step=step + 1)

    per_rank = memory_per_rank(model, optimizer, accelerator)  # a collective: every rank
    if main:
        summary = {"world_size": accelerator.num_processes, "zero_stage": zero_stage(accelerator),
                   "deepspeed": use_deepspeed, "device": str(device), "train_prompts": len(prompts),
                   "exports": exports, "steps": ppo.steps, "episodes": ppo.steps * ppo.rollout_batch_size,
                   "per_rank": per_rank}
        write_text_atomically(out / "summary.json", json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    if ppo.report_to:
        accelerator.end_training()
