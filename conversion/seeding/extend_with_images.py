"""Give a text-only ssm_hub model eyes: an ssm_hub_hybrid checkpoint becomes an ssm_hub_multimodal one with a fresh
patch embedding, and its tokenizer a processor with the image tokens.

    from ssm_hub.conversion.seeding.extend_with_images import extend_with_images
    extend_with_images("my-hybrid", "my-hybrid-vl", patch_size=16, mixture_of_mamba=True)

or from a shell: ``ssm-hub convert my-hybrid my-hybrid-vl --to ssm_hub_multimodal [--patch-size 16] [--merge-size 1]
[--mixture-of-mamba] [--modality-mlps] [--modality-norms]``.

Every weight of the text model is kept, in its stored dtype, so on text the new model computes what the old one did
(its logits gain the new tokens' columns where the table grows). What is new:
- the patch embedding, initialised as a new model's (in the embeddings' dtype);
- the embedding rows (and untied LM-head rows) of ``<image>`` and ``<image_row_end>`` where the tokenizer lacked
  them: the mean of the rows of the tokens it had, also where the table already had spare rows for them (padded
  vocabularies), so that no untrained row is read;
- with Mixture-of-Mamba, the image tokens' own projections, MLPs and norms: copies of the text ones, so the image
  path starts as the text path and training makes it its own.
The output folder holds the model, its code and the processor (AutoProcessor loads it).
"""

from pathlib import Path

import torch

from ssm_hub.conversion.formats.checkpoint import (
    VOCABULARY_FILES,
    has_tokenizer,
    parse_dtype,
    read_config,
    read_weights,
    source_and_output,
)
from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig
from ssm_hub.models.multimodal.configuration_multimodal import SsmHubMultimodalConfig
from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor
from ssm_hub.models.multimodal.modeling_multimodal import SsmHubMultimodalForConditionalGeneration
from ssm_hub.models.multimodal.processing_multimodal import SsmHubMultimodalProcessor
from ssm_hub.output_folder import staged_model_folder

# A hybrid's config.json fields that are not the architecture's.
NOT_ARCHITECTURE = ("model_type", "architectures", "auto_map", "transformers_version", "dtype")
MODALITY_COPIES = ("modality_in_proj.0", "modality_out_proj.0", "modality_input_layernorm.0",
                   "modality_pre_ff_layernorm.0", "modality_feed_forward.0")


def multimodal_config(hybrid_fields: dict, **image_fields) -> SsmHubMultimodalConfig:
    """The ssm_hub_multimodal config over a hybrid's (its config.json fields; ``image_fields`` override)."""
    fields = {name: value for name, value in hybrid_fields.items() if name not in NOT_ARCHITECTURE}
    return SsmHubMultimodalConfig(**{**fields, **image_fields})


def under_language_model(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A hybrid's tensors named for the multimodal model, which keeps the hybrid's ``model.`` under
    ``model.language_model.`` (the LM head stays where it is)."""
    return {(f"model.language_model.{name[len('model.'):]}" if name.startswith("model.") else name): tensor
            for name, tensor in weights.items()}


def extend_with_images(source: str | Path, output_dir: str | Path, patch_size: int = 16, merge_size: int = 1,
                       max_image_size: int = 512, mixture_of_mamba: bool = False, modality_mlps: bool = False,
                       modality_norms: bool = False, dtype: str | torch.dtype | None = None) -> Path:
    """Write the extended model and its processor to ``output_dir`` (module docstring); returns the folder."""
    from transformers import AutoTokenizer

    source_dir, output_dir = source_and_output(source, output_dir)
    text_config = read_config(source_dir)
    if text_config.get("model_type") != SsmHubHybridConfig.model_type:
        raise ValueError(f"{source}: extending with images takes an {SsmHubHybridConfig.model_type} checkpoint, got "
                         f"model_type {text_config.get('model_type')!r}")
    if not has_tokenizer(source_dir):
        raise ValueError(f"{source}: extending with images adds the image tokens to the model's tokenizer, and the "
                         f"folder holds none (none of {', '.join(VOCABULARY_FILES)}): copy into it the tokenizer of "
                         "the model it was converted or seeded from")
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    known_tokens = len(tokenizer)
    processor = SsmHubMultimodalProcessor(
        SsmHubMultimodalImageProcessor(patch_size=patch_size, merge_size=merge_size, max_image_size=max_image_size),
        tokenizer)
    weights = read_weights(source_dir, source, parse_dtype(dtype))
    old_rows = text_config["vocab_size"]
    config = multimodal_config(
        text_config, vocab_size=max(old_rows, len(tokenizer)), patch_size=patch_size, merge_size=merge_size,
        image_token_id=processor.image_token_id, image_row_end_token_id=processor.image_row_end_token_id,
        mixture_of_mamba=mixture_of_mamba, modality_mlps=modality_mlps, modality_norms=modality_norms)
    model = SsmHubMultimodalForConditionalGeneration(config)  # the patch embedding starts as a new model's
    renamed = under_language_model(weights)
    added = list(range(known_tokens, len(processor.tokenizer)))
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in renamed and added:
            table = renamed[name]
            mean = table[:known_tokens].float().mean(dim=0).to(table.dtype)
            table = torch.cat([table, table.new_zeros(config.vocab_size - old_rows, table.shape[1])])
            table[added] = mean
            renamed[name] = table
    state = model.state_dict()
    for name in state:
        for copy in MODALITY_COPIES:
            if copy in name:
                renamed[name] = renamed[name.replace(copy, copy.removeprefix("modality_").removesuffix(".0"))].clone()
    # assign: every loaded tensor keeps its stored dtype (some checkpoints keep A_log and D in float32).
    missing, unexpected = model.load_state_dict(renamed, strict=False, assign=True)
    tied = {key for key in missing if key == "lm_head.weight" and config.tie_word_embeddings}
    new = {key for key in missing if key.startswith("model.patch_embed.")}
    if unexpected or set(missing) - tied - new:
        raise ValueError(f"{source}: the checkpoint does not fit its own config: missing "
                         f"{sorted(set(missing) - tied - new)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.model.patch_embed.to(model.get_input_embeddings().weight.dtype)
    model.config.dtype = model.get_input_embeddings().weight.dtype
    with staged_model_folder(output_dir) as staging:  # moved into place once complete
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return output_dir
