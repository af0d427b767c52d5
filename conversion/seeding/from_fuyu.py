"""Seed an ssm_hub_multimodal from transformers' FuyuForCausalLM (a decoder-only vision-language transformer without
a vision encoder): its patch projection and every weight that is not attention are copied, and the attention layers
not kept become Mamba-2 layers seeded from them, as ssm_hub.conversion.seeding.from_attention seeds a hybrid from a
Persimmon (Fuyu's decoder).

    from ssm_hub.conversion.seeding.from_fuyu import seed_multimodal
    seed_multimodal("adept/fuyu-8b", "fuyu-hybrid", attention_layers="every:4:3")

or from a shell: ``ssm-hub convert FUYU OUT --to ssm_hub_multimodal --attention-layers SPEC``.

Fuyu lays an image out as ssm_hub_multimodal does: rows of patch tokens ("|SPEAKER|", its image_token_id), each row
closed by "|NEWLINE|"; the patches are flattened in the same (row, column, channel) order, so vision_embed_tokens
becomes the patch embedding as it is, and ``--attention-layers all`` computes Fuyu's logits. The output holds the
model, Fuyu's tokenizer and an ssm_hub processor with Fuyu's tokens, patch size and normalisation (mean and std 0.5).
Fuyu's own processor pads images to a fixed canvas; this one resizes them to multiples of the patch size instead.
"""

import json
from pathlib import Path

import torch

from ssm_hub.conversion.formats.checkpoint import parse_dtype, read_config, read_weights, save_weights, source_and_output
from ssm_hub.conversion.seeding.extend_with_images import multimodal_config, under_language_model
from ssm_hub.conversion.seeding.from_attention import SEEDING_FILE, seeded_student
from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor
from ssm_hub.models.multimodal.modeling_multimodal import SsmHubMultimodalForConditionalGeneration
from ssm_hub.models.multimodal.processing_multimodal import SsmHubMultimodalProcessor
from ssm_hub.output_folder import staged_model_folder

NEWLINE_TOKEN = "|NEWLINE|"  # Fuyu's row end
# Where Fuyu's parts are, in transformers v5's layout and in the older one of the Hub checkpoints: (prefix in the
# checkpoint, prefix in PersimmonForCausalLM's names).
LANGUAGE_MODEL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                           ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
PATCH_PROJECTION_PREFIXES = ("model.vision_embed_tokens.", "vision_embed_tokens.")


def split_fuyu_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the decoder's tensors in PersimmonForCausalLM's names, the patch projection's {"weight", "bias"})."""
    decoder, patch = {}, {}
    for name, tensor in weights.items():
        projection = next((prefix for prefix in PATCH_PROJECTION_PREFIXES if name.startswith(prefix)), None)
        if projection is not None:
            patch[name[len(projection):]] = tensor
            continue
        source, target = next(((s, t) for s, t in LANGUAGE_MODEL_PREFIXES if name.startswith(s)), (None, None))
        if source is None:
            raise ValueError(f"the Fuyu checkpoint has a tensor with no place in the student: {name}")
        decoder[target + name[len(source):]] = tensor
    if set(patch) != {"weight", "bias"}:
        raise ValueError(f"the Fuyu checkpoint's patch projection (vision_embed_tokens) should have a weight and a "
                         f"bias, got {sorted(patch)}")
    return decoder, patch


def seed_multimodal(teacher: str | Path, output_dir: str | Path, attention_layers: str = "all",
                    dtype: str | torch.dtype | None = None, seed: int = 0, mixer_init: str = "attention") -> Path:
    """Write an ssm_hub_multimodal seeded from the Fuyu ``teacher`` (a folder or a Hub id) to ``output_dir``, keeping
    the attention layers ``attention_layers`` names (module docstring); returns the output folder."""
    from transformers import AutoTokenizer

    source_dir, output_dir = source_and_output(teacher, output_dir)
    fuyu = read_config(source_dir)
    if fuyu.get("model_type") != "fuyu":
        raise ValueError(f"{teacher}: seeding an ssm_hub_multimodal takes a FuyuForCausalLM (model_type 'fuyu'), got "
                         f"model_type {fuyu.get('model_type')!r}; a text-only ssm_hub_hybrid is extended instead "
                         "without --attention-layers")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except (OSError, ValueError) as error:
        raise ValueError(f"{teacher}: seeding from Fuyu needs its tokenizer (for the {NEWLINE_TOKEN} token): {error}")
    newline = tokenizer.convert_tokens_to_ids(NEWLINE_TOKEN)
    if newline is None or newline == tokenizer.unk_token_id:
        raise ValueError(f"{teacher}: the tokenizer has no {NEWLINE_TOKEN} token, which ends each row of patches")
    image_token = tokenizer.convert_ids_to_tokens(fuyu["image_token_id"])
    decoder_config = {**fuyu["text_config"], "model_type": "persimmon"}
    decoder, patch = split_fuyu_weights(read_weights(source_dir, teacher, parse_dtype(dtype)))
    config, seeded, record = seeded_student(decoder_config, decoder, source_dir, attention_layers, seed, mixer_init)
    multimodal = multimodal_config(
        config.to_dict(), patch_size=fuyu["patch_size"], num_channels=fuyu.get("num_channels", 3),
        image_token_id=fuyu["image_token_id"], image_row_end_token_id=newline)
    weights = under_language_model(seeded)
    weights.update({f"model.patch_embed.proj.{kind}": tensor for kind, tensor in patch.items()})
    image_processor = SsmHubMultimodalImageProcessor(patch_size=fuyu["patch_size"], image_mean=[0.5] * 3,
                                                     image_std=[0.5] * 3)
    with staged_model_folder(output_dir) as staging:  # moved into place once complete
        save_weights(SsmHubMultimodalForConditionalGeneration, multimodal, weights, staging)
        SsmHubMultimodalProcessor(image_processor, tokenizer, image_token=image_token,
                                  image_row_end_token=NEWLINE_TOKEN).save_pretrained(staging)
        (staging / SEEDING_FILE).write_text(
            json.dumps({"teacher": str(teacher), **record, "teacher_model_type": "fuyu"}, indent=1) + "\n")
    return output_dir
