"""Processor of ssm_hub's decoder-only vision-language SSM (model_type ``ssm_hub_multimodal``): text and images in,
``input_ids``, ``attention_mask``, ``pixel_values`` and ``image_sizes`` out.

    from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor
    from ssm_hub.models.multimodal.processing_multimodal import SsmHubMultimodalProcessor
    processor = SsmHubMultimodalProcessor(SsmHubMultimodalImageProcessor(), tokenizer)   # any transformers tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt, "no image here"], images=[[image], []], padding=True)
    model.config.image_token_id = processor.image_token_id                  # what the model looks for
    model.config.image_row_end_token_id = processor.image_row_end_token_id

A user writes ``<image>`` once per image. The processor replaces it, for each of the image's entries (one, or its
tiles in row-major order), with ``rows x ("<image>" * cols + "<image_row_end>")``, rows and cols being the entry's
token grid (SsmHubMultimodalImageProcessor.num_image_tokens). The model puts the patch embeddings in place of the
``<image>`` tokens; ``<image_row_end>`` closes each row of patches, as Fuyu's newline token does, so that a 1-D scan
knows the 2-D layout. Both tokens are added to the tokenizer as special tokens when it lacks them: the model's
embedding must then be resized to ``len(processor.tokenizer)``.
"""

from transformers.processing_utils import ProcessorMixin

from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor, flatten_images
from ssm_hub.models.remote_code import save_with_remote_code

# One turn per message: "<|role|>\n", the content, the tokenizer's eos token (nothing if it has none) and "\n".
# Content is a string, or a list of {"type": "text", "text": ...} and {"type": "image"} items written one after the
# other, each image item as the <image> placeholder. add_generation_prompt appends "<|assistant|>\n". The role
# markers are plain text, not special tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{- '<image>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- else -%}"
    "{{- raise_exception('content items must have type \"text\" or \"image\", got ' + item['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- (eos_token or '') + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- endif -%}"
)


def _is_nested(images) -> bool:
    """True for a list of lists (one list of images per text); a mix of lists and images raises."""
    if not isinstance(images, (list, tuple)) or not images:
        return False
    nested = [isinstance(item, (list, tuple)) for item in images]
    if any(nested) and not all(nested):
        raise ValueError(
            "images must be one image, a flat list of images or a list of lists (one per text), got a list mixing "
            f"lists and images (list at positions {[i for i, is_list in enumerate(nested) if is_list]})"
        )
    return all(nested)


class SsmHubMultimodalProcessor(ProcessorMixin):
    """Tokenizer + SsmHubMultimodalImageProcessor, with the ``<image>`` placeholders expanded to token grids.

    Args:
        image_processor: an SsmHubMultimodalImageProcessor.
        tokenizer: any transformers tokenizer; ``image_token`` and ``image_row_end_token`` are added to it (as
            special tokens) when it lacks them.
        chat_template: a Jinja chat template; default DEFAULT_CHAT_TEMPLATE (see there), with ``image_token`` for
            its image slots.
        image_token, image_row_end_token: the placeholder / patch token and the row-end token (a model converted
            from Fuyu uses Fuyu's, "|SPEAKER|" and "|NEWLINE|").
    """

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None, image_token: str = "<image>",
                 image_row_end_token: str = "<image_row_end>"):
        if chat_template is None:
            chat_template = DEFAULT_CHAT_TEMPLATE.replace("<image>", image_token)
        self.image_token, self.image_row_end_token = image_token, image_row_end_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        added = tokenizer.get_added_vocab()
        missing = [token for token in (self.image_token, self.image_row_end_token) if token not in added]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_row_end_token_id = tokenizer.convert_tokens_to_ids(self.image_row_end_token)

    def __call__(self, text=None, images=None, padding=False, return_tensors="pt", **kwargs):
        """Tokenize ``text`` with each ``<image>`` expanded, and process ``images``.

        Args:
            text: a string or a list of strings, each holding one ``<image>`` per image.
            images: None, one image, a flat list (consumed in the order of the placeholders across the batch) or a
                list of lists (one list per text, possibly empty). Images are PIL images, HWC numpy arrays, CHW
                torch tensors or paths/URLs (SsmHubMultimodalImageProcessor).
            padding, return_tensors, **kwargs: tokenizer arguments (padding_side, truncation, max_length,
                add_special_tokens ...) and image processor arguments (do_tile, max_image_size ...), routed by
                transformers' ProcessorMixin.

        Returns:
            BatchFeature with ``input_ids`` and ``attention_mask`` [texts, tokens], and when there are images
            ``pixel_values`` [entries, 3, H_max, W_max] and ``image_sizes`` [entries, 2] (an entry is an image or a
            tile, in placeholder order).

        Raises:
            ValueError when placeholders and images do not pair up, naming the counts and the row.
        """
        return super().__call__(images=images, text=text, padding=padding, return_tensors=return_tensors, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        """Pairs the placeholders of each text with its images; ``text`` is a list of strings by now
        (ProcessorMixin.prepare_inputs_layout)."""
        if videos is not None or audio is not None:
            raise ValueError(
                f"{type(self).__name__} takes text and images only, got "
                f"{'videos' if videos is not None else 'audio'}"
            )
        if images is None and text is None:
            raise ValueError(f"{type(self).__name__} needs text or images, got neither")
        if text is None:
            return
        if not all(isinstance(sample, str) for sample in text):
            raise ValueError(f"text must be a string or a list of strings, got {[type(s).__name__ for s in text]}")
        counts = [sample.count(self.image_token) for sample in text]
        if _is_nested(images):
            if len(images) != len(text):
                raise ValueError(
                    f"images as a list of lists needs one list per text: got {len(images)} lists for {len(text)} texts"
                )
            for row, (count, row_images) in enumerate(zip(counts, images)):
                if count != len(row_images):
                    raise ValueError(
                        f"text {row} has {count} {self.image_token} placeholder(s) but {len(row_images)} image(s)"
                    )
            return
        number_of_images = 0 if images is None else len(flatten_images(images))
        if sum(counts) != number_of_images:
            per_row = ", ".join(f"text {row}: {count}" for row, count in enumerate(counts))
            raise ValueError(
                f"the texts have {sum(counts)} {self.image_token} placeholder(s) ({per_row}) but {number_of_images} "
                "image(s) were given"
            )

    def _process_images(self, images, **kwargs):
        images = flatten_images(images)
        if not images:  # e.g. [[], []]: a batch of text-only rows
            return {}, []
        processed = self.image_processor(images, **kwargs)
        replacements = [self.replace_image_token(processed, index, **kwargs) for index in range(len(images))]
        return processed, replacements

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        """The text that replaces the ``<image>`` of image ``image_idx``: for each of its entries (tiles),
        rows x ("<image>" * cols + "<image_row_end>")."""
        tiles_per_image = image_inputs["tiles_per_image"].tolist()
        first = sum(tiles_per_image[:image_idx])
        grids = [
            self.image_processor.num_image_tokens(
                height, width, patch_size=kwargs.get("patch_size"), merge_size=kwargs.get("merge_size")
            )
            for height, width in image_inputs["image_sizes"][first : first + tiles_per_image[image_idx]].tolist()
        ]
        return "".join((self.image_token * cols + self.image_row_end_token) * rows for rows, cols in grids)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' save_pretrained, plus this processor's code beside it, so that
        ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` works without ssm_hub (models.remote_code)."""
        save_with_remote_code(self, super().save_pretrained, save_directory, push_to_hub, kwargs)

    @property
    def unused_input_names(self) -> list[str]:
        # tiles_per_image only tells replace_image_token which entries belong to which image; the model needs none.
        return ["tiles_per_image"]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # transformers 5.24 loads the parts here, the image processor through AutoImageProcessor, which knows this
        # model type only once ssm_hub has registered it; a checkpoint of this processor always holds this image
        # processor. (From 5.25 the parts are loaded elsewhere, through AutoImageProcessor and the auto_map that
        # save_pretrained writes for it.)
        subfolder = kwargs.pop("subfolder", "")
        image_processor = SsmHubMultimodalImageProcessor.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        tokenizer = cls._load_tokenizer_from_pretrained(
            "tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )
        return [image_processor, tokenizer]
