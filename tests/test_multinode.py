"""Several machines (`pipeline.machines`): two simulated machines on loopback write the artifacts of two ranks on one
machine; SLURM's environment places a node; the DeepSpeed hostfile launch is accelerate's own; a follower stops with
a clear error, never hangs, when the leader fails, vanishes or never comes.

The two machines are two `overopt run` processes on this machine, machine_rank 0 and 1 of launch.num_machines 2, one
rank each (world size 2), rendezvous at 127.0.0.1 on a port the leader picks, over one cache root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pipeline.cache import ArtifactCache
from pipeline.config import ConfigError, LaunchConfig, load_config
from pipeline.machines import (
    Follower,
    LeaderSession,
    MachineError,
    check_hostfile_launch,
    read_hostfile,
    slurm_overrides,
)
from pipeline.runner import MachineArgs, Runner, launch_command
from pipeline.study import build_stages
from tests.test_data_parallel import file_hashes

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
ZERO2 = "configs/deepspeed/zero2.json"
# smaller than the smoke study where the result does not matter here (the upstream stages only feed PPO and sampling)
QUICK = ["policy.pretrain.steps=10", "policy.sft.steps=5", "gold_label.n_pairs=64", "proxy_training.epochs=1",
         "run.torch_threads=1", f"ppo.deepspeed_config={ZERO2}"]
STAGES = ["bon_sample", "ppo[bt]"]  # one data-parallel stage, one DeepSpeed ZeRO-2 training stage


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    return env


def _overopt(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", str(SMOKE), f"run.cache_root={root}",
            f"run.reports_dir={root}/report", *QUICK, *args]


def _machines(root: Path, *args: str, timeout: float = 240,
              leader_delay: float = 0.0) -> list[subprocess.CompletedProcess]:
    """Machine 1 (started first: it waits for the leader) and machine 0, `leader_delay` s later, the same command but
    the rank."""
    procs = []
    for k in (1, 0):
        if k == 0 and leader_delay:
            time.sleep(leader_delay)
        procs.append(subprocess.Popen(_overopt(root, f"launch.machine_rank={k}", *args), env=_env(), cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, out) for p, out in zip(procs, outs)]


@pytest.fixture(autouse=True)
def _two_ranks_fit(monkeypatch):
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")


@pytest.mark.slow
def test_two_machines_on_loopback_write_what_two_ranks_on_one_machine_write(tmp_path):
    one, two = tmp_path / "one_machine", tmp_path / "two_machines"
    # the upstream stages once, in one process; the two-machine cache starts as a copy
    cfg = load_config(SMOKE, [f"run.cache_root={one}", *QUICK, "ppo.num_processes=2"])
    runner = Runner(build_stages(cfg), ArtifactCache(one))
    runner.run(until={"gold_label", "train_proxy[bt]", "sft_policy", "world"})
    shutil.copytree(one, two)
    # one machine: bon_sample in one process (tests/test_data_parallel.py shows that 2 ranks on one machine write the
    # same bytes), PPO on 2 ZeRO-2 ranks
    plan = {p.node.key: p for p in runner.run(only=set(STAGES))}
    assert (plan["bon_sample"].node.launcher, plan["ppo[bt]"].node.num_processes) == ("inline", 2)
    # 2 machines × 1 rank: the same fingerprints (the RL stage's counts its world size, 2 either way)
    leader_args = ["launch.num_machines=2", "launch.main_process_ip=127.0.0.1", "launch.leader_timeout_s=60",
                   "ppo.num_processes=1", *[a for s in STAGES for a in ("--only", s)]]
    t0 = time.time()
    follower, leader = _machines(two, *leader_args)
    assert leader.returncode == 0, leader.stdout[-3000:]
    assert follower.returncode == 0, follower.stdout[-3000:]
    for key in STAGES:
        fp = plan[key].fingerprint
        assert (two / key / fp / "manifest.json").is_file(), key
        manifest = json.loads((two / key / fp / "manifest.json").read_text())
        # both machines' ranks ran, each one rank of the world of 2
        assert [r["rank"] for r in manifest["peak_memory"]] == [0, 1], key
    assert follower.stdout.count("committed by the leader") == len(STAGES)
    # the data-parallel stage: the same bytes
    assert file_hashes(two / "bon_sample" / plan["bon_sample"].fingerprint) == \
        file_hashes(one / "bon_sample" / plan["bon_sample"].fingerprint)
    # PPO: what is deterministic is equal exactly on CPU (gloo sums the two ranks' gradients in the same order however
    # the ranks are placed): every exported policy's bytes and every logged number but the timings; the files that
    # hold timings and resident memory differ in those alone
    ppo_one, ppo_two = (root / "ppo[bt]" / plan["ppo[bt]"].fingerprint for root in (one, two))
    exports = [{k: h for k, h in file_hashes(d).items() if k.startswith("exports/")} for d in (ppo_one, ppo_two)]
    assert len(exports[0]) >= 4 * 2 and exports[0] == exports[1]
    logs = [[{k: v for k, v in json.loads(line).items() if not k.startswith("time")}
             for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (ppo_one, ppo_two)]
    assert len(logs[0]) == 3 and logs[0] == logs[1]
    assert {"policy_loss", "value_loss", "kl_seq_k1"} <= set(logs[0][0])
    summaries = [json.loads((d / "summary.json").read_text()) for d in (ppo_one, ppo_two)]
    assert summaries[1]["world_size"] == 2 and summaries[1]["zero_stage"] == 2
    assert [{k: v for k, v in s.items() if k != "per_rank"} for s in summaries[1:]] == \
        [{k: v for k, v in summaries[0].items() if k != "per_rank"}]
    # the follower wrote nothing of its own: no run folder, and the leader's job folders are gone
    assert len(list((two / "runs").iterdir())) == 1  # the leader's
    assert not list((two / ".tmp" / "multinode" / "jobs").iterdir())
    assert time.time() - t0 < 200


def test_a_follower_stops_with_the_leaders_error(tmp_path):
    """The leader fails (PPO's inputs are not cached): the follower names that error, whether it joined the leader's
    session before the failure or started after it (the shared launch.run_id tells it the failed session is its
    run's), at once — not at its timeout."""
    root = tmp_path / "cache"
    t0 = time.time()
    follower, leader = _machines(root, "launch.num_machines=2", "launch.main_process_ip=127.0.0.1",
                                 "launch.leader_timeout_s=120", "launch.run_id=loopback-1", "--only", "ppo[bt]",
                                 timeout=240)
    assert leader.returncode == 1 and "not cached" in leader.stdout
    assert follower.returncode == 1
    error = "RuntimeError: stage ppo[bt] needs gold_label (pairs), which is not cached"
    assert ("error: machine 1: the leader failed: run failed: " + error in follower.stdout
            or "error: machine 1: the leader of run loopback-1 failed: run failed: " + error in follower.stdout)
    assert time.time() - t0 < 110  # named before the follower's 120 s timeout could have fired


def _launch(**kw) -> LaunchConfig:
    return LaunchConfig(num_machines=2, leader_timeout_s=1.0, **kw)


def test_a_follower_without_a_leader_times_out(tmp_path):
    cache = ArtifactCache(tmp_path)
    t0 = time.time()
    with pytest.raises(MachineError, match=r"machine 1: no live leader .* within launch.leader_timeout_s=1.0"):
        Follower(cache, _launch(machine_rank=1)).join()
    assert time.time() - t0 < 3
    # a session left by a leader that was killed (its heartbeat stands still) is not joined either, and is named
    with LeaderSession(cache, _launch()) as dead:
        dead._stop.set()  # the heartbeat stops; the record still says running
        time.sleep(0.3)
        with pytest.raises(MachineError, match=f"last leader session found \\({dead.id}\\) is running"):
            Follower(cache, _launch(machine_rank=1)).join()
        dead.finish("done")


def test_a_run_id_ties_a_late_follower_to_its_leader(tmp_path):
    """With launch.run_id, a follower that starts after its leader joins the leader's session at once, and names a
    leader that already failed at once; a session of another run id is not taken for this run's; a leader refuses a
    run id an earlier run on the cache used."""
    cache = ArtifactCache(tmp_path)
    with LeaderSession(cache, _launch(run_id="job-7")) as leader:
        leader._stop.set()  # no heartbeat: without the run id the follower could not tell this session is alive
        follower = Follower(cache, _launch(machine_rank=1, run_id="job-7"))
        t0 = time.time()
        follower.join()
        assert follower.session == leader.id and time.time() - t0 < 0.5
        leader.finish("failed", "RuntimeError: the policy ran out of memory")
    t0 = time.time()
    with pytest.raises(MachineError, match="machine 1: the leader of run job-7 failed: RuntimeError: the policy ran "
                                           "out of memory"):
        Follower(cache, _launch(machine_rank=1, run_id="job-7")).join()
    assert time.time() - t0 < 0.5
    with pytest.raises(MachineError, match=r"no live leader \(launch.machine_rank=0\) of launch.run_id 'job-8'"):
        Follower(cache, _launch(machine_rank=1, run_id="job-8")).join()
    with pytest.raises(MachineError, match="launch.run_id 'job-7' was already used by an earlier run"):
        with LeaderSession(cache, _launch(run_id="job-7")):
            pass
    assert json.loads((cache.root / ".tmp" / "multinode" / "session.json").read_text())["error"].endswith("memory")
    assert LaunchConfig(run_id=17).run_id == "17"  # launch.run_id=17 on a command line is YAML's int


def test_a_follower_notices_a_leader_that_stopped_beating(tmp_path):
    cache = ArtifactCache(tmp_path)
    with LeaderSession(cache, _launch()) as leader:
        follower = Follower(cache, _launch(machine_rank=1))
        follower.join()
        assert follower.session == leader.id
        leader.wait_for_machines()  # joined: returns at once
        follower.check_leader()  # alive
        leader._stop.set()  # killed: the heartbeat stops without a record of the end
        t0 = time.time()
        with pytest.raises(MachineError, match="heartbeat .* has not advanced"):
            while time.time() - t0 < 5:
                follower.check_leader()
                time.sleep(0.1)
        assert 0.9 < time.time() - t0 < 3


def test_the_leader_names_a_machine_that_never_joined_or_failed(tmp_path):
    cache = ArtifactCache(tmp_path)
    with LeaderSession(cache, LaunchConfig(num_machines=3, leader_timeout_s=1.0)) as leader:
        follower = Follower(cache, LaunchConfig(num_machines=3, machine_rank=1, leader_timeout_s=1.0))
        follower.join()
        with pytest.raises(MachineError, match=r"machine\(s\) \[2\] did not join within"):
            leader.wait_for_machines()
        with pytest.raises(MachineError, match="machine 1: stage x: rank 1 ran out of memory"):
            follower.fail("stage x: rank 1 ran out of memory")
        with pytest.raises(MachineError, match="machine 1 failed: stage x: rank 1 ran out of memory"):
            leader.check_machines()


def test_slurm_places_this_node(tmp_path, monkeypatch):
    env = {"SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_LOCALID": "0"}
    # `scontrol show hostnames` expands the node list: a fake scontrol on PATH prints what SLURM's would
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && '
                                      'printf "gpu07\\ngpu08\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = LaunchConfig(launcher="slurm")
    overrides = slurm_overrides(slurm, env)
    assert overrides == ["launch.num_machines=2", "launch.machine_rank=1", "launch.main_process_ip=gpu07"]
    # the job and step id name the run on every node (launch.run_id), unless the config names it
    assert slurm_overrides(slurm, env | {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "1"})[3:] == [
        "launch.run_id=slurm-4242.1"]
    assert slurm_overrides(LaunchConfig(launcher="slurm", run_id="mine"), env | {"SLURM_JOB_ID": "4242"})[3:] == []
    cfg = load_config(SMOKE, ["launch.launcher=slurm", *overrides])
    assert (cfg.launch.num_machines, cfg.launch.machine_rank, cfg.launch.main_process_ip) == (2, 1, "gpu07")
    # an address set in the config (an InfiniBand interface's) is kept
    assert slurm_overrides(LaunchConfig(launcher="slurm", main_process_ip="10.0.0.7"), env)[2:] == []
    with pytest.raises(ConfigError, match="SLURM_NODEID not set; start `overopt run` with srun"):
        slurm_overrides(slurm, {k: v for k, v in env.items() if k != "SLURM_NODEID"})
    with pytest.raises(ConfigError, match="one task per node"):
        slurm_overrides(slurm, env | {"SLURM_LOCALID": "3"})
    with pytest.raises(ConfigError, match="launch.num_machines 4 disagrees with the SLURM allocation's 2 nodes"):
        slurm_overrides(LaunchConfig(launcher="slurm", num_machines=4), env)


def test_the_hostfile_launch_is_accelerates_deepspeed_pdsh_launch(tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nworker-1 slots=4\nworker-2 slots=4\n")
    assert read_hostfile(hostfile) == [("worker-1", 4), ("worker-2", 4)]
    hosts = ["launch.num_machines=2", "launch.launcher=deepspeed_hostfile", f"launch.hostfile={hostfile}"]
    cfg = load_config(SMOKE, [*hosts, "launch.num_processes=4", "ppo.num_processes=4", "ppo.rollout_batch_size=16",
                              f"ppo.deepspeed_config={ZERO2}"])
    nodes = {n.key: n for n in build_stages(cfg)}
    check_hostfile_launch(cfg.launch, nodes.values())
    # data-parallel stages stay on the first host; the DeepSpeed stage spreads over both
    assert (nodes["bon_sample"].num_processes, nodes["bon_sample"].num_machines) == (4, 1)
    ppo = nodes["ppo[bt]"]
    assert (ppo.num_processes, ppo.num_machines, ppo.config.ppo.num_processes) == (4, 2, 8)
    assert MachineArgs.hostfile_of(cfg.launch, nodes["bon_sample"]) is None
    machines = MachineArgs.hostfile_of(cfg.launch, ppo)
    assert machines == MachineArgs(2, 0, "worker-1", 29500, hostfile.resolve())
    job = tmp_path / "job"
    job.mkdir()
    cmd = launch_command(ppo, job, cuda=True, machines=machines)
    argv = cmd[3:]  # python -m accelerate.commands.launch ARGS
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    joined = " ".join(argv)
    for part in ("--num_processes 8", "--num_machines 2", "--machine_rank 0", "--main_process_ip worker-1",
                 "--main_process_port 29500", "--use_deepspeed", f"--deepspeed_config_file {(REPO / ZERO2).resolve()}",
                 "--deepspeed_multinode_launcher pdsh", f"--deepspeed_hostfile {hostfile.resolve()}"):
        assert part in joined, part
    assert argv[-3:] == ["-m", "pipeline.stage_main", str(job / "job.json")]
    # accelerate 1.15's own `launch_command` takes it to its DeepSpeed launcher, which runs DeepSpeed's runner over the
    # hostfile's hosts with pdsh (the runner itself not started here: there are no hosts)
    import accelerate.commands.launch as accelerate_launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    started = []
    monkeypatch.setattr(accelerate_launch, "deepspeed_launcher",
                        lambda args: started.append(prepare_deepspeed_cmd_env(args)[0]))
    accelerate_launch.launch_command(accelerate_launch.launch_command_parser().parse_args(argv))
    (ds_cmd,) = started
    assert ds_cmd == ["deepspeed", "--hostfile", str(hostfile.resolve()), "--no_local_rank", "--launcher", "pdsh",
                      "--num_gpus", "4", "--master_addr", "worker-1", "--master_port", "29500", "--module",
                      "pipeline.stage_main", str(job / "job.json")]
    # a stage without a DeepSpeed config cannot spread over the hosts; a hostfile must list num_machines hosts
    no_ds = load_config(SMOKE, [*hosts, "ppo.deepspeed_config=null"])
    with pytest.raises(ConfigError, match=r"stage ppo\[bt\]: .* has no deepspeed_config"):
        check_hostfile_launch(no_ds.launch, build_stages(no_ds))
    three = cfg.launch.model_copy(update={"num_machines": 3})
    with pytest.raises(ConfigError, match="lists 2 host"):
        check_hostfile_launch(three, [])


def test_launch_machine_keys(tmp_path):
    with pytest.raises(ValidationError, match="launch.machine_rank 2 must be below launch.num_machines 2"):
        LaunchConfig(num_machines=2, machine_rank=2)
    with pytest.raises(ValidationError, match="needs launch.hostfile"):
        LaunchConfig(num_machines=2, launcher="deepspeed_hostfile")
    with pytest.raises(ValidationError, match="launch.machine_rank 0"):
        LaunchConfig(num_machines=2, machine_rank=1, launcher="deepspeed_hostfile", hostfile=tmp_path)
    # the machine keys are in no fingerprint, but an RL stage's world size is: 2 machines × 1 rank = 1 machine × 2
    fps = [Runner(build_stages(load_config(SMOKE, [f"ppo.deepspeed_config={ZERO2}", *o])), ArtifactCache(tmp_path))
           .fingerprints() for o in (["ppo.num_processes=2"],
                                     ["ppo.num_processes=1", "launch.num_machines=2", "launch.machine_rank=1",
                                      "launch.main_process_ip=10.1.1.1", "launch.main_process_port=4000"],
                                     ["ppo.num_processes=1"])]
    assert fps[0] == fps[1]
    assert fps[2]["ppo[bt]"] != fps[0]["ppo[bt]"] and fps[2]["bon_sample"] == fps[0]["bon_sample"]
    # checks that count an RL section's ranks count them over every machine: 8 rollouts over 4 × 2 ranks cannot make
    # 2 minibatches a rank (over 4 ranks on one machine they can)
    load_config(SMOKE, ["ppo.num_processes=4"])
    with pytest.raises(ConfigError, match="ppo.num_processes 4 on each of launch.num_machines 2 machines is 8 ranks: "
                                          r"ppo.rollout_batch_size / ppo.num_processes \(1\) must be divisible"):
        load_config(SMOKE, ["ppo.num_processes=4", "launch.num_machines=2"])
