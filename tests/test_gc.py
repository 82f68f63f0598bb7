"""`overopt gc CONFIG... [--yes]`: lists, and removes, what none of the named studies reference; keeps their current
artifacts, their current resumable outputs and the newest run folder of each; refuses a locked cache."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.study
from pipeline.cache import ArtifactCache
from pipeline.cli import main
from pipeline.runner import Runner, StageNode
from tests.conftest import cache_locked_by_another_process
from tests.fake_stages import FakeConfig

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture
def study(tmp_path, monkeypatch):
    """Studies whose DAG is two fake stages; `world.seed` is the value of `label`, so it changes its fingerprint."""
    log = str(tmp_path / "calls.log")

    def nodes(cfg):
        return [StageNode("world", "tests.fake_stages", FakeConfig(value=1, calls_log=log)),
                StageNode("label", "tests.fake_stages", FakeConfig(value=cfg.world.seed, calls_log=log),
                          {"world": "world"})]

    monkeypatch.setattr(pipeline.study, "build_stages", nodes)
    cache = ArtifactCache(tmp_path / "cache")

    def run(seed: int, name: str = "a") -> dict[str, str]:
        from pipeline.config import load_config

        cfg = load_config(TINY, [f"world.seed={seed}", f"study={name}"])
        return Runner(nodes(cfg), cache).run() and Runner(nodes(cfg), cache).fingerprints()

    return cache, run


def _run_folder(cache: ArtifactCache, stamp: str, study_name: str, size: int = 100) -> Path:
    d = cache.root / "runs" / stamp
    d.mkdir(parents=True)
    (d / "resolved_config.yaml").write_text(f"study: {study_name}\nrun: {{}}\n")
    (d / "run.log").write_text("x" * size)
    return d


def _gc(tmp_path, capsys, *args):
    code = main(["gc", *args, f"run.cache_root={tmp_path / 'cache'}"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gc_lists_then_removes_only_what_no_named_study_references(tmp_path, capsys, study):
    cache, run = study
    old = run(0)
    new = run(1)
    assert old["world"] == new["world"] and old["label"] != new["label"]
    (cache.root / ".partial" / f"label.{new['label']}").mkdir(parents=True)  # resumable output of a current stage
    (cache.root / ".partial" / f"label.{new['label']}" / "shard_0").write_text("keep")
    (cache.root / ".partial" / f"label.{old['label']}").mkdir()  # of a fingerprint no study has any more
    (cache.root / ".partial" / f"label.{old['label']}" / "shard_0").write_text("stale")
    older = _run_folder(cache, "20240101-000000-000001", "a", 1000)
    newest = _run_folder(cache, "20240102-000000-000001", "a")
    other = _run_folder(cache, "20240103-000000-000001", "someone_else")
    (cache.root / "notes").mkdir()  # not a cache folder: never a candidate
    (cache.root / "notes" / "mine.txt").write_text("mine")

    cfg_args = [str(TINY), "world.seed=1", "study=a"]
    code, out, _ = _gc(tmp_path, capsys, *cfg_args)
    assert code == 0
    listed = [line.split()[2] for line in out.splitlines() if line.startswith("  ")]
    assert sorted(listed) == sorted([f"label/{old['label']}", f".partial/label.{old['label']}",
                                     f"runs/{older.name}", f"runs/{other.name}"])
    assert any("1.02 kB" in line and older.name in line for line in out.splitlines())  # 1000 + 18 bytes
    assert "total" in out and "--yes" in out
    assert cache.path("label", old["label"]).is_dir() and older.is_dir()  # a listing removes nothing

    code, out, _ = _gc(tmp_path, capsys, *cfg_args, "--yes")
    assert code == 0 and "removed 4 item(s)" in out
    assert not cache.path("label", old["label"]).exists() and not older.exists() and not other.exists()
    assert not (cache.root / ".partial" / f"label.{old['label']}").exists()
    assert (cache.root / ".partial" / f"label.{new['label']}" / "shard_0").read_text() == "keep"
    assert newest.is_dir() and (cache.root / "notes" / "mine.txt").exists()
    assert all(cache.check(k, fp).status == "cached" for k, fp in new.items())
    code, out, _ = _gc(tmp_path, capsys, *cfg_args)
    assert "nothing to remove" in out


def test_gc_keeps_every_named_study(tmp_path, capsys, study):
    import yaml

    cache, run = study
    a, b = run(0, "a"), run(1, "b")
    tree = yaml.safe_load(TINY.read_text())
    cfg_a, cfg_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    cfg_a.write_text(yaml.safe_dump({**tree, "study": "a", "world": {**tree.get("world", {}), "seed": 0}}))
    cfg_b.write_text(yaml.safe_dump({**tree, "study": "b", "world": {**tree.get("world", {}), "seed": 1}}))
    code, out, _ = _gc(tmp_path, capsys, str(cfg_a), str(cfg_b), "--yes")
    assert code == 0 and "keeping 3 artifact(s)" in out
    assert all(cache.check(k, fp).status == "cached" for k, fp in {**a, **b}.items() if k == "label")
    code, out, _ = _gc(tmp_path, capsys, str(cfg_a), "--yes")  # b no longer named: its label goes
    assert cache.check("label", a["label"]).status == "cached" and not cache.path("label", b["label"]).exists()


def test_gc_refuses_a_locked_cache(tmp_path, capsys, study):
    cache, run = study
    old = run(0)
    run(1)  # a second fingerprint, so there is something to collect
    with cache_locked_by_another_process(cache.root, tmp_path):
        code, out, err = _gc(tmp_path, capsys, str(TINY), "world.seed=1", "--yes")
    assert code == 3
    assert "another overopt run holds the cache lock" in err and "gc lists and removes nothing" in err
    assert cache.path("label", old["label"]).is_dir()
