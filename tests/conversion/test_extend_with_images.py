"""``ssm-hub convert HYBRID OUT --to ssm_hub_multimodal``: a text-only hybrid gains a patch embedding and a
processor, keeps computing what it did on text, and its image path starts as a copy of the text path."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast

import ssm_hub
from ssm_hub.cli import main

WORDS = ["<pad>", "</s>", "hello", "world", "describe", "a", "square"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>").save_pretrained(folder)
    config = ssm_hub.SsmHubHybridConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, mixer_types=["mamba2", "attention"],
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, mamba_d_state=8, mamba_d_head=16,
        mamba_chunk_size=8, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_the_extended_model_keeps_the_text_path_and_sees_images(text_model, tmp_path):
    output = tmp_path / "vl"
    assert main(["convert", str(text_model), str(output), "--to", "ssm_hub_multimodal", "--patch-size", "4",
                 "--max-image-size", "8", "--mixture-of-mamba", "--modality-mlps", "--modality-norms"]) == 0
    processor = AutoProcessor.from_pretrained(output)
    model = AutoModelForImageTextToText.from_pretrained(output).eval()
    text = AutoModelForCausalLM.from_pretrained(text_model).eval()
    assert model.config.vocab_size == len(WORDS) + 2
    assert (model.config.image_token_id, model.config.image_row_end_token_id) == (
        processor.image_token_id, processor.image_row_end_token_id)
    ids = processor(text=["hello world describe a square"])["input_ids"]
    with torch.no_grad():
        # The same weights; the LM head's matmul has two more columns, which may round the others differently.
        torch.testing.assert_close(model(ids).logits[..., :len(WORDS)], text(ids).logits, rtol=1e-6, atol=1e-6)
        mamba = model.model.language_model.layers[0].mamba
        assert torch.equal(mamba.modality_in_proj[0].weight, mamba.in_proj.weight)
        assert torch.equal(model.model.language_model.layers[1].modality_feed_forward[0].up_proj.weight,
                           model.model.language_model.layers[1].feed_forward.up_proj.weight)
        new_rows = model.get_input_embeddings().weight[len(WORDS):]
        torch.testing.assert_close(new_rows, text.get_input_embeddings().weight.mean(0).expand(2, -1))
        inputs = processor(text=["<image> describe"], images=[np.full((8, 4, 3), 90, dtype=np.uint8)])
        assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 2
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_only_a_hybrid_is_extended_and_the_image_flags_need_the_target(text_model, tmp_path, capsys):
    assert main(["convert", str(text_model), str(tmp_path / "out"), "--mixture-of-mamba"]) != 0
    assert "--mixture-of-mamba apply to extending a hybrid with images" in capsys.readouterr().err
    mamba2 = tmp_path / "mamba2"
    AutoModelForCausalLM.from_config(ssm_hub.SsmHubMamba2Config(
        vocab_size=16, hidden_size=32, num_hidden_layers=1, state_size=8, head_dim=16)).save_pretrained(mamba2)
    assert main(["convert", str(mamba2), str(tmp_path / "vl"), "--to", "ssm_hub_multimodal"]) != 0
    assert "takes an ssm_hub_hybrid checkpoint, got model_type 'ssm_hub_mamba2'" in capsys.readouterr().err


def test_a_padded_vocabulary_gets_trained_rows_for_the_image_tokens_and_stored_dtypes_stay(text_model, tmp_path):
    """A table with spare rows (padded vocabularies) keeps its size, but the image tokens' rows are filled rather than
    left untrained; each tensor keeps its stored dtype (here bf16 with A_log kept in float32)."""
    from safetensors.torch import load_file, save_file

    padded = tmp_path / "padded"
    config = AutoModelForCausalLM.from_pretrained(text_model).config
    config.vocab_size = len(WORDS) + 4
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(padded)
    state = load_file(padded / "model.safetensors")
    state["model.layers.0.mamba.A_log"] = state["model.layers.0.mamba.A_log"].float()
    save_file(state, padded / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (padded / name).write_bytes((text_model / name).read_bytes())
    assert main(["convert", str(padded), str(tmp_path / "vl"), "--to", "ssm_hub_multimodal"]) == 0
    weights = load_file(tmp_path / "vl" / "model.safetensors")
    table = weights["model.language_model.embed_tokens.weight"]
    assert table.shape[0] == len(WORDS) + 4 and table.dtype == torch.bfloat16
    expected = state["model.embed_tokens.weight"][:len(WORDS)].float().mean(0).to(torch.bfloat16)
    assert torch.equal(table[len(WORDS)], expected) and torch.equal(table[len(WORDS) + 1], expected)
    assert weights["model.language_model.layers.0.mamba.A_log"].dtype == torch.float32
    assert weights["model.patch_embed.proj.weight"].dtype == torch.bfloat16


def test_a_hybrid_without_a_tokenizer_is_refused_by_name(text_model, tmp_path, capsys):
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(text_model).save_pretrained(bare)
    assert main(["convert", str(bare), str(tmp_path / "vl"), "--to", "ssm_hub_multimodal"]) == 2
    error = capsys.readouterr().err
    assert f"{bare}: extending with images adds the image tokens to the model's tokenizer, and the folder holds none" \
        in error
