"""The RL arms' exported policies: where each is written and how the samplers find them.

Every arm that trains a policy (ppo[p] in `stages/ppo.py`, grpo/rloo[p] in `stages/group_rl.py`, dpo[p] in
`stages/dpo.py`) saves its policy at the export points of its schedule as `exports/step_XXXXX/` in its artifact — a
plain HF causal LM with its tokenizer (`save_causal_lm`), XXXXX counting the arm's own unit (an update; an optimizer
step of DPO), step 0 the initial policy — and ppo_sample (each arm's `<arm>_sample` stage) reads them in step order.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.distributed import save_causal_lm

EXPORTS_DIR = "exports"


def export_dir(out: Path, step: int) -> Path:
    """The folder of export `step` in the artifact being written to `out`."""
    return Path(out) / EXPORTS_DIR / f"step_{step:05d}"


def export_step(export: Path) -> int:
    """The step an export folder holds (`step_00016` -> 16)."""
    return int(Path(export).name.split("_")[1])


def list_exports(artifact: Path) -> list[Path]:
    """An RL artifact's export folders, in step order."""
    return sorted((Path(artifact) / EXPORTS_DIR).glob("step_*"), key=export_step)


def export_policy(lm, accelerator, tokenizer, out: Path, step: int) -> None:
    """Save the (unwrapped) policy as export `step` of the stage writing to `out`; every rank joins (ZeRO-3 gathers)."""
    save_causal_lm(lm, accelerator, tokenizer, export_dir(out, step))
