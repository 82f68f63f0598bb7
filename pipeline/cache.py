"""Content-addressed artifact cache: `<root>/<stage key>/<fingerprint>/` with a manifest, committed atomically.

A stage writes into a private temporary directory; only after every file is hashed, the manifest written and all of it
fsynced is the directory renamed into place. A process killed at any moment therefore leaves either nothing or a
temporary directory that no later run mistakes for a result (stale ones are swept).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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

    def check(self, key: str, fingerprint: str) -> ArtifactState:
        """Is a committed, intact artifact there? Checks every file listed in the manifest."""
        d = self.path(key, fingerprint)
        mf = d / MANIFEST
        if not d.exists():
            return ArtifactState("missing")
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return ArtifactState("corrupt", f"manifest unreadable: {e}")
        if not isinstance(manifest.get("files"), dict):
            return ArtifactState("corrupt", "manifest lists no files")
        for rel, meta in manifest["files"].items():
            f = d / rel
            if not f.is_file():
                return ArtifactState("corrupt", f"file missing: {rel}", manifest)
            if f.stat().st_size != meta["size"]:
                return ArtifactState("corrupt", f"size mismatch: {rel}", manifest)
            if self.verify == "checksum" and sha256_file(f) != meta["sha256"]:
                return ArtifactState("corrupt", f"checksum mismatch: {rel}", manifest)
        listed = set(manifest["files"]) | {MANIFEST}
        extra = [p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()]
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
            partial = self.root / ".partial" / f"{key}.{fingerprint}"
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
