"""Content-addressed artifact cache: `<root>/<stage key>/<fingerprint>/` with a manifest, committed atomically.

A stage writes into a private temporary directory; only after every file is hashed, the manifest written and all of it
fsynced is the directory renamed into place. A process killed at any moment therefore leaves either nothing or a
temporary directory that no later run mistakes for a result (stale ones are swept).

The cache root holds a marker file (`MARKER`) written when overopt makes it. Nothing is ever deleted under a root
without one (a `cache_root` pointed at a user's own folder), and nothing is deleted through a symbolic link.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import filelock

from pipeline.config import ConfigError
from pipeline.durable import fsync_path, fsync_tree

MANIFEST = "manifest.json"
MARKER = ".overopt-cache"  # written into every cache root overopt makes; deletion is refused without it


class CacheLockedError(RuntimeError):
    """Another `overopt run` holds the cache root's lock."""


class UnmarkedCacheError(ConfigError):
    """The cache root is a non-empty folder that overopt did not make: nothing is deleted in it."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _manifest_problem(manifest, fingerprint: str) -> str | None:
    """What is wrong with a parsed manifest's shape (None when it is the shape `commit` writes)."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "no 'files' object"
    if manifest.get("fingerprint", fingerprint) != fingerprint:
        return f"fingerprint {manifest.get('fingerprint')!r} is not the directory's {fingerprint!r}"
    for field in ("wall_time_s", "size_bytes", "committed_at"):  # read by `overopt status` and `gc`
        if field in manifest and not _is_number(manifest[field]):
            return f"{field!r} is not a number"
    for rel, meta in files.items():
        parts = PurePosixPath(rel).parts
        if (not rel or "\x00" in rel or rel.startswith("/") or ".." in parts or rel != PurePosixPath(rel).as_posix()
                or rel == MANIFEST):
            return f"file entry {rel!r} is not a relative path inside the artifact"
        if not isinstance(meta, dict):
            return f"file entry {rel!r} is a {type(meta).__name__}, not an object"
        size, digest = meta.get("size"), meta.get("sha256")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return f"file entry {rel!r} has no integer 'size' (got {size!r})"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"file entry {rel!r} has no hex 'sha256' (got {str(digest)[:80]!r})"
    return None


def partial_name(key: str, fingerprint: str) -> str:
    """`ppo[bt]`, `3108d7...` -> `ppo(bt).3108d7...`: the key with its brackets made glob-safe, then the fingerprint."""
    return f"{key.replace('[', '(').replace(']', ')')}.{fingerprint}"


@dataclass(frozen=True)
class ArtifactState:
    status: str  # "cached" | "missing" | "corrupt"
    detail: str = ""
    manifest: dict | None = None


def _under(path: Path, scratch: tuple[str, ...]) -> bool:
    """Is the relative `path` one of the `scratch` folders or inside one?"""
    return bool(scratch) and PurePosixPath(path).parts[0] in scratch


def remove_tree(path: Path) -> None:
    """Delete a directory tree, never through a symbolic link: a link itself is unlinked, its target left alone
    (shutil.rmtree refuses links and does not follow those inside)."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


class ArtifactCache:
    def __init__(self, root: Path, verify: str = "checksum"):
        self.root = Path(root)
        self.verify = verify
        self.tmp_root = self.root / ".tmp"
        self.trash_root = self.root / ".trash"

    def path(self, key: str, fingerprint: str) -> Path:
        return self.root / key / fingerprint

    def partial_path(self, key: str, fingerprint: str) -> Path:
        """Where a resumable stage writes until it commits. Named without glob metacharacters: libraries that glob
        inside a stage's output (DeepSpeed's checkpoint loader does) would read `ppo[bt]` as a character class."""
        return self.root / ".partial" / partial_name(key, fingerprint)

    # ---------------------------------------------------------------------------------------------- ownership

    def is_marked(self) -> bool:
        return (self.root / MARKER).is_file()

    def claim(self) -> None:
        """Make the root an overopt cache (write its marker) if it is missing or empty, or is a cache of an earlier
        overopt (which wrote `.lock` and `runs/` but no marker). Raise UnmarkedCacheError for any other folder."""
        if self.is_marked():
            return
        if self.root.is_symlink() and not self.root.exists():
            raise UnmarkedCacheError(f"cache root {self.root} is a broken symbolic link")
        self.root.mkdir(parents=True, exist_ok=True)
        entries = {p.name for p in self.root.iterdir()} - {".lock", ".lock.holder"}
        legacy = "runs" in entries and (self.root / ".lock").is_file() and (self.root / "runs").is_dir()
        if entries and not legacy:
            raise UnmarkedCacheError(
                f"cache root {self.root} is a non-empty folder that overopt did not make (no {MARKER} file in it; "
                f"holds e.g. {sorted(entries)[:3]}); overopt deletes temporary folders in its cache root, so it "
                f"will not use this one: set run.cache_root to a new or empty folder")
        (self.root / MARKER).write_text("This folder is an overopt artifact cache; `overopt gc` may delete in it.\n")

    def require_marked(self, what: str) -> None:
        """Refuse `what` (a deletion) unless overopt made this root."""
        if not self.is_marked():
            raise UnmarkedCacheError(
                f"{what} refused: {self.root} has no {MARKER} file, so overopt did not make it (or it predates the "
                f"marker); nothing is deleted in it. An `overopt run` on a cache of an earlier overopt adds the "
                f"marker")

    # ----------------------------------------------------------------------------------------------- checking

    def check(self, key: str, fingerprint: str) -> ArtifactState:
        """Is a committed, intact artifact there? Checks every file listed in the manifest.

        Never raises on a damaged artifact: a manifest that is not valid JSON, not the expected shape (not an object,
        no `files`, an entry without an integer `size` or a hex `sha256`, a path outside the artifact) or that
        disagrees with the files is "corrupt", and the runner recomputes the artifact.
        """
        d = self.path(key, fingerprint)
        if not d.exists():
            return ArtifactState("missing")
        return self._verify(d, fingerprint)

    def _verify(self, d: Path, fingerprint: str, scratch: tuple[str, ...] = ()) -> ArtifactState:
        """The `check` of directory `d`; files under the `scratch` folders are not counted as unexpected."""
        try:
            manifest = json.loads((d / MANIFEST).read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSON and UTF-8 decoding errors
            return ArtifactState("corrupt", f"manifest unreadable: {type(e).__name__}: {e}")
        problem = _manifest_problem(manifest, fingerprint)
        if problem:
            return ArtifactState("corrupt", f"manifest malformed: {problem}")
        try:
            for rel, meta in manifest["files"].items():
                f = d / rel
                if not f.is_file():
                    return ArtifactState("corrupt", f"file missing: {rel}", manifest)
                if f.stat().st_size != meta["size"]:
                    return ArtifactState("corrupt", f"size mismatch: {rel}", manifest)
                if self.verify == "checksum" and sha256_file(f) != meta["sha256"]:
                    return ArtifactState("corrupt", f"checksum mismatch: {rel}", manifest)
            listed = set(manifest["files"]) | {MANIFEST}
            extra = [p.relative_to(d).as_posix() for p in d.rglob("*") if not p.is_dir()]
        except (OSError, ValueError) as e:
            return ArtifactState("corrupt", f"unreadable: {type(e).__name__}: {e}", manifest)
        extra = sorted(r for r in set(extra) - listed if not _under(r, scratch))
        if extra:
            return ArtifactState("corrupt", f"unexpected files: {extra[:3]}", manifest)
        return ArtifactState("cached", manifest=manifest)

    # ----------------------------------------------------------------------------------------------- staging

    @contextmanager
    def staging(self, key: str, fingerprint: str, resumable: bool = False) -> Iterator[Path]:
        """A private directory for a stage to write into; removed if the stage raises.

        A `resumable` stage (one that writes complete shards atomically and skips those already there) gets a
        directory named by its fingerprint that survives a failed or killed run, so the next run continues it.
        """
        if resumable:
            partial = self.partial_path(key, fingerprint)
            partial.mkdir(parents=True, exist_ok=True)
            yield partial
            return
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_root / f"{key}.{fingerprint}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def set_aside(self, key: str, fingerprint: str, why: str) -> Path | None:
        """Move a resumable stage's partial output out of the way (kept for inspection; `gc` lists it), so the
        stage starts afresh. Returns where it went, or None when there was none."""
        partial = self.partial_path(key, fingerprint)
        if not partial.exists() and not partial.is_symlink():
            return None
        aside = partial.with_name(f"{partial.name}.aside-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
        os.rename(partial, aside)
        aside.with_name(aside.name + ".why").write_text(why + "\n")
        return aside

    def finish_interrupted_commit(self, key: str, fingerprint: str, scratch: tuple[str, ...] = ()) -> dict | None:
        """A resumable stage's partial output that already holds its manifest was killed inside `commit`: finish the
        commit (its files verify) and return the manifest. A manifest whose files do not verify is removed, so the
        stage resumes. None when there is nothing to finish."""
        partial = self.partial_path(key, fingerprint)
        if not (partial / MANIFEST).is_file():
            return None
        state = self._verify(partial, fingerprint, scratch)
        if state.status != "cached":
            (partial / MANIFEST).unlink()
            return None
        self._move_into_place(key, fingerprint, partial, scratch)
        return state.manifest

    def commit(self, key: str, fingerprint: str, staged: Path, record: dict, scratch: tuple[str, ...] = ()) -> dict:
        """Hash the staged files, write the manifest, fsync, and rename into place. Returns the manifest.

        Files under the `scratch` folders (a resumable stage's checkpoints) are not part of the artifact: they are
        removed only after the manifest is durable, so a kill before that leaves them to resume from, and a kill
        after it leaves a partial output that `finish_interrupted_commit` completes."""
        files = {}
        for p in sorted(staged.rglob("*")):
            rel = p.relative_to(staged).as_posix()
            if p.is_file() and not _under(rel, scratch):
                if rel == MANIFEST:
                    raise RuntimeError(f"stage {key} wrote a file named {MANIFEST}, which the cache reserves")
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {**record, "key": key, "fingerprint": fingerprint, "files": files,
                    "size_bytes": sum(f["size"] for f in files.values()), "committed_at": time.time()}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        fsync_tree(staged)
        self._move_into_place(key, fingerprint, staged, scratch)
        return manifest

    def _move_into_place(self, key: str, fingerprint: str, staged: Path, scratch: tuple[str, ...]) -> None:
        for name in scratch:
            remove_tree(staged / name)
        final = self.path(key, fingerprint)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a corrupt artifact being replaced: move it aside first, never delete in place
            if self.trash_root.is_symlink():  # never out of the root through a link
                self.trash_root.unlink()
            self.trash_root.mkdir(parents=True, exist_ok=True)
            os.rename(final, self.trash_root / f"{key}.{fingerprint}.{uuid.uuid4().hex[:8]}")
        os.rename(staged, final)
        fsync_path(final.parent)
        if self.is_marked():
            remove_tree(self.trash_root)

    def sweep_stale(self) -> list[Path]:
        """Remove temporary directories left by runs that died (only call while holding the lock). Resumable partial
        outputs in `.partial/` stay: another study sharing this cache may resume them; a commit moves them away.
        Refused (UnmarkedCacheError) in a root overopt did not make; links are unlinked, never followed."""
        self.require_marked(f"removing the temporary folders in {self.tmp_root}")
        removed = []
        for root in (self.tmp_root, self.trash_root):
            if root.is_symlink():
                root.unlink()
                removed.append(root)
            elif root.exists():
                for d in root.iterdir():
                    remove_tree(d)
                    removed.append(d)
        return removed

    @contextmanager
    def lock(self, timeout_s: float = 0.0) -> Iterator[None]:
        """Exclusive lock on the cache root, so two runs never write the same artifacts."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        holder = self.root / ".lock.holder"
        lk = filelock.FileLock(str(lock_path))
        try:
            lk.acquire(timeout=timeout_s)
        except filelock.Timeout:
            who = holder.read_text().strip() if holder.exists() else "unknown"
            raise CacheLockedError(
                f"another overopt run holds the cache lock {lock_path} ({who}); wait for it to finish, "
                f"or set run.lock_timeout_s to wait") from None
        try:
            holder.write_text(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            yield
        finally:
            holder.unlink(missing_ok=True)
            lk.release()
