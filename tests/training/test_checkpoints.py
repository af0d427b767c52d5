"""Trainer checkpoints without pickle (ssm_hub.training.checkpoints, ssm_hub.training.state_files; issue 22): the
optimizer, scheduler and random generators are saved as safetensors and the arguments as JSON, a resume reads them
back and continues as the uninterrupted run did, and a checkpoint that holds Trainer's pickles is refused."""

import copy
import json
import random

import numpy as np
import pytest
import torch
from test_train_output_dir import recipe  # noqa: F401  (the fixture: a tiny recipe that trains in seconds)
from transformers import Trainer

from ssm_hub.cli import main
from ssm_hub.training.state_files import load_state, save_state

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")


def test_a_state_round_trips_with_its_tuples_keys_and_arrays(tmp_path):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state(),
             "optimizer": {"state": {0: {"exp_avg": torch.randn(3), "step": torch.tensor(2.0)}},
                           "param_groups": [{"betas": (0.9, 0.999), "params": [0], "foreach": None}]},
             "$dollar": {"$tensor": "not a tensor"}, "lr": [1e-3, float("inf")]}
    save_state(state, tmp_path / "state.safetensors")
    loaded = load_state(tmp_path / "state.safetensors")
    random.setstate(loaded["python"])  # takes tuples only
    np.random.set_state(loaded["numpy"])
    assert loaded["python"] == state["python"]
    assert all(np.array_equal(a, b) for a, b in zip(loaded["numpy"], state["numpy"]))
    assert torch.equal(loaded["cpu"], state["cpu"])
    assert list(loaded["optimizer"]["state"]) == [0]  # an int key, as load_state_dict needs
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert loaded["$dollar"] == state["$dollar"] and loaded["lr"] == state["lr"]
    with pytest.raises(ValueError, match=r"the state\['ids'\] is a set, which a state saved without pickle cannot"):
        save_state({"ids": {1, 2}}, tmp_path / "other.safetensors")


def assert_same_optimizer_state(resumed: dict, saved: dict) -> None:
    assert resumed["param_groups"] == saved["param_groups"]
    assert resumed["state"].keys() == saved["state"].keys() and saved["state"]
    for parameter, values in saved["state"].items():
        assert resumed["state"][parameter].keys() == values.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, value in values.items():
            assert torch.equal(resumed["state"][parameter][name], value), (parameter, name)


def test_a_checkpoint_holds_no_pickle_and_a_resume_continues_as_the_uninterrupted_run(recipe, tmp_path,  # noqa: F811
                                                                                       monkeypatch):
    """Trainer pickles the optimizer, scheduler, RNG states and arguments (optimizer.pt, scheduler.pt, rng_state.pth,
    training_args.bin): none is in a checkpoint, and a resume from it starts where the saving run stood."""
    starts = []  # at the start of each optimizer step: (global step, optimizer state, scheduler state, CPU generator)
    training_step = Trainer.training_step

    def recorded(self, *args, **kwargs):
        starts.append((self.state.global_step, copy.deepcopy(self.optimizer.state_dict()),
                       self.lr_scheduler.state_dict(), torch.random.get_rng_state()))
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recorded)
    output = tmp_path / "run"
    command = ["train", "--config", str(recipe), f"train.output_dir={output}", "train.max_steps=6",
               "train.save_steps=3"]
    assert main(command) == 0
    uninterrupted = {step: (optimizer, scheduler, generator) for step, optimizer, scheduler, generator in starts}

    def losses() -> dict[int, float]:
        history = json.loads((output / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    uninterrupted_losses = losses()
    checkpoint = output / "checkpoint-3"
    saved = sorted(path.name for path in checkpoint.iterdir())
    assert not [name for name in saved if name.endswith(PICKLE_SUFFIXES)], saved
    assert {"optimizer.safetensors", "scheduler.safetensors", "rng_state.safetensors", "training_args.json"} <= set(saved)
    assert json.loads((checkpoint / "training_args.json").read_text())["save_steps"] == 3

    starts.clear()
    assert main([*command, f"train.resume_from_checkpoint={checkpoint}"]) == 0
    step, optimizer, scheduler, generator = starts[0]
    assert step == 3 and [start[0] for start in starts] == [3, 4, 5]
    assert_same_optimizer_state(optimizer, uninterrupted[3][0])
    assert scheduler == uninterrupted[3][1]
    assert torch.equal(generator, uninterrupted[3][2])
    resumed_losses = losses()
    assert [resumed_losses[step] for step in (4, 5, 6)] == [uninterrupted_losses[step] for step in (4, 5, 6)]


def test_a_checkpoint_with_a_pickled_optimizer_is_refused_naming_it(recipe, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "run"
    command = ["train", "--config", str(recipe), f"train.output_dir={output}", "train.max_steps=1"]
    assert main(command) == 0
    (output / "checkpoint-1" / "optimizer.pt").write_bytes(b"a pickle, never read")
    capsys.readouterr()
    assert main([*command, f"train.resume_from_checkpoint={output / 'checkpoint-1'}"]) == 2
    assert "checkpoint-1 holds optimizer.pt, training state saved with pickle" in capsys.readouterr().err
