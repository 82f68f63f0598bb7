"""A stage for CLI tests that fails the way a real stage can (tests/test_cli_errors.py)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

VERSION = "1"


class FailConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # ok | value | nonfinite | multiline | oom | config | full_disk_on_rank1 | abort_on_rank1 | abort_at_exit_on_rank1
    kind: str = "ok"


def run(cfg: FailConfig, inputs: dict[str, Path], out: Path) -> None:
    if cfg.kind == "ok":
        (out / "ok.txt").write_text("ok")
        return
    if cfg.kind == "value":
        raise ValueError("the frobnicator is out of range")
    if cfg.kind == "nonfinite":
        from pipeline.scoring import check_finite

        check_finite([1.0, float("nan")], "bt", [("q0", 0), ("q0", 1)], ("prompt_id", "sample_idx"))
    if cfg.kind == "multiline":
        raise RuntimeError("first line\n  second line\n  third line")
    if cfg.kind == "oom":
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if cfg.kind == "config":
        from pipeline.config import ConfigError

        raise ConfigError("invalid config (x):\n  a.b: bad\n  c.d: worse")
    if cfg.kind == "full_disk_on_rank1":  # launched on 2 ranks: rank 1's disk fills, rank 0 finishes
        import errno
        import os
        import time

        if os.environ.get("RANK") == "1":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "shard_00001.parquet"))
        time.sleep(1)
        return
    if cfg.kind in ("abort_on_rank1", "abort_at_exit_on_rank1"):  # a native crash: no Python error to record
        import atexit
        import os
        import time

        if os.environ.get("RANK") == "1":
            if cfg.kind == "abort_on_rank1":
                os.abort()
            atexit.register(os.abort)  # after the stage and the process group's close, as the interpreter exits
        time.sleep(1)
        return
    raise AssertionError(cfg.kind)
