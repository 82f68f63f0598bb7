"""The one reward-scoring interface: `scorer.score(prompts, responses) -> np.ndarray` of float rewards.

RM evaluation, gold labeling, best-of-n and PPO all score through this. Implementations:
- `ModelScorer`: any neural reward model (a Hugging Face sequence classifier, a GRM); batched, length-sorted, no
  grad, eval mode, chat template applied with the scorer's own tokenizer, reward read at the last real token;
- `PolicyLogProbScorer`: a policy's summed log-probability of the response, log π(y|x), through the same path;
- `WorldGoldScorer`: the tiny world's programmatic gold;
- `EnsembleScorer`: members standardised on a reference set, combined by mean, min (WCO) or mean - λ·var (UWO).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from pipeline.distributed import Ranks
from pipeline.models import (
    DTYPES,
    checked_local,
    default_device,
    load_causal_lm,
    load_seq_cls_reward_model,
    load_tokenizer,
    seq_cls_rewards,
)
from pipeline.reward_model import GRMRewardModel, is_grm_checkpoint
from pipeline.tokenization import (
    ConversationEncoder,
    Encoded,
    Prompt,
    as_messages,
    collate,
    encode_conversation,
    pad_token_id,
    same_tokenizer,
)

log = logging.getLogger("overopt")


class SequenceTooLongError(ValueError):
    """A (prompt, response) is longer than a strict scorer's max length."""


class RewardScorer(Protocol):
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """Rewards for each (prompt, response); NaN where the pair is longer than the scorer's max length."""
        ...


# rewards_fn(input_ids, attention_mask) -> (B,) tensor of rewards read at the last real token, or a pair (rewards,
# extras) whose extras {name: (B, ...) tensor} are per-sequence values computed in the same pass (InfoRM's latent
# and its outlier score); `ModelScorer.score(..., extras=dict)` collects them.
RewardsFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class ModelScorer:
    """Batched scoring of a neural reward model through `pipeline.tokenization`."""

    def __init__(self, rewards_fn: RewardsFn, module: torch.nn.Module, tokenizer, batch_size: int = 32,
                 max_length: int = 1024, padding_side: str = "right", strict_length: bool = False,
                 double_bos: bool = False):
        self.rewards_fn, self.module, self.tokenizer = rewards_fn, module, tokenizer
        self.batch_size, self.max_length, self.padding_side = batch_size, max_length, padding_side
        self.strict_length = strict_length  # raise before any forward pass instead of returning NaN
        self.pad_id = pad_token_id(tokenizer)
        self.double_bos = double_bos  # tokenize as the GRM authors' released checkpoints (see encode_conversation)
        self.ranks = Ranks()  # `data_parallel` splits the batches of every `score` call over a stage's ranks

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def encoder(self) -> ConversationEncoder:
        if getattr(self, "_encoder", None) is None:
            self._encoder = ConversationEncoder(self.tokenizer, self.max_length, double_bos=self.double_bos)
        return self._encoder

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str], extras: dict | None = None) -> np.ndarray:
        """Rewards of each (prompt, response). `extras`, when a dict, receives the rewards function's per-sequence
        extra outputs (see `RewardsFn`) as arrays aligned with the rewards (NaN where unscored).

        With several ranks (`data_parallel`) no rank tokenizes every pair: each encodes a share to learn those pairs'
        lengths, the ranks exchange the lengths (and truncated flags) alone, the batches are cut from all of them as
        one process cuts them, and each rank then encodes what its own batches hold beyond its share. One process
        encodes every pair once."""
        if len(prompts) != len(responses):
            raise ValueError(f"score() got {len(prompts)} prompts but {len(responses)} responses")
        share = self.ranks.mine(list(range(len(prompts))))
        try:
            known = dict(zip(share, self.encoder.encode(prompts, responses, share)))
            shapes = [(len(known[i].input_ids), known[i].truncated) for i in share]
        except Exception:  # a pair its template or tokenizer refuses: every rank must raise, none wait in the gather
            known, shapes = {}, [None] * len(share)
        shapes = self.ranks.gather_mine(shapes)
        if None in shapes:
            self.encoder.encode(prompts, responses)  # raises, on every rank, the error one process raises
            bad = shapes.index(None)
            raise RuntimeError(f"pair {bad} (prompt {repr(prompts[bad])[:200]}) failed to encode on one rank but "
                               f"encodes on rank {self.ranks.rank}: the ranks' tokenizers or chat templates differ")

        def encodings(items: list[int]) -> list[Encoded]:
            missing = [i for i in items if i not in known]
            if missing:
                known.update(zip(missing, self.encoder.encode(prompts, responses, missing)))
            return [known[i] for i in items]

        return self._score_items(shapes, encodings, extras)

    def score_token_ids(self, prompt_token_ids: Sequence[Sequence[int]],
                        response_token_ids: Sequence[Sequence[int]], extras: dict | None = None) -> np.ndarray:
        """Rewards from token ids of a policy that shares this scorer's tokenizer: prompt ids (chat template with
        generation prompt) and response ids without the token that ended the turn. No decoding, no re-tokenizing;
        equal to `score` on the decoded text when the text re-tokenizes to the same ids."""
        return self.score_encoded(self.encoder.encode_ids(prompt_token_ids, response_token_ids), extras)

    def score_encoded(self, encoded: list[Encoded], extras: dict | None = None) -> np.ndarray:
        """Rewards of already encoded sequences (`pipeline.tokenization.Encoded`), NaN where truncated."""
        return self._score_items([(len(e.input_ids), e.truncated) for e in encoded],
                                 lambda items: [encoded[i] for i in items], extras)

    def _score_items(self, shapes: list[tuple[int, bool]], encodings: Callable[[list[int]], list[Encoded]],
                     extras: dict | None) -> np.ndarray:
        """Scores of n sequences known by their (length, truncated) `shapes`; `encodings(items)` gives the encoded
        sequences of those indices, asked once, for this rank's batches only."""
        out = np.full(len(shapes), np.nan, dtype=np.float64)
        keep = [i for i, (_, truncated) in enumerate(shapes) if not truncated]
        if len(keep) < len(shapes) and self.strict_length:
            raise SequenceTooLongError(f"{len(shapes) - len(keep)} of {len(shapes)} sequences exceed max_length="
                                      f"{self.max_length} tokens (e.g. item "
                                      f"{next(i for i, (_, truncated) in enumerate(shapes) if truncated)})")
        if len(keep) < len(shapes):
            log.warning("%d of %d sequences exceed max_length=%d and get no score (NaN)",
                        len(shapes) - len(keep), len(shapes), self.max_length)
        keep.sort(key=lambda i: shapes[i][0])  # length-sorted batches waste little padding
        # The batches depend on the items and batch_size alone; with several ranks each computes whole batches, so
        # every score is the float one process computes (padding and batch composition are the same).
        batches = [keep[s:s + self.batch_size] for s in range(0, len(keep), self.batch_size)]
        my_batches = self.ranks.mine(list(range(len(batches))))
        my_items = [i for b in my_batches for i in batches[b]]
        encoded = dict(zip(my_items, encodings(my_items)))
        self.module.eval()  # dropout off: a reward is a deterministic function of the text
        mine = {}
        with torch.no_grad():
            for b in my_batches:
                batch = collate([encoded[i] for i in batches[b]], self.pad_id, self.padding_side)
                rewards = self.batch_rewards(batch)
                rewards, batch_extras = rewards if isinstance(rewards, tuple) else (rewards, {})
                mine[b] = (rewards.float().cpu().numpy(),
                           {name: value.double().cpu().numpy() for name, value in batch_extras.items()}
                           if extras is not None else {})
        for share in self.ranks.gather(mine):
            for b, (values, batch_extras) in share.items():
                out[batches[b]] = values
                for name, value in batch_extras.items():
                    if name not in extras:
                        extras[name] = np.full((len(shapes), *value.shape[1:]), np.nan)
                    extras[name][batches[b]] = value
        return out

    def batch_rewards(self, batch: dict[str, torch.Tensor]):
        """(B,) rewards of one collated batch (`pipeline.tokenization.collate`), or (rewards, extras) (`RewardsFn`)."""
        return self.rewards_fn(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))


def data_parallel(scorer, ranks: Ranks):
    """`scorer` with the batches of its every `score` call split over `ranks` (each rank computes whole batches, all
    ranks get every score); an ensemble's members each split theirs. A programmatic scorer (the tiny world's gold) is
    left whole: it costs nothing. Only for calls every rank makes with the same items (a data-parallel stage)."""
    if isinstance(scorer, ModelScorer):
        scorer.ranks = ranks
    for member in getattr(scorer, "members", ()):
        data_parallel(member, ranks)
    return scorer


class PolicyLogProbScorer(ModelScorer):
    """A causal LM's summed log-probability of the response given the prompt, log π(y|x), as a reward: teacher-forced
    through the same chat template, response span, batching and length checks as every reward model (the span
    includes the template's closing tokens, e.g. EOS: the probability of writing this response and stopping).

    A reference "reward" for diagnostics (how much a base policy's knowledge separates two responses); no length
    normalisation, as in GRM's regulariser (`pipeline.losses.response_logprobs`)."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 32, max_length: int = 1024,
                 strict_length: bool = False):
        # right padding: positions count from the first real token without position ids
        super().__init__(None, model, tokenizer, batch_size, max_length, padding_side="right",
                         strict_length=strict_length)

    def batch_rewards(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from pipeline.losses import response_logprobs

        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        logits = self.module(input_ids=ids, attention_mask=mask).logits
        return response_logprobs(logits, ids, batch["response_mask"].to(self.device))


class WorldGoldScorer:
    """The tiny world's gold reward (`pipeline.world.gold_reward`), behind the same interface."""

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        from pipeline.world import gold_reward

        return np.array([gold_reward(as_messages(p)[-1]["content"], r) for p, r in zip(prompts, responses)],
                        dtype=np.float64)


def combine_ensemble(member_scores: np.ndarray, combine: str, uwo_lambda: float = 0.5) -> np.ndarray:
    """Combine standardised member scores of shape (K, ...) into one reward (Coste et al. 2023)."""
    if combine == "mean":
        return member_scores.mean(axis=0)
    if combine == "min":
        return member_scores.min(axis=0)
    if combine == "uwo":
        return member_scores.mean(axis=0) - uwo_lambda * member_scores.var(axis=0)
    raise ValueError(f"unknown ensemble combine {combine!r} (expected mean, min or uwo)")


def standardise(scores: np.ndarray, stats: dict) -> np.ndarray:
    """Put a member on a common scale using its mean/std on the reference set (saved with the member)."""
    return (scores - stats["mean"]) / max(stats["std"], 1e-8)


def combine_members(member_scores: Sequence[np.ndarray], stats: Sequence[dict], combine: str,
                    uwo_lambda: float) -> np.ndarray:
    """An ensemble's reward from its members' raw scores: standardise each, then combine."""
    if len(member_scores) != len(stats):
        raise ValueError("ensemble needs one reference-set statistic per member")
    return combine_ensemble(np.stack([standardise(s, st) for s, st in zip(member_scores, stats)]), combine, uwo_lambda)


def load_member_stats(train_artifact) -> dict:
    """The reference-set mean/std a `train_proxy` artifact saved for standardising it as an ensemble member."""
    return json.loads((Path(train_artifact) / "reference_stats.json").read_text())


# InfoRM's latent outlier score (Miao et al. 2024): how far a response's latent mean μ lies from the distribution of μ
# on the proxy's training responses, as a Mahalanobis distance. Mean and covariance are fitted by `train_proxy` and
# saved beside the model; the covariance gets a ridge (as the authors' code adds 1e-3·I) so that it inverts when the
# latent has more dimensions than there are training responses.
LATENT_STATS_FILE = "latent_stats.safetensors"
LATENT_COV_RIDGE = 1e-3


def fit_latent_stats(latent_means: np.ndarray) -> dict[str, np.ndarray]:
    """Mean (D,) and sample covariance (D, D) (N − 1 in the denominator) of N ≥ 2 latent means (N, D)."""
    x = np.asarray(latent_means, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"latent statistics need at least two (N, D) latent means, got shape {x.shape}")
    return {"mean": x.mean(axis=0), "covariance": np.atleast_2d(np.cov(x, rowvar=False))}


def save_latent_stats(stats: dict[str, np.ndarray], path: Path, n: int) -> None:
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.items()}, str(path),
              metadata={"n": str(n), "set": "training responses", "ridge": str(LATENT_COV_RIDGE)})


def load_latent_stats(train_artifact) -> dict[str, torch.Tensor]:
    """The latent mean and the precision (covariance + ridge·I)⁻¹ an InfoRM `train_proxy` artifact saved (float64)."""
    from safetensors.torch import load_file

    path = Path(train_artifact) / LATENT_STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: an InfoRM proxy's train_proxy artifact saves its latent "
                                f"statistics")
    saved = load_file(str(path))
    cov = saved["covariance"].double()
    return {"mean": saved["mean"].double(),
            "precision": torch.linalg.inv(cov + LATENT_COV_RIDGE * torch.eye(cov.shape[0], dtype=cov.dtype))}


def mahalanobis(latent_means: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, D) latent means -> (B,) Mahalanobis distances √((μ − m)ᵀ P (μ − m)) to the saved distribution."""
    diff = latent_means.double() - stats["mean"].to(latent_means.device)
    return ((diff @ stats["precision"].to(latent_means.device)) * diff).sum(-1).clamp_min(0.0).sqrt()


def grm_rewards_fn(model: GRMRewardModel, latent_stats: dict[str, torch.Tensor] | None = None) -> RewardsFn:
    """The `RewardsFn` of a GRM: `model.rewards`, and for an InfoRM head (rewards, extras) with extras "latent_mean"
    (B, D) and, given the latent statistics, "outlier" (B,), the Mahalanobis distance of each latent mean."""
    if not model.head_config.ib_dim:
        return model.rewards

    def rewards(input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = model(input_ids, attention_mask, return_logits=False)
        mean = out.head["latent_mean"]
        extras = {"latent_mean": mean}
        if latent_stats is not None:
            extras["outlier"] = mahalanobis(mean, latent_stats)
        return out.rewards, extras

    return rewards


class EnsembleScorer:
    def __init__(self, members: list[RewardScorer], stats: list[dict], combine: str, uwo_lambda: float):
        if len(members) != len(stats):
            raise ValueError("ensemble needs one reference-set statistic per member")
        self.members, self.stats, self.combine, self.uwo_lambda = members, stats, combine, uwo_lambda

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        return combine_members([m.score(prompts, responses) for m in self.members], self.stats, self.combine,
                               self.uwo_lambda)


# ----------------------------------------------------------------------------------------------------------------
# One rule for non-finite scores (labeling, evaluation, best-of-n, RL): a NaN or ±inf reward from a model is an error
# in the stage that produced it, raised before anything is written. The one NaN that is not an error is the one a
# non-strict scorer returns on purpose for a sequence over its max length; callers report those as over-length.


class NonFiniteScoreError(ValueError):
    """A reward model returned NaN or ±inf for a sequence it did score."""


def _describe_key(key, key_names: Sequence[str]) -> str:
    values = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{n}={v!r}" for n, v in zip(key_names, values))


def check_finite(scores, scorer_name: str, keys: Sequence, key_names: Sequence[str] = ("pair_id",),
                 over_length: Callable[[int], bool] | None = None, where: str = "") -> None:
    """Raise `NonFiniteScoreError` naming the scorer and the first offending key unless every score is finite.

    `keys[i]` identifies score i: a pair_id, or a tuple such as (prompt_id, sample_idx) with `key_names` naming its
    parts. `over_length(i)` (asked only where a score is NaN) says whether NaN there means "over the scorer's max
    length", which a non-strict scorer returns by design; such NaNs are allowed (±inf never is).
    """
    values = np.asarray(scores, dtype=np.float64)
    if len(values) != len(keys):
        raise ValueError(f"{scorer_name}: {len(values)} scores but {len(keys)} keys")
    bad = [i for i in np.flatnonzero(~np.isfinite(values))
           if not (np.isnan(values[i]) and over_length is not None and over_length(int(i)))]
    if bad:
        first = bad[0]
        raise NonFiniteScoreError(
            f"scorer {scorer_name!r} returned a non-finite score ({values[first]}) for "
            f"{_describe_key(keys[first], key_names)}{f' ({where})' if where else ''}; {len(bad)} of {len(values)} "
            f"scores are non-finite. Nothing was written. Check the reward model's weights and dtype (float16 "
            f"overflows to inf; bfloat16 or float32 does not)")


def over_length_check(scorer, prompts: Sequence[Prompt], responses: Sequence[str]) -> Callable[[int], bool]:
    """`over_length(i)` for `check_finite`: whether (prompts[i], responses[i]) exceeds `scorer`'s max length, the case
    where a non-strict `ModelScorer` returns NaN by design. Tokenizes only the items it is asked about."""
    members = getattr(scorer, "members", None)
    if members is not None:  # an ensemble's score is NaN where any member's is
        checks = [over_length_check(m, prompts, responses) for m in members]
        return lambda i: any(c(i) for c in checks)
    if not isinstance(scorer, ModelScorer):
        return lambda i: False  # programmatic scorers have no length limit

    def over(i: int) -> bool:
        return encode_conversation(scorer.tokenizer, prompts[i], responses[i], scorer.max_length,
                                   double_bos=scorer.double_bos).truncated

    return over


def score_rollouts(scorer: RewardScorer, policy_tokenizer, prompts: Sequence[Prompt],
                   prompt_token_ids: Sequence[Sequence[int]], response_token_ids: Sequence[Sequence[int]],
                   responses: Sequence[str], extras: dict | None = None) -> np.ndarray:
    """Rewards of a policy's samples, from token ids when the scorer shares the policy's tokenizer (no decode and
    re-encode: the fast path PPO needs), else from the decoded text through `scorer.score`. `extras` (a dict, for a
    `ModelScorer` only) receives its per-sequence extra outputs, as in `ModelScorer.score`."""
    if isinstance(scorer, ModelScorer) and same_tokenizer(scorer.tokenizer, policy_tokenizer) \
            and scorer.encoder.suffix is not None:
        return scorer.score_token_ids(prompt_token_ids, response_token_ids, extras)
    if extras is not None:
        if not isinstance(scorer, ModelScorer):
            raise ValueError(f"extras are only collected from a single model's scorer, not {type(scorer).__name__}")
        return scorer.score(prompts, responses, extras)
    if isinstance(scorer, EnsembleScorer):
        return combine_members([score_rollouts(m, policy_tokenizer, prompts, prompt_token_ids, response_token_ids,
                                               responses) for m in scorer.members], scorer.stats, scorer.combine,
                               scorer.uwo_lambda)
    return scorer.score(prompts, responses)


class TRLRewardFunction:
    """A proxy as a TRL reward function (GRPOTrainer, RLOOTrainer): `f(prompts, completions, completion_ids, ...)` ->
    one float per completion, through `score_rollouts` — from token ids when the proxy shares the policy's
    tokenizer. TRL's completion ids end with the stop token when the turn ended; it is dropped, as the chat template
    adds the turn's closing tokens itself. A non-finite reward is an error naming the prompt."""

    def __init__(self, scorer: RewardScorer, name: str, tokenizer, stop_ids):
        self.scorer, self.__name__, self.tokenizer = scorer, name, tokenizer
        self.stop_ids = set(stop_ids)
        self._heads: dict[str, list[int]] = {}

    def _head(self, prompt) -> list[int]:
        from pipeline.tokenization import prompt_ids

        key = repr([(m["role"], m["content"]) for m in prompt])
        if key not in self._heads:
            self._heads[key] = prompt_ids(self.tokenizer, prompt)
        return self._heads[key]

    def __call__(self, prompts, completions, completion_ids, prompt_id=None, **_) -> list[float]:
        chats = [as_messages(p) for p in prompts]
        contents = [list(ids[:-1]) if ids and ids[-1] in self.stop_ids else list(ids) for ids in completion_ids]
        texts = [c[-1]["content"].strip() if isinstance(c, list) else str(c).strip() for c in completions]
        rewards = score_rollouts(self.scorer, self.tokenizer, chats, [self._head(p) for p in chats], contents, texts)
        check_finite(rewards, self.__name__, list(prompt_id) if prompt_id is not None else list(range(len(texts))),
                     ("prompt_id",) if prompt_id is not None else ("completion",), where="a TRL rollout")
        return [float(r) for r in rewards]


# ------------------------------------------------------------------------------------------------------------
# building a scorer from a model directory or a stage's config (the one place every stage gets its scorer)


def load_reward_scorer(name_or_path: str | Path, batch_size: int = 32, max_length: int = 1024, dtype: str = "float32",
                       trust_remote_code: bool = False, strict_length: bool = False, double_bos: bool = False,
                       latent_stats: dict | None = None):
    """A `ModelScorer` for any reward model: an overopt/GRM-authors GRM directory or an HF sequence classifier.
    `double_bos`: tokenize as the GRM authors' released checkpoints were trained (see `encode_conversation`).
    `latent_stats` (`load_latent_stats`): an InfoRM GRM's scorer also gives the "outlier" extra (`grm_rewards_fn`)."""
    checked_local(name_or_path)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    if Path(name_or_path).is_dir() and is_grm_checkpoint(name_or_path):
        model = GRMRewardModel.from_pretrained(name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        model.to(default_device())
        return ModelScorer(grm_rewards_fn(model, latent_stats), model, tokenizer, batch_size, max_length,
                           strict_length=strict_length, double_bos=double_bos)
    model = load_seq_cls_reward_model(name_or_path, dtype, trust_remote_code)
    return ModelScorer(seq_cls_rewards(model), model, tokenizer, batch_size, max_length, strict_length=strict_length,
                       double_bos=double_bos)


def load_policy_logprob_scorer(name_or_path: str | Path, batch_size: int = 32, max_length: int = 1024,
                               dtype: str = "float32", trust_remote_code: bool = False, strict_length: bool = False):
    """A `PolicyLogProbScorer`: a causal LM's summed response log-probability log π(y|x) through the one scoring
    path (the policy's own tokenizer and chat template)."""
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    model = load_causal_lm(name_or_path, dtype, trust_remote_code)
    return PolicyLogProbScorer(model, tokenizer, batch_size, max_length, strict_length=strict_length)


def build_scorer(cfg, inputs: dict[str, Path], strict_length: bool = False):
    """The `RewardScorer` a `ScorerStageConfig` names: the gold, or a proxy (trained, checkpoint or ensemble).

    Trained proxies are read from their `train_proxy` artifacts in `inputs` ("model", or "member<i>" for an
    ensemble, whose members are standardised with the reference-set statistics saved beside them); a warm proxy's
    "model" is its `warm_average` artifact, one model like a trained proxy's. `strict_length`:
    a sequence over the scorer's max length is an error raised before any forward pass, instead of a NaN score.
    """

    if cfg.gold is not None:
        gold = cfg.gold
        if gold.type == "world":
            return WorldGoldScorer()
        return load_reward_scorer(gold.model_id, cfg.batch_size, cfg.max_length, gold.dtype, gold.trust_remote_code,
                                  strict_length, double_bos=gold.double_bos)
    proxy = cfg.proxy
    if proxy is None:
        raise ValueError(f"scorer {cfg.name!r} names neither a gold nor a proxy")
    if proxy.type == "checkpoint":
        return load_reward_scorer(proxy.path, cfg.batch_size, cfg.max_length, proxy.dtype, proxy.trust_remote_code,
                                  strict_length, double_bos=proxy.double_bos)
    if proxy.type == "ensemble":
        dirs = [inputs[f"member{i}"] for i in range(proxy.members)]
        members = [load_reward_scorer(d / "model", cfg.batch_size, cfg.max_length, cfg.dtype,
                                      strict_length=strict_length) for d in dirs]
        stats = [load_member_stats(d) for d in dirs]
        return EnsembleScorer(members, stats, proxy.combine, proxy.uwo_lambda)
    latent_stats = load_latent_stats(inputs["model"]) if proxy.type == "inform" else None
    return load_reward_scorer(inputs["model"] / "model", cfg.batch_size, cfg.max_length, cfg.dtype,
                              strict_length=strict_length, latent_stats=latent_stats)
