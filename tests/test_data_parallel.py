"""Data-parallel stages: the same artifact, byte for byte, from 1 and from 2 ranks; a killed 2-rank run resumes to
the uninterrupted result; the number of ranks is in no fingerprint; the `launch:` section.

The smoke study runs once in one process (scoring batches made small, so two ranks each get several); then one stage
of each data-parallel module is recomputed (`--force`) by 2 ranks under `accelerate launch` and every file of its
artifact must have the sha256 it had.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from pipeline.cache import ArtifactCache
from pipeline.config import ConfigError, LaunchConfig, load_config
from pipeline.runner import Runner, is_data_parallel
from pipeline.study import build_stages

SMOKE = Path(__file__).parents[1] / "configs" / "smoke.yaml"
# small batches: 64 best-of-n samples in 8 batches, the knowledge and evaluation pairs in several; each PPO export
# sampled in 2 shards of 2 prompts (by default an export is one shard)
SMALL_BATCHES = ["bon.score_batch_size=8", "eval_proxy.batch_size=16", "knowledge.batch_size=16",
                 "knowledge.n_pairs=20", "ppo.eval.batch_size=4", "ppo.eval.prompts_per_shard=2"]
# one stage of each data-parallel module: what the 2-rank runs recompute
TWO_RANK_STAGES = ["gold_score", "bon_sample", "bon_score[bt]", "eval_proxy[grm_sft]", "knowledge_base",
                   "knowledge[bt]", "ppo_sample[bt]"]


def file_hashes(artifact: Path) -> dict[str, str]:
    """sha256 of every file of an artifact but its manifest (which records the run's wall time)."""
    return {f.relative_to(artifact).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(artifact.rglob("*")) if f.is_file() and f.name != "manifest.json"}


def study(root: Path, ranks: int):
    # proxies train in one process whatever the launch (their fingerprint counts their ranks: it is not data-parallel)
    cfg = load_config(SMOKE, [f"run.cache_root={root}", *SMALL_BATCHES, f"launch.num_processes={ranks}",
                              "proxy_training.num_processes=1"])
    return Runner(build_stages(cfg), ArtifactCache(cfg.run.cache_root))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The smoke study computed in one process, and the sha256 of every file of its data-parallel artifacts."""
    root = tmp_path_factory.mktemp("dp_cache")
    runner = study(root, 1)
    plan = runner.run(until={"ppo_sample", "knowledge_base", "knowledge", "eval_proxy", "bon_score"})
    paths = {p.node.key: runner.cache.path(p.node.key, p.fingerprint) for p in plan if p.status == "cached"}
    return root, {key: file_hashes(paths[key]) for key in TWO_RANK_STAGES}


def test_two_ranks_write_the_artifacts_one_process_writes(one_rank):
    root, hashes = one_rank
    runner = study(root, 2)
    plan = {p.node.key: p for p in runner.run(only=set(TWO_RANK_STAGES), force=set(TWO_RANK_STAGES))}
    for key in TWO_RANK_STAGES:
        node = plan[key].node
        assert (node.launcher, node.num_processes) == ("accelerate", 2), key
        # both ranks ran (each leaves its peak memory): the launch did not fall back to one process
        assert [r["rank"] for r in plan[key].manifest["peak_memory"]] == [0, 1], key
        assert file_hashes(runner.cache.path(key, plan[key].fingerprint)) == hashes[key], key
    # the files compared hold real work: several scoring batches, several shards
    assert len(hashes["bon_sample"]) == 3 and len(hashes["ppo_sample[bt]"]) == 1 + 4 * 2


def test_a_killed_two_rank_sampling_stage_resumes_to_the_uninterrupted_result(one_rank):
    """ppo_sample's (export, prompt shard) units: three written by a killed run (and a half-written one), the other
    five dealt to 2 ranks on resuming."""
    root, hashes = one_rank
    runner = study(root, 2)
    fp = runner.fingerprints()["ppo_sample[bt]"]
    done = runner.cache.path("ppo_sample[bt]", fp)
    partial = runner.cache.partial_path("ppo_sample[bt]", fp)
    (partial / "shards").mkdir(parents=True)
    kept = {}
    for name in ("shard_00000_00000.parquet", "shard_00001_00001.parquet", "shard_00003_00000.parquet"):
        shutil.copy2(done / "shards" / name, partial / "shards" / name)
        kept[name] = (partial / "shards" / name).stat().st_ino
    (partial / "shards" / "shard_00002_00000.parquet.tmp").write_bytes(b"half written")
    shutil.rmtree(done)
    plan = {p.node.key: p for p in runner.run(only={"ppo_sample[bt]"})}
    assert [r["rank"] for r in plan["ppo_sample[bt]"].manifest["peak_memory"]] == [0, 1]
    assert file_hashes(done) == hashes["ppo_sample[bt]"]
    # the killed run's shards were kept (the same files), not sampled again
    assert {name: (done / "shards" / name).stat().st_ino for name in kept} == kept


def test_the_number_of_ranks_is_in_no_data_parallel_fingerprint(tmp_path):
    one, two = study(tmp_path, 1), study(tmp_path, 2)
    assert one.fingerprints() == two.fingerprints()
    launched = {n.key for n in two.nodes if n.num_processes == 2}
    assert launched == {n.key for n in two.nodes if is_data_parallel(n)}
    assert {"gold_score", "bon_sample", "bon_score[gold]", "ppo_sample[bt]", "ppo_gold[bt]", "knowledge_base",
            "eval_proxy[bt]", "knowledge[grm_sft]"} <= launched
    # an RL stage's own process count still counts (its ranks share one training run)
    ppo = load_config(SMOKE, ["ppo.num_processes=2", "ppo.deepspeed_config=configs/deepspeed/zero2.json"])
    base = load_config(SMOKE, ["ppo.deepspeed_config=configs/deepspeed/zero2.json"])
    fps = [Runner(build_stages(c), ArtifactCache(tmp_path)).fingerprints()["ppo[bt]"] for c in (ppo, base)]
    assert fps[0] != fps[1]


def _rl_launch(cfg) -> tuple:
    return cfg.ppo.num_processes, cfg.ppo.deepspeed_config


def test_the_launch_section_defaults_and_overrides(tmp_path):
    assert LaunchConfig() == LaunchConfig(num_processes=1, deepspeed_config=None)
    tiny = tmp_path / "study.yaml"
    tiny.write_text("proxies: [{name: bt, type: bt}]\nppo: {steps: 2}\n")
    # unset: the RL section keeps its own defaults
    assert _rl_launch(load_config(tiny)) == (2, Path("configs/deepspeed/zero2.json"))
    # set: the default of an RL section that does not set the key itself
    cfg = load_config(tiny, ["launch.num_processes=4", "launch.deepspeed_config=configs/deepspeed/zero3.json"])
    assert _rl_launch(cfg) == (4, Path("configs/deepspeed/zero3.json"))
    assert cfg.launch.num_processes == 4
    # the section's own key wins
    cfg = load_config(tiny, ["launch.num_processes=4", "ppo.num_processes=1", "ppo.deepspeed_config=null"])
    assert _rl_launch(cfg) == (1, None)
    assert {n.key: n.num_processes for n in build_stages(cfg)}["bon_sample"] == 4
    with pytest.raises(ConfigError, match=r"launch\.num_processes: Input should be greater than or equal to 1"):
        load_config(tiny, ["launch.num_processes=0"])
