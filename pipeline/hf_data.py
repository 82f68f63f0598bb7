"""Loaders for the paper-scale preference data in their Hugging Face schemas.

Each loader takes a local data file (parquet / json / jsonl), a local directory of such files, or a hub dataset id, and
loads through `datasets.load_dataset`. Required columns are checked before any expensive work (from the parquet
schema, the first JSON record or the hub builder's features) and again on what was loaded; a missing column raises a
ValueError that names the source and the column. Prompts come back as message lists (`[{"role", "content"}, ...]`,
every turn before the response), responses as raw strings (see `pipeline.records`).

Schemas (checked against the dataset cards and the code that built them):

- `llm-blender/Unified-Feedback` (configs `all`, `hh-rlhf`, ...; splits `train`, `val`): `id` (str), `conv_A`,
  `conv_B` (lists of {role, content}, roles "user"/"assistant"), `conv_A_rating`, `conv_B_rating` (float32),
  `num_turns` (int32), `source` (str). Ids are not unique in every config (UltraFeedback rows give two pairs per id).
- `HuggingFaceH4/hhh_alignment` (configs `harmless`, `helpful`, `honest`, `other`; split `test`): `input` (str, some
  of them a dialogue with "\\n\\nHuman:" / "\\n\\nAssistant:" markers), `targets` {choices: [str], labels: [int]}.
- `lmsys/mt_bench_human_judgments` (splits `human`, `gpt4_pair`): `question_id`, `model_a`, `model_b`, `winner`
  ("model_a", "model_b", "tie", "tie (bothbad)"), `judge`, `conversation_a`, `conversation_b` (lists of
  {content, role}, the whole two-turn conversation), `turn` (the judged turn, 1 or 2).
- `allenai/reward-bench` (splits `raw`, `filtered`; the benchmark is `filtered`): `prompt` (str, one user turn),
  `chosen`, `rejected` (str), `chosen_model`, `rejected_model`, `subset` (str, e.g. "alpacaeval-easy"), `id` (int).
- `allenai/reward-bench-2` (split `test`): `id` (str; "ref:<n>" / "tied:<n>" in the Ties subset), `prompt` (str),
  `chosen` (list of str: one answer, several in Ties), `rejected` (list of str: three, more in Ties), `num_correct`,
  `num_rejected`, `total_completions` (int), `models` (list of str), `subset` (str: Factuality, Precise IF, Math,
  Safety, Focus, Ties).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger("overopt")

DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
KNOWN_SPLITS = ("train", "val", "validation", "test", "dev", "human", "gpt4_pair")
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ROLE_ALIASES = {"human": "user", "user": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
                 "model": "assistant", "chatbot": "assistant", "system": "system"}

UNIFIED_FEEDBACK_COLUMNS = ["pair_id", "prompt_id", "prompt", "response_a", "response_b", "rating_a", "rating_b",
                            "source", "row_index"]
HHH_COLUMNS = ["pair_id", "prompt_id", "subset", "prompt", "chosen", "rejected"]
REWARDBENCH_COLUMNS = HHH_COLUMNS
REWARDBENCH2_COLUMNS = ["example_id", "prompt_id", "subset", "prompt", "chosen", "rejected", "kind", "group"]
MT_BENCH_COLUMNS = ["pair_id", "prompt_id", "subset", "prompt", "chosen", "rejected", "prompt_rejected", "turn",
                    "model_chosen", "model_rejected", "judge", "tie"]


# ----------------------------------------------------------------------------------------------------------------
# shared helpers


def prompt_id_of(prompt: Sequence[dict]) -> str:
    """A stable id for a prompt (its messages): a hash of the roles and contents, independent of dict key order."""
    canonical = json.dumps([[str(m["role"]), str(m["content"])] for m in prompt], ensure_ascii=False,
                           separators=(",", ":"))
    return "p" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def pair_prompts(df: pd.DataFrame) -> tuple[list[list[dict]], list[list[dict]]]:
    """The prompts to score `chosen` and `rejected` under. They differ only where the two responses continue different
    conversations (MT-Bench turn-2 judgments, whose context holds each model's own turn-1 answer): there a loader
    adds `prompt_rejected`, and scoring both sides under `prompt` would be wrong."""
    chosen = [normalise_messages(p) for p in df["prompt"]]
    if "prompt_rejected" not in df.columns:
        return chosen, [list(p) for p in chosen]
    return chosen, [normalise_messages(p) for p in df["prompt_rejected"]]


def normalise_messages(conv) -> list[dict]:
    """Plain {"role", "content"} dicts with lower-case canonical roles ("human" -> "user", "gpt" -> "assistant")."""
    out = []
    for m in conv:
        role = str(m["role"]).strip().lower()
        content = "" if m["content"] is None else str(m["content"])
        out.append({"role": _ROLE_ALIASES.get(role, role), "content": content})
    return out


def _split_last_assistant(conv: list[dict]) -> tuple[list[dict], str] | None:
    """(messages before the final assistant turn, that turn's text); None unless the conversation ends with one."""
    if not conv or conv[-1]["role"] != "assistant":
        return None
    return conv[:-1], conv[-1]["content"]


def _split_at_turn(conv: list[dict], turn: int) -> tuple[list[dict], str] | None:
    """(messages before the `turn`-th assistant message (1-based), its text); None when there is no such turn."""
    assistant = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if turn < 1 or len(assistant) < turn:
        return None
    i = assistant[turn - 1]
    return conv[:i], conv[i]["content"]


@dataclass
class _Source:
    """Where a dataset comes from: local data files (one format) or a hub id."""

    label: str  # for messages
    files: list[Path] | None = None
    builder: str | None = None  # "parquet" or "json" for files
    hub_id: str | None = None


def looks_local(path: str | Path) -> bool:
    """A path on this machine rather than a hub id (`org/name`): absolute, `./` or `~` relative, a data-file name,
    existing, under an existing folder, or not shaped like a hub id. The one rule for every loader."""
    path = str(path)
    p = Path(path).expanduser()
    return (p.is_absolute() or path.startswith((".", "~")) or p.suffix.lower() in DATA_SUFFIXES or p.exists()
            or Path(p.parts[0]).is_dir() or not _HUB_ID.match(path))


def _mentions(rel: Path, token: str) -> bool:
    """Whether a file's path (relative to the data directory) names `token`: a folder called `token`, a file stem equal
    to it, or a stem that starts with it followed by '-', '_' or '.' (train-00000-of-00002, val_release_data)."""
    token = token.lower()
    if any(part.lower() == token for part in rel.parts[:-1]):
        return True
    stem = rel.name.lower()
    for suffix in sorted(DATA_SUFFIXES, key=len, reverse=True):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return stem == token or re.match(re.escape(token) + r"[-_.]", stem) is not None


def _data_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise FileNotFoundError(f"no parquet/json/jsonl data files under {directory}")
    return files


def _one_format(files: list[Path], where: str) -> tuple[list[Path], str]:
    """Prefer parquet when a directory holds several formats; json and jsonl load with the same builder."""
    parquet = [f for f in files if DATA_SUFFIXES[f.suffix.lower()] == "parquet"]
    if parquet:
        if len(parquet) < len(files):
            log.info("%s: using the %d parquet file(s), ignoring %d json file(s)", where, len(parquet),
                     len(files) - len(parquet))
        return parquet, "parquet"
    return files, "json"


def _narrow_to_split(files: list[Path], root: Path, split: str | None, where: str) -> list[Path]:
    if not split:
        return files
    matching = [f for f in files if _mentions(f.relative_to(root), split)]
    if matching:
        return matching
    others = sorted({s for f in files for s in KNOWN_SPLITS if _mentions(f.relative_to(root), s)})
    if others:
        raise FileNotFoundError(f"{where}: no data files for split {split!r} (files there are for {others})")
    return files  # no file names a split: the directory is the split


def _resolve(path: str | Path, config: str | None, split: str | None) -> _Source:
    """Files (with their builder) or a hub id for one (config, split) of a dataset."""
    path_str = str(path)
    p = Path(path_str).expanduser()
    if p.is_file():
        if p.suffix.lower() not in DATA_SUFFIXES:
            raise ValueError(f"{p}: unsupported data file type {p.suffix!r} (expected .parquet, .json or .jsonl)")
        return _Source(str(p), [p], DATA_SUFFIXES[p.suffix.lower()])
    if p.is_dir():
        files = _data_files(p)
        if config:
            in_config = [f for f in files if any(part == config for part in f.relative_to(p).parts[:-1])]
            files = in_config or files
        files = _narrow_to_split(files, p, split, str(p))
        files, builder = _one_format(files, str(p))
        return _Source(f"{p} ({len(files)} file(s))", files, builder)
    if looks_local(path_str):
        raise FileNotFoundError(f"dataset path not found: {p} (expected a parquet/json/jsonl file, a directory of "
                                f"them, or a Hugging Face hub dataset id)")
    return _Source(f"hub:{path_str}" + (f"[{config}]" if config else ""), hub_id=path_str)


def _hub_call(hub_id: str, fn, *args, **kwargs):
    """Run a hub call; a path that is neither local nor reachable on the hub gets one clear error (and no second
    round of retries from a later call)."""
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{hub_id!r} is not a local file or directory, and no such dataset was found on the "
                                f"Hugging Face hub: {e}") from e
    except ConnectionError as e:
        raise ConnectionError(f"{hub_id!r} is not a local file or directory, and the Hugging Face hub could not be "
                              f"reached to load it: {e}") from e


def _peek_columns(source: _Source, config: str | None) -> list[str] | None:
    """Column names without loading the data; None where that cannot be had cheaply."""
    if source.hub_id is not None:
        from datasets import load_dataset_builder

        builder = _hub_call(source.hub_id, load_dataset_builder, source.hub_id, config)
        features = builder.info.features
        return list(features) if features is not None else None
    try:
        names: list[str] | None = None
        for f in source.files[:1]:  # files of one dataset share a schema; datasets checks the rest on load
            if source.builder == "parquet":
                import pyarrow.parquet as pq

                names = list(pq.read_schema(f).names)
            else:
                names = _first_json_record_keys(f)
        return names
    except (OSError, UnicodeDecodeError) as e:  # a peek is an optimisation; the post-load check still runs
        log.debug("could not read the columns of %s before loading: %s", source.label, e)
        return None


def _first_json_record_keys(path: Path) -> list[str] | None:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    return list(json.loads(line))
                except json.JSONDecodeError:
                    return None  # a pretty-printed object spanning lines: check after loading
            return None  # a JSON array: check after loading
    raise ValueError(f"{path}: data file is empty")


def _require(columns: Iterable[str] | None, required: Sequence[str], label: str) -> None:
    if columns is None:
        return
    columns = list(columns)
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{label}: missing required column(s) {missing} (has {columns})")


def _load(path: str | Path, config: str | None, split: str | None, required: Sequence[str],
          cache_dir: str | None = None):
    """A `datasets.Dataset` for one (config, split), its required columns checked before and after loading."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    source = _resolve(path, config, split)
    if source.files is not None:
        _require_rows(source.files, source.builder, source.label)
    _require(_peek_columns(source, config), required, source.label)
    if source.files is not None:
        try:
            ds = load_dataset(source.builder, data_files=[str(f) for f in source.files], split="train",
                              cache_dir=cache_dir)
        except (DatasetGenerationError, ValueError) as e:  # generic errors that do not say which file
            raise ValueError(f"{source.label}: could not be read as a {source.builder} dataset "
                             f"({type(e).__name__}: {e.__cause__ or e})") from e
    else:
        ds = _hub_call(source.hub_id, load_dataset, source.hub_id, config, split=split, cache_dir=cache_dir)
    _require(ds.column_names, required, source.label)
    if len(ds) == 0:
        raise ValueError(f"{source.label}: the dataset has no rows")
    return ds, source


def _require_rows(files: Sequence[Path], builder: str, label: str) -> None:
    """An empty data file is an error naming it, before `datasets` turns it into a generic generation error."""
    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"{f}: data file is empty (0 bytes)")
        if builder == "parquet":
            import pyarrow.parquet as pq

            try:
                rows = pq.read_metadata(f).num_rows
            except Exception as e:  # pyarrow.ArrowInvalid: not a parquet file
                raise ValueError(f"{f}: not a readable parquet file ({e})") from e
            if rows == 0:
                raise ValueError(f"{f}: data file has no rows")


def _log_dropped(label: str, dropped: dict[str, int], kept: int) -> None:
    for reason, n in dropped.items():
        if n:
            log.warning("%s: dropped %d row(s): %s (kept %d)", label, n, reason, kept)


# ----------------------------------------------------------------------------------------------------------------
# Unified-Feedback


def load_unified_feedback(path: str | Path, config: str | None = "all", split: str = "train", shuffle_seed: int = 42,
                          n_pairs: int | None = None, cache_dir: str | None = None) -> pd.DataFrame:
    """Pairs of `llm-blender/Unified-Feedback` in a seeded random order: the first `n_pairs` usable rows of the split
    shuffled with `shuffle_seed` (the permutation `np.random.default_rng(seed).permutation(n)`, the one
    `datasets.Dataset.shuffle(seed=seed)` uses). A row is usable when both conversations end with an assistant turn
    and share every turn before it, the prompt has text and neither response is empty; the rest are dropped and
    counted in a log message naming the file. No usable row at all (or an empty file) is an error naming the file.

    Returns pair_id (the row's `id`; `id#row_index` for ids that repeat within the split, the row index when there is
    no `id` column), prompt_id (`prompt_id_of(prompt)`), prompt (messages), response_a, response_b, rating_a, rating_b,
    source, row_index (position in the unshuffled split). Rating ties are kept: the pipeline re-labels with a gold RM.
    """
    if n_pairs is not None and n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1 or None, got {n_pairs}")
    required = ["conv_A", "conv_B", "conv_A_rating", "conv_B_rating"]
    ds, source = _load(path, config, split, required, cache_dir)
    n = len(ds)
    ids: list[str] | None = None
    duplicated: set[str] = set()
    if "id" in ds.column_names:
        ids = [str(x) for x in ds.data.column("id").to_pylist()]
        counts = pd.Series(ids).value_counts()
        duplicated = set(counts.index[counts > 1])
        if duplicated:
            log.info("%s: %d id(s) repeat within the split; their pair_ids get '#<row_index>'", source.label,
                     len(duplicated))
    order = np.random.default_rng(shuffle_seed).permutation(n)
    target = n if n_pairs is None else min(n_pairs, n)
    rows: list[dict] = []
    dropped = {"conv_A and conv_B differ before the final assistant turn": 0,
               "a conversation does not end with an assistant turn": 0,
               "empty prompt (no text before the final assistant turn)": 0,
               "empty response (a final assistant turn with no text)": 0}
    chunk = 4096
    for start in range(0, n, chunk):
        if len(rows) >= target:
            break
        idx = order[start:start + chunk]
        batch = ds.select(idx).to_dict()
        for j, row_index in enumerate(idx):
            if len(rows) >= target:
                break
            a = _split_last_assistant(normalise_messages(batch["conv_A"][j] or []))
            b = _split_last_assistant(normalise_messages(batch["conv_B"][j] or []))
            if a is None or b is None:
                dropped["a conversation does not end with an assistant turn"] += 1
                continue
            if a[0] != b[0]:
                dropped["conv_A and conv_B differ before the final assistant turn"] += 1
                continue
            if not any(m["content"].strip() for m in a[0]):
                dropped["empty prompt (no text before the final assistant turn)"] += 1
                continue
            if not a[1].strip() or not b[1].strip():
                dropped["empty response (a final assistant turn with no text)"] += 1
                continue
            row_index = int(row_index)
            if ids is None:
                pair_id = str(row_index)
            else:
                pair_id = ids[row_index] if ids[row_index] not in duplicated else f"{ids[row_index]}#{row_index}"
            rows.append({"pair_id": pair_id, "prompt_id": prompt_id_of(a[0]), "prompt": a[0],
                         "response_a": a[1], "response_b": b[1],
                         "rating_a": _float(batch["conv_A_rating"][j]), "rating_b": _float(batch["conv_B_rating"][j]),
                         "source": str(batch["source"][j]) if "source" in batch and batch["source"][j] is not None
                         else "", "row_index": row_index})
    _log_dropped(source.label, dropped, len(rows))
    if not rows:
        reasons = "; ".join(f"{n} {reason}" for reason, n in dropped.items() if n)
        raise ValueError(f"{source.label}: no usable pair among its {n} row(s) ({reasons}); a usable row has "
                         f"conv_A and conv_B sharing a non-empty prompt and each ending in a non-empty assistant turn")
    if n_pairs is not None and len(rows) < n_pairs:
        log.warning("%s: only %d usable pairs (n_pairs = %d)", source.label, len(rows), n_pairs)
    return pd.DataFrame(rows, columns=UNIFIED_FEEDBACK_COLUMNS)


def _float(x) -> float:
    return float("nan") if x is None else float(x)


# ----------------------------------------------------------------------------------------------------------------
# HHH-Alignment

_DIALOGUE_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]*")


def hhh_input_messages(text: str) -> list[dict]:
    """An HHH `input` as chat messages: a plain query is one user turn; a dialogue written with "Human:" /
    "Assistant:" markers (each after a blank line, or at the start) becomes alternating turns."""
    parts = _DIALOGUE_MARKER.split(text)
    if len(parts) == 1:
        return [{"role": "user", "content": text.strip()}]
    messages: list[dict] = []
    if parts[0].strip():
        messages.append({"role": "user", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:  # chat templates (gemma's) require alternating turns
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content.strip()}".strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    while messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()  # a trailing "Assistant:" cue: the response goes there
    return messages


def load_hhh_alignment(path: str | Path, subsets: Sequence[str] = HHH_SUBSETS, split: str = "test",
                       cache_dir: str | None = None) -> pd.DataFrame:
    """HHH-Alignment as chosen/rejected pairs: per row, the choice labelled 1 against each choice labelled 0.

    `path` is a hub id (each subset loads as its own config), a directory with one file (or folder) per subset named
    after it (harmless.parquet, helpful.jsonl, honest/test-0000.parquet, ...), or a single file whose subset is its
    `subset` column or, failing that, its file name. Returns pair_id, prompt_id, subset, prompt, chosen, rejected.
    """
    required = ["input", "targets"]
    p = Path(str(path)).expanduser()
    frames: list[tuple[str, object, str]] = []  # (subset, dataset, label)
    if p.is_file():
        ds, source = _load(p, None, None, required, cache_dir)
        frames.append((p.stem, ds, source.label))
    elif p.is_dir():
        files = _data_files(p)
        for subset in subsets:
            mine = [f for f in files if _mentions(f.relative_to(p), subset)]
            if not mine:
                raise FileNotFoundError(f"{p}: no data file for HHH-Alignment subset {subset!r} (expected e.g. "
                                        f"{subset}.parquet or {subset}.jsonl)")
            mine, builder = _one_format(_narrow_to_split(mine, p, split, f"{p} [{subset}]"), str(p))
            src = _Source(f"{p} [{subset}]", mine, builder)
            _require(_peek_columns(src, None), required, src.label)
            from datasets import load_dataset

            ds = load_dataset(builder, data_files=[str(f) for f in mine], split="train", cache_dir=cache_dir)
            _require(ds.column_names, required, src.label)
            frames.append((subset, ds, src.label))
    else:
        for subset in subsets:
            ds, source = _load(path, subset, split, required, cache_dir)
            frames.append((subset, ds, source.label))

    rows: list[dict] = []
    for default_subset, ds, label in frames:
        data = ds.to_dict()
        dropped = {"targets do not mark exactly one choice best (label 1) among two or more": 0}
        for i in range(len(ds)):
            subset = str(data["subset"][i]) if "subset" in data and data["subset"][i] else default_subset
            targets = data["targets"][i] or {}
            if "choices" not in targets or "labels" not in targets:
                raise ValueError(f"{label}: column 'targets' lacks 'choices'/'labels' (has {sorted(targets)})")
            choices, labels = [str(c) for c in targets["choices"]], [int(x) for x in targets["labels"]]
            if len(choices) != len(labels) or len(choices) < 2 or labels.count(1) != 1:
                dropped["targets do not mark exactly one choice best (label 1) among two or more"] += 1
                continue
            prompt = hhh_input_messages(str(data["input"][i]))
            best = labels.index(1)
            for j, (choice, lab) in enumerate(zip(choices, labels)):
                if j == best:
                    continue
                rows.append({"pair_id": f"hhh-{subset}-{i}-{j}", "prompt_id": prompt_id_of(prompt), "subset": subset,
                             "prompt": prompt, "chosen": choices[best], "rejected": choice})
        _log_dropped(label, dropped, len(rows))
    return pd.DataFrame(rows, columns=HHH_COLUMNS)


# ----------------------------------------------------------------------------------------------------------------
# MT-Bench human judgments


def load_mt_bench_human(path: str | Path, keep_ties: bool = False, split: str = "human",
                        turns: Sequence[int] = (1, 2), cache_dir: str | None = None) -> pd.DataFrame:
    """MT-Bench human judgments as chosen/rejected pairs for the judged turn.

    The response is the `turn`-th assistant message of each conversation (the last one when there is no `turn`
    column) and `prompt` is every message before it in the chosen conversation. For turn 1 both sides share that
    context; for turn 2 each side's context holds its own model's turn-1 answer, so the rejected response's context is
    in `prompt_rejected` (equal to `prompt` where they agree) - score through `pair_prompts(df)`.

    Ties ("tie", "tie (bothbad)") are dropped unless `keep_ties`; kept ties have `tie` True and chosen/rejected = A/B.
    `turns` selects the judged turns to keep (`(1,)` gives only pairs that share their prompt).
    Returns pair_id, prompt_id, subset ("mt_bench"), prompt, chosen, rejected, prompt_rejected, turn, model_chosen,
    model_rejected, judge, tie.
    """
    required = ["winner", "conversation_a", "conversation_b"]
    ds, source = _load(path, None, split, required, cache_dir)
    data = ds.to_dict()
    get = lambda col, i, default="": data[col][i] if col in data and data[col][i] is not None else default  # noqa: E731
    rows: list[dict] = []
    dropped = {"ties (keep_ties=False)": 0, "unknown winner value": 0,
               "a conversation has no assistant message for the judged turn": 0,
               "the two conversations differ in their user turns up to the judged turn": 0,
               f"judged turn not in turns={tuple(turns)}": 0}
    for i in range(len(ds)):
        winner = str(data["winner"][i]).strip().lower()
        tie = winner.startswith("tie")
        if tie and not keep_ties:
            dropped["ties (keep_ties=False)"] += 1
            continue
        if not tie and winner not in ("model_a", "model_b"):
            dropped["unknown winner value"] += 1
            continue
        conv_a = normalise_messages(data["conversation_a"][i] or [])
        conv_b = normalise_messages(data["conversation_b"][i] or [])
        turn = int(get("turn", i, 0) or 0) or sum(m["role"] == "assistant" for m in conv_a)
        if turn not in turns:
            dropped[f"judged turn not in turns={tuple(turns)}"] += 1
            continue
        a, b = _split_at_turn(conv_a, turn), _split_at_turn(conv_b, turn)
        if a is None or b is None:
            dropped["a conversation has no assistant message for the judged turn"] += 1
            continue
        if [m for m in a[0] if m["role"] != "assistant"] != [m for m in b[0] if m["role"] != "assistant"]:
            dropped["the two conversations differ in their user turns up to the judged turn"] += 1
            continue
        a_wins = tie or winner == "model_a"
        (ctx_c, resp_c), (ctx_r, resp_r) = (a, b) if a_wins else (b, a)
        model_a, model_b = str(get("model_a", i)), str(get("model_b", i))
        rows.append({"pair_id": f"mtb-{i}-q{get('question_id', i)}-t{turn}", "prompt_id": prompt_id_of(ctx_c),
                     "subset": "mt_bench", "prompt": ctx_c, "chosen": resp_c, "rejected": resp_r,
                     "prompt_rejected": ctx_r, "turn": turn,
                     "model_chosen": model_a if a_wins else model_b, "model_rejected": model_b if a_wins else model_a,
                     "judge": str(get("judge", i)), "tie": tie})
    _log_dropped(source.label, dropped, len(rows))
    n_own = sum(r["prompt"] != r["prompt_rejected"] for r in rows)
    if n_own:
        log.info("%s: %d of %d pairs continue different conversations (turn 2); their rejected side is scored under "
                 "prompt_rejected", source.label, n_own, len(rows))
    return pd.DataFrame(rows, columns=MT_BENCH_COLUMNS)


# ----------------------------------------------------------------------------------------------------------------
# RewardBench and RewardBench 2


def _benchmark_prompt(value, label: str, row: int) -> list[dict]:
    """A RewardBench prompt as messages: a string is one user turn; a list of {role, content} is kept as turns."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                for m in value):
        return normalise_messages(value)
    raise ValueError(f"{label}: row {row}: column 'prompt' is neither a string nor a list of {{role, content}} "
                     f"messages (got {type(value).__name__})")


def load_rewardbench(path: str | Path, split: str = "filtered", cache_dir: str | None = None) -> pd.DataFrame:
    """RewardBench (`allenai/reward-bench`, the "filtered" split) as chosen/rejected pairs, every row kept.

    `path`: a parquet/json/jsonl file, a directory of them (files naming `split` are taken when any do) or the hub id.
    Required columns: prompt, chosen, rejected (strings), subset; `id` names the pair when present. Returns pair_id
    ("rb-<id>"; "rb-<id>#<row>" for an id that repeats, "rb-<row>" without ids), prompt_id, subset, prompt
    (messages), chosen, rejected. A missing column, or a chosen/rejected that is not a string (a RewardBench 2 file
    given here), is a ValueError naming the file.
    """
    required = ["prompt", "chosen", "rejected", "subset"]
    ds, source = _load(path, None, split, required, cache_dir)
    data = ds.to_dict()
    ids = [str(x) for x in data["id"]] if "id" in data else [str(i) for i in range(len(ds))]
    repeated = {x for x, n in pd.Series(ids).value_counts().items() if n > 1}
    ids = [f"{x}#{i}" if x in repeated else x for i, x in enumerate(ids)]  # pair ids name one row each
    rows = []
    for i in range(len(ds)):
        for col in ("chosen", "rejected"):
            if not isinstance(data[col][i], str):
                raise ValueError(f"{source.label}: row {i} (id {ids[i]}): column {col!r} must be a string in the "
                                 f"RewardBench schema, got {type(data[col][i]).__name__} (a RewardBench 2 file goes "
                                 f"in eval_proxy.rewardbench2_path)")
        prompt = _benchmark_prompt(data["prompt"][i], source.label, i)
        rows.append({"pair_id": f"rb-{ids[i]}", "prompt_id": prompt_id_of(prompt), "subset": str(data["subset"][i]),
                     "prompt": prompt, "chosen": data["chosen"][i], "rejected": data["rejected"][i]})
    return pd.DataFrame(rows, columns=REWARDBENCH_COLUMNS)


def load_rewardbench2(path: str | Path, split: str = "test", cache_dir: str | None = None) -> pd.DataFrame:
    """RewardBench 2 (`allenai/reward-bench-2`) examples, each a prompt with lists of chosen and rejected answers.

    Required columns: id, prompt, chosen, rejected (lists of strings), subset; `num_correct`, when present, must equal
    the number of chosen answers (upstream takes the first num_correct of chosen + rejected as the correct ones).
    Outside the Ties subset an example has exactly one chosen answer. In Ties, `id` is "ref:<n>" (one correct answer)
    or "tied:<n>" (two or more), `kind` and `group` hold its two parts. Returns example_id, prompt_id, subset, prompt
    (messages), chosen, rejected (lists), kind, group ("" outside Ties). Every violation is a ValueError naming the
    file, the row and the column, raised before anything is scored.
    """
    required = ["id", "prompt", "chosen", "rejected", "subset"]
    ds, source = _load(path, None, split, required, cache_dir)
    data = ds.to_dict()
    rows = []
    for i in range(len(ds)):
        where = f"{source.label}: row {i} (id {data['id'][i]})"
        answers = {}
        for col in ("chosen", "rejected"):
            value = data[col][i]
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(x, str) for x in value):
                raise ValueError(f"{where}: column {col!r} must be a non-empty list of strings in the RewardBench 2 "
                                 f"schema, got {value!r:.80} (a RewardBench file goes in eval_proxy.rewardbench_path)")
            answers[col] = list(value)
        if "num_correct" in data and data["num_correct"][i] is not None \
                and int(data["num_correct"][i]) != len(answers["chosen"]):
            raise ValueError(f"{where}: num_correct is {data['num_correct'][i]} but 'chosen' holds "
                             f"{len(answers['chosen'])} answer(s)")
        subset, example_id = str(data["subset"][i]), str(data["id"][i])
        kind = group = ""
        if subset.lower() == "ties":
            kind, _, group = example_id.partition(":")
            if kind not in ("ref", "tied") or not group:
                raise ValueError(f"{where}: a Ties id must be 'ref:<n>' or 'tied:<n>'")
            if kind == "tied" and len(answers["chosen"]) < 2:
                raise ValueError(f"{where}: a 'tied' example needs two or more chosen answers")
        elif len(answers["chosen"]) != 1:
            raise ValueError(f"{where}: column 'chosen' must hold exactly one answer outside the Ties subset "
                             f"(holds {len(answers['chosen'])})")
        prompt = _benchmark_prompt(data["prompt"][i], source.label, i)
        rows.append({"example_id": example_id, "prompt_id": prompt_id_of(prompt), "subset": subset,
                     "prompt": prompt, **answers, "kind": kind, "group": group})
    frame = pd.DataFrame(rows, columns=REWARDBENCH2_COLUMNS)
    ties = frame[frame.kind != ""]
    repeated = ties[ties.duplicated(["kind", "group"])]
    if len(repeated):
        raise ValueError(f"{source.label}: Ties id {repeated.example_id.iloc[0]!r} appears more than once")
    return frame
