"""The demo's fingerprints, pinned: a change that moves them invalidates every cached artifact of every study built
on the demo (and the committed reports with them), so it must be deliberate — a stage's VERSION bump, with the
reports regenerated and these values updated in the same commit. A new config field must enter fingerprints only when
set (`FINGERPRINTED_UNLESS_DEFAULT`, or `NOT_FINGERPRINTED` when it cannot change a result)."""

from __future__ import annotations

from pathlib import Path

from pipeline.cache import ArtifactCache
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.study import build_stages

DEMO = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

PINNED = {
    "world": "319e3a2fb3104d31", "sft_policy": "1c6ccb3372035320", "gold_label": "003b5c3bc316c914",
    "train_proxy[bt]": "c72a2d8f505d02d2", "eval_proxy[bt]": "bea2ca0c2c421e1f", "bon_sample": "b690b88e4253cd97",
    "bon_score[gold]": "fe36b96362fd7123", "bon_score[bt]": "e4a313d63a3b6d7d", "bon_curve[bt]": "b497766778b9a97e",
    "ppo[bt]": "270b2a46189de745", "ppo[grm_sft]": "b4a6e000c8125f85", "knowledge[bt]": "45c079e9443bad93",
}


def test_the_demos_fingerprints_are_pinned(tmp_path):
    fps = Runner(build_stages(load_config(DEMO)), ArtifactCache(tmp_path / "unused")).fingerprints()
    assert {k: fps[k] for k in PINNED} == PINNED
