"""``ssm-hub convert``: in process through ``ssm_hub.cli.main`` and once as a real ``python -m ssm_hub.cli``."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import ssm_hub  # noqa: F401  (registers the ssm_hub model types with the Auto classes)
from conftest import randomised
from ssm_hub.cli import main

INPUT_IDS = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(1))


def max_logit_difference(model, reference) -> float:
    with torch.no_grad():
        return (model(INPUT_IDS).logits - reference(INPUT_IDS).logits).abs().max().item()


def test_convert_in_process(tmp_path, capsys):
    source = randomised(Mamba2ForCausalLM(Mamba2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16, num_heads=4, n_groups=2,
        chunk_size=8,
    )))
    source.save_pretrained(tmp_path / "source")

    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "converted")]) == 0

    printed = capsys.readouterr().out
    assert str(tmp_path / "converted") in printed and "model.safetensors" in printed
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert converted.config.model_type == "ssm_hub_mamba2"
    assert max_logit_difference(converted, source) <= 1e-5


def test_convert_through_the_console_script(tmp_path):
    config = MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=8)
    source = randomised(MambaForCausalLM(config))
    source.save_pretrained(tmp_path / "source")

    completed = subprocess.run(
        [str(Path(sys.executable).parent / "ssm-hub"), "convert", str(tmp_path / "source"),
         str(tmp_path / "converted"), "--to", "mamba", "--dtype", "float32"],
        # Outside the repository, so the installed package is what runs, as for a user.
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )

    assert completed.returncode == 0, completed.stderr
    assert "(mamba format)" in completed.stdout
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["model_type"] == "mamba"
    assert max_logit_difference(MambaForCausalLM.from_pretrained(tmp_path / "converted"), source) <= 1e-5


def test_bad_source_exits_with_a_message_not_a_traceback(tmp_path, capsys):
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text('{"model_type": "t5"}')

    assert main(["convert", str(tmp_path / "unknown"), str(tmp_path / "converted")]) == 2

    error = capsys.readouterr().err
    assert error.startswith("ssm-hub: error:") and "unsupported checkpoint format" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "converted").exists()


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "convert" in capsys.readouterr().err
