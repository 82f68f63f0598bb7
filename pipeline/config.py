"""Typed study configuration: YAML + `section.key=value` overrides -> a validated `StudyConfig`.

Every section is a pydantic model that forbids unknown keys, so a typo fails before any stage runs, with the key's
dotted path and the closest valid key in the message.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.proxy_types import ALL_TYPES as ALL_PROXY_TYPES
from pipeline.proxy_types import TRAINED_TYPES as TRAINED_PROXY_TYPES
from pipeline.proxy_types import spec as proxy_spec
from pipeline.proxy_types import used_fields


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what was expected."""


# Marks a field that cannot change a stage's result (inference batch sizes): the runner leaves it out of fingerprints.
NOT_FINGERPRINTED = {"fingerprint": False}
# Marks an option added after artifacts existed: it enters fingerprints only when set to something other than its
# default.
FINGERPRINTED_UNLESS_DEFAULT = {"fingerprint": "unless_default"}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _expand_home(v: str | None) -> str | None:
    """`~/models/rm` -> an absolute path, once, so every loader sees the same string (hub ids are untouched)."""
    return str(Path(v).expanduser()) if isinstance(v, str) and v.startswith("~") else v


# ----------------------------------------------------------------------------------------------------------------
# run-wide settings


class RunConfig(Section):
    cache_root: Path = Path(".overopt_cache")
    reports_dir: Path = Path("reports/tiny")
    # Seconds a second `overopt run` on the same cache waits for the lock; 0 fails at once with a clear message.
    lock_timeout_s: float = Field(0.0, ge=0)
    # "checksum" re-hashes every cached file before trusting it; "size" only checks sizes (for multi-GB checkpoints).
    verify: Literal["checksum", "size"] = "checksum"
    torch_threads: int = Field(2, ge=1)


# ----------------------------------------------------------------------------------------------------------------
# the embedded tiny world


class WorldConfig(Section):
    """Sizes of the generated world; the world's rules (vocabulary, gold reward) live in `pipeline.world`."""

    seed: int = 0
    # Worlds as seeds (`pipeline.worlds`): the study is run in K worlds, made from seeds seed, seed + 1, ..., each
    # with its own base policy (policy.seed + i) and everything downstream; the report aggregates over worlds and
    # proxy seeds and separates the two sources of spread. Tiny world only; not with `sweep:`. Not fingerprinted: it
    # says how many worlds, not what one is, so the first world is the single-world study and shares its artifacts.
    seeds: int = Field(1, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    n_pretrain_examples: int = Field(6000, ge=1)
    n_demonstrations: int = Field(3000, ge=1)
    # Fraction of (verb, k, category, opener) prompts held out for BoN / RL evaluation.
    eval_prompt_fraction: float = Field(0.1, gt=0, lt=1)
    n_eval_prompts: int = Field(32, ge=1)
    n_ood_pairs: int = Field(600, ge=0)
    # Demonstration flaws (the base policy learns these): probabilities per demonstration.
    demo_p_short: float = Field(0.35, ge=0, le=1)
    demo_p_long: float = Field(0.1, ge=0, le=1)
    demo_p_duplicate: float = Field(0.15, ge=0, le=1)
    demo_p_intruder: float = Field(0.15, ge=0, le=1)


class TrainLoopConfig(Section):
    """A plain supervised loop (pretraining and SFT of the tiny base policy)."""

    steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class PolicyConfig(Section):
    """The base (initial) policy: a tiny Llama trained here, or a Hugging Face model id / local directory."""

    source: Literal["tiny", "hub"] = "tiny"
    model_id: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(192, ge=8)
    pretrain: TrainLoopConfig = TrainLoopConfig(steps=700)
    sft: TrainLoopConfig = TrainLoopConfig(steps=300, lr=1e-3)

    _home = field_validator("model_id")(classmethod(lambda cls, v: _expand_home(v)))

    @model_validator(mode="after")
    def _hub_needs_id(self) -> "PolicyConfig":
        if self.source == "hub" and not self.model_id:
            raise ValueError("policy.source is 'hub' but policy.model_id is not set")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"policy.hidden_size ({self.hidden_size}) must be divisible by policy.num_heads "
                             f"({self.num_heads})")
        return self


class SamplingConfig(Section):
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(16, ge=1)
    batch_size: int = Field(256, ge=1)


# ----------------------------------------------------------------------------------------------------------------
# gold scorer and labeling


class GoldConfig(Section):
    """The gold reward: the world's programmatic rule, or a Hugging Face sequence-classification RM."""

    type: Literal["world", "hf"] = "world"
    model_id: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(16, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    max_length: int = Field(1024, ge=8)
    # Tokenize like the GRM authors' released checkpoints (template rendered to text, then tokenized with special
    # tokens: two BOS). Only for reward models trained that way; see README, `type: checkpoint`.
    double_bos: bool = Field(False, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)

    _home = field_validator("model_id")(classmethod(lambda cls, v: _expand_home(v)))

    @model_validator(mode="after")
    def _hf_needs_id(self) -> "GoldConfig":
        if self.type == "hf" and not self.model_id:
            raise ValueError("gold.type is 'hf' but gold.model_id is not set")
        if self.double_bos and self.type != "hf":
            raise ValueError("gold.double_bos is only for a reward model (gold.type: hf)")
        return self


class GoldLabelConfig(Section):
    """How preference pairs are made and labeled by the gold scorer."""

    source: Literal["policy_samples", "unified_feedback"] = "policy_samples"
    # unified_feedback: a local parquet/json/jsonl file or a hub dataset id in the Unified-Feedback schema.
    dataset_path: str | None = None
    dataset_config: str | None = "all"
    dataset_split: str = "train"
    shuffle_seed: int = 42
    # policy_samples: responses sampled per training prompt; pairs are formed among them.
    samples_per_prompt: int = Field(4, ge=2)
    sampling: SamplingConfig = SamplingConfig()
    n_pairs: int = Field(3000, ge=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    noise_rate: float = Field(0.0, ge=0, le=0.5)
    noise_seed: int = 0
    seed: int = 0  # the pair subset and the train/test split
    sampling_seed: int = 0  # policy_samples: the responses sampled for pairs
    # policy_samples: "vllm" samples the candidates with vLLM on a GPU (pipeline/vllm_backend.py; on rank 0, with
    # tensor_parallel_size GPUs); other samples than "hf" draws, so it is part of gold_score's fingerprint when set
    sampling_backend: Literal["hf", "vllm"] = Field("hf", json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=NOT_FINGERPRINTED)

    _home = field_validator("dataset_path")(classmethod(lambda cls, v: _expand_home(v)))

    @model_validator(mode="after")
    def _uf_needs_path(self) -> "GoldLabelConfig":
        if self.source == "unified_feedback" and not self.dataset_path:
            raise ValueError("gold_label.source is 'unified_feedback' but gold_label.dataset_path is not set")
        if self.source == "unified_feedback" and self.sampling_backend != "hf":
            raise ValueError("gold_label.sampling_backend is for source 'policy_samples'; 'unified_feedback' samples "
                             "nothing")
        return self


# ----------------------------------------------------------------------------------------------------------------
# proxy reward models


class LoraConfig(Section):
    r: int = Field(32, ge=1)
    alpha: int = Field(64, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class RMTrainingConfig(Section):
    """Optimiser and data budget shared by every proxy of a study (a controlled comparison) unless overridden."""

    lr: float = Field(1e-3, gt=0)
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=8)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(5.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # None = all training pairs.
    n_train_pairs: int | None = Field(None, ge=1)
    lora: LoraConfig | None = None
    # Which label column the proxy trains on: "noisy" (equals clean when gold_label.noise_rate is 0) or "clean".
    labels: Literal["noisy", "clean"] = "noisy"
    # How each train_proxy[p] launches (README "Paper scale"): `num_processes` ranks under `accelerate launch`,
    # DeepSpeed ZeRO (2 or 3; full fine-tuning or LoRA) when `deepspeed_config` is set, plain DDP when not; 1 process
    # without DeepSpeed runs in the runner's process. None = 1 process, no DeepSpeed: unlike the data-parallel stages,
    # a proxy's training depends (slightly) on its rank count, so `launch.num_processes` set for faster sampling and
    # scoring does not retrain every proxy; set these keys to train proxies on several devices. `batch_size` stays the
    # global batch: each rank takes batch_size / num_processes pairs a micro-step (it must divide), so the effective
    # batch per optimizer step is batch_size × gradient_accumulation_steps for any number of ranks: the same
    # optimisation problem (equal up to reduction order; ODIN's correlation terms are batch statistics, taken within
    # each rank's share). Not fingerprinted here: the launch enters train_proxy's fingerprint as the node's launcher
    # (processes, DeepSpeed config file), unchanged while it runs in one process as before.
    num_processes: int | None = Field(None, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    deepspeed_config: Path | None = Field(None, json_schema_extra=NOT_FINGERPRINTED)
    # How often (optimizer steps) the Trainer logs the loss to train_log.json: a log, not a result.
    logging_steps: int = Field(10, ge=1, json_schema_extra=NOT_FINGERPRINTED)


class RMTrainingOverrides(Section):
    """Per-proxy exceptions to `proxy_training` (fields left unset inherit the shared value)."""

    lr: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    max_length: int | None = Field(None, ge=8)
    lr_scheduler: Literal["cosine", "linear", "constant"] | None = None
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    max_grad_norm: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    n_train_pairs: int | None = Field(None, ge=1)
    lora: LoraConfig | None = None
    labels: Literal["noisy", "clean"] | None = None


def seed_runs(name: str, seed: int, seeds: int) -> list[tuple[str, int]]:
    """(name, seed) of each seed of a proxy or RL run: `bt` for the first seed, `bt@seed1`, ... after it."""
    return [(name if i == 0 else f"{name}@seed{seed + i}", seed + i) for i in range(seeds)]


def proxy_family(name: str) -> str:
    """The entry a `seed_runs` name belongs to: `bt@seed2` -> `bt` (other names are their own family)."""
    return re.sub(r"@seed\d+$", "", name)


# A proxy name a user writes; `@seed<k>` (and an ensemble's or warm's member's `-m<i>`) is appended to name a proxy's
# extra seeds.
PROXY_NAME = r"[A-Za-z0-9_\-]+"
SEED_COPY_NAME = PROXY_NAME + r"(@seed\d+(-m\d+)?)?"


# Both built from the one table of proxy types (`pipeline.proxy_types`).
ProxyType = Literal[ALL_PROXY_TYPES]  # type: ignore[valid-type]
TrainedType = Literal[TRAINED_PROXY_TYPES]  # type: ignore[valid-type]


class ProxyConfig(Section):
    """One proxy reward model of the study. Its `name` keys its stages (train_proxy[name], bon_score[name], ...)."""

    name: str
    type: ProxyType
    seed: int = 0
    # Independent copies of this proxy, trained with seeds seed, seed + 1, ...: proxies `name`, `name@seed<seed+1>`,
    # ... (`seed_copies`), each with its own stages; the report aggregates them. An ensemble's copy i draws its
    # members' seeds from seed + i·members, so copies share no member. Not fingerprinted: it says how many copies,
    # not what one is, so the first copy is the single-seed proxy and shares its artifacts.
    seeds: int = Field(1, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    # reward head (paper default: Dropout(0.1) -> Linear(H, width) -> ReLU -> Linear(width, 1))
    head: Literal["mlp", "linear"] = "mlp"
    head_width: int = Field(1024, ge=1)
    head_dropout: float = Field(0.1, ge=0, lt=1)
    # grm
    reg: Literal["sft", "sft_nll", "dpo", "dpo_noref"] = "sft"
    alpha: float = Field(0.01, ge=0, le=1)
    beta: float = Field(0.1, gt=0)
    # odin (Chen et al. 2024): weights of the length-correlation terms |ρ(r_q, L)| − ρ(r_l, L) and of the head
    # orthogonality term |W_q · W_l| (1 and 1, as in the authors' public training code)
    odin_length_weight: float = Field(1.0, ge=0, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    odin_ortho_weight: float = Field(1.0, ge=0, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    # inform (Miao et al. 2024): latent dimension and weight β of the KL to N(0, I) (the paper's 128 and 0.1)
    ib_dim: int = Field(128, ge=1, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    ib_beta: float = Field(0.1, ge=0, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    # label_smoothing
    epsilon: float = Field(0.1, ge=0, lt=0.5)
    # margin: m = margin_scale * (gold_chosen - gold_rejected)
    margin_scale: float = Field(1.0, ge=0)
    # trained types (and a composite's members): reward centering, + center_coef · mean((r_c + r_r)²) on the loss
    # (Eisenstein et al. 2023; TRL's center_rewards_coefficient)
    center_coef: float = Field(0.0, ge=0, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    # trained types: the seed of the initialisation (reward head, LoRA matrices); None = `seed`. The data order and
    # dropout always follow `seed`. A warm entry sets it on its members (one shared init); not for composites.
    init_seed: int | None = Field(None, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    # ensemble, warm: `members` copies of `member_type`, seeds seed, seed+1, ... (a warm's members all start from
    # init_seed = the warm's seed)
    members: int = Field(3, ge=2)
    member_type: TrainedType = "bt"
    combine: Literal["mean", "min", "uwo"] = "mean"
    uwo_lambda: float = Field(0.5, ge=0)
    # checkpoint: an existing RM (local dir or hub id), no training stage
    path: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # checkpoint: tokenize as the GRM authors did (two BOS); see README
    double_bos: bool = Field(False, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    training: RMTrainingOverrides = RMTrainingOverrides()

    _home = field_validator("path")(classmethod(lambda cls, v: _expand_home(v)))

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, v: str) -> str:
        # a seed copy's name passes here (stage configs are re-validated in launched processes); a study's own
        # entries are held to PROXY_NAME by StudyConfig
        if not re.fullmatch(SEED_COPY_NAME, v) or v == "gold":
            raise ValueError(f"proxy name {v!r} must match [A-Za-z0-9_-]+ and not be 'gold'")
        return v

    @model_validator(mode="after")
    def _checkpoint_needs_path(self) -> "ProxyConfig":
        if self.type == "checkpoint" and not self.path:
            raise ValueError(f"proxy {self.name!r} has type 'checkpoint' but no 'path'")
        if self.double_bos and self.type != "checkpoint":
            raise ValueError(f"proxy {self.name!r}: double_bos is only for type 'checkpoint' (a released reward model)")
        if self.init_seed is not None and not proxy_spec(self.type).trained:
            raise ValueError(f"proxy {self.name!r}: init_seed is for trained types; a {self.type!r} proxy's members "
                             f"are seeded per member (remove proxies.{self.name}.init_seed)")
        if self.seeds > 1 and self.type == "checkpoint":
            raise ValueError(f"proxy {self.name!r}: seeds ({self.seeds}) is only for trained proxies; a type "
                             f"'checkpoint' proxy is one fixed model (set proxies.{self.name}.seeds to 1)")
        return self

    def canonical(self) -> "ProxyConfig":
        """This proxy with the fields its type does not use reset to their defaults, so that changing, say, `alpha`
        of a BT proxy does not look like a new proxy to the cache."""
        return ProxyConfig(**self.model_dump(include=used_fields(self)))

    def resolved_training(self, shared: RMTrainingConfig) -> RMTrainingConfig:
        """The shared training settings with this proxy's explicit overrides applied."""
        return shared.model_copy(update=self.training.model_dump(exclude_none=True))

    def seed_copies(self) -> list["ProxyConfig"]:
        """The concrete proxies of this entry, one per seed (`seeds` of them, each with seeds 1), named by
        `seed_runs`. The first is this proxy itself; a composite's (ensemble, warm) copies are strided by `members` so
        that no two copies train a member with the same seed."""
        stride = self.members if proxy_spec(self.type).composite else 1
        base = self.model_dump(exclude={"name", "seed", "seeds"})
        return [ProxyConfig(**base, name=name, seed=self.seed + i * stride)
                for i, (name, _) in enumerate(seed_runs(self.name, self.seed, self.seeds))]

    def member_specs(self) -> list["ProxyConfig"]:
        """The trained members of a composite proxy (ensemble, warm), each its own seeded proxy `<name>-m<i>` with
        seed `seed + i`. A warm's members share one initialisation, `init_seed` = the warm's seed (WARM averages
        weights, which needs a common starting point), and differ in data order and dropout (their own seeds)."""
        if not proxy_spec(self.type).composite:
            return [self]
        base = self.model_dump(exclude={"name", "type", "seed", "init_seed", "members", "member_type", "combine",
                                        "uwo_lambda"})
        init_seed = self.seed if self.type == "warm" else None
        return [
            ProxyConfig(**base, name=f"{self.name}-m{i}", type=self.member_type, seed=self.seed + i,
                        init_seed=init_seed)
            for i in range(self.members)
        ]


class EvalProxyConfig(Section):
    batch_size: int = Field(64, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    # Paper path: local files or hub ids in the HHH-Alignment / MT-Bench human-judgment schemas (optional).
    hhh_path: str | None = None
    mt_bench_path: str | None = None  # human-judgment ties are excluded (a strict accuracy has no right answer)
    # RewardBench (allenai/reward-bench "filtered" schema) and RewardBench 2 (allenai/reward-bench-2 schema, best-of-4):
    # a local parquet/json/jsonl file or directory, or a hub id; scored as the benchmarks score (pipeline.rewardbench)
    rewardbench_path: str | None = Field(None, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    rewardbench2_path: str | None = Field(None, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)

    _home = field_validator("hhh_path", "mt_bench_path", "rewardbench_path", "rewardbench2_path")(
        classmethod(lambda cls, v: _expand_home(v)))


class BonConfig(Section):
    n_samples: int = Field(256, ge=1)
    # paper scale only: held-out Unified-Feedback prompts to sample (the tiny world sets world.n_eval_prompts)
    n_prompts: int = Field(1000, ge=1)
    sampling: SamplingConfig = SamplingConfig(batch_size=512)
    seed: int = 0
    prompts_per_shard: int = Field(8, ge=1)
    # "vllm": sampled with vLLM on GPUs (pipeline/vllm_backend.py), one engine per launch.num_processes rank, each on
    # tensor_parallel_size GPUs (in no fingerprint: it changes where, not what, is sampled)
    backend: Literal["hf", "vllm"] = "hf"
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    score_batch_size: int = Field(256, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    # Token limit when scoring samples (prompt + response); a longer sample is an error, never silently dropped.
    score_max_length: int = Field(2048, ge=8)
    # n values of the curve; None = 1, 2, 4, ..., n_samples.
    n_values: list[int] | None = None
    bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)
    nested_estimator: bool = False

    @model_validator(mode="after")
    def _n_values_fit(self) -> "BonConfig":
        bad = [n for n in (self.n_values or []) if not 1 <= n <= self.n_samples]
        if bad:
            raise ValueError(f"bon.n_values {bad} must lie in 1..bon.n_samples ({self.n_samples})")
        if len([n for n in self.curve_ns() if n > 1]) < 2:
            raise ValueError(f"bon needs at least two n > 1 for the curve and its fit (n values {self.curve_ns()}, "
                             f"n_samples {self.n_samples})")
        return self

    def curve_ns(self) -> list[int]:
        if self.n_values:
            return sorted(set(self.n_values))
        ns, n = [], 1
        while n <= self.n_samples:
            ns.append(n)
            n *= 2
        return ns


class KnowledgeConfig(Section):
    """Knowledge-use diagnostics (stages knowledge_pairs, knowledge_base, knowledge[p]): how often a scorer ranks a
    clean response above the same response with one word made wrong, as an AUC per kind of flaw. The tiny world makes
    its minimal pairs on the best-of-n evaluation prompts; at paper scale they come from `pairs_path`."""

    # None: on in tiny-world studies, and at paper scale when pairs_path is set (there is nothing to generate them from)
    enabled: bool | None = None
    n_pairs: int = Field(300, ge=1)  # tiny world: minimal pairs per kind (intruder, repeat)
    seed: int = 0  # the pairs drawn and the bootstrap resamples
    bootstrap: int = Field(1000, ge=0)  # resamples of the pairs for the AUC's 95 % percentile interval
    batch_size: int = Field(64, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    # Token limit of the base policy's log-probabilities (proxies use their training max_length, as eval_proxy does).
    max_length: int = Field(1024, ge=8)
    # A jsonl or parquet file with columns prompt, clean, flawed, kind (pair_id, prompt_id optional); used instead of
    # generated pairs when set. A prompt is a user turn's text or a list of chat messages.
    pairs_path: str | None = None

    _home = field_validator("pairs_path")(classmethod(lambda cls, v: _expand_home(v)))


class AdaptiveKLConfig(Section):
    """Ziegler et al.'s controller: β_KL moves so the policy's KL to the initial policy tracks `target` nats."""

    target: float = Field(6.0, gt=0)
    horizon: int = Field(10000, ge=1)


class PPOEvalConfig(Section):
    """How each exported policy is evaluated (stage ppo_sample): samples on the best-of-n evaluation prompts at
    temperature 1, so the measured KL is that of the policy's own distribution."""

    n_samples: int = Field(16, ge=1)
    max_new_tokens: int | None = Field(None, ge=1)  # None = bon.sampling.max_new_tokens
    batch_size: int = Field(512, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    # prompts per sampling shard of an export (shard i sampled with seed + i); None = all the evaluation prompts in one
    # shard, one generate call per export (fastest on CPU, and every export sampled with the same seed: common random
    # numbers), the exports then being the units the data-parallel ranks share. Set it (e.g. 64) when there are fewer
    # exports than ranks or an export's samples do not fit one rank's memory.
    prompts_per_shard: int | None = Field(None, ge=1, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    # "vllm": the exports sample with vLLM (an engine per export, loaded by path, on each launch.num_processes rank
    # with tensor_parallel_size GPUs); the KL and the proxy's scores stay with the HF models (pipeline/vllm_backend.py)
    backend: Literal["hf", "vllm"] = Field("hf", json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=NOT_FINGERPRINTED)
    bootstrap: int = Field(1000, ge=0)
    ci: float = Field(0.95, gt=0, lt=1)


def log_spaced_steps(total: int) -> list[int]:
    """0, 1, 2, 4, 8, ... below `total`, and `total`: where PPO exports its policy."""
    steps, s = [0], 1
    while s < total:
        steps.append(s)
        s *= 2
    return steps + [total]


class RewardTransformConfig(Section):
    """A policy-side mitigation of over-optimization: the proxy's raw score r is transformed before the RL algorithm
    sees it (`pipeline.reward_transforms`, one implementation for every arm). PPO (`ppo.reward_transform`) transforms
    before its reward normalisation and KL penalty (the missing-EOS penalty is subtracted after it); GRPO and RLOO
    (`rl.reward_transform`) before their group baselines. Best-of-n is unchanged by these (monotone per prompt), so
    they only move the RL curves.

    none             r as it is
    clip             clip(r, lo, hi) with `clip_range: [lo, hi]` in the proxy's raw units
    par              σ(r − r_ref) (Fu et al. 2025, PAR), r_ref the proxy's score of one response sampled from the
                     initial policy for the same prompt in the same update
    log_sigmoid      log σ(r − r_ref) (Wang et al. 2024, log-sigmoid centring), r_ref as for par
    per_prompt_norm  PPO only: (r − mean) / std over the `rollouts_per_prompt` rollouts of each prompt (GRPO's group
                     normalisation, Shao et al. 2024); refused with one rollout per prompt, whose std is undefined.
                     Refused under `rl`: GRPO already normalises each group so, and RLOO's leave-one-out baseline
                     centres it
    """

    kind: Literal["none", "clip", "par", "log_sigmoid", "per_prompt_norm"] = "none"
    clip_range: tuple[float, float] | None = None  # [lo, hi]: required by kind clip
    # PPO: responses sampled per prompt in each update (the rollout batch holds rollout_batch_size / this many
    # distinct prompts, each repeated); per_prompt_norm needs ≥ 2. GRPO / RLOO sample rl.group_size per prompt.
    rollouts_per_prompt: int = Field(1, ge=1)

    def check(self, section: str) -> None:
        """Raise ValueError naming `<section>.reward_transform.<key>` where the settings cannot run (`section`: ppo
        or rl; the sections check what depends on their own batch sizes)."""
        key = f"{section}.reward_transform"
        if self.clip_range is not None and self.kind != "clip":
            raise ValueError(f"{key}.clip_range is read only with kind clip (kind is {self.kind!r}); set "
                             f"{key}.kind: clip, or remove clip_range (null where it is inherited)")
        if self.kind == "clip":
            if self.clip_range is None:
                raise ValueError(f"{key}.clip_range: [lo, hi] is required with kind clip")
            lo, hi = self.clip_range
            if not lo < hi:
                raise ValueError(f"{key}.clip_range: lo ({lo}) must be below hi ({hi})")
        if self.kind == "per_prompt_norm" and self.rollouts_per_prompt < 2:
            raise ValueError(f"{key}.rollouts_per_prompt must be ≥ 2 with kind per_prompt_norm (one rollout per "
                             f"prompt has no standard deviation)")


# PPO settings a variant (`ppo.variants`) may not override: its runs share the ppo section's seeds (run names and
# seeds pair up across arms, so differences are paired by seed), its evaluation (samples, bootstrap: curves on the
# same footing) and its launch (processes, DeepSpeed; checkpointing and logging say nothing about a result)
PPO_VARIANT_SHARED = ("seed", "seeds", "eval", "num_processes", "deepspeed_config", "checkpoint_every", "report_to",
                      "variants")
PPO_VARIANT_NAME = r"[A-Za-z][A-Za-z0-9_]*"
# suffixes of the shared RL stages (`pipeline.study._rl_arm`): a variant named so would take another arm's stage keys
RL_STAGE_SUFFIXES = ("sample", "gold", "curve")


def _merged(base: Any, override: Any) -> Any:
    """`override` laid over `base`: mappings key by key (as `ppo.KEY.SUB=value` overrides do), anything else
    replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merged(base.get(k), v) for k, v in override.items()}}
    return override


class PPOConfig(Section):
    """PPO of the base policy against each selected proxy (stages ppo[p], ppo_sample[p], ppo_gold[p], ppo_curve[p]).

    Defaults follow Huang et al. 2024 ("The N+ implementation details of RLHF with PPO") unless a comment says
    otherwise; `configs/paper/` sets the GRM paper's values.
    """

    proxies: list[str] | None = None  # None = every proxy of the study
    num_processes: int = Field(2, ge=1)
    # None = no DeepSpeed: plain PyTorch in one process (run inline) or DDP-free accelerate with several
    deepspeed_config: Path | None = Path("configs/deepspeed/zero2.json")
    seed: int = 0
    # independent PPO runs per proxy, with seeds seed, seed + 1, ...; the report aggregates them
    seeds: int = Field(1, ge=1)
    steps: int = Field(100, ge=1)  # PPO updates; each consumes one rollout batch
    # rollouts per update, over all processes: one per prompt unless reward_transform.rollouts_per_prompt > 1
    rollout_batch_size: int = Field(64, ge=1)
    ppo_epochs: int = Field(4, ge=1)
    num_minibatches: int = Field(4, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lora: LoraConfig | None = None  # None = train the whole policy
    value_init: Literal["policy", "proxy"] = "policy"  # the value model's decoder starts from this model
    kl_coef: float = Field(0.0, ge=0)  # the GRM paper: 0 (KL measured, not penalised)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: AdaptiveKLConfig | None = None  # set to adapt kl_coef (its starting value) to a target KL
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    # subtracted from the score of a response that never ends its turn within max_new_tokens; None = no penalty
    missing_eos_penalty: float | None = Field(None, ge=0)
    # none | first_batch (the GRM paper: scores standardised with the first rollout batch's mean and std, kept fixed)
    # | batch (each batch's scores standardised over all processes)
    reward_norm: Literal["none", "first_batch", "batch"] = "none"
    # a policy-side mitigation applied to the proxy's raw score before reward_norm and the KL penalty
    reward_transform: RewardTransformConfig = Field(RewardTransformConfig(),
                                                    json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=16)  # rollouts
    checkpoint_every: int = Field(25, ge=1, json_schema_extra=NOT_FINGERPRINTED)  # and at every export
    report_to: list[Literal["tensorboard", "wandb"]] = Field([], json_schema_extra=NOT_FINGERPRINTED)
    eval: PPOEvalConfig = PPOEvalConfig()
    # Named PPO variants, each an RL arm of its own beside the plain `ppo` arm (`variant`): name -> overrides of this
    # section's training settings, e.g. {clip: {reward_transform: {kind: clip, clip_range: [-1, 1]}}, kl: {kl_coef:
    # 0.05}}. Arm `ppo_<name>`, stages ppo_<name>[p], ppo_<name>_sample[p], ... A mapping is merged into this
    # section's value key by key; `proxies` may be overridden (default: this section's); the keys in
    # PPO_VARIANT_SHARED (seeds, evaluation, launch) may not. Not fingerprinted: it says which arms run; the plain
    # arm's stages stay as they are.
    variants: dict[str, dict[str, Any]] = Field({}, json_schema_extra=NOT_FINGERPRINTED)

    @model_validator(mode="after")
    def _batches_divide(self) -> "PPOConfig":
        self.reward_transform.check("ppo")
        if self.rollout_batch_size % self.num_processes:
            raise ValueError(f"ppo.rollout_batch_size ({self.rollout_batch_size}) must be divisible by "
                             f"ppo.num_processes ({self.num_processes})")
        local = self.rollout_batch_size // self.num_processes
        if local % self.num_minibatches:
            raise ValueError(f"ppo.rollout_batch_size / ppo.num_processes ({local}) must be divisible by "
                             f"ppo.num_minibatches ({self.num_minibatches})")
        k = self.reward_transform.rollouts_per_prompt
        if local % k:  # a prompt's rollouts stay on one rank, so per-prompt statistics need no communication
            raise ValueError(f"ppo.rollout_batch_size / ppo.num_processes ({local}) must be divisible by "
                             f"ppo.reward_transform.rollouts_per_prompt ({k})")
        return self

    @model_validator(mode="after")
    def _variants_valid(self) -> "PPOConfig":
        for name in self.variants:
            self.variant(name)
        return self

    def check_variants_differ(self) -> None:
        """Raise ValueError naming `ppo.variants.<name>` for a variant that overrides no training setting with another
        value: its runs would train exactly the plain arm's, again, under other stage keys. (Called by StudyConfig
        after it checked the variants' `proxies`, the more specific error.)"""
        plain = self.model_dump(exclude={"proxies", "variants"})
        for name in self.variants:
            if self.variant(name).model_dump(exclude={"proxies", "variants"}) == plain:
                raise ValueError(f"ppo.variants.{name} changes no PPO setting (its overrides {self.variants[name]} "
                                 f"equal the ppo section's values): it would repeat the plain ppo arm's runs; "
                                 f"override a training setting or remove the variant")

    def variant(self, name: str) -> "PPOConfig":
        """The ppo section with variant `name`'s overrides laid over it (and no variants of its own); a ValueError
        naming `ppo.variants.<name>.<key>` for a bad name or override."""
        where = f"ppo.variants.{name}"
        if not re.fullmatch(PPO_VARIANT_NAME, name) or name in RL_STAGE_SUFFIXES or name.endswith(
                tuple(f"_{s}" for s in RL_STAGE_SUFFIXES)):
            raise ValueError(f"{where}: a variant's name must match {PPO_VARIANT_NAME} (it names the arm ppo_{name} "
                             f"and its stages) and not be or end in {', '.join(RL_STAGE_SUFFIXES)}")
        overrides = self.variants[name]
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}: a mapping of PPO settings to override, e.g. {{kl_coef: 0.05}}")
        fields = type(self).model_fields
        for key in overrides:
            if key not in fields:
                hint = difflib.get_close_matches(str(key), [f for f in fields if f not in PPO_VARIANT_SHARED], n=1)
                raise ValueError(f"{where}.{key} is not a PPO setting" + (f" (did you mean '{hint[0]}'?)" if hint
                                                                            else ""))
            if key in PPO_VARIANT_SHARED:
                raise ValueError(f"{where}.{key}: a variant shares the ppo section's {key} (its seeds, evaluation and "
                                 f"launch are every PPO arm's, so the arms' runs pair up); set ppo.{key} instead")
        try:
            return PPOConfig.model_validate(_merged(self.model_dump(exclude={"variants"}), overrides))
        except ValidationError as e:
            problems = []
            for err in e.errors():
                msg = err["msg"].removeprefix("Value error, ")
                loc = ".".join(str(p) for p in err["loc"])
                if err["type"] == "extra_forbidden":
                    problems.append(f"{where}.{loc}: unknown key")
                elif loc:
                    problems.append(f"{where}.{loc}: {msg}")
                else:  # a check across keys names them as the ppo section's; they are the variant's here
                    problems.append(f"{where} (the ppo section with its overrides): {msg}")
            raise ValueError("; ".join(problems)) from None

    def arms(self) -> dict[str, "PPOConfig"]:
        """Arm name -> its settings: `ppo` (this section) and `ppo_<name>` for each variant, in the config's order."""
        return {"ppo": self, **{f"ppo_{name}": self.variant(name) for name in self.variants}}

    def export_steps(self) -> list[int]:
        return log_spaced_steps(self.steps)

    def training_view(self, seed: int) -> "PPOConfig":
        """What one run's training depends on (the ppo stage's config): its seed, not which proxies, how many seeds,
        the evaluation or the other arms (variants)."""
        return self.model_copy(update={"proxies": None, "eval": PPOEvalConfig(), "seed": seed, "seeds": 1,
                                       "variants": {}})

    def runs(self, proxy: str) -> list[tuple[str, int]]:
        """(run name, seed) of each PPO run against `proxy`."""
        return seed_runs(proxy, self.seed, self.seeds)


class GroupRLConfig(Section):
    """Group-baseline RL through TRL 1.16 (GRPOTrainer, RLOOTrainer) against each selected proxy: stages
    grpo[p] / rloo[p], then the same sampling-with-measured-KL, gold and curve stages as PPO. TRL's defaults are noted
    where overopt's differ."""

    algos: list[Literal["grpo", "rloo"]] = ["grpo", "rloo"]
    proxies: list[str] | None = None  # None = every proxy of the study
    seeds: int = Field(1, ge=1)  # runs with seeds seed, seed + 1, ... per algorithm and proxy
    seed: int = 0
    num_processes: int = Field(2, ge=1)
    deepspeed_config: Path | None = Path("configs/deepspeed/zero2.json")
    # updates, as PPO's: each samples one generation batch; exports at 0, 1, 2, 4, ..., steps
    steps: int = Field(64, ge=1)
    prompts_per_step: int = Field(8, ge=1)  # over all processes; each gets group_size completions
    group_size: int = Field(8, ge=2)  # TRL num_generations (GRPO default 8, RLOO default 2)
    lr: float = Field(3e-4, gt=0)  # TRL default 1e-6, for billion-parameter models
    beta: float = Field(0.0, ge=0)  # KL coefficient (TRL: GRPO 0.0, RLOO 0.05); the KL on the x-axis is measured
    epsilon: float = Field(0.2, gt=0)  # clipping (TRL default 0.2)
    # passes over each generation batch (TRL num_iterations, default 1) × minibatches per pass (TRL
    # steps_per_generation, default 1): 4 × 4 optimizer steps per update, as PPO's epochs × minibatches
    num_iterations: int = Field(4, ge=1)
    minibatches: int = Field(4, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)  # TRL default 1.0
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=16)  # rollouts
    eval: PPOEvalConfig = PPOEvalConfig()
    # a policy-side mitigation applied to the proxy's raw score before the group baseline: none, clip, par or
    # log_sigmoid (par / log_sigmoid: centred on the proxy's score of one response per prompt sampled from the initial
    # policy in the same update); per_prompt_norm is refused (GRPO does it already)
    reward_transform: RewardTransformConfig = Field(RewardTransformConfig(),
                                                    json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)

    @model_validator(mode="after")
    def _batches_divide(self) -> "GroupRLConfig":
        from pipeline.reward_transforms import GROUP_RL_KINDS

        transform = self.reward_transform
        if transform.kind not in GROUP_RL_KINDS:
            raise ValueError(f"rl.reward_transform.kind {transform.kind!r} is not for group-baseline RL (one of "
                             f"{', '.join(GROUP_RL_KINDS)}): GRPO already standardises each group of rl.group_size "
                             f"completions by its mean and std, and RLOO's leave-one-out baseline centres it")
        if transform.rollouts_per_prompt != 1:
            raise ValueError("rl.reward_transform.rollouts_per_prompt is PPO's; the rl section samples rl.group_size "
                             "completions per prompt (leave it unset)")
        transform.check("rl")
        if not self.algos:
            raise ValueError("rl.algos is empty: list grpo and/or rloo, or remove the rl section (rl: null) to run "
                             "no group-baseline RL")
        if len(set(self.algos)) < len(self.algos):
            raise ValueError(f"rl.algos {self.algos} names an algorithm twice (each algorithm is one arm)")
        completions = self.prompts_per_step * self.group_size
        if completions % (self.num_processes * self.minibatches):
            raise ValueError(f"rl.prompts_per_step × rl.group_size ({completions}) must be divisible by "
                             f"rl.num_processes × rl.minibatches ({self.num_processes} × {self.minibatches})")
        return self

    def optimizer_steps_per_update(self) -> int:
        return self.num_iterations * self.minibatches

    def export_steps(self) -> list[int]:
        return log_spaced_steps(self.steps)

    def training_view(self, seed: int) -> "GroupRLConfig":
        return self.model_copy(update={"proxies": None, "eval": PPOEvalConfig(), "seed": seed, "seeds": 1,
                                       "algos": ["grpo"]})

    def runs(self, proxy: str) -> list[tuple[str, int]]:
        return seed_runs(proxy, self.seed, self.seeds)


class DPOConfig(Section):
    """Direct preference optimisation (Rafailov et al. 2023) of the base policy through TRL 1.16's DPOTrainer: stage
    dpo[p], then the same sampling-with-measured-KL, gold and curve stages as the RL arms (dpo_sample[p], dpo_gold[p],
    dpo_curve[p]). No proxy is in its loop: it trains on the gold-labelled training pairs every proxy sees (the label
    column `proxy_training.labels`, the budget `proxy_training.n_train_pairs`), tokenized as the proxies tokenize
    them, against a frozen reference = the base policy. The policy is exported at optimizer steps 0, 1, 2, 4, ...,
    last. Its runs are keyed by `proxy`, the proxy whose scores fill the curves' proxy column and whose best-of-n
    curve it is drawn beside (so the report's arm -> proxy -> runs structure holds); that proxy only scores samples
    after training. TRL's defaults are noted where overopt's differ."""

    proxy: str | None = None  # a proxy entry; None = the study's first entry (the baseline)
    seeds: int = Field(1, ge=1)  # runs with seeds seed, seed + 1, ... (data order; the reference is the base policy)
    seed: int = 0
    num_processes: int = Field(2, ge=1)
    deepspeed_config: Path | None = Path("configs/deepspeed/zero2.json")
    beta: float = Field(0.1, gt=0)  # TRL default 0.1: the strength of the implicit KL to the reference
    # TRL loss_type: sigmoid (DPO), hinge (SLiC), ipo (IPO, TRL's per-token-averaged form)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    lr: float = Field(1e-4, gt=0)  # TRL default 1e-6, for billion-parameter models; constant schedule, no warmup
    epochs: float = Field(1.0, gt=0)  # passes over the training pairs, unless `steps` is set
    steps: int | None = Field(None, ge=1)  # optimizer steps; None = `epochs` passes over the pairs
    batch_size: int = Field(32, ge=1)  # pairs per optimizer step over all processes (TRL default 8 per device)
    # prompt + response tokens; a longer pair is dropped, never truncated (as in proxy training)
    max_length: int = Field(1024, ge=8)
    max_grad_norm: float = Field(1.0, gt=0)  # TRL default 1.0
    eval: PPOEvalConfig = PPOEvalConfig()

    @model_validator(mode="after")
    def _batches_divide(self) -> "DPOConfig":
        if self.batch_size % self.num_processes:
            raise ValueError(f"dpo.batch_size ({self.batch_size}) must be divisible by dpo.num_processes "
                             f"({self.num_processes})")
        return self

    def optimizer_steps(self, train_pairs: int) -> int:
        """The run's length on `train_pairs` pairs: `steps`, else `epochs` passes of batch_size pairs (as the
        Trainer counts them: a last short batch is a step)."""
        return self.steps or math.ceil(self.epochs * math.ceil(train_pairs / self.batch_size))

    def export_steps(self, train_pairs: int) -> list[int]:
        """Optimizer steps after which the policy is exported: 0, 1, 2, 4, ..., last."""
        return log_spaced_steps(self.optimizer_steps(train_pairs))

    def training_view(self, seed: int) -> "DPOConfig":
        """What one run's training depends on (the dpo stage's config): its seed, not the scoring proxy, how many
        seeds or the evaluation."""
        return self.model_copy(update={"proxy": None, "eval": PPOEvalConfig(), "seed": seed, "seeds": 1})

    def runs(self, proxy: str) -> list[tuple[str, int]]:
        """(run name, seed) of each DPO run, keyed by the proxy that scores its samples."""
        return seed_runs(proxy, self.seed, self.seeds)


class OODConfig(Section):
    """Over-optimization under distribution shift (stages ood_prompts, bon_sample_ood, bon_score_ood[s],
    bon_curve_ood[p] and, per RL run, <arm>_sample_ood[run], <arm>_gold_ood[run], <arm>_curve_ood[run]): best-of-n and
    every RL arm's exports are also sampled and gold-scored on out-of-distribution prompts, by the same stages with
    the same configs (so the same seeds) as on the in-distribution evaluation prompts; only their `prompts` input
    differs. The ID stages and their fingerprints are unchanged. The report draws the OOD curves beside the ID ones,
    with the same fits, aggregation over seeds and matched-KL comparisons. Off by default."""

    enabled: bool = False
    # How many OOD prompts; None = as many as the in-distribution evaluation prompts (the world's held-out count in
    # the tiny world, bon.n_prompts at paper scale). From a file: its first n_prompts rows.
    n_prompts: int | None = Field(None, ge=1)
    # A jsonl/json or parquet file of held-out prompts (columns prompt_id, prompt: a list of chat messages as in
    # pipeline/records.py, or a user turn's text). Required at paper scale; in the tiny world, unset = prompts drawn
    # (seeded by world.seed) from the world's OOD prompt space: unseen verbs or opener, or k of 6 or 7.
    prompts_path: str | None = None

    _home = field_validator("prompts_path")(classmethod(lambda cls, v: _expand_home(v)))


class DistributedSmokeConfig(Section):
    """A stage that proves the multi-process path: a few ZeRO steps on a tiny causal LM under accelerate."""

    enabled: bool = False
    num_processes: int = Field(2, ge=1)
    deepspeed_config: Path = Path("configs/deepspeed/zero2.json")
    steps: int = Field(3, ge=1)
    seed: int = 0


class LaunchConfig(Section):
    """How multi-process stages launch (`pipeline.runner.launch_stage`, through `accelerate launch`).

    `num_processes` ranks run each data-parallel stage (gold_score, bon_sample, bon_score[s] and the RL arms'
    <arm>_gold, eval_proxy[p], knowledge_base, knowledge[p], <arm>_sample): work split by shard of prompts or by
    scoring batch, the artifact the same bytes for any number (so it enters no fingerprint); 1 = in this process.
    One rank per GPU on a GPU machine; on CPU, one process each. Data-parallel stages need no DeepSpeed.

    For the RL training sections (ppo, rl, dpo) both keys are defaults: a section that does not set its own
    `num_processes` or `deepspeed_config` takes the one set here; one set in neither keeps the section's own default
    (2 processes under configs/deepspeed/zero2.json). They are not defaults for `proxy_training` (train_proxy[p]):
    a proxy's training depends slightly on its rank count, so raising the data-parallel ranks must not retrain every
    proxy; set `proxy_training.num_processes` / `deepspeed_config` (default 1 process without DeepSpeed) yourself.
    """

    num_processes: int = Field(1, ge=1)
    deepspeed_config: Path | None = None
    # Many machines (`pipeline.machines`): where a stage runs, not what it computes, so none of these keys enters a
    # fingerprint. `num_processes` (here and in ppo/rl/dpo) is per machine: a stage runs num_processes × num_machines
    # ranks, and an RL stage's fingerprint counts that total (its world size), so 2 machines × 4 GPUs reuse the cache
    # of 1 machine × 8. `standard`: the same `overopt run` on every node, `launch.machine_rank=k` on node k, over a
    # cache root every node shares (rank 0 leads: takes the lock, runs the inline stages, commits; the others join
    # its multi-process stages). `slurm`: the same, machine_rank / num_machines / main_process_ip from SLURM's
    # environment. `deepspeed_hostfile`: one `overopt run` on the first host of `hostfile`; accelerate's DeepSpeed
    # launcher (pdsh) starts the ranks of every DeepSpeed stage on every host, data-parallel stages run on this host.
    num_machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None  # the leader's address (default: its host name, published to the others)
    main_process_port: int | None = Field(None, ge=1, le=65535)  # default: a free port the leader picks per stage
    launcher: Literal["standard", "slurm", "deepspeed_hostfile"] = "standard"
    hostfile: Path | None = None  # DeepSpeed hostfile (`host slots=N` a line), for launcher: deepspeed_hostfile
    # A follower gives up (clear error) when no live leader appears, or the leader's heartbeat stops, for this long;
    # the leader gives up when a machine has not joined within it.
    leader_timeout_s: float = Field(600.0, gt=0)
    # One name for this run, the same on every machine and new for each run (slurm: slurm-<job id>.<step id> unless
    # set). With it a follower knows the leader's session as its own even when it starts after the leader (a leader
    # that already failed is named at once, not at leader_timeout_s); without it, only a session begun after the
    # follower, or one whose heartbeat advances, is taken for this run's.
    run_id: str | None = Field(None, min_length=1)

    @field_validator("run_id", mode="before")
    @classmethod
    def _run_id_text(cls, value):
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # launch.run_id=17

    @model_validator(mode="after")
    def _check_machines(self) -> LaunchConfig:
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"launch.machine_rank {self.machine_rank} must be below launch.num_machines "
                             f"{self.num_machines}")
        if self.launcher == "deepspeed_hostfile":
            if self.hostfile is None:
                raise ValueError("launch.launcher deepspeed_hostfile needs launch.hostfile (DeepSpeed's hostfile)")
            if self.machine_rank != 0:
                raise ValueError("launch.launcher deepspeed_hostfile: one `overopt run`, on the first host of the "
                                 "hostfile (launch.machine_rank 0); DeepSpeed starts the other hosts' ranks")
        elif self.hostfile is not None:
            raise ValueError("launch.hostfile is read only with launch.launcher: deepspeed_hostfile")
        return self


# The RL training sections whose `num_processes` / `deepspeed_config` default to the launch section's, when set there.
LAUNCHED_SECTIONS = ("ppo", "rl", "dpo")


class StudyConfig(Section):
    study: str = "tiny"
    run: RunConfig = RunConfig()
    launch: LaunchConfig = LaunchConfig()
    world: WorldConfig = WorldConfig()
    policy: PolicyConfig = PolicyConfig()
    gold: GoldConfig = GoldConfig()
    gold_label: GoldLabelConfig = GoldLabelConfig()
    proxy_training: RMTrainingConfig = RMTrainingConfig()
    proxies: list[ProxyConfig] = []
    eval_proxy: EvalProxyConfig = EvalProxyConfig()
    bon: BonConfig | None = BonConfig()
    ppo: PPOConfig | None = None
    rl: GroupRLConfig | None = None
    dpo: DPOConfig | None = None
    knowledge: KnowledgeConfig = KnowledgeConfig()
    ood: OODConfig = OODConfig()
    distributed_smoke: DistributedSmokeConfig = DistributedSmokeConfig()
    # A sweep (`pipeline.sweep`): override key -> the values it takes; the keys are crossed into points, each the
    # study with those overrides applied. A key naming several override keys joined by commas sets them all to the
    # same value (`proxies.a.alpha,proxies.b.alpha: [0.01, 0.1]`: one swept value, two proxies). Not part of any
    # stage's config slice, so it changes no fingerprint: a point equal to the study is the study.
    sweep: dict[str, list[Any]] = {}
    # The proxy entry every other entry is compared with in the sweep report and in the report over worlds
    # (`world.seeds`) (default: the first entry).
    sweep_baseline: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _launch_defaults(cls, data: Any) -> Any:
        """`launch.num_processes` / `launch.deepspeed_config`, where set, fill the same keys of each RL training
        section that does not set them itself (the section's own key wins)."""
        if not isinstance(data, dict) or not isinstance(data.get("launch"), dict):
            return data
        launch = {k: v for k, v in data["launch"].items() if k in ("num_processes", "deepspeed_config")}
        out = dict(data)
        for name in LAUNCHED_SECTIONS:
            if isinstance(out.get(name), dict):
                out[name] = {**launch, **out[name]}
        return out

    def proxy_launch(self) -> tuple[int, Path | None, int]:
        """(processes per machine, DeepSpeed config, machines) of every train_proxy stage: proxy_training's keys (one
        process on the leader when neither is set, whatever the launch section says: see `RMTrainingConfig`). Without
        DeepSpeed, a deepspeed_hostfile launch keeps it on the first host (as data-parallel stages: pdsh starts only
        DeepSpeed stages on the other hosts)."""
        tr, launch = self.proxy_training, self.launch
        if tr.num_processes is None and tr.deepspeed_config is None:
            return 1, None, 1
        ds = tr.deepspeed_config
        machines = 1 if ds is None and launch.launcher == "deepspeed_hostfile" else launch.num_machines
        return tr.num_processes or 1, ds, machines

    @model_validator(mode="after")
    def _proxy_batches_divide(self) -> "StudyConfig":
        """Every trained proxy's batch splits evenly over train_proxy's ranks (each takes batch_size / world size)."""
        n, _, machines = self.proxy_launch()
        ranks = f"proxy_training.num_processes ({n})"
        if machines > 1:
            ranks = f"the world size, {ranks} × launch.num_machines ({machines}) = {n * machines}"
        for p in self.proxies:
            size = p.resolved_training(self.proxy_training).batch_size
            if (proxy_spec(p.type).trained or proxy_spec(p.type).composite) and size % (n * machines):
                key = f"proxies.{p.name}.training.batch_size" if p.training.batch_size else "proxy_training.batch_size"
                raise ValueError(f"{key} ({size}) must be divisible by {ranks}: each of train_proxy's ranks takes an "
                                 f"equal share of the batch")
        return self

    @field_validator("sweep")
    @classmethod
    def _sweep_keys(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in sweep.items():
            for part in sweep_keys(key):
                if not all(part.split(".")):
                    raise ValueError(f"sweep key {key!r} has an empty part")
                if part.split(".")[0] in SWEEP_RESERVED:
                    raise ValueError(f"sweep key {key!r}: {part.split('.')[0]} cannot be swept (the points of a "
                                     f"sweep share one study name, cache and report directory)")
            if not values:
                raise ValueError(f"sweep key {key!r} has no values")
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise ValueError(f"sweep key {key!r} lists {repeated[0]!r} twice")
        return sweep

    @model_validator(mode="after")
    def _world_size(self) -> "StudyConfig":
        """Over several machines an RL section's checks that count its ranks (batch sizes divisible over them) hold
        for its world size, num_processes × launch.num_machines: the config its stage gets (`study._world_view`)."""
        for name in LAUNCHED_SECTIONS if self.launch.num_machines > 1 else ():
            section = getattr(self, name)
            if section is None:
                continue
            world = section.num_processes * self.launch.num_machines
            try:
                type(section).model_validate(section.model_dump() | {"num_processes": world})
            except ValidationError as e:
                raise ValueError(f"{name}.num_processes {section.num_processes} on each of launch.num_machines "
                                 f"{self.launch.num_machines} machines is {world} ranks: "
                                 f"{e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return self

    @model_validator(mode="after")
    def _world_seeds(self) -> "StudyConfig":
        if self.world.seeds > 1 and self.policy.source != "tiny":
            raise ValueError(f"world.seeds ({self.world.seeds}) is only for the tiny world (policy.source: tiny): at "
                             f"paper scale there is no world to re-make; set world.seeds to 1")
        if self.world.seeds > 1 and self.sweep:
            raise ValueError(f"world.seeds ({self.world.seeds}) and sweep: cannot be combined (every sweep point in "
                             f"every world); run the sweep with world.seeds: 1, or one study per world seed")
        return self

    @field_validator("proxies")
    @classmethod
    def _entry_names(cls, proxies: list[ProxyConfig]) -> list[ProxyConfig]:
        for i, p in enumerate(proxies):
            if not re.fullmatch(PROXY_NAME, p.name):  # `@seed<k>` is kept for the copies `seeds:` makes
                raise ValueError(f"proxy name {p.name!r} (proxies.{i}.name) must match [A-Za-z0-9_-]+ (several "
                                 f"seeds of a proxy are one entry with seeds: K)")
        return proxies

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        if not self.proxies:
            raise ValueError("proxies: a study needs at least one proxy (e.g. proxies: [{name: bt, type: bt}])")
        expanded = self.expanded_proxies()
        names = [p.name for p in expanded]
        names += [m.name for p in expanded if proxy_spec(p.type).composite for m in p.member_specs()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"proxies: duplicate names {dup} (an ensemble's or warm's members are named <name>-m<i>)")
        if self.gold_label.source == "policy_samples" and self.policy.source != "tiny":
            raise ValueError("gold_label.source 'policy_samples' needs the tiny world (policy.source: tiny)")
        if self.gold.type == "world" and self.policy.source != "tiny":
            raise ValueError("gold.type 'world' only exists in the tiny world (policy.source: tiny)")
        if self.knowledge.enabled and self.policy.source != "tiny" and not self.knowledge.pairs_path:
            raise ValueError("knowledge.enabled is true at paper scale but knowledge.pairs_path is not set (minimal "
                             "pairs are generated only in the tiny world)")
        sections = [("ppo", self.ppo), ("rl", self.rl), ("dpo", self.dpo)]
        if self.ppo is not None:
            sections += [(f"ppo.variants.{n}", self.ppo.variant(n)) for n in self.ppo.variants]
        for arm, section in sections:
            if section is None:
                continue
            named = section.proxies if arm != "dpo" else [section.proxy] if section.proxy else None
            if named == []:
                raise ValueError(f"{arm}.proxies is empty: no run would be made; list proxy entries, leave it unset "
                                 f"(every entry) or remove the {arm.split('.')[0]} section to run none")
            unknown = sorted(set(named or []) - {p.name for p in self.proxies})
            if unknown:
                key = "dpo.proxy" if arm == "dpo" else f"{arm}.proxies"
                raise ValueError(f"{key} names {unknown}, which are not proxies of this study "
                                 f"({[p.name for p in self.proxies]})")
            if self.bon is None:
                raise ValueError(f"{arm} evaluates on the best-of-n evaluation prompts and beside the best-of-n "
                                 f"curves: it needs the bon section")
        if self.ppo is not None:
            self.ppo.check_variants_differ()
        if self.sweep_baseline is not None and self.sweep_baseline not in {p.name for p in self.proxies}:
            raise ValueError(f"sweep_baseline {self.sweep_baseline!r} is not a proxy entry of this study "
                             f"({[p.name for p in self.proxies]})")
        return self

    @model_validator(mode="after")
    def _ood_consistent(self) -> "StudyConfig":
        if not self.ood.enabled:
            return self
        if self.bon is None:
            raise ValueError("ood.enabled: OOD evaluation samples best-of-n and the RL exports on OOD prompts with the "
                             "bon section's settings: it needs the bon section")
        if self.policy.source != "tiny" and not self.ood.prompts_path:
            raise ValueError("ood.enabled at paper scale (policy.source: hub) needs ood.prompts_path, a file of "
                             "held-out prompts (there is no world to draw OOD prompts from)")
        if self.policy.source == "tiny" and not self.ood.prompts_path and self.ood.n_prompts is not None:
            from pipeline import world as W

            space = len(W.ood_prompt_space())
            if self.ood.n_prompts > space:
                raise ValueError(f"ood.n_prompts ({self.ood.n_prompts}) exceeds the tiny world's {space} OOD prompts")
        return self

    def baseline_entry(self) -> str:
        """The proxy entry a sweep (or the report over worlds) compares the others with: `sweep_baseline`, default
        the first entry."""
        return self.sweep_baseline or self.proxies[0].name

    def expanded_proxies(self) -> list[ProxyConfig]:
        """Every concrete proxy of the study: each entry's seed copies, in the study's order. Stages are built per
        expanded proxy."""
        return [c for p in self.proxies for c in p.seed_copies()]

    def proxy_groups(self) -> dict[str, list[str]]:
        """Entry name -> the names of its seed copies (`[name]` for a single-seed entry)."""
        return {p.name: [c.name for c in p.seed_copies()] for p in self.proxies}

    def knowledge_enabled(self) -> bool:
        """Whether the study runs the knowledge-use diagnostics (`knowledge.enabled`, resolved)."""
        if self.knowledge.enabled is not None:
            return self.knowledge.enabled
        return self.policy.source == "tiny" or self.knowledge.pairs_path is not None


# Top-level keys a sweep may not vary: its points must share the study's name (the report's fingerprint), cache and
# reports directory, and a point has no sweep of its own.
SWEEP_RESERVED = ("study", "run", "sweep", "sweep_baseline")


def sweep_keys(key: str) -> list[str]:
    """The override keys one `sweep:` key sets: `a.b` -> [`a.b`]; `a.x,b.x` (tied keys) -> [`a.x`, `b.x`]."""
    return [k.strip() for k in key.split(",")]


# ----------------------------------------------------------------------------------------------------------------
# loading


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        return path, yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e.problem})") from None


def _set_path(tree: dict, path: list[str], value: Any, item: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        if isinstance(node, list):
            node = _list_item(node, part, path[: i + 1], item)
            continue
        node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {item!r}: {'.'.join(path[: i + 1])} is not a section")
    if isinstance(node, list):
        raise ConfigError(f"override {item!r}: cannot replace a whole list item; set one of its keys")
    node[path[-1]] = value


def _list_item(items: list, part: str, where: list[str], item: str) -> dict:
    """`proxies.bt.lr=...` addresses the list item whose `name` is `bt` (or its index)."""
    for entry in items:
        if isinstance(entry, dict) and entry.get("name") == part:
            return entry
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    names = [e.get("name") for e in items if isinstance(e, dict)]
    raise ConfigError(f"override {item!r}: no entry {part!r} in {'.'.join(where[:-1])} (names: {names})")


def _closest_key(model: type[BaseModel], loc: tuple) -> str | None:
    """Walk the schema along `loc` and suggest the closest valid field name for its last part."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                cls = cand
                break
            inner = getattr(cand, "__args__", ())
            if inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
                cls = inner[0]
                break
    fields = list(getattr(cls, "model_fields", {}))
    typo = str(loc[-1])
    # a key with something added or cut off (`lr_rate`, `noise`) means that key, though a short key scores low in
    # difflib's ratio against a long typo
    affixed = [f for f in fields if min(len(f), len(typo)) >= 2 and (typo.startswith(f) or f.startswith(typo))]
    if affixed:
        return max(affixed, key=len)
    match = difflib.get_close_matches(typo, fields, n=1, cutoff=0.5)
    return match[0] if match else None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            hint = _closest_key(StudyConfig, loc)
            lines.append(f"  unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            msg = e["msg"].removeprefix("Value error, ")
            if not loc and e["type"] == "value_error":  # a cross-field check: its message names the keys
                lines.append(f"  {msg}")
            else:
                lines.append(f"  {key}: {msg}{got_s}")
    return "\n".join(lines)


def read_config_tree(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A study YAML as a plain tree with `section.key=value` overrides applied, not validated yet."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        keys, value = _parse_override(item)
        _set_path(tree, keys, value, item)
    return tree


def set_key(tree: dict, key: str, value: Any) -> None:
    """Set the dotted `key` of a config tree to an already parsed value, addressed as an override addresses it (list
    entries by name: `proxies.bt.alpha`); a key that cannot be set is a ConfigError naming it."""
    item = f"{key}={value!r}"
    keys, _ = _parse_override(f"{key}=")  # the key checks of an override; the value is already parsed
    _set_path(tree, keys, value, item)


def validate_config(tree: dict, source: str) -> StudyConfig:
    """A config tree as a `StudyConfig`; a validation error is a ConfigError naming the key (`source` says where the
    tree came from)."""
    try:
        return StudyConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read a study YAML, apply `section.key=value` overrides, validate. Raises ConfigError naming the bad key."""
    return validate_config(read_config_tree(path, overrides), str(path))


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (saved next to every run's log)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# Stage configs: the exact slice of the study a stage depends on (its fingerprint), assembled by `pipeline.study`.


class BaseModelRef(Section):
    """Where the base causal LM comes from: the `policy` input artifact (tiny world) or a hub id / directory."""

    model_id: str | None = None  # None = the `policy` input artifact's model/ directory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


class GoldScoreStageConfig(Section):
    """What the gold-scored candidates depend on (not the noise, pair budget or split: those are gold_label's)."""

    source: Literal["policy_samples", "unified_feedback"]
    gold: GoldConfig
    # unified_feedback
    dataset_path: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    shuffle_seed: int = 42
    n_pairs: int | None = None
    # policy_samples (tiny world)
    policy: BaseModelRef | None = None
    samples_per_prompt: int | None = None
    sampling: SamplingConfig | None = None
    seed: int = 0
    sampling_backend: Literal["hf", "vllm"] = Field("hf", json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    tensor_parallel_size: int = Field(1, json_schema_extra=NOT_FINGERPRINTED)


class GoldLabelStageConfig(Section):
    n_pairs: int
    test_fraction: float
    noise_rate: float
    noise_seed: int
    seed: int


class TrainProxyStageConfig(Section):
    proxy: ProxyConfig
    training: RMTrainingConfig
    base: BaseModelRef


class WarmAverageStageConfig(Section):
    """A warm proxy's averaging: its trained members' weights, loaded in the base model's dtype, averaged into one."""

    proxy: ProxyConfig
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class ScorerStageConfig(Section):
    """A scorer by name: "gold" or a proxy (trained, checkpoint, ensemble or warm)."""

    name: str
    gold: GoldConfig | None = None
    proxy: ProxyConfig | None = None
    batch_size: int = Field(64, json_schema_extra=NOT_FINGERPRINTED)
    max_length: int = 1024
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # trained proxies: the base model's dtype


class EvalProxyStageConfig(Section):
    eval: EvalProxyConfig
    scorer: ScorerStageConfig


class EvalPromptsStageConfig(Section):
    """Only what picks the held-out prompts: label noise or the gold model must not re-draw best-of-n samples."""

    dataset_path: str
    dataset_config: str | None
    dataset_split: str
    shuffle_seed: int
    n_pairs: int
    n_prompts: int


class OODPromptsStageConfig(Section):
    """ood_prompts: the OOD evaluation prompts, drawn from the tiny world's OOD prompt space (seeded by the world's
    seed) or read from `prompts_path`."""

    n_prompts: int
    seed: int
    prompts_path: str | None = None


class BonSampleStageConfig(Section):
    n_samples: int
    sampling: SamplingConfig
    seed: int
    prompts_per_shard: int
    backend: Literal["hf", "vllm"]
    policy: BaseModelRef
    tensor_parallel_size: int = Field(1, json_schema_extra=NOT_FINGERPRINTED)


class BonCurveStageConfig(Section):
    proxy: str
    ns: list[int]
    bootstrap: int
    ci: float
    nested_estimator: bool
    seed: int


class KnowledgePairsStageConfig(Section):
    """knowledge_pairs: minimal pairs on the evaluation prompts (tiny world) or read from a file."""

    n_pairs: int
    seed: int
    pairs_path: str | None = None


class KnowledgeBaseStageConfig(Section):
    """knowledge_base: the base policy's summed response log-probability as a reference reward on the minimal pairs."""

    policy: BaseModelRef
    batch_size: int = Field(64, json_schema_extra=NOT_FINGERPRINTED)
    max_length: int
    bootstrap: int
    seed: int


class KnowledgeStageConfig(Section):
    """knowledge[p]: one proxy's rewards on the minimal pairs."""

    scorer: ScorerStageConfig
    bootstrap: int
    seed: int


class ReportSetting(Section):
    """The study's setting the report states in its first lines: the base policy, how the preference pairs were
    made (budget, split, label noise), how proxies were trained (shared settings, LoRA or full) and each entry."""

    policy: PolicyConfig
    gold_label: GoldLabelConfig
    proxy_training: RMTrainingConfig
    proxies: list[ProxyConfig]  # the study's entries (not their seed copies), each with its `seeds`


class ReportStageConfig(Section):
    study: str
    proxies: list[str]  # every expanded proxy (seed copies included), in the study's order
    # entry name -> its seed copies; an entry with several is aggregated over seeds (empty: each proxy its own)
    groups: dict[str, list[str]] = {}
    # arm ("ppo", "ppo_<variant>", "grpo", "rloo") -> proxy -> its runs (one per seed)
    rl_runs: dict[str, dict[str, list[str]]] = {}
    # arm -> what sets it apart, for the setting lines: a PPO variant's overrides of the ppo section, an arm's
    # reward transform
    rl_settings: dict[str, dict[str, Any]] = Field({}, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    # None (a slice from before it existed, or a hand-made report): the setting lines say what the inputs tell
    setting: ReportSetting | None = Field(None, json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)


class PPOStageConfig(Section):
    """ppo[p]: the training settings, the proxy it optimises (a frozen scorer) and the initial policy."""

    ppo: PPOConfig
    scorer: ScorerStageConfig
    policy: BaseModelRef


class GroupRLStageConfig(Section):
    """grpo[p] / rloo[p]: one algorithm's training settings, the proxy (a frozen scorer) and the initial policy."""

    algo: Literal["grpo", "rloo"]
    rl: GroupRLConfig
    scorer: ScorerStageConfig
    policy: BaseModelRef


class DPOStageConfig(Section):
    """dpo[p]: the training settings, the pairs it trains on (which label column, how many) and the initial policy
    (also its frozen reference). No proxy: the run is keyed by one only for the evaluation stages after it."""

    dpo: DPOConfig
    labels: Literal["noisy", "clean"]
    n_train_pairs: int | None
    policy: BaseModelRef


class PPOSampleStageConfig(Section):
    """ppo_sample[p]: samples of every exported policy on the evaluation prompts, KL to the initial policy measured
    on them, and the proxy's scores."""

    n_samples: int
    max_new_tokens: int
    batch_size: int = Field(512, json_schema_extra=NOT_FINGERPRINTED)
    seed: int
    # each export samples its prompts in shards of this many (None: all of them), shard i with seed + i
    # (PPOEvalConfig.prompts_per_shard): units fixed by the config, so any number of ranks samples the same
    prompts_per_shard: int | None = Field(None, ge=1)
    policy: BaseModelRef
    scorer: ScorerStageConfig
    # generation only: "vllm" (PPOEvalConfig.backend of the arm's section); the KL is measured with the HF models
    backend: Literal["hf", "vllm"] = Field("hf", json_schema_extra=FINGERPRINTED_UNLESS_DEFAULT)
    tensor_parallel_size: int = Field(1, json_schema_extra=NOT_FINGERPRINTED)


class PPOCurveStageConfig(Section):
    proxy: str
    bootstrap: int
    ci: float
    seed: int
