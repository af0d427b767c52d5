"""``ssm-hub convert``: in process through ``ssm_hub.cli.main`` and once as a real ``python -m ssm_hub.cli``."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
)

import ssm_hub  # noqa: F401  (registers the ssm_hub model types with the Auto classes)
from conftest import randomised
from ssm_hub.cli import main
from test_cli_errors import error_line

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

    assert "unsupported checkpoint format" in error_line(capsys)
    assert not (tmp_path / "converted").exists()


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "convert" in capsys.readouterr().err


WORDS = ["<pad>", "</s>", "hello", "world"]


def teacher_with_tokenizer(folder: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A tiny Llama with a word-level tokenizer and two chat templates: the default one (chat_template.jinja) and a
    named one (additional_chat_templates/tool_use.jinja)."""
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = {"default": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
                               "tool_use": "{{ messages[0]['content'] }} </s>"}
    teacher = randomised(LlamaForCausalLM(LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48)))
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return teacher, tokenizer


def test_seeding_copies_the_tokenizer_and_every_chat_template_and_prints_a_summary(tmp_path, capsys):
    teacher, tokenizer = teacher_with_tokenizer(tmp_path / "teacher")
    assert (tmp_path / "teacher" / "additional_chat_templates" / "tool_use.jinja").is_file()

    assert main(["convert", str(tmp_path / "teacher"), str(tmp_path / "student"), "--to", "ssm_hub_hybrid",
                 "--attention-layers", "1"]) == 0

    student_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    messages = [{"role": "user", "content": "hello world"}]
    for template in ("default", "tool_use"):
        assert student_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False) == \
            tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {tmp_path / 'student'} (ssm_hub_hybrid format):"
    parameters = sum(tensor.numel() for tensor in load_file(tmp_path / "student" / "model.safetensors").values())
    assert printed[1] == (f"  model: ssm_hub_hybrid (SsmHubHybridForCausalLM), 2 layers (1 mamba2, 1 attention), "
                          f"{parameters:,} parameters")
    assert printed[2].startswith("  weights: model.safetensors (")
    assert printed[3] == ("  tokenizer: additional_chat_templates/tool_use.jinja, chat_template.jinja, tokenizer.json, "
                          "tokenizer_config.json; chat template: additional_chat_templates/tool_use.jinja, "
                          "chat_template.jinja")
    code_files = len(list((tmp_path / "student").glob("*.py")))
    assert printed[4] == (f"  also: config.json, generation_config.json, seeding.json, {code_files} code files (*.py, "
                          "for trust_remote_code)")
    assert len(printed) == 5  # the code files are counted, not listed


def test_a_source_without_a_tokenizer_is_said_so_and_distill_is_told_what_it_needs(tmp_path, capsys):
    source = randomised(MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                      state_size=8)))
    source.save_pretrained(tmp_path / "source")

    assert main(["convert", str(tmp_path / "source"), str(tmp_path / "converted")]) == 0

    printed = capsys.readouterr().out
    assert "  tokenizer: none, as the source had none: `ssm-hub distill` will need --tokenizer" in printed
    assert "2 layers (2 mamba)" in printed
