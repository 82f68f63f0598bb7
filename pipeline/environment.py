"""What a result was made with: package versions, CPU model, CPU and thread counts, date.

Exact figures of a study vary across CPUs (float kernels differ), so a report states the machine it was made on.
"""

from __future__ import annotations

import os
import platform
from datetime import date
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "trl", "accelerate", "deepspeed", "numpy", "pandas")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first "model name" of /proc/cpuinfo; `platform.processor()` (or "unknown") where there is none."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    """Python and package versions, CPU model, logical CPUs, torch's intra-op threads (now) and today's date."""
    import torch

    return {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES},
            "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": date.today().isoformat()}
