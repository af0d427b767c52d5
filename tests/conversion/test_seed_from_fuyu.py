"""``ssm-hub convert FUYU OUT --to ssm_hub_multimodal --attention-layers SPEC``: a tiny random FuyuForCausalLM
becomes an ssm_hub_multimodal whose ``all`` computes Fuyu's logits on images and text, whose replaced layers are
Mamba-2 layers, and which loads with its processor through the Auto classes."""

import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    FuyuConfig,
    FuyuForCausalLM,
    PreTrainedTokenizerFast,
)

from ssm_hub.cli import main
from ssm_hub.conversion.seeding.from_fuyu import seed_multimodal

WORDS = ["<unk>", "|ENDOFTEXT|", "hello", "world", "describe", "|SPEAKER|", "|NEWLINE|"]
PATCH = 4


@pytest.fixture(scope="module")
def fuyu(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuyu")
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="|ENDOFTEXT|",
                            pad_token="|ENDOFTEXT|").save_pretrained(folder)
    config = FuyuConfig(text_config=dict(model_type="persimmon", hidden_size=32, num_hidden_layers=4,
                                         num_attention_heads=4, intermediate_size=48, vocab_size=len(WORDS),
                                         max_position_embeddings=64),
                        patch_size=PATCH, image_token_id=WORDS.index("|SPEAKER|"))
    torch.manual_seed(0)
    model = FuyuForCausalLM(config).eval()
    with torch.no_grad():  # biases and norm weights random too, so that copying each is checked
        for name, parameter in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                parameter.normal_()
    model.save_pretrained(folder)
    return folder, model


def fuyu_inputs():
    """Two rows, each an image of 8 x 12 pixels (2 rows of 3 patch tokens, each row closed by |NEWLINE|) then
    text: (input_ids, pixel_values as ssm_hub takes them, the flattened patches, (row, column, channel), as Fuyu
    takes them)."""
    image_token, newline = WORDS.index("|SPEAKER|"), WORDS.index("|NEWLINE|")
    ids = torch.tensor([([image_token] * 3 + [newline]) * 2 + [2, 4, 3]] * 2)
    pixels = torch.randn(2, 3, 2 * PATCH, 3 * PATCH)
    patches = pixels.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).reshape(2, 3, 6, PATCH, PATCH)
    return ids, pixels, patches.permute(0, 2, 3, 4, 1).reshape(2, 6, -1)


def test_keeping_every_attention_layer_computes_fuyus_logits(fuyu, tmp_path):
    folder, teacher = fuyu
    assert main(["convert", str(folder), str(tmp_path / "student"), "--to", "ssm_hub_multimodal",
                 "--attention-layers", "all"]) == 0
    student = AutoModelForImageTextToText.from_pretrained(tmp_path / "student").eval()
    assert student.config.mixer_types == ["attention"] * 4 and student.config.attention_qk_norm
    ids, pixels, patches = fuyu_inputs()
    with torch.no_grad():
        expected = teacher(input_ids=ids, pixel_values=patches).logits
        torch.testing.assert_close(student(input_ids=ids, pixel_values=pixels).logits, expected,
                                   rtol=1e-5, atol=1e-5)


def test_replaced_layers_become_mamba2_and_the_processor_speaks_fuyus_tokens(fuyu, tmp_path):
    folder, teacher = fuyu
    seed_multimodal(folder, tmp_path / "student", "every:2:1")
    student = AutoModelForImageTextToText.from_pretrained(tmp_path / "student").eval()
    assert student.config.mixer_types == ["mamba2", "attention", "mamba2", "attention"]
    torch.testing.assert_close(student.model.patch_embed.proj.weight, teacher.model.vision_embed_tokens.weight)
    torch.testing.assert_close(student.model.language_model.layers[0].feed_forward.up_proj.weight,
                               teacher.model.language_model.layers[0].mlp.dense_h_to_4h.weight)
    processor = AutoProcessor.from_pretrained(tmp_path / "student")
    assert (processor.image_token, processor.image_row_end_token) == ("|SPEAKER|", "|NEWLINE|")
    assert (processor.image_token_id, processor.image_row_end_token_id) == (
        student.config.image_token_id, student.config.image_row_end_token_id)
    inputs = processor(text=["|SPEAKER| describe"], images=[np.full((8, 12, 3), 40, dtype=np.uint8)])
    assert inputs["input_ids"][0].tolist()[:8] == [5, 5, 5, 6, 5, 5, 5, 6]
    with torch.no_grad():
        out = student.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=1, eos_token_id=None)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert json.loads((tmp_path / "student" / "seeding.json").read_text())["teacher_model_type"] == "fuyu"


def test_only_fuyu_seeds_a_multimodal_student(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=48, vocab_size=16)).save_pretrained(tmp_path / "llama")
    assert main(["convert", str(tmp_path / "llama"), str(tmp_path / "out"), "--to", "ssm_hub_multimodal",
                 "--attention-layers", "all"]) == 2
    assert "takes a FuyuForCausalLM (model_type 'fuyu'), got model_type 'llama'" in capsys.readouterr().err


def test_a_student_seeded_from_fuyu_distils_on_captioned_scenes(fuyu, tmp_path):
    """mmMamba's stages on image-text data: alignment of the replaced layers on Fuyu's hidden states (images
    included), then KL; the evaluations count the caption tokens; the student and its processor are saved."""
    folder, _ = fuyu
    seed_multimodal(folder, tmp_path / "student", "every:2:1")
    output = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(folder), "--student", str(tmp_path / "student"), "--output",
                 str(output), "--builtin", "shapes", "--max-documents", "48", "--eval-fraction", "0.25",
                 "--align-steps", "6", "--kl-steps", "6", "--batch-size", "4", "--learning-rate", "3e-3",
                 "--speed-contexts"]) == 0
    report = json.loads((output / "distillation.json").read_text())
    evaluations = report["evaluations"]
    assert list(evaluations) == ["seeded", "after_align", "after_kl"]
    # Alignment brings the student towards the teacher. (The tiny random teacher's next-token distributions are
    # nearly flat, so the seeded KL is already small and the KL stage's few Adam steps mostly move in its noise.)
    assert evaluations["after_align"]["mean_token_kl"] < evaluations["seeded"]["mean_token_kl"]
    align = [loss for _, loss in report["train_loss"]["align"]]
    assert align[-1] < align[0] and all(math.isfinite(loss) for _, loss in report["train_loss"]["kl"])
    # Counted: the held-out captions' tokens and their ends (12 scenes), no image, row-end or padding token.
    from ssm_hub.training.shapes import ShapeScenes

    processor = AutoProcessor.from_pretrained(output)
    captions = ShapeScenes(12, seed=1, split="held_out").captions()
    expected = sum(len(processor.tokenizer(caption, add_special_tokens=False).input_ids) + 1 for caption in captions)
    assert evaluations["seeded"]["tokens"] == expected  # the first, predicted from the image's last row end
    student = AutoModelForImageTextToText.from_pretrained(output)
    assert student.config.mixer_types == ["mamba2", "attention", "mamba2", "attention"]
    assert AutoProcessor.from_pretrained(output).image_token == "|SPEAKER|"
