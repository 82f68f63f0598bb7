"""What the stages that train through a TRL trainer share (grpo[p] / rloo[p] in `stages/group_rl.py`, dpo[p] in
`stages/dpo.py`): exporting the policy at log-spaced points of the run, where `ppo_sample` finds it, and writing the
trainer's log.

An export is `exports/step_XXXXX/` (`pipeline.exports`), XXXXX counting the stage's own unit: an update of an RL arm
(a generation batch, several optimizer steps), an optimizer step of DPO.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.exports import export_policy


def export_callback(accelerator, tokenizer, out: Path, units: list[int], optimizer_steps_per_unit: int = 1):
    """A TrainerCallback that exports the policy after each of `units` (export points counted in units of
    `optimizer_steps_per_unit` optimizer steps): the schedule the stage's config gives (`export_steps`), the one
    `overopt plan` and the curves read too. Export 0, the initial policy, is the stage's own (`export_policy` before
    the trainer is built). When training begins, the trainer's own length must end the schedule: a trainer that counts
    its steps otherwise (a dataset of another size, a batch that does not divide) stops the run with the two counts
    instead of exporting on another grid than the config's."""
    from transformers import TrainerCallback

    class ExportAtSteps(TrainerCallback):
        def __init__(self):
            self.units = list(units)

        def on_train_begin(self, args, state, control, **kwargs):
            if state.max_steps != self.units[-1] * optimizer_steps_per_unit:
                raise RuntimeError(f"the trainer runs {state.max_steps} optimizer steps, but the config's export "
                                   f"schedule {self.units} × {optimizer_steps_per_unit} ends at "
                                   f"{self.units[-1] * optimizer_steps_per_unit}")

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
