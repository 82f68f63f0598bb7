"""warm_average[name]: a warm proxy's one model, the uniform average of its members' weights (Ramé et al. 2024, WARM).

The members (`train_proxy[name-m<i>]`) were fine-tuned from one shared initialisation - the same base model and the
same reward-head (and LoRA) init, `init_seed` - in different data orders; WARM averages every weight of the K models,
backbone, LM head and reward head alike (`pipeline.reward_model.weight_averaged_reward_model`), and the average scores
as one reward model. LoRA members are saved with their adapters merged, so their merged weights are averaged.

Averaging here, once, rather than in every scorer: eval_proxy, bon_score, knowledge and the RL stages then read this
model through the same `model` input as any trained proxy (and PPO can take its value model from it).

Writes model/ (`GRMRewardModel.save_pretrained`, the first member's tokenizer) and metrics.json.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import WarmAverageStageConfig
from pipeline.models import DTYPES, load_tokenizer
from pipeline.reward_model import weight_averaged_reward_model

VERSION = "1"
log = logging.getLogger("overopt")


def run(cfg: WarmAverageStageConfig, inputs: dict[str, Path], out: Path) -> None:
    proxy = cfg.proxy
    members = [inputs[f"member{i}"] / "model" for i in range(proxy.members)]
    model = weight_averaged_reward_model(members, DTYPES[cfg.dtype])
    model.save_pretrained(out / "model", tokenizer=load_tokenizer(members[0]))
    metrics = {"members": len(members), "parameters": sum(p.numel() for p in model.parameters()),
               "member_names": [m.name for m in proxy.member_specs()]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("  %s: averaged the weights of %d members", proxy.name, len(members))
