"""From a `StudyConfig` to the DAG of stages of one over-optimization study.

    world ─► sft_policy ─► gold_score ─► gold_label ─► train_proxy[p] ─► eval_proxy[p] ────────────┐
                 │                               │          ├──────────► bon_score[p] ─► bon_curve[p] ─┤
                 ├─► bon_sample ─────────────────┼─────────────────────► bon_score[gold] ┘     │       │
                 │                               │          └─► ppo[p] ─► ppo_sample[p] ─► ppo_gold[p] │
                 └───────────────────────────────┴───────────────┘              └─► ppo_curve[p] ◄────┴► report
    (grpo[p] / rloo[p] as ppo[p]; dpo[p] from gold_label's pairs alone, no proxy; each with its _sample, _gold, _curve)
    world ─► knowledge_pairs ─┬─► knowledge_base (with sft_policy) ───────────────────────────────────────────► report
                              └─► knowledge[p] (with train_proxy[p]) ─────────────────────────────────────────► report

A warm proxy's members train as train_proxy[p-m<i>]; warm_average[p] averages their weights into the model its scorer
stages read in place of train_proxy[p].
Each PPO variant (`ppo.variants`) adds an arm of the same shape: ppo_<name>[p] ─► ppo_<name>_sample[p] ─► ... The
rl section's GRPO and RLOO (grpo[p], rloo[p]) share the same evaluation stages.

With `ood.enabled`, ood_prompts (OOD evaluation prompts, held out from the ID ones) and an OOD copy of every
evaluation stage — bon_sample_ood, bon_score_ood[s], bon_curve_ood[p], <arm>_sample_ood[run], <arm>_gold_ood[run],
<arm>_curve_ood[run] — with the same config (so the same seeds) and ood_prompts as its `prompts` input (`_ood_stages`).

Each stage gets exactly the slice of the config it depends on, so a change re-runs only what it affects. At paper
scale (`policy.source: hub`) there is no world or sft_policy stage: the base model is a hub id, pairs come from a
dataset in the Unified-Feedback schema, and an `eval_prompts` stage holds out prompts of that dataset for best-of-n.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config import (
    BaseModelRef,
    BonCurveStageConfig,
    BonSampleStageConfig,
    DPOStageConfig,
    EvalPromptsStageConfig,
    EvalProxyStageConfig,
    GoldLabelStageConfig,
    GoldScoreStageConfig,
    GroupRLStageConfig,
    KnowledgeBaseStageConfig,
    KnowledgePairsStageConfig,
    KnowledgeStageConfig,
    OODPromptsStageConfig,
    PPOCurveStageConfig,
    PPOSampleStageConfig,
    PPOStageConfig,
    ProxyConfig,
    ReportSetting,
    ReportStageConfig,
    ScorerStageConfig,
    StudyConfig,
    TrainProxyStageConfig,
    WarmAverageStageConfig,
)
from pipeline.proxy_types import spec as proxy_spec
from pipeline.runner import StageNode


def _base_ref(cfg: StudyConfig) -> BaseModelRef:
    if cfg.policy.source == "hub":
        return BaseModelRef(model_id=cfg.policy.model_id, dtype=cfg.policy.dtype,
                            trust_remote_code=cfg.policy.trust_remote_code)
    return BaseModelRef(dtype=cfg.policy.dtype)


def _scorer_inputs(proxy: ProxyConfig, artifact: str) -> dict[str, str]:
    """Upstream artifacts a proxy's scorer needs: its trained model, each ensemble member's, or a warm's averaged
    model (which plays the part of a trained model)."""
    if proxy.type == "checkpoint":
        return {}
    if proxy.type == "ensemble":
        return {f"member{i}": f"{artifact}[{m.name}]" for i, m in enumerate(proxy.member_specs())}
    if proxy.type == "warm":
        return {"model": f"warm_average[{proxy.name}]"}
    return {"model": f"{artifact}[{proxy.name}]"}


def _local(*paths: str | None) -> tuple[str, ...]:
    """The configured paths that are on this machine (their size/mtime signature enters the stage's fingerprint)."""
    from pipeline.hf_data import looks_local

    return tuple(p for p in paths if p and looks_local(p))


def check_local_paths(cfg: StudyConfig) -> None:
    """Before any stage runs: every configured local model directory or data file exists (hub ids are not checked)."""
    from pipeline.config import ConfigError
    from pipeline.hf_data import looks_local

    wanted = {"policy.model_id": cfg.policy.model_id, "gold.model_id": cfg.gold.model_id,
              "gold_label.dataset_path": cfg.gold_label.dataset_path, "eval_proxy.hhh_path": cfg.eval_proxy.hhh_path,
              "eval_proxy.mt_bench_path": cfg.eval_proxy.mt_bench_path,
              "eval_proxy.rewardbench_path": cfg.eval_proxy.rewardbench_path,
              "eval_proxy.rewardbench2_path": cfg.eval_proxy.rewardbench2_path,
              "knowledge.pairs_path": cfg.knowledge.pairs_path, "ood.prompts_path": cfg.ood.prompts_path,
              **{f"proxies.{p.name}.path": p.path for p in cfg.proxies}}
    missing = [f"{key}: {path}" for key, path in wanted.items()
               if path and looks_local(path) and not Path(path).expanduser().exists()]
    if missing:
        raise ConfigError("configured local path(s) not found:\n  " + "\n  ".join(missing))


def build_stages(cfg: StudyConfig) -> list[StageNode]:
    """The study's DAG: base policy, gold labels, proxies, then each arm (best-of-n, PPO), then the report."""
    nodes = _base_and_labels(cfg) + _proxy_stages(cfg)
    if cfg.bon is not None:
        nodes += _bon_stages(cfg)
    if cfg.ppo is not None:
        nodes += _ppo_stages(cfg)
    if cfg.rl is not None:
        nodes += _group_rl_stages(cfg)
    if cfg.dpo is not None:
        nodes += _dpo_stages(cfg)
    if cfg.knowledge_enabled():
        nodes += _knowledge_stages(cfg)
    if cfg.distributed_smoke.enabled:
        ds = cfg.distributed_smoke
        nodes.append(StageNode("distributed_smoke", "distributed_smoke", ds, launcher="accelerate",
                               num_processes=ds.num_processes, deepspeed_config=Path(ds.deepspeed_config)))
    if cfg.ood.enabled:
        nodes += _ood_stages(cfg, nodes)
        return nodes + [_with_ood_report_inputs(_report(cfg), nodes)]
    return nodes + [_report(cfg)]


def _policy_input(cfg: StudyConfig) -> dict[str, str]:
    """The base policy as an upstream artifact (tiny world) — at paper scale it is a hub id or directory."""
    return {"policy": "sft_policy"} if cfg.policy.source == "tiny" else {}


def _eval_prompts_input(cfg: StudyConfig) -> str:
    """The stage holding the held-out evaluation prompts of best-of-n and RL."""
    return "world" if cfg.policy.source == "tiny" else "eval_prompts"


def _base_and_labels(cfg: StudyConfig) -> list[StageNode]:
    nodes: list[StageNode] = []
    tiny = cfg.policy.source == "tiny"
    if tiny:
        nodes.append(StageNode("world", "world", cfg.world))
        nodes.append(StageNode("sft_policy", "sft_policy", cfg.policy, {"world": "world"}))
    lab = cfg.gold_label
    if lab.source == "policy_samples":
        score_cfg = GoldScoreStageConfig(source=lab.source, gold=cfg.gold, policy=_base_ref(cfg),
                                         samples_per_prompt=lab.samples_per_prompt, sampling=lab.sampling,
                                         seed=lab.sampling_seed, sampling_backend=lab.sampling_backend,
                                         tensor_parallel_size=lab.tensor_parallel_size)
    else:
        score_cfg = GoldScoreStageConfig(source=lab.source, gold=cfg.gold, dataset_path=lab.dataset_path,
                                         dataset_config=lab.dataset_config, dataset_split=lab.dataset_split,
                                         shuffle_seed=lab.shuffle_seed, n_pairs=lab.n_pairs)
    nodes.append(StageNode("gold_score", "gold_score", score_cfg,
                           {"world": "world", **_policy_input(cfg)} if tiny else {},
                           external=_local(cfg.gold.model_id, lab.dataset_path), **_data_parallel(cfg)))
    nodes.append(StageNode("gold_label", "gold_label", GoldLabelStageConfig(
        n_pairs=lab.n_pairs, test_fraction=lab.test_fraction, noise_rate=lab.noise_rate, noise_seed=lab.noise_seed,
        seed=lab.seed), {"scores": "gold_score"}))
    if not tiny and (cfg.bon is not None or cfg.ppo is not None):  # paper scale: held-out Unified-Feedback prompts
        nodes.append(StageNode("eval_prompts", "eval_prompts", EvalPromptsStageConfig(
            dataset_path=lab.dataset_path, dataset_config=lab.dataset_config, dataset_split=lab.dataset_split,
            shuffle_seed=lab.shuffle_seed, n_pairs=lab.n_pairs, n_prompts=cfg.bon.n_prompts),
            external=_local(lab.dataset_path)))
    return nodes


def _proxy_stages(cfg: StudyConfig) -> list[StageNode]:
    """One train_proxy per trained model (an ensemble's or warm's members are trained models of their own), a
    warm_average per warm proxy, one eval_proxy per proxy; a proxy with `seeds: K` is K proxies here
    (`StudyConfig.expanded_proxies`)."""
    nodes: list[StageNode] = []
    for proxy in cfg.expanded_proxies():
        for member in proxy.member_specs():
            if not proxy_spec(member.type).trained:
                continue
            nodes.append(StageNode(
                f"train_proxy[{member.name}]", "train_proxy",
                TrainProxyStageConfig(proxy=member.canonical(), training=member.resolved_training(cfg.proxy_training),
                                      base=_base_ref(cfg)),
                {"pairs": "gold_label", **_policy_input(cfg)}, external=_local(cfg.policy.model_id),
                **_launch(*cfg.proxy_launch())))
        if proxy.type == "warm":
            nodes.append(StageNode(
                f"warm_average[{proxy.name}]", "warm_average",
                WarmAverageStageConfig(proxy=proxy.canonical(), dtype=cfg.policy.dtype),
                {f"member{i}": f"train_proxy[{m.name}]" for i, m in enumerate(proxy.member_specs())}))
        scorer = ScorerStageConfig(name=proxy.name, proxy=proxy.canonical(), batch_size=cfg.eval_proxy.batch_size,
                                   max_length=proxy.resolved_training(cfg.proxy_training).max_length,
                                   dtype=cfg.policy.dtype)
        nodes.append(StageNode(f"eval_proxy[{proxy.name}]", "eval_proxy",
                               EvalProxyStageConfig(eval=cfg.eval_proxy, scorer=scorer),
                               {"pairs": "gold_label", **_scorer_inputs(proxy, "train_proxy")},
                               external=_local(proxy.path, cfg.eval_proxy.hhh_path, cfg.eval_proxy.mt_bench_path,
                                              cfg.eval_proxy.rewardbench_path, cfg.eval_proxy.rewardbench2_path),
                               **_data_parallel(cfg)))
    return nodes


def _sample_scorer(cfg: StudyConfig, proxy: ProxyConfig) -> ScorerStageConfig:
    """A proxy as the scorer of policy samples (best-of-n and RL share the token limit and batch size)."""
    return ScorerStageConfig(name=proxy.name, proxy=proxy.canonical(), batch_size=cfg.bon.score_batch_size,
                             max_length=cfg.bon.score_max_length, dtype=cfg.policy.dtype)


def _gold_scorer(cfg: StudyConfig) -> ScorerStageConfig:
    return ScorerStageConfig(name="gold", gold=cfg.gold, batch_size=cfg.bon.score_batch_size,
                             max_length=cfg.bon.score_max_length)


def _bon_stages(cfg: StudyConfig) -> list[StageNode]:
    """bon_sample (proxy-independent), bon_score[gold], and per expanded proxy bon_score[p] and bon_curve[p]."""
    bon = cfg.bon
    nodes = [StageNode("bon_sample", "bon_sample", BonSampleStageConfig(
        n_samples=bon.n_samples, sampling=bon.sampling, seed=bon.seed, prompts_per_shard=bon.prompts_per_shard,
        backend=bon.backend, policy=_base_ref(cfg), tensor_parallel_size=bon.tensor_parallel_size),
        {"prompts": _eval_prompts_input(cfg), **_policy_input(cfg)},
        external=_local(cfg.policy.model_id), **_data_parallel(cfg))]
    nodes.append(StageNode("bon_score[gold]", "bon_score", _gold_scorer(cfg), {"samples": "bon_sample"},
                           external=_local(cfg.gold.model_id), **_data_parallel(cfg)))
    for proxy in cfg.expanded_proxies():
        inputs = {"samples": "bon_sample", **_scorer_inputs(proxy, "train_proxy")}
        if proxy.type == "ensemble":  # reuse the members' scores instead of re-scoring
            inputs.update({f"member{i}_scores": f"bon_score[{m.name}]" for i, m in enumerate(proxy.member_specs())})
            for m in proxy.member_specs():
                nodes.append(StageNode(f"bon_score[{m.name}]", "bon_score", _sample_scorer(cfg, m),
                                       {"samples": "bon_sample", "model": f"train_proxy[{m.name}]"},
                                       **_data_parallel(cfg)))
        # an ensemble's stage combines its members' score tables: no scoring to split, so no ranks to start
        launch = _launch(1, None) if proxy.type == "ensemble" else _data_parallel(cfg)
        nodes.append(StageNode(f"bon_score[{proxy.name}]", "bon_score", _sample_scorer(cfg, proxy), inputs,
                               external=_local(proxy.path), **launch))
        curve = BonCurveStageConfig(proxy=proxy.name, ns=bon.curve_ns(), bootstrap=bon.bootstrap, ci=bon.ci,
                                    nested_estimator=bon.nested_estimator, seed=bon.seed)
        nodes.append(StageNode(f"bon_curve[{proxy.name}]", "bon_curve", curve,
                               {"proxy_scores": f"bon_score[{proxy.name}]", "gold_scores": "bon_score[gold]",
                                "samples": "bon_sample"}))  # the samples: text of the example responses
    return nodes


def arm_proxies(cfg: StudyConfig, wanted: list[str] | None) -> list[ProxyConfig]:
    """The proxies an RL arm optimises (its `proxies`, entry names; default every entry), in the study's order: each
    entry's first seed copy, the proxy named like the entry. An arm's own `seeds` repeat its runs against that one
    proxy, so RL seeds and proxy seeds stay separate factors (and a seeds: K proxy adds no RL stage)."""
    return [p.seed_copies()[0] for p in cfg.proxies if wanted is None or p.name in wanted]


def rl_runs(cfg: StudyConfig) -> dict[str, dict[str, list[str]]]:
    """arm -> proxy -> run names, for every RL arm of the study (PPO, each PPO variant as `ppo_<name>`, each algorithm
    of the rl section, DPO)."""
    arms: dict[str, dict[str, list[str]]] = {}
    if cfg.ppo is not None:  # the plain arm, then each variant (`ppo.variants`), sharing the section's seeds
        for arm, ppo in cfg.ppo.arms().items():
            arms[arm] = {p.name: [r for r, _ in ppo.runs(p.name)] for p in arm_proxies(cfg, ppo.proxies)}
    if cfg.rl is not None:
        for algo in cfg.rl.algos:
            arms[algo] = {p.name: [r for r, _ in cfg.rl.runs(p.name)] for p in arm_proxies(cfg, cfg.rl.proxies)}
    if cfg.dpo is not None:
        arms["dpo"] = {dpo_proxy(cfg).name: [r for r, _ in cfg.dpo.runs(dpo_proxy(cfg).name)]}
    return arms


def rl_settings(cfg: StudyConfig) -> dict[str, dict]:
    """arm -> what sets it apart, for the report's setting lines: each PPO variant's overrides of the ppo section,
    and the reward transform of an arm (plain PPO, GRPO, RLOO) that uses one. Empty for a study with neither."""
    out: dict[str, dict] = {}
    sections = [("ppo", cfg.ppo)] if cfg.ppo is not None else []
    sections += [(algo, cfg.rl) for algo in cfg.rl.algos] if cfg.rl is not None else []
    for arm, section in sections:
        if section.reward_transform.kind != "none":
            out[arm] = {"reward_transform": section.reward_transform.model_dump(mode="json", exclude_defaults=True)}
    if cfg.ppo is not None:
        out |= {f"ppo_{name}": overrides for name, overrides in cfg.ppo.variants.items()}
    return out


def _data_parallel(cfg: StudyConfig) -> dict:
    """How a data-parallel stage launches: `launch.num_processes` ranks on each machine, no DeepSpeed (the count is
    not part of its fingerprint: `pipeline.runner.is_data_parallel`). Under the deepspeed_hostfile launcher, whose
    multi-node launch is DeepSpeed's, it stays on the first host."""
    machines = 1 if cfg.launch.launcher == "deepspeed_hostfile" else cfg.launch.num_machines
    return _launch(cfg.launch.num_processes, None, machines)


def _launch(n_processes: int, deepspeed_config: Path | None, num_machines: int = 1) -> dict:
    """A stage's launch fields: `n_processes` ranks on each of `num_machines` machines (inline when that is one
    process without DeepSpeed)."""
    multi = n_processes * num_machines > 1 or deepspeed_config is not None
    return {"launcher": "accelerate" if multi else "inline", "num_processes": n_processes,
            "num_machines": num_machines if multi else 1,
            "deepspeed_config": Path(deepspeed_config) if deepspeed_config is not None else None}


def _world_view(section, cfg: StudyConfig):
    """An RL training section as its stage's config: over several machines its `num_processes` (per machine) is
    replaced by the run's world size, so 2 machines × 4 ranks and 1 × 8 are one fingerprint, one artifact (on one
    machine the section is as it always was)."""
    n = cfg.launch.num_machines
    return section if n == 1 else section.model_copy(update={"num_processes": section.num_processes * n})


def _rl_arm(cfg: StudyConfig, arm: str, proxy: ProxyConfig, run: str, seed: int, train: StageNode,
            eval_cfg) -> list[StageNode]:
    """One RL run: its training node `train` (arm[run]), then the stages every RL arm shares: arm_sample[run]
    (exports sampled, KL measured), arm_gold[run] and arm_curve[run] (beside the proxy's best-of-n curve)."""
    scorer_inputs = _scorer_inputs(proxy, "train_proxy")
    return [train,
            StageNode(f"{arm}_sample[{run}]", "ppo_sample", PPOSampleStageConfig(
                n_samples=eval_cfg.n_samples, max_new_tokens=eval_cfg.max_new_tokens or cfg.bon.sampling.max_new_tokens,
                batch_size=eval_cfg.batch_size, seed=cfg.bon.seed, prompts_per_shard=eval_cfg.prompts_per_shard,
                policy=_base_ref(cfg), scorer=_sample_scorer(cfg, proxy), backend=eval_cfg.backend,
                tensor_parallel_size=eval_cfg.tensor_parallel_size),
                {"rl": f"{arm}[{run}]", "prompts": _eval_prompts_input(cfg), **_policy_input(cfg), **scorer_inputs},
                external=_local(cfg.policy.model_id, proxy.path), **_data_parallel(cfg)),
            StageNode(f"{arm}_gold[{run}]", "bon_score", _gold_scorer(cfg), {"samples": f"{arm}_sample[{run}]"},
                      external=_local(cfg.gold.model_id), **_data_parallel(cfg)),
            StageNode(f"{arm}_curve[{run}]", "ppo_curve", PPOCurveStageConfig(
                proxy=run, bootstrap=eval_cfg.bootstrap, ci=eval_cfg.ci, seed=seed),
                {"samples": f"{arm}_sample[{run}]", "gold_scores": f"{arm}_gold[{run}]",
                 **({"bon_curve": f"bon_curve[{proxy.name}]"} if cfg.bon is not None else {})})]


def _ppo_stages(cfg: StudyConfig) -> list[StageNode]:
    """Per PPO arm (the plain `ppo` and each variant `ppo_<name>`), proxy and seed: arm[run] (multi-process) and the
    shared RL evaluation stages. A variant differs from the plain arm only in its training settings: seeds,
    evaluation and launch are the ppo section's."""
    nodes: list[StageNode] = []
    for arm, ppo in cfg.ppo.arms().items():
        for proxy in arm_proxies(cfg, ppo.proxies):
            for run, seed in ppo.runs(proxy.name):
                train = StageNode(
                    f"{arm}[{run}]", "ppo",
                    PPOStageConfig(ppo=_world_view(ppo.training_view(seed), cfg), scorer=_sample_scorer(cfg, proxy),
                                   policy=_base_ref(cfg)),
                    {"pairs": "gold_label", **_policy_input(cfg), **_scorer_inputs(proxy, "train_proxy")},
                    external=_local(cfg.policy.model_id, proxy.path),
                    **_launch(ppo.num_processes, ppo.deepspeed_config, cfg.launch.num_machines))
                nodes += _rl_arm(cfg, arm, proxy, run, seed, train, ppo.eval)
    return nodes


def _group_rl_stages(cfg: StudyConfig) -> list[StageNode]:
    """Per algorithm (GRPO, RLOO through TRL), proxy and seed: algo[run] and the shared RL evaluation stages."""
    rl = cfg.rl
    nodes: list[StageNode] = []
    for algo in rl.algos:
        for proxy in arm_proxies(cfg, rl.proxies):
            for run, seed in rl.runs(proxy.name):
                train = StageNode(
                    f"{algo}[{run}]", "group_rl",
                    GroupRLStageConfig(algo=algo, rl=_world_view(rl.training_view(seed), cfg),
                                       scorer=_sample_scorer(cfg, proxy), policy=_base_ref(cfg)),
                    {"pairs": "gold_label", **_policy_input(cfg), **_scorer_inputs(proxy, "train_proxy")},
                    external=_local(cfg.policy.model_id, proxy.path),
                    **_launch(rl.num_processes, rl.deepspeed_config, cfg.launch.num_machines))
                nodes += _rl_arm(cfg, algo, proxy, run, seed, train, rl.eval)
    return nodes


def dpo_proxy(cfg: StudyConfig) -> ProxyConfig:
    """The proxy that scores DPO's samples (the curves' proxy column) and whose best-of-n curve DPO is drawn beside:
    `dpo.proxy`, default the study's first entry (the baseline). It plays no part in DPO's training."""
    return arm_proxies(cfg, [cfg.dpo.proxy or cfg.proxies[0].name])[0]


def _dpo_stages(cfg: StudyConfig) -> list[StageNode]:
    """Per DPO seed: dpo[run] (trained on the gold-labelled pairs, no proxy in its loop; keyed by `dpo_proxy`) and
    the shared RL evaluation stages."""
    dpo, proxy = cfg.dpo, dpo_proxy(cfg)
    nodes: list[StageNode] = []
    for run, seed in dpo.runs(proxy.name):
        train = StageNode(
            f"dpo[{run}]", "dpo",
            DPOStageConfig(dpo=_world_view(dpo.training_view(seed), cfg), labels=cfg.proxy_training.labels,
                           n_train_pairs=cfg.proxy_training.n_train_pairs, policy=_base_ref(cfg)),
            {"pairs": "gold_label", **_policy_input(cfg)}, external=_local(cfg.policy.model_id),
            **_launch(dpo.num_processes, dpo.deepspeed_config, cfg.launch.num_machines))
        nodes += _rl_arm(cfg, "dpo", proxy, run, seed, train, dpo.eval)
    return nodes


def _knowledge_stages(cfg: StudyConfig) -> list[StageNode]:
    """knowledge_pairs (minimal pairs, proxy-independent), knowledge_base (the base policy's log-probability on them)
    and per proxy knowledge[p] (its rewards on them)."""
    kn = cfg.knowledge
    generated = cfg.policy.source == "tiny" and not kn.pairs_path  # else read from the file
    nodes = [StageNode("knowledge_pairs", "knowledge_pairs",
                       KnowledgePairsStageConfig(n_pairs=kn.n_pairs, seed=kn.seed, pairs_path=kn.pairs_path),
                       {"world": "world"} if generated else {}, external=_local(kn.pairs_path)),
             StageNode("knowledge_base", "knowledge_base",
                       KnowledgeBaseStageConfig(policy=_base_ref(cfg), batch_size=kn.batch_size,
                                                max_length=kn.max_length, bootstrap=kn.bootstrap, seed=kn.seed),
                       {"pairs": "knowledge_pairs", **_policy_input(cfg)}, external=_local(cfg.policy.model_id),
                       **_data_parallel(cfg))]
    for proxy in cfg.expanded_proxies():
        scorer = ScorerStageConfig(name=proxy.name, proxy=proxy.canonical(), batch_size=kn.batch_size,
                                   max_length=proxy.resolved_training(cfg.proxy_training).max_length,
                                   dtype=cfg.policy.dtype)
        nodes.append(StageNode(f"knowledge[{proxy.name}]", "knowledge",
                               KnowledgeStageConfig(scorer=scorer, bootstrap=kn.bootstrap, seed=kn.seed),
                               {"pairs": "knowledge_pairs", **_scorer_inputs(proxy, "train_proxy")},
                               external=_local(proxy.path), **_data_parallel(cfg)))
    return nodes


def _report(cfg: StudyConfig) -> StageNode:
    names = [p.name for p in cfg.expanded_proxies()]
    inputs = {f"eval[{p}]": f"eval_proxy[{p}]" for p in names}
    if cfg.knowledge_enabled():  # the base policy's role is not bracketed: no proxy name can collide with it
        inputs |= {"knowledge_base": "knowledge_base"}
        inputs |= {f"knowledge[{p}]": f"knowledge[{p}]" for p in names}
    if cfg.bon is not None:
        inputs |= {f"bon[{p}]": f"bon_curve[{p}]" for p in names}
    arms = rl_runs(cfg)
    inputs |= {f"{arm}[{run}]": f"{arm}_curve[{run}]" for arm, by_proxy in arms.items()
               for runs in by_proxy.values() for run in runs}
    if cfg.policy.source == "tiny":
        inputs |= {"pairs": "gold_label", "policy": "sft_policy"}
    setting = ReportSetting(policy=cfg.policy, gold_label=cfg.gold_label, proxy_training=cfg.proxy_training,
                            # fields a proxy's type does not use do not count; its number of seeds does
                            proxies=[p.canonical().model_copy(update={"seeds": p.seeds}) for p in cfg.proxies])
    return StageNode("report", "report", ReportStageConfig(study=cfg.study, proxies=names, groups=cfg.proxy_groups(),
                                                           rl_runs=arms, rl_settings=rl_settings(cfg),
                                                           setting=setting),
                     inputs, publish_to=Path(cfg.run.reports_dir))


# ----------------------------------------------------------------------------------------------------------------
# over-optimization under shift


# Stage modules that evaluate on the evaluation prompts (sample, score, curve): each gets an OOD copy.
EVAL_STAGES = ("bon_sample", "bon_score", "bon_curve", "ppo_sample", "ppo_curve")
OOD_SUFFIX = "_ood"
OOD_ROLE = "ood:"  # the report's input role of an OOD curve: `ood:bon[p]`, `ood:ppo[run]` (no ID role has a colon)


def ood_key(key: str) -> str:
    """The key of an evaluation stage's OOD copy: `bon_sample` -> `bon_sample_ood`, `ppo_gold[bt]` ->
    `ppo_gold_ood[bt]`."""
    name, bracket, rest = key.partition("[")
    return f"{name}{OOD_SUFFIX}{bracket}{rest}"


def eval_prompt_count(cfg: StudyConfig) -> int:
    """How many in-distribution evaluation prompts best-of-n and RL are evaluated on: the world's held-out share in
    the tiny world, `bon.n_prompts` at paper scale (at most: eval_prompts keeps the held-out rows it finds)."""
    if cfg.policy.source == "tiny":
        from pipeline import world

        return world.prompt_split_sizes(world.in_distribution_prompt_count(), cfg.world.n_eval_prompts,
                                        cfg.world.eval_prompt_fraction)[1]
    return cfg.bon.n_prompts if cfg.bon is not None else 0


def ood_prompt_count(cfg: StudyConfig) -> int:
    """How many OOD evaluation prompts: `ood.n_prompts`, default as many as the ID evaluation prompts (in the tiny
    world at most its OOD prompt space)."""
    if cfg.ood.n_prompts is not None:
        return cfg.ood.n_prompts
    if cfg.policy.source == "tiny" and not cfg.ood.prompts_path:
        from pipeline import world

        return min(eval_prompt_count(cfg), len(world.ood_prompt_space()))
    return eval_prompt_count(cfg)


def _ood_stages(cfg: StudyConfig, nodes: list[StageNode]) -> list[StageNode]:
    """ood_prompts, and per evaluation stage (`EVAL_STAGES`) among `nodes` its OOD copy: the same module and config
    (hence the same sampling seeds, scorers and fits), keyed `ood_key`, with ood_prompts in place of the ID prompts
    and the OOD copies of its evaluation inputs (samples, scores, the best-of-n curve an RL curve is drawn beside) in
    place of theirs. Training stages and models are shared: an RL run's exports are sampled on both prompt sets."""
    generated = cfg.policy.source == "tiny" and not cfg.ood.prompts_path
    prompts = StageNode("ood_prompts", "ood_prompts", OODPromptsStageConfig(
        n_prompts=ood_prompt_count(cfg), seed=cfg.world.seed if generated else 0, prompts_path=cfg.ood.prompts_path),
        {"id_prompts": _eval_prompts_input(cfg)}, external=_local(cfg.ood.prompts_path))
    evaluated = {n.key for n in nodes if n.stage in EVAL_STAGES}
    taken = sorted({ood_key(k) for k in evaluated} & {n.key for n in nodes})
    if taken:  # e.g. a PPO variant named `sample_ood`
        from pipeline.config import ConfigError

        raise ConfigError(f"ood.enabled: the OOD copy of an evaluation stage would be keyed {taken[0]}, the key of a "
                          f"stage the study already has; rename what that stage is named after")

    def ood_input(role: str, upstream: str) -> str:
        if role == "prompts":
            return "ood_prompts"
        return ood_key(upstream) if upstream in evaluated else upstream

    return [prompts] + [dataclasses.replace(n, key=ood_key(n.key), inputs={role: ood_input(role, up)
                                                                           for role, up in n.inputs.items()})
                        for n in nodes if n.key in evaluated]


def _with_ood_report_inputs(report: StageNode, nodes: list[StageNode]) -> StageNode:
    """The report with each curve input (`bon[p]`, `<arm>[run]`) doubled by its OOD copy as `ood:<role>`."""
    curve_keys = {n.key for n in nodes if n.stage in ("bon_curve", "ppo_curve")}
    extra = {f"{OOD_ROLE}{role}": ood_key(up) for role, up in report.inputs.items() if up in curve_keys}
    return dataclasses.replace(report, inputs={**report.inputs, **extra})
