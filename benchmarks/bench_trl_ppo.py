"""TRL 1.12's PPOTrainer (its last release with one) on overopt's tiny policy, for `bench_ppo.py` to compare against.

    OMP_NUM_THREADS=1 TRL_PYTHON benchmarks/bench_trl_ppo.py POLICY_DIR STEPS [--prompt-ids FILE]
        [--rollouts 64] [--minibatches 4] [--epochs 4] [--response-length 16]

Runs in its own virtual environment (never imported by overopt), e.g.

    python3 -m venv /work/trl112-venv && /work/trl112-venv/bin/pip install torch==2.13.0 && \
        /work/trl112-venv/bin/pip install trl==1.12.0 transformers==5.24.0

The job is overopt's PPO benchmark's: `--rollouts` rollouts per update (one process), `--epochs` PPO epochs over
`--minibatches` minibatches each, one optimizer step per minibatch, `--response-length` new tokens; the tiny base
policy as policy and reference, sequence-classification copies of it as reward and value models (their score heads
untrained: the timing does not depend on what they say). `--prompt-ids` is a JSON list of query token-id lists
(`bench_ppo.py` writes overopt's own PPO queries there, so both train on the same prompts); without it, made-up chat
prompts. Threads: `OMP_NUM_THREADS`, 1 when unset, the rule of overopt's stage.

How TRL 1.12 maps its arguments onto that job (trl/experimental/ppo/ppo_trainer.py, `PPOTrainer.__init__` and
`train`): rollouts per update = `batch_size` = `per_device_train_batch_size` × `gradient_accumulation_steps` ×
processes; a minibatch is `batch_size / num_mini_batches`; each minibatch is cut into micro-batches of
`per_device_train_batch_size`, and `optimizer.step()` runs inside `accelerator.accumulate`, which steps only on every
`gradient_accumulation_steps`-th micro-batch. So one optimizer step per minibatch of 16 out of 64 rollouts needs
`per_device_train_batch_size=64, gradient_accumulation_steps=1, num_mini_batches=4`. (16 × 4 accumulation steps
with 4 minibatches also gives minibatches of 16, but accelerate's counter would then step the optimizer only on
every 4th of them; 16 × 1 with 4 minibatches, this script's old setting, trains 16 rollouts per update in
minibatches of 4.)

The shape is measured, not assumed: optimizer steps are counted by a torch optimizer-step hook, the samples each
training forward sees by a forward hook, rollouts per update from TRL's episode counter. Prints one JSON line: the
shape, episodes/s over the whole `train()` call, and the steady rate over updates 3 to the last (as bench_ppo.py
counts overopt's; over updates 2.. when there are only 2). A measured shape that differs from the requested one is
reported on stderr as MISMATCH (bench_ppo.py then prints no ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def made_up_prompt_ids(tok, n: int) -> list[list[int]]:
    """Chat prompts of the tiny world's kind, at least `n` of them (TRL's dataloader drops a ragged last batch: fewer
    prompts than rollouts per update would leave it with no batch at all)."""
    things = ("fruits", "animals", "colors", "tools", "vegetables", "instruments", "sports", "countries")
    prompts = [[{"role": "user", "content": f"list {k} {c}"}] for k in range(1, n // len(things) + 2) for c in things]
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
    return [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy_dir")
    parser.add_argument("steps", type=int, help="updates (rollout batches)")
    parser.add_argument("--prompt-ids", default=None)
    parser.add_argument("--rollouts", type=int, default=64, help="rollouts per update")
    parser.add_argument("--minibatches", type=int, default=4, help="minibatches (optimizer steps) per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per update")
    parser.add_argument("--response-length", type=int, default=16)
    a = parser.parse_args(argv)

    from datasets import Dataset
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))  # as overopt's stage does
    tok = AutoTokenizer.from_pretrained(a.policy_dir)
    if a.prompt_ids:
        with open(a.prompt_ids) as f:
            ids = [list(map(int, row)) for row in json.load(f)]
    else:
        ids = made_up_prompt_ids(tok, a.rollouts)
    if len(ids) < a.rollouts:  # see made_up_prompt_ids
        ids = (ids * (a.rollouts // len(ids) + 1))[:max(a.rollouts, len(ids))]
    data = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(a.policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(a.policy_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(a.policy_dir, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(a.policy_dir, num_labels=1)

    update_times: list[float] = []
    episodes: list[int] = []
    count = {"optimizer_steps": 0, "trained_samples": 0}
    threads: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # TRL's PPO calls it once per update (rollout batch)
            update_times.append(time.perf_counter())
            episodes.append(state.episode)
            threads.append(torch.get_num_threads())

    def count_step(optimizer, args, kwargs):  # every real parameter update, whichever wrapper calls it
        count["optimizer_steps"] += 1

    def count_samples(module, args, kwargs):  # training forwards only: rollout, reference and value passes are no-grad
        if torch.is_grad_enabled():
            count["trained_samples"] += int(kwargs["input_ids"].shape[0])

    with tempfile.TemporaryDirectory() as out:
        # per_device_train_batch_size × gradient_accumulation_steps × processes = rollouts per update; see the top
        args = PPOConfig(output_dir=out, per_device_train_batch_size=a.rollouts, gradient_accumulation_steps=1,
                         num_mini_batches=a.minibatches, num_ppo_epochs=a.epochs, total_episodes=a.rollouts * a.steps,
                         response_length=a.response_length, local_rollout_forward_batch_size=a.rollouts,
                         temperature=1.0, stop_token="eos", kl_coef=0.0, learning_rate=3e-4,
                         num_sample_generations=0, report_to=[], save_strategy="no", logging_steps=1000,
                         use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=data, value_model=value, callbacks=[Clock()])
        step_hook = register_optimizer_step_post_hook(count_step)
        forward_hook = trainer.model.register_forward_pre_hook(count_samples, with_kwargs=True)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        step_hook.remove()
        forward_hook.remove()

    updates = len(update_times)
    per_update = [after - before for before, after in zip([0] + episodes, episodes)]
    shape = {"rollouts_per_update": per_update[0] if len(set(per_update)) == 1 else per_update,
             "minibatch_size": count["trained_samples"] / count["optimizer_steps"],
             "optimizer_steps_per_update": count["optimizer_steps"] / updates,
             "epochs": count["trained_samples"] / sum(per_update),
             "response_length": args.response_length, "processes": args.world_size,
             "threads": threads[0] if len(set(threads)) == 1 else threads}
    for key in ("minibatch_size", "optimizer_steps_per_update", "epochs"):
        if float(shape[key]).is_integer():
            shape[key] = int(shape[key])
    requested = {"rollouts_per_update": a.rollouts, "minibatch_size": a.rollouts // a.minibatches,
                 "optimizer_steps_per_update": a.epochs * a.minibatches, "epochs": a.epochs,
                 "response_length": a.response_length, "processes": 1}
    wrong = {k: (shape[k], v) for k, v in requested.items() if shape[k] != v}
    if wrong:
        print("MISMATCH: TRL ran another job than requested (measured, requested): "
              + ", ".join(f"{k} {m} vs {r}" for k, (m, r) in wrong.items()), file=sys.stderr)
    trl_config = {k: getattr(args, k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                "num_mini_batches", "num_ppo_epochs", "world_size",
                                                "local_batch_size", "batch_size", "mini_batch_size",
                                                "local_mini_batch_size", "num_total_batches")}
    # steady state as bench_ppo.py counts overopt's: updates 3.. (the span from the end of update 2 to the last end)
    first = 1 if updates > 2 else 0
    steady = sum(per_update[first + 1:]) / (update_times[-1] - update_times[first]) if updates > 1 else float("nan")
    print(json.dumps({"shape": shape, "trl_config": trl_config, "prompts": len(ids), "updates": updates,
                      "episodes_per_s": sum(per_update) / wall, "episodes_per_s_steady": steady}))


if __name__ == "__main__":
    main()
