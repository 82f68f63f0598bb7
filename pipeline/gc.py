"""`overopt gc CONFIG... [--yes]`: the artifacts and run folders that none of the named studies reference.

Referenced are the artifacts `<cache_root>/<key>/<fingerprint>/` of every stage of every named study at its current
fingerprint (`pipeline.study.build_stages` + `Runner.fingerprints()`), the resumable `.partial/<key>.<fingerprint>/`
outputs of those stages, and the newest run folder `runs/<timestamp>/` of each named study. Everything else under the
cache root that the cache wrote (other fingerprints, stale partial outputs, older run folders, temporary directories
of runs that died) is listed with its size, and removed with `--yes`. The cache lock is held throughout, so a
running `overopt run` is never touched: gc refuses while one holds it.

Only directories the cache itself names are candidates (16-hex-digit fingerprints under a stage key, `.partial/`,
`.tmp/`, `.trash/`, `runs/`), only in a root that holds overopt's marker file (`pipeline.cache.MARKER`: a cache root
pointed at a user's own folder is refused), and never through a symbolic link: a link in the cache is listed as
skipped and neither followed nor removed.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.cache import ArtifactCache, partial_name, remove_tree
from pipeline.config import StudyConfig

FINGERPRINT = re.compile(r"[0-9a-f]{16}")
RESERVED = {"runs", ".partial", ".tmp", ".trash"}


@dataclass
class Garbage:
    root: Path
    items: list[tuple[Path, int, str]] = field(default_factory=list)  # (path, bytes, what)
    kept_artifacts: int = 0
    kept_runs: int = 0
    links: list[Path] = field(default_factory=list)  # symbolic links met in the cache: never followed or removed

    @property
    def total(self) -> int:
        return sum(size for _, size, _ in self.items)


def tree_size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def referenced(cfg: StudyConfig) -> set[tuple[str, str]]:
    """(stage key, fingerprint) of every stage of the study as it is configured now."""
    from pipeline.runner import Runner
    from pipeline.study import build_stages

    fps = Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root, cfg.run.verify)).fingerprints()
    return set(fps.items())


def _run_study(run_dir: Path) -> str | None:
    try:
        tree = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
        return str(tree.get("study")) if isinstance(tree, dict) else None
    except (OSError, yaml.YAMLError):
        return None


def _dirs(parent: Path, g: Garbage) -> list[Path]:
    """The real (not linked) directories in `parent`; links are noted in `g.links` and left alone."""
    out = []
    for p in sorted(parent.iterdir()):
        if p.is_symlink():
            g.links.append(p)
        elif p.is_dir():
            out.append(p)
    return out


def find_garbage(root: Path, refs: set[tuple[str, str]], studies: set[str]) -> Garbage:
    """What under `root` the references do not keep. Reads only; call it while holding the cache lock."""
    g = Garbage(root)
    if not root.is_dir():
        return g
    for key_dir in _dirs(root, g):
        if key_dir.name in RESERVED or key_dir.name.startswith("."):
            continue
        for fp_dir in _dirs(key_dir, g):
            if not FINGERPRINT.fullmatch(fp_dir.name):
                continue
            if (key_dir.name, fp_dir.name) in refs:
                g.kept_artifacts += 1
            else:
                g.items.append((fp_dir, tree_size(fp_dir), "artifact"))
    partial = root / ".partial"  # a linked .partial was noted by _dirs(root) above
    if partial.is_dir() and not partial.is_symlink():
        current = {partial_name(key, fp) for key, fp in refs}
        for d in sorted(partial.iterdir()):
            if d.is_symlink():
                g.links.append(d)
            elif d.name not in current:
                g.items.append((d, tree_size(d), "stale partial output"))
    for name in (".tmp", ".trash"):  # links among them were noted by _dirs(root) above
        if (root / name).is_dir() and not (root / name).is_symlink():
            for d in sorted((root / name).iterdir()):
                g.items.append((d, tree_size(d), "temporary directory of a run that died"))
    runs = root / "runs"  # a linked runs/ was noted by _dirs(root) above
    if runs.is_dir() and not runs.is_symlink():
        newest: dict[str, Path] = {}
        run_dirs = _dirs(runs, g)
        for d in run_dirs:  # names are timestamps: the last one of a study is its newest
            study = _run_study(d)
            if study in studies:
                newest[study] = d
        keep = set(newest.values())
        g.kept_runs = len(keep)
        g.items += [(d, tree_size(d), "run folder") for d in run_dirs if d not in keep]
    return g


def remove(g: Garbage) -> None:
    """Move each item aside into `.trash/` (one rename, so no half-removed artifact is left in place), then delete.
    Every item is checked to lie inside the cache root through no link before it is touched."""
    root = g.root.resolve()
    trash = g.root / ".trash"
    if trash.is_symlink():  # never move anything out of the root through a link
        trash.unlink()
    trash.mkdir(exist_ok=True)
    for path, _, _ in g.items:
        if not (path.exists() or path.is_symlink()):
            continue
        if not path.parent.resolve().is_relative_to(root):
            raise RuntimeError(f"gc: {path} is reached through a symbolic link or lies outside {root}; not removed")
        if path.parent == trash:
            remove_tree(path)
            continue
        target = trash / f"gc.{uuid.uuid4().hex[:8]}"
        os.rename(path, target)
        remove_tree(target)
    for key_dir in _dirs(g.root, Garbage(g.root)):  # stage folders left empty
        if key_dir.name not in RESERVED and not key_dir.name.startswith(".") and not any(key_dir.iterdir()):
            key_dir.rmdir()
    remove_tree(trash)


def human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def collect(configs: list[StudyConfig], yes: bool, lock_timeout_s: float = 0.0, out=print) -> int:
    """List (and with `yes` remove) what the named studies do not reference, per cache root. Returns the bytes
    listed. Raises CacheLockedError when another run holds a cache's lock."""
    by_root: dict[Path, list[StudyConfig]] = {}
    for cfg in configs:
        by_root.setdefault(Path(cfg.run.cache_root).resolve(), []).append(cfg)
    total = 0
    for root, cfgs in by_root.items():
        cache = ArtifactCache(root)
        if not root.is_dir():
            out(f"cache {root}: does not exist, nothing to collect")
            continue
        cache.require_marked(f"gc in {root}")
        with cache.lock(lock_timeout_s):
            refs = set().union(*(referenced(c) for c in cfgs))
            studies = {c.study for c in cfgs}
            g = find_garbage(root, refs, studies)
            names = ", ".join(sorted(studies))
            out(f"cache {root}: keeping {g.kept_artifacts} artifact(s) and {g.kept_runs} run folder(s) of "
                f"{names}; {len(g.items)} item(s) referenced by none of them:")
            for path, size, what in g.items:
                out(f"  {human(size):>10}  {path.relative_to(root)}  ({what})")
            for link in g.links:
                out(f"  {'skipped':>10}  {link.relative_to(root)}  (a symbolic link: gc neither follows nor removes "
                    f"it)")
            if yes and g.items:
                remove(g)
                out(f"removed {len(g.items)} item(s), {human(g.total)}")
            elif g.items:
                out(f"total {human(g.total)}; run again with --yes to remove them")
            else:
                out("nothing to remove")
            total += g.total
    return total
