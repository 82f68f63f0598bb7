"""PPO for RLHF, in pieces a reader can check one at a time.

- `core`: the pure tensor algorithm — masked statistics, KL estimators, per-token rewards, GAE, the clipped losses,
  the KL controllers, the reward transforms (clip, PAR, log-sigmoid centring, per-prompt normalisation). No models,
  no distribution beyond an optional all-reduce for whitening.
- `models`: the value model and the policy+value module DeepSpeed trains as one engine.
- `rollout`: sampling responses and computing their log-probs, values and masks.

`stages/ppo.py` is the training loop that strings them together.
"""
