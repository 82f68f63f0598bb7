"""Many machines: how the `overopt run` on each node takes its part in the multi-process stages.

Nothing here starts a process on another machine or talks to one: the ranks find each other through accelerate's
launcher (`torch.distributed.run`'s static rendezvous at the leader's address, or DeepSpeed's pdsh launcher for a
hostfile), and the `overopt run`s of the nodes coordinate through small files in the cache root they share:

    <cache_root>/.tmp/multinode/session.json     the leader's run: id, launch.run_id, state (running | done |
                                                 failed), its error
    <cache_root>/.tmp/multinode/heartbeat        a counter the leader rewrites every few seconds while it runs
    <cache_root>/.tmp/multinode/machine<k>.json  machine k joined the session (or failed, with its error)
    <cache_root>/.tmp/multinode/jobs/<key>.<fingerprint>/   one multi-process stage's job: the job file every rank
        reads, and `launch.json` (the session and the rendezvous address), written last

Machine rank 0 leads: it takes the cache lock (the only machine that does), sweeps `.tmp/`, starts a session, runs
the inline stages, writes each multi-process stage's job and launches its own ranks, and commits. A follower (rank
k > 0) never takes the lock and never commits: it walks the same stages, and for each multi-process one it waits for
the leader's job (or for the stage to be cached: the leader had it already), launches its ranks into it, then waits
for the leader's commit. Either side stops with a clear error, instead of waiting on a rendezvous for ever, when the
other fails: the leader records its failure in the session, a follower in its machine file, and each polls the other
while its ranks run (and the leader's heartbeat tells a follower whether it is still alive).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from pipeline.cache import MANIFEST, ArtifactCache, partial_name
from pipeline.config import ConfigError, LaunchConfig

log = logging.getLogger("overopt")


class MachineError(RuntimeError):
    """Another machine of a multi-machine run failed, vanished, or does not run the same study."""


def spread_over_machines(launch: LaunchConfig) -> bool:
    """Whether every node runs its own `overopt run` (launchers standard and slurm on several machines)."""
    return launch.num_machines > 1 and launch.launcher != "deepspeed_hostfile"


def is_follower(launch: LaunchConfig) -> bool:
    return spread_over_machines(launch) and launch.machine_rank > 0


# -------------------------------------------------------------------------------------------------------- SLURM


def scontrol_hostnames(nodelist: str) -> list[str]:
    """SLURM's compressed node list (`node[01-02]`) expanded by `scontrol show hostnames`."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def slurm_overrides(launch: LaunchConfig, env: dict[str, str] | None = None,
                    hostnames: Callable[[str], list[str]] = scontrol_hostnames) -> list[str]:
    """The `launch.*` overrides that place this `srun` task: machine_rank = SLURM_NODEID, num_machines =
    SLURM_NNODES, main_process_ip = the first host of SLURM_JOB_NODELIST (unless the config sets one, e.g. an
    InfiniBand address), run_id = slurm-<SLURM_JOB_ID>.<SLURM_STEP_ID> (unless set: the same on every node of the
    step, new for each step). Raises ConfigError outside a SLURM step, with more than one task on a node, or when the
    config's num_machines disagrees with the allocation."""
    env = os.environ if env is None else env
    missing = [v for v in ("SLURM_NODEID", "SLURM_NNODES", "SLURM_JOB_NODELIST") if v not in env]
    if missing:
        raise ConfigError(f"launch.launcher slurm: {', '.join(missing)} not set; start `overopt run` with srun "
                          f"inside a SLURM allocation (one task per node), or use launch.launcher standard")
    if env.get("SLURM_LOCALID", "0") != "0":
        raise ConfigError(f"launch.launcher slurm: this is task {env['SLURM_LOCALID']} of its node; run one task per "
                          f"node (srun --ntasks-per-node=1): accelerate starts the node's ranks")
    nnodes, node_id = int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"])
    if launch.num_machines not in (1, nnodes):
        raise ConfigError(f"launch.num_machines {launch.num_machines} disagrees with the SLURM allocation's "
                          f"{nnodes} nodes (SLURM_NNODES); leave it unset under launch.launcher slurm")
    out = [f"launch.num_machines={nnodes}", f"launch.machine_rank={node_id}"]
    if launch.main_process_ip is None:
        hosts = hostnames(env["SLURM_JOB_NODELIST"])
        if not hosts:
            raise ConfigError(f"launch.launcher slurm: `scontrol show hostnames {env['SLURM_JOB_NODELIST']}` "
                              f"listed no host")
        out.append(f"launch.main_process_ip={hosts[0]}")
    if launch.run_id is None and "SLURM_JOB_ID" in env:
        out.append(f"launch.run_id=slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}")
    return out


# ----------------------------------------------------------------------------------------------- DeepSpeed hostfile


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """(host, slots) of each line of a DeepSpeed hostfile (`worker-1 slots=8`; `#` comments and blank lines
    skipped). Raises ConfigError naming `launch.hostfile` for a missing file or a malformed line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"launch.hostfile {path} not found")
    hosts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise ConfigError(f"launch.hostfile {path}, line {n}: {line!r} is not `HOST slots=N`")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise ConfigError(f"launch.hostfile {path} lists no host")
    return hosts


def check_hostfile_launch(launch: LaunchConfig, nodes) -> None:
    """Before any work under launcher deepspeed_hostfile: the hostfile lists launch.num_machines hosts with room for
    each stage's ranks, and every multi-machine stage has a DeepSpeed config (accelerate's multi-node launchers are
    DeepSpeed's)."""
    hosts = read_hostfile(launch.hostfile)
    if len(hosts) != launch.num_machines:
        raise ConfigError(f"launch.hostfile {launch.hostfile} lists {len(hosts)} host(s) but launch.num_machines is "
                          f"{launch.num_machines}; set launch.num_machines={len(hosts)}")
    for node in nodes:
        if node.num_machines <= 1:
            continue
        if node.deepspeed_config is None:
            raise ConfigError(f"stage {node.key}: launch.launcher deepspeed_hostfile launches only DeepSpeed stages "
                              f"on several hosts, and this one has no deepspeed_config (set its section's "
                              f"deepspeed_config, or launch it with launch.launcher standard)")
        short = [h for h, slots in hosts if slots < node.num_processes]
        if short:
            raise ConfigError(f"stage {node.key}: {node.num_processes} processes a host, but launch.hostfile gives "
                              f"{short[0]} fewer slots")


# ------------------------------------------------------------------------------------------- shared session files


def _write_atomic(path: Path, data: dict) -> None:
    """Write JSON so a reader on any node sees the old file or the whole new one (rename within one folder)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def free_port() -> int:
    """A TCP port free on this machine now (the leader's rendezvous port for one stage)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _Files:
    def __init__(self, cache: ArtifactCache):
        self.root = cache.tmp_root / "multinode"
        self.session = self.root / "session.json"
        self.heartbeat = self.root / "heartbeat"

    def machine(self, rank: int) -> Path:
        return self.root / f"machine{rank}.json"

    def job_dir(self, key: str, fingerprint: str) -> Path:
        return self.root / "jobs" / partial_name(key, fingerprint)


def _heartbeat_interval(launch: LaunchConfig) -> float:
    return max(0.2, min(5.0, launch.leader_timeout_s / 10))


class LeaderSession:
    """Machine rank 0's side of a run over several machines (see the module's docstring). Use as a context manager
    around the run, after taking the cache lock and sweeping `.tmp/`: a run that leaves it without `finish("done")`
    is recorded as failed, so the followers stop."""

    def __init__(self, cache: ArtifactCache, launch: LaunchConfig):
        self.cache, self.launch, self.files = cache, launch, _Files(cache)
        self.id = uuid.uuid4().hex
        self.finished = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> LeaderSession:
        self.files.root.mkdir(parents=True, exist_ok=True)
        run_id = self.launch.run_id
        if run_id is not None and (_read_json(self.files.session) or {}).get("run_id") == run_id:
            # its followers could take that earlier session (failed or done) for this run's
            raise MachineError(f"launch.run_id {run_id!r} was already used by an earlier run on the cache root "
                               f"{self.cache.root}: give each run its own")
        self._record("running")
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="overopt-heartbeat")
        self._beat.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.finished:
            self.finish("failed", f"{exc_type.__name__}: {exc}" if exc_type else "the leader stopped")
        self._stop.set()

    def _record(self, state: str, error: str | None = None) -> None:
        _write_atomic(self.files.session, {"session": self.id, "run_id": self.launch.run_id, "state": state,
                                           "error": error,
                                           "host": socket.gethostname(), "pid": os.getpid(),
                                           "num_machines": self.launch.num_machines})

    def finish(self, state: str, error: str | None = None) -> None:
        """Record the run's end (`done`, or `failed` with its error line) for the followers."""
        self._record(state, error)
        self.finished = True
        self._stop.set()

    def _heartbeat(self) -> None:
        beat = 0
        while not self._stop.is_set():
            beat += 1
            try:  # rewritten in place: over NFS, close-to-open consistency shows the new count to the next open
                self.files.heartbeat.write_text(f"{self.id} {beat}\n")
            except OSError:
                pass
            self._stop.wait(_heartbeat_interval(self.launch))

    def failed_machines(self) -> dict[int, str]:
        """Followers that recorded a failure in this session: machine rank -> their error."""
        out = {}
        for k in range(1, self.launch.num_machines):
            rec = _read_json(self.files.machine(k))
            if rec and rec.get("session") == self.id and rec.get("state") == "failed":
                out[k] = rec.get("error") or "failed"
        return out

    def check_machines(self) -> None:
        """Raise MachineError if a follower failed (polled while the leader's ranks run)."""
        failed = self.failed_machines()
        if failed:
            k, error = min(failed.items())
            raise MachineError(f"machine {k} failed: {error}")

    def wait_for_machines(self) -> None:
        """Before the first launch: every follower has joined this session (else, after launch.leader_timeout_s, a
        clear error instead of ranks waiting at the rendezvous)."""
        deadline = time.monotonic() + self.launch.leader_timeout_s
        while True:
            self.check_machines()
            missing = [k for k in range(1, self.launch.num_machines)
                       if (_read_json(self.files.machine(k)) or {}).get("session") != self.id]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise MachineError(
                    f"machine(s) {missing} did not join within launch.leader_timeout_s={self.launch.leader_timeout_s}"
                    f" s: start the same `overopt run` with launch.machine_rank=k on each, over the cache root "
                    f"{self.cache.root}")
            time.sleep(min(1.0, _heartbeat_interval(self.launch)))

    def publish_job(self, key: str, fingerprint: str) -> tuple[Path, dict]:
        """The job folder of a multi-process stage, and its rendezvous (written by `announce` once the job file is
        in it): the leader's address and a port for this stage."""
        self.wait_for_machines()
        job_dir = self.files.job_dir(key, fingerprint)
        job_dir.mkdir(parents=True, exist_ok=True)
        port = self.launch.main_process_port or int(os.environ.get("MASTER_PORT", 0)) or free_port()
        rendezvous = {"session": self.id, "main_process_ip": self.launch.main_process_ip or socket.gethostname(),
                      "main_process_port": port}
        return job_dir, rendezvous

    def announce(self, job_dir: Path, rendezvous: dict) -> None:
        _write_atomic(job_dir / "launch.json", rendezvous)


class Follower:
    """A machine of rank k > 0 (see the module's docstring)."""

    def __init__(self, cache: ArtifactCache, launch: LaunchConfig):
        self.cache, self.launch, self.files = cache, launch, _Files(cache)
        self.rank = launch.machine_rank
        self.session: str | None = None
        self._beat: tuple[str | None, float] = (None, 0.0)  # (last heartbeat seen, when it last changed)

    # ---- joining

    def join(self) -> None:
        """Wait for this run's leader session, then record this machine in it. With launch.run_id: the session of
        that run id, whenever it began (one that already failed raises its error at once). Without: one begun after
        this follower started, or one whose heartbeat advances. Raises MachineError after launch.leader_timeout_s
        without one."""
        run_id = self.launch.run_id
        stale = (_read_json(self.files.session) or {}).get("session") if run_id is None else None
        deadline = time.monotonic() + self.launch.leader_timeout_s
        first_beat = self._read_beat()
        while True:
            rec = _read_json(self.files.session)
            if rec and run_id is not None and rec.get("run_id") == run_id:
                if rec.get("state") == "failed":
                    raise MachineError(f"machine {self.rank}: the leader of run {run_id} failed: {rec.get('error')}")
                break
            if rec and run_id is None and rec.get("session") != stale:
                break
            if (run_id is None and rec and rec.get("state") == "running"
                    and self._read_beat() not in (None, first_beat)):
                break  # the session that was there already is alive: its leader started first
            if time.monotonic() > deadline:
                last = f"; the last leader session found ({stale}) is {rec.get('state')}" + (
                    f": {rec['error']}" if rec and rec.get("error") else "") if rec else ""
                which = f" of launch.run_id {run_id!r}" if run_id is not None else ""
                raise MachineError(
                    f"machine {self.rank}: no live leader (launch.machine_rank=0){which} appeared in "
                    f"{self.files.root} within launch.leader_timeout_s={self.launch.leader_timeout_s} s{last}")
            time.sleep(min(0.5, _heartbeat_interval(self.launch)))
        self.session = rec["session"]
        if rec.get("num_machines") != self.launch.num_machines:
            self.fail(f"launch.num_machines is {self.launch.num_machines} here but {rec.get('num_machines')} on "
                      f"the leader")
        self._beat = (self._read_beat(), time.monotonic())
        _write_atomic(self.files.machine(self.rank), {"session": self.session, "state": "joined",
                                                      "host": socket.gethostname(), "pid": os.getpid()})
        log.info("machine %d joined the leader's session %s (%s)", self.rank, self.session, rec.get("host"))

    def fail(self, error: str) -> None:
        """Record this machine's failure for the leader (which stops its ranks), then raise it."""
        _write_atomic(self.files.machine(self.rank), {"session": self.session, "state": "failed", "error": error,
                                                      "host": socket.gethostname(), "pid": os.getpid()})
        raise MachineError(f"machine {self.rank}: {error}")

    # ---- watching the leader

    def _read_beat(self) -> str | None:
        try:
            return self.files.heartbeat.read_text().strip() or None
        except OSError:
            return None

    def check_leader(self) -> dict:
        """The leader's session record; raises MachineError when it failed or its heartbeat has not advanced for
        launch.leader_timeout_s (killed, or its node lost)."""
        rec = _read_json(self.files.session) or {}
        if rec.get("session") != self.session:
            raise MachineError(f"machine {self.rank}: the leader's session {self.session} was replaced by "
                               f"{rec.get('session')} (another leader run started on this cache)")
        if rec.get("state") == "failed":
            raise MachineError(f"machine {self.rank}: the leader failed: {rec.get('error')}")
        beat, since = self._beat
        now_beat = self._read_beat()
        if now_beat != beat:
            self._beat = (now_beat, time.monotonic())
        elif rec.get("state") == "running" and time.monotonic() - since > self.launch.leader_timeout_s:
            raise MachineError(f"machine {self.rank}: the leader's heartbeat ({self.files.heartbeat}) has not "
                               f"advanced for launch.leader_timeout_s={self.launch.leader_timeout_s} s: it was "
                               f"killed or its node was lost")
        return rec

    # ---- one stage

    def wait_for_job(self, key: str, fingerprint: str, forced: bool) -> tuple[Path, dict] | None:
        """The leader's job folder and rendezvous for this stage, or None when the stage is (or becomes) cached
        without a launch (the leader found it cached, or finished an interrupted commit). A forced stage is always
        launched by the leader, so only its job counts."""
        job_dir = self.files.job_dir(key, fingerprint)
        prefix = partial_name(key, fingerprint)[:-len(fingerprint)]
        while True:
            rec = self.check_leader()
            rendezvous = _read_json(job_dir / "launch.json")
            if rendezvous and rendezvous.get("session") == self.session:
                return job_dir, rendezvous
            if not forced and (self.cache.path(key, fingerprint) / MANIFEST).is_file():
                return None
            jobs = self.files.root / "jobs"
            others = [d.name for d in jobs.iterdir() if d.name.startswith(prefix)] if jobs.is_dir() else []
            if others and job_dir.name not in others:
                self.fail(f"the leader launches stage {key} as {others[0]}, this machine computes fingerprint "
                          f"{fingerprint}: the machines' code, config or local inputs differ")
            if rec.get("state") == "done":
                raise MachineError(f"machine {self.rank}: the leader finished without launching stage {key} "
                                   f"({fingerprint}); run the same command, with the same --only/--until/--force, "
                                   f"on every machine")
            time.sleep(min(1.0, _heartbeat_interval(self.launch)))

    def wait_for_commit(self, key: str, fingerprint: str) -> None:
        """After this machine's ranks finished: the leader commits the stage (its manifest appears)."""
        while not (self.cache.path(key, fingerprint) / MANIFEST).is_file():
            rec = self.check_leader()
            if rec.get("state") == "done":
                raise MachineError(f"machine {self.rank}: the leader finished without committing stage {key}")
            time.sleep(min(1.0, _heartbeat_interval(self.launch)))
