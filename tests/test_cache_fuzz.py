"""The cache never crashes on, and never trusts, a damaged artifact.

Named cases for the manifest shapes that used to crash `ArtifactCache.check`, then a seeded fuzz: random truncations,
byte flips, appended bytes, deletions, extra files and schema changes of manifests and artifact files. The oracle:
`check` never raises; "cached" only when every artifact file still has its original bytes and nothing was added;
a change of an artifact file's bytes is always "corrupt". Through the Runner, a damaged artifact is recomputed.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pipeline.cache import MANIFEST, ArtifactCache
from pipeline.runner import Runner, StageNode
from tests.fake_stages import FakeConfig

FILES = {"a.txt": b"hello world\n", "data/blob.bin": bytes(range(256)) * 3, "data/empty": b"",
         "metrics.json": b'{"acc": 0.5}'}


def _commit(cache: ArtifactCache, key="stage", fp="0123456789abcdef") -> Path:
    with cache.staging(key, fp) as out:
        for rel, data in FILES.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        cache.commit(key, fp, out, {"stage": key, "wall_time_s": 0.1})
    return cache.path(key, fp)


def _content_intact(d: Path) -> bool:
    """Every original file with its original bytes, and no other file (the manifest aside)."""
    if not d.is_dir():
        return False
    found = {p.relative_to(d).as_posix() for p in d.rglob("*") if not p.is_dir()} - {MANIFEST}
    return found == set(FILES) and all((d / rel).is_file() and (d / rel).read_bytes() == data
                                       for rel, data in FILES.items())


@pytest.mark.parametrize("manifest", [
    "[]", "null", "3", '"text"', "{}", '{"files": []}', '{"files": null}', '{"files": {"a.txt": 1}}',
    '{"files": {"a.txt": {"sha256": "00"}}}', '{"files": {"a.txt": {"size": 12}}}',
    '{"files": {"a.txt": {"size": "12", "sha256": "0"}}}', '{"files": {"a.txt": {"size": true, "sha256": "0"}}}',
    '{"files": {"a.txt": {"size": 12.0, "sha256": "0"}}}', '{"files": {"../../x": {"size": 1, "sha256": "0"}}}',
    '{"files": {"/etc/passwd": {"size": 1, "sha256": "0"}}}', "[" * 100000, '{"files": {}, "size_bytes": "big"}',
    b"\xff\xfe{}",
])
def test_damaged_manifest_is_corrupt_never_an_exception(tmp_path, manifest):
    cache = ArtifactCache(tmp_path)
    d = _commit(cache)
    (d / MANIFEST).write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode())
    state = cache.check("stage", d.name)
    assert state.status == "corrupt", state


def test_manifest_of_another_fingerprint_is_corrupt(tmp_path):
    cache = ArtifactCache(tmp_path)
    d = _commit(cache)
    other = cache.path("stage", "fedcba9876543210")
    shutil.copytree(d, other)
    assert cache.check("stage", d.name).status == "cached"
    assert cache.check("stage", other.name).status == "corrupt"


def _mutate(rng: random.Random, d: Path) -> str:
    """One random damage to the committed artifact in `d`; returns its description."""
    targets = [t for t in [MANIFEST] * 3 + sorted(FILES) if (d / t).is_file()]  # not deleted by an earlier damage
    if not targets:
        return "nothing left to damage"
    target = rng.choice(targets)
    f = d / target
    data = f.read_bytes()
    kind = rng.choice(["truncate", "flip", "append", "delete", "extra", "dir"] +
                      (["schema"] * 4 if target == MANIFEST else []))
    if kind == "truncate":
        f.write_bytes(data[: rng.randrange(len(data))] if data else b"")
    elif kind == "flip" and data:
        i = rng.randrange(len(data))
        f.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:])
    elif kind == "flip":
        f.write_bytes(b"\x00")
    elif kind == "append":
        f.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))))
    elif kind == "delete":
        f.unlink()
    elif kind == "extra":
        (d / rng.choice(["stray.txt", "data/stray", ".hidden"])).write_bytes(b"?")
    elif kind == "dir":
        f.unlink()
        f.mkdir()
    else:
        try:
            m = json.loads(data)
            assert isinstance(m, dict) and isinstance(m.get("files"), dict) and m["files"]
        except (ValueError, AssertionError):  # already damaged by an earlier mutation of this case
            f.write_bytes(data[: len(data) // 2])
            return f"{target}: truncate"
        rel = rng.choice(sorted(m["files"]))
        change = rng.choice(["root", "files", "entry", "drop_size", "drop_sha", "size_type", "sha_type", "size",
                             "sha", "rename", "add", "drop_entry", "field_type"])
        if change == "root":
            m = rng.choice([[], None, 0, 1.5, "x", True, [m]])
        elif change == "files":
            m["files"] = rng.choice([None, [], list(m["files"]), "a.txt", 3])
        elif change == "entry":
            m["files"][rel] = rng.choice([None, [], 7, "x", [m["files"][rel]]])
        elif change == "drop_size":
            del m["files"][rel]["size"]
        elif change == "drop_sha":
            del m["files"][rel]["sha256"]
        elif change == "size_type":
            size = m["files"][rel]["size"]
            m["files"][rel]["size"] = rng.choice([str(size), None, float(size) + 0.5,
                                                  [1], {}, -1, True])
        elif change == "sha_type":
            m["files"][rel]["sha256"] = rng.choice([None, 5, [], m["files"][rel]["sha256"].upper()[:10]])
        elif change == "size":
            m["files"][rel]["size"] += rng.choice([-1, 1, 1000])
        elif change == "sha":
            m["files"][rel]["sha256"] = "0" * 64
        elif change == "rename":
            m["files"][rel + ".old"] = m["files"].pop(rel)
        elif change == "add":
            m["files"][rng.choice(["new.txt", "../escape", "/abs", "a/../a.txt", ""])] = {"size": 0, "sha256": "0" * 64}
        elif change == "drop_entry":
            del m["files"][rel]
        else:
            m[rng.choice(["wall_time_s", "size_bytes", "committed_at", "fingerprint"])] = rng.choice(["x", None, [], 1])
        f.write_text(json.dumps(m))
        return f"{target}: schema {change}"
    return f"{target}: {kind}"


def test_fuzz_check_never_crashes_never_a_wrong_hit(tmp_path):
    rng = random.Random(1234)
    cache = ArtifactCache(tmp_path / "cache")
    pristine = _commit(cache)
    template = tmp_path / "pristine"
    shutil.copytree(pristine, template)
    seen = {"cached": 0, "corrupt": 0}
    for case in range(200):
        shutil.rmtree(pristine)
        shutil.copytree(template, pristine)
        what = "; ".join(_mutate(rng, pristine) for _ in range(rng.choice([1, 1, 1, 2])))
        state = cache.check("stage", pristine.name)  # must not raise
        assert state.status in ("cached", "corrupt"), (case, what, state)
        if state.status == "cached":
            assert _content_intact(pristine), (case, what, "a wrong cache hit")
        if not _content_intact(pristine):
            assert state.status == "corrupt", (case, what, state)
        seen[state.status] += 1
    assert seen["corrupt"] > 150  # nearly every damage is caught; the rest changed nothing that counts
    # the same damage is rejected with "size" verification when it changes a size
    cache_size = ArtifactCache(tmp_path / "cache", verify="size")
    (pristine / "a.txt").write_bytes(b"hi")
    assert cache_size.check("stage", pristine.name).status == "corrupt"


def _dag(tmp_path):
    log = str(tmp_path / "calls.log")
    node = lambda key, value, inputs=None: StageNode(key, "tests.fake_stages",  # noqa: E731
                                                     FakeConfig(value=value, calls_log=log), inputs or {})
    return [node("world", 1), node("label", 2, {"world": "world"}), node("train", 10, {"pairs": "label"})]


def test_fuzz_runner_recomputes_a_damaged_artifact(tmp_path):
    rng = random.Random(99)
    cache = ArtifactCache(tmp_path / "cache")
    plan = {p.node.key: p for p in Runner(_dag(tmp_path), cache).run()}
    expected = {k: cache.path(k, p.fingerprint).joinpath("value.txt").read_text() for k, p in plan.items()}
    for case in range(30):
        key = rng.choice(sorted(plan))
        d = cache.path(key, plan[key].fingerprint)
        target = rng.choice([MANIFEST, "value.txt"])
        data = (d / target).read_bytes()
        damage = rng.choice(["truncate", "flip", "list", "null", "no_size"])
        if damage == "truncate":
            (d / target).write_bytes(data[: rng.randrange(len(data))])
        elif damage == "flip":
            i = rng.randrange(len(data))
            (d / target).write_bytes(data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:])
        elif damage in ("list", "null"):
            (d / MANIFEST).write_text("[]" if damage == "list" else "null")
        else:
            m = json.loads((d / MANIFEST).read_text())
            del m["files"]["value.txt"]["size"]
            (d / MANIFEST).write_text(json.dumps(m))
        broken = cache.check(key, plan[key].fingerprint).status == "corrupt"
        (tmp_path / "calls.log").unlink(missing_ok=True)
        Runner(_dag(tmp_path), cache).run()
        ran = (tmp_path / "calls.log").read_text().split() if (tmp_path / "calls.log").exists() else []
        assert ran == ([{"world": "1", "label": "2", "train": "10"}[key]] if broken else []), (case, key, damage)
        for k, p in plan.items():
            assert cache.check(k, p.fingerprint).status == "cached"
            assert cache.path(k, p.fingerprint).joinpath("value.txt").read_text() == expected[k]
