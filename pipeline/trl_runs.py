"""What the stages that train through a TRL trainer share (grpo[p] / rloo[p] in `stages/group_rl.py`, dpo[p] in
`stages/dpo.py`): exporting the policy at log-spaced points of the run, where `ppo_sample` finds it, and writing the
trainer's log.

An export is `exports/step_XXXXX/` (a plain HF causal LM with its tokenizer, `save_causal_lm`), XXXXX counting the
stage's own unit: an update of an RL arm (a generation batch, several optimizer steps), an optimizer step of DPO.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import log_spaced_steps
from pipeline.distributed import save_causal_lm


def export_policy(lm, accelerator, tokenizer, out: Path, step: int) -> None:
    """Save the (unwrapped) policy as export `step` of the stage writing to `out`; every rank joins (ZeRO-3 gathers)."""
    save_causal_lm(lm, accelerator, tokenizer, Path(out) / "exports" / f"step_{step:05d}")


def export_callback(accelerator, tokenizer, out: Path, optimizer_steps_per_unit: int = 1,
                    units: list[int] | None = None):
    """A TrainerCallback that exports the policy after each of `units` (export points counted in units of
    `optimizer_steps_per_unit` optimizer steps). `units` None: 1, 2, 4, ..., last of the run, whose length is known
    once the trainer starts (`log_spaced_steps` of its max_steps). Export 0, the initial policy, is the stage's own
    (`export_policy` before the trainer is built). The callback's `units` are the export points after training."""
    from transformers import TrainerCallback

    class ExportAtSteps(TrainerCallback):
        def __init__(self):
            self.units = units

        def on_train_begin(self, args, state, control, **kwargs):
            if self.units is None:
                self.units = log_spaced_steps(state.max_steps // optimizer_steps_per_unit)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            unit, rest = divmod(state.global_step, optimizer_steps_per_unit)
            if rest == 0 and unit in self.units and unit > 0:
                export_policy(accelerator.unwrap_model(model), accelerator, tokenizer, out, unit)

    return ExportAtSteps()


def write_log_history(trainer, path: Path) -> None:
    """The trainer's log of every optimizer step (one JSON object a line; the end-of-training summary row left out)."""
    with open(path, "w") as f:
        for row in trainer.state.log_history:
            if "step" in row and "train_runtime" not in row:
                f.write(json.dumps({k: (float(v) if isinstance(v, (int, float)) else v) for k, v in row.items()})
                        + "\n")
