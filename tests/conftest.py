import os
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads; one thread keeps timings stable on a 2-core machine whose other
# core may be busy with a second process (multi-process tests, subprocess runs).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)
    yield


@contextmanager
def cache_locked_by_another_process(cache_root: Path, scratch: Path):
    """Another process holds the cache lock of `cache_root` for the duration (killed on exit: the lock is freed)."""
    flag = scratch / "locked"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pipeline.cache import ArtifactCache
        with ArtifactCache({str(cache_root)!r}).lock():
            open({str(flag)!r}, 'w').close()
            time.sleep(30)
    """)], cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.time() + 30
        while not flag.exists():
            assert time.time() < deadline, "the lock holder did not start"
            time.sleep(0.05)
        yield
    finally:
        holder.kill()
        holder.wait()
