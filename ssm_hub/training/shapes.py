"""Scenes of coloured shapes and their captions, drawn on the fly with PIL: the task on which a vision-language model
shows that it sees (``data.builtin: shapes``, the ``shapes_*`` recipes).

    from ssm_hub.training.shapes import ShapeScenes, caption_accuracy
    scenes = ShapeScenes(1000, seed=1)          # scenes[i] -> {"image": PIL image, "text": caption}
    accuracy = caption_accuracy(model, processor, ShapeScenes(200, seed=2, split="held_out"))

A scene is a white square of ``size`` pixels cut into a 2 x 2 grid; one to three cells hold a shape (circle,
square or triangle) in one of four colours, its size and place inside the cell jittered. The caption names them in
reading order with their cell: "red circle top left, blue square bottom right". Getting it exactly right needs
colour, shape and position, none of which the text gives away. Scene ``i`` of a seed is the same on every call, so
scenes are fixed by their seeds without storing any.

The captions are split too (:func:`caption_split`: one in twenty, by a hash of the caption, is held out): training
scenes never show a held-out combination, so accuracy on held-out scenes measures captions the model has never
seen, composed from parts it has.
"""

import hashlib
import random

import PIL.Image
import PIL.ImageDraw
import torch

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (225, 190, 30)}
SHAPES = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
SCENE_SIZE = 32
BUILTIN_SCENES = 20000  # data.builtin: shapes without data.max_documents


SPLITS = ("train", "held_out")
HELD_OUT_SHARE = 20  # one caption in this many is held out


def caption_split(caption: str) -> str:
    """"held_out" for one caption in HELD_OUT_SHARE (by a stable hash), "train" for the others."""
    return "held_out" if int(hashlib.sha256(caption.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0 else "train"


def draw_scene(rng: random.Random, size: int, max_shapes: int) -> tuple[PIL.Image.Image, str]:
    """One scene drawn with ``rng``: (the image, its caption)."""
    image = PIL.Image.new("RGB", (size, size), "white")
    draw = PIL.ImageDraw.Draw(image)
    half = size // 2
    cells = sorted(rng.sample(range(len(CELLS)), rng.randint(1, max_shapes)))
    parts = []
    for cell in cells:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        extent = rng.randint(half // 2, half - 2)  # the shape's side, at least half the cell
        left = (cell % 2) * half + rng.randint(1, half - extent - 1)
        top = (cell // 2) * half + rng.randint(1, half - extent - 1)
        box = (left, top, left + extent, top + extent)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(left + extent / 2, top), (left, top + extent), (left + extent, top + extent)],
                         fill=COLOURS[colour])
        parts.append(f"{colour} {shape} {CELLS[cell]}")
    return image, ", ".join(parts)


class ShapeScenes(torch.utils.data.Dataset):
    """``count`` scenes of ``seed`` whose captions are in ``split``: item i is {"image", "text"}, drawn when asked
    (the first draw for i whose caption is in the split)."""

    def __init__(self, count: int, seed: int = 0, size: int = SCENE_SIZE, max_shapes: int = 3, split: str = "train"):
        if count < 1:
            raise ValueError(f"ShapeScenes: count must be at least 1, got {count}")
        if size < 16 or size % 2:
            raise ValueError(f"ShapeScenes: size must be an even number of pixels >= 16, got {size}")
        if not 1 <= max_shapes <= len(CELLS):
            raise ValueError(f"ShapeScenes: max_shapes must be in [1, {len(CELLS)}], got {max_shapes}")
        if split not in SPLITS:
            raise ValueError(f"ShapeScenes: split must be one of {SPLITS}, got {split!r}")
        self.count, self.seed, self.size, self.max_shapes, self.split = count, seed, size, max_shapes, split

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(f"scene {index} of {self.count}")
        attempt = 0
        while True:
            image, caption = draw_scene(random.Random(f"{self.seed}:{index}:{attempt}"), self.size, self.max_shapes)
            if caption_split(caption) == self.split:
                return {"image": image, "text": caption}
            attempt += 1

    def captions(self) -> list[str]:
        """Every scene's caption, in order."""
        return [self[index]["text"] for index in range(self.count)]


def train_and_held_out_scenes(max_documents: int | None, eval_fraction: float
                              ) -> tuple[ShapeScenes, ShapeScenes | None]:
    """``data.builtin: shapes``' scenes: ``max_documents`` training scenes (seed 0) and ``eval_fraction`` of that
    many held-out ones (seed 1, captions never trained on), None without a fraction."""
    train = ShapeScenes(max_documents or BUILTIN_SCENES, seed=0, split="train")
    if not eval_fraction:
        return train, None
    return train, ShapeScenes(max(1, int(len(train) * eval_fraction)), seed=1, split="held_out")


class ImageTextCollator:
    """Batches of {"image", "text"} for training: the image (the processor's image token) then the text and the end
    of text, through the processor, with labels on the text and its end only (the image tokens, row ends and padding
    are -100)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict:
        tokenizer = self.processor.tokenizer
        batch = self.processor(text=[self.processor.image_token + row["text"] + tokenizer.eos_token for row in rows],
                               images=[[row["image"]] for row in rows], padding=True, return_tensors="pt")
        labels = batch["input_ids"].clone()
        ignored = (batch["attention_mask"] == 0) | (labels == self.processor.image_token_id) \
            | (labels == self.processor.image_row_end_token_id)
        batch["labels"] = labels.masked_fill(ignored, -100)
        return dict(batch)


@torch.no_grad()
def caption_accuracy(model, processor, scenes, batch_size: int = 64) -> float:
    """The fraction of ``scenes`` whose greedy caption (up to the end of text) is exactly the true one."""
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    longest = max(len(tokenizer(text, add_special_tokens=False).input_ids) for text in scenes.captions())
    correct = 0
    for begin in range(0, len(scenes), batch_size):
        rows = [scenes[index] for index in range(begin, min(begin + batch_size, len(scenes)))]
        inputs = processor(text=[processor.image_token] * len(rows), images=[[row["image"]] for row in rows],
                           return_tensors="pt")
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
        generated = model.generate(**inputs, max_new_tokens=longest + 1, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = generated[:, inputs["input_ids"].shape[1]:]
        for row, tokens in zip(rows, new.tolist()):
            if tokenizer.eos_token_id in tokens:
                tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
            correct += tokenizer.decode(tokens) == row["text"]
    return correct / len(scenes)
