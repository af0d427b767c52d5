"""The multimodal processor (ssm_hub_multimodal): resizing to multiples of the patch unit, normalisation, tiling,
placeholder expansion into rows of patch tokens, batching with padding, pairing errors, the chat template,
save/load, and no torchvision anywhere. A tiny WordLevel tokenizer is built in the test."""

import json
import re
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor, resized_size
from ssm_hub.models.multimodal.processing_multimodal import SsmHubMultimodalProcessor

WORDS = ["<unk>", "<pad>", "</s>", "hello", "world", "a", "describe"]


def tiny_tokenizer(**kwargs):
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", **kwargs
    )


def tiny_processor(**image_kwargs):
    return SsmHubMultimodalProcessor(SsmHubMultimodalImageProcessor(**image_kwargs), tiny_tokenizer())


def solid(height, width, value=255):
    return np.full((height, width, 3), value, dtype=np.uint8)


def test_resize_keeps_aspect_ratio_and_rounds_sides_to_multiples_of_unit():
    unit = 16
    image_processor = SsmHubMultimodalImageProcessor(patch_size=8, merge_size=2, max_image_size=256)
    # PIL sizes are (width, height).
    images = [PIL.Image.new("RGB", (1000, 600)), PIL.Image.new("RGB", (20, 36)), PIL.Image.new("RGB", (30, 500))]
    sizes = image_processor(images)["image_sizes"].tolist()
    assert sizes == [[160, 256], [32, 16], [256, 16]]
    scale = 256 / 1000
    assert abs(160 - 600 * scale) <= unit / 2 and abs(256 - 1000 * scale) <= unit / 2
    for height, width in sizes:
        assert height % unit == 0 and width % unit == 0 and max(height, width) <= 256
    # A limit that is no multiple of the unit still bounds the longest side.
    assert resized_size(1000, 300, 500, 14) == (490, 154)

    # Resizing scales the whole picture (no cropping): a black left half and a white right half stay halves.
    halves = np.zeros((100, 200, 3), dtype=np.uint8)
    halves[:, 100:] = 255
    pixels = SsmHubMultimodalImageProcessor(patch_size=16, max_image_size=64)(halves)["pixel_values"][0, 0]
    assert pixels.shape == (32, 64)
    assert pixels[:, :28].eq(-1).all() and pixels[:, 36:].eq(1).all()

    kept = SsmHubMultimodalImageProcessor(patch_size=16, do_resize=False)
    assert kept(solid(32, 1024))["image_sizes"].tolist() == [[32, 1024]]
    with pytest.raises(ValueError, match="multiples of patch_size \\* merge_size = 16, got 30 x 32"):
        kept(solid(30, 32))


def test_normalisation_values_and_input_types():
    red, green, blue = 255, 51, 0
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = red, green, blue

    default = SsmHubMultimodalImageProcessor()(image)["pixel_values"]
    torch.testing.assert_close(default[0, :, 0, 0], torch.tensor([1.0, -0.6, -1.0]))
    custom = SsmHubMultimodalImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.25, 0.125])(image)
    torch.testing.assert_close(custom["pixel_values"][0, :, 5, 7], torch.tensor([1.8, 0.0, -2.4]))
    assert custom["pixel_values"].dtype == torch.float32

    same_image = [
        PIL.Image.fromarray(image),
        image.astype(np.float32) / 255,
        torch.from_numpy(image).permute(2, 0, 1),
    ]
    for other in SsmHubMultimodalImageProcessor()(same_image)["pixel_values"]:
        torch.testing.assert_close(other, default[0])

    gray = np.full((16, 16), 102, dtype=np.uint8)
    transparent = PIL.Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    gray_pixels, white_pixels = SsmHubMultimodalImageProcessor()([gray, transparent])["pixel_values"]
    torch.testing.assert_close(gray_pixels, torch.full((3, 16, 16), -0.2))
    torch.testing.assert_close(white_pixels, torch.ones(3, 16, 16))

    with pytest.raises(ValueError, match="got dict"):
        SsmHubMultimodalImageProcessor()({"pixels": image})
    with pytest.raises(ValueError, match=re.escape("values in [0, 1], got values in [2.0, 2.0]")):
        SsmHubMultimodalImageProcessor()(np.full((16, 16, 3), 2.0))
    with pytest.raises(ValueError, match="do_convert_rgb=False needs RGB images, got a L image"):
        SsmHubMultimodalImageProcessor(do_convert_rgb=False)(gray)


def test_tiling_count_and_row_major_order():
    height, width = 48, 64
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = np.arange(height)[:, None]
    image[..., 1] = np.arange(width)[None, :]
    raw = dict(patch_size=8, max_image_size=64, tile_size=32, do_rescale=False, do_normalize=False)

    out = SsmHubMultimodalImageProcessor(do_tile=True, **raw)([image, solid(16, 16)])
    assert out["tiles_per_image"].tolist() == [4, 1]
    assert out["image_sizes"].tolist() == [[32, 32], [32, 32], [16, 32], [16, 32], [16, 16]]
    assert out["pixel_values"].shape == (5, 3, 32, 32)
    chw = torch.from_numpy(image).permute(2, 0, 1).float()
    for tile, (top, left) in zip(out["pixel_values"], [(0, 0), (0, 32), (32, 0), (32, 32)]):
        piece = chw[:, top : top + 32, left : left + 32]
        assert torch.equal(tile[:, : piece.shape[1], : piece.shape[2]], piece)

    untiled = SsmHubMultimodalImageProcessor(**raw)([image, solid(16, 16)])
    assert untiled["tiles_per_image"].tolist() == [1, 1]
    assert untiled["image_sizes"].tolist() == [[48, 64], [16, 16]]
    assert torch.equal(untiled["pixel_values"][0], chw)


def test_placeholder_expands_to_rows_of_patch_tokens_ending_in_row_end():
    processor = tiny_processor(patch_size=4, merge_size=2, max_image_size=64)  # unit 8
    hello, world, pad = (processor.tokenizer.convert_tokens_to_ids(word) for word in ("hello", "world", "<pad>"))
    image, row_end = processor.image_token_id, processor.image_row_end_token_id
    assert len({image, row_end, hello, world, pad}) == 5

    grayscale = np.zeros((16, 24), dtype=np.uint8)  # a 2-D array is an image too
    out = processor("hello <image> world", images=grayscale)  # a 2 x 3 token grid
    assert out["input_ids"].tolist() == [[hello] + ([image] * 3 + [row_end]) * 2 + [world]]
    assert out["image_sizes"].tolist() == [[16, 24]]
    assert processor.decode(out["input_ids"][0], skip_special_tokens=True) == "hello world"

    tiled = tiny_processor(patch_size=8, max_image_size=64, do_tile=True, tile_size=32)
    out = tiled("<image>", images=solid(16, 48))  # tiles of 16 x 32 and 16 x 16: grids 2 x 4 and 2 x 2
    assert out["image_sizes"].tolist() == [[16, 32], [16, 16]]
    expected = ([image] * 4 + [row_end]) * 2 + ([image] * 2 + [row_end]) * 2
    assert out["input_ids"].tolist() == [expected]
    assert len(expected) == sum(rows * (cols + 1) for rows, cols in [(2, 4), (2, 2)])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_of_two_image_sizes_and_a_text_only_row(padding_side):
    processor = tiny_processor(patch_size=8, max_image_size=64)
    texts = ["hello <image>", "a world", "<image> describe a"]
    first, second = solid(16, 24), solid(32, 8)  # grids 2 x 3 (8 tokens) and 4 x 1 (8 tokens)
    out = processor(texts, images=[[first], [], [second]], padding=True, padding_side=padding_side)

    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert set(processor.model_input_names) == set(out)
    assert out["input_ids"].shape == (3, 10)
    lengths = [9, 2, 10]
    assert out["attention_mask"].sum(dim=1).tolist() == lengths
    pad = processor.tokenizer.pad_token_id
    for row, length in zip(out["input_ids"].tolist(), lengths):
        padding = row[length:] if padding_side == "right" else row[: len(row) - length]
        assert padding == [pad] * (len(row) - length)
    assert (out["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [6, 0, 4]

    assert out["pixel_values"].shape == (2, 3, 32, 24)
    assert out["image_sizes"].tolist() == [[16, 24], [32, 8]]
    assert out["pixel_values"][0, :, :16, :].eq(1).all() and out["pixel_values"][0, :, 16:, :].eq(0).all()
    assert out["pixel_values"][1, :, :, :8].eq(1).all() and out["pixel_values"][1, :, :, 8:].eq(0).all()

    flat = processor(texts, images=[first, second], padding=True, padding_side=padding_side)
    assert all(torch.equal(flat[key], out[key]) for key in out)

    text_only = processor(["a", "hello world"], images=[[], []], padding=True, padding_side=padding_side)
    assert set(text_only) == {"input_ids", "attention_mask"}
    assert text_only["attention_mask"].tolist() == ([[1, 0], [1, 1]] if padding_side == "right" else [[0, 1], [1, 1]])


def test_mismatched_placeholders_and_images_name_the_counts():
    processor = tiny_processor(patch_size=8, max_image_size=64)
    image = solid(16, 16)
    with pytest.raises(ValueError, match="text 1 has 2 <image> placeholder\\(s\\) but 1 image\\(s\\)"):
        processor(["<image> a", "<image> <image>"], images=[[image], [image]])
    with pytest.raises(ValueError, match=re.escape("3 <image> placeholder(s) (text 0: 1, text 1: 2) but 2 image(s)")):
        processor(["<image> a", "<image> <image>"], images=[image, image])
    with pytest.raises(ValueError, match=re.escape("1 <image> placeholder(s) (text 0: 1) but 0 image(s)")):
        processor("hello <image>")
    with pytest.raises(ValueError, match=re.escape("0 <image> placeholder(s) (text 0: 0) but 1 image(s)")):
        processor("hello", images=image)
    with pytest.raises(ValueError, match="got 2 lists for 1 texts"):
        processor("<image>", images=[[image], []])


def test_chat_template_renders_image_slots():
    processor = tiny_processor(patch_size=8, max_image_size=64)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]},
        {"role": "assistant", "content": "a world"},
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "image"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|user|>\n<image>describe</s>\n<|assistant|>\na world</s>\n<|user|>\nhello <image></s>\n<|assistant|>\n"
    )
    assert processor.apply_chat_template(messages[:2], tokenize=False).endswith("a world</s>\n")

    image_message = [{"role": "user", "content": [{"type": "image", "image": solid(16, 24)}]}]
    tokenized = processor.apply_chat_template(image_message, tokenize=True, return_dict=True)
    assert (tokenized["input_ids"] == processor.image_token_id).sum() == 6
    assert tokenized["image_sizes"].tolist() == [[16, 24]]


def test_save_load_round_trip_gives_the_same_outputs(tmp_path):
    processor = tiny_processor(patch_size=8, max_image_size=64, do_tile=True, tile_size=32, image_mean=[0.4] * 3)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    assert [saved[key] for key in ("max_image_size", "tile_size", "do_tile", "image_mean")] == [64, 32, True, [0.4] * 3]

    loaded = SsmHubMultimodalProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, SsmHubMultimodalImageProcessor)
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()  # auto_map is no setting
    assert loaded.chat_template == processor.chat_template
    assert len(loaded.tokenizer) == len(processor.tokenizer)
    assert (loaded.image_token_id, loaded.image_row_end_token_id) == (
        processor.image_token_id, processor.image_row_end_token_id
    )
    texts, images = ["hello <image>", "a"], [[solid(48, 40)], []]
    expected, actual = processor(texts, images=images, padding=True), loaded(texts, images=images, padding=True)
    assert set(actual) == set(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)

    image_processor_dir = tmp_path / "image_processor"
    processor.image_processor.save_pretrained(image_processor_dir)
    assert json.loads((image_processor_dir / "preprocessor_config.json").read_text())["tile_size"] == 32
    reloaded = SsmHubMultimodalImageProcessor.from_pretrained(image_processor_dir)
    assert reloaded.to_dict() == processor.image_processor.to_dict()


TORCHVISION_BLOCKED = """
import sys
sys.modules["torchvision"] = None  # before transformers is imported: `import torchvision` raises from here on
import numpy as np
from transformers import AutoProcessor
sys.path.insert(0, sys.argv[2])
from test_multimodal_processing import tiny_processor
processor = tiny_processor(patch_size=8, max_image_size=64, do_tile=True, tile_size=32)
image = np.zeros((40, 80, 3), dtype=np.uint8)
out = processor(["<image> hello", "a"], images=[[image], []], padding=True)
processor.save_pretrained(sys.argv[1])
import ssm_hub  # registers AutoProcessor / AutoImageProcessor for ssm_hub_multimodal
from ssm_hub.models.multimodal.configuration_multimodal import SsmHubMultimodalConfig
SsmHubMultimodalConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, mixer_types=["mamba2"],
                       mamba_d_head=16).save_pretrained(sys.argv[1])
loaded = AutoProcessor.from_pretrained(sys.argv[1])
again = loaded(["<image> hello", "a"], images=[[image], []], padding=True)
assert all((again[key] == out[key]).all() for key in out), "reloaded processor differs"
assert sys.modules["torchvision"] is None
print("NO_TORCHVISION_OK", type(loaded.image_processor).__name__, out["pixel_values"].shape[0])
"""


def test_everything_works_with_torchvision_unimportable(tmp_path):
    """In a fresh interpreter where importing torchvision fails before transformers loads: processing, saving and
    loading back through AutoProcessor (the registered classes) all work."""
    import subprocess
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", TORCHVISION_BLOCKED, str(tmp_path), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "NO_TORCHVISION_OK SsmHubMultimodalImageProcessor 2" in result.stdout


REMOTE_PROCESSOR_SCRIPT = """
import json
import numpy as np
from transformers import AutoImageProcessor, AutoProcessor
folder = sys.argv[1]
image = np.zeros((40, 80, 3), dtype=np.uint8)
image[:, 40:] = 200
expected = np.load(folder + "/expected.npz")

def check(processor, image_processor):
    out = processor(["<image> hello", "a"], images=[[image], []], padding=True, return_tensors="np")
    assert all((out[key] == expected[key]).all() for key in ("input_ids", "attention_mask", "pixel_values",
                                                             "image_sizes"))
    alone = image_processor([image], return_tensors="np")
    assert (alone["pixel_values"] == expected["pixel_values"]).all()  # the one image, as two tiles

processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained(folder + "/image_processor", trust_remote_code=True)
assert "ssm_hub" not in sys.modules
check(processor, image_processor)
# Code loaded from the folder exports itself again, with every auto_map entry, and loads from there too.
processor.save_pretrained(folder + "-resaved")
image_processor.save_pretrained(folder + "-resaved/image_processor")
config = json.load(open(folder + "-resaved/processor_config.json"))
assert config["auto_map"] == {"AutoProcessor": "processing_multimodal.SsmHubMultimodalProcessor"}, config
assert config["image_processor"]["auto_map"] == {
    "AutoImageProcessor": "image_processing_multimodal.SsmHubMultimodalImageProcessor"}, config
alone = json.load(open(folder + "-resaved/image_processor/preprocessor_config.json"))
assert alone["auto_map"] == {"AutoImageProcessor": "image_processing_multimodal.SsmHubMultimodalImageProcessor"}
check(AutoProcessor.from_pretrained(folder + "-resaved", trust_remote_code=True),
      AutoImageProcessor.from_pretrained(folder + "-resaved/image_processor", trust_remote_code=True))
print("REMOTE_PROCESSOR_OK", type(processor).__module__, type(processor.image_processor).__module__)
"""


def test_processor_loads_with_trust_remote_code_without_ssm_hub(tmp_path):
    """The processor's and the image processor's code travel with them: AutoProcessor and AutoImageProcessor load
    them with trust_remote_code in an interpreter where ssm_hub cannot be imported, with the same outputs."""
    import os
    import subprocess

    from test_save_load import HIDE_SSM_HUB

    processor = tiny_processor(patch_size=8, max_image_size=64, do_tile=True, tile_size=32)
    folder = tmp_path / "processor"
    processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder / "image_processor")
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_multimodal.SsmHubMultimodalProcessor"}
    assert config["image_processor"]["auto_map"] == {
        "AutoImageProcessor": "image_processing_multimodal.SsmHubMultimodalImageProcessor"}
    image = np.zeros((40, 80, 3), dtype=np.uint8)
    image[:, 40:] = 200
    expected = processor(["<image> hello", "a"], images=[[image], []], padding=True, return_tensors="np")
    np.savez(folder / "expected.npz", **{key: expected[key] for key in
                                        ("input_ids", "attention_mask", "pixel_values", "image_sizes")})
    result = subprocess.run([sys.executable, "-c", HIDE_SSM_HUB + REMOTE_PROCESSOR_SCRIPT, str(folder)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "REMOTE_PROCESSOR_OK transformers_modules." in result.stdout


@pytest.mark.parametrize("part", ["processor", "image_processor"])
def test_saving_writes_the_code_on_the_main_process_only_and_before_an_upload(part, tmp_path, monkeypatch):
    saved = tiny_processor() if part == "processor" else SsmHubMultimodalImageProcessor()
    config_file = "processor_config.json" if part == "processor" else "preprocessor_config.json"
    saved.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists() or not any((tmp_path / "other_rank").iterdir())

    uploads = []

    def fake_push_to_hub(self, repo_id, **kwargs):
        folder = tmp_path / "main"
        uploads.append((repo_id, kwargs, sorted(p.name for p in folder.glob("*.py")),
                        json.loads((folder / config_file).read_text())["auto_map"]))

    monkeypatch.setattr(type(saved), "push_to_hub", fake_push_to_hub)
    saved.save_pretrained(tmp_path / "main", push_to_hub=True, repo_id="me/tiny", commit_message="hello")
    (repo_id, kwargs, code_files, auto_map), = uploads
    assert repo_id == "me/tiny" and kwargs == {"commit_message": "hello"}
    assert "image_processing_multimodal.py" in code_files and len(auto_map) == 1
