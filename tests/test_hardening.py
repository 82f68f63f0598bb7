"""Bad inputs found before any stage runs, and a cache that never deletes what overopt did not make: DeepSpeed
configs checked in the pre-flight, `gc` and the `.tmp` sweep refusing an unmarked cache root and never following a
symbolic link, names too long for the cache's folders rejected up front."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import pipeline.study
from pipeline.cache import MARKER, ArtifactCache, UnmarkedCacheError
from pipeline.cli import main
from pipeline.preflight import deepspeed_config_problem
from pipeline.runner import Runner, StageNode
from tests.fake_stages import FakeConfig

ROOT = Path(__file__).parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TINY = ROOT / "configs" / "tiny.yaml"


def _run(tmp_path, capsys, *overrides) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    code = main(["run", str(SMOKE), f"run.cache_root={tmp_path / 'cache'}", f"run.reports_dir={tmp_path / 'r'}",
                 *overrides])
    return code, capsys.readouterr().err, time.perf_counter() - t0


@pytest.mark.parametrize("content, message", [
    ('{"zero_optimization": {"stage": 2}', "not valid JSON (Expecting ',' delimiter: line 1"),
    ("[]", "holds a JSON list, not an object of DeepSpeed settings"),
    ('{"zero_optimization": {"stage": 9}}', "zero_optimization.stage is 9; DeepSpeed's ZeRO stages are 0, 1, 2 and 3"),
    ('{"fp16": {"enabled": true}}', "fp16 is enabled but no CUDA GPU is visible"),
    (None, "not found"),
])
def test_a_bad_deepspeed_config_is_rejected_before_any_stage_naming_key_and_file(tmp_path, capsys, content, message):
    ds = tmp_path / "ds.json"
    if content is not None:
        ds.write_text(content)
    code, err, _ = _run(tmp_path, capsys, f"ppo.deepspeed_config={ds}", "ppo.num_processes=2")
    assert code == 2
    assert f"ppo.deepspeed_config: {ds}: {message}" in err, err
    assert not any(p.name not in {"runs", ".lock", MARKER} for p in (tmp_path / "cache").glob("*"))  # nothing ran


def test_several_cpu_processes_without_deepspeed_are_rejected(tmp_path, capsys):
    """Without DeepSpeed, CPU ranks of an RL stage would not share one training run."""
    code, err, _ = _run(tmp_path, capsys, "ppo.num_processes=2")  # smoke.yaml: ppo.deepspeed_config: null
    assert code == 2 and "ppo.num_processes: 2 processes without a DeepSpeed config" in err, err


def test_the_shipped_deepspeed_configs_pass():
    files = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))
    assert {"zero2.json", "zero3.json", "zero2_bf16.json", "zero3_bf16.json"} <= {f.name for f in files}
    for f in files:
        fp16 = json.loads(f.read_text()).get("fp16", {}).get("enabled") is True
        assert deepspeed_config_problem(f, cuda=False) is None or fp16, f
        assert deepspeed_config_problem(f, cuda=True) is None, f


def test_a_proxy_name_too_long_for_the_cache_folders_is_rejected_up_front(tmp_path, capsys):
    name = "p" * 220
    code, err, _ = _run(tmp_path, capsys, f"proxies=[{{name: {name}, type: bt}}]", "ppo.proxies=null")
    assert code == 2
    assert "over the file system's 255-byte limit" in err and "shorten the proxy name" in err, err
    assert "error: proxies.pppp" in err and "(a 220-character proxy name)" in err, err
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------- the cache


@pytest.fixture
def two_studies(tmp_path, monkeypatch):
    """A cache holding an artifact of two fake studies (world.seed 0 and 1); gc keeps the second."""
    log = str(tmp_path / "calls.log")

    def nodes(cfg):
        return [StageNode("label", "tests.fake_stages", FakeConfig(value=cfg.world.seed, calls_log=log))]

    monkeypatch.setattr(pipeline.study, "build_stages", nodes)
    from pipeline.config import load_config

    cache = ArtifactCache(tmp_path / "cache")
    for seed in (0, 1):
        Runner(nodes(load_config(TINY, [f"world.seed={seed}"])), cache).run()
    return cache


def _gc(tmp_path, capsys, *args):
    code = main(["gc", str(TINY), "world.seed=1", f"run.cache_root={tmp_path / 'cache'}", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gc_never_follows_a_symlinked_stage_folder(tmp_path, capsys, two_studies):
    """gc deleted a fingerprint-named folder in a symlinked stage folder's target, then crashed leaving .trash."""
    outside = tmp_path / "outside"
    (outside / "0123456789abcdef").mkdir(parents=True)
    (outside / "0123456789abcdef" / "precious.txt").write_text("keep me")
    (two_studies.root / "linked_stage").symlink_to(outside, target_is_directory=True)
    (two_studies.root / "label" / "fedcba9876543210").symlink_to(outside / "0123456789abcdef")
    code, out, err = _gc(tmp_path, capsys, "--yes")
    assert code == 0, err
    assert "removed 1 item(s)" in out  # the other study's artifact
    assert "linked_stage  (a symbolic link: gc neither follows nor removes it)" in out
    assert (outside / "0123456789abcdef" / "precious.txt").read_text() == "keep me"
    assert (two_studies.root / "linked_stage").is_symlink()
    assert (two_studies.root / "label" / "fedcba9876543210").is_symlink()
    assert not (two_studies.root / ".trash").exists()


def test_gc_and_the_tmp_sweep_refuse_a_cache_root_overopt_did_not_make(tmp_path, capsys):
    """With cache_root pointed at a user's folder, gc offered its 16-hex folders and runs/* for deletion and a run
    emptied its .tmp/; both are refused now, and so is a run, which would write into it."""
    mine = tmp_path / "cache"
    for d in ("0123456789abcdef", "runs/old", ".tmp/work", "label/0123456789abcdef"):
        (mine / d).mkdir(parents=True)
        (mine / d / "notes.txt").write_text("mine")
    t0 = time.perf_counter()
    code, out, err = _gc(tmp_path, capsys, "--yes")
    assert code == 2 and "gc in" in err and f"has no {MARKER} file" in err, err
    with pytest.raises(UnmarkedCacheError, match="removing the temporary folders"):
        ArtifactCache(mine).sweep_stale()
    code, _, elapsed = _run(tmp_path, capsys)
    assert code == 2 and elapsed - (time.perf_counter() - t0) < 1
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("notes.txt")) == [
        ".tmp/work/notes.txt", "0123456789abcdef/notes.txt", "label/0123456789abcdef/notes.txt", "runs/old/notes.txt"]
    assert not (mine / MARKER).exists()


def test_a_cache_of_an_earlier_overopt_is_adopted(tmp_path):
    """Caches made before the marker existed (`.lock` and `runs/` in them) keep working: the next run marks them."""
    root = tmp_path / "cache"
    (root / "runs").mkdir(parents=True)
    (root / ".lock").write_text("")
    (root / ".tmp" / "dead").mkdir(parents=True)
    cache = ArtifactCache(root)
    cache.claim()
    assert (root / MARKER).is_file()
    assert cache.sweep_stale() == [root / ".tmp" / "dead"]


def test_the_sweep_unlinks_a_symlinked_tmp_without_following_it(tmp_path):
    outside = tmp_path / "outside"
    (outside / "keep").mkdir(parents=True)
    cache = ArtifactCache(tmp_path / "cache")
    cache.claim()
    (cache.tmp_root).symlink_to(outside, target_is_directory=True)
    cache.sweep_stale()
    assert (outside / "keep").is_dir() and not cache.tmp_root.exists()
