"""The captioned-shapes task (ssm_hub.training.shapes) and ``data.builtin: shapes`` through ``ssm-hub train``:
captions say what is drawn where, the collator puts the loss on the caption alone, caption accuracy is exact
match, and the recipe trains an ssm_hub_multimodal model end to end on CPU."""

import numpy as np
import pytest
import torch

from ssm_hub.training import load_recipe, train
from ssm_hub.training.config import recipe_path
from ssm_hub.training.data import character_tokenizer
from ssm_hub.training.shapes import CELLS, COLOURS, ImageTextCollator, ShapeScenes, caption_accuracy


def processor_for(scenes):
    from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor
    from ssm_hub.models.multimodal.processing_multimodal import SsmHubMultimodalProcessor

    return SsmHubMultimodalProcessor(SsmHubMultimodalImageProcessor(patch_size=8, max_image_size=32),
                                     character_tokenizer(scenes.captions()))


def test_captions_name_the_colour_in_each_named_cell_and_scenes_repeat_by_seed():
    scenes = ShapeScenes(40, seed=3)
    assert [scenes[i]["text"] for i in range(40)] == ShapeScenes(40, seed=3).captions()
    assert scenes.captions() != ShapeScenes(40, seed=4).captions()
    for index in range(40):
        pixels = np.asarray(scenes[index]["image"])
        named = {}
        for part in scenes[index]["text"].split(", "):
            colour, _, cell = part.split(" ", 2)
            named[CELLS.index(cell)] = colour
        for cell in range(4):
            block = pixels[(cell // 2) * 16:(cell // 2 + 1) * 16, (cell % 2) * 16:(cell % 2 + 1) * 16].reshape(-1, 3)
            colours = {tuple(p) for p in block} - {(255, 255, 255)}
            if cell in named:
                assert tuple(COLOURS[named[cell]]) in colours, (index, cell)
            else:
                assert not colours, (index, cell)


def test_held_out_scenes_have_captions_no_training_scene_has():
    training = set(ShapeScenes(2000, seed=0).captions())
    held_out = ShapeScenes(100, seed=1, split="held_out").captions()
    assert len(set(held_out)) > 50 and not set(held_out) & training


def test_the_collator_puts_the_loss_on_the_caption_and_its_end_only():
    scenes = ShapeScenes(3, seed=0)
    processor = processor_for(scenes)
    batch = ImageTextCollator(processor)([scenes[0], scenes[1], scenes[2]])
    tokenizer = processor.tokenizer
    for row in range(3):
        labels = batch["labels"][row]
        kept = labels[labels != -100].tolist()
        assert tokenizer.decode(kept[:-1]) == scenes[row]["text"] and kept[-1] == tokenizer.eos_token_id
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert int((batch["input_ids"][0] == processor.image_token_id).sum()) == 4 * 4


def test_caption_accuracy_is_exact_match_up_to_the_end_of_text():
    scenes = ShapeScenes(4, seed=0)
    processor = processor_for(scenes)
    tokenizer = processor.tokenizer

    class Captioner(torch.nn.Module):
        """Generates the true caption, then the end of text, then noise; or a caption one character short."""

        def __init__(self, truncate: bool):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.truncate = truncate

        def generate(self, input_ids, pixel_values, max_new_tokens, **kwargs):
            rows = []
            for image in range(input_ids.shape[0]):
                caption = [s["text"] for s in (scenes[i] for i in range(4))][image]
                tokens = tokenizer(caption[:-1] if self.truncate else caption, add_special_tokens=False).input_ids
                tokens = (tokens + [tokenizer.eos_token_id] + [5] * max_new_tokens)[:max_new_tokens]
                rows.append(input_ids[image].tolist() + tokens)
            return torch.tensor(rows)

    assert caption_accuracy(Captioner(truncate=False), processor, scenes) == 1.0
    assert caption_accuracy(Captioner(truncate=True), processor, scenes) == 0.0


def test_the_recipe_trains_a_multimodal_model_and_reports_caption_accuracy(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    recipe = load_recipe(recipe_path("shapes_multimodal"), [
        "train.max_steps=3", "train.bf16=false", "train.use_cpu=true", "data.max_documents=48",
        "train.per_device_train_batch_size=8", "train.per_device_eval_batch_size=8", "train.eval_steps=3",
        "train.save_steps=3", f"train.output_dir={tmp_path}", "model.config.hidden_size=32",
        "model.config.intermediate_size=64", "model.config.mamba_d_head=16", "model.config.mixture_of_mamba=true"])
    summary = train(recipe)
    assert summary["steps"] == 3 and 0.0 <= summary["caption_accuracy"] <= 1.0 and summary["eval_loss"] > 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert model.config.mixture_of_mamba and model.config.image_token_id == AutoProcessor.from_pretrained(
        tmp_path).image_token_id


def test_shapes_data_needs_a_new_multimodal_model(tmp_path):
    recipe = load_recipe(recipe_path("shapes_multimodal"), ["model.type=ssm_hub_hybrid", "model.config={}",
                                                            f"train.output_dir={tmp_path}", "train.use_cpu=true"])
    with pytest.raises(ValueError, match="data.builtin: shapes trains a new ssm_hub_multimodal model"):
        train(recipe)
