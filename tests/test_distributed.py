"""The multi-process path: a `launcher="accelerate"` stage run by the Runner under DeepSpeed ZeRO with 2 processes.

On a CPU-only machine DeepSpeed uses its CPU accelerator (gloo). Its shared-memory allreduce op, which it would
JIT-build with ninja and g++ on a fresh machine (about 30 s on 2 cores) and which serves only inference, is skipped
(`pipeline.distributed.skip_deepspeed_shared_memory_op`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.cache import ArtifactCache
from pipeline.config import DistributedSmokeConfig
from pipeline.runner import Runner, StageNode

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _two_ranks_fit(monkeypatch):
    """Two ranks need two GPUs; with fewer, run both on CPU (DeepSpeed's CPU accelerator) instead of failing."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def test_stage_main_validates_the_job(tmp_path):
    """The per-rank entry point rebuilds the typed config from the job file (and rejects a bad one)."""
    from pydantic import ValidationError

    from pipeline.stage_main import load_job

    job = {"stage": "distributed_smoke", "config_class": "pipeline.config.DistributedSmokeConfig",
           "config": DistributedSmokeConfig(enabled=True, steps=2).model_dump(mode="json"),
           "inputs": {"world": str(tmp_path / "w")}, "out": str(tmp_path / "out")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    stage, cfg, inputs, out = load_job(tmp_path / "job.json")
    assert stage == "distributed_smoke"
    assert cfg == DistributedSmokeConfig(enabled=True, steps=2)
    assert isinstance(cfg.deepspeed_config, Path)
    assert inputs == {"world": tmp_path / "w"} and out == tmp_path / "out"
    job["config"]["stepz"] = 3
    (tmp_path / "job.json").write_text(json.dumps(job))
    with pytest.raises(ValidationError):
        load_job(tmp_path / "job.json")


def _run_smoke(tmp_path: Path, ds_file: str) -> tuple[dict, Path]:
    ds_config = Path("configs/deepspeed") / ds_file
    node = StageNode(key="distributed_smoke", stage="distributed_smoke",
                     config=DistributedSmokeConfig(enabled=True, num_processes=2, steps=3, deepspeed_config=ds_config),
                     launcher="accelerate", num_processes=2, deepspeed_config=ds_config)
    cache = ArtifactCache(tmp_path / "cache")
    plan = Runner([node], cache).run()
    fp = plan[0].fingerprint
    assert plan[0].status == "cached"
    assert cache.check(node.key, fp).status == "cached"  # committed: manifest written, every file verified
    art = cache.path(node.key, fp)
    assert not list((tmp_path / "cache" / ".tmp").iterdir())  # no staging directory left behind
    # every rank's peak memory is in the manifest (resident memory on CPU: at least the model it trained)
    peaks = plan[0].manifest["peak_memory"]
    assert [p["rank"] for p in peaks] == [0, 1] and all(p["peak_bytes"] > 10 * 2 ** 20 for p in peaks)
    return json.loads((art / "metrics.json").read_text()), art


def _check(metrics: dict, art: Path, zero_stage: int) -> None:
    from transformers import AutoModelForCausalLM

    from stages.distributed_smoke import probe_tokens

    assert metrics["world_size"] == 2
    assert metrics["distributed_type"] == "DEEPSPEED"
    assert metrics["zero_stage"] == zero_stage  # of the DeepSpeed engine that trained
    assert metrics["deepspeed"]["zero_stage"] == zero_stage
    # "auto" batch sizes filled by accelerate from the dataloader and the real world size
    ds = metrics["deepspeed"]
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert len(metrics["losses"]) == 3
    assert metrics["loss_finite"] is True
    assert all(math.isfinite(x) for x in metrics["losses"])
    assert metrics["losses"][-1] < metrics["losses"][0]  # it trained (seeded: deterministic)

    model = AutoModelForCausalLM.from_pretrained(art / "model")
    assert sum(p.numel() for p in model.parameters()) == metrics["n_parameters"] > 0
    probe = probe_tokens(metrics["seed"])
    with torch.no_grad():
        loss = model(input_ids=probe, labels=probe).loss.item()
    # the saved weights are the trained ones (gathered from both ranks), not an initialisation
    assert loss == pytest.approx(metrics["probe_loss"], rel=1e-4)


@pytest.mark.slow
def test_distributed_smoke_zero2(tmp_path, monkeypatch):
    # an empty extensions folder, as on a fresh machine: the ranks must not build DeepSpeed's shared-memory op there
    extensions = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    metrics, art = _run_smoke(tmp_path, "zero2.json")
    assert not list(extensions.rglob("*shm*"))
    _check(metrics, art, zero_stage=2)
    assert metrics["deepspeed_config_file"] == str((REPO / "configs/deepspeed/zero2.json").resolve())


@pytest.mark.slow
def test_distributed_smoke_zero3(tmp_path):
    metrics, art = _run_smoke(tmp_path, "zero3.json")
    _check(metrics, art, zero_stage=3)
