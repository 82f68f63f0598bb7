"""Entry point of one rank of a multi-process stage: `python -m pipeline.stage_main JOBFILE`.

`pipeline.runner.launch_stage` writes the job file and starts this module under `accelerate launch`; every rank reads
the same job, validates the stage's config section with its pydantic class, and calls `stages.<stage>.run(cfg,
inputs, out)` (`<stage>.run` for a dotted module path). The stage decides what rank 0 (or every rank) writes in `out`.

Job file (JSON): {"stage": str, "config_class": "package.module.Class", "config": {...},
                  "inputs": {role: path}, "out": path}
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from pydantic import BaseModel

from pipeline.distributed import skip_deepspeed_shared_memory_op
from pipeline.runner import PEAK_MEMORY, PHASES, RANK_ERROR, RANK_PHASE, die_with_parent, peak_memory_record

log = logging.getLogger("overopt")


def _import_dotted(path: str):
    """`package.module.Outer.Inner` -> the object, importing the longest module prefix that exists."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {path!r}")


def load_job(job_file: str | Path) -> tuple[str, BaseModel, dict[str, Path], Path]:
    job = json.loads(Path(job_file).read_text())
    missing = {"stage", "config_class", "config", "inputs", "out"} - set(job)
    if missing:
        raise ValueError(f"job file {job_file} lacks {sorted(missing)}")
    config_class = _import_dotted(job["config_class"])
    if not (isinstance(config_class, type) and issubclass(config_class, BaseModel)):
        raise TypeError(f"{job['config_class']} is not a pydantic model class")
    cfg = config_class.model_validate(job["config"])
    inputs = {role: Path(p) for role, p in job["inputs"].items()}
    return job["stage"], cfg, inputs, Path(job["out"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m pipeline.stage_main JOBFILE", file=sys.stderr)
        return 2
    die_with_parent()
    if os.getppid() == 1:  # the launcher died before the line above took effect
        return 1
    rank = os.environ.get("RANK", "0")
    job_dir = Path(argv[0]).parent
    _record_phase(job_dir, rank, 0)
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"[rank {rank}] %(message)s")
    stage, cfg, inputs, out = load_job(argv[0])
    # same rule as `StageNode.module`: a dotted name is a full module path, a plain name lives in stages/
    module = importlib.import_module(stage if "." in stage else f"stages.{stage}")
    _record_phase(job_dir, rank, 1)
    try:
        skip_deepspeed_shared_memory_op()
        module.run(cfg, inputs, out)
    except BaseException as e:
        _record_error(job_dir, rank, e)
        raise
    try:  # for the stage's manifest (`overopt status`, scripts/gpu_check.sh); best effort
        (job_dir / PEAK_MEMORY.format(rank=rank)).write_text(json.dumps(peak_memory_record(int(rank))))
    except OSError:
        pass
    _record_phase(job_dir, rank, 2)
    _close_process_group()
    _record_phase(job_dir, rank, 3)
    return 0


def _record_phase(job_dir: Path, rank: str, phase: int) -> None:
    """Leave this rank's phase (`PHASES`) beside the job file: a rank killed natively (a signal) writes no error, and
    the launcher's message then says where each rank stopped. Best effort."""
    try:
        (job_dir / RANK_PHASE.format(rank=rank)).write_text(PHASES[phase])
    except OSError:
        pass


def _record_error(job_dir: Path, rank: str, error: BaseException) -> None:
    """Leave this rank's error beside the job file (first line "Type: message", then the traceback), for the
    launcher's one-line failure message. Best effort: a full disk may refuse it too."""
    import traceback

    first = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    try:
        (job_dir / RANK_ERROR.format(rank=rank)).write_text(first + "\n" + traceback.format_exc())
    except OSError:
        pass


def _close_process_group() -> None:
    """Tear the process group down while the interpreter is still whole. Left to interpreter exit, gloo's worker
    threads can be destroyed while still joinable, and a rank that has finished its work aborts ("terminate called
    without an active exception", SIGABRT), failing a stage that had completed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another is still in a collective
        dist.destroy_process_group()


if __name__ == "__main__":
    exit_code = main()
    # The rank is done (artifacts written and synced, process group closed). Its interpreter's last garbage
    # collections, over every object torch, transformers and DeepSpeed made, take ~0.9 s of a 2-rank launch's 5.5-8 s
    # on 2 cores: frozen objects are left to the OS. Exit handlers still run and acyclic objects are still freed.
    gc.freeze()
    sys.exit(exit_code)
