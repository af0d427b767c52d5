"""``ssm-hub push``: the model card from a distilled folder, and the round trip push -> from_pretrained against a
local Hub-compatible server (tests/hub/hub_server.py), each side in its own process with HF_ENDPOINT set, as a user
would run them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import with_short_chunks
from hub_server import hub_server
from ssm_hub.conversion.publishing.push import render_model_card
from ssm_hub.conversion.seeding.from_attention import seed_hybrid


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A student seeded from a tiny Llama and distilled for a few steps on CPU."""
    from pydoc_data.topics import topics

    from ssm_hub.cli import main
    from ssm_hub.training.data import train_tokenizer

    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=48, vocab_size=300, tie_word_embeddings=False)
                     ).save_pretrained(folder / "teacher")
    train_tokenizer([topics[key] for key in sorted(topics)][:100], 300).save_pretrained(folder / "teacher")
    with_short_chunks(seed_hybrid(folder / "teacher", folder / "student", "1"))
    assert main(["distill", "--teacher", str(folder / "teacher"), "--student", str(folder / "student"),
                 "--output", str(folder / "distilled"), "--builtin", "python_docs", "--max-documents", "40",
                 "--seq-len", "32", "--eval-fraction", "0.2", "--align-steps", "2", "--kl-steps", "2",
                 "--batch-size", "2", "--speed-contexts", "32"]) == 0
    return folder / "distilled"


def test_model_card_tells_how_the_model_was_made(distilled):
    card = render_model_card(distilled, "me/tiny-hybrid", base_model="meta-llama/Llama-3.2-1B")
    metadata = card.split("---")[1]
    assert "base_model: meta-llama/Llama-3.2-1B" in metadata and "library_name: transformers" in metadata
    assert "- ssm_hub_hybrid" in metadata and "- distillation" in metadata
    assert "1 attention (1) and 1 SSM layers" in card
    assert "--attention-layers 1" in card and "align_steps 2, kl_steps 2" in card
    report = json.loads((distilled / "distillation.json").read_text())
    after_kl = report["evaluations"]["after_kl"]
    assert f"| after_kl | {after_kl['teacher_perplexity']:.2f} | {after_kl['student_perplexity']:.2f} |" in card
    assert "![training loss, align](align/loss_curve.png)" in card
    speed = report["speed"][0]
    assert f"| 32 | {speed['student']['decode_tokens_per_second']:,.0f} |" in card
    first = report["samples"]["after_kl"][0]
    assert "Greedy completions of held-out openings (after_kl)" in card and " ".join(first["prompt"].split()) in card
    assert 'from_pretrained("me/tiny-hybrid")' in card
    # The teacher here is a local folder, not a Hub id: no base_model unless one is given.
    assert "base_model" not in render_model_card(distilled, "me/tiny-hybrid").split("---")[1]


def test_a_multimodal_models_card_says_image_text_to_text_and_shows_the_processor(tmp_path):
    import ssm_hub

    ssm_hub.SsmHubMultimodalForConditionalGeneration(ssm_hub.SsmHubMultimodalConfig(
        vocab_size=16, hidden_size=32, num_hidden_layers=2, mixer_types=["mamba2", "attention"],
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, mamba_d_head=16, patch_size=8,
        image_token_id=14, image_row_end_token_id=15, mixture_of_mamba=True)).save_pretrained(tmp_path)
    card = render_model_card(tmp_path, "me/tiny-vl")
    assert "pipeline_tag: image-text-to-text" in card.split("---")[1]
    assert "1 attention (1) and 1 SSM layers" in card and "8-pixel patches" in card and "take own Mamba-2" in card
    assert 'AutoModelForImageTextToText.from_pretrained("me/tiny-vl")' in card
    assert 'AutoProcessor.from_pretrained("me/tiny-vl")' in card and "AutoTokenizer" not in card


def test_a_folder_without_an_ssm_hub_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="holds no ssm_hub model"):
        render_model_card(tmp_path, "me/x")


def test_push_then_from_pretrained_round_trip(distilled, tmp_path):
    with hub_server() as hub:
        environment = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "test-token",
                       "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
        pushed = subprocess.run([sys.executable, "-m", "ssm_hub.cli", "push", str(distilled), "me/tiny-hybrid"],
                                env=environment, capture_output=True, text=True)
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        files = hub.repos["me/tiny-hybrid"]
        assert {"config.json", "model.safetensors", "README.md", "distillation.json", "seeding.json",
                "tokenizer.json", "align/loss_curve.png"} <= set(files)
        assert not any("checkpoint-" in name for name in files)
        check = ("import torch, ssm_hub\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 "model = AutoModelForCausalLM.from_pretrained('me/tiny-hybrid')\n"
                 "tokenizer = AutoTokenizer.from_pretrained('me/tiny-hybrid')\n"
                 f"local = AutoModelForCausalLM.from_pretrained({str(distilled)!r})\n"
                 "ids = tokenizer('the quick brown fox', return_tensors='pt').input_ids\n"
                 "torch.testing.assert_close(model(ids).logits, local(ids).logits, rtol=0, atol=0)\n"
                 "print('round trip', type(model).__name__)\n")
        loaded = subprocess.run([sys.executable, "-c", check], env=environment, capture_output=True, text=True,
                                cwd=tmp_path)
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        assert "round trip SsmHubHybridForCausalLM" in loaded.stdout
        # Every request about the repo was served (huggingface_hub also probes routes of its own, which get 404).
        assert [request for request in hub.unknown if "tiny-hybrid" in request] == []
