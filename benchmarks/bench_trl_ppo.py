"""TRL 1.12's PPOTrainer (its last release with one) on overopt's tiny policy, for `bench_ppo.py` to compare against.

    TRL_PYTHON benchmarks/bench_trl_ppo.py POLICY_DIR STEPS

Runs in its own virtual environment (never imported by overopt), e.g.

    python3 -m venv /tmp/trl112 && /tmp/trl112/bin/pip install torch==2.13.0 && \
        /tmp/trl112/bin/pip install trl==1.12.0 transformers==5.24.0

Same shape as overopt's benchmark: 64 rollouts × 16 new tokens per update, 4 PPO epochs × 4 minibatches, one process,
the tiny base policy as policy and reference, sequence-classification copies of it as reward and value models (their
score heads untrained: the timing does not depend on what they say). Prints one JSON line: episodes/s over the whole
`train()` call, and the rate between the first and the last optimizer step (start-up left out).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch


def main(policy_dir: str, steps: int) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))  # as overopt's stage does
    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompts = [[{"role": "user", "content": f"list {k} {c}"}] for k in range(1, 6)
               for c in ("fruits", "animals", "colors", "tools", "vegetables", "instruments", "sports", "countries")]
    ids = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
    ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
    data = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    ref = AutoModelForCausalLM.from_pretrained(policy_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)

    update_times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after every optimizer step
            update_times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                         num_mini_batches=4, num_ppo_epochs=4, total_episodes=64 * steps, response_length=16,
                         local_rollout_forward_batch_size=64, temperature=1.0, stop_token="eos", kl_coef=0.0,
                         learning_rate=3e-4, num_sample_generations=0, report_to=[], save_strategy="no",
                         logging_steps=1000, use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=data, value_model=value, callbacks=[Clock()])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    # TRL counts an optimizer step (one minibatch) as a step: episodes per callback = total / callbacks
    per_call = 64 * steps / len(update_times)
    steady = (len(update_times) - 1) * per_call / (update_times[-1] - update_times[0])
    print(json.dumps({"episodes_per_s": 64 * steps / wall, "episodes_per_s_steady": steady}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
