"""Record formats shared by stages, stored as parquet and keyed by ids.

A prompt is always stored as its list of chat messages (`[{"role": "user", "content": ...}, ...]`), responses as raw
strings. Nothing downstream recovers text from decoded token ids of another stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

# One row per preference pair (gold_label output, RM training and evaluation input).
PAIR_COLUMNS = ["pair_id", "prompt_id", "prompt", "chosen", "rejected", "gold_chosen", "gold_rejected",
                "label_clean", "label_noisy", "split"]
# One row per gold-scored candidate pair (gold_score output, gold_label input).
CANDIDATE_COLUMNS = ["pair_id", "prompt_id", "prompt", "response_a", "response_b", "gold_a", "gold_b"]
# One row per sampled response (bon_sample output).
SAMPLE_COLUMNS = ["prompt_id", "sample_idx", "prompt", "response", "n_tokens", "finished"]
# One row per scored response (bon_score output).
SCORE_COLUMNS = ["prompt_id", "sample_idx", "score"]
# Samples of RL-trained policies (ppo_sample output) carry the export they came from and the KL measured on them.
RL_SAMPLE_COLUMNS = ["step", *SAMPLE_COLUMNS, "kl_k1", "kl_k3", "proxy_score"]

# One row per minimal pair of the knowledge diagnostics (knowledge_pairs output): a clean response and the same
# response with one word made wrong, of a named `kind` ("intruder", "repeat" in the tiny world).
KNOWLEDGE_PAIR_COLUMNS = ["pair_id", "prompt_id", "kind", "prompt", "clean", "flawed"]
# One scorer's rewards of both sides of every minimal pair (knowledge_base and knowledge[p] output).
KNOWLEDGE_SCORE_COLUMNS = ["pair_id", "prompt_id", "kind", "score_clean", "score_flawed"]


def sample_keys(frame: pd.DataFrame) -> list[str]:
    """The columns that key a sample: (step,) prompt_id, sample_idx."""
    return (["step"] if "step" in frame.columns else []) + ["prompt_id", "sample_idx"]


class RecordError(ValueError):
    """A record file is missing or lacks a required column; the message names the file and the column."""


def user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def prompt_text(prompt) -> str:
    """The last user turn of a stored prompt, for display."""
    return [m for m in prompt if m["role"] == "user"][-1]["content"]


def write_records(df: pd.DataFrame, path: Path, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise RecordError(f"refusing to write {path}: missing columns {missing}")
    df.to_parquet(path, index=False)


def write_shard(df: pd.DataFrame, path: Path, columns: Iterable[str]) -> None:
    """One shard of a resumable stage, atomically (write, fsync, rename): a resumed run trusts every shard it finds,
    and a killed or full-disk write leaves only a `*.tmp` file, which the stage removes before resuming."""
    from pipeline.durable import replace_atomically

    replace_atomically(path, lambda tmp: write_records(df, tmp, columns))


def shards_problem(out: Path) -> str | None:
    """Why the shards a killed run of a sharded stage left in `out/shards/` cannot be resumed from (a shard whose
    parquet footer does not read), or None. The runner calls it before resuming (a stage's `resume_problem`)."""
    import pyarrow.parquet as pq

    for f in sorted((Path(out) / "shards").glob("shard_*.parquet")):
        try:
            pq.read_metadata(f)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError...
            return f"shard {f.name} is unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def read_records(path: Path, columns: Iterable[str]) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"record file not found: {path}")
    df = pd.read_parquet(path)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise RecordError(f"{path} lacks column(s) {missing} (has {list(df.columns)})")
    return df


def read_table_file(path: Path | str, key: str) -> pd.DataFrame:
    """A configured jsonl/json or parquet file (config key `key`) as a frame; a missing file or another format is a
    `RecordError` naming the key and the file."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{key}: file not found: {path}")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=path.suffix == ".jsonl")
    raise RecordError(f"{key} {path}: expected a .jsonl, .json or .parquet file")


def chat_prompts(values: Iterable, key: str, path: Path | str) -> list[list[dict]]:
    """The `prompt` column of a configured file as chat-message lists: each value the text of one user turn or a list
    of chat messages (the records' form). A value that is neither is a `RecordError` naming the key, file and row."""
    out = []
    for i, p in enumerate(values):
        try:
            out.append(user_prompt(p) if isinstance(p, str) else messages(p))
        except (TypeError, KeyError):
            raise RecordError(f"{key} {path}: column 'prompt' row {i} is neither text nor a list of chat messages "
                              f"({p!r})") from None
    return out


PROMPT_FILE_COLUMNS = ("prompt_id", "prompt")  # what a prompts file (ood.prompts_path) must have


def load_prompts_file(path: Path | str, key: str, n_prompts: int | None = None) -> pd.DataFrame:
    """Evaluation prompts (prompt_id, prompt) from a jsonl/json or parquet file with columns prompt_id and prompt (a
    list of chat messages, or a user turn's text), its first `n_prompts` rows (None: all). A missing column, an empty
    file, a repeated prompt_id or a prompt that is not a prompt is a `RecordError` naming `key`, the file and the
    column."""
    frame = read_table_file(path, key)
    missing = [c for c in PROMPT_FILE_COLUMNS if c not in frame.columns]
    if missing:
        raise RecordError(f"{key} {path}: missing column {missing[0]!r} (a prompts file needs "
                          f"{', '.join(PROMPT_FILE_COLUMNS)}; it has {list(frame.columns)})")
    frame = frame.head(n_prompts) if n_prompts is not None else frame
    if frame.empty:
        raise RecordError(f"{key} {path}: no rows")
    ids = frame.prompt_id.astype(str)
    if ids.duplicated().any():
        raise RecordError(f"{key} {path}: column 'prompt_id' repeats {ids[ids.duplicated()].iloc[0]!r}")
    return pd.DataFrame({"prompt_id": ids.to_numpy(), "prompt": chat_prompts(frame.prompt, key, path)})


def messages(prompt) -> list[dict]:
    """A stored prompt (list/array of structs) as plain message dicts for a chat template."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def sample_chats(samples: pd.DataFrame) -> list[list[dict]]:
    """Each sample's prompt as chat messages, one list object per prompt_id shared by all its rows (records are keyed
    by id: a prompt_id has one prompt), so it is parsed once and an encoder renders its template once."""
    first_rows = np.flatnonzero(~samples.prompt_id.duplicated().to_numpy())
    chats = {samples.prompt_id.iat[i]: messages(samples.prompt.iat[i]) for i in first_rows}
    return [chats[pid] for pid in samples.prompt_id]


def read_sample_shards(artifact: Path) -> pd.DataFrame:
    """All shards of a bon_sample or ppo_sample artifact as one frame, ordered by its keys ((step,) prompt_id,
    sample_idx)."""
    shards = sorted((Path(artifact) / "shards").glob("shard_*.parquet"))
    if not shards:
        raise RecordError(f"no sample shards in {Path(artifact) / 'shards'}")
    frame = pd.concat([read_records(f, SAMPLE_COLUMNS) for f in shards], ignore_index=True)
    return frame.sort_values(sample_keys(frame)).reset_index(drop=True)


def score_matrix(scores: pd.DataFrame, source: Path | str, prompt_ids: list[str] | None = None):
    """(P, N) matrix of a score table keyed by (prompt_id, sample_idx); rows in `prompt_ids` order (default sorted).
    `source` names the file in errors."""
    dup = scores.duplicated(["prompt_id", "sample_idx"])
    if dup.any():
        repeated = scores.loc[dup, ["prompt_id", "sample_idx"]].head(3).values.tolist()
        raise RecordError(f"{source}: repeated keys {repeated}")
    table = scores.pivot(index="prompt_id", columns="sample_idx", values="score")
    if prompt_ids is not None:
        missing = sorted(set(prompt_ids) - set(table.index))
        if missing:
            raise RecordError(f"{source}: no scores for prompt_id(s) {missing[:3]}")
        table = table.loc[prompt_ids]
    holes = table.isna().stack()
    if holes.any():
        raise RecordError(f"{source}: missing or NaN scores at (prompt_id, sample_idx) "
                          f"{holes[holes].index[:3].tolist()}")
    return table.to_numpy(dtype=float), list(table.index)


def finite_or_none(tree):
    """A JSON-able tree with every non-finite float replaced by None, for strict JSON (`allow_nan=False`): an
    infinite fitted peak (β ≤ 0: no over-optimization within the fit) or an undefined standard error becomes null."""
    import math

    if isinstance(tree, dict):
        return {k: finite_or_none(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [finite_or_none(v) for v in tree]
    if isinstance(tree, float):  # numpy floats are floats
        return tree if math.isfinite(tree) else None
    return tree


# A curve stage's artifact (bon_curve[p], <arm>_curve[run]): its table, one row per n or export, and its summary (the
# empirical peak, the Gao fit and its check). Written and read here only.
CURVE_FILE = "curve.parquet"
FIT_FILE = "fit.json"


def write_curve(table: pd.DataFrame, out: Path, fit: dict) -> None:
    """A curve stage's table and its summary (strict JSON: non-finite floats as null, `finite_or_none`)."""
    table.to_parquet(Path(out) / CURVE_FILE, index=False)
    (Path(out) / FIT_FILE).write_text(json.dumps(finite_or_none(fit), indent=2, allow_nan=False))


def read_curve(artifact: Path) -> pd.DataFrame:
    """A curve stage's table (bon_curve: a row per n; an RL arm's: a row per export)."""
    path = Path(artifact) / CURVE_FILE
    if not path.is_file():
        raise RecordError(f"{path}: no curve table (is {Path(artifact).name} a curve stage's artifact?)")
    return pd.read_parquet(path)


def read_fit(artifact: Path) -> dict:
    """A curve stage's summary (fit.json)."""
    path = Path(artifact) / FIT_FILE
    if not path.is_file():
        raise RecordError(f"{path}: no curve summary (is {Path(artifact).name} a curve stage's artifact?)")
    return json.loads(path.read_text())


def training_prompts(pairs_dir: Path) -> pd.DataFrame:
    """The distinct prompts of the training split of a gold_label artifact, ordered by prompt_id: what RL trains on
    (evaluation prompts are never among them)."""
    pairs = read_records(Path(pairs_dir) / "pairs.parquet", PAIR_COLUMNS)
    train = pairs[pairs.split == "train"].drop_duplicates("prompt_id").sort_values("prompt_id")
    if train.empty:
        raise RecordError(f"{Path(pairs_dir) / 'pairs.parquet'} has no training pairs to take RL prompts from")
    return train[["prompt_id", "prompt"]].reset_index(drop=True)
