"""Scoring speed: the tiny study's best-of-n samples scored by its BT proxy, three ways.

    python benchmarks/bench_scoring.py [--repeats 3]

- exact:   every (prompt, response) rendered through the chat template and tokenized on its own
           (`encode_conversation`), as `bon_score` did before the fast path;
- text:    `ConversationEncoder` — each distinct prompt's template rendered once, responses tokenized in one batched
           call, the template's closing tokens appended (what `ModelScorer.score` does now);
- ids:     token ids straight from the policy (no decode, no re-tokenization; what PPO uses when the proxy shares the
           policy's tokenizer).

Prints, per way, the seconds to encode, the seconds of the model forward (the same for all three) and the total, and
the share of the total spent turning text into ids. Needs the tiny study's cache (`make demo` builds it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipeline.cache import ArtifactCache
from pipeline.config import load_config
from pipeline.models import load_tokenizer
from pipeline.records import read_sample_shards, sample_chats
from pipeline.runner import Runner
from pipeline.scoring import build_scorer
from pipeline.study import _sample_scorer, build_stages
from pipeline.tokenization import ConversationEncoder, encode_conversation, prompt_ids

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    runner = Runner(build_stages(cfg), ArtifactCache(REPO / cfg.run.cache_root))
    runner.run(until={"bon_sample", "train_proxy[bt]"})
    fps = runner.fingerprints()
    art = {k: runner.cache.path(k, fps[k]) for k in ("bon_sample", "train_proxy[bt]", "sft_policy")}
    samples = read_sample_shards(art["bon_sample"])
    prompts, responses = sample_chats(samples), list(samples.response)  # as bon_score passes them
    scorer = build_scorer(_sample_scorer(cfg, next(p for p in cfg.proxies if p.name == "bt")),
                          {"model": art["train_proxy[bt]"]}, strict_length=True)
    tokenizer = load_tokenizer(art["sft_policy"] / "model")
    # what a policy holds after sampling: prompt ids and response ids (here re-created once, outside the timing)
    heads = {}
    for p in prompts:
        heads.setdefault(repr(p), prompt_ids(tokenizer, p))
    head_rows = [heads[repr(p)] for p in prompts]
    content_rows = tokenizer(responses, add_special_tokens=False)["input_ids"]

    ways = {
        "exact": lambda: [encode_conversation(scorer.tokenizer, p, r, scorer.max_length)
                          for p, r in zip(prompts, responses)],
        "text": lambda: ConversationEncoder(scorer.tokenizer, scorer.max_length).encode(prompts, responses),
        "ids": lambda: ConversationEncoder(scorer.tokenizer, scorer.max_length).encode_ids(head_rows, content_rows),
    }
    print(f"{len(samples):,} samples ({samples.prompt_id.nunique()} prompts), BT proxy, "
          f"batch {scorer.batch_size}, {args.repeats} repeats (best)")
    print(f"{'way':6s} {'encode s':>9s} {'forward s':>10s} {'total s':>8s} {'tokenization share':>19s}")
    reference = None
    for name, encode in ways.items():
        enc_t, fwd_t = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            encoded = encode()
            t1 = time.perf_counter()
            values = scorer.score_encoded(encoded)
            t2 = time.perf_counter()
            enc_t.append(t1 - t0)
            fwd_t.append(t2 - t1)
        reference = values if reference is None else reference
        assert np.allclose(values, reference, atol=1e-6), f"{name} scores differ from the exact path"
        e, f = min(enc_t), min(fwd_t)
        print(f"{name:6s} {e:9.2f} {f:10.2f} {e + f:8.2f} {e / (e + f):18.0%}")


if __name__ == "__main__":
    main()
