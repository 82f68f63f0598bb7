"""scripts/gpu_check.sh and scripts/gpu_check_table.py, without a GPU: the table read from manifests written the way
the runner commits them, the script's runs validated by its --plan mode, and its failure handling driven through a
stand-in interpreter that claims one GPU."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

from pipeline.cache import ArtifactCache
from pipeline.config import load_config
from pipeline.runner import Runner
from pipeline.study import build_stages

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
spec = importlib.util.spec_from_file_location("gpu_check_table", ROOT / "scripts" / "gpu_check_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)


def commit_fake(cache: ArtifactCache, key: str, fp: str, record: dict) -> None:
    """An artifact committed as the runner commits a stage's (`Runner._execute`), holding one file."""
    with cache.staging(key, fp) as out:
        (out / "x.txt").write_text("x")
        cache.commit(key, fp, out, {"stage": key, **record})


def test_table_reads_wall_time_and_peak_memory_of_each_manifest(tmp_path, capsys):
    overrides = [f"run.cache_root={tmp_path}", "study=t"]
    cfg = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    cache = ArtifactCache(cfg.run.cache_root)
    fps = Runner(build_stages(cfg), cache).fingerprints()
    keys = list(fps)
    gpu = [{"rank": 0, "device": "cuda:0", "peak_bytes": 3 * 2 ** 30}, {"rank": 1, "device": "cuda:1",
                                                                        "peak_bytes": 512 * 2 ** 20}]
    for key in keys[:-1]:
        record = {"wall_time_s": 12.345}
        if key == "sft_policy":
            record["peak_memory"] = gpu
        commit_fake(cache, key, fps[key], record)
    argv = [str(ROOT / "configs" / "smoke.yaml"), *overrides]
    assert table.main(argv) == 1  # the last stage is not cached
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(keys)
    assert rows["sft_policy"].split(None, 3)[2:] == ["12.3", "r0 cuda:0 3,072 MiB, r1 cuda:1 512 MiB"]
    assert rows["world"].split()[2:] == ["12.3", "—"]  # a stage without peak memory (inline on CPU)
    assert rows[keys[-1]].split()[2:] == ["—", "missing"]
    commit_fake(cache, keys[-1], fps[keys[-1]], {"wall_time_s": 1.0})
    assert table.main(argv + ["--", *argv]) == 0  # two studies (the same one twice): every stage of both cached
    assert len(capsys.readouterr().out.splitlines()) == 1 + 2 * len(keys)


def run_script(*args: str, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1", **env})


def test_plan_mode_validates_every_run_without_a_gpu(tmp_path):
    """Every override the script passes exists and holds a valid value for 3 ranks (config validators included), and
    --plan writes nothing."""
    done = run_script("--plan", GPU_CHECK_NGPU="3", GPU_CHECK_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr[-3000:]
    for study in ("gpu_check_zero2", "gpu_check_zero3", "gpu_check_vllm"):
        assert f"plan of study {study}" in done.stdout
    assert not (tmp_path / "cache").exists()


def stand_in_python(tmp_path: Path, run_exit: int) -> str:
    """An interpreter that reports one CUDA GPU and whose `-m pipeline.cli run` only exits with `run_exit`; anything
    else (the package check, the table) goes to the real one."""
    path = tmp_path / "python"
    path.write_text(f"""#!/usr/bin/env bash
case "$*" in
  *device_count*) echo 1 ;;
  *get_device_name*) echo "Stand-in GPU" ;;
  "-m pipeline.cli run "*) echo "error: stage world failed: RuntimeError: boom" >&2; exit {run_exit} ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_failed_run_fails_the_script_after_the_table_of_what_ran(tmp_path):
    done = run_script(python=stand_in_python(tmp_path, 7), GPU_CHECK_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 7, done.stderr[-3000:]
    assert "gpu_check: FAILED" in done.stderr and "study=gpu_check_zero2" in done.stderr
    assert "error: stage world failed: RuntimeError: boom" in done.stderr
    lines = done.stdout.splitlines()
    assert any(line.split()[:2] == ["gpu_check_zero2", "world"] and line.endswith("missing") for line in lines)
    assert not any("gpu_check_zero3" in line for line in lines)  # the second run never started


def test_runs_that_leave_a_stage_uncached_fail_the_script(tmp_path):
    """Runs that exit 0 but commit nothing: the table finds every stage missing and the script exits 1."""
    done = run_script(python=stand_in_python(tmp_path, 0), GPU_CHECK_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "gpu_check: every run finished" in done.stdout
    assert any(line.startswith("gpu_check_zero3") and line.endswith("missing") for line in done.stdout.splitlines())
