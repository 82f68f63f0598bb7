"""Tiny stages for runner tests: they record each execution in a log file named by the config."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

VERSION = "1"


class FakeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    value: int = 0
    calls_log: str  # file where each execution appends the stage's value
    slow_marker: str | None = None  # if set: write half the output, touch this file, then sleep (to be killed)


def run(cfg: FakeConfig, inputs: dict[str, Path], out: Path) -> None:
    upstream = sum(int((p / "value.txt").read_text()) for p in inputs.values())
    with open(cfg.calls_log, "a") as f:
        f.write(f"{cfg.value}\n")
    (out / "value.txt").write_text(str(cfg.value + upstream))
    if cfg.slow_marker and os.environ.get("FAKE_STAGE_SLOW") == "1":
        (out / "partial.bin").write_bytes(b"x" * 1000)
        Path(cfg.slow_marker).touch()
        time.sleep(60)
