"""Trainer checkpoints that appear whole: ``checkpoint-N`` is written under a staging name beside the others and
renamed into place once complete (ssm_hub.output_folder), so an interrupted save leaves the earlier checkpoints and
no half-written one that a resume (Trainer's search for ``checkpoint-*``) or ``from_pretrained`` would pick up.

    class RecipeTrainer(StagedCheckpoints, Trainer): ...

transformers' Trainer (5.25) writes a checkpoint in ``_save_checkpoint``: the model, then the optimizer, scheduler,
scaler, the RNG states (one file per process) and ``trainer_state.json``, straight into ``checkpoint-N`` under the
folder that ``_get_output_dir`` names; callbacks' ``on_save`` runs only after it, too late to choose where it goes.
So this mixin wraps ``_save_checkpoint``, during which ``_get_output_dir`` names the staging folder: every process
writes its part there, and once all have, the saving process renames the checkpoint into place. What Trainer did
with the staging path is then done with the real one: ``best_model_checkpoint`` points at it, it is pushed to the
Hub (``push_to_hub``), and older checkpoints are rotated out (``save_total_limit``).
"""

import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ssm_hub.output_folder import STAGING_PREFIX, move_into_place


class StagedCheckpoints:
    """Mixin for a transformers ``Trainer`` subclass, before Trainer in the bases (module docstring)."""

    _staging_folder: str | None = None  # what _get_output_dir names while a checkpoint is written

    def _get_output_dir(self, trial) -> str:
        return self._staging_folder or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"  # the same name in every process, which all write there
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # what an interrupted save of this step left
        self.accelerator.wait_for_everyone()
        push = self.args.push_to_hub  # pushed from where the checkpoint ends up, not from the staging folder
        self._staging_folder, self.args.push_to_hub = str(staging), False
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:  # Ctrl-C or a failure: the half-written checkpoint goes, the earlier ones stay
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging_folder, self.args.push_to_hub = None, push
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        checkpoint = run_dir / name
        staged_best = self.state.best_model_checkpoint == str(staging / name)
        if staged_best:
            self.state.best_model_checkpoint = str(checkpoint)
        if not self.args.should_save:
            return
        if staged_best:  # the state saved in the checkpoint must name it where it will be
            self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
        move_into_place(staging, run_dir)
        if push:
            self._push_from_checkpoint(str(checkpoint))
        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
