"""``ssm-hub train`` and its output_dir (issue 22): an output_dir that holds an earlier run is refused unless the
recipe says what to do (train.overwrite_output_dir: replace what that run wrote, nothing else;
train.resume_from_checkpoint: continue it, with the same recipe); Ctrl-C says where the last checkpoint is and the
exact command that resumes it, with exit status 130, even when Python drops the KeyboardInterrupt; a checkpoint
interrupted while it is written leaves nothing that loads or that a resume would pick up."""

import json
import shlex
import signal
import weakref

import pytest
from transformers import AutoModelForCausalLM, Trainer
from transformers.trainer_utils import get_last_checkpoint

from ssm_hub.cli import main
from ssm_hub.output_folder import STAGING_PREFIX
from ssm_hub.training.checkpoints import CheckpointsWithoutPickle

RECIPE = """
model:
  type: ssm_hub_mamba
  config: {hidden_size: 32, num_hidden_layers: 1, state_size: 4}
tokenizer:
  characters: true
data:
  builtin: python_docs
  seq_len: 32
  max_documents: 8
  eval_fraction: 0
train:
  max_steps: 3
  per_device_train_batch_size: 2
  save_steps: 1
  logging_steps: 1
  eval_strategy: "no"
  report_to: none
  use_cpu: true
  disable_tqdm: true
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    return path


def snapshot(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def last_line(capsys) -> str:
    error = capsys.readouterr().err
    assert "Traceback" not in error and sum(line.startswith("ssm-hub") for line in error.splitlines()) == 1, error
    return error.strip().splitlines()[-1]


def trained_steps(output) -> list[int]:
    return [entry["step"] for entry in json.loads((output / "trainer_state.json").read_text())["log_history"]
            if "loss" in entry]


def test_an_output_dir_in_use_is_refused_and_overwrite_replaces_only_the_earlier_runs_files(recipe, tmp_path,
                                                                                              capsys):
    output = tmp_path / "run"
    command = ["train", "--config", str(recipe), f"train.output_dir={output}"]
    assert main(command) == 0
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    (output / "notes.txt").write_text("mine\n")
    before = snapshot(output)
    capsys.readouterr()

    assert main(command) == 2
    line = last_line(capsys)
    assert f"the output folder {output} is not empty (it holds" in line
    assert "give train.overwrite_output_dir=true to replace what an earlier ssm-hub train wrote there" in line
    assert "train.resume_from_checkpoint=true to continue its run" in line
    # A resume must be of the same recipe: another learning rate is another run.
    assert main([*command, "train.resume_from_checkpoint=true", "train.learning_rate=0.5"]) == 2
    assert "the checkpoints in" in (line := last_line(capsys)) and "train.learning_rate: unset then, 0.5 now" in line
    assert snapshot(output) == before

    assert main([*command, "train.overwrite_output_dir=true", "train.max_steps=1"]) == 0

    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-1"]  # the old run's are gone
    assert (output / "notes.txt").read_text() == "mine\n"
    assert trained_steps(output) == [1]
    AutoModelForCausalLM.from_pretrained(output)


@pytest.mark.parametrize("holds", ["nothing", "notes of the user's"])
def test_a_resume_with_no_checkpoint_to_resume_from_says_so_before_any_work(holds, recipe, tmp_path, capsys):
    output = tmp_path / "run"
    if holds != "nothing":
        output.mkdir()
        (output / "notes.txt").write_text("mine\n")
    assert main(["train", "--config", str(recipe), f"train.output_dir={output}",
                 "train.resume_from_checkpoint=true"]) == 2
    error = capsys.readouterr().err
    assert "] data: " not in error  # before the data is read
    assert (f"train.resume_from_checkpoint=true, but {output} holds no checkpoint-* folder to resume from: leave it "
            "out to start a new run") in error.strip().splitlines()[-1]
    assert (sorted(path.name for path in output.iterdir()) == ["notes.txt"]) if holds != "nothing" else (
        not output.exists())


def test_ctrl_c_names_the_last_checkpoint_and_the_command_that_resumes_it(recipe, tmp_path, monkeypatch, capsys):
    output = tmp_path / "run"
    step = Trainer.training_step
    calls = []

    def interrupted_at_the_third_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupted_at_the_third_step)
    command = ["train", "--config", str(recipe), f"train.output_dir={output}", "train.overwrite_output_dir=true"]
    assert main(command) == 130
    line = last_line(capsys)
    monkeypatch.undo()

    resume = (f"ssm-hub train --config {recipe} train.output_dir={output} "
              f"train.resume_from_checkpoint={output / 'checkpoint-2'}")
    assert line == f"ssm-hub: interrupted: the last checkpoint is {output / 'checkpoint-2'}; resume with: {resume}"
    assert main(shlex.split(resume)[1:]) == 0
    assert trained_steps(output) == [1, 2, 3]  # two steps before Ctrl-C, the third after the resume


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped KeyboardInterrupt
def test_ctrl_c_that_python_drops_in_a_garbage_collector_callback_still_stops_training(recipe, tmp_path,
                                                                                       monkeypatch, capsys):
    """A SIGINT handled while a weakref callback runs raises KeyboardInterrupt there, and Python only prints it
    ("Exception ignored"); training must stop all the same, at the end of that step."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    output = tmp_path / "run"
    step = Trainer.training_step
    calls = []

    def sigint_during_garbage_collection(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            garbage = type("Garbage", (), {})()
            weakref.finalize(garbage, lambda: signal.getsignal(signal.SIGINT)(signal.SIGINT, None))
            del garbage  # the finalizer runs the SIGINT handler, whose KeyboardInterrupt Python drops
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", sigint_during_garbage_collection)
    try:
        status = main(["train", "--config", str(recipe), f"train.output_dir={output}", "train.max_steps=5"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == 130
    assert f"the last checkpoint is {output / 'checkpoint-2'}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_checkpoint_interrupted_while_it_is_written_leaves_none_that_loads(recipe, tmp_path, monkeypatch, capsys):
    """Trainer writes a checkpoint's model first, then its optimizer, RNG state and trainer_state.json: Ctrl-C in
    between must not leave a checkpoint-N that from_pretrained loads and a resume takes for the latest (issue 22,
    point 1). It is written under a staging name and renamed into place once complete."""
    output = tmp_path / "run"
    save_rng_state = CheckpointsWithoutPickle._save_rng_state

    def interrupted_in_the_second_checkpoint(self, output_dir):
        if output_dir.endswith("checkpoint-2"):
            raise KeyboardInterrupt
        return save_rng_state(self, output_dir)

    monkeypatch.setattr(CheckpointsWithoutPickle, "_save_rng_state", interrupted_in_the_second_checkpoint)
    command = ["train", "--config", str(recipe), f"train.output_dir={output}"]
    assert main(command) == 130
    assert f"the last checkpoint is {output / 'checkpoint-1'}" in last_line(capsys)
    monkeypatch.undo()

    assert sorted(path.name for path in output.iterdir() if "checkpoint-" in path.name) == ["checkpoint-1"]
    assert get_last_checkpoint(str(output)) == str(output / "checkpoint-1")
    assert main([*command, "train.resume_from_checkpoint=true"]) == 0
    assert trained_steps(output) == [1, 2, 3]
    assert not any(path.name.startswith(STAGING_PREFIX) for path in output.iterdir())
