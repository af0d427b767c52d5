"""Staged distillation of a seeded student (ssm_hub.conversion.seeding.from_attention) from its teacher, through
transformers' Trainer: ``ssm-hub distill --teacher T --student S --data FILE --output DIR``.

    from ssm_hub.conversion.distillation.distill import (DistillationTrainer, ReplacedLayers,
                                                        hidden_alignment_loss, token_kl)
    trainer = DistillationTrainer(model=ReplacedLayers(student), teacher=teacher, stage="align", args=...,
                                  train_dataset=...)

Stages (each a Trainer run with its own steps; checkpoints, resume, logging and multi-GPU are Trainer's; with
several processes, ``ssm-hub distill ... --accelerate-config ddp --num-processes N``, each process trains on its
share of every batch and the gradients are averaged, in every stage; FSDP and DeepSpeed are refused, as they shard
the student in place):
- ``orient`` (optional; MOHAWK's matrix orientation): each replaced layer's scan, written as one [T, T] matrix per
  head (``Mamba2Mixer.mixing_matrix``), fed the teacher's hidden state entering that layer, learns to match the
  teacher's attention matrix of the same head (:func:`orientation_loss`); only the replaced layers' SSM mixers
  train. The teacher runs eager attention so that it returns its attention weights.
- ``align`` (MOHAWK's hidden-state alignment, mmMamba's stage 1): each replaced layer of the student, fed the
  teacher's hidden state entering that layer, learns to give the teacher's hidden state leaving it
  (:func:`hidden_alignment_loss`). Only the replaced layers' SSM mixers train; they train side by side, each on the
  teacher's own input, so no layer waits for the one before it to converge.
- ``kl``: the whole student against the teacher's next-token distribution, mean per-token KL(teacher || student)
  (:func:`token_kl`), plus ``ce_weight`` times the usual cross-entropy on the data; everything trains, or
  everything but the MLPs (``freeze_mlp``).

:func:`evaluate_against_teacher` gives what each stage is judged by: held-out perplexity of both models, the mean
token KL, and how often the student's greedy next token is the teacher's; :func:`generation_samples` puts their
greedy completions of the held-out documents' openings side by side.

Image-text data (``--builtin shapes``: captioned scenes, ssm_hub.training.shapes) distils an ssm_hub_multimodal
student (seeded from Fuyu by ``ssm-hub convert``) from its teacher, mmMamba's way: the same stages, each model fed
the images as it takes them (Fuyu the flattened patches, :func:`teacher_images`), the student's replaced layers
reached under ``model.language_model`` and routed by modality where the student has Mixture-of-Mamba, padding kept
out of the losses, and the evaluations over the caption tokens.
"""

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import Trainer

from ssm_hub.conversion.distillation.speed import DECODE_STEPS, longest_context, speed_table
from ssm_hub.conversion.formats.checkpoint import check_model_reference
from ssm_hub.conversion.seeding.from_attention import SEEDING_FILE
from ssm_hub.layers.patch_embedding import image_patches
from ssm_hub.layers.sequence_boundaries import resolve_seq_idx
from ssm_hub.output_folder import staged_model_folder
from ssm_hub.progress import progress_bar, status
from ssm_hub.training.checkpoints import CheckpointsWithoutPickle, StagedCheckpoints

STAGES = ("orient", "align", "kl")
EVAL_BATCH_SIZE = 64
"""Held-out rows per forward call of the evaluations, as the debug recipes' per_device_eval_batch_size: each call is
hundreds of small ops, so on a CPU fewer, larger calls take a fraction of the time (ssm-hub distill --eval-batch-size;
lower it where a batch's logits, rows x seq_len x vocabulary, do not fit)."""


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the (``mask``-ed) tokens of KL(softmax(teacher) || softmax(student)), in float32."""
    teacher_log_probs = torch.log_softmax(teacher_logits.float(), dim=-1)
    student_log_probs = torch.log_softmax(student_logits.float(), dim=-1)
    per_token = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    if mask is None:
        return per_token.mean()
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def hidden_alignment_loss(outputs: list[torch.Tensor], targets: list[torch.Tensor],
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers and rows of the batch of the mean squared error between a layer's output and its target
    [B, T, D], divided by the target's mean square in that row, so that neither layers nor rows with larger
    activations dominate; float32; over the tokens where ``mask`` [B, T] is 1 (padding left out). A mean over rows,
    so processes that split a batch average to the whole batch's loss."""
    losses = []
    for out, target in zip(outputs, targets, strict=True):
        target = target.float()
        weight = torch.ones(target.shape[:2], device=target.device) if mask is None else mask.float()
        tokens = weight.sum(1).clamp_min(1) * target.shape[-1]
        squared_error = ((out.float() - target).square() * weight[..., None]).flatten(1).sum(1) / tokens
        scale = (target.square() * weight[..., None]).flatten(1).sum(1) / tokens
        losses.append(squared_error / scale.clamp_min(1e-12))
    return torch.stack(losses).mean()


def orientation_loss(matrices: list[torch.Tensor], attentions: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers, heads and rows of the batch of the Frobenius distance between each [T, T] mixing matrix and
    the teacher's attention matrix; float32."""
    distances = [(matrix.float() - attention.float()).square().sum((-2, -1)).sqrt().mean()
                 for matrix, attention in zip(matrices, attentions, strict=True)]
    return torch.stack(distances).mean()


def replaced_layers(student) -> list[int]:
    """The student's layers that are SSM mixers (the ones seeded from attention)."""
    return [layer for layer, kind in enumerate(student.config.mixer_types) if kind in ("mamba", "mamba2")]


def student_blocks(student) -> torch.nn.ModuleList:
    """The student's blocks: ``model.layers``, or an ssm_hub_multimodal's ``model.language_model.layers``."""
    base = student.model
    return getattr(base, "language_model", base).layers


def set_trainable(student, stage: str, freeze_mlp: bool = False) -> int:
    """Freeze what ``stage`` does not train (module docstring); returns the number of trainable parameters."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    blocks = student_blocks(student)
    mixers = {id(p) for layer in replaced_layers(student) for p in blocks[layer].mamba.parameters()}
    for name, parameter in student.named_parameters():
        train = id(parameter) in mixers if stage != "kl" else not (freeze_mlp and ".feed_forward." in name)
        parameter.requires_grad_(train)
    count = sum(p.numel() for p in student.parameters() if p.requires_grad)
    if count == 0:
        raise ValueError(f"stage {stage!r} has nothing to train: the student has no SSM layer"
                         if stage != "kl" else f"stage {stage!r} with freeze_mlp has nothing to train")
    return count


def teacher_decoder_layers(teacher) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM: ``model.layers`` (Llama family), ``transformer.h`` (GPT-2) or
    ``model.language_model.layers`` (Fuyu, ssm_hub_multimodal)."""
    for base in (teacher.base_model, getattr(teacher.base_model, "language_model", None)):
        for name in ("layers", "h"):
            if isinstance(getattr(base, name, None), torch.nn.ModuleList):
                return getattr(base, name)
    raise ValueError(f"cannot find the decoder layers of {type(teacher).__name__} (looked for "
                     f"{teacher.base_model_prefix}.layers and {teacher.base_model_prefix}.h)")


def teacher_layer_states(teacher, input_ids, position_ids, attentions: bool = False, **other_inputs):
    """(inputs, outputs) of every decoder layer of a transformers teacher (:func:`teacher_decoder_layers`), captured with
    forward hooks, so the last layer's raw output is there too (``output_hidden_states`` gives it after the final
    norm); with ``attentions``, also each layer's attention weights [B, H, T, T] (the teacher must run eager
    attention). ``other_inputs``: the teacher's other inputs (attention_mask, images)."""
    inputs, outputs = [], []

    def record(module, args, kwargs, output):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in teacher_decoder_layers(teacher)]
    try:
        with torch.no_grad():
            result = teacher(input_ids=input_ids, position_ids=position_ids, output_attentions=attentions,
                             **other_inputs)
    finally:
        for handle in handles:
            handle.remove()
    if attentions:
        return inputs, outputs, list(result.attentions)
    return inputs, outputs


class ReplacedLayers(torch.nn.Module):
    """The student's replaced (SSM) blocks as one module, the model that the ``orient`` and ``align`` stages train:
    Trainer wraps it (DDP, FSDP) and calls it, so that these layers' gradients are averaged across processes as any
    model's are. It holds the student's own blocks, not copies."""

    _no_split_modules = ["HybridBlock"]  # FSDP wraps each block, as for the whole student

    def __init__(self, student):
        super().__init__()
        self.layers = replaced_layers(student)
        if not self.layers:
            raise ValueError("the student has no SSM layer: nothing to orient or align")
        self.blocks = torch.nn.ModuleList(student_blocks(student)[layer] for layer in self.layers)
        # The tokens' modality routing, for a student whose blocks have per-modality parts (ssm_hub_multimodal).
        self.modality_routing = getattr(student.model, "modality_routing", lambda input_ids: None)

    def forward(self, layer_inputs: list[torch.Tensor], seq_idx: torch.Tensor | None = None,
                mixing_matrices: bool = False, padding_mask: torch.Tensor | None = None,
                input_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """For each replaced layer, fed ``layer_inputs[layer]`` (the teacher's hidden state entering it): the
        block's output, or with ``mixing_matrices`` its scan's [B, H, T, T] mixing matrices. ``padding_mask``
        [B, T]: 1 at real tokens; ``input_ids``: for the modality routing of a multimodal student."""
        modality = self.modality_routing(input_ids) if input_ids is not None else None
        results = []
        for layer, block in zip(self.layers, self.blocks):
            hidden = layer_inputs[layer]
            if not mixing_matrices:
                # The block returns its last branch's output and the residual stream before it: their sum is the
                # stream after the block.
                out, residual, *_ = block(hidden, padding_mask=padding_mask, seq_idx=seq_idx, modality=modality)
                results.append(residual + out)
                continue
            if block.mixer_type != "mamba2":
                raise ValueError(f"matrix orientation needs Mamba-2 layers; layer {layer} is {block.mixer_type!r}")
            normed = block.input_layernorm(hidden.to(block.input_layernorm.weight.dtype))
            results.append(block.mamba.mixing_matrix(normed, seq_idx))
        return results


class DistillationTrainer(StagedCheckpoints, CheckpointsWithoutPickle, Trainer):
    """Trainer whose loss is the stage's (module docstring) against a frozen ``teacher``, which it moves to the
    training device. ``model`` is the student for the ``kl`` stage and its :class:`ReplacedLayers` for the others.
    ``ce_weight`` adds the cross-entropy on the labels in the ``kl`` stage. Its checkpoints appear whole and hold no
    pickle (ssm_hub.training.checkpoints)."""

    def __init__(self, *args, teacher, stage: str, ce_weight: float = 0.0, **kwargs):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        model = kwargs.get("model", args[0] if args else None)
        if (stage == "kl") == isinstance(model, ReplacedLayers):
            raise ValueError(f"the {stage!r} stage trains " + ("the whole student" if stage == "kl" else
                             "ReplacedLayers(student): the replaced layers, called one by one"))
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # They shard the student's parameters in place, and the evaluations and stages that follow need it whole.
            raise ValueError("distillation runs data-parallel (accelerate config ddp), not under FSDP or DeepSpeed, "
                             "which shard the student that the next stage and the evaluations need whole")
        # The columns compute_loss reads: Trainer would otherwise keep only those that the model's forward names
        # (ReplacedLayers.forward names none of them).
        self._signature_columns = ["input_ids", "position_ids", "labels", "attention_mask", "pixel_values",
                                   "image_sizes"]
        # compute_loss returns a mean over this process's tokens; Trainer must not rescale it as it does a loss
        # summed and divided by the tokens of all processes (num_items_in_batch).
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.stage, self.ce_weight = stage, ce_weight
        if stage == "orient":
            self.teacher.set_attn_implementation("eager")  # only eager attention returns its weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, position_ids = inputs["input_ids"], inputs.get("position_ids")
        if self.stage in ("orient", "align"):
            loss = (self._orientation if self.stage == "orient" else self._alignment)(model, inputs)
            return (loss, None) if return_outputs else loss
        mask = inputs.get("attention_mask")
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, position_ids=position_ids,
                                          **teacher_inputs(self.teacher, inputs)).logits
        outputs = model(input_ids=input_ids, position_ids=position_ids, **student_inputs(inputs),
                        labels=inputs["labels"] if self.ce_weight else None)
        loss = token_kl(teacher_logits, outputs.logits, mask)
        if self.ce_weight:
            loss = loss + self.ce_weight * outputs.loss
        return (loss, outputs) if return_outputs else loss

    def _orientation(self, model, inputs):
        input_ids, position_ids = inputs["input_ids"], inputs.get("position_ids")
        if "pixel_values" in inputs:
            raise ValueError("matrix orientation takes text data; distil image-text data with --orient-steps 0")
        layer_inputs, _, attentions = teacher_layer_states(self.teacher, input_ids, position_ids, attentions=True)
        seq_idx = resolve_seq_idx(input_ids.shape[0], input_ids.shape[1], position_ids, {})
        matrices = model(layer_inputs, seq_idx=seq_idx, mixing_matrices=True)
        layers = self.accelerator.unwrap_model(model).layers
        return orientation_loss(matrices, [attentions[layer] for layer in layers])

    def _alignment(self, model, inputs):
        input_ids, position_ids = inputs["input_ids"], inputs.get("position_ids")
        layer_inputs, layer_outputs = teacher_layer_states(self.teacher, input_ids, position_ids,
                                                           **teacher_inputs(self.teacher, inputs))
        seq_idx = resolve_seq_idx(input_ids.shape[0], input_ids.shape[1], position_ids, {})
        mask = inputs.get("attention_mask")
        outputs = model(layer_inputs, seq_idx=seq_idx, padding_mask=mask, input_ids=input_ids)
        layers = self.accelerator.unwrap_model(model).layers
        return hidden_alignment_loss(outputs, [layer_outputs[layer] for layer in layers], mask)


def student_inputs(batch: dict) -> dict:
    """What the student takes from a batch besides input_ids, position_ids and labels: the padding mask and the
    images (pixel_values, image_sizes)."""
    return {name: batch[name] for name in ("attention_mask", "pixel_values", "image_sizes") if name in batch}


def teacher_images(teacher, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> torch.Tensor:
    """The batch's images as the teacher takes them: for Fuyu, every image's patches flattened in its (row, column,
    channel) order, one after the other [1, patches, p * p * C], which its forward scatters over the image tokens
    in order; other teachers (an ssm_hub_multimodal) take pixel_values as they are."""
    if teacher.config.model_type != "fuyu":
        return pixel_values
    if image_sizes is None:
        image_sizes = torch.tensor([list(pixel_values.shape[-2:])] * pixel_values.shape[0])
    patches = [image_patches(pixel_values[index, :, :height, :width], teacher.config.patch_size).flatten(0, 1)
               for index, (height, width) in enumerate(image_sizes.tolist())]
    return torch.cat(patches)[None]


def teacher_inputs(teacher, batch: dict) -> dict:
    """What the teacher takes from a batch besides input_ids and position_ids (:func:`student_inputs`, with the
    images in the teacher's own form)."""
    inputs = {name: batch[name] for name in ("attention_mask",) if name in batch}
    if "pixel_values" in batch:
        inputs["pixel_values"] = teacher_images(teacher, batch["pixel_values"], batch.get("image_sizes"))
        if teacher.config.model_type != "fuyu" and "image_sizes" in batch:
            inputs["image_sizes"] = batch["image_sizes"]
    return inputs


@torch.no_grad()
def evaluate_against_teacher(student, teacher, dataset, batch_size: int = EVAL_BATCH_SIZE, collate=None) -> dict:
    """Held-out perplexity of teacher and student, mean token KL(teacher || student) and greedy next-token agreement
    over ``dataset`` (rows of input_ids, position_ids and labels; or rows that ``collate`` turns into batches, as
    image-text scenes), ``batch_size`` rows per forward call, at the tokens that carry the loss: those whose label is
    not -100 (every token but where the data masks the loss, as the recall task and the captions do)."""
    device = next(student.parameters()).device
    totals = dict(teacher_nll=0.0, student_nll=0.0, kl=0.0, agree=0.0)
    tokens = 0
    for begin in progress_bar(range(0, len(dataset), batch_size), "evaluating"):
        rows = [dataset[index] for index in range(begin, min(begin + batch_size, len(dataset)))]
        if collate is None:
            batch = {name: torch.stack([row[name] for row in rows]) for name in ("input_ids", "position_ids", "labels")}
        else:
            batch = collate(rows)
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        input_ids, position_ids = batch["input_ids"], batch.get("position_ids")
        targets = batch["labels"][:, 1:]
        counted = targets != -100
        teacher_logits = teacher(input_ids=input_ids, position_ids=position_ids,
                                 **teacher_inputs(teacher, batch)).logits[:, :-1][counted].float()
        student_logits = student(input_ids=input_ids, position_ids=position_ids,
                                 **student_inputs(batch)).logits[:, :-1][counted].float()
        targets = targets[counted]
        for name, logits in (("teacher_nll", teacher_logits), ("student_nll", student_logits)):
            totals[name] += F.cross_entropy(logits, targets, reduction="sum").item()
        totals["kl"] += token_kl(teacher_logits, student_logits).item() * targets.numel()
        totals["agree"] += (teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum().item()
        tokens += targets.numel()
    return {
        "teacher_perplexity": math.exp(totals["teacher_nll"] / tokens),
        "student_perplexity": math.exp(totals["student_nll"] / tokens),
        "mean_token_kl": totals["kl"] / tokens,
        "greedy_agreement": totals["agree"] / tokens,
        "tokens": tokens,
    }


@torch.no_grad()
def generation_samples(teacher, student, tokenizer, prompts: list[str], max_new_tokens: int = 30) -> list[dict]:
    """Greedy completions of ``prompts`` by teacher and student, side by side."""
    device = next(student.parameters()).device
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        completions = {}
        for name, model in (("teacher", teacher), ("student", student)):
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            completions[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": prompt, **completions})
    return samples


def sample_prompts(documents: list[str], count: int = 3, characters: int = 60) -> list[str]:
    """The opening words (up to ``characters``, cut at a space) of the first ``count`` documents."""
    prompts = []
    for document in documents[:count]:
        text = " ".join(document.split())[:characters]
        prompts.append(text.rsplit(" ", 1)[0] if " " in text else text)
    return prompts


def report_lines(report: dict) -> list[str]:
    """The report of :func:`distill` as text: the evaluation after each stage, then the speed at each context."""
    lines = [f"{'after':<12} {'teacher ppl':>11} {'student ppl':>11} {'token KL':>9} {'greedy agreement':>17}"]
    for after, result in report["evaluations"].items():
        lines.append(f"{after:<12} {result['teacher_perplexity']:>11.2f} {result['student_perplexity']:>11.2f} "
                     f"{result['mean_token_kl']:>9.4f} {result['greedy_agreement']:>17.1%}")
    if "speed_skipped" in report:
        skipped = report["speed_skipped"]
        lines.append(f"not timed at context {', '.join(map(str, skipped['contexts']))}: {skipped['why']}")
    for row in report.get("speed", []):
        lines.append(f"context {row['context']:>5}: the student decodes {row['decode_speedup']:.2f}x and prefills "
                     f"{row['prefill_speedup']:.2f}x the teacher's tokens/s, with {row['cache_ratio']:.2f}x its "
                     f"cache memory")
    return lines


class _Material(NamedTuple):
    """What the stages train and are judged on: the student's tokenizer or processor, the training and held-out
    rows, the collator (image-text data) and the held-out openings that the evaluations complete (text data)."""

    processing: Any
    train_data: Any
    eval_data: Any
    collate: Any
    prompts: list[str]
    image_text: bool


class _StageSettings(NamedTuple):
    """The Trainer settings every stage shares."""

    batch_size: int
    learning_rate: float
    ce_weight: float
    freeze_mlp: bool
    bf16: bool
    seed: int
    use_cpu: bool
    resume: bool


def distill(teacher: str, student: str, data, output_dir: str, align_steps: int = 100, kl_steps: int = 200,
            orient_steps: int = 0, batch_size: int = 8, learning_rate: float = 1e-3, ce_weight: float = 0.0,
            freeze_mlp: bool = False, bf16: bool = False, seed: int = 0, speed_contexts: list[int] | None = None,
            resume: bool = False, tokenizer: str | None = None, eval_batch_size: int = EVAL_BATCH_SIZE) -> dict:
    """Run the stages on ``data`` (an ``ssm_hub.training.config.DataSection``) and write the distilled student
    (with the student folder's tokenizer, or ``tokenizer``'s: a folder or Hub id, for a student that ``ssm-hub
    convert`` wrote without one), ``distillation.json`` (the evaluations after seeding and after each
    stage, and the settings) and each stage's Trainer output under ``output_dir/<stage>``. A stage with 0 steps is
    skipped. The evaluations run ``eval_batch_size`` held-out rows per forward call. ``speed_contexts``: also measure
    prefill and decode tokens/s and the cache memory of the teacher and the distilled student at these context
    lengths (ssm_hub.conversion.distillation.speed). ``resume``: each stage continues
    from its last checkpoint under ``output_dir/<stage>`` where there is one (a finished stage just restores its
    final weights), so an interrupted run picks up where it stopped. Under a distributed launcher every process
    trains; the first alone evaluates, times and writes (the others wait), and every process returns the same
    settings but only the first the evaluations. Returns the report."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, TrainingArguments, set_seed

    from ssm_hub.models.checkpoint_loading import from_pretrained_safetensors

    steps_by_stage = dict(zip(STAGES, (orient_steps, align_steps, kl_steps)))
    _check_settings(steps_by_stage, eval_batch_size, teacher=teacher, student=student, tokenizer=tokenizer)
    output = Path(output_dir)
    set_seed(seed)
    material = _training_material(data, student, tokenizer, orient_steps)
    # The student trains in float32 (bf16 comes from --bf16's autocast), whatever dtype its folder stores; both
    # models go to this process's training device at once, so that the seeded evaluation runs there too.
    # TrainingArguments sets up the processes (the device, the process group) as the stages' Trainers see them;
    # without a GPU, several processes (gloo) need use_cpu.
    use_cpu = not torch.cuda.is_available()
    device = TrainingArguments(output_dir=str(output), report_to="none", bf16=bf16, use_cpu=use_cpu).device
    processes = PartialState()
    status(f"teacher: loading {teacher}")
    teacher_model = from_pretrained_safetensors(AutoModelForCausalLM, teacher).to(device).eval()
    status(f"student: loading {student}")
    student_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).to(device)
    teacher_vocabulary = teacher_model.config.get_text_config().vocab_size  # Fuyu's is its decoder's
    if teacher_vocabulary != student_model.config.vocab_size:
        raise ValueError(f"the teacher's vocabulary ({teacher_vocabulary}) and the student's "
                         f"({student_model.config.vocab_size}) differ: distil a student seeded from this teacher")
    settings = _StageSettings(batch_size, learning_rate, ce_weight, freeze_mlp, bf16, seed, use_cpu, resume)
    report = {"teacher": str(teacher), "student": str(student), "settings": dict(
        orient_steps=orient_steps, align_steps=align_steps, kl_steps=kl_steps, batch_size=batch_size,
        eval_batch_size=eval_batch_size, learning_rate=learning_rate, ce_weight=ce_weight, freeze_mlp=freeze_mlp,
        seq_len=data.seq_len, bf16=bf16, seed=seed),
        "evaluations": {}, "samples": {}, "train_loss": {}}

    def evaluate(after):
        if processes.is_main_process:
            _evaluate(report, after, student_model, teacher_model, material, eval_batch_size)
        processes.wait_for_everyone()

    evaluate("seeded")
    for stage, steps in steps_by_stage.items():
        if steps:  # a stage with 0 steps is skipped
            report["train_loss"][stage] = _train_stage(stage, steps, student_model, teacher_model, material, settings,
                                                       output / stage, processes.is_main_process)
            evaluate(f"after_{stage}")
    student_model.requires_grad_(True)
    if processes.is_main_process:
        if speed_contexts:
            report.update(_speed_report(teacher_model, student_model, speed_contexts))
        _save(output, student_model, material.processing, Path(student), report)
    processes.wait_for_everyone()
    return report


def _check_settings(steps_by_stage: dict, eval_batch_size, **references) -> None:
    for stage, steps in steps_by_stage.items():
        if steps < 0:
            raise ValueError(f"{stage}_steps must be at least 0, got {steps}")
    if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int) or eval_batch_size < 1:
        raise ValueError(f"eval_batch_size must be a positive whole number, got {eval_batch_size!r}")
    for what, reference in references.items():
        if reference is not None:
            check_model_reference(reference, what)


def _training_material(data, student: str, tokenizer: str | None, orient_steps: int) -> _Material:
    """The student's tokenizer (or processor) and the rows of ``data``, split into training and held-out rows."""
    from transformers import AutoTokenizer

    from ssm_hub.conversion.formats.checkpoint import has_tokenizer
    from ssm_hub.training.data import read_documents, split_held_out, train_and_eval_datasets

    if data.eval_fraction <= 0:
        raise ValueError("distillation evaluates on held-out documents: data.eval_fraction must be above 0")
    if data.builtin == "shapes":
        from transformers import AutoProcessor

        from ssm_hub.training.shapes import ImageTextCollator, train_and_held_out_scenes

        if orient_steps:
            raise ValueError("matrix orientation takes text data; distil image-text data with --orient-steps 0")
        if tokenizer is not None:
            raise ValueError("--tokenizer applies to text data: an image-text student carries its own processor")
        processing = AutoProcessor.from_pretrained(student)  # the tokenizer and the image processor
        train_data, eval_data = train_and_held_out_scenes(data.max_documents, data.eval_fraction)
        status(f"data: {len(train_data):,} captioned scenes, {len(eval_data):,} held out")
        return _Material(processing, train_data, eval_data, ImageTextCollator(processing), [], True)
    if tokenizer is None and Path(student).is_dir() and not has_tokenizer(Path(student)):
        raise ValueError(f"the student {student} has no tokenizer (ssm-hub convert found none in the teacher to "
                         "copy): pass the teacher's tokenizer, its folder or Hub id, as --tokenizer (tokenizer= "
                         "in Python)")
    processing = AutoTokenizer.from_pretrained(tokenizer or student)
    documents = read_documents(data)
    train_data, eval_data = train_and_eval_datasets(documents, processing, data)
    prompts = sample_prompts(split_held_out(documents, data.eval_fraction)[1])
    return _Material(processing, train_data, eval_data, None, prompts, False)


def _evaluate(report: dict, after: str, student_model, teacher_model, material: _Material,
              eval_batch_size: int) -> None:
    """Judge the student against the teacher on the held-out rows into ``report`` (see evaluate_against_teacher)."""
    student_model.eval()
    status(f"evaluation {after}: teacher and student on {len(material.eval_data):,} held-out rows")
    scores = evaluate_against_teacher(student_model, teacher_model, material.eval_data, eval_batch_size,
                                      material.collate)
    report["evaluations"][after] = scores
    status(f"evaluation {after}: student perplexity {scores['student_perplexity']:.2f} (teacher "
           f"{scores['teacher_perplexity']:.2f}), token KL {scores['mean_token_kl']:.4f}, greedy agreement "
           f"{scores['greedy_agreement']:.1%}")
    if material.prompts:
        status(f"evaluation {after}: greedy completions of {len(material.prompts)} held-out openings")
        report["samples"][after] = generation_samples(teacher_model, student_model, material.processing,
                                                      material.prompts)


def _train_stage(stage: str, steps: int, student_model, teacher_model, material: _Material,
                 settings: _StageSettings, stage_dir: Path, main_process: bool) -> list[tuple[int, float]]:
    """One stage as a Trainer run in ``stage_dir`` (resumed from its last checkpoint with ``settings.resume``); its
    (step, loss) log."""
    from transformers import TrainingArguments

    from ssm_hub.training.callbacks import write_loss_curve

    trained = set_trainable(student_model, stage, settings.freeze_mlp)
    resumed = settings.resume and any(stage_dir.glob("checkpoint-*"))
    status(f"stage {stage}: {steps:,} steps, {trained:,} parameters train" + (", resumed" if resumed else ""))
    arguments = TrainingArguments(
        output_dir=str(stage_dir), max_steps=steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10),
        logging_steps=max(1, steps // 20), save_steps=max(1, steps // 2), report_to="none", bf16=settings.bf16,
        seed=settings.seed, max_grad_norm=1.0, dataloader_pin_memory=not settings.use_cpu, use_cpu=settings.use_cpu,
        # A scan's mixing matrix leaves D, the gated norm and out_proj out of the orient stage's loss.
        ddp_find_unused_parameters=stage == "orient",
        # Image-text rows are scenes and captions, which the collator turns into the models' inputs.
        remove_unused_columns=not material.image_text,
    )
    attention = teacher_model.config._attn_implementation  # before the orient stage switches it to eager
    trainer = DistillationTrainer(model=student_model if stage == "kl" else ReplacedLayers(student_model),
                                  teacher=teacher_model, stage=stage, ce_weight=settings.ce_weight, args=arguments,
                                  train_dataset=material.train_data, data_collator=material.collate)
    trainer.train(resume_from_checkpoint=resumed or None)
    teacher_model.set_attn_implementation(attention)  # orient switched it to eager; the other stages need not
    if main_process:
        write_loss_curve(trainer.state.log_history, stage_dir / "loss_curve.png")
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def _speed_report(teacher_model, student_model, speed_contexts: list[int]) -> dict:
    """{"speed": the speed table} at the contexts both models can take, and {"speed_skipped": ...} for the others."""
    longest = longest_context(teacher_model, student_model)
    timed = [context for context in speed_contexts if longest is None or context <= longest]
    report = {}
    if len(timed) < len(speed_contexts):
        report["speed_skipped"] = {
            "contexts": [context for context in speed_contexts if context not in timed],
            "why": f"a model has learned absolute positions, and the timing decodes {DECODE_STEPS} tokens past the "
                   f"context: at most {longest} tokens of context"}
    report["speed"] = speed_table(teacher_model, student_model, timed)
    return report


def _save(output: Path, student_model, processing, student: Path, report: dict) -> None:
    """The distilled student, its tokenizer or processor, the seeding record and distillation.json, written beside
    each other in a staging folder and renamed into ``output`` together, so that an interrupted save leaves no
    student that loads half-written or without its report (ssm_hub.output_folder)."""
    status(f"saving: the distilled student and distillation.json in {output}")
    with staged_model_folder(output) as staging:
        student_model.save_pretrained(staging)
        processing.save_pretrained(staging)
        seeding = student / SEEDING_FILE
        if seeding.is_file():  # the model card tells how the student was seeded
            (staging / SEEDING_FILE).write_bytes(seeding.read_bytes())
        (staging / "distillation.json").write_text(json.dumps(report, indent=1) + "\n")
