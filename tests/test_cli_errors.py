"""A failing stage prints one clear line (stage key, message, what to change) and where the traceback is; `--debug`
prints the traceback too; a ConfigError keeps its multi-line key list."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.study
from pipeline.cli import main
from pipeline.runner import StageNode
from tests.failing_stages import FailConfig

TINY = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@pytest.fixture
def fake_study(monkeypatch):
    """`overopt run` on the tiny config, with its DAG replaced by two fake stages (the second fails as asked)."""
    def use(kind: str):
        nodes = [StageNode("prepare", "tests.failing_stages", FailConfig(kind="ok")),
                 StageNode("score[bt]", "tests.failing_stages", FailConfig(kind=kind), {"up": "prepare"})]
        monkeypatch.setattr(pipeline.study, "build_stages", lambda cfg: nodes)
    return use


def _run(tmp_path, capsys, *extra):
    code = main(["run", str(TINY), f"run.cache_root={tmp_path / 'cache'}", *extra])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def _log(tmp_path) -> str:
    (log,) = (tmp_path / "cache" / "runs").glob("*/run.log")
    return log.read_text()


@pytest.mark.parametrize("kind, expected", [
    ("value", "error: stage score[bt] failed: ValueError: the frobnicator is out of range"),
    ("nonfinite", "error: stage score[bt] failed: NonFiniteScoreError: scorer 'bt' returned a non-finite score (nan) "
                  "for prompt_id='q0', sample_idx=1"),
    ("multiline", "error: stage score[bt] failed: RuntimeError: first line second line third line"),
    ("oom", "error: stage score[bt] failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB -> "
            "lower the stage's batch size"),
])
def test_a_failing_stage_prints_one_line_and_the_log_path(tmp_path, capsys, fake_study, kind, expected):
    fake_study(kind)
    code, err, out = _run(tmp_path, capsys)
    assert code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1 and error_lines[0].startswith(expected), err
    assert "Traceback" not in err + out
    (log_path,) = (tmp_path / "cache" / "runs").glob("*/run.log")
    assert f"full traceback in {log_path} (or run again with --debug)" in err
    log = _log(tmp_path)
    assert "Traceback (most recent call last)" in log and "stage score[bt] failed after" in log
    assert (tmp_path / "cache" / "prepare").is_dir() and not (tmp_path / "cache" / "score[bt]").exists()


def test_debug_prints_the_traceback(tmp_path, capsys, fake_study):
    fake_study("value")
    code, err, out = _run(tmp_path, capsys, "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and 'raise ValueError("the frobnicator' in err
    assert "error: stage score[bt] failed: ValueError: the frobnicator is out of range" in err


def test_a_config_error_keeps_its_key_list(tmp_path, capsys, fake_study):
    fake_study("config")
    code, err, _ = _run(tmp_path, capsys)
    assert code == 2
    assert "error: invalid config (x):\n  a.b: bad\n  c.d: worse" in err
    code, err, _ = _run(tmp_path, capsys, "gold_label.noise_rat=0.1", "bon.n_samples=many")
    assert code == 2 and "unknown key 'gold_label.noise_rat' (did you mean 'noise_rate'?)" in err
    assert "\n  bon.n_samples:" in err


def test_a_failing_rank_names_its_error_in_the_one_line_and_the_log(tmp_path, capsys, monkeypatch):
    """A full disk on rank 1 of a two-rank stage: the one-line error and run.log carry rank 1's own error (they said
    only "failed under accelerate launch"), and the launch leaves no folder in the system's temp directory."""
    import tempfile

    node = StageNode("score[bt]", "tests.failing_stages", FailConfig(kind="full_disk_on_rank1"),
                     launcher="accelerate", num_processes=2, deepspeed_config=Path("configs/deepspeed/zero2.json"))
    monkeypatch.setattr(pipeline.study, "build_stages", lambda cfg: [node])
    system_tmp = set(Path(tempfile.gettempdir()).glob("overopt-*"))
    code, err, _ = _run(tmp_path, capsys)
    assert code == 1
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "failed under accelerate launch (exit code 1): rank 1: OSError: [Errno 28] No space left on device" in line
    assert "rank 1 of stage score[bt] failed" in _log(tmp_path) and "Traceback" in _log(tmp_path)
    assert set(Path(tempfile.gettempdir()).glob("overopt-*")) == system_tmp
    assert not list((tmp_path / "cache" / ".tmp").iterdir())


@pytest.mark.parametrize("kind, rank1_phase", [("abort_on_rank1", "running the stage"),
                                               ("abort_at_exit_on_rank1", "finished")])
def test_a_rank_killed_natively_is_named_with_the_phase_it_reached(tmp_path, capsys, monkeypatch, kind, rank1_phase):
    """A rank that dies by a signal (here SIGABRT, as a native library's abort) leaves no Python error: the one-line
    error says so and where each rank had got to, so a crash in the stage's work is told from one at teardown."""
    node = StageNode("score[bt]", "tests.failing_stages", FailConfig(kind=kind), launcher="accelerate",
                     num_processes=2)
    monkeypatch.setattr(pipeline.study, "build_stages", lambda cfg: [node])
    code, err, _ = _run(tmp_path, capsys)
    assert code == 1
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "failed under accelerate launch" in line and "no rank left an error from its stage" in line
    assert f"rank 1 {rank1_phase}" in line or f"ranks 0, 1 {rank1_phase}" in line
