"""transformers' common model tests on ssm_hub_multimodal and on its native control, Fuyu (FuyuForCausalLM).

Fuyu is the architectural match among transformers' image-text models: decoder-only, no vision encoder, image patches
embedded by one linear layer in place of placeholder tokens, each row of an image closed by a row-end token. Both
sides get the same token layout and images drawn the same way (one a row), each in its own format: Fuyu the flattened
patches (``pixel_values`` [batch, patches, patch_size**2 * channels], transformers 5.25's form of ``image_patches``;
the placeholders, ``image_token_id``, replace ``image_patches_indices``), ours the images (``pixel_values``
[images, channels, height, width] with ``image_sizes``).
"""

import sys

import pytest
import torch
from transformers import FuyuConfig, FuyuForCausalLM, FuyuModel

import ssm_hub
from common_harness import COMMON_FLAGS, TinyImageTextTester, control_and_ours
from ssm_hub.layers.patch_embedding import image_patches
from transformers_test_sources import load_common_tests

pytestmark = pytest.mark.transformers_common

IMAGE_TOKEN_ID, ROW_END_TOKEN_ID = 70, 71
# max_position_embeddings on both sides (Fuyu's default is 16384, ours 262144): the RoPE scaling tests run a sequence
# of 1.5 times it.
TEXT_SIZES = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, pad_token_id=0,
    max_position_embeddings=64,
)
IMAGE_SIDE = dict(patch_size=4, num_channels=3, image_token_id=IMAGE_TOKEN_ID)
# The eager-vs-sdpa tests keep only the main input and these: the images go in too.
FLAGS = dict(additional_model_inputs=("pixel_values", "image_sizes"), **COMMON_FLAGS)
COMMON_TESTS = load_common_tests()


@pytest.fixture(autouse=True)
def input_ids_without_placeholders(monkeypatch):
    """The RoPE tests draw input_ids over the whole vocabulary (ids_tensor), so a row holds the image placeholder by
    chance: ours refuses an image token without an image, Fuyu reads it as text. Both sides draw below the special
    ids instead, as the testers' own inputs do."""
    module = sys.modules[COMMON_TESTS.ModelTesterMixin.__module__]
    draw = module.ids_tensor
    first_special_id = min(IMAGE_TOKEN_ID, ROW_END_TOKEN_ID)
    monkeypatch.setattr(module, "ids_tensor", lambda shape, vocab_size, rng=None, name=None:
                        draw(shape, min(vocab_size, first_special_id), rng, name))


class FuyuImageInputs(TinyImageTextTester):
    row_end_token_id = ROW_END_TOKEN_ID

    def image_inputs(self, images):
        patches = [image_patches(image, self.patch_size).flatten(0, 1) for image in images]
        return {"pixel_values": torch.stack(patches)}


class SsmHubImageInputs(TinyImageTextTester):
    row_end_token_id = ROW_END_TOKEN_ID

    def image_inputs(self, images):
        return {"pixel_values": images, "image_sizes": torch.tensor([list(images.shape[-2:])] * len(images))}


TestFuyuControl, TestMultimodalAsFuyu = control_and_ours(
    COMMON_TESTS,
    "multimodal",
    control=dict(
        config_class=FuyuConfig,
        config_fields=dict(text_config=TEXT_SIZES, **IMAGE_SIDE),
        model_classes=(FuyuModel, FuyuForCausalLM),
        tester=FuyuImageInputs,
    ),
    ours=dict(
        config_class=ssm_hub.SsmHubMultimodalConfig,
        # A Mamba-2 layer and an attention layer, the image tokens routed through their own projections, MLPs and
        # norms: every part the image path has.
        config_fields=dict(
            **TEXT_SIZES, **IMAGE_SIDE, image_row_end_token_id=ROW_END_TOKEN_ID, num_key_value_heads=2,
            mixer_types=["mamba2", "attention"], ffn_types=["mlp", "mlp"], mamba_d_state=8, mamba_d_head=8,
            mamba_chunk_size=8, mixture_of_mamba=True, modality_mlps=True, modality_norms=True,
        ),
        model_classes=(ssm_hub.SsmHubMultimodalModel, ssm_hub.SsmHubMultimodalForConditionalGeneration),
        tester=SsmHubImageInputs,
        head_names=dict(
            base="SsmHubMultimodalModel", causal_lm="SsmHubMultimodalForConditionalGeneration",
            image_text_to_text="SsmHubMultimodalForConditionalGeneration",
        ),
    ),
    flags=FLAGS,
)
