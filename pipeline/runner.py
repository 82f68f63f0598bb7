"""The stage runner: fingerprints a DAG of stages, runs what is not cached, commits each artifact atomically.

A stage is a module with `VERSION` (bump it when its output would change) and `run(cfg, inputs, out)`: a typed config
section, a dict of upstream artifact directories by role, and an empty output directory. It knows nothing about the
cache. The runner decides what to run from fingerprints:

    fingerprint = sha256(stage name, key, VERSION, config section, upstream fingerprints)

so changing one stage's config re-runs exactly that stage and its descendants, and adding a parametrised stage
(a new proxy) leaves every existing fingerprint as it was.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel

from pipeline.cache import ArtifactCache
from pipeline.config import ConfigError
from pipeline.machines import MachineError

log = logging.getLogger("overopt")


@dataclass(frozen=True)
class StageNode:
    """One box of the DAG: `key` is unique (`train_proxy[bt]`), `stage` is the module name in `stages/`."""

    key: str
    stage: str
    config: BaseModel
    inputs: dict[str, str] = field(default_factory=dict)  # role -> upstream key
    launcher: Literal["inline", "accelerate"] = "inline"
    num_processes: int = 1  # ranks on each machine
    num_machines: int = 1  # machines its ranks spread over (launch.num_machines; 1 for a stage that stays on one)
    deepspeed_config: Path | None = None
    publish_to: Path | None = None  # copy the artifact here after the run (reports)
    external: tuple[str, ...] = ()  # local files/directories the stage reads (datasets, models): their signature counts

    @property
    def module(self):
        # a dotted name is a full module path (used by tests); a plain name lives in stages/
        return importlib.import_module(self.stage if "." in self.stage else f"stages.{self.stage}")


@dataclass
class PlannedStage:
    node: StageNode
    fingerprint: str
    status: str  # cached | stale | missing | corrupt
    detail: str = ""
    manifest: dict | None = None


def fingerprint_view(value):
    """A config as it counts for fingerprints: fields marked `json_schema_extra={"fingerprint": False}` (batch sizes
    of inference, which do not change a result) are left out, and so are fields marked `{"fingerprint":
    "unless_default"}` while they hold their default (an option added later leaves existing fingerprints as they
    were until it is used)."""
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            mode = (field.json_schema_extra or {}).get("fingerprint", True)
            if mode is False or (mode == "unless_default" and getattr(value, name) == field.default):
                continue
            out[name] = fingerprint_view(getattr(value, name))
        return out
    if isinstance(value, (list, tuple)):
        return [fingerprint_view(v) for v in value]
    if isinstance(value, dict):
        return {k: fingerprint_view(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def external_signature(path: str) -> list:
    """What identifies a local input without reading it whole: each file's relative name, size and mtime."""
    p = Path(path).expanduser()
    if p.is_file():
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns]]
    # hidden folders (.git, .cache/huggingface) change without the model changing
    files = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".")
                                                                       for part in f.relative_to(p).parts)) \
        if p.is_dir() else []
    return [[f.relative_to(p).as_posix(), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def is_data_parallel(node: StageNode) -> bool:
    """Whether the stage's module declares `DATA_PARALLEL = True`: it splits its work over however many ranks it is
    launched with (`pipeline.distributed.Ranks`) and writes the same artifact for any number."""
    return bool(getattr(node.module, "DATA_PARALLEL", False))


def fingerprint(node: StageNode, upstream: dict[str, str]) -> str:
    payload = {
        "stage": node.stage,
        "key": node.key,
        "version": str(getattr(node.module, "VERSION")),
        "config": fingerprint_view(node.config),
        "inputs": {role: upstream[k] for role, k in sorted(node.inputs.items())},
        # a data-parallel stage's artifact is the same for any number of ranks: the count is not part of it (the
        # pair it always had, so its fingerprints are those of before it could run on several)
        # and an RL stage's is its world size, however many machines it spreads over (`num_machines` 1: the pair of
        # before machines, so no fingerprint changed)
        "launcher": ["inline", 1] if is_data_parallel(node) else [node.launcher,
                                                                  node.num_processes * node.num_machines],
    }
    if node.external:
        payload["external"] = {path: external_signature(path) for path in node.external}
    if node.deepspeed_config is not None:  # the DeepSpeed settings change the result, not only its file name
        ds = _resolve_repo_path(node.deepspeed_config)
        if not ds.is_file():
            raise ConfigError(f"stage {node.key}: DeepSpeed config {node.deepspeed_config} not found")
        payload["deepspeed_config"] = hashlib.sha256(ds.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def toposort(nodes: list[StageNode]) -> list[StageNode]:
    by_key = {n.key: n for n in nodes}
    if len(by_key) != len(nodes):
        keys = [n.key for n in nodes]
        raise ValueError(f"duplicate stage keys in the DAG: {sorted({k for k in keys if keys.count(k) > 1})}")
    order, state = [], {}

    def visit(n: StageNode) -> None:
        if state.get(n.key) == "done":
            return
        if state.get(n.key) == "visiting":
            raise ValueError(f"cycle in the stage DAG at {n.key}")
        state[n.key] = "visiting"
        for up in n.inputs.values():
            if up not in by_key:
                raise ValueError(f"stage {n.key} needs {up}, which is not in the DAG")
            visit(by_key[up])
        state[n.key] = "done"
        order.append(n)

    for n in nodes:
        visit(n)
    return order


def _matches(node: StageNode, names: set[str]) -> bool:
    return node.key in names or node.stage in names


# The longest name the cache makes from a stage key: `.partial/<key>.<fingerprint>.aside-<time>-<id>.why` when a
# partial output is set aside (key + 48 bytes); the longest a file system allows for one name is 255 bytes.
NAME_MAX = 255
_CACHE_NAME_OVERHEAD = 48


def check_key_lengths(nodes: list[StageNode]) -> None:
    """Raise ConfigError for a stage key (a proxy or run name inside it) too long to name the cache's folders."""
    longest = max(nodes, key=lambda n: len(n.key.encode()), default=None)
    if longest is not None and len(longest.key.encode()) + _CACHE_NAME_OVERHEAD > NAME_MAX:
        key = longest.key
        # `ppo_sample[name@seed1]`: the bracketed part is a proxy (or run) name from the config's `proxies:`
        name = key[key.index("[") + 1:-1].split("@")[0] if "[" in key else None
        where = f"proxies.{name[:40]}... (a {len(name)}-character proxy name)" if name else f"stage {key[:60]}..."
        raise ConfigError(
            f"{where}: stage {key[:40]}... has a key of {len(key.encode())} bytes, and the cache names folders after "
            f"it with up to {_CACHE_NAME_OVERHEAD} more, over the file system's {NAME_MAX}-byte limit for a name; "
            f"shorten the proxy name (stage keys may be at most {NAME_MAX - _CACHE_NAME_OVERHEAD} bytes)")


class Runner:
    def __init__(self, nodes: list[StageNode], cache: ArtifactCache):
        check_key_lengths(nodes)
        self.nodes = toposort(nodes)
        self.by_key = {n.key: n for n in self.nodes}
        self.cache = cache
        self.failed_stage: str | None = None  # key of the stage whose run raised (for the CLI's one-line error)
        self.selected: set[str] = set()  # keys the last `run` selected (all, or those `only` / `until` named)
        # over several machines (`pipeline.machines`): the leader's session, or this machine's part as a follower
        self.launch = None  # the study's launch section (LaunchConfig), for the deepspeed_hostfile launcher
        self.session = None
        self.follower = None

    def check_names(self, names: set[str]) -> None:
        known = {n.key for n in self.nodes} | {n.stage for n in self.nodes}
        unknown = sorted(names - known)
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages of this study: {sorted(known)}")

    def fingerprints(self) -> dict[str, str]:
        fps: dict[str, str] = {}
        for n in self.nodes:  # topological order: upstream fingerprints are known
            fps[n.key] = fingerprint(n, fps)
        return fps

    def plan(self) -> list[PlannedStage]:
        planned = []
        fps = self.fingerprints()
        for n in self.nodes:
            fp = fps[n.key]
            state = self.cache.check(n.key, fp)
            status = state.status
            if status == "missing" and (self.cache.root / n.key).exists():
                status = "stale"  # an artifact exists for another fingerprint (config or code changed)
            planned.append(PlannedStage(n, fp, status, state.detail, state.manifest))
        return planned

    def ancestors(self, keys: set[str]) -> set[str]:
        out, stack = set(), list(keys)
        while stack:
            k = stack.pop()
            if k not in out:
                out.add(k)
                stack.extend(self.by_key[k].inputs.values())
        return out

    def run(self, only: set[str] = frozenset(), until: set[str] = frozenset(),
            force: set[str] = frozenset()) -> list[PlannedStage]:
        """Run the DAG (or the part selected by `only` / `until`); return the plan with final states."""
        self.check_names(set(only) | set(until) | set(force))
        if self.follower is None:  # a follower writes nothing of its own in the cache
            self.cache.claim()
        plan = self.plan()
        selected = {p.node.key for p in plan}
        if until:
            selected = self.ancestors({n.key for n in self.nodes if _matches(n, set(until))})
        if only:
            selected = {n.key for n in self.nodes if _matches(n, set(only))}
        self.selected = selected
        fps = {p.node.key: p.fingerprint for p in plan}
        state = {p.node.key: p.status for p in plan}  # checked once by plan(); updated as stages commit
        for p in plan:
            n = p.node
            if n.key not in selected:
                continue
            rerun = _matches(n, set(force))
            if self.follower is not None:
                if self._follow(n, p.fingerprint, rerun):
                    p.status, state[n.key] = "cached", "cached"
                continue
            if p.status == "cached" and not rerun:
                log.info("✓ %-28s cached  %s", n.key, p.fingerprint)
                self._publish(n, p.fingerprint)
                continue
            if p.status == "corrupt":
                log.warning("! %-28s cached artifact is corrupt (%s): recomputing it", n.key, p.detail)
            for role, up in n.inputs.items():
                if state[up] != "cached":
                    raise RuntimeError(f"stage {n.key} needs {up} ({role}), which is not cached; "
                                       f"run without --only to build it")
            inputs = {role: self.cache.path(up, fps[up]) for role, up in n.inputs.items()}
            log.info("▶ %-28s running (%s)", n.key, p.fingerprint)
            try:
                manifest = self._execute(n, p.fingerprint, inputs, fresh=rerun)
            except BaseException:
                self.failed_stage = n.key
                raise
            log.info("✓ %-28s done in %.1fs", n.key, manifest["wall_time_s"])
            p.status, p.manifest = "cached", manifest
            state[n.key] = "cached"
            self._publish(n, p.fingerprint)
        return plan

    def _follow(self, node: StageNode, fp: str, forced: bool) -> bool:
        """A follower's part in one stage: its ranks of a stage spread over the machines (the leader runs the rest).
        True when the stage is committed."""
        if node.launcher != "accelerate" or node.num_machines <= 1:
            log.info("· %-28s on the leader", node.key)
            return False
        job = self.follower.wait_for_job(node.key, fp, forced)
        if job is None:
            log.info("✓ %-28s cached  %s", node.key, fp)
            return True
        log.info("▶ %-28s this machine's ranks (%s)", node.key, fp)
        job_dir, rendezvous = job
        try:
            run_job(node, job_dir, MachineArgs.of(self.follower.launch, rendezvous), watch=self.follower.check_leader)
        except BaseException as e:
            self.failed_stage = node.key
            if not isinstance(e, MachineError):
                self.follower.fail(f"stage {node.key}: {e}")
            raise
        self.follower.wait_for_commit(node.key, fp)
        log.info("✓ %-28s committed by the leader", node.key)
        return True

    def _execute(self, node: StageNode, fp: str, inputs: dict[str, Path], fresh: bool = False) -> dict:
        resumable = getattr(node.module, "RESUMABLE", False)
        scratch = tuple(getattr(node.module, "SCRATCH", ()))
        if resumable:
            manifest = self._prepare_partial(node, fp, fresh, scratch)
            if manifest is not None:
                return manifest
        with self.cache.staging(node.key, fp, resumable=resumable) as out:
            t0 = time.time()
            if node.launcher == "accelerate" and node.num_machines > 1 and self.session is not None:
                peaks = self._lead(node, fp, inputs, out)
            elif node.launcher == "accelerate":
                peaks = launch_stage(node, inputs, out, scratch_root=self.cache.tmp_root,
                                     machines=MachineArgs.hostfile_of(self.launch, node))
            else:
                peaks = _run_inline(node, inputs, out)
            wall = time.time() - t0
            record = {"stage": node.stage, "version": str(node.module.VERSION), "wall_time_s": round(wall, 3),
                      "config": node.config.model_dump(mode="json"),
                      "inputs": {r: str(p) for r, p in inputs.items()}}
            if peaks:
                record["peak_memory"] = peaks
            return self.cache.commit(node.key, fp, out, record, scratch=scratch)

    def _lead(self, node: StageNode, fp: str, inputs: dict[str, Path], out: Path) -> list[dict]:
        """The leader's launch of a stage spread over the machines: its job at the shared path the followers wait
        on, its own ranks as machine 0; the job folder is removed once every rank has finished."""
        job_dir, rendezvous = self.session.publish_job(node.key, fp)
        try:
            write_job(node, inputs, out, job_dir)
            self.session.announce(job_dir, rendezvous)
            return run_job(node, job_dir, MachineArgs.of(self.launch, rendezvous), watch=self.session.check_machines)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    def _prepare_partial(self, node: StageNode, fp: str, fresh: bool, scratch: tuple[str, ...]) -> dict | None:
        """Before a resumable stage runs: `--force` sets its partial output aside; a run killed inside the commit is
        finished (its manifest is returned); a partial output the stage's `resume_problem` finds unusable is set
        aside with a warning naming where it went, and the stage starts afresh."""
        if fresh:
            aside = self.cache.set_aside(node.key, fp, "set aside by --force")
            if aside is not None:
                log.warning("  %s: --force starts afresh; its partial output was moved to %s", node.key, aside)
            return None
        manifest = self.cache.finish_interrupted_commit(node.key, fp, scratch)
        if manifest is not None:
            log.info("  %s had finished; completed its interrupted commit", node.key)
            return manifest
        partial = self.cache.partial_path(node.key, fp)
        problem_of = getattr(node.module, "resume_problem", None)
        problem = problem_of(partial) if problem_of is not None and partial.is_dir() else None
        if problem:
            aside = self.cache.set_aside(node.key, fp, problem)
            log.warning("! %s cannot resume its partial output (%s): moved it to %s, starting afresh",
                        node.key, problem, aside)
        return None

    def _publish(self, node: StageNode, fp: str) -> None:
        if node.publish_to is None:
            return
        src = self.cache.path(node.key, fp)
        dst = Path(node.publish_to)
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.rglob("*"):
            if f.is_file() and f.name != "manifest.json":
                target = dst / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)


def _run_inline(node: StageNode, inputs: dict[str, Path], out: Path) -> list[dict]:
    """Run a stage in this process. On a GPU its peak allocated memory is measured (reset before the stage); on the
    CPU this long-lived process's peak resident memory says nothing about one stage, so none is recorded."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    node.module.run(node.config, inputs, out)
    return [peak_memory_record(0)] if cuda and torch.cuda.is_initialized() else []


# --------------------------------------------------------------------------------------------------------------
# multi-process stages


@dataclass(frozen=True)
class MachineArgs:
    """This machine's part in a launch whose ranks spread over several machines."""

    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int
    hostfile: Path | None = None  # deepspeed_hostfile: accelerate's pdsh launcher starts every host's ranks

    @classmethod
    def of(cls, launch, rendezvous: dict) -> MachineArgs:
        """From the study's launch section and the leader's rendezvous for the stage (`machines.LeaderSession`)."""
        return cls(launch.num_machines, launch.machine_rank, rendezvous["main_process_ip"],
                   int(rendezvous["main_process_port"]))

    @classmethod
    def hostfile_of(cls, launch, node: StageNode) -> MachineArgs | None:
        """Under launcher deepspeed_hostfile, a stage spread over the hostfile's hosts (None for any other): the
        rendezvous at launch.main_process_ip (default the first host), port launch.main_process_port (default
        29500, DeepSpeed's)."""
        if launch is None or launch.launcher != "deepspeed_hostfile" or node.num_machines <= 1:
            return None
        from pipeline.machines import read_hostfile

        hostfile = Path(launch.hostfile).expanduser().resolve()
        ip = launch.main_process_ip or read_hostfile(hostfile)[0][0]
        return cls(launch.num_machines, 0, ip, launch.main_process_port or 29500, hostfile)


def _accelerate_config(node: StageNode, cuda: bool, machines: MachineArgs | None = None) -> dict:
    """A complete `accelerate launch` config, so a user's `~/.cache/huggingface/accelerate/default_config.yaml`
    (written by `accelerate config`) cannot change how a stage is launched."""
    total = node.num_processes * (machines.num_machines if machines else 1)
    if node.deepspeed_config is not None:
        dist = "DEEPSPEED"
    elif total > 1:
        dist = "MULTI_GPU" if cuda else "MULTI_CPU"
    else:
        dist = "NO"
    precision = _mixed_precision(_resolve_repo_path(node.deepspeed_config)) if node.deepspeed_config else "no"
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": dist, "mixed_precision": precision,
              "use_cpu": not cuda, "num_processes": total, "num_machines": 1, "machine_rank": 0,
              "gpu_ids": "all", "rdzv_backend": "static", "same_network": True, "main_training_function": "main",
              "downcast_bf16": False, "debug": False, "enable_cpu_affinity": False}
    if machines is not None:
        config |= {"num_machines": machines.num_machines, "machine_rank": machines.machine_rank,
                   "main_process_ip": machines.main_process_ip, "main_process_port": machines.main_process_port}
    return config


_REPO_ROOT = Path(__file__).resolve().parent.parent


def _resolve_repo_path(p: Path) -> Path:
    """A relative path (`configs/deepspeed/zero2.json`) from the working directory, else from the repository root."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p.resolve()
    alt = _REPO_ROOT / p
    return alt.resolve() if alt.exists() else p.resolve()



def _visible_cuda_devices() -> int:
    """GPUs the launched ranks will see (0 when CUDA_VISIBLE_DEVICES hides them all, even after CUDA was initialised
    in this process)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


def _mixed_precision(ds_config: Path | None) -> str:
    """accelerate's --mixed_precision to match a DeepSpeed config that enables bf16 or fp16 (else "no")."""
    if ds_config is None:
        return "no"
    ds = json.loads(Path(ds_config).read_text())
    for kind in ("bf16", "fp16"):
        if ds.get(kind, {}).get("enabled") is True:
            return kind
    return "no"


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; a no-op elsewhere).

    Set in the launcher (`accelerate launch`) and again in every rank: torch's elastic agent starts ranks in sessions
    of their own, so killing `overopt run` would otherwise leave them training on — and writing into the resumable
    output that the next run resumes from.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def launch_stage(node: StageNode, inputs: dict[str, Path], out: Path, scratch_root: Path | None = None,
                 machines: MachineArgs | None = None) -> list[dict]:
    """Run `stages.<stage>.run` under `accelerate launch` (+ DeepSpeed config); raise if any rank fails, else return
    the ranks' peak memory (`peak_memory_record`).

    Every rank runs `python -m pipeline.stage_main JOBFILE`. The job folder is made under `scratch_root` (the cache's
    `.tmp/`, which the next run sweeps, so a killed launch leaves nothing behind elsewhere). A rank that fails writes
    its error there; the exception raised here carries the first one. `machines`: the deepspeed_hostfile launch of a
    stage over several hosts (a stage spread over machines that each run `overopt run` goes through the Runner's
    leader session instead).
    """
    if scratch_root is not None:
        Path(scratch_root).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"overopt-launch-{node.key}-", dir=scratch_root) as tmp:
        write_job(node, inputs, out, Path(tmp))
        return run_job(node, Path(tmp), machines)


def write_job(node: StageNode, inputs: dict[str, Path], out: Path, job_dir: Path) -> Path:
    """The job file every rank of the stage reads (`pipeline.stage_main`), in `job_dir`."""
    job = {"stage": node.stage, "config_class": f"{type(node.config).__module__}.{type(node.config).__qualname__}",
           "config": node.config.model_dump(mode="json"), "inputs": {r: str(p) for r, p in inputs.items()},
           "out": str(Path(out).resolve())}
    job_file = Path(job_dir) / "job.json"
    job_file.write_text(json.dumps(job))
    return job_file


def launch_command(node: StageNode, job_dir: Path, cuda: bool, machines: MachineArgs | None = None) -> list[str]:
    """The `accelerate launch` command line of this machine's ranks of a stage whose job is in `job_dir` (its
    accelerate config is written there too). `--num_processes` is accelerate's: the total over the machines.

    One machine: the rendezvous port is a free one picked by accelerate (`--main_process_port 0`), so concurrent
    launches do not collide; set MASTER_PORT to force one. Several (`machines`): `--num_machines`, this machine's
    `--machine_rank` and the leader's address; a DeepSpeed stage names its multi-node launcher: `standard`
    (torch.distributed.run on each machine, started by that machine's `overopt run`) or `pdsh` with the hostfile
    (DeepSpeed's launcher starts every host's ranks from this one)."""
    ds_config = None
    if node.deepspeed_config is not None:
        ds_config = _resolve_repo_path(node.deepspeed_config)
        if not ds_config.is_file():
            raise FileNotFoundError(f"stage {node.key}: DeepSpeed config {node.deepspeed_config} not found")
    rank = machines.machine_rank if machines else 0
    acc_file = Path(job_dir) / f"accelerate_machine{rank}.json"
    acc_file.write_text(json.dumps(_accelerate_config(node, cuda, machines)))
    total = node.num_processes * (machines.num_machines if machines else 1)
    port = str(machines.main_process_port) if machines else os.environ.get("MASTER_PORT", "0")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acc_file),
           "--num_processes", str(total), "--num_machines", str(machines.num_machines if machines else 1),
           "--mixed_precision", _mixed_precision(ds_config),
           "--dynamo_backend", "no", "--main_process_port", port]
    if machines is not None:
        cmd += ["--machine_rank", str(machines.machine_rank), "--main_process_ip", str(machines.main_process_ip)]
    if ds_config is not None:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ds_config)]
        if machines is not None and machines.hostfile is not None:
            cmd += ["--deepspeed_multinode_launcher", "pdsh", "--deepspeed_hostfile", str(machines.hostfile)]
        elif machines is not None:
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    elif not cuda and total > 1:
        # `--cpu` would take accelerate's simple launcher, which starts ONE process whatever --num_processes
        # says; `--multi_gpu` takes torch.distributed.run, which starts them all (gloo on CPU, see below)
        cmd += ["--multi_gpu"]
    elif not cuda:
        cmd += ["--cpu"]
    return cmd + ["-m", "pipeline.stage_main", str(Path(job_dir) / "job.json")]


def run_job(node: StageNode, job_dir: Path, machines: MachineArgs | None = None,
            watch: Callable[[], object] | None = None) -> list[dict]:
    """Launch this machine's ranks of the stage whose job file is in `job_dir` and wait for them; raise if any rank
    fails, else return the peak memory of the ranks that left it in `job_dir`. `watch` is called every second while
    they run: an exception from it (the other machines failed) stops the launch and is raised."""
    gpus = _visible_cuda_devices()
    if 0 < gpus < node.num_processes:
        raise RuntimeError(f"stage {node.key} needs {node.num_processes} processes, one per GPU, but {gpus} GPU(s) "
                           f"are visible; lower num_processes or set CUDA_VISIBLE_DEVICES='' to run it on CPU")
    cuda = gpus > 0
    cmd = launch_command(node, job_dir, cuda, machines)
    env = dict(os.environ)
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        if node.deepspeed_config is None:  # accelerate's state in the ranks: MULTI_CPU with a gloo process group
            env["ACCELERATE_USE_CPU"] = "true"
    # `pipeline` and `stages` importable on every rank whatever the working directory.
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # accelerate's pdsh launch writes `.deepspeed_env` (the environment for the other hosts) into its working folder
    # and DeepSpeed's runner starts every host's ranks there: the job folder, on the filesystem every host shares
    cwd = None
    if machines is not None and machines.hostfile is not None:
        cwd = job_dir
        # accelerate runs DeepSpeed's `deepspeed` command: the one beside this interpreter, venv activated or not
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    log.info("  launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, preexec_fn=die_with_parent)
    try:
        while proc.poll() is None:
            if watch is not None:
                watch()
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    except BaseException:
        proc.kill()  # the ranks die with it (die_with_parent)
        proc.wait()
        raise
    if proc.returncode != 0:
        if watch is not None:
            watch()  # another machine's failure first: it is usually the cause
        first = first_rank_error(Path(job_dir))
        message = f"stage {node.key} failed under accelerate launch (exit code {proc.returncode})"
        if first is not None:
            rank, line, trace = first
            log.error("rank %s of stage %s failed:\n%s", rank, node.key, trace, extra={"file_only": True})
            message += f": rank {rank}: {line}"
        else:  # killed by a signal (a native abort, the OOM killer): a rank so killed leaves no error
            total = node.num_processes * (machines.num_machines if machines else 1)
            by_phase: dict[str, list[int]] = {}
            for r, phase in rank_phases(Path(job_dir), total).items():
                by_phase.setdefault(phase, []).append(r)
            message += (": no rank left an error from its stage (a rank killed by a signal leaves none; one that "
                        "died after 'finished' died at interpreter exit); where the ranks had got to: "
                        + "; ".join(f"{'rank' if len(rs) == 1 else 'ranks'} {', '.join(map(str, rs))} {phase}"
                                    for phase, rs in by_phase.items()))
        raise RuntimeError(message)
    return rank_peak_memory(Path(job_dir))


RANK_ERROR = "error_rank{rank}.txt"  # written by pipeline.stage_main beside the job file when a rank's stage raises
PEAK_MEMORY = "peak_memory_rank{rank}.json"  # written by pipeline.stage_main beside the job file when a rank succeeds
RANK_PHASE = "phase_rank{rank}.txt"  # written by pipeline.stage_main beside the job file as a rank moves on
# the phases a rank passes through (pipeline.stage_main), in order; a rank that dies natively stops at one of them
PHASES = ("starting", "running the stage", "closing the process group", "finished")


def peak_memory_record(rank: int) -> dict:
    """This process's peak memory as a stage's manifest records it: on a GPU the peak of tensors allocated on it
    (`torch.cuda.max_memory_allocated`), else the process's peak resident memory."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        return {"rank": rank, "device": f"cuda:{device}", "peak_bytes": int(torch.cuda.max_memory_allocated(device))}
    from pipeline.distributed import peak_rss_bytes

    return {"rank": rank, "device": "cpu", "peak_bytes": peak_rss_bytes()}


def rank_peak_memory(job_dir: Path) -> list[dict]:
    """Every rank's `peak_memory_record`, in rank order, from the files the ranks left in `job_dir`."""
    records = [json.loads(f.read_text()) for f in job_dir.glob(PEAK_MEMORY.format(rank="*"))]
    return sorted(records, key=lambda r: r["rank"])


def rank_phases(job_dir: Path, world_size: int) -> dict[int, str]:
    """The last phase (`PHASES`) each of `world_size` ranks recorded in `job_dir`, "not started" for one that recorded
    none: where a rank that left no Python error died."""
    phases = {}
    for rank in range(world_size):
        try:
            phases[rank] = (job_dir / RANK_PHASE.format(rank=rank)).read_text().strip() or "not started"
        except OSError:
            phases[rank] = "not started"
    return phases


def first_rank_error(job_dir: Path) -> tuple[str, str, str] | None:
    """(rank, "ExceptionType: message" line, traceback) of the rank that failed first, from the error files in
    `job_dir`; None when no rank wrote one (killed, or failed before the stage started)."""
    files = sorted(job_dir.glob(RANK_ERROR.format(rank="*")), key=lambda f: (f.stat().st_mtime_ns, f.name))
    if not files:
        return None
    text = files[0].read_text(errors="replace")
    line, _, trace = text.partition("\n")
    return files[0].stem.removeprefix("error_rank"), line, trace
