"""How fast `overopt run` rejects bad input, and with what message.

Each case runs the real CLI (`python -m pipeline.cli run configs/tiny.yaml ...`) in a fresh process on a throw-away
cache, so the time includes interpreter start-up and imports — what a user waits for. Prints one row per case: the
exit status, the wall time, the stages that committed an artifact, and the CLI's error message.

    python benchmarks/bench_bad_inputs.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from pipeline.world import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _models(root: Path) -> dict[str, Path]:
    """An empty directory, a causal LM and a 1-output sequence classifier, built from configs (no hub)."""
    tok = build_tokenizer()
    torch.manual_seed(0)

    def config(**kw):
        return LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, **kw)

    dirs = {"empty": root / "empty", "causal": root / "causal", "seq_cls": root / "seq_cls"}
    dirs["empty"].mkdir()
    LlamaForCausalLM(config()).save_pretrained(dirs["causal"])
    LlamaForSequenceClassification(config(num_labels=1)).save_pretrained(dirs["seq_cls"])
    for d in ("causal", "seq_cls"):
        tok.save_pretrained(dirs[d])
    return dirs


def _uf_file(path: Path, rows: list[dict]) -> Path:
    """A Unified-Feedback-schema parquet file."""
    pd.DataFrame(rows, columns=["conv_A", "conv_B", "conv_A_rating", "conv_B_rating"]).to_parquet(path)
    return path


def _uf_row(prompt: str, a: str, b: str) -> dict:
    return {"conv_A": [{"role": "user", "content": prompt}, {"role": "assistant", "content": a}],
            "conv_B": [{"role": "user", "content": prompt}, {"role": "assistant", "content": b}],
            "conv_A_rating": 1.0, "conv_B_rating": 0.0}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="overopt-bad-inputs-"))
    dirs = _models(work)
    empty_uf = _uf_file(work / "empty.parquet", [])
    no_prompt_uf = _uf_file(work / "no_prompt.parquet", [_uf_row("", "apple", "pear") for _ in range(5)])
    bad_json, list_json, stage9_json = (work / "bad.json", work / "list.json", work / "stage9.json")
    bad_json.write_text('{"zero_optimization": {"stage": 2}')
    list_json.write_text("[]")
    stage9_json.write_text('{"zero_optimization": {"stage": 9}}')
    hub = ["policy.source=hub", f"policy.model_id={dirs['causal']}", "gold.type=hf",
           f"gold.model_id={dirs['seq_cls']}", "gold_label.source=unified_feedback", "ppo=null"]
    cases = {
        "unknown config key (typo)": ["proxy_training.lr_rate=1e-3"],
        "value out of range": ["gold_label.noise_rate=1.5"],
        "proxies: []": ["proxies=[]", "ppo=null"],
        "checkpoint proxy at an empty directory": [
            f"proxies=[{{name: bt, type: bt}}, {{name: rel, type: checkpoint, path: {dirs['empty']}}}]",
            "ppo.proxies=[bt]"],
        "checkpoint proxy at a causal LM (no score head)": [
            f"proxies=[{{name: bt, type: bt}}, {{name: rel, type: checkpoint, path: {dirs['causal']}}}]",
            "ppo.proxies=[bt]"],
        "gold.type hf at a causal LM": [*hub, f"gold.model_id={dirs['causal']}",
                                        f"gold_label.dataset_path={empty_uf}"],
        "empty Unified-Feedback file": [*hub, f"gold_label.dataset_path={empty_uf}"],
        "Unified-Feedback file with no usable pair": [*hub, f"gold_label.dataset_path={no_prompt_uf}"],
        "missing dataset file": [*hub, f"gold_label.dataset_path={work / 'nope.parquet'}"],
        "DeepSpeed config: bad JSON syntax": [f"ppo.deepspeed_config={bad_json}"],
        "DeepSpeed config: []": [f"ppo.deepspeed_config={list_json}"],
        "DeepSpeed config: ZeRO stage 9": [f"ppo.deepspeed_config={stage9_json}"],
        "DeepSpeed config: missing file": [f"ppo.deepspeed_config={work / 'nope.json'}"],
        "proxy name of 220 characters": [f"proxies=[{{name: {'p' * 220}, type: bt}}]", "ppo.proxies=null"],
        "cache_root: a non-empty folder overopt did not make": ["UNMARKED"],
    }
    rows = []
    for name, overrides in cases.items():
        cache = work / f"cache-{len(rows)}"
        if overrides == ["UNMARKED"]:  # a user's own folder given as the cache root
            (cache / "0123456789abcdef").mkdir(parents=True)
            (cache / "0123456789abcdef" / "notes.txt").write_text("mine")
            overrides = []
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(TINY), f"run.cache_root={cache}",
                               *overrides], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        stages_ran = sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")
                            and p.name not in ("runs", "0123456789abcdef")) \
            if cache.exists() else []
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        start_at = next((i for i, line in enumerate(lines) if line.startswith("error")), 0)
        message = " ".join(lines[start_at:start_at + 3])
        rows.append({"case": name, "exit": proc.returncode, "seconds": round(seconds, 1),
                     "stages run": ", ".join(stages_ran) or "none", "message": message[:240]})
    with pd.option_context("display.max_colwidth", 240, "display.width", 250):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
