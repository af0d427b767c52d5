"""Trainer checkpoints that appear whole and hold no pickle, as two mixins for a transformers ``Trainer`` subclass:

    class RecipeTrainer(StagedCheckpoints, CheckpointsWithoutPickle, Trainer): ...

**Whole** (:class:`StagedCheckpoints`): ``checkpoint-N`` is written under a staging name beside the others and
renamed into place once complete (ssm_hub.output_folder), so an interrupted save leaves the earlier checkpoints and
no half-written one that a resume (Trainer's search for ``checkpoint-*``) or ``from_pretrained`` would pick up.

transformers' Trainer (5.25) writes a checkpoint in ``_save_checkpoint``: the model, then the optimizer, scheduler,
scaler, the RNG states (one file per process) and ``trainer_state.json``, straight into ``checkpoint-N`` under the
folder that ``_get_output_dir`` names; callbacks' ``on_save`` runs only after it, too late to choose where it goes.
So StagedCheckpoints wraps ``_save_checkpoint``, during which ``_get_output_dir`` names the staging folder: every
process writes its part there, and once all have, the saving process renames the checkpoint into place. What
Trainer did with the staging path is then done with the real one: ``best_model_checkpoint`` points at it, it is
pushed to the Hub (``push_to_hub``), and older checkpoints are rotated out (``save_total_limit``).

**Without pickle** (:class:`CheckpointsWithoutPickle`): Trainer (5.25) saves the optimizer, the learning-rate
scheduler, the gradient scaler and the random generators with ``torch.save`` (optimizer.pt, scheduler.pt, scaler.pt,
rng_state.pth) and the training arguments in training_args.bin, all pickles, which a resume unpickles; ssm_hub reads
no pickle. The mixin overrides the hooks that write and read them (``_save_optimizer_and_scheduler``,
``_save_scaler``, ``_save_rng_state``, ``_load_optimizer_and_scheduler``, ``_load_scaler``, ``_load_rng_state``) to
write each state as a safetensors file (ssm_hub.training.state_files) and read it back, and puts training_args.json
in place of training_args.bin. Resuming from a checkpoint that holds the pickled states (Trainer's, or an earlier
ssm_hub's) is refused, naming them. Under FSDP or DeepSpeed, whose engines write the sharded optimizer state
themselves (in their own formats), the optimizer and scheduler are left to Trainer.
"""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers.trainer import OPTIMIZER_NAME, SCALER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import set_rng_state_for_device
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.training_args import ParallelMode

from ssm_hub.output_folder import STAGING_PREFIX, move_into_place
from ssm_hub.training.state_files import load_state, save_state

OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.safetensors"
SCALER_FILE = "scaler.safetensors"
TRAINING_ARGUMENTS_FILE = "training_args.json"
PICKLED_RNG_STATES = "rng_state*.pth"
"""Trainer's pickles of the random generators' states, one per process under a launcher."""


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


def refuse_pickled_state(checkpoint: str | Path, patterns: tuple[str, ...]) -> None:
    """Raise ValueError, naming them, if ``checkpoint`` holds files that match ``patterns``: training states that
    Trainer pickled, which a resume would otherwise read (Trainer's own hooks) or silently leave out (these)."""
    pickled = sorted(path.name for pattern in patterns for path in Path(checkpoint).glob(pattern))
    if pickled:
        raise ValueError(f"{checkpoint} holds {', '.join(pickled)}, training state saved with pickle (by transformers' "
                         f"own Trainer or an earlier ssm_hub), which ssm_hub does not read: resume from a checkpoint "
                         f"that holds {OPTIMIZER_FILE}, or start the run again")


class CheckpointsWithoutPickle:
    """Mixin for a transformers ``Trainer`` subclass, before Trainer in the bases (module docstring)."""

    def _leaves_optimizer_to_engine(self) -> bool:
        return self.is_fsdp_enabled or self.is_deepspeed_enabled

    def _rng_file(self) -> str:
        """One file per process under a distributed launcher, as Trainer names its own."""
        if self.args.world_size <= 1:
            return "rng_state.safetensors"
        return f"rng_state_{self.args.process_index}.safetensors"

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._leaves_optimizer_to_engine():
            super()._save_optimizer_and_scheduler(output_dir)
        elif self.args.should_save:  # the optimizer state is the same in every process without sharding
            save_state(self.optimizer.state_dict(), Path(output_dir) / OPTIMIZER_FILE)
            save_state(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_FILE)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self._leaves_optimizer_to_engine():
            super()._load_optimizer_and_scheduler(checkpoint)
            return
        refuse_pickled_state(checkpoint, (OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME))
        optimizer, scheduler = Path(checkpoint) / OPTIMIZER_FILE, Path(checkpoint) / SCHEDULER_FILE
        if optimizer.is_file() and scheduler.is_file():  # absent from a checkpoint saved with save_only_model
            self.optimizer.load_state_dict(load_state(optimizer))  # it moves each state to its parameter's device
            self.lr_scheduler.load_state_dict(load_state(scheduler))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            save_state(scaler.state_dict(), Path(output_dir) / SCALER_FILE)

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and (Path(checkpoint) / SCALER_FILE).is_file():
            self.accelerator.scaler.load_state_dict(load_state(Path(checkpoint) / SCALER_FILE))

    def _save_rng_state(self, output_dir: str) -> None:
        states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            # Each process its own device's generator under a launcher; without one, every device's (DataParallel).
            states["cuda"] = (torch.cuda.random.get_rng_state_all() if self._distributed()
                              else torch.cuda.random.get_rng_state())
        os.makedirs(output_dir, exist_ok=True)  # a process may get here before the first one has saved the model
        save_state(states, Path(output_dir) / self._rng_file())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        refuse_pickled_state(checkpoint, (PICKLED_RNG_STATES,))
        path = Path(checkpoint) / self._rng_file()
        if not path.is_file():  # a run saved by another number of processes: Trainer carries on likewise
            return
        states = load_state(path)
        random.setstate(states["python"])
        np.random.set_state(states["numpy"])
        torch.random.set_rng_state(states["cpu"])
        if torch.cuda.is_available() and "cuda" in states:
            set_rng_state_for_device("CUDA", torch.cuda, states, self._distributed())

    def _distributed(self) -> bool:
        return self.args.parallel_mode == ParallelMode.DISTRIBUTED

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save of the model, then its training_args.bin (a pickle of the arguments, which it always writes
        last) replaced by training_args.json, in the staging folder of a checkpoint or of the final model, before
        that folder is renamed into place."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            (folder / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            (folder / TRAINING_ARGUMENTS_FILE).write_text(self.args.to_json_string() + "\n", encoding="utf-8")
