"""``ssm-hub train``: run a recipe (ssm_hub.training.config) through transformers' Trainer.

    from ssm_hub.training import load_recipe, train
    train(load_recipe("recipes/debug_mamba2.yaml", ["train.max_steps=5"]))

It builds the tokenizer (pretrained, a byte-level BPE trained on the data, or one token per character), the model
(a new one of any registered model_type, ssm_hub's or transformers', or a pretrained one, optionally with LoRA
through PEFT), packs the data, and runs
Trainer with the recipe's TrainingArguments: checkpoints, ``resume_from_checkpoint``, evaluation and logging are
Trainer's; each checkpoint is renamed into place once complete and holds no pickle (ssm_hub.training.checkpoints).
Status lines say what the run does before Trainer's bar appears (ssm_hub.progress). Logs carry tokens/s (and peak
memory on CUDA); ``loss_curve.png`` is written next to the checkpoints.
At the end the model (adapters only for LoRA), the tokenizer and ``trainer_state.json`` (the log history) are
saved in ``train.output_dir`` and a summary is returned.

``train.output_dir`` must be empty unless ``train.overwrite_output_dir`` (replace what an earlier run wrote there,
nothing else) or ``train.resume_from_checkpoint`` (continue that run, of the same recipe) says what to do with
it; its manifest records what each run wrote and the recipe (ssm_hub.output_folder).
"""

import math
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ssm_hub.output_folder import (
    MANIFEST,
    STAGING_PREFIX,
    OutputFolder,
    check_output_folder,
    claim_output_folder,
    read_manifest,
)
from ssm_hub.progress import status
from ssm_hub.training.callbacks import LOSS_CURVE_FILE, LossCurveCallback, ThroughputCallback, write_loss_curve
from ssm_hub.training.checkpoints import CheckpointsWithoutPickle, StagedCheckpoints
from ssm_hub.training.config import TRAIN_KEYS_OF_SSM_HUB, Recipe, recipe_differences, recipe_record
from ssm_hub.training.data import character_tokenizer, read_documents, train_and_eval_datasets, train_tokenizer


def build_tokenizer(recipe: Recipe, documents: list[str]):
    if recipe.tokenizer.pretrained is not None:
        from transformers import AutoTokenizer

        status(f"tokenizer: loading {recipe.tokenizer.pretrained}")
        tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer.pretrained)
    elif recipe.tokenizer.characters:
        tokenizer = character_tokenizer(documents)
        status(f"tokenizer: one token per character of the data, {len(tokenizer):,} tokens")
    else:
        status(f"tokenizer: training a byte-level BPE of {recipe.tokenizer.train_bpe:,} tokens on "
               f"{len(documents):,} documents")
        tokenizer = train_tokenizer(documents, recipe.tokenizer.train_bpe)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(recipe: Recipe, tokenizer, image_tokens: dict | None = None):
    """The recipe's model; ``image_tokens`` ({"image_token_id", "image_row_end_token_id"}, the processor's) go into
    a new multimodal model's config beside the tokenizer's ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import ssm_hub  # noqa: F401  (registers the ssm_hub model types)
    from ssm_hub.models.checkpoint_loading import from_pretrained_safetensors

    dtype = getattr(torch, recipe.model.dtype)
    if recipe.model.pretrained is not None:
        status(f"model: loading {recipe.model.pretrained}")
        model = from_pretrained_safetensors(AutoModelForCausalLM, recipe.model.pretrained, dtype=dtype)
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {recipe.model.pretrained}'s embedding "
                             f"has {rows} rows: use the model's own tokenizer (tokenizer.pretrained)")
    else:
        special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **(image_tokens or {}))
        clashing = sorted(set(special) & set(recipe.model.config))
        if clashing:
            raise ValueError(f"model.config sets {clashing}, which come from the tokenizer; remove them")
        try:
            config = AutoConfig.for_model(recipe.model.type, **recipe.model.config, **special)
        except (TypeError, ValueError) as error:
            raise ValueError(f"model.config: {error}") from None
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _mark_zero3_leaf_modules(model)
    if recipe.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **recipe.lora))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    status(f"model: {model.config.model_type}, {parameters:,} parameters"
           + (f", {trained:,} of them trained (LoRA)" if recipe.lora is not None else ""))
    return model


_INTERRUPTED = threading.Event()


@contextmanager
def _interrupts_noted():
    """While training, Ctrl-C raises KeyboardInterrupt as usual and is also noted, and the next step's end raises
    it again: Python drops a KeyboardInterrupt that lands in a garbage collector's callback (printed as "Exception
    ignored"), which saving a checkpoint, with its many short-lived objects, makes likely. A process that ignores
    SIGINT, or runs this off the main thread, is left as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def noted(signum, frame):
        _INTERRUPTED.set()
        raise KeyboardInterrupt

    _INTERRUPTED.clear()
    signal.signal(signal.SIGINT, noted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _INTERRUPTED.clear()


def _recipe_trainer_class():
    from transformers import Trainer, TrainerCallback

    class StopWhenInterrupted(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if _INTERRUPTED.is_set():
                raise KeyboardInterrupt

        on_save = on_step_end

    class RecipeTrainer(StagedCheckpoints, CheckpointsWithoutPickle, Trainer):
        """Trainer whose training logs also carry tokens/s and peak memory (ThroughputCallback.measure), whose
        checkpoints appear whole and hold no pickle (ssm_hub.training.checkpoints), and which stops at the next step
        when Ctrl-C was pressed (_interrupts_noted)."""

        def __init__(self, *args, throughput: ThroughputCallback, **kwargs):
            super().__init__(*args, callbacks=[throughput, LossCurveCallback(), StopWhenInterrupted()], **kwargs)
            self.throughput = throughput

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs:
                logs = {**logs, **self.throughput.measure(self.state.global_step)}
            super().log(logs, *args, **kwargs)

    return RecipeTrainer


def _mark_zero3_leaf_modules(model) -> None:
    """Under DeepSpeed ZeRO-3, gather each mixer's and MoE layer's parameters as one unit: a MoE layer runs a
    data-dependent subset of its experts (different on each rank) and the SSM mixers read their weights inside
    kernels, so ZeRO-3's per-submodule fetch hooks must not fire inside them."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    from deepspeed.utils import set_z3_leaf_modules

    from ssm_hub.layers.mamba2_mixer import Mamba2Mixer
    from ssm_hub.layers.mamba_mixer import MambaMixer
    from ssm_hub.layers.moe import SparseMoE

    set_z3_leaf_modules(model, [SparseMoE, MambaMixer, Mamba2Mixer])


def _check_eval_batches(eval_data, arguments) -> None:
    """With dataloader_drop_last, Trainer's evaluation drops the held-out rows that do not fill a batch of every
    process; if none is filled it evaluates nothing and reports no loss. Said before training, not after it."""
    if eval_data is None or not arguments.dataloader_drop_last:
        return
    rows_per_batch = arguments.per_device_eval_batch_size * arguments.world_size
    if len(eval_data) < rows_per_batch:
        raise ValueError(
            f"train.dataloader_drop_last = true drops every held-out row: {len(eval_data)} rows fill no evaluation "
            f"batch of train.per_device_eval_batch_size ({arguments.per_device_eval_batch_size}) x "
            f"{arguments.world_size} process(es); lower train.per_device_eval_batch_size or raise data.eval_fraction")


def check_before_work(recipe: Recipe) -> None:
    """What a run checks before any work, beyond the recipe's own checks: the data files (readable UTF-8 text), and
    ``train.output_dir``, which must be empty unless the recipe says what to do with what it holds:
    ``train.overwrite_output_dir`` replaces what an earlier ``ssm-hub train`` wrote there (nothing else), and
    ``train.resume_from_checkpoint`` continues a run, which must be of the same recipe (its hash, recorded beside
    the checkpoints). Raises ValueError naming the file or the folder and the keys; writes nothing."""
    recipe.data.check_files()
    if is_first_process():  # under a distributed launcher, the others would see the first one's writes
        _check_resumed_recipe(recipe)
        check_output_folder(recipe.train["output_dir"], "train", **_output_dir_policy(recipe))


def _output_dir_policy(recipe: Recipe) -> dict:
    return dict(overwrite=bool(recipe.train.get("overwrite_output_dir")), resume=_resumes_in_output_dir(recipe),
                overwrite_flag="train.overwrite_output_dir=true", resume_flag="train.resume_from_checkpoint=true")


def is_first_process() -> bool:
    """Whether this is the only process, or the first that a distributed launcher started: the one that checks and
    records train.output_dir (the others would see its writes)."""
    return os.environ.get("RANK", "0") == "0"


def _resumes_in_output_dir(recipe: Recipe) -> bool:
    resume = recipe.train.get("resume_from_checkpoint")
    if not resume:
        return False
    if resume is True:
        return True
    output = Path(recipe.train["output_dir"]).resolve()
    return output == Path(resume).resolve().parent


def _check_resumed_recipe(recipe: Recipe) -> None:
    """A checkpoint to resume from must come from a run of this recipe, as recorded in the manifest of the folder
    that holds it."""
    resume = recipe.train.get("resume_from_checkpoint")
    if not resume:
        return
    folder = Path(recipe.train["output_dir"]) if resume is True else Path(resume).parent
    if resume is True and not any(folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
        raise ValueError(f"train.resume_from_checkpoint=true, but {folder} holds no {PREFIX_CHECKPOINT_DIR}-* folder "
                         "to resume from: leave it out to start a new run")
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("command") != "train" or "recipe_sha256" not in manifest:
        raise ValueError(f"cannot tell which recipe wrote the checkpoints in {folder} (no ssm-hub train record, "
                         f"{MANIFEST}, beside them): resume only a run that ssm-hub train wrote")
    record = recipe_record(recipe)
    if manifest["recipe_sha256"] != record["recipe_sha256"]:
        changed = recipe_differences(manifest.get("recipe", {}), record["recipe"])
        raise ValueError(f"train.resume_from_checkpoint: the checkpoints in {folder} come from another recipe ("
                         + "; ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
                         + "): resume with the same recipe, or train into a new train.output_dir")


def train(recipe: Recipe) -> dict:
    """Run ``recipe``; returns {"train_loss", "eval_loss" (or None), "steps", "output_dir", "loss_curve"}.
    Everything is checked first (:func:`check_before_work`); the output_dir's manifest records what the run wrote."""
    from transformers import TrainingArguments

    arguments = {key: value for key, value in recipe.train.items() if key not in TRAIN_KEYS_OF_SSM_HUB}
    try:
        arguments = TrainingArguments(**arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"train: {error}") from None
    check_before_work(recipe)
    if not is_first_process():  # under a distributed launcher, the first process keeps the output_dir's record
        return _train(recipe, arguments, None)
    with claim_output_folder(arguments.output_dir, "train", record=recipe_record(recipe),
                             **_output_dir_policy(recipe)) as folder:
        return _train(recipe, arguments, folder)


def _train(recipe: Recipe, arguments, folder: OutputFolder | None) -> dict:
    from transformers import set_seed

    set_seed(arguments.seed)  # before the model is built, so that its initialisation is reproducible too
    if recipe.data.builtin == "shapes":
        return _train_image_text(recipe, arguments, folder)
    documents = read_documents(recipe.data)
    tokenizer = build_tokenizer(recipe, documents)
    train_data, eval_data = train_and_eval_datasets(documents, tokenizer, recipe.data)
    if eval_data is None and arguments.eval_strategy != "no":
        raise ValueError(f"train.eval_strategy = {arguments.eval_strategy.value!r}, but no document is held out "
                         f"({len(documents)} documents, data.eval_fraction = {recipe.data.eval_fraction})")
    _check_eval_batches(eval_data, arguments)
    model = build_model(recipe, tokenizer)
    tokens_per_step = (arguments.per_device_train_batch_size * arguments.gradient_accumulation_steps
                       * arguments.world_size * recipe.data.seq_len)
    trainer = _recipe_trainer_class()(
        model=model, args=arguments, train_dataset=train_data, eval_dataset=eval_data,
        throughput=ThroughputCallback(tokens_per_step),
    )
    return _train_and_save(trainer, arguments, tokenizer, eval_data is not None, folder)


FINAL_STAGING = f"{STAGING_PREFIX}final"  # one name for every process, which all take part in saving under FSDP


def _train_and_save(trainer, arguments, processing, evaluate: bool, folder: OutputFolder | None) -> dict:
    """Train, evaluate, save the model, the trainer state, ``processing`` (tokenizer or processor) and the loss
    curve; the summary ``train`` returns. The final files are written beside each other in a staging folder and
    renamed into ``output_dir`` together (ssm_hub.output_folder), so an interrupted save leaves no model that loads
    half-written."""
    status(_training_plan(trainer, evaluate))
    with _interrupts_noted():
        result = trainer.train(resume_from_checkpoint=arguments.resume_from_checkpoint)
    eval_loss = final_eval_loss(trainer) if evaluate else None
    if trainer.is_fsdp_enabled:
        # Checkpoints may be sharded; the final model is written whole, loadable with from_pretrained.
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    status(f"saving: the final model in {arguments.output_dir}")
    staging = Path(arguments.output_dir) / FINAL_STAGING
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        # trainer_state.json: the whole log history (losses, tokens/s, memory) beside the model
        trainer.state.save_to_json(str(staging / "trainer_state.json"))
        processing.save_pretrained(staging)
        write_loss_curve(trainer.state.log_history, staging / LOSS_CURVE_FILE)  # now with the final evaluation
        if folder is not None:
            folder.commit(staging)
    trainer.accelerator.wait_for_everyone()
    loss_curve = Path(arguments.output_dir) / LOSS_CURVE_FILE
    return {
        "train_loss": result.training_loss, "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
        "steps": result.global_step, "output_dir": arguments.output_dir,
        "loss_curve": str(loss_curve) if loss_curve.is_file() else None,
    }


def _training_plan(trainer, evaluate: bool) -> str:
    """The status line that opens training: how long it runs, on how much data, and where it writes."""
    arguments = trainer.args
    length = (f"{arguments.max_steps:,} steps" if arguments.max_steps > 0
              else f"{arguments.num_train_epochs:g} epochs")
    held_out = f", {len(trainer.eval_dataset):,} held-out rows" if evaluate else ""
    resumed = arguments.resume_from_checkpoint
    resuming = ", resuming from its last checkpoint" if resumed is True else f", resuming from {resumed}"
    return (f"training: {length} on {len(trainer.train_dataset):,} rows{held_out}; output in {arguments.output_dir}"
            + (resuming if resumed else ""))


def final_eval_loss(trainer) -> float:
    """The held-out loss of the model that training ended with. Trainer's own evaluation at the last step gave it
    when there was one (a step-based eval_strategy always ends with one, whether or not eval_steps divides the steps):
    evaluating the same weights on the same rows again would double the evaluation's cost for the same number. A
    model that load_best_model_at_end swapped in is evaluated anew."""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if (evaluations and evaluations[-1].get("step") == trainer.state.global_step
            and not trainer.args.load_best_model_at_end):
        return evaluations[-1]["eval_loss"]
    status(f"evaluation: the final model on {len(trainer.eval_dataset):,} held-out rows")
    return trainer.evaluate()["eval_loss"]


def _train_image_text(recipe: Recipe, arguments, folder: OutputFolder | None) -> dict:
    """``data.builtin: shapes``: captioned scenes (ssm_hub.training.shapes) for an ssm_hub_multimodal model; the
    processor comes from the model config's patch_size / merge_size, the loss is on the captions, and the summary
    adds the exact-match caption accuracy on the held-out scenes (captions never trained on). Each row is one scene
    and its caption, padded to the batch's longest: data.seq_len does not apply."""
    from ssm_hub.models.multimodal.configuration_multimodal import SsmHubMultimodalConfig
    from ssm_hub.models.multimodal.image_processing_multimodal import SsmHubMultimodalImageProcessor
    from ssm_hub.models.multimodal.processing_multimodal import SsmHubMultimodalProcessor
    from ssm_hub.training.shapes import SCENE_SIZE, ImageTextCollator, caption_accuracy, train_and_held_out_scenes

    if recipe.model.type != "ssm_hub_multimodal" or recipe.model.pretrained is not None:
        raise ValueError(f"data.builtin: shapes trains a new ssm_hub_multimodal model; model.type is "
                         f"{recipe.model.type!r}" + (", model.pretrained is set" if recipe.model.pretrained else ""))
    scenes, held_out = train_and_held_out_scenes(recipe.data.max_documents, recipe.data.eval_fraction)
    status(f"data: {len(scenes):,} captioned scenes"
           + (f", {len(held_out):,} held out" if held_out is not None else ""))
    if held_out is None and arguments.eval_strategy != "no":
        raise ValueError(f"train.eval_strategy = {arguments.eval_strategy.value!r}, but data.eval_fraction is 0")
    _check_eval_batches(held_out, arguments)
    tokenizer = build_tokenizer(recipe, scenes.captions())
    image_processor = SsmHubMultimodalImageProcessor(
        patch_size=recipe.model.config.get("patch_size", SsmHubMultimodalConfig.patch_size),
        merge_size=recipe.model.config.get("merge_size", SsmHubMultimodalConfig.merge_size), max_image_size=SCENE_SIZE)
    processor = SsmHubMultimodalProcessor(image_processor, tokenizer)
    model = build_model(recipe, processor.tokenizer, dict(image_token_id=processor.image_token_id,
                                                         image_row_end_token_id=processor.image_row_end_token_id))
    collator = ImageTextCollator(processor)
    arguments.remove_unused_columns = False  # the rows are images and captions, which the collator turns into inputs
    tokens_per_step = (arguments.per_device_train_batch_size * arguments.gradient_accumulation_steps
                       * arguments.world_size * collator([scenes[0]])["input_ids"].shape[1])
    trainer = _recipe_trainer_class()(
        model=model, args=arguments, train_dataset=scenes, eval_dataset=held_out, data_collator=collator,
        throughput=ThroughputCallback(tokens_per_step),
    )
    summary = _train_and_save(trainer, arguments, processor, held_out is not None, folder)
    if held_out is not None and trainer.is_world_process_zero():
        summary["caption_accuracy"] = caption_accuracy(trainer.model.eval(), processor, held_out)
    return summary
