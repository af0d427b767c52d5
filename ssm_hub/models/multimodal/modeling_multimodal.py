"""ssm_hub's decoder-only vision-language model (model_type ``ssm_hub_multimodal``): mmMamba's layout (no vision
encoder; image patches and text in one causal stream through an SSM or hybrid stack) with Mixture-of-Mamba's
per-modality projections as an option.

    import ssm_hub
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text="<image>What is drawn?", images=image, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=20)

``pixel_values`` [images, C, H, W] (padded at the bottom and right to one size) with ``image_sizes`` [images, 2]
(each image's own height and width, multiples of patch_size * merge_size) are embedded by a linear patch embedding
(ssm_hub.layers.patch_embedding) and put, image after image in raster order, where ``input_ids`` holds
``image_token_id``; every row of an image's tokens ends with ``image_row_end_token_id``, an ordinary embedded
token. The backbone is the hybrid stack (ssm_hub.models.hybrid) under ``model.language_model``; with
``mixture_of_mamba`` / ``modality_mlps`` / ``modality_norms`` its blocks route image tokens (placeholders and row
ends) through their own projections, MLPs and norms. Generation prefills image and text together, then decodes
text through transformers' cache (generate passes the images at the prefill only).

A batch without images leaves the patch embedding (and the image tokens' own modules) without gradients; under
DDP, training on data that mixes such batches in needs ``train.ddp_find_unused_parameters: true``.
"""

import torch
from torch import nn
from transformers.cache_utils import Cache

from ssm_hub.generation import GraphDecodingGenerationMixin
from ssm_hub.layers.modality_routing import ModalityRouting
from ssm_hub.layers.patch_embedding import PatchEmbedding
from ssm_hub.models.hybrid.modeling_hybrid import (
    HybridCausalLMOutput,
    HybridModelOutput,
    ModalityLayout,
    SsmHubHybridModel,
    SsmHubHybridPreTrainedModel,
)
from ssm_hub.models.multimodal.configuration_multimodal import MODALITIES, SsmHubMultimodalConfig

IMAGE = MODALITIES.index("image")


class SsmHubMultimodalPreTrainedModel(SsmHubHybridPreTrainedModel):
    config_class = SsmHubMultimodalConfig
    _no_split_modules = ["HybridBlock", "PatchEmbedding"]


class SsmHubMultimodalModel(SsmHubMultimodalPreTrainedModel):
    """Patch embedding + the hybrid backbone (``language_model``), which reads the images' embeddings in place of
    their placeholder tokens."""

    def __init__(self, config: SsmHubMultimodalConfig):
        super().__init__(config)
        self.patch_embed = PatchEmbedding(config.num_channels, config.patch_size, config.merge_size, config.hidden_size)
        layout = ModalityLayout(len(MODALITIES), config.mixture_of_mamba, config.modality_mlps, config.modality_norms) \
            if config.routes_modalities else None
        self.language_model = SsmHubHybridModel(config, modalities=layout)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.language_model.embed_tokens = embeddings

    def embed_inputs(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None,
                     image_sizes: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, ModalityRouting | None]:
        """(token embeddings with the images' patch embeddings in place of their placeholders, the modality routing
        or None where every token takes the text path). ``inputs_embeds``: the token embeddings, given instead of
        looked up; ``input_ids`` then only needs to say where the image tokens are (:meth:`image_token_ids`)."""
        config = self.config
        embeddings = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
        if config.image_token_id is None:
            if pixel_values is not None:
                raise ValueError("config.image_token_id is not set, so the images have no place in input_ids; set it "
                                 "(and image_row_end_token_id) to the processor's image token ids")
            return embeddings, None
        placeholders = input_ids == config.image_token_id
        if pixel_values is None:
            # A decode step's token is text; a longer input with placeholders but no images would embed the
            # placeholder token itself where an image should be.
            if input_ids.shape[1] > 1 and bool(placeholders.any()):
                raise ValueError(f"input_ids hold {int(placeholders.sum())} image tokens (id {config.image_token_id})"
                                 " but no pixel_values were given")
            return embeddings, None
        patches = self.patch_embed(pixel_values, image_sizes)  # checks the image sizes first
        self.images_of_rows(input_ids, pixel_values, image_sizes)  # each row's placeholders take whole images
        embeddings = embeddings.masked_scatter(placeholders[..., None], patches.to(embeddings.dtype))
        return embeddings, self.modality_routing(input_ids)

    def image_token_ids(self, inputs_embeds: torch.Tensor) -> torch.LongTensor:
        """Where only embeddings are given: [B, T] ids holding ``image_token_id`` and ``image_row_end_token_id``
        where ``inputs_embeds`` holds those tokens' embeddings, -1 elsewhere (how transformers' image-text models
        find placeholders in inputs_embeds)."""
        ids = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        table = self.get_input_embeddings().weight
        for token_id in (self.config.image_token_id, self.config.image_row_end_token_id):
            if token_id is not None:
                ids[(inputs_embeds == table[token_id].to(inputs_embeds)).all(dim=-1)] = token_id
        return ids

    def modality_routing(self, input_ids: torch.LongTensor) -> ModalityRouting | None:
        """Which tokens of ``input_ids`` (holding images) take the image path: the placeholders and the row ends;
        None where the blocks have nothing per modality."""
        config = self.config
        if not config.routes_modalities:
            return None
        image_tokens = input_ids == config.image_token_id
        if config.image_row_end_token_id is not None:
            image_tokens = image_tokens | (input_ids == config.image_row_end_token_id)
        return ModalityRouting.from_ids(image_tokens.long() * IMAGE, len(MODALITIES))

    def images_of_rows(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor,
                       image_sizes: torch.Tensor | None) -> list[list[int]]:
        """The indices of the images each row of ``input_ids`` holds, in order: the images fill the rows'
        placeholders one after the other, and a row must end on a whole image (ValueError naming the counts)."""
        if image_sizes is None:
            image_sizes = torch.tensor([list(pixel_values.shape[-2:])] * pixel_values.shape[0])
        grids = self.patch_embed.token_grid(image_sizes)
        tokens_per_image = [rows * cols for rows, cols in grids]
        tokens_per_row = (input_ids == self.config.image_token_id).sum(dim=1).tolist()
        rows, image = [], 0
        for row, wanted in enumerate(tokens_per_row):
            first = image
            while wanted > 0 and image < len(tokens_per_image):
                wanted -= tokens_per_image[image]
                image += 1
            if wanted != 0:
                raise ValueError(
                    f"row {row} of input_ids does not hold whole images: the rows hold {tokens_per_row} image tokens "
                    f"(id {self.config.image_token_id}) and the {len(grids)} image(s) give {tokens_per_image} "
                    f"(token grids, rows x cols: {grids}); build the inputs with the model's processor")
            rows.append(list(range(first, image)))
        if image != len(tokens_per_image):
            raise ValueError(f"input_ids hold {sum(tokens_per_row)} image tokens (id {self.config.image_token_id}) "
                             f"but the {len(grids)} image(s) give {sum(tokens_per_image)}; build the inputs with "
                             "the model's processor")
        return rows

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HybridModelOutput | tuple:
        r"""
        pixel_values: [images, channels, height, width], the batch's images in the order of their placeholders
            (row by row), padded at the bottom and right to one size.
        image_sizes: [images, 2], each image's own height and width (default: pixel_values' full size).
        inputs_embeds: instead of input_ids; with pixel_values, the image tokens are where it holds their embeddings.
        The other arguments are the hybrid model's (ssm_hub.models.hybrid.modeling_hybrid.SsmHubHybridModel).
        """
        routing = None
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass exactly one of input_ids or inputs_embeds")
            inputs_embeds, routing = self.embed_inputs(input_ids, pixel_values, image_sizes)
        elif input_ids is not None:
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        elif pixel_values is not None:
            inputs_embeds, routing = self.embed_inputs(self.image_token_ids(inputs_embeds), pixel_values, image_sizes,
                                                       inputs_embeds=inputs_embeds)
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits, return_dict=return_dict, modality=routing, **kwargs,
        )


class SsmHubMultimodalForConditionalGeneration(SsmHubMultimodalPreTrainedModel, GraphDecodingGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: SsmHubMultimodalConfig):
        super().__init__(config)
        self.model = SsmHubMultimodalModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, embeddings: nn.Embedding) -> None:
        self.model.set_input_embeddings(embeddings)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> HybridCausalLMOutput | tuple:
        r"""
        pixel_values, image_sizes: the images (SsmHubMultimodalModel.forward).
        labels: token ids, shifted inside the loss; -100 is ignored (the processor's image tokens are ordinary ids:
            mask them with -100 to keep them out of the loss).
        The other arguments are the hybrid causal LM's.
        """
        return self._causal_lm_forward(
            labels, logits_to_keep, return_dict, attention_mask, input_ids=input_ids, pixel_values=pixel_values,
            image_sizes=image_sizes, position_ids=position_ids, inputs_embeds=inputs_embeds, cache=cache,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits, **kwargs,
        )

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """transformers repeats every tensor along dim 0; the images are not one per row, so they are repeated
        with the row they belong to instead (beam search, num_return_sequences)."""
        pixel_values, image_sizes = model_kwargs.pop("pixel_values", None), model_kwargs.pop("image_sizes", None)
        if pixel_values is not None and expand_size > 1:
            if input_ids is None:
                raise ValueError("generating from images needs input_ids (the placeholders say where the images go)")
            order = torch.tensor([index for images in self.model.images_of_rows(input_ids, pixel_values, image_sizes)
                                  for _ in range(expand_size) for index in images],
                                 dtype=torch.long, device=pixel_values.device)
            pixel_values = pixel_values[order]
            image_sizes = image_sizes[order] if image_sizes is not None else None
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
            if image_sizes is not None:
                model_kwargs["image_sizes"] = image_sizes
        return expanded_ids, model_kwargs


# Auto classes these models answer to; ssm_hub.auto registers them and checkpoints carry them as auto_map.
AUTO_MAP = {
    "AutoModel": "SsmHubMultimodalModel",
    "AutoModelForImageTextToText": "SsmHubMultimodalForConditionalGeneration",
    "AutoModelForCausalLM": "SsmHubMultimodalForConditionalGeneration",
}
