"""Checks that run before the first stage: every configured local path exists, and every local model directory will
serve its role.

A model directory is loaded just far enough to know that: its config.json parses, its tokenizer loads and has a chat
template, and the names and shapes of its weights (read from the safetensors headers only, never the weights) hold the
head its role needs - a reward model (`gold.model_id`, `type: checkpoint` proxies) has a sequence-classification
`score.weight` with one output or a GRM layout (`pipeline.reward_model.checkpoint_layout`); a policy
(`policy.model_id`) is a causal LM with an `lm_head.weight` or tied input embeddings. A failure names the config key
and the path, in well under a second, instead of a transformers error minutes into a run. Hub ids are not checked.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError, StudyConfig
from pipeline.hf_data import looks_local


class ModelDirError(ValueError):
    """A local model directory cannot serve its configured role."""


def model_dirs(cfg: StudyConfig) -> list[tuple[str, str, str]]:
    """(config key, local path, role) of every configured local model directory; role is "policy" or "reward"."""
    out = []
    if cfg.policy.source == "hub" and cfg.policy.model_id:
        out.append(("policy.model_id", cfg.policy.model_id, "policy"))
    if cfg.gold.type == "hf" and cfg.gold.model_id:
        out.append(("gold.model_id", cfg.gold.model_id, "reward"))
    out += [(f"proxies.{p.name}.path", p.path, "reward") for p in cfg.proxies if p.type == "checkpoint" and p.path]
    return [(key, path, role) for key, path, role in out if looks_local(path)]


def preflight(cfg: StudyConfig) -> None:
    """Raise ConfigError listing every configured local path that is missing, every DeepSpeed config that is not
    usable, a vLLM backend asked for without vllm, or every model directory that cannot serve its role, each with its
    config key."""
    from pipeline.study import check_local_paths

    check_local_paths(cfg)
    check_data_files(cfg)
    check_deepspeed_configs(cfg)
    check_vllm(cfg)
    problems = []
    for key, path, role in model_dirs(cfg):
        try:
            check_model_dir(path, role, trust_remote_code=_trust_remote_code(cfg, key))
        except ModelDirError as e:
            problems.append(f"{key}: {path}: {e}")
    if problems:
        raise ConfigError("model directory check failed (before any stage ran):\n  " + "\n  ".join(problems))


def data_files(cfg: StudyConfig) -> list[tuple[str, str]]:
    """(config key, local path) of every configured data file a stage of the study will read whose schema overopt
    checks: OOD prompts, minimal pairs, RewardBench and RewardBench 2 (hub ids are left to the stage)."""
    wanted = [("eval_proxy.rewardbench_path", cfg.eval_proxy.rewardbench_path),
              ("eval_proxy.rewardbench2_path", cfg.eval_proxy.rewardbench2_path)]
    if cfg.ood.enabled:
        wanted.append(("ood.prompts_path", cfg.ood.prompts_path))
    if cfg.knowledge_enabled():
        wanted.append(("knowledge.pairs_path", cfg.knowledge.pairs_path))
    return [(key, path) for key, path in wanted if path and looks_local(path)]


def check_data_files(cfg: StudyConfig) -> None:
    """Raise ConfigError naming the config key, the file and what is wrong (a missing column, a value of the wrong
    type, no rows) for each data file `data_files` lists, read with the loader its stage uses. Those stages
    (ood_prompts, knowledge_pairs, eval_proxy[p]) run after proxies are trained, or after best-of-n and RL: a bad
    column found there costs the whole run up to them."""
    from pipeline.hf_data import load_rewardbench, load_rewardbench2
    from pipeline.knowledge import load_pairs_file
    from pipeline.records import load_prompts_file
    from pipeline.study import ood_prompt_count

    loaders = {"eval_proxy.rewardbench_path": load_rewardbench, "eval_proxy.rewardbench2_path": load_rewardbench2,
               # the first n_prompts rows, as the ood_prompts stage reads them
               "ood.prompts_path": lambda path: load_prompts_file(path, "ood.prompts_path", ood_prompt_count(cfg)),
               "knowledge.pairs_path": load_pairs_file}
    problems = []
    for key, path in data_files(cfg):
        try:
            loaders[key](path)
        except (ValueError, OSError) as e:  # RecordError is a ValueError; the loaders name the file and column
            message = str(e) or type(e).__name__
            problems.append(f"{key}: {message.removeprefix(key).lstrip(': ')}")
    if problems:
        raise ConfigError("data file check failed (before any stage ran):\n  " + "\n  ".join(problems))


def vllm_keys(cfg: StudyConfig) -> list[str]:
    """The config keys that ask for the vLLM backend (`pipeline.vllm_backend`)."""
    sections = [("bon.backend", cfg.bon and cfg.bon.backend),
                ("gold_label.sampling_backend", cfg.gold_label.sampling_backend)]
    sections += [(f"{name}.eval.backend", arm and arm.eval.backend)
                 for name, arm in (("ppo", cfg.ppo), ("rl", cfg.rl), ("dpo", cfg.dpo))]
    return [key for key, backend in sections if backend == "vllm"]


def check_vllm(cfg: StudyConfig) -> None:
    """Raise ConfigError naming every key that asks for vLLM when vllm is not installed, before any stage runs."""
    import importlib.util

    keys = vllm_keys(cfg)
    if keys and importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{', '.join(keys)}: 'vllm', but vllm is not installed (pip install -e '.[vllm]'); set "
                          f"{'them' if len(keys) > 1 else 'it'} to 'hf' to sample with Hugging Face generate")


def deepspeed_configs(cfg: StudyConfig) -> list[tuple[str, Path]]:
    """(config key, path) of every DeepSpeed config a stage of the study will launch with."""
    out = []
    if cfg.ppo is not None and cfg.ppo.deepspeed_config is not None:
        out.append(("ppo.deepspeed_config", cfg.ppo.deepspeed_config))
    if cfg.rl is not None and cfg.rl.deepspeed_config is not None:
        out.append(("rl.deepspeed_config", cfg.rl.deepspeed_config))
    if cfg.dpo is not None and cfg.dpo.deepspeed_config is not None:
        out.append(("dpo.deepspeed_config", cfg.dpo.deepspeed_config))
    if cfg.distributed_smoke.enabled:
        out.append(("distributed_smoke.deepspeed_config", cfg.distributed_smoke.deepspeed_config))
    if cfg.proxy_launch()[1] is not None:  # proxy_training's own key (never inherited from launch)
        out.append(("proxy_training.deepspeed_config", cfg.proxy_launch()[1]))
    launch = cfg.launch.deepspeed_config
    if launch is not None:
        # a section whose file is launch's (it inherited it) names launch's key too, the key the user wrote; a file
        # no stage uses is still checked, so a mistyped path is not silently ignored
        out = [(f"{key} (= launch.deepspeed_config)" if path == launch else key, path) for key, path in out]
        if all(path != launch for _, path in out):
            out.append(("launch.deepspeed_config", launch))
    return out


def check_deepspeed_configs(cfg: StudyConfig, cuda: bool | None = None) -> None:
    """Raise ConfigError naming the config key and the file for each DeepSpeed config that would fail at launch
    (after every upstream stage ran): missing, not JSON, not a JSON object, a ZeRO stage other than 0-3, both fp16
    and bf16 on, or fp16 without a CUDA GPU; and several CPU processes asked for without one.
    `cuda` defaults to whether the launched ranks will see a GPU."""
    from pipeline.runner import _resolve_repo_path, _visible_cuda_devices

    if cuda is None:
        cuda = _visible_cuda_devices() > 0
    problems = []
    for section, arm in (("ppo", cfg.ppo), ("rl", cfg.rl), ("dpo", cfg.dpo)):
        if arm is not None and arm.num_processes > 1 and arm.deepspeed_config is None and not cuda:
            problems.append(f"{section}.num_processes: {arm.num_processes} processes without a DeepSpeed config: on "
                            f"CPU an RL stage's ranks share one training run only through DeepSpeed; set "
                            f"{section}.deepspeed_config (e.g. configs/deepspeed/zero2.json) or "
                            f"{section}.num_processes: 1 (launch.num_processes, for data-parallel stages, needs none)")
    for key, path in deepspeed_configs(cfg):
        f = _resolve_repo_path(path)
        problem = deepspeed_config_problem(f, cuda)
        if problem:
            problems.append(f"{key}: {path}: {problem}")
    if problems:
        raise ConfigError("DeepSpeed config check failed (before any stage ran):\n  " + "\n  ".join(problems))


def deepspeed_config_problem(path: Path, cuda: bool) -> str | None:
    """What would make DeepSpeed refuse the config file at `path`, or None."""
    if not path.is_file():
        return "not found" if not path.exists() else "not a file"
    try:
        ds = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        return f"not readable ({e})"
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(ds, dict):
        return f"holds a JSON {type(ds).__name__}, not an object of DeepSpeed settings"
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return "zero_optimization must be an object"
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        return f"zero_optimization.stage is {stage!r}; DeepSpeed's ZeRO stages are 0, 1, 2 and 3"
    enabled = {}
    for kind in ("fp16", "bf16"):
        section = ds.get(kind, {})
        if not isinstance(section, dict):
            return f"{kind} must be an object (e.g. {{\"enabled\": true}})"
        value = section.get("enabled", False)
        if value not in (True, False, "auto"):
            return f"{kind}.enabled is {value!r}; expected true, false or \"auto\""
        enabled[kind] = value is True
    if enabled["fp16"] and enabled["bf16"]:
        return "fp16 and bf16 are both enabled; enable one"
    if enabled["fp16"] and not cuda:
        return "fp16 is enabled but no CUDA GPU is visible (DeepSpeed's CPU backend has no fp16 training)"
    return None


def _trust_remote_code(cfg: StudyConfig, key: str) -> bool:
    if key == "policy.model_id":
        return cfg.policy.trust_remote_code
    if key == "gold.model_id":
        return cfg.gold.trust_remote_code
    return next(p.trust_remote_code for p in cfg.proxies if key == f"proxies.{p.name}.path")


def _read_config(d: Path) -> dict:
    f = d / "config.json"
    if not f.is_file():
        raise ModelDirError("no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ModelDirError(f"config.json is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelDirError("config.json does not hold a JSON object")
    return config


def _check_tokenizer(d: Path, trust_remote_code: bool) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types here (OSError, ValueError, TypeError, KeyError...)
        raise ModelDirError(f"its tokenizer does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
            from None
    if getattr(tok, "chat_template", None) is None:
        raise ModelDirError("its tokenizer has no chat template (overopt formats every prompt with it); add one to "
                            "tokenizer_config.json or chat_template.jinja")


def weight_shapes(d: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape in the directory's safetensors files, from their headers only."""
    from safetensors import safe_open

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelDirError("no *.safetensors weights (overopt loads safetensors only)")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    shapes[k] = tuple(sf.get_slice(k).get_shape())
        except Exception as e:  # safetensors_rust.SafetensorError: a truncated or foreign file
            raise ModelDirError(f"{f.name} is not a readable safetensors file ({e})") from None
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text()).get("weight_map", {}))
        except (OSError, ValueError, AttributeError) as e:
            raise ModelDirError(f"{index.name} is not readable ({e})") from None
        missing = sorted(wanted - set(shapes))
        if missing:
            raise ModelDirError(f"{index.name} lists {len(missing)} tensor(s) in no safetensors file, "
                                f"e.g. {missing[:3]}")
    return shapes


def _text_config(config: dict) -> dict:
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


def _check_reward_head(d: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    from pipeline.reward_model import HEAD_FILE, HEAD_PREFIX, checkpoint_layout

    layout = checkpoint_layout(d)
    if layout == "overopt":
        if not (d / HEAD_FILE).is_file():
            raise ModelDirError(f"an overopt GRM directory without {HEAD_FILE}")
        _check_causal_lm(config, {k: v for k, v in shapes.items() if not k.startswith(HEAD_PREFIX)},
                         what="the GRM backbone")
        return
    if layout == "authors":
        n_out = config.get("vhead_num_output", 1)
        if n_out != 1:
            raise ModelDirError(f"GRM value head with vhead_num_output={n_out}; a reward model has 1 output")
        return
    score = [k for k in shapes if k == "score.weight" or k.endswith(".score.weight")]
    if score:
        n_out = shapes[score[0]][0] if shapes[score[0]] else 0
        if n_out != 1:
            raise ModelDirError(f"its score head {score[0]} has {n_out} outputs (shape {shapes[score[0]]}); a reward "
                                f"model has 1")
        return
    if any(k.endswith("lm_head.weight") for k in shapes) or config.get("architectures", [""])[0].endswith("CausalLM"):
        raise ModelDirError(f"a causal LM ({', '.join(config.get('architectures') or ['lm_head.weight'])}) without a "
                            f"reward head: expected a sequence-classification score.weight with 1 output or a GRM "
                            f"checkpoint (v_head.* weights); a base model is not a reward model")
    raise ModelDirError("no reward head: expected a sequence-classification score.weight with 1 output or a GRM "
                        "checkpoint (v_head.* weights)")


def _check_causal_lm(config: dict, shapes: dict[str, tuple[int, ...]], what: str = "a policy") -> None:
    if any(k.endswith("lm_head.weight") for k in shapes):
        return
    tied = _text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings", True))
    embeddings = [k for k in shapes if k.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))]
    if tied and embeddings:
        return
    if any(k == "score.weight" or k.endswith(".score.weight") for k in shapes):
        raise ModelDirError(f"{what} must be a causal LM, but this is a sequence-classification model (score.weight, "
                            f"no lm_head.weight)")
    raise ModelDirError(f"{what} must be a causal LM: no lm_head.weight" +
                        (" and tie_word_embeddings is false" if not tied else " and no input embeddings to tie"))


def check_model_dir(path: str | Path, role: str, trust_remote_code: bool = False) -> None:
    """Raise ModelDirError unless the directory at `path` can serve `role` ("policy" or "reward")."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ModelDirError("not a directory" if d.exists() else "not found")
    config = _read_config(d)
    shapes = weight_shapes(d)
    if role == "reward":
        _check_reward_head(d, config, shapes)
    elif role == "policy":
        _check_causal_lm(config, shapes)
    else:
        raise ValueError(f"unknown model role {role!r}")
    _check_tokenizer(d, trust_remote_code)  # last: the slowest of the checks
