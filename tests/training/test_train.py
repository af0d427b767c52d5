"""``ssm-hub train`` end to end on CPU: every shipped debug recipe (each model type and LoRA) trains, evaluates,
saves a loadable model, logs tokens/s and writes the loss curve; a resumed run continues from its checkpoint; a
launch through accelerate works; two data-parallel processes train like one with the same global batch; the
command says what it does before training starts; the held-out rows are not evaluated twice for one number."""

import json
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer

from ssm_hub.cli import main
from ssm_hub.training import load_recipe, train
from ssm_hub.training.config import recipe_path
from ssm_hub.training.run import final_eval_loss


def run(name: str, tmp_path, *overrides):
    recipe = load_recipe(recipe_path(name), [f"train.output_dir={tmp_path / name}", "train.max_steps=4",
                                             "train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1",
                                             *overrides])
    return train(recipe)


def log_history(output_dir) -> list[dict]:
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize("name", ["debug_mamba", "debug_mamba2", "debug_hybrid"])
def test_debug_recipe_trains_saves_and_reloads(name, tmp_path, monkeypatch):
    evaluated_rows = []  # the rows of each forward call that evaluates
    prediction_step = Trainer.prediction_step

    def counted(self, model, inputs, *args, **kwargs):
        evaluated_rows.append(inputs["input_ids"].shape[0])
        return prediction_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "prediction_step", counted)
    summary = run(name, tmp_path)
    output = tmp_path / name
    assert summary["steps"] == 4 and summary["eval_loss"] < 7.0 and summary["loss_curve"] == str(output / "loss_curve.png")
    history = log_history(output)
    assert all(entry["tokens_per_second"] > 0 for entry in history if "loss" in entry)
    assert sum("loss" in entry for entry in history) == 4 and sum("eval_loss" in entry for entry in history) == 2
    final_history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    # The final model's eval loss is Trainer's evaluation at the last step: the held-out rows are not evaluated a
    # third time for the same weights.
    evaluations = [entry for entry in final_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [2, 4]
    assert evaluations[-1]["eval_loss"] == summary["eval_loss"]
    # In batches of 64 rows, not Trainer's default 8 (issue 22, point 5: the recipe's comment says why).
    assert max(evaluated_rows) == 64 and len(evaluated_rows) == 2 * math.ceil(sum(evaluated_rows) / 2 / 64)
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_resumed_run_continues_from_its_checkpoint(tmp_path):
    first = run("debug_mamba2", tmp_path)
    resumed = run("debug_mamba2", tmp_path, "train.max_steps=6", f"train.resume_from_checkpoint={tmp_path}/debug_mamba2/checkpoint-4")
    assert first["steps"] == 4 and resumed["steps"] == 6
    steps = [entry["step"] for entry in log_history(tmp_path / "debug_mamba2") if "loss" in entry]
    assert steps == [1, 2, 3, 4, 5, 6]  # the first four from the first run, then the resumed steps


def test_lora_recipe_trains_only_adapters_and_saves_them(tmp_path):
    run("debug_mamba2", tmp_path)
    base = tmp_path / "debug_mamba2"
    summary = run("debug_lora", tmp_path, f"model.pretrained={base}", f"tokenizer.pretrained={base}")
    saved = sorted(path.name for path in (tmp_path / "debug_lora").iterdir())
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    assert summary["eval_loss"] < 7.0
    with pytest.raises(ValueError, match="the tokenizer has 600 tokens but .*embedding has 512 rows"):
        run("debug_lora", tmp_path, f"model.pretrained={base}", "tokenizer.pretrained=null", "tokenizer.train_bpe=600",
            "train.overwrite_output_dir=true")


def test_an_evaluation_that_drop_last_would_empty_is_refused_before_training(tmp_path):
    """Trainer would evaluate no batch and report no eval loss; the run must stop before it trains, naming why."""
    with pytest.raises(ValueError, match=r"dataloader_drop_last = true drops every held-out row: \d+ rows fill no "
                                         r"evaluation batch of train.per_device_eval_batch_size \(4096\)"):
        run("debug_mamba2", tmp_path, "train.dataloader_drop_last=true", "train.per_device_eval_batch_size=4096")
    assert not (tmp_path / "debug_mamba2").exists()


def test_cli_runs_a_recipe_and_names_a_bad_key(tmp_path, capsys):
    assert main(["train", "--config", "debug_mamba", f"train.output_dir={tmp_path / 'cli'}", "train.max_steps=2",
                 "train.save_steps=2", "train.eval_steps=2"]) == 0
    assert "train_loss:" in capsys.readouterr().out
    assert main(["train", "--config", "debug_mamba", "train.max_step=3"]) == 2
    assert "unknown key(s) in train: train.max_step" in capsys.readouterr().err
    assert main(["train", "--config", "debug_mamba", "--num-processes", "2"]) == 2
    assert "--num-processes needs --accelerate-config" in capsys.readouterr().err


def status_lines(error: str) -> list[str]:
    """The status lines of ssm_hub.progress ("[0:03] data: ...") in a command's stderr, without their times."""
    lines = error.replace("\r", "\n")  # a bar that closes leaves a carriage return before the next line
    return re.findall(r"^\[\d+:\d\d\] (.*)$", lines, re.MULTILINE)


def test_the_cli_says_what_it_does_before_training_starts(tmp_path, capsys):
    """Reading the data, training the tokenizer and packing take most of a short run before Trainer's first bar
    (issue 22, point 4): each says so from the start, with its counts."""
    output = tmp_path / "cli"
    assert main(["train", "--config", "debug_mamba", f"train.output_dir={output}", "train.max_steps=2",
                 "train.save_steps=2", "train.eval_steps=2"]) == 0
    error = capsys.readouterr().err
    expected = [
        r"ssm-hub train: loading torch and transformers",
        r"data: reading python_docs \(builtin\)",
        r"data: \d+ documents, [\d,]+ characters",
        r"tokenizer: training a byte-level BPE of 512 tokens on \d+ documents",
        r"data: tokenizing \d+ documents and packing them into rows of 64 tokens",
        r"data: \d+ documents \([\d,]+ tokens\) packed into [\d,]+ training rows of 64 tokens; "
        r"\d+ held out, [\d,]+ rows",
        r"model: ssm_hub_mamba, [\d,]+ parameters",
        rf"training: 2 steps on [\d,]+ rows, [\d,]+ held-out rows; output in {re.escape(str(output))}",
        rf"saving: the final model in {re.escape(str(output))}",
    ]
    lines = status_lines(error)
    assert len(lines) == len(expected), lines
    for pattern, line in zip(expected, lines):
        assert re.fullmatch(pattern, line), (pattern, line)
    assert error.index("training: 2 steps") < error.index("%|")  # the lines up to this one come before any bar


def test_the_final_evaluation_reuses_trainers_evaluation_of_the_same_weights():
    """The summary's eval loss comes from Trainer's evaluation at the last step when it made one (issue 22, point
    5: the debug recipes evaluated their held-out rows again after training, for the same number)."""
    evaluated = []

    def trainer(log_history, load_best=False):
        return SimpleNamespace(state=SimpleNamespace(log_history=log_history, global_step=8), eval_dataset=[0] * 3,
                               args=SimpleNamespace(load_best_model_at_end=load_best),
                               evaluate=lambda: evaluated.append(1) or {"eval_loss": 1.5})

    at_the_end = [{"eval_loss": 2.0, "step": 4}, {"loss": 3.0, "step": 8}, {"eval_loss": 2.5, "step": 8},
                  {"train_loss": 3.1, "step": 8}]
    assert final_eval_loss(trainer(at_the_end)) == 2.5 and not evaluated
    # No evaluation at the last step (an epoch strategy that ended mid-epoch), or the best model swapped in: anew.
    assert final_eval_loss(trainer(at_the_end[:2])) == 1.5
    assert final_eval_loss(trainer(at_the_end, load_best=True)) == 1.5
    assert len(evaluated) == 2


def test_accelerate_launch_runs_the_recipe_in_a_child_process(tmp_path):
    # A one-process CPU accelerate config: the launch path (accelerate launch -m ssm_hub.cli train ...) end to end.
    config = tmp_path / "cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                      "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n")
    output = tmp_path / "launched"
    status = main(["train", "--config", "debug_mamba", "--accelerate-config", str(config), f"train.output_dir={output}",
                   "train.max_steps=2", "train.save_steps=2", "train.eval_steps=2"])
    assert status == 0 and (output / "model.safetensors").is_file() and (output / "loss_curve.png").is_file()


def test_two_process_ddp_on_cpu_matches_one_process_with_the_same_global_batch(tmp_path):
    # Trainer's distributed path with our models (gloo on CPU): 2 processes x 4 rows must train like 1 x 8.
    run("debug_mamba2", tmp_path / "one", "train.per_device_train_batch_size=8")
    output = tmp_path / "two" / "debug_mamba2"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ssm_hub.cli", "train", "--config", "debug_mamba2", f"train.output_dir={output}",
               "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2", "train.logging_steps=1",
               "train.per_device_train_batch_size=4"]
    launched = subprocess.run(command, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("train_loss:") == 1  # the summary is printed by the first process only
    losses = {name: [entry["loss"] for entry in log_history(folder) if "loss" in entry]
              for name, folder in (("one", tmp_path / "one" / "debug_mamba2"), ("two", output))}
    assert len(losses["two"]) == 4
    torch.testing.assert_close(losses["two"], losses["one"], rtol=0, atol=1e-4)


def test_a_character_level_transformers_llama_trains_from_a_recipe(tmp_path):
    """The teachers of the distillation checks: a transformers model type, one token per character."""
    recipe = load_recipe(raw={
        "model": {"type": "llama", "config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                              "intermediate_size": 64, "max_position_embeddings": 64}},
        "tokenizer": {"characters": True},
        "data": {"builtin": "mqar", "seq_len": 64, "max_documents": 40},  # the recall task's text
        "train": {"output_dir": str(tmp_path / "char"), "max_steps": 2, "per_device_train_batch_size": 4,
                  "report_to": "none", "use_cpu": True, "eval_strategy": "no"},
    })
    summary = train(recipe)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "char")
    assert model.config.model_type == "llama" and summary["steps"] == 2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "char")
    assert len(tokenizer) == model.config.vocab_size < 200  # characters, not a BPE
    from ssm_hub.training.mqar import mqar_documents, recall_accuracy

    assert 0 <= recall_accuracy(model, tokenizer, mqar_documents(8, seed=1)) <= 1
