"""The decoder-only vision-language model (ssm_hub_multimodal): patch embeddings in place of the image
placeholders, Mixture-of-Mamba routing (exactly the plain model with one modality), generation from images through
transformers' cache, left padding, save/load with and without ssm_hub, LoRA defaults and clear errors."""


import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

import ssm_hub
from ssm_hub.layers.patch_embedding import PatchEmbedding
from test_save_load import assert_loads_without_ssm_hub

IMAGE, ROW_END, PAD = 62, 63, 0
UNIT = 4  # patch_size in the tiny configs


def tiny(**overrides):
    fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, mixer_types=["mamba2", "attention", "mamba2"],
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, mamba_d_state=8,
                  mamba_d_head=16, mamba_chunk_size=8, patch_size=UNIT, image_token_id=IMAGE,
                  image_row_end_token_id=ROW_END, pad_token_id=PAD)
    return ssm_hub.SsmHubMultimodalConfig(**{**fields, **overrides})


def mixture(**overrides):
    return tiny(mixture_of_mamba=True, modality_mlps=True, modality_norms=True, **overrides)


def model_for(config=None):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config or mixture()).eval()


def image_tokens(height: int, width: int, unit: int = UNIT) -> list[int]:
    """The processor's layout of one image: rows of placeholders, each closed by a row-end token."""
    return ([IMAGE] * (width // unit) + [ROW_END]) * (height // unit)


def padded(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values padded at the bottom and right to the largest, and image_sizes."""
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    pixels = torch.zeros(len(images), 3, height, width)
    for index, image in enumerate(images):
        pixels[index, :, :image.shape[1], :image.shape[2]] = image
    return pixels, torch.tensor([list(i.shape[1:]) for i in images])


def greedy_by_recomputation(model, input_ids, new_tokens, **images):
    sequence = input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            next_token = model(sequence, use_cache=False, **images).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


GENERATE = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None)


def test_auto_classes_build_it():
    config = mixture()
    assert type(AutoConfig.for_model("ssm_hub_multimodal")).__name__ == "SsmHubMultimodalConfig"
    assert type(AutoModel.from_config(config)).__name__ == "SsmHubMultimodalModel"
    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        assert isinstance(auto_class.from_config(config), ssm_hub.SsmHubMultimodalForConditionalGeneration)


def test_patches_are_flattened_in_fuyus_order_and_merged_row_major():
    # Fuyu cuts [C, H, W] with unfold along H then W and flattens each patch as (row, column, channel).
    image = torch.randn(3, 8, 12)
    fuyu = image.unfold(1, 4, 4).unfold(2, 4, 4).reshape(3, -1, 4, 4).permute(1, 2, 3, 0).reshape(-1, 48)
    embed = PatchEmbedding(3, patch_size=4, merge_size=1, hidden_size=48)
    with torch.no_grad():
        embed.proj.weight.copy_(torch.eye(48))
        embed.proj.bias.zero_()
    torch.testing.assert_close(embed(image[None]), fuyu)
    merged = PatchEmbedding(3, patch_size=2, merge_size=2, hidden_size=12)
    with torch.no_grad():
        merged.proj.weight.copy_(torch.eye(12))
        merged.proj.bias.zero_()
        merged.merge.weight.copy_(torch.eye(12, 48))  # keeps the first patch of each 2 x 2 block
        merged.merge.bias.zero_()
    tokens = merged(image[None])
    assert tokens.shape == (2 * 3, 12)  # 8 x 12 pixels, units of 4: a 2 x 3 token grid
    top_left_patches = image.reshape(3, 2, 4, 3, 4)[:, :, :2, :, :2].permute(1, 3, 2, 4, 0).reshape(6, 12)
    torch.testing.assert_close(tokens, top_left_patches)


def test_images_take_the_place_of_their_placeholders_in_order():
    model = model_for()
    images = [torch.randn(3, 8, 4), torch.randn(3, 4, 8)]
    pixels, sizes = padded(images)
    input_ids = torch.tensor([[5, *image_tokens(8, 4), 7, *image_tokens(4, 8), 9]])
    with torch.no_grad():
        embedded, routing = model.model.embed_inputs(input_ids, pixels, sizes)
        expected = torch.cat([model.model.patch_embed(image[None]) for image in images])
    torch.testing.assert_close(embedded[0][input_ids[0] == IMAGE], expected)
    text = input_ids[0] != IMAGE
    torch.testing.assert_close(embedded[0][text], model.get_input_embeddings()(input_ids[0][text]))
    assert routing.ids[0].tolist() == [0, 1, 1, 1, 1, 0, 1, 1, 1, 0]  # placeholders and row ends are image


def test_the_image_tokens_own_selection_starts_as_mambas():
    mamba = model_for(mixture(mixer_types=["mamba", "attention", "mamba2"])).model.language_model.layers[0].mamba
    own, shared = mamba.modality_dt_proj[0], mamba.dt_proj
    # dt's bias is softplus^-1 of steps in [time_step_min, time_step_max], as for the shared dt_proj, not zero.
    steps = torch.nn.functional.softplus(own.bias)
    assert steps.min() >= 0.9e-3 and steps.max() <= 0.11 and not torch.equal(own.bias, shared.bias)


def test_the_text_after_an_image_sees_it_and_the_text_before_does_not():
    model = model_for()
    input_ids = torch.tensor([[5, 6, *image_tokens(8, 8), 7, 8]])
    image = torch.randn(1, 3, 8, 8)
    other = image.clone()
    other[0, :, 5, 6] += 1.0  # one pixel of the last patch
    with torch.no_grad():
        first, second = (model(input_ids, pixel_values=pixels).logits for pixels in (image, other))
    torch.testing.assert_close(first[:, :2], second[:, :2], rtol=0, atol=0)
    assert (first[:, -1] - second[:, -1]).abs().max() > 1e-4


LAYOUTS = [["mamba2", "attention", "mamba2"], ["mamba", "attention", "mamba2"]]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["mamba2", "mamba1"])
def test_with_one_modality_the_mixture_is_exactly_the_plain_model(layout):
    plain = model_for(tiny(mixer_types=layout))
    routed = model_for(mixture(mixer_types=layout))
    missing, unexpected = routed.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(".modality_" in name for name in missing)
    input_ids = torch.randint(1, 60, (2, 11))
    with torch.no_grad():
        assert torch.equal(routed(input_ids).logits, plain(input_ids).logits)
        assert torch.equal(routed.generate(input_ids, max_new_tokens=5, **GENERATE),
                           plain.generate(input_ids, max_new_tokens=5, **GENERATE))


@pytest.mark.parametrize("layout", LAYOUTS, ids=["mamba2", "mamba1"])
def test_image_tokens_take_their_own_projections_and_text_only_inputs_do_not(layout):
    model = model_for(mixture(mixer_types=layout))
    input_ids = torch.tensor([[5, 6, *image_tokens(8, 8), 7, 8]])
    text_only = torch.randint(1, 60, (1, 9))
    image = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before, before_text = model(input_ids, pixel_values=image).logits, model(text_only).logits
        first = model.model.language_model.layers[0].mamba  # the layout's first kind of SSM layer alone
        if layout[0] == "mamba2":
            first.modality_in_proj[0].weight.mul_(1.5)
        else:  # the selection only: Mamba-1's x_proj and dt_proj are the image tokens' own too
            first.modality_x_proj[0].weight.mul_(1.5)
            first.modality_dt_proj[0].bias.add_(0.5)
        after, after_text = model(input_ids, pixel_values=image).logits, model(text_only).logits
    assert torch.equal(before_text, after_text)
    torch.testing.assert_close(before[:, :2], after[:, :2], rtol=0, atol=0)  # text before the image
    assert not torch.equal(before[:, -1], after[:, -1])  # deterministic: any difference is the image path's


@pytest.mark.parametrize("config", [tiny, mixture])
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_cached_generation_from_images_equals_recomputation(config, cache_implementation, decoding):
    model = model_for(config())
    pixels, sizes = padded([torch.randn(3, 8, 4), torch.randn(3, 4, 8)])
    input_ids = torch.tensor([[5, *image_tokens(8, 4), 7], [6, 7, 8, *image_tokens(4, 8)]])
    images = dict(pixel_values=pixels, image_sizes=sizes)
    kwargs = dict(max_new_tokens=6, **GENERATE, **decoding)
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    with torch.no_grad():
        generated = model.generate(input_ids, **images, **kwargs)
    assert torch.equal(generated, greedy_by_recomputation(model, input_ids, 6, **images))


def test_a_batch_of_differently_sized_images_and_a_text_only_row_left_padded():
    model = model_for()
    first, second = torch.randn(3, 8, 8), torch.randn(3, 4, 8)
    rows = [[5, *image_tokens(8, 8), 7], [9, 8, 7], [6, *image_tokens(4, 8), 7, 8]]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])
    attention_mask = (torch.arange(width)[None] >= torch.tensor([[width - len(row)] for row in rows])).long()
    pixels, sizes = padded([first, second])
    with torch.no_grad():
        batch = model.generate(input_ids, attention_mask=attention_mask, pixel_values=pixels, image_sizes=sizes,
                               max_new_tokens=5, **GENERATE)[:, width:]
        alone = [model.generate(torch.tensor([rows[0]]), pixel_values=first[None], max_new_tokens=5, **GENERATE),
                 model.generate(torch.tensor([rows[1]]), max_new_tokens=5, **GENERATE),
                 model.generate(torch.tensor([rows[2]]), pixel_values=second[None], max_new_tokens=5, **GENERATE)]
    for index, row in enumerate(rows):
        assert torch.equal(batch[index], alone[index][0, len(row):]), index


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(do_sample=True, temperature=0.7, top_k=10)],
                         ids=["greedy", "sampling"])
def test_default_generate_from_images_runs_the_decoder_and_matches_transformers_loop(settings, caplog):
    import logging

    model = model_for()
    rows = [[5, *image_tokens(8, 4), 7], [PAD, PAD, 6, 7, *image_tokens(4, 4)]]
    input_ids = torch.tensor(rows)
    attention_mask = (input_ids != PAD).long()
    pixels, sizes = padded([torch.randn(3, 8, 4), torch.randn(3, 4, 4)])
    kwargs = dict(attention_mask=attention_mask, pixel_values=pixels, image_sizes=sizes, max_new_tokens=8,
                  pad_token_id=PAD, eos_token_id=None, **settings)
    with caplog.at_level(logging.INFO, logger="ssm_hub.generation"):
        torch.manual_seed(0)
        expected = model.generate(input_ids, disable_compile=True, **kwargs)
        caplog.clear()
        torch.manual_seed(0)
        got = model.generate(input_ids, **kwargs)
    assert "decoding loop" not in caplog.text, caplog.text
    assert torch.equal(got, expected)


def test_beam_search_repeats_each_rows_own_images():
    model = model_for()
    a, b, c = torch.randn(3, 4, 8), torch.randn(3, 4, 4), torch.randn(3, 8, 4)
    rows = [[5, *image_tokens(4, 8), *image_tokens(4, 4), 7], [6, *image_tokens(8, 4), 8, 9]]
    assert len(rows[0]) == len(rows[1])
    input_ids = torch.tensor(rows)
    pixels, sizes = padded([a, b, c])
    assert model.model.images_of_rows(input_ids, pixels, sizes) == [[0, 1], [2]]
    beams = dict(max_new_tokens=4, num_beams=2, num_return_sequences=2, output_logits=True,
                 return_dict_in_generate=True, **GENERATE)
    with torch.no_grad():
        batch = model.generate(input_ids, pixel_values=pixels, image_sizes=sizes, **beams)
        first = model.generate(input_ids[:1], pixel_values=padded([a, b])[0], image_sizes=sizes[:2], **beams)
        second = model.generate(input_ids[1:], pixel_values=c[None], **beams)
    # Both beams of a row start from the same prompt and images: the same first logits, the row's own.
    prefill = batch.logits[0]
    torch.testing.assert_close(prefill[0], prefill[1])
    torch.testing.assert_close(prefill[2], prefill[3])
    torch.testing.assert_close(prefill[::2], torch.cat([first.logits[0][:1], second.logits[0][:1]]))
    assert torch.equal(batch.sequences, torch.cat([first.sequences, second.sequences]))


def test_training_reaches_the_patch_embedding_and_every_modality_part():
    model = model_for().train()
    input_ids = torch.tensor([[5, 6, *image_tokens(8, 8), 7, 8]])
    labels = input_ids.masked_fill((input_ids == IMAGE) | (input_ids == ROW_END), -100)
    loss = model(input_ids, pixel_values=torch.randn(1, 3, 8, 8), labels=labels).loss
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_save_load_round_trip_and_remote_code_without_ssm_hub(tmp_path):
    model = model_for()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    input_ids = torch.tensor([[5, 6, *image_tokens(8, 8), 7, 8]])
    image = torch.randn(1, 3, 8, 8)
    loaded = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, pixel_values=image).logits, model(input_ids, pixel_values=image).logits)
    assert_loads_without_ssm_hub(model, checkpoint, torch.randint(1, 60, (2, 9)), tmp_path)


def test_lora_defaults_include_the_image_tokens_own_projections():
    from peft import LoraConfig, get_peft_model

    model = model_for()
    input_ids = torch.tensor([[5, 6, *image_tokens(8, 8), 7, 8]])
    image = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        base = model(input_ids, pixel_values=image).logits
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
    wrapped = {name.split(".mamba.")[-1] for name, module in peft_model.named_modules()
               if hasattr(module, "lora_A") and ".mamba." in name}
    assert wrapped == {"in_proj", "out_proj", "modality_in_proj.0", "modality_out_proj.0"}
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name and "modality_in_proj" in name:
                param.normal_(0.0, 0.5)
        assert (peft_model(input_ids=input_ids, pixel_values=image).logits - base).abs().max() > 1e-4


def test_bad_inputs_are_named():
    model = model_for()
    input_ids = torch.tensor([[5, *image_tokens(8, 8), 7]])
    with pytest.raises(ValueError, match="input_ids hold 4 image tokens \\(id 62\\) but the 3 image\\(s\\) give 6"):
        model(input_ids, pixel_values=torch.randn(3, 3, 4, 8))
    with pytest.raises(ValueError, match="row 0 of input_ids does not hold whole images: .* \\[4\\] image tokens"):
        model(input_ids, pixel_values=torch.randn(1, 3, 4, 8))
    # The same total, but the first row's placeholders would take one and a half images: refused, not split.
    two_rows = torch.tensor([[5, *image_tokens(4, 12), 7], [5, *image_tokens(4, 4), *image_tokens(4, 4), 7]])
    pixels, sizes = padded([torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 4)])
    with pytest.raises(ValueError, match="row 0 of input_ids does not hold whole images"):
        model(two_rows, pixel_values=pixels, image_sizes=sizes)
    with pytest.raises(ValueError, match="hold 4 image tokens \\(id 62\\) but no pixel_values"):
        model(input_ids)
    with pytest.raises(ValueError, match="multiples of patch_size \\* merge_size = 4"):
        model(input_ids, pixel_values=torch.randn(1, 3, 8, 8), image_sizes=torch.tensor([[6, 8]]))
    with pytest.raises(ValueError, match="config.image_token_id is not set"):
        model_for(tiny(image_token_id=None))(input_ids, pixel_values=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("overrides, message", [
    (dict(modality_mlps=True, ffn_types=["mlp", "moe", "mlp"]), "MoE or PKM"),
    (dict(image_token_id=64), "image_token_id must be a token id in \\[0, vocab_size = 64\\)"),
    (dict(image_row_end_token_id=IMAGE), "must differ"),
    (dict(patch_size=0), "patch_size must be a positive integer"),
])
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_processor_and_model_end_to_end_through_the_auto_classes(tmp_path):
    """The processor's ids, pixel_values and image_sizes drive the model; both load back through AutoProcessor and
    AutoModelForImageTextToText from one folder, and generation from the chat prompt matches the original."""
    from transformers import AutoProcessor

    from test_multimodal_processing import solid, tiny_processor

    processor = tiny_processor(patch_size=UNIT, max_image_size=12)
    tokenizer = processor.tokenizer
    model = model_for(mixture(vocab_size=len(tokenizer), image_token_id=processor.image_token_id,
                              image_row_end_token_id=processor.image_row_end_token_id,
                              pad_token_id=tokenizer.pad_token_id))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt, "hello world"], images=[[solid(12, 8, 200)], []], padding=True,
                       padding_side="left")
    assert inputs["image_sizes"].tolist() == [[12, 8]]
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 3 * 2
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        generated = model.generate(**inputs, **kwargs)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_processor).__name__ == "SsmHubMultimodalProcessor"
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    again = loaded_processor(text=[prompt, "hello world"], images=[[solid(12, 8, 200)], []], padding=True,
                             padding_side="left")
    with torch.no_grad():
        assert torch.equal(reloaded.generate(**again, **kwargs), generated)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="triton is not installed")
def test_the_kernels_training_path_routes_like_the_torch_path(monkeypatch):
    """With Mixture-of-Mamba the Mamba-2 training node leaves out_proj out and the tokens go through their own
    out_proj; on the kernels (Triton's interpreter here) loss and gradients match the torch path's."""
    model = model_for(mixture(mixer_types=["mamba2", "mamba2", "attention"], hidden_size=32, mamba_d_head=16)).train()
    input_ids = torch.tensor([[5, 6, *image_tokens(8, 8), 7, 8, 9, 10]])
    image = torch.randn(1, 3, 8, 8)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("SSM_HUB_BACKEND", backend)
        model.zero_grad()
        loss = model(input_ids, pixel_values=image, labels=input_ids).loss
        loss.backward()
        results[backend] = (loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()})
    torch.testing.assert_close(results["triton"][0], results["torch"][0], rtol=1e-5, atol=1e-5)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)
