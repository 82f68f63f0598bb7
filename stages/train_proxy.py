"""train_proxy[name]: train one proxy reward model on the gold-labeled pairs with the Hugging Face Trainer.

Every proxy is a `GRMRewardModel` (the base causal LM with its LM head kept, plus a reward head); the proxy type only
picks the loss, from the table of proxy types in `pipeline.proxy_types` (losses in `pipeline.losses`):

    bt               -mean log σ(r_c - r_r)
    margin           -mean log σ(r_c - r_r - m),  m = margin_scale · |gold_c - gold_r|
    label_smoothing  -(1-ε) mean log σ(r_c - r_r) - ε mean log σ(r_r - r_c)
    frozen           bt, backbone frozen (only the head trains)
    grm              (1-α)·bt + α·reg, reg from the response-token log-probs of the same forward pass
    odin             bt(r_q + r_l) + λ_L·(|ρ(r_q, L)| − ρ(r_l, L)) + λ_O·|W_q·W_l|, two heads, only r_q scores
    inform           bt + β·mean KL(N(μ, σ²) ‖ N(0, I)), reward of a sampled Gaussian latent (its mean at scoring)
    any of them      + center_coef · mean((r_c + r_r)²) when center_coef > 0 (reward centering)

The initialisation (reward head, LoRA matrices) is seeded by `init_seed` (default: `seed`), the data order and
dropout by `seed`: a warm proxy's members share one init and differ in data order.

Writes model/ (`GRMRewardModel.save_pretrained`, tokenizer included), reference_stats.json (mean/std of its rewards on
the training responses, used to standardise ensemble members), train_log.json, metrics.json; an InfoRM proxy also
latent_stats.safetensors (mean and covariance of its latent mean μ on the training responses: the reference of its
outlier score, `pipeline.scoring.mahalanobis`).

In one process (`proxy_training.num_processes` 1, no DeepSpeed config) it runs in the runner's process. Otherwise
`pipeline.runner.launch_stage` starts it as k ranks under `accelerate launch` (DeepSpeed ZeRO-2/3 when
`proxy_training.deepspeed_config` is set, else DDP): every rank builds the same model (same init seed, loaded whole;
ZeRO-3 partitions it when the engine is made) and takes `batch_size / k` pairs a micro-step. The Trainer's seeded
sampler gives every world size the same permutation, and accelerate deals its batches out round robin, so each optimizer
step sees the same `batch_size × gradient_accumulation_steps` pairs as one process and averages the same per-pair loss
(every loss is a mean over pairs, ODIN's correlation terms excepted: those are taken within each rank's share). After
training the model is whole on every rank (ZeRO-3 gathers it), rank 0 saves it, all ranks score the training responses
(`pipeline.scoring.data_parallel`: whole batches each, the same floats as one process) and rank 0 writes the files.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from pipeline import proxy_types
from pipeline.config import TrainProxyStageConfig
from pipeline.distributed import (
    Ranks,
    data_parallel_ranks,
    frozen_model_loading,
    gathered_for_generation,
    launched_with_deepspeed,
    make_accelerator,
    trainer_precision,
    zero_stage,
)
from pipeline.models import DTYPES, load_tokenizer
from pipeline.preference_pairs import PairCollator, PairDataset, pairwise_accuracy, training_pairs
from pipeline.records import PAIR_COLUMNS, messages, read_records
from pipeline.reward_model import GRMRewardModel, RewardHeadConfig
from pipeline.scoring import (
    LATENT_STATS_FILE,
    ModelScorer,
    data_parallel,
    fit_latent_stats,
    grm_rewards_fn,
    save_latent_stats,
)
from pipeline.tokenization import pad_token_id

VERSION = "1"
log = logging.getLogger("overopt")
def make_trainer_class():
    from transformers import Trainer

    class RewardTrainer(Trainer):
        """The Trainer's loop, with the proxy's loss. `ref_model` is the frozen base for the DPO regulariser."""

        def __init__(self, *args, proxy, ref_model=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.proxy, self.ref_model = proxy, ref_model

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p = self.proxy
            out = model(inputs["input_ids"], inputs["attention_mask"],
                        return_logits=proxy_types.spec(p.type).needs_logits)
            r_c, r_r = out.rewards.chunk(2)
            loss = proxy_types.training_loss(p, r_c, r_r, inputs, out, self.ref_model)
            return (loss, out) if return_outputs else loss

    return RewardTrainer


def init_reward_model(cfg: TrainProxyStageConfig, base: str):
    """The proxy's model before training, and the frozen reference LM its loss needs (or None).

    The initialisation (reward head, LoRA matrices) is seeded by `proxy.init_seed` when set, else by `proxy.seed`: a
    warm's members share one init this way, while the Trainer re-seeds with `proxy.seed` for their data order and
    dropout (`make_trainer`)."""
    from transformers import set_seed

    proxy, tr = cfg.proxy, cfg.training
    kind = proxy_types.spec(proxy.type)
    set_seed(proxy.seed if proxy.init_seed is None else proxy.init_seed)
    head = RewardHeadConfig(type=proxy.head, width=proxy.head_width, dropout=proxy.head_dropout,
                            **kind.head_settings(proxy))
    model = GRMRewardModel.from_base(base, head, DTYPES[cfg.base.dtype], cfg.base.trust_remote_code, lora=tr.lora)
    if kind.frozen_backbone:
        model.freeze_backbone()
    ref_model = None
    if kind.needs_reference(proxy):
        ref_model = copy.deepcopy(model.causal_lm()).eval().requires_grad_(False)
    return model, ref_model


def make_trainer(cfg: TrainProxyStageConfig, model, dataset, tokenizer, ref_model, output_dir, world: int = 1,
                 accelerator=None):
    """The Hugging Face Trainer of one proxy: data order (`data_seed`) and dropout (`seed`) follow `proxy.seed`.

    `world` ranks take `batch_size / world` pairs each a micro-step. `accelerator`: under `accelerate launch`, the one
    `pipeline.distributed.make_accelerator` made (DeepSpeed plugin, CPU process-group backend), which the Trainer
    takes; it fills the DeepSpeed config's "auto" batch sizes, accumulation and clipping from these arguments and
    checks its precision flags against the config's bf16/fp16 (which `launch_stage` gave accelerate)."""
    from transformers import TrainingArguments

    proxy, tr = cfg.proxy, cfg.training
    launch = {}
    if accelerator is not None:
        launch = {"accelerator_config": {"use_configured_state": True}, **trainer_precision(accelerator)}
    args = TrainingArguments(
        output_dir=output_dir, num_train_epochs=tr.epochs, per_device_train_batch_size=tr.batch_size // world,
        gradient_accumulation_steps=tr.gradient_accumulation_steps, learning_rate=tr.lr,
        lr_scheduler_type=tr.lr_scheduler, warmup_steps=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm,
        weight_decay=tr.weight_decay, seed=proxy.seed, data_seed=proxy.seed, logging_steps=tr.logging_steps,
        save_strategy="no", report_to=[], remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), **launch)
    if accelerator is not None:  # as in stages.group_rl: the Trainer's Accelerator takes the configured one's plugin
        args.deepspeed_plugin = None
    return make_trainer_class()(model=model, args=args, train_dataset=dataset,
                                data_collator=PairCollator(pad_token_id(tokenizer)), proxy=proxy, ref_model=ref_model)


def fill_hidden_size_autos(accelerator, hidden_size: int) -> None:
    """Fill the ZeRO bucket sizes a DeepSpeed config leaves "auto" with transformers' own formulas
    (`HfTrainerDeepSpeedConfig.trainer_config_finalize`): the Trainer reads them from `model.config.hidden_size`, which
    a reward model (an LM inside a wrapper) does not have."""
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    h = hidden_size
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value


@contextmanager
def whole_model(trainer, accelerator):
    """The trained reward model, whole on every rank: under ZeRO-3 its shards gathered (a collective every rank
    joins) and DeepSpeed's hooks lifted meanwhile, so each rank can save or score it alone."""
    if accelerator is None or zero_stage(accelerator) != 3:
        yield trainer.model
        return
    with gathered_for_generation(trainer.model_wrapped, accelerator) as module:
        yield module


def run(cfg: TrainProxyStageConfig, inputs: dict[str, Path], out: Path) -> None:
    proxy, tr = cfg.proxy, cfg.training
    kind = proxy_types.spec(proxy.type)
    if not kind.trained:
        raise ValueError(f"proxy {proxy.name!r}: type {proxy.type!r} is not trained by train_proxy")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tr.batch_size % world:
        raise ValueError(f"proxy {proxy.name!r}: proxy_training.batch_size ({tr.batch_size}) must be divisible by the "
                         f"number of processes ({world})")
    launched = world > 1 or launched_with_deepspeed()
    accelerator = make_accelerator() if launched else None
    ranks = data_parallel_ranks() if launched else Ranks()
    base = cfg.base.model_id or str(inputs["policy"] / "model")
    tokenizer = load_tokenizer(base, cfg.base.trust_remote_code)
    pairs = read_records(inputs["pairs"] / "pairs.parquet", PAIR_COLUMNS)
    train = training_pairs(pairs, tr.labels, tr.n_train_pairs)
    dataset = PairDataset(train, tokenizer, tr.max_length, proxy.margin_scale)
    if len(dataset) == 0:
        raise ValueError(f"proxy {proxy.name!r}: no training pairs fit proxy_training.max_length={tr.max_length}")

    # whole on every rank, as in one process (ZeRO-3 partitions it when the Trainer makes the engine); the frozen
    # reference of GRM's DPO regulariser is a copy that no engine ever runs
    with frozen_model_loading(accelerator) if accelerator is not None else nullcontext():
        model, ref_model = init_reward_model(cfg, base)
    model.train()
    if accelerator is not None and zero_stage(accelerator):
        fill_hidden_size_autos(accelerator, model.causal_lm().config.get_text_config().hidden_size)
    with tempfile.TemporaryDirectory(dir=out) as scratch:  # the Trainer wants an output_dir; nothing in it is kept
        trainer = make_trainer(cfg, model, dataset, tokenizer, ref_model, scratch, world, accelerator)
        result = trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]

    # reference statistics on the training responses (standardises ensemble members) and training accuracy
    prompts = [messages(p) for p in train.prompt]
    extras_c, extras_r = {}, {}
    with whole_model(trainer, accelerator) as module:
        module.eval()
        if ranks.main:
            module.save_pretrained(out / "model", tokenizer=tokenizer)
        scorer = data_parallel(ModelScorer(grm_rewards_fn(module), module, tokenizer, batch_size=64,
                                           max_length=tr.max_length), ranks)
        r_c = scorer.score(prompts, list(train.chosen), extras_c)
        r_r = scorer.score(prompts, list(train.rejected), extras_r)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if ranks.main:
        write_statistics(out, r_c, r_r, extras_c, extras_r, history)
        metrics = {"train_pairs": len(dataset), "dropped_over_length": dataset.dropped,
                   "train_loss": result.training_loss, "steps": result.global_step,
                   "train_accuracy": pairwise_accuracy(r_c, r_r)["accuracy"],
                   "trainable_parameters": trainable}
        if launched:
            metrics |= {"world_size": world, "per_device_batch_size": tr.batch_size // world,
                        "zero_stage": zero_stage(accelerator), "mixed_precision": accelerator.mixed_precision}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("  %s (%s): %d pairs, %d steps, loss %.3f, train accuracy %.3f", proxy.name, proxy.type,
                 len(dataset), result.global_step, result.training_loss, metrics["train_accuracy"])
    if accelerator is not None:
        accelerator.wait_for_everyone()


def write_statistics(out: Path, r_c: np.ndarray, r_r: np.ndarray, extras_c: dict, extras_r: dict,
                     history: list[dict]) -> None:
    """reference_stats.json (the rewards of the training responses), an InfoRM proxy's latent statistics, and the
    training log."""
    both = np.concatenate([r_c, r_r])
    scored = ~np.isnan(both)
    both = both[scored]
    (out / "reference_stats.json").write_text(json.dumps({"mean": float(both.mean()), "std": float(both.std()),
                                                          "n": int(both.size), "set": "training responses"}))
    if "latent_mean" in extras_c:  # InfoRM: the latent's distribution on the training responses (outlier scores)
        latent = np.concatenate([extras_c["latent_mean"], extras_r["latent_mean"]])[scored]
        save_latent_stats(fit_latent_stats(latent), out / LATENT_STATS_FILE, n=len(latent))
    (out / "train_log.json").write_text(json.dumps(history))
