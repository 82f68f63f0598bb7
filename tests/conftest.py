import os

import pytest

# Tiny models gain nothing from intra-op threads; one thread keeps timings stable on a 2-core machine whose other
# core may be busy with a second process (multi-process tests, subprocess runs).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)
    yield
