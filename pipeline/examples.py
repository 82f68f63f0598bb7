"""Example responses of an over-optimization curve at low, peak and high KL (`examples.json` of the curve stages).

A curve says *how much* gold is lost past the peak; a few responses say *how* (lists pushed past k, repeats). Both
curve stages pick the same evaluation prompts (`example_prompt_ids`: a fixed seed, not the stage's, so best-of-n, every
RL arm and every seed of every proxy show the same prompts side by side) and store, per point, the response with its
proxy and gold scores, copied from the sample records by (prompt_id, sample_idx): nothing is re-parsed or decoded.

examples.json: {"proxy": <curve's name>, "arm": "best-of-n" | "rl", "prompt_ids": [...],
                "points": [{"point": "low" | "peak" | "high", "kl": <the curve's KL there>, "n" | "step": ...,
                            "examples": [{"prompt_id", "prompt" (messages), "sample_idx", "response", "proxy", "gold",
                                          (RL: "kl_k1" of that sample)}, ...]}, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from pipeline.records import RecordError, messages, prompt_text

# How many evaluation prompts a curve shows, and the seed choosing them: the same for every stage, so that the
# examples of different arms, proxies and seeds are of the same prompts.
N_PROMPTS = 3
SEED = 0
POINTS = ("low", "peak", "high")


def example_prompt_ids(prompt_ids, k: int = N_PROMPTS, seed: int = SEED) -> list[str]:
    """`k` of the distinct prompt ids (all when fewer), chosen by a seeded draw, in sorted order."""
    ids = sorted(set(prompt_ids))
    chosen = np.random.default_rng(seed).choice(len(ids), size=min(k, len(ids)), replace=False)
    return [ids[i] for i in sorted(chosen)]


def example(prompt_id: str, sample_idx: int, record: Mapping, proxy: float, gold: float, **extra) -> dict:
    """One example as stored in examples.json: the sample's keys, its record's prompt and response, its scores."""
    return {"prompt_id": str(prompt_id), "prompt": messages(record["prompt"]), "sample_idx": int(sample_idx),
            "response": str(record["response"]), "proxy": float(proxy), "gold": float(gold), **extra}


def lookup(samples: pd.DataFrame, keys: tuple, source: Path | str) -> pd.Series:
    """The sample record at `keys` of a frame indexed by its keys; a missing record is a RecordError naming the
    artifact (scores and samples of different runs)."""
    try:
        return samples.loc[keys]
    except KeyError:
        raise RecordError(f"{source}: no sample record {dict(zip(samples.index.names, keys))} for a scored "
                          f"sample; the scores were not made from these samples") from None


def write_examples(path: Path, proxy: str, arm: str, prompt_ids: list[str], points: list[dict]) -> None:
    """examples.json of one curve (schema in the module docstring); strict JSON, text kept as UTF-8."""
    tree = {"proxy": proxy, "arm": arm, "prompt_ids": [str(p) for p in prompt_ids], "points": points}
    path.write_text(json.dumps(tree, indent=2, ensure_ascii=False, allow_nan=False))


EXAMPLE_COLUMNS = ["proxy_name", "arm", "run", "point", "n", "step", "kl", "prompt_id", "prompt", "sample_idx",
                   "response", "proxy", "gold"]


def examples_frame(path: Path, proxy_name: str, arm: str) -> pd.DataFrame:
    """An examples.json as rows (`EXAMPLE_COLUMNS`): one per point and prompt; the prompt as its last user turn.
    `arm` is the arm's display name (best-of-n, PPO, ...); `run` is the curve's own name (a seed's run name)."""
    data = json.loads(Path(path).read_text())
    rows = [{"proxy_name": proxy_name, "arm": arm, "run": data["proxy"], "point": pt["point"], "n": pt.get("n"),
             "step": pt.get("step"), "kl": pt["kl"], "prompt_id": e["prompt_id"], "prompt": prompt_text(e["prompt"]),
             "sample_idx": e["sample_idx"], "response": e["response"], "proxy": e["proxy"], "gold": e["gold"]}
            for pt in data["points"] for e in pt["examples"]]
    return pd.DataFrame(rows, columns=EXAMPLE_COLUMNS).astype({"n": "Int64", "step": "Int64"})
