"""Checkpoint conversion (ssm_hub.conversion): transformers-native and mamba_ssm checkpoints to ssm_hub and back.

Sources are tiny random models built here: transformers' own MambaForCausalLM / Mamba2ForCausalLM, and fake
mamba_ssm checkpoints made by renaming a transformers model's keys and padding its vocabulary the way mamba_ssm does.
Parity is the max |logit difference| against the transformers model the checkpoint came from.
"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import ssm_hub  # noqa: F401  (registers the ssm_hub model types with the Auto classes)
from conftest import randomised
from ssm_hub.conversion.formats import checkpoint
from ssm_hub.conversion.formats.checkpoint import convert_checkpoint
from ssm_hub.conversion.formats.engine import apply_config_map, apply_weight_map
from ssm_hub.conversion.formats.mamba import (
    MAMBA_IDENTITY_RULES,
    SSM_HUB_MAMBA2_TO_SSM_HUB,
    SSM_HUB_MAMBA2_TO_TRANSFORMERS,
    SSM_HUB_MAMBA_TO_SSM_HUB,
    SSM_HUB_MAMBA_TO_TRANSFORMERS,
    TRANSFORMERS_MAMBA2_TO_SSM_HUB,
    TRANSFORMERS_MAMBA_TO_SSM_HUB,
)
from ssm_hub.models.mamba.configuration_mamba import SsmHubMambaConfig
from ssm_hub.models.mamba2.configuration_mamba2 import SsmHubMamba2Config

VOCAB = 100
PADDED_VOCAB = 104  # VOCAB rounded up to mamba_ssm's pad_vocab_size_multiple of 8
TOLERANCE = 1e-5
INPUT_IDS = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))  # 21: not a chunk multiple


def tiny_mamba(vocab_size: int = VOCAB, **overrides) -> MambaForCausalLM:
    config = MambaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, state_size=8, **overrides)
    return randomised(MambaForCausalLM(config))


def tiny_mamba2(n_groups: int = 1, vocab_size: int = VOCAB, **overrides) -> Mamba2ForCausalLM:
    config = Mamba2Config(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16, num_heads=4,
        n_groups=n_groups, chunk_size=8, **overrides,
    )
    return randomised(Mamba2ForCausalLM(config))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def assert_same_logits(model, reference) -> None:
    difference = (logits(model) - logits(reference)).abs().max().item()
    assert difference <= TOLERANCE, f"max |logit difference| {difference:.3g} > {TOLERANCE}"


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def write_mamba_ssm_checkpoint(model, folder: Path, ssm_cfg: dict, **config_overrides) -> Path:
    """What mamba_ssm's MambaLMHeadModel.save_pretrained writes, with safetensors instead of pytorch_model.bin."""
    folder.mkdir()
    state = {
        name.replace("backbone.embeddings.", "backbone.embedding."): tensor.clone()  # clone: unshare tied tensors
        for name, tensor in model.state_dict().items()
    }
    save_file(state, folder / "model.safetensors")
    config = {
        "d_model": model.config.hidden_size, "d_intermediate": 0, "n_layer": model.config.num_hidden_layers,
        "vocab_size": VOCAB, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
        **config_overrides,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def output_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_transformers_mamba_to_ssm_hub_keeps_logits(tmp_path):
    source = tiny_mamba()
    output = convert_checkpoint(save(source, tmp_path / "source"), tmp_path / "converted")

    converted = AutoModelForCausalLM.from_pretrained(output)
    assert converted.config.model_type == "ssm_hub_mamba"
    assert "auto_map" in output_config(output)
    assert_same_logits(converted, source)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_transformers_mamba2_to_ssm_hub_keeps_logits(tmp_path, n_groups):
    source = tiny_mamba2(n_groups=n_groups)  # transformers' Mamba2 default: lm_head not tied
    output = convert_checkpoint(save(source, tmp_path / "source"), tmp_path / "converted")

    converted = AutoModelForCausalLM.from_pretrained(output)
    assert converted.config.model_type == "ssm_hub_mamba2"
    assert converted.config.n_groups == n_groups
    assert not converted.config.tie_word_embeddings
    assert_same_logits(converted, source)


def test_mamba_ssm_mamba1_to_ssm_hub_takes_vocab_from_padded_embedding(tmp_path):
    source = tiny_mamba(vocab_size=PADDED_VOCAB)
    folder = write_mamba_ssm_checkpoint(source, tmp_path / "mamba_ssm", ssm_cfg={"d_state": 8})
    output = convert_checkpoint(folder, tmp_path / "converted")

    converted = AutoModelForCausalLM.from_pretrained(output)
    assert converted.config.model_type == "ssm_hub_mamba"
    assert converted.config.vocab_size == PADDED_VOCAB
    assert_same_logits(converted, source)


def test_mamba_ssm_mamba2_to_ssm_hub_keeps_logits(tmp_path):
    source = tiny_mamba2(n_groups=2, vocab_size=PADDED_VOCAB, tie_word_embeddings=True)
    ssm_cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8}
    folder = write_mamba_ssm_checkpoint(source, tmp_path / "mamba_ssm", ssm_cfg=ssm_cfg)
    output = convert_checkpoint(folder, tmp_path / "converted")

    converted = AutoModelForCausalLM.from_pretrained(output)
    assert converted.config.model_type == "ssm_hub_mamba2"
    assert (converted.config.vocab_size, converted.config.n_groups) == (PADDED_VOCAB, 2)
    assert_same_logits(converted, source)


def test_mamba_ssm_mamba2_to_transformers_keeps_logits(tmp_path):
    source = tiny_mamba2(vocab_size=PADDED_VOCAB, tie_word_embeddings=True)
    ssm_cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8}
    folder = write_mamba_ssm_checkpoint(source, tmp_path / "mamba_ssm", ssm_cfg=ssm_cfg)
    output = convert_checkpoint(folder, tmp_path / "converted", to="mamba2")

    assert output_config(output)["model_type"] == "mamba2"
    assert_same_logits(Mamba2ForCausalLM.from_pretrained(output), source)


def test_ssm_hub_back_to_transformers_mamba_keeps_logits(tmp_path):
    source = tiny_mamba()
    ours = convert_checkpoint(save(source, tmp_path / "source"), tmp_path / "ssm_hub")
    back = convert_checkpoint(ours, tmp_path / "back", to="mamba")

    assert output_config(back)["model_type"] == "mamba"
    assert "auto_map" not in output_config(back)
    assert_same_logits(MambaForCausalLM.from_pretrained(back), source)


def test_ssm_hub_back_to_transformers_mamba2_keeps_logits(tmp_path):
    source = tiny_mamba2(n_groups=2)
    ours = convert_checkpoint(save(source, tmp_path / "source"), tmp_path / "ssm_hub")
    back = convert_checkpoint(ours, tmp_path / "back", to="mamba2")

    assert output_config(back)["model_type"] == "mamba2"
    assert_same_logits(Mamba2ForCausalLM.from_pretrained(back), source)


def test_sharded_source_with_tokenizer_files(tmp_path):
    source = tiny_mamba()
    folder = save(source, tmp_path / "source", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    (folder / "generation_config.json").write_text('{"eos_token_id": 3}')

    output = convert_checkpoint(folder, tmp_path / "converted", to="mamba")

    assert json.loads((output / "tokenizer_config.json").read_text()) == {"model_max_length": 7}
    assert json.loads((output / "generation_config.json").read_text()) == {"eos_token_id": 3}
    assert_same_logits(MambaForCausalLM.from_pretrained(output), source)


def test_every_tokenizer_file_and_chat_template_is_copied(tmp_path, caplog):
    folder = save(tiny_mamba(), tmp_path / "source")
    names = ["spiece.model", "qwen.tiktoken", "chat_template.jinja", "additional_chat_templates/tool_use.jinja"]
    for name in names:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(name)

    with caplog.at_level("WARNING", logger="ssm_hub"):
        output = convert_checkpoint(folder, tmp_path / "converted")

    assert all((output / name).read_text() == name for name in names)
    assert checkpoint.has_tokenizer(output)
    assert checkpoint.chat_templates(output) == ["additional_chat_templates/tool_use.jinja", "chat_template.jinja"]
    assert not caplog.records


def test_a_source_without_a_tokenizer_is_said_so(tmp_path, caplog):
    folder = save(tiny_mamba(), tmp_path / "source")
    (folder / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')  # no vocabulary: no tokenizer

    with caplog.at_level("WARNING", logger="ssm_hub"):
        output = convert_checkpoint(folder, tmp_path / "converted")

    assert not checkpoint.has_tokenizer(output)
    assert checkpoint.chat_templates(output) == ["tokenizer_config.json"]
    message, = (record.getMessage() for record in caplog.records)
    assert message.startswith(f"{folder} holds no tokenizer (none of tokenizer.json, ")
    assert "`ssm-hub distill` will need --tokenizer" in message


def test_dtype_casts_every_floating_tensor(tmp_path):
    folder = save(tiny_mamba2(), tmp_path / "source")
    output = convert_checkpoint(folder, tmp_path / "converted", to="mamba2", dtype="bfloat16")

    assert {tensor.dtype for tensor in load_file(output / "model.safetensors").values()} == {torch.bfloat16}
    assert output_config(output)["dtype"] == "bfloat16"


def rewrite_weights(folder: Path, change) -> None:
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors")


def test_one_error_names_every_unknown_missing_and_misshaped_tensor(tmp_path):
    folder = save(tiny_mamba(), tmp_path / "source")

    def break_weights(weights):
        weights["backbone.layers.0.mixer.extra.weight"] = torch.zeros(3)
        del weights["backbone.layers.1.mixer.A_log"]
        weights["backbone.layers.0.mixer.D"] = torch.zeros(5)

    rewrite_weights(folder, break_weights)
    with pytest.raises(ValueError) as error:
        convert_checkpoint(folder, tmp_path / "converted")
    message = str(error.value)
    assert "unknown source keys" in message and "backbone.layers.0.mixer.extra.weight" in message
    assert "missing keys" in message and "backbone.layers.1.mixer.A_log" in message
    assert "backbone.layers.0.mixer.D: expected shape [64], got [5]" in message
    assert not (tmp_path / "converted").exists()


def test_missing_keys_of_every_layer_are_listed_once(tmp_path):
    folder = save(tiny_mamba(), tmp_path / "source")
    rewrite_weights(folder, lambda weights: [weights.pop(f"backbone.layers.{i}.mixer.D") for i in range(2)])
    with pytest.raises(ValueError, match=r"backbone\.layers\.\{i\}\.mixer\.D \(layers 0-1\)"):
        convert_checkpoint(folder, tmp_path / "converted")


def test_tied_lm_head_that_differs_from_embeddings_is_an_error(tmp_path):
    folder = save(tiny_mamba(), tmp_path / "source")  # tied: transformers omits lm_head.weight
    rewrite_weights(folder, lambda weights: weights.update({"lm_head.weight": torch.zeros(VOCAB, 32)}))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        convert_checkpoint(folder, tmp_path / "converted")


def test_unsupported_model_type_lists_supported_formats(tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match="model_type 't5'") as error:
        convert_checkpoint(folder, tmp_path / "converted")
    assert "mamba_ssm" in str(error.value) and "Mamba2ForCausalLM" in str(error.value)


def test_pytorch_model_bin_is_never_read(tmp_path):
    folder = tmp_path / "mamba_ssm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": VOCAB, "ssm_cfg": {}}))
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle: ssm_hub must not try to read it")
    with pytest.raises(ValueError, match="pytorch_model.bin") as error:
        convert_checkpoint(folder, tmp_path / "converted")
    assert "safetensors only" in str(error.value) and "-hf" in str(error.value)


def test_to_mamba_from_a_mamba2_source_is_an_error(tmp_path):
    folder = save(tiny_mamba2(), tmp_path / "source")
    with pytest.raises(ValueError, match="Mamba-2 model: use to='mamba2'"):
        convert_checkpoint(folder, tmp_path / "converted", to="mamba")


def test_norm_before_gate_cannot_go_to_transformers(tmp_path):
    folder = tmp_path / "ssm_hub"
    SsmHubMamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16, chunk_size=8,
                       norm_before_gate=True, tie_word_embeddings=False).save_pretrained(folder)
    save_file(tiny_mamba2().state_dict(), folder / "model.safetensors")
    with pytest.raises(ValueError, match="norm_before_gate = True is not supported"):
        convert_checkpoint(folder, tmp_path / "converted", to="mamba2")


@pytest.mark.parametrize("hybrid_setting", [{"attn_layer_idx": [1]}, {"d_intermediate": 64}, {"rms_norm": False}])
def test_mamba_ssm_hybrids_are_refused(tmp_path, hybrid_setting):
    folder = write_mamba_ssm_checkpoint(tiny_mamba(PADDED_VOCAB), tmp_path / "mamba_ssm", {"d_state": 8},
                                        **hybrid_setting)
    with pytest.raises(ValueError, match="ssm_hub_hybrid") as error:
        convert_checkpoint(folder, tmp_path / "converted")
    assert next(iter(hybrid_setting)) in str(error.value)


def test_bad_arguments(tmp_path):
    folder = save(tiny_mamba(), tmp_path / "source")
    with pytest.raises(ValueError, match="to must be one of"):
        convert_checkpoint(folder, tmp_path / "converted", to="llama")
    with pytest.raises(ValueError, match="dtype must be"):
        convert_checkpoint(folder, tmp_path / "converted", dtype="int8")
    with pytest.raises(ValueError, match="neither an existing folder nor a valid Hub model id"):
        convert_checkpoint(str(tmp_path / "no" / "such" / "folder"), tmp_path / "converted")


@pytest.mark.parametrize("config, conversion_map", [
    (MambaConfig(), TRANSFORMERS_MAMBA_TO_SSM_HUB),
    (Mamba2Config(), TRANSFORMERS_MAMBA2_TO_SSM_HUB),
    (SsmHubMambaConfig(), SSM_HUB_MAMBA_TO_TRANSFORMERS),
    (SsmHubMamba2Config(), SSM_HUB_MAMBA2_TO_TRANSFORMERS),
    (SsmHubMambaConfig(), SSM_HUB_MAMBA_TO_SSM_HUB),
    (SsmHubMamba2Config(), SSM_HUB_MAMBA2_TO_SSM_HUB),
])
def test_config_maps_know_every_field_of_their_source(config, conversion_map):
    # A field added to transformers' or ssm_hub's config without a map entry would be warned about and ignored.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_config_map(config.to_dict(), conversion_map)


def test_apply_weight_map_renames_and_fills_tied_tensors():
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8)
    state = MambaForCausalLM(config).state_dict()
    del state["lm_head.weight"]
    converted = apply_weight_map(state, MAMBA_IDENTITY_RULES, config)
    assert converted.keys() == state.keys() | {"lm_head.weight"}
    assert converted["lm_head.weight"] is converted["backbone.embeddings.weight"]


class FakeHub:
    """snapshot_download / list_repo_files over local folders, recording what was asked for."""

    def __init__(self, repos: dict[str, Path], cache: Path):
        self.repos, self.cache, self.requested = repos, cache, []

    def snapshot_download(self, repo_id, allow_patterns):
        self.requested.append(list(allow_patterns))
        snapshot = self.cache / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in self.repos[repo_id].iterdir():
            if any(path.match(pattern) for pattern in allow_patterns):
                shutil.copyfile(path, snapshot / path.name)
        return str(snapshot)

    def list_repo_files(self, repo_id):
        return sorted(path.name for path in self.repos[repo_id].iterdir())


def test_hub_id_downloads_only_the_indexed_shards(tmp_path, monkeypatch):
    source = tiny_mamba2()
    repo = save(source, tmp_path / "repo", max_shard_size="20KB")
    (repo / "consolidated.safetensors").write_bytes(b"a second copy of the weights under other names")
    hub = FakeHub({"someone/tiny-mamba2": repo}, tmp_path / "cache")
    monkeypatch.setattr(checkpoint, "snapshot_download", hub.snapshot_download)

    output = convert_checkpoint("someone/tiny-mamba2", tmp_path / "converted", to="mamba2")

    assert not any("consolidated.safetensors" in pattern for patterns in hub.requested for pattern in patterns)
    assert not (tmp_path / "cache" / "someone--tiny-mamba2" / "consolidated.safetensors").exists()
    assert_same_logits(Mamba2ForCausalLM.from_pretrained(output), source)


def test_hub_id_with_only_pytorch_model_bin_names_the_file(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": VOCAB, "ssm_cfg": {}}))
    (repo / "pytorch_model.bin").write_bytes(b"not a pickle")
    hub = FakeHub({"state-spaces/tiny-mamba": repo}, tmp_path / "cache")
    monkeypatch.setattr(checkpoint, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(checkpoint, "list_repo_files", hub.list_repo_files)

    with pytest.raises(ValueError, match="it has only pytorch_model.bin"):
        convert_checkpoint("state-spaces/tiny-mamba", tmp_path / "converted")
    assert not any("*.bin" in patterns or "pytorch_model.bin" in patterns for patterns in hub.requested)
