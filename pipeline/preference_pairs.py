"""Preference pairs as the proxies and the DPO arm train on them, and the accuracy of a reward on pairs.

`training_pairs` picks the train split (a fixed subset when `n_train_pairs` is set: every proxy and DPO run of a study
sees the same pairs) with the annotator's labels; `PairDataset` encodes both sides of each pair with the chat template
(`pipeline.tokenization`), dropping a pair whose response would be truncated; `PairCollator` batches chosen rows then
rejected rows, so one forward pass scores both sides. `pairwise_accuracy` is the one accuracy of a reward on pairs
(eval_proxy's sets, RewardBench's sections, train_proxy's training accuracy).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.records import messages
from pipeline.tokenization import ConversationEncoder, collate

DATA_SUBSET_SEED = 0  # every proxy of a study sees the same pairs (a controlled comparison); seeds vary init/order


def training_pairs(pairs: pd.DataFrame, labels: str, n: int | None) -> pd.DataFrame:
    """Train-split pairs ordered as the annotator preferred them (`labels`: "noisy" or "clean")."""
    train = pairs[pairs.split == "train"].reset_index(drop=True)
    if n is not None and n < len(train):
        train = train.sample(n=n, random_state=DATA_SUBSET_SEED).reset_index(drop=True)
    if labels == "noisy":
        flip = train.label_noisy == 0
        train.loc[flip, ["chosen", "rejected"]] = train.loc[flip, ["rejected", "chosen"]].to_numpy()
    return train


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, frame: pd.DataFrame, tokenizer, max_length: int, margin_scale: float):
        # both sides of every pair in two batched calls (each distinct prompt's template rendered once); the same ids
        # as encoding each conversation through the full template, which the encoder checks on the first pairs
        encoder = ConversationEncoder(tokenizer, max_length)
        prompts = [messages(p) for p in frame.prompt]
        chosen = encoder.encode(prompts, list(frame.chosen))
        rejected = encoder.encode(prompts, list(frame.rejected))
        gap = frame.gold_chosen.to_numpy(np.float64) - frame.gold_rejected.to_numpy(np.float64)
        margins = margin_scale * np.abs(gap)
        self.items = [(c, j, float(m)) for c, j, m in zip(chosen, rejected, margins)
                      if not (c.truncated or j.truncated)]  # filter, never train on a truncated response
        self.dropped = len(frame) - len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class PairCollator:
    """Chosen rows first, then rejected rows: one forward pass scores both sides of every pair."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items):
        batch = collate([c for c, _, _ in items] + [j for _, j, _ in items], self.pad_id)
        batch["margin"] = torch.tensor([m for _, _, m in items], dtype=torch.float32)
        return batch


def pairwise_accuracy(r_c: np.ndarray, r_r: np.ndarray, label: np.ndarray | None = None) -> dict:
    """Strict accuracy of preferring `chosen`; with `label` (1 = chosen preferred, 0 = rejected preferred) the
    accuracy against those labels. Pairs the scorer could not score (NaN) are counted and excluded."""
    ok = ~(np.isnan(r_c) | np.isnan(r_r))
    r_c, r_r = r_c[ok], r_r[ok]
    label = np.ones_like(r_c) if label is None else np.asarray(label)[ok]
    ties = r_c == r_r
    correct = np.where(label == 1, r_c > r_r, r_r > r_c)
    return {"pairs": int(ok.sum()), "unscored": int((~ok).sum()), "accuracy": float(correct.mean()) if ok.any() else
            float("nan"), "ties": int(ties.sum())}
