"""Knowledge-use diagnostics: does a scorer rank a clean response above the same response with one word made wrong?

GRM's claim is that regularising the reward model's hidden states keeps the base model's knowledge. These functions
measure whether a scorer *uses* such knowledge, on minimal pairs (`pipeline.world.minimal_pair`, or a file at paper
scale): the AUC P(score(clean) > score(flawed)) over pairs, ties counting ½, per kind of flaw, with a percentile
bootstrap interval over pairs. The base policy's log-probability (`pipeline.scoring.PolicyLogProbScorer`) is the
reference: what knowledge there was to keep. Used by the knowledge_base and knowledge[p] stages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.bon import bootstrap_ci
from pipeline.records import (
    KNOWLEDGE_PAIR_COLUMNS,
    KNOWLEDGE_SCORE_COLUMNS,
    RecordError,
    chat_prompts,
    finite_or_none,
    messages,
    read_table_file,
    write_records,
)
from pipeline.scoring import SequenceTooLongError, check_finite

log = logging.getLogger("overopt")

FILE_COLUMNS = ("prompt", "clean", "flawed", "kind")  # what a pairs file must have; pair_id, prompt_id optional


def pair_wins(clean: Sequence[float], flawed: Sequence[float]) -> np.ndarray:
    """Per pair: 1 when the clean side scores higher, ½ on a tie, 0 when the flawed side scores higher."""
    c, f = np.asarray(clean, dtype=np.float64), np.asarray(flawed, dtype=np.float64)
    if c.shape != f.shape:
        raise ValueError(f"clean and flawed scores differ in shape: {c.shape} vs {f.shape}")
    return (c > f) + 0.5 * (c == f)


def paired_auc(clean: Sequence[float], flawed: Sequence[float]) -> float:
    """P(score(clean) > score(flawed)) over the pairs, ties counting ½: 1 = always right, ½ = chance, 0 = reversed."""
    wins = pair_wins(clean, flawed)
    if wins.size == 0:
        raise ValueError("paired_auc: no pairs")
    return float(wins.mean())


def auc_interval(clean: Sequence[float], flawed: Sequence[float], n_boot: int, seed: int, ci: float = 0.95) -> dict:
    """The paired AUC with a percentile bootstrap interval over pairs (`n_boot` resamples, seeded; `lo`/`hi` are NaN
    when `n_boot` is 0), the number of pairs and of ties."""
    wins = pair_wins(clean, flawed)
    estimate = paired_auc(clean, flawed)
    lo = hi = float("nan")
    if n_boot > 0:  # the project's one percentile bootstrap (best-of-n's), with pairs in the place of prompts
        _, lo_, hi_ = bootstrap_ci(wins[:, None], n_boot, ci, seed)
        lo, hi = float(lo_[0]), float(hi_[0])
    return {"auc": estimate, "lo": lo, "hi": hi, "ci": ci, "n_boot": n_boot, "pairs": int(wins.size),
            "ties": int((wins == 0.5).sum())}


def load_pairs_file(path: str | Path) -> pd.DataFrame:
    """Minimal pairs from a jsonl/json or parquet file with columns prompt, clean, flawed, kind (and optionally
    pair_id, prompt_id), as `KNOWLEDGE_PAIR_COLUMNS` records. A prompt is the text of one user turn or a list of chat
    messages. Raises `RecordError` naming the file and the column (and row) that is missing or wrong."""
    frame = read_table_file(path, "knowledge.pairs_path")
    missing = [c for c in FILE_COLUMNS if c not in frame.columns]
    if missing:
        raise RecordError(f"knowledge.pairs_path {path}: missing column {missing[0]!r} (a pairs file needs "
                          f"{', '.join(FILE_COLUMNS)}; it has {list(frame.columns)})")
    if frame.empty:
        raise RecordError(f"knowledge.pairs_path {path}: no rows")
    for col in ("clean", "flawed", "kind"):
        bad = [i for i, v in enumerate(frame[col]) if not isinstance(v, str) or (col == "kind" and not v)]
        if bad:
            raise RecordError(f"knowledge.pairs_path {path}: column {col!r} must hold strings (row {bad[0]}: "
                              f"{frame[col].iloc[bad[0]]!r})")
    prompts = chat_prompts(frame.prompt, "knowledge.pairs_path", path)
    keys = [repr([(m["role"], m["content"]) for m in p]) for p in prompts]
    first = {k: j for j, k in enumerate(dict.fromkeys(keys))}  # distinct prompts in order of appearance
    out = pd.DataFrame({
        "pair_id": frame.pair_id.astype(str) if "pair_id" in frame else [f"kp{i:05d}" for i in range(len(frame))],
        "prompt_id": frame.prompt_id.astype(str) if "prompt_id" in frame else [f"kpp{first[k]:05d}" for k in keys],
        "kind": frame.kind, "prompt": prompts, "clean": frame.clean, "flawed": frame.flawed})
    dup = out.pair_id[out.pair_id.duplicated()]
    if len(dup):
        raise RecordError(f"knowledge.pairs_path {path}: column 'pair_id' repeats {dup.iloc[0]!r}")
    return out[KNOWLEDGE_PAIR_COLUMNS]


def score_minimal_pairs(scorer, name: str, pairs: pd.DataFrame, n_boot: int, seed: int, out: Path | None,
                        length_hint: str) -> dict:
    """Score both sides of every minimal pair with `scorer` (the one scoring path), check every score is finite
    (an error names the scorer and the pair), and write scores.parquet (`KNOWLEDGE_SCORE_COLUMNS`) and auc.json
    (per kind: AUC, bootstrap interval, pairs, ties). `scorer` should be strict about length: an unscored pair
    cannot be dropped without biasing the AUC; `length_hint` says which setting to raise. Returns auc.json's tree.
    `out` None: score only (a data-parallel rank other than the first, whose scores rank 0 holds too)."""
    prompts = [messages(p) for p in pairs.prompt]
    try:
        clean = scorer.score(prompts, list(pairs.clean))
        flawed = scorer.score(prompts, list(pairs.flawed))
    except SequenceTooLongError as e:
        raise SequenceTooLongError(f"{name}: {e}; raise {length_hint}") from None
    for side, values in (("clean", clean), ("flawed", flawed)):
        check_finite(values, name, list(pairs.pair_id), ("pair_id",), where=f"knowledge pairs, {side} side")
    scores = pairs[["pair_id", "prompt_id", "kind"]].assign(score_clean=clean, score_flawed=flawed)
    if out is None:
        return {}
    write_records(scores, out / "scores.parquet", KNOWLEDGE_SCORE_COLUMNS)
    kinds = {kind: auc_interval(group.score_clean, group.score_flawed, n_boot, seed)
             for kind, group in scores.groupby("kind", sort=True)}
    tree = {"scorer": name, "kinds": kinds}
    (out / "auc.json").write_text(json.dumps(finite_or_none(tree), indent=2, allow_nan=False))
    for kind, r in kinds.items():
        log.info("  %s, %s pairs: AUC %.3f [%.3f, %.3f] (%d pairs, %d ties)", name, kind, r["auc"], r["lo"], r["hi"],
                 r["pairs"], r["ties"])
    return tree
