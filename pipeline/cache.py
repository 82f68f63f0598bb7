"""Content-addressed artifact cache: `<root>/<stage key>/<fingerprint>/` with a manifest, committed atomically.

A stage writes into a private temporary directory; only after every file is hashed, the manifest written and all of it
fsynced is the directory renamed into place. A process killed at any moment therefore leaves either nothing or a
temporary directory that no later run mistakes for a result (stale ones are swept).
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

MANIFEST = "manifest.json"


class CacheLockedError(RuntimeError):
    """Another `overopt run` holds the cache root's lock."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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

    def check(self, key: str, fingerprint: str) -> ArtifactState:
        """Is a committed, intact artifact there? Checks every file listed in the manifest.

        Never raises on a damaged artifact: a manifest that is not valid JSON, not the expected shape (not an object,
        no `files`, an entry without an integer `size` or a hex `sha256`, a path outside the artifact) or that
        disagrees with the files is "corrupt", and the runner recomputes the artifact.
        """
        d = self.path(key, fingerprint)
        if not d.exists():
            return ArtifactState("missing")
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
        extra = sorted(set(extra) - listed)
        if extra:
            return ArtifactState("corrupt", f"unexpected files: {extra[:3]}", manifest)
        return ArtifactState("cached", manifest=manifest)

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

    def commit(self, key: str, fingerprint: str, staged: Path, record: dict) -> dict:
        """Hash the staged files, write the manifest, fsync, and rename into place. Returns the manifest."""
        files = {}
        for p in sorted(staged.rglob("*")):
            if p.is_file():
                rel = p.relative_to(staged).as_posix()
                if rel == MANIFEST:
                    raise RuntimeError(f"stage {key} wrote a file named {MANIFEST}, which the cache reserves")
                files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {**record, "key": key, "fingerprint": fingerprint, "files": files,
                    "size_bytes": sum(f["size"] for f in files.values()), "committed_at": time.time()}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        _fsync_tree(staged)
        final = self.path(key, fingerprint)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a corrupt artifact being replaced: move it aside first, never delete in place
            self.trash_root.mkdir(parents=True, exist_ok=True)
            os.rename(final, self.trash_root / f"{key}.{fingerprint}.{uuid.uuid4().hex[:8]}")
        os.rename(staged, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        shutil.rmtree(self.trash_root, ignore_errors=True)
        return manifest

    def sweep_stale(self) -> list[Path]:
        """Remove temporary directories left by runs that died (only call while holding the lock). Resumable partial
        outputs in `.partial/` stay: another study sharing this cache may resume them; a commit moves them away."""
        removed = []
        for root in (self.tmp_root, self.trash_root):
            if root.exists():
                for d in root.iterdir():
                    shutil.rmtree(d, ignore_errors=True)
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
