"""`overopt plan CONFIG`: what each stage of a study will cost, before anything runs.

Per stage: how it launches (processes, DeepSpeed ZeRO stage), the sequences it generates, scores and trains on with an
upper bound on their tokens (each sequence counted at its length limit: `max_new_tokens` for generation, the scorer's
or trainer's `max_length` for a forward pass), and for the stages trained under DeepSpeed, DeepSpeed's own estimate of
the model states (parameters, gradients, optimizer states) each rank holds (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`) plus the frozen models every rank keeps whole (reference policy, proxy).

Parameter counts come from the models' configs, instantiated on the meta device (no weights are read): the tiny
world's policy from `policy:` and the world's vocabulary; a hub id or directory from its `config.json` when it is on
this machine (a local directory or the Hugging Face cache; nothing is downloaded). A config that is not here is said
per stage ("not estimated: ... not on this machine"), never a crash. Nothing is cached or written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import StudyConfig
from pipeline.runner import StageNode, _resolve_repo_path

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Work:
    """Sequences and an upper bound on their tokens."""

    sequences: int = 0
    tokens: int = 0

    def text(self) -> str:
        return "—" if not self.sequences else f"{self.sequences:,} (≤ {_count(self.tokens)} tok)"


@dataclass
class StagePlan:
    key: str
    launch: str
    processes: int
    generate: Work = field(default_factory=Work)
    score: Work = field(default_factory=Work)
    train: Work = field(default_factory=Work)
    memory: str = "—"  # DeepSpeed's model-state estimate per rank, or why there is none
    note: str = ""


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{int(n)}"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------------------------------------------
# parameter counts from configs


class ConfigNotHere(Exception):
    """A model's config is neither a local directory nor in the Hugging Face cache."""


def _model_config(cfg: StudyConfig, model_id: str | None, trust_remote_code: bool = False):
    """The transformers config of the base policy (`model_id` None: the tiny world's) or of a hub id / directory,
    without the network."""
    if model_id is None:
        from pipeline import world
        from pipeline.models import tiny_llama_config

        return tiny_llama_config(cfg.policy, world.build_tokenizer())
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigNotHere(f"config of {model_id} not on this machine (offline)") from e


@dataclass(frozen=True)
class ModelSize:
    total: int  # parameters; tied tensors count once, as DeepSpeed's `model_to_params` counts them
    largest_layer: int  # parameters of the largest module's own tensors (ZeRO-3's estimate needs it)
    linear_shapes: tuple[tuple[str, int, int], ...]  # (module name's last part, in, out) of every nn.Linear

    def lora(self, lora) -> int:
        """Parameters of LoRA adapters of rank r on the `target_modules` linears: r·(in + out) each."""
        return sum(lora.r * (i + o) for name, i, o in self.linear_shapes if name in lora.target_modules)


def parameter_counts(config) -> ModelSize:
    """The size of a causal LM built from `config` on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    linears = tuple((n.rsplit(".", 1)[-1], m.in_features, m.out_features) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear))
    return ModelSize(total, largest, linears)


class Sizes:
    """Parameter counts of the study's models, each looked up once."""

    def __init__(self, cfg: StudyConfig):
        self.cfg, self._cache = cfg, {}

    def of(self, model_id: str | None, trust_remote_code: bool = False) -> ModelSize:
        if model_id not in self._cache:
            try:
                self._cache[model_id] = parameter_counts(_model_config(self.cfg, model_id, trust_remote_code))
            except ConfigNotHere as e:
                self._cache[model_id] = e
        got = self._cache[model_id]
        if isinstance(got, Exception):
            raise got
        return got

    def policy(self) -> ModelSize:
        p = self.cfg.policy
        return self.of(p.model_id if p.source == "hub" else None, p.trust_remote_code)

    def scorer(self, scorer) -> int:
        """Parameters of a scorer (`ScorerStageConfig`): a trained proxy is counted as its base LM (its reward head
        is a rounding error); an ensemble holds its members; the world's gold rule has none."""
        if scorer.gold is not None:
            gold = scorer.gold
            return 0 if gold.type == "world" else self.of(gold.model_id, gold.trust_remote_code).total
        proxy = scorer.proxy
        if proxy.type == "checkpoint":
            return self.of(proxy.path, proxy.trust_remote_code).total
        return self.policy().total * (proxy.members if proxy.type == "ensemble" else 1)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed's estimate


def deepspeed_settings(path: Path) -> dict:
    """The ZeRO stage and offload devices of a DeepSpeed config (the pre-flight has already checked it parses)."""
    zero = json.loads(_resolve_repo_path(path).read_text()).get("zero_optimization", {})

    def device(key: str) -> str:
        return str((zero.get(key) or {}).get("device", "none"))

    return {"stage": int(zero.get("stage", 0)), "offload_optimizer": device("offload_optimizer") != "none",
            "offload_param": device("offload_param") != "none"}


def model_states_per_rank(total: int, largest: int, ds: dict, ranks: int, machines: int = 1) -> tuple[int, int]:
    """DeepSpeed's estimate of (accelerator bytes, host bytes) per rank for the model states of `total` trained
    parameters, under the config's ZeRO stage and offload settings. Stages 0 and 1 are estimated as stage 2 (their
    gradients are not partitioned, so this is a lower bound for them)."""
    per_node = max(1, ranks // machines)
    if ds["stage"] == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, device, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=per_node, num_nodes=machines,
            cpu_offload=ds["offload_optimizer"], cpu_offload_params=ds["offload_param"])
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, device = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=per_node, num_nodes=machines,
                                                             cpu_offload=ds["offload_optimizer"])
    return int(device), int(host)


# ----------------------------------------------------------------------------------------------------------------
# the plan


def _eval_prompts(cfg: StudyConfig, node: StageNode) -> int:
    """The prompts a sampling stage samples: the ID evaluation prompts, or the OOD ones for an OOD copy."""
    from pipeline.study import eval_prompt_count, ood_prompt_count

    return ood_prompt_count(cfg) if node.inputs.get("prompts") == "ood_prompts" else eval_prompt_count(cfg)


def _train_prompts(cfg: StudyConfig) -> int:
    from pipeline import world

    return world.prompt_split_sizes(world.in_distribution_prompt_count(), cfg.world.n_eval_prompts,
                                    cfg.world.eval_prompt_fraction)[0]


def _pairs(cfg: StudyConfig) -> tuple[int, int]:
    """(training pairs, test pairs), approximately: gold ties and over-length pairs are dropped when labelling."""
    lab = cfg.gold_label
    test = int(round(lab.n_pairs * lab.test_fraction))
    return lab.n_pairs - test, test


def _exports(cfg: StudyConfig, node: StageNode) -> int:
    """How many policies an RL training stage exports (its config's `export_steps`; DPO's depend on its pairs)."""
    if node.stage == "dpo":
        return len(node.config.dpo.export_steps(_dpo_pairs(cfg, node.config)))
    section = getattr(node.config, "ppo", None) or getattr(node.config, "rl", None)
    return len(section.export_steps()) if section is not None and hasattr(section, "export_steps") else 0


def _dpo_pairs(cfg: StudyConfig, c) -> int:
    """The training pairs DPO sees (about: over-length pairs are dropped)."""
    return min(c.n_train_pairs or _pairs(cfg)[0], _pairs(cfg)[0])


def _workload(cfg: StudyConfig, node: StageNode, by_key: dict[str, StageNode], produced: dict[str, Work],
              sizes: Sizes) -> StagePlan:
    launch = "inline" if node.launcher == "inline" else "accelerate"
    if node.deepspeed_config is not None:
        launch += f" + ZeRO-{deepspeed_settings(node.deepspeed_config)['stage']}"
    plan = StagePlan(node.key, launch, node.num_processes * node.num_machines)  # ranks over all machines
    c = node.config
    if node.stage == "sft_policy":
        n = c.pretrain.steps * c.pretrain.batch_size + c.sft.steps * c.sft.batch_size
        plan.train = Work(n, n * 128)  # the tiny Llama's max_position_embeddings
    elif node.stage == "gold_score":
        if c.source == "policy_samples":
            prompts = _train_prompts(cfg)
            n = prompts * c.samples_per_prompt
            plan.generate = Work(n, n * c.sampling.max_new_tokens)
            pairs = prompts * math.comb(c.samples_per_prompt, 2) + cfg.world.n_ood_pairs
            plan.score = Work(2 * pairs, 2 * pairs * c.gold.max_length)
            plan.note = "tiny world: the gold is a rule" if c.gold.type == "world" else ""
        else:
            plan.score = Work(2 * c.n_pairs, 2 * c.n_pairs * c.gold.max_length)
    elif node.stage == "train_proxy":
        tr = c.training
        pairs = min(tr.n_train_pairs or _pairs(cfg)[0], _pairs(cfg)[0])
        n = int(2 * pairs * tr.epochs)
        plan.train = Work(n, n * tr.max_length)
        plan.score = Work(2 * pairs, 2 * pairs * tr.max_length)  # reference statistics on the training responses
        if node.num_processes > 1:
            per_rank = tr.batch_size // node.num_processes
            plan.note = f"{per_rank} pair{'' if per_rank == 1 else 's'} per rank per micro-step"
    elif node.stage == "eval_proxy":
        pairs = _pairs(cfg)[1] + (cfg.world.n_ood_pairs if cfg.policy.source == "tiny" else 0)
        plan.score = Work(2 * pairs, 2 * pairs * c.scorer.max_length)
        plan.note = "+ the evaluation files when set"
    elif node.stage == "knowledge":
        plan.score = Work(2 * cfg.knowledge.n_pairs, 2 * cfg.knowledge.n_pairs * c.scorer.max_length)
    elif node.stage == "knowledge_base":
        plan.score = Work(2 * cfg.knowledge.n_pairs, 2 * cfg.knowledge.n_pairs * c.max_length)
    elif node.stage == "bon_sample":
        n = _eval_prompts(cfg, node) * c.n_samples
        plan.generate = produced[node.key] = Work(n, n * c.sampling.max_new_tokens)
    elif node.stage == "bon_score":
        upstream = produced.get(node.inputs["samples"], Work())
        members = c.proxy is not None and c.proxy.type == "ensemble"
        plan.score = Work(0, 0) if members else Work(upstream.sequences, upstream.sequences * c.max_length)
        plan.note = "combines its members' scores" if members else ""
    elif node.stage == "ppo":
        ppo = c.ppo
        n = ppo.steps * ppo.rollout_batch_size
        plan.generate = Work(n, n * ppo.sampling.max_new_tokens)
        plan.score = Work(n, n * c.scorer.max_length)
        plan.train = Work(n * ppo.ppo_epochs, n * ppo.ppo_epochs * c.scorer.max_length)
    elif node.stage == "group_rl":
        rl = c.rl
        n = rl.steps * rl.prompts_per_step * rl.group_size
        plan.generate = Work(n, n * rl.sampling.max_new_tokens)
        plan.score = Work(n, n * c.scorer.max_length)
        plan.train = Work(n * rl.num_iterations, n * rl.num_iterations * c.scorer.max_length)
    elif node.stage == "dpo":
        d = c.dpo
        n = 2 * d.optimizer_steps(_dpo_pairs(cfg, c)) * d.batch_size  # both sides of each pair of every step
        plan.train = Work(n, n * d.max_length)
        plan.score = Work(n, n * d.max_length)  # the frozen reference's log-probs of the same sequences
        plan.note = f"{len(d.export_steps(_dpo_pairs(cfg, c)))} exports"
    elif node.stage == "ppo_sample":
        exports = _exports(cfg, by_key[node.inputs["rl"]])
        n = exports * _eval_prompts(cfg, node) * c.n_samples
        plan.generate = produced[node.key] = Work(n, n * c.max_new_tokens)
        plan.score = Work(2 * n, 2 * n * c.scorer.max_length)  # the proxy, and the initial policy for the KL
        plan.note = f"{exports} exports"
    elif node.stage in ("world", "gold_label", "eval_prompts", "knowledge_pairs", "ood_prompts"):
        plan.note = "data only"
    elif node.stage == "warm_average":
        plan.note = f"averages {len(node.inputs)} members' weights"
    elif node.stage in ("bon_curve", "ppo_curve", "report"):
        plan.note = "statistics only"
    else:
        plan.note = "workload not estimated for this stage"
    if node.deepspeed_config is not None:
        plan.memory = _memory_text(cfg, node, sizes)
    return plan


def _memory_text(cfg: StudyConfig, node: StageNode, sizes: Sizes) -> str:
    """DeepSpeed's model-state estimate per rank for what a ZeRO stage trains, and the weights of the frozen models.

    PPO's engine holds the policy and a value model (a second decoder, counted as a policy); GRPO/RLOO's and DPO's the
    policy; train_proxy's the proxy (its base LM; the reward head is a rounding error).
    With LoRA only the adapters (and PPO's value model) train: DeepSpeed's formula is applied to the trained
    parameters and the policy's frozen base weights are added as weights (partitioned over the ranks under ZeRO-3).
    The reference policy (none with LoRA: the adapters are switched off; for train_proxy only GRM's DPO regulariser
    has one, LoRA or not) and the proxy are frozen copies on every rank.
    """
    ds = deepspeed_settings(node.deepspeed_config)
    section = next((getattr(node.config, k) for k in ("ppo", "rl", "dpo", "training")
                    if getattr(node.config, k, None)), None)
    lora = getattr(section, "lora", None)
    try:
        policy = sizes.policy()
        dtype = BYTES[cfg.policy.dtype]
        value = policy.total if node.stage == "ppo" else 0
        trained = value + (policy.total if lora is None else policy.lora(lora))
        world = node.num_processes * node.num_machines
        frozen = 0 if lora is None else policy.total * dtype / (world if ds["stage"] == 3 else 1)
        if node.stage == "train_proxy":
            from pipeline.proxy_types import spec

            frozen += policy.total * dtype if spec(node.config.proxy.type).needs_reference(node.config.proxy) else 0
        elif lora is None:
            frozen += policy.total * dtype  # the reference policy
        scorer = getattr(node.config, "scorer", None)
        if scorer is not None:
            frozen += sizes.scorer(scorer) * BYTES[scorer.dtype]
    except ConfigNotHere as e:
        return f"not estimated: {e}"
    device, host = model_states_per_rank(trained, policy.largest_layer, ds, world)
    return (f"{format_bytes(device)} device + {format_bytes(host)} host for {_count(trained)} trained params; "
            f"frozen weights {format_bytes(frozen)}")


def plan_study(cfg: StudyConfig) -> list[StagePlan]:
    """Every stage of the study with its launch, workload and (ZeRO stages) memory estimate, in the DAG's order."""
    from pipeline.runner import toposort
    from pipeline.study import build_stages

    nodes = toposort(build_stages(cfg))
    by_key = {n.key: n for n in nodes}
    produced: dict[str, Work] = {}
    sizes = Sizes(cfg)
    return [_workload(cfg, n, by_key, produced, sizes) for n in nodes]


def policy_size_text(cfg: StudyConfig) -> str:
    """One line on the base policy's size, or why it is unknown here."""
    try:
        size = Sizes(cfg).policy()
    except ConfigNotHere as e:
        return f"base policy: {e}"
    return f"base policy: {_count(size.total)} parameters ({cfg.policy.dtype})"
