"""The runner's promises: fingerprints, caching, selective re-runs, atomic commits, corruption, locking."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cache import ArtifactCache, CacheLockedError
from pipeline.config import ConfigError
from pipeline.runner import Runner, StageNode
from tests.conftest import cache_locked_by_another_process
from tests.fake_stages import FakeConfig

ROOT = Path(__file__).parents[1]


def dag(tmp_path, values=None, proxies=("a", "b")):
    v = {"world": 1, "label": 2, **{f"train[{p}]": 10 for p in proxies}, **(values or {})}
    log = str(tmp_path / "calls.log")

    def node(key, inputs=None):
        return StageNode(key, "tests.fake_stages", FakeConfig(value=v[key], calls_log=log), inputs or {})

    nodes = [node("world"), node("label", {"world": "world"})]
    nodes += [node(f"train[{p}]", {"pairs": "label"}) for p in proxies]
    return nodes


def calls(tmp_path):
    f = tmp_path / "calls.log"
    return f.read_text().split() if f.exists() else []


def run(tmp_path, **kw):
    cache = ArtifactCache(tmp_path / "cache")
    plan = Runner(dag(tmp_path, **{k: v for k, v in kw.items() if k in ("values", "proxies")}), cache).run(
        **{k: v for k, v in kw.items() if k in ("only", "until", "force")})
    return {p.node.key: p for p in plan}


def test_unchanged_rerun_executes_nothing(tmp_path):
    run(tmp_path)
    assert len(calls(tmp_path)) == 4
    plan = run(tmp_path)
    assert len(calls(tmp_path)) == 4
    assert all(p.status == "cached" for p in plan.values())


def test_config_change_reruns_stage_and_descendants_only(tmp_path):
    first = run(tmp_path)
    (tmp_path / "calls.log").unlink()
    second = run(tmp_path, values={"label": 3})
    assert sorted(calls(tmp_path)) == ["10", "10", "3"]  # label and both trains, not world
    assert first["world"].fingerprint == second["world"].fingerprint
    assert first["label"].fingerprint != second["label"].fingerprint
    assert first["train[a]"].fingerprint != second["train[a]"].fingerprint


def test_adding_a_parametrised_stage_keeps_the_others(tmp_path):
    first = run(tmp_path)
    (tmp_path / "calls.log").unlink()
    second = run(tmp_path, proxies=("a", "b", "c"))
    assert calls(tmp_path) == ["10"]  # only train[c]
    for k in first:
        assert first[k].fingerprint == second[k].fingerprint


def test_only_until_force(tmp_path):
    run(tmp_path, until={"label"})
    assert calls(tmp_path) == ["1", "2"]
    run(tmp_path, only={"train[a]"})
    assert calls(tmp_path) == ["1", "2", "10"]
    run(tmp_path, force={"world"})
    assert calls(tmp_path) == ["1", "2", "10", "1", "10"]  # world forced, train[b] was missing
    with pytest.raises(ConfigError, match="unknown stage"):
        run(tmp_path, only={"nope"})


def test_only_refuses_missing_upstream(tmp_path):
    with pytest.raises(RuntimeError, match="not cached"):
        run(tmp_path, only={"label"})


def test_manifest_records_checksums_wall_time_and_config(tmp_path):
    plan = run(tmp_path)
    p = plan["label"]
    d = ArtifactCache(tmp_path / "cache").path("label", p.fingerprint)
    m = json.loads((d / "manifest.json").read_text())
    assert set(m["files"]) == {"value.txt"} and len(m["files"]["value.txt"]["sha256"]) == 64
    assert m["wall_time_s"] >= 0 and m["config"]["value"] == 2
    assert (d / "value.txt").read_text() == "3"  # 2 + upstream 1


@pytest.mark.parametrize("damage", ["flip", "delete", "extra"])
def test_corrupted_artifact_is_detected_and_recomputed(tmp_path, damage):
    plan = run(tmp_path)
    cache = ArtifactCache(tmp_path / "cache")
    d = cache.path("label", plan["label"].fingerprint)
    if damage == "flip":
        (d / "value.txt").write_text("9")
    elif damage == "delete":
        (d / "value.txt").unlink()
    else:
        (d / "stray.txt").write_text("?")
    assert cache.check("label", plan["label"].fingerprint).status == "corrupt"
    (tmp_path / "calls.log").unlink()
    run(tmp_path)
    assert calls(tmp_path) == ["2"]  # only the corrupt one; descendants' fingerprints are unchanged
    assert (d / "value.txt").read_text() == "3"
    assert cache.check("label", plan["label"].fingerprint).status == "cached"


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.cache import ArtifactCache
    from pipeline.runner import Runner, StageNode
    from tests.fake_stages import FakeConfig
    tmp = Path(sys.argv[1])
    cfg = FakeConfig(value=5, calls_log=str(tmp / "calls.log"), slow_marker=str(tmp / "marker"))
    cache = ArtifactCache(tmp / "cache")
    cache.claim()  # as `overopt run`: the root is overopt's before anything is swept
    with cache.lock():
        cache.sweep_stale()
        Runner([StageNode("slow", "tests.fake_stages", cfg)], cache).run()
""")


def test_sigkill_mid_stage_leaves_nothing_then_rerun_succeeds(tmp_path):
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "FAKE_STAGE_SLOW": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=ROOT)
    deadline = time.time() + 60
    while not (tmp_path / "marker").exists():
        assert time.time() < deadline and proc.poll() is None, "stage never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = ArtifactCache(tmp_path / "cache")
    assert not (tmp_path / "cache" / "slow").exists()  # nothing committed
    assert any((tmp_path / "cache" / ".tmp").iterdir())  # the half-written staging dir
    # the same run again (not slow this time) commits a complete artifact and sweeps the leftovers
    env["FAKE_STAGE_SLOW"] = "0"
    subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, cwd=ROOT, check=True)
    fps = list((tmp_path / "cache" / "slow").iterdir())
    assert len(fps) == 1 and cache.check("slow", fps[0].name).status == "cached"
    assert not (fps[0] / "partial.bin").exists()
    assert not any((tmp_path / "cache" / ".tmp").iterdir())


def test_a_second_run_on_the_same_cache_fails_clearly(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    with cache_locked_by_another_process(cache.root, tmp_path):
        with pytest.raises(CacheLockedError, match="another overopt run holds the cache lock"):
            with cache.lock(timeout_s=0.2):
                pass
    with cache.lock(timeout_s=5):  # released when the holder dies
        pass


def test_resumable_stage_keeps_partial_output(tmp_path):
    cache = ArtifactCache(tmp_path / "cache")
    with pytest.raises(RuntimeError):
        with cache.staging("s", "fp", resumable=True) as d:
            (d / "shard_0").write_text("done")
            raise RuntimeError("killed")
    with cache.staging("s", "fp", resumable=True) as d:
        assert (d / "shard_0").read_text() == "done"
