"""overopt's shared code: config, runner and cache, models, scoring, sampling, best-of-n, PPO."""

import os

# Per-file "Loading weights" / "Writing model shards" bars from transformers and the hub drown a stage's own log
# (a stage logs what it loads). A user who wants them sets HF_HUB_DISABLE_PROGRESS_BARS=0.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
