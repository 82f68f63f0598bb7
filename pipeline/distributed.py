"""What every multi-process stage shares: the Accelerator set-up (DeepSpeed ZeRO on CPU or GPU), sums over ranks,
loading frozen models outside ZeRO-3's partitioning, gathering ZeRO-3 parameters for generation, saving a trained
policy, the memory a rank holds, the atomic checkpoints of resumable stages, and the ranks of data-parallel stages
(`Ranks`).

Stages launched by `pipeline.runner.launch_stage` (`accelerate launch --use_deepspeed --deepspeed_config_file ...`)
call `make_accelerator()` first; launched without DeepSpeed (or run inline in one process) they get a plain
Accelerator and the same code runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pipeline.durable import fsync_tree, write_text_atomically


def launched_with_deepspeed() -> bool:
    """Whether this process is a rank that `accelerate launch --use_deepspeed` started."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _deepspeed_on_cpu() -> bool:
    return launched_with_deepspeed() and not torch.cuda.is_available()


def _process_group_kwargs() -> list:
    """Without CUDA, name the process-group backend (DeepSpeed's CPU accelerator: gloo, or ccl with oneCCL).

    accelerate 1.15 only picks a backend for CPU when `cpu=True`, and `cpu=True` turns DeepSpeed off; with no backend
    it sets `num_processes = 1` on every rank (each believes it is the main process, the dataloader is not sharded)
    while DeepSpeed itself sees the real world size and rejects the batch sizes accelerate filled in.
    """
    if not _deepspeed_on_cpu():
        return []
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.accelerator import get_accelerator

    return [InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name())]


def skip_deepspeed_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory allreduce extension on every rank.

    At each process-group start DeepSpeed's CPU accelerator JIT-compiles `deepspeed_shm_comm` with ninja unless
    ~/.cache/torch_extensions holds a build for this very venv: ~30 s on 2 cores, on a fresh machine or after
    switching venvs, while the other ranks wait on the build's lock. The op serves only `inference_all_reduce`
    (tensor-parallel inference), which no stage calls; training's collectives go through torch.distributed (gloo)
    with or without it, so marking it incompatible (DeepSpeed keeps that dict for such edits) changes no result.
    A no-op under CUDA, where DeepSpeed has no such op.
    """
    if not _deepspeed_on_cpu():
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    # a speed-up only: a DeepSpeed without the dict just builds the op
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict) and get_accelerator().create_op_builder("ShareMemCommBuilder") is not None:
        compatible["deepspeed_shm_comm"] = False


def make_accelerator(require_deepspeed: bool = False, gradient_clipping: float | None = None,
                     micro_batch_size: int | None = None, log_with: list[str] | None = None,
                     project_dir: str | None = None):
    """The Accelerator of a stage's rank, with a consistency check of the world size.

    `gradient_clipping` and `micro_batch_size` fill the DeepSpeed config's "auto" values for loops that do not hand
    accelerate a dataloader (PPO builds its minibatches itself). `log_with` (tensorboard, wandb) turns on
    accelerate's experiment trackers, writing under `project_dir`.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    # DeepSpeed 0.19 calls torch.distributed.{all_gather_into_tensor,reduce_scatter_tensor}, deprecated in torch 2.13:
    # one FutureWarning per call per rank drowns the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    accelerator = Accelerator(kwargs_handlers=_process_group_kwargs(), log_with=log_with or None,
                              project_dir=project_dir)
    is_ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    if require_deepspeed and not is_ds:
        raise RuntimeError(f"this stage must run under DeepSpeed (launch with a deepspeed_config); "
                           f"got {accelerator.distributed_type}")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if accelerator.num_processes != world or world != int(os.environ.get("WORLD_SIZE", "1")):
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} process(es), torch.distributed {world}, "
                           f"the launcher {os.environ.get('WORLD_SIZE')}")
    if is_ds:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        if micro_batch_size is not None and ds.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            if ds.get("gradient_accumulation_steps") in (None, "auto"):
                ds["gradient_accumulation_steps"] = 1
            ds["train_micro_batch_size_per_gpu"] = micro_batch_size
            ds["train_batch_size"] = micro_batch_size * world * int(ds["gradient_accumulation_steps"])
        if gradient_clipping is not None and ds.get("gradient_clipping") in (None, "auto"):
            ds["gradient_clipping"] = gradient_clipping
    return accelerator


def uses_deepspeed(accelerator) -> bool:
    """Whether the stage's model is a DeepSpeed engine (which clips, steps and checkpoints itself)."""
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def zero_stage(accelerator) -> int:
    """The ZeRO stage in use (0 without DeepSpeed)."""
    return int(accelerator.state.deepspeed_plugin.zero_stage) if uses_deepspeed(accelerator) else 0


def all_reduce_sum(accelerator):
    """A function summing a tensor over ranks (the identity in one process), for `pipeline.ppo.core`."""
    if accelerator.num_processes == 1:
        return lambda x: x
    return lambda x: accelerator.reduce(x.clone(), reduction="sum")


@contextmanager
def frozen_model_loading(accelerator) -> Iterator[None]:
    """Load models that do not train (reference policy, reward model) whole on every rank: under ZeRO-3,
    transformers would otherwise partition them at construction (it checks a global DeepSpeed config that accelerate
    registers), and only a DeepSpeed engine can run partitioned weights."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    # accelerate 1.15's `zero3_init_context_manager(enable=False)` re-registers the same config, so do it by hand
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


@contextmanager
def gathered_for_generation(engine, accelerator) -> Iterator[torch.nn.Module]:
    """The trained module, whole, for `generate`.

    Under ZeRO-3 each rank holds a shard of every parameter and per-module hooks gather and release them on every
    forward — for token-by-token generation, once per token. Instead, gather every parameter once for the whole
    rollout and lift the hooks meanwhile (they would release the gathered weights after the first forward).
    """
    module = accelerator.unwrap_model(engine)
    if zero_stage(accelerator) != 3:
        yield module
        return
    import deepspeed

    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield module
        finally:
            offload.setup_zero_stage3_hooks()


def save_causal_lm(lm, accelerator, tokenizer, directory) -> None:
    """A trained policy as a plain HF causal LM directory (LoRA deltas merged, safetensors) with its tokenizer.

    `lm` is the unwrapped policy (a transformers model, or a peft model around one). Under ZeRO-3 its shards are
    gathered first — a collective every rank joins; rank 0 writes.
    """
    from contextlib import nullcontext

    from pipeline.models import merged_state_dict

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    if zero_stage(accelerator) == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(lm.parameters()))
    else:
        gathered = nullcontext()
    with gathered:
        if accelerator.is_main_process:
            state = {k: v.detach().cpu().clone() for k, v in merged_state_dict(base).items()}
            base.save_pretrained(directory, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(directory)
    accelerator.wait_for_everyone()


def state_bytes(model, optimizer) -> dict[str, int]:
    """Bytes this rank holds for the trained parameters and the optimizer (master copies and moment estimates),
    counting each storage once: under ZeRO-3 a parameter's local shard, under ZeRO-1/2 the full parameter plus this
    rank's partition of the fp32 master copy and Adam state, without DeepSpeed everything."""
    seen: set[tuple[int, int]] = set()

    def add(t: torch.Tensor) -> int:
        key = (t.data_ptr(), t.numel())
        if key in seen or t.numel() == 0:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    params = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)  # ZeRO-3: the shard this rank owns
        params += add(local if local is not None else p.data)
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's AdamW
        inner = inner.optimizer
    master = sum(add(p.data) for group in inner.param_groups for p in group["params"])
    moments = sum(add(v) for state in inner.state.values() for v in state.values() if torch.is_tensor(v))
    return {"parameters": params, "master_copies": master, "optimizer_state": moments,
            "total": params + master + moments}


MEMORY_COLUMNS = ["parameter_bytes", "master_copy_bytes", "optimizer_state_bytes", "parameter_and_optimizer_bytes",
                  "peak_rss_bytes"]


def memory_per_rank(model, optimizer, accelerator) -> list[dict[str, int]]:
    """What every rank holds (ZeRO's point): its `state_bytes` and peak resident memory, one dict per rank
    (`MEMORY_COLUMNS`), gathered by a sum over ranks — a collective every rank joins."""
    held = state_bytes(model, optimizer)
    mine = torch.zeros(accelerator.num_processes, len(MEMORY_COLUMNS), dtype=torch.float64, device=accelerator.device)
    mine[accelerator.process_index] = torch.tensor(
        [held["parameters"], held["master_copies"], held["optimizer_state"], held["total"], peak_rss_bytes()],
        dtype=torch.float64)
    table = all_reduce_sum(accelerator)(mine)
    return [dict(zip(MEMORY_COLUMNS, map(int, row))) for row in table.tolist()]


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------- data parallelism


@dataclass(frozen=True)
class Ranks:
    """The ranks of a data-parallel stage (`DATA_PARALLEL = True` in its module) as this process sees them: which
    share of the work is its own, and the few collectives the stages need. One process (run inline) is `Ranks()`,
    whose collectives return at once.

    A data-parallel stage splits work into units fixed by its config alone (shards of prompts, scoring batches), each
    with a random stream of its own (seed, unit), so any number of ranks computes every unit exactly as one process
    would: the artifact is the same bytes for 1, 2 or k ranks on CPU.
    """

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes the files every rank computed a share of."""
        return self.rank == 0

    def mine(self, units: list) -> list:
        """This rank's share of `units`: every world-th, starting at its rank (round robin: neighbouring units,
        e.g. length-sorted batches, spread over the ranks)."""
        return units[self.rank::self.world]

    def gather_mine(self, values: list) -> list:
        """The whole list whose `mine` share this rank holds as `values`: every rank's share, interleaved back, on
        every rank."""
        shares = self.gather(values)
        whole = [None] * sum(len(share) for share in shares)
        for rank, share in enumerate(shares):
            whole[rank::self.world] = share
        return whole

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a picklable object)."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def trainer_precision(accelerator) -> dict[str, bool]:
    """The Hugging Face Trainer's (and TRL's) bf16/fp16 flags for a run under `accelerator`: what `launch_stage` gave
    accelerate from the DeepSpeed config, which the Trainer checks its own flags against; both off without one."""
    precision = getattr(accelerator, "mixed_precision", "no") if accelerator is not None else "no"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def data_parallel_ranks() -> Ranks:
    """This process's `Ranks`: under a launcher (WORLD_SIZE > 1) the process group is set up through accelerate (gloo
    on CPU, NCCL with this rank's GPU), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    if not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())


# ------------------------------------------------------------------------------------------------------ checkpoints

RESUME_DIR = "resume"  # a resumable RL stage's checkpoints: scratch, never part of its artifact
_STEP_DIR = re.compile(r"step_\d{5,}")


class ResumeError(RuntimeError):
    """A killed run's checkpoint cannot be resumed (damaged, incomplete, or of an older layout)."""


def checkpoint_problem(out: Path) -> str | None:
    """Why the checkpoint under `out/resume/` cannot be resumed, or None (sound, or none there: a fresh start).

    Reads only small JSON files and file sizes, so the runner calls it before launching a stage: a partial output
    that cannot be resumed is moved aside instead of failing every later run.
    """
    out = Path(out)
    if (out / "checkpoint").exists():
        return "a checkpoint/ folder of an older overopt layout, which this version does not resume"
    pointer = out / RESUME_DIR / "latest.json"
    if not pointer.exists():
        return None
    try:
        latest = json.loads(pointer.read_text())
        name, step = latest["dir"], int(latest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{pointer} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(name, str) or not _STEP_DIR.fullmatch(name):
        return f"{pointer} names no checkpoint folder (dir: {name!r})"
    d = out / RESUME_DIR / name
    try:
        files = json.loads((d / "files.json").read_text())
        for rel, size in files.items():
            f = d / rel
            if not f.is_file():
                return f"checkpoint {d} lacks {rel}"
            if f.stat().st_size != size:
                return f"checkpoint {d}: {rel} has {f.stat().st_size} bytes, {size} when it was written"
        if json.loads((d / "state.json").read_text())["step"] != step:
            return f"checkpoint {d}: state.json is not of update {step}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"checkpoint {d} is incomplete ({type(e).__name__}: {e})"
    return None


class Checkpointer:
    """A resumable stage's checkpoints under `out/resume/`, each replaced atomically.

    A save writes `step_N.tmp/` (every rank its part: under DeepSpeed the engine's partitioned model and optimizer
    states, else the module as safetensors and the optimizer state as a `torch.save` file read back with
    `weights_only=True`; each rank's RNG), then rank 0 adds `state.json` and `files.json` (every file's size), fsyncs,
    renames it to `step_N/` and points `latest.json` at it (write, fsync, rename). Only then is the previous checkpoint
    removed. A kill at any moment leaves `latest.json` naming a complete checkpoint, or no `latest.json` at all.
    """

    def __init__(self, out: Path, accelerator, model, optimizer):
        self.root = Path(out) / RESUME_DIR
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.deepspeed = uses_deepspeed(accelerator)
        self.rank = accelerator.process_index

    def _optimizer(self):
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def save(self, state: dict) -> None:
        """Checkpoint the engine, optimizer and every rank's RNG with `state` (JSON; must hold "step")."""
        from safetensors.torch import save_file, save_model

        acc = self.accelerator
        name = f"step_{state['step']:05d}"
        tmp, final = self.root / f"{name}.tmp", self.root / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if self.deepspeed:
            self.model.save_checkpoint(str(tmp / "engine"), tag="ckpt")  # a collective: every rank
        elif acc.is_main_process:
            save_model(acc.unwrap_model(self.model), str(tmp / "model.safetensors"))
            torch.save(self._optimizer().state_dict(), tmp / "optimizer.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / f"rng_rank{self.rank}.safetensors"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "state.json").write_text(json.dumps(state))
            sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / "files.json").write_text(json.dumps(sizes))
            fsync_tree(tmp)
            if final.exists():  # left by a save whose pointer update was killed: latest.json names an older one
                shutil.rmtree(final)
            os.rename(tmp, final)
            write_text_atomically(self.root / "latest.json", json.dumps({"step": state["step"], "dir": name}))
            for old in self.root.iterdir():
                if old.is_dir() and old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load(self) -> dict | None:
        """Restore the latest checkpoint into the engine, optimizer and this rank's RNG; return its state, or None
        when there is none. Raises ResumeError naming what is wrong with a damaged one."""
        from safetensors.torch import load_file, load_model

        out = self.root.parent
        problem = checkpoint_problem(out)
        if problem:
            raise ResumeError(f"cannot resume from {out}: {problem}; remove the folder to start afresh")
        pointer = self.root / "latest.json"
        if not pointer.exists():
            return None
        d = self.root / json.loads(pointer.read_text())["dir"]
        if self.deepspeed:
            # DeepSpeed's own checkpoint format (its loader unpickles its optimizer states: files this stage wrote)
            self.model.load_checkpoint(str(d / "engine"), tag="ckpt")
        else:
            load_model(self.accelerator.unwrap_model(self.model), str(d / "model.safetensors"))
            self._optimizer().load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
        rng = load_file(str(d / f"rng_rank{self.rank}.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return json.loads((d / "state.json").read_text())

    def clear(self) -> None:
        """Forget every checkpoint (a fresh start); rank 0 only."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)
