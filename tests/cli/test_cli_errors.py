"""Every ``ssm-hub`` error is one line on stderr that names the thing and the fix, with exit status 2, and every value
is checked before any work (issue 22, point 2); ``--debug`` adds the traceback; ``--version``. The status lines of the
work that came before the error ("[0:00] ssm-hub train: loading torch and transformers", ssm_hub.progress) are not
part of it."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from ssm_hub.cli import main
from ssm_hub.demo import run_demo


def without_status_lines(error: str) -> list[str]:
    """The lines of ``error`` (a command's stderr) less ssm_hub.progress's status lines ("[0:03] data: ...")."""
    return [line for line in error.strip().splitlines() if not re.match(r"\[\d+:\d\d\] ", line)]


def error_line(capsys) -> str:
    lines = without_status_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("ssm-hub")
    return lines[0]


BROKEN_RECIPE = "model:\n  type: ssm_hub_mamba\n  config: {hidden_size: 64\ntokenizer:\n  train_bpe: 512\n"


def test_a_broken_yaml_recipe_is_one_line_with_the_line_and_column_through_the_console_script(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(BROKEN_RECIPE)

    completed = subprocess.run([str(Path(sys.executable).parent / "ssm-hub"), "train", "--config", str(recipe)],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)

    assert completed.returncode == 2
    assert without_status_lines(completed.stderr) == [
        f"ssm-hub: error: {recipe}, line 4, column 10: not valid YAML (expected ',' or '}}', but got ':'): fix the "
        "recipe's syntax there"]


def test_debug_adds_the_traceback_and_version_names_the_versions(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(BROKEN_RECIPE)
    assert main(["train", "--config", str(recipe), "--debug"]) == 2
    error = without_status_lines(capsys.readouterr().err)
    assert error[0].startswith("Traceback") and "ValueError" in "\n".join(error)
    assert error[-1].startswith(f"ssm-hub: error: {recipe}, line 4")
    assert main(["--debug", "train", "--config", str(recipe)]) == 2  # before the subcommand too
    assert without_status_lines(capsys.readouterr().err)[0].startswith("Traceback")

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ssm-hub 0.")


def test_a_bad_override_value_is_named(capsys):
    assert main(["train", "--config", "debug_mamba", "train.max_steps=["]) == 2
    assert "override 'train.max_steps=[': its value is not valid YAML" in error_line(capsys)


def test_a_folder_given_as_the_recipe_is_called_a_folder(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 2
    line = error_line(capsys)
    assert f"recipe '{tmp_path}' is a folder: give a recipe YAML file in it, or the name of a shipped recipe" in line
    assert "not found" not in line and "debug_mamba2" in line


def test_an_unknown_model_type_lists_ssm_hubs_types_and_the_closest_names(capsys):
    assert main(["train", "--config", "debug_mamba", "model.type=ssm_hub_mamab"]) == 2
    line = error_line(capsys)
    assert ("model.type 'ssm_hub_mamab' is not a registered model type: ssm_hub's are ssm_hub_hybrid, ssm_hub_mamba"
            in line)
    assert "the closest names are ssm_hub_mamba" in line
    assert len(line) < 400 and "zamba" not in line  # not transformers' hundreds of types


def test_a_data_file_that_is_not_utf8_is_named_before_any_work(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_bytes("caf\u00e9 au lait\n\nna\u00efve".encode("latin-1"))
    output = tmp_path / "run"
    assert main(["train", "--config", "debug_mamba", "data.builtin=null", f"data.files=[{text}]",
                 f"train.output_dir={output}"]) == 2
    line = error_line(capsys)
    assert f"data.files: {text} is not UTF-8 text (byte 0xe9 at offset 3): convert it to UTF-8" in line
    assert not output.exists()


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-1", "train.learning_rate must be at least 0, got -1.0"),
    ("model.config.hidden_size=-4", "model.config: SsmHubMambaConfig.hidden_size must be a positive integer, got -4"),
])
def test_a_bad_training_value_is_named_before_any_work(override, message, tmp_path, capsys):
    """The optimizer and the config class would refuse these too, but only after the tokenizer and data work, and
    the optimizer without naming the key."""
    output = tmp_path / "run"
    assert main(["train", "--config", "debug_mamba", f"train.output_dir={output}", override]) == 2
    assert message in error_line(capsys)
    assert not output.exists()


@pytest.mark.parametrize("flag", ["--teacher", "--student", "--tokenizer"])
def test_distill_names_a_model_folder_that_does_not_exist_before_any_work(flag, tmp_path, capsys):
    folders = {name: tmp_path / name for name in ("teacher", "student", "tokenizer")}
    for folder in folders.values():
        folder.mkdir()
    folders[flag.removeprefix("--")] = tmp_path / "no" / "such" / "folder"
    arguments = [argument for name, folder in folders.items() for argument in (f"--{name}", str(folder))]
    assert main(["distill", *arguments, "--output", str(tmp_path / "out"), "--builtin", "python_docs"]) == 2
    error = capsys.readouterr().err
    assert "] data: " not in error  # refused before the data is read
    (line,) = without_status_lines(error)
    assert (f"{flag.removeprefix('--')} '{tmp_path / 'no' / 'such' / 'folder'}' is neither an existing folder nor a "
            "valid Hub model id") in line
    assert not (tmp_path / "out").exists()


UNREACHABLE_HUB = """
import sys, httpx2
from huggingface_hub.utils import _http
from ssm_hub.cli import main
from ssm_hub.conversion.formats import checkpoint

def unreachable(repo_id, **kwargs):
    for attempt in range(1, 6):
        _http.logger.warning(f"Retrying in {2 ** attempt}s [Retry {attempt}/5].")
    raise httpx2.ConnectError("[Errno 111] Connection refused")

checkpoint.snapshot_download = unreachable
sys.exit(main(sys.argv[1:]))
"""


def test_a_hub_that_cannot_be_reached_is_one_line_without_the_retry_warnings(tmp_path):
    """huggingface_hub warns at each retry before it gives up (about 20 lines over 50 s); the command shows only its
    one error line. In a process of its own: under pytest, log records go to pytest's capture, not to stderr."""
    completed = subprocess.run([sys.executable, "-c", UNREACHABLE_HUB, "convert", "someone/some-model",
                                str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 2
    (line,) = without_status_lines(completed.stderr)
    assert line.startswith("ssm-hub: error: cannot reach ") and "HF_ENDPOINT" in line


def test_a_missing_folder_looked_up_on_an_unreachable_hub_is_said_to_be_missing(tmp_path, monkeypatch):
    """``model.pretrained: ssm-hub-runs/debug_mamba2`` (debug_lora's) before that run has written it: a folder path
    with the form of a Hub id, tried on the Hub because it is missing. The network error says it is not here either."""
    import httpx2

    from ssm_hub.error_reporting import describe

    monkeypatch.chdir(tmp_path)
    request = httpx2.Request("GET", "https://huggingface.co/api/models/ssm-hub-runs/debug_mamba2/revision/main")
    error = httpx2.ConnectError("[Errno 111] Connection refused", request=request)
    message, named = describe(error)
    assert named and message.startswith("cannot reach ")
    assert message.endswith(f"; and 'ssm-hub-runs/debug_mamba2' is not a folder here ({tmp_path}) either")
    (tmp_path / "ssm-hub-runs" / "debug_mamba2").mkdir(parents=True)  # there: the Hub was asked for another reason
    assert "not a folder here" not in describe(error)[0]
    assert "not a folder here" not in describe(httpx2.ConnectError("refused"))[0]  # no request to read


def test_converting_a_transformer_without_to_says_how_to_seed_a_hybrid(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "model_type 'llama' is a transformer" in line
    assert "add --to ssm_hub_hybrid --attention-layers SPEC (e.g. every:4:3" in line
    assert not (tmp_path / "out").exists()


def test_an_argument_of_the_wrong_type_is_one_line(capsys):
    assert main(["distill", "--teacher", "t", "--student", "s", "--output", "o", "--builtin", "python_docs",
                 "--batch-size", "many"]) == 2
    assert error_line(capsys) == ("ssm-hub distill: error: argument --batch-size: must be a whole number, at least 1, "
                                  "got 'many' (see ssm-hub distill --help)")


def test_demo_refuses_negative_kl_steps_before_writing_anything(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=48, vocab_size=64)).save_pretrained(teacher)
    output = tmp_path / "demo"
    capsys.readouterr()

    assert main(["demo", "--teacher", str(teacher), "--kl-steps", "-5", "--output", str(output)]) == 2

    assert "argument --kl-steps: must be a whole number, at least 0, got '-5'" in error_line(capsys)
    assert not output.exists()
    with pytest.raises(ValueError, match="kl_steps must be a whole number of at least 0, got -5"):
        run_demo(output_dir=str(output), teacher=str(teacher), kl_steps=-5)
    assert not output.exists()
