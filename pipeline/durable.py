"""Files that survive a kill or a full disk: each is complete on disk before it counts, or it is not there.

The pattern everywhere: write a temporary file beside the target, fsync it, rename it over the target (atomic on
POSIX), fsync the directory. A process killed, or a disk that fills, at any moment leaves either the old file or the
new one, plus at most a `*.tmp` file that readers ignore and the next writer replaces.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger("overopt")


def fsync_path(path: Path) -> None:
    """fsync one file or directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (symlinks are not followed)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(dirpath, name)):
                fsync_path(Path(dirpath, name))
        fsync_path(Path(dirpath))


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Have `write(tmp)` write a temporary file beside `path`, fsync it, then rename it onto `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    """`path.write_text(text)`, but never leaves a half-written file in place of the old one."""
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_jsonl_atomically(path: Path, rows: list[dict]) -> None:
    """A JSON-lines file of `rows`, written atomically."""
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one complete line and fsync it. A full disk can still tear the line; `read_jsonl` drops a torn last
    line, and writers that resume rewrite the file from their own record."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file written by `append_jsonl`. A last line that does not parse (torn by a kill or
    a full disk) is dropped with a warning; a bad line before the last is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                log.warning("  %s: dropped a torn last line (%d characters; written when the run was killed or "
                            "the disk was full)", path, len(line))
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return rows
