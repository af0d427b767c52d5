"""transformers' pipelines on every ssm_hub model type, each next to a transformers-native control run through the
same calls: text generation (greedy output equal to ``generate``'s, a streamer, stop strings, chat messages,
batches) for every causal LM, image-text-to-text for the multimodal model, and text classification for every
sequence-classification head.

The tokenizer is a byte-level BPE trained in the test on a few sentences: its decoding is exact concatenation, so
streamed text, pipeline text and decoded ids can be compared character for character, and transformers'
StopStringCriteria reads its vocabulary as it reads GPT-2's. Run: pytest tests/models/test_pipelines.py
"""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
    TextStreamer,
    pipeline,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from conftest import CAUSAL_LM_TYPES, randomised, tiny_config
from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor
from ssm_hub.models.multimodal.processing_multimodal import DEFAULT_CHAT_TEMPLATE, SsmHubMultimodalProcessor

CORPUS = [
    "the cat sat on the mat and the dog ran in the park.",
    "a bird sang a song to the moon while the sun slept.",
    "hello world, how are you today? i am fine, thank you.",
    "<|user|>\nhello</s>\n<|assistant|>\nworld</s>\n",
]
PROMPT = "the cat sat on"
NEW_TOKENS = 10
# The text-generation pipeline samples unless told not to (or the model's generation config says otherwise).
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
CONTROLS = ("llama", "mamba")
GENERATION_KINDS = [*CONTROLS, *CAUSAL_LM_TYPES]
# transformers' Llama, and every ssm_hub type with a sequence-classification head.
CLASSIFICATION_KINDS = ["llama", *(model_type for model_type in CAUSAL_LM_TYPES
                                   if type(tiny_config(model_type)) in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
NO_TOKENIZER = "could not locate a tokenizer"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "</s>"]))
    # The multimodal processor's chat format, so that text-only and image-text models read the same conversations.
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   chat_template=DEFAULT_CHAT_TEMPLATE)


@pytest.fixture
def tokenizer():
    return byte_level_tokenizer()


def token_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def causal_lm(kind: str, tokenizer):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, **token_ids(tokenizer)))
    elif kind == "mamba":
        model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8,
                                             **token_ids(tokenizer)))
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(kind, **token_ids(tokenizer)))
    return randomised(model)


class RecordingStreamer(TextStreamer):
    """A TextStreamer that keeps what it would print, and how many tokens each ``put`` brought."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.texts, self.tokens_per_put = [], []

    def put(self, value):
        self.tokens_per_put.append(value.numel())
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.texts.append(text)


def generated_ids(model, inputs: dict, **kwargs) -> torch.Tensor:
    """The first row of ``model.generate``'s output, prompt included: greedy unless ``kwargs`` say otherwise."""
    with torch.no_grad():
        return model.generate(**inputs, **{**GREEDY, **kwargs})[0]


@pytest.mark.parametrize("kind", GENERATION_KINDS)
def test_text_generation_is_greedy_generate_and_streams_the_text_it_returns(kind, tokenizer):
    model = causal_lm(kind, tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    expected = generated_ids(model, inputs)
    prompt_length = inputs["input_ids"].shape[1]
    new_text = tokenizer.decode(expected[prompt_length:], skip_special_tokens=True)
    assert new_text.strip(), "the test needs some generated text to compare"

    full = generator(PROMPT, **GREEDY)[0]["generated_text"]
    assert full == tokenizer.decode(expected, skip_special_tokens=True) == PROMPT + new_text
    streamer = RecordingStreamer(tokenizer)
    returned = generator(PROMPT, **GREEDY, return_full_text=False, streamer=streamer)
    assert returned[0]["generated_text"] == "".join(streamer.texts) == new_text
    # The prompt first, then one token at a time as each is made.
    assert streamer.tokens_per_put == [prompt_length] + [1] * (len(expected) - prompt_length)

    # The pipeline's default call samples at temperature 0.7: the same draws as generate's with the same seed.
    torch.manual_seed(1)
    sampled = generator(PROMPT, max_new_tokens=NEW_TOKENS)[0]["generated_text"]
    torch.manual_seed(1)
    assert sampled == tokenizer.decode(generated_ids(model, inputs, do_sample=True, temperature=0.7))


def first_stop(tokenizer, sequence: torch.Tensor, prompt_length: int, stop: str) -> int:
    """How many new tokens of ``sequence`` StopStringCriteria lets through: up to the first one that completes
    ``stop`` (a match must end inside the newest token, so one lying wholly in the prompt does not count)."""
    prompt_text = tokenizer.decode(sequence[:prompt_length])
    for count in range(1, len(sequence) - prompt_length + 1):
        text = tokenizer.decode(sequence[: prompt_length + count])
        if stop in text[max(0, len(prompt_text) - len(stop) + 1):]:
            return count
    raise AssertionError(f"{stop!r} is not in the generated text")


@pytest.mark.parametrize("kind", GENERATION_KINDS)
def test_stop_strings_end_generation_where_the_string_is_completed(kind, tokenizer):
    model = causal_lm(kind, tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    unconstrained = generated_ids(model, inputs)
    new_tokens = len(unconstrained) - prompt_length
    # A stop string taken from the unconstrained output, the text of its third to fifth new tokens: it spans several
    # tokens and ends generation well before max_new_tokens.
    stop = tokenizer.decode(unconstrained[prompt_length + 2: prompt_length + 5]).strip()
    kept = first_stop(tokenizer, unconstrained, prompt_length, stop)
    assert kept < new_tokens
    expected = unconstrained[: prompt_length + kept]

    as_stop_sequence = generator(PROMPT, **GREEDY, stop_sequence=stop, return_tensors=True)
    as_stop_strings = generator(PROMPT, **GREEDY, stop_strings=[stop], tokenizer=tokenizer,
                                return_tensors=True)
    from_generate = generated_ids(model, inputs, stop_strings=[stop], tokenizer=tokenizer)
    for ids in (as_stop_sequence[0]["generated_token_ids"], as_stop_strings[0]["generated_token_ids"], from_generate):
        assert torch.equal(torch.as_tensor(ids), expected)
    text = generator(PROMPT, **GREEDY, stop_sequence=stop)[0]["generated_text"]
    assert text == tokenizer.decode(expected)

    # Beam search gets the tokenizer mixed with the model's keyword arguments too.
    beams = generator(PROMPT, **GREEDY, num_beams=2, stop_sequence=stop, return_tensors=True)
    expected_beams = generated_ids(model, inputs, num_beams=2, stop_strings=[stop], tokenizer=tokenizer)
    assert torch.equal(torch.as_tensor(beams[0]["generated_token_ids"]), expected_beams)

    # As in transformers, stop strings without a tokenizer to read them are refused.
    with pytest.raises(ValueError, match=NO_TOKENIZER):
        generator(PROMPT, **GREEDY, stop_strings=[stop])


@pytest.mark.parametrize("kind", CAUSAL_LM_TYPES)
def test_a_tokenizer_passed_to_generate_keeps_the_default_decoder(kind, tokenizer, caplog):
    """generate() hands its tokenizer on with the model's keyword arguments; it is no reason to leave the decoder."""
    model = causal_lm(kind, tokenizer)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with caplog.at_level(logging.INFO, logger="ssm_hub.generation"):
        with_tokenizer = generated_ids(model, inputs, tokenizer=tokenizer)
    assert "runs transformers' decoding loop" not in caplog.text, caplog.text
    assert torch.equal(with_tokenizer, generated_ids(model, inputs, disable_compile=True))


@pytest.mark.parametrize("kind", GENERATION_KINDS)
def test_chat_messages_go_through_the_chat_template(kind, tokenizer):
    model = causal_lm(kind, tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
                {"role": "user", "content": "how are you"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("how are you</s>\n<|assistant|>\n")
    expected = generated_ids(model, prompt)
    reply = tokenizer.decode(expected[prompt["input_ids"].shape[1]:], skip_special_tokens=True)

    conversation = generator(messages, **GREEDY)[0]["generated_text"]
    assert conversation == [*messages, {"role": "assistant", "content": reply}]


@pytest.mark.parametrize("kind", GENERATION_KINDS)
def test_a_left_padded_batch_gives_each_prompt_its_own_text(kind, tokenizer):
    model = causal_lm(kind, tokenizer)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["hello", "the dog ran in the park and"]
    alone = [generator(prompt, **GREEDY)[0]["generated_text"] for prompt in prompts]
    batched = generator(prompts, **GREEDY, batch_size=2)
    assert [result[0]["generated_text"] for result in batched] == alone


def image_text_model(kind: str):
    """(model, processor) of a tiny image-text model: ssm_hub's multimodal model, or transformers' Llava."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    if kind == "llava":
        tokenizer.add_tokens(["<image>"], special_tokens=True)
        # An 8 x 8 picture in 4 x 4 patches, CLIP's class token dropped ("default"): 4 image tokens.
        processor = LlavaProcessor(
            CLIPImageProcessorPil(size={"height": 8, "width": 8}, do_center_crop=False), tokenizer, patch_size=4,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=8, patch_size=4)
        text = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, **token_ids(tokenizer))
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                             vision_feature_select_strategy="default")
        return randomised(LlavaForConditionalGeneration(config)), processor
    processor = SsmHubMultimodalProcessor(SsmHubMultimodalImageProcessor(patch_size=4, max_image_size=12), tokenizer)
    config = tiny_config("ssm_hub_multimodal", image_token_id=processor.image_token_id,
                         image_row_end_token_id=processor.image_row_end_token_id, **token_ids(tokenizer))
    return randomised(AutoModelForImageTextToText.from_config(config)), processor


def picture(height: int, width: int, seed: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.mark.parametrize("kind", ["llava", "ssm_hub_multimodal"])
def test_image_text_to_text_is_greedy_generate_from_the_processors_inputs(kind):
    model, processor = image_text_model(kind)
    tokenizer = processor.tokenizer
    answerer = pipeline("image-text-to-text", model=model, processor=processor)
    cat, dog = picture(12, 8, seed=0), picture(8, 12, seed=1)

    def reply(expected: torch.Tensor, prompt_length: int) -> str:
        return tokenizer.decode(expected[prompt_length:], skip_special_tokens=True)

    text = "<image> the cat"
    inputs = processor(text=text, images=cat, return_tensors="pt")
    new_text = reply(generated_ids(model, inputs), inputs["input_ids"].shape[1])
    streamer = RecordingStreamer(tokenizer)
    answer = answerer(text=text, images=cat, max_new_tokens=NEW_TOKENS, return_full_text=False,
                      generate_kwargs={"streamer": streamer})
    assert answer[0]["generated_text"] == "".join(streamer.texts) == new_text
    assert answerer(text=text, images=cat, max_new_tokens=NEW_TOKENS)[0]["generated_text"] == text + new_text

    messages = [{"role": "user", "content": [{"type": "image", "image": cat}, {"type": "text", "text": "hello"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    chat_reply = reply(generated_ids(model, prompt), prompt["input_ids"].shape[1])
    conversation = answerer(text=messages, max_new_tokens=NEW_TOKENS)[0]["generated_text"]
    assert conversation == [*messages, {"role": "assistant", "content": chat_reply}]

    # Two images of different shapes in one left-padded batch, each row as it is alone.
    texts, images = ["<image> the cat", "hello world <image> a"], [[cat], [dog]]
    alone = [answerer(text=t, images=i, max_new_tokens=NEW_TOKENS)[0]["generated_text"] for t, i in zip(texts, images)]
    batched = answerer(text=texts, images=images, max_new_tokens=NEW_TOKENS, batch_size=2)
    assert [result["generated_text"] for result in batched] == alone


def classifier(kind: str, tokenizer):
    torch.manual_seed(0)
    labels = dict(num_labels=len(LABELS), id2label=LABELS, label2id={name: i for i, name in LABELS.items()})
    if kind == "llama":
        model = LlamaForSequenceClassification(LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            **token_ids(tokenizer), **labels))
    else:
        model = AutoModelForSequenceClassification.from_config(tiny_config(kind, **token_ids(tokenizer), **labels))
    return randomised(model)


@pytest.mark.parametrize("kind", CLASSIFICATION_KINDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_text_classification_scores_each_text_as_the_model_does(kind, padding_side, tokenizer):
    model = classifier(kind, tokenizer)
    tokenizer.padding_side = padding_side
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer)
    texts = ["the cat sat on the mat", "hello", "a bird sang a song to the moon"]
    expected = []
    for text in texts:
        with torch.no_grad():
            probabilities = model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        expected.append({LABELS[i]: float(p) for i, p in enumerate(probabilities)})

    batched = classify(texts, top_k=None, batch_size=3)  # padded to the longest text
    for scores, wanted in zip(batched, expected):
        assert {score["label"] for score in scores} == set(LABELS.values())
        for score in scores:
            assert score["score"] == pytest.approx(wanted[score["label"]], abs=1e-5)
    best = classify(texts[0])[0]
    assert best["label"] == max(expected[0], key=expected[0].get)
    assert best["score"] == pytest.approx(max(expected[0].values()), abs=1e-5)
