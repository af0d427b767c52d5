"""Loading an ssm_hub checkpoint is strict (ssm_hub.models.checkpoint_loading): a missing or unexpected tensor raises,
naming it, where transformers would only warn; ``strict=False`` is the way out. Tied heads, non-persistent buffers and
a head that the saving class did not have are not counted, and every checkpoint ssm_hub itself writes (a plain save,
a sharded one, a merged LoRA, an untied head) loads. Pickled weights are refused.

    python -P -m pytest -q tests/models/test_strict_loading.py
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import MODEL_TYPES, tiny_config
from ssm_hub import SsmHubMamba2ForCausalLM

INPUT_IDS = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def saved(model_type: str, folder, **overrides):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    model.save_pretrained(folder)
    return model


def rewrite_weights(folder, change) -> None:
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def remove_an_ssm_tensor(folder) -> str:
    """Drop the first layer's A_log from the checkpoint in ``folder``; returns its name."""
    weights = load_file(folder / "model.safetensors")
    name = next(name for name in sorted(weights) if name.endswith("A_log"))
    rewrite_weights(folder, lambda weights: weights.pop(name))
    return name


def test_a_missing_tensor_raises_naming_it(causal_lm_type, tmp_path):
    saved(causal_lm_type, tmp_path)
    removed = remove_an_ssm_tensor(tmp_path)
    with pytest.raises(ValueError, match="missing") as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert removed in str(error.value) and "strict=False" in str(error.value)
    # The way out: transformers' own behaviour, the tensor left at its initialisation and named in the report.
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert info["missing_keys"] == {removed}
    assert torch.isfinite(model(INPUT_IDS).logits).all()


def test_an_unexpected_tensor_raises_naming_it(causal_lm_type, tmp_path):
    saved(causal_lm_type, tmp_path)
    rewrite_weights(tmp_path, lambda weights: weights.update({"model.layers.9.mamba.A_log": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*model\.layers\.9\.mamba\.A_log"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tmp_path, strict=False)


@pytest.mark.parametrize("tied", [True, False])
def test_every_checkpoint_ssm_hub_saves_loads_strictly(causal_lm_type, tied, tmp_path):
    """A tied head is not stored (and must not count as missing); an untied one is."""
    model = saved(causal_lm_type, tmp_path / "whole", tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for folder in ("whole", "sharded"):
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / folder, output_loading_info=True)
        assert info["missing_keys"] == info["unexpected_keys"] == set()
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, model(INPUT_IDS).logits, rtol=0, atol=0)


def test_a_merged_lora_loads_strictly(tmp_path):
    model = saved("ssm_hub_hybrid", tmp_path / "base")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(r=2, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload().eval()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(INPUT_IDS).logits, merged(INPUT_IDS).logits, rtol=0, atol=0)
    assert not torch.equal(reloaded(INPUT_IDS).logits, model(INPUT_IDS).logits)
    # transformers' own adapter loading (a folder with adapter_config.json) goes through the strict base load too.
    adapted = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(adapted(INPUT_IDS).logits, merged(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)


def test_another_head_of_the_same_type_loads_but_not_a_wrong_body(model_type, tmp_path):
    """A classifier or a base model started from a causal LM lacks or drops the head, as in transformers; a missing
    body tensor still raises."""
    saved(model_type, tmp_path, tie_word_embeddings=False)
    classifier, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"score.weight"} and info["unexpected_keys"] == {"lm_head.weight"}
    AutoModel.from_pretrained(tmp_path)
    removed = remove_an_ssm_tensor(tmp_path)
    with pytest.raises(ValueError, match=removed):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


class WithNonPersistentBuffer(SsmHubMamba2ForCausalLM):
    """A user's subclass holding a buffer that is never saved."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def test_non_persistent_buffers_are_not_missing(tmp_path):
    WithNonPersistentBuffer(tiny_config("ssm_hub_mamba2")).save_pretrained(tmp_path)
    model, info = WithNonPersistentBuffer.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and model.scratch.shape == (3,)


def test_a_state_dict_in_memory_loads_as_in_transformers_unless_strict(tmp_path):
    """``from_pretrained(None, config=..., state_dict={})`` is transformers' way to initialise every weight."""
    config = tiny_config("ssm_hub_mamba2")
    model = SsmHubMamba2ForCausalLM.from_pretrained(None, config=config, state_dict={})
    assert torch.isfinite(model(INPUT_IDS).logits).all()
    with pytest.raises(ValueError, match="the state_dict does not fit"):
        SsmHubMamba2ForCausalLM.from_pretrained(None, config=config, state_dict={}, strict=True)


@pytest.mark.parametrize("model_type", [*MODEL_TYPES, "ssm_hub_hybrid"])
def test_pickled_weights_are_refused_naming_the_file(model_type, tmp_path):
    model = saved(model_type, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="it has only pytorch_model.bin; ssm_hub reads safetensors only") as error:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "use_safetensors=False" in str(error.value) and "safetensors.torch.save_file" in str(error.value)
    # Asked for explicitly, the pickle is read (by transformers, weights only).
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=False)
    torch.testing.assert_close(reloaded(INPUT_IDS).logits, model(INPUT_IDS).logits, rtol=0, atol=0)


def test_strict_is_not_mistaken_for_a_config_field(tmp_path):
    saved("ssm_hub_mamba2", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, strict=False)
    assert not hasattr(model.config, "strict") and isinstance(model.lm_head, nn.Linear)
