"""The ``ssm-hub`` command line: thin subcommands that parse arguments, call a library function and print.

    ssm-hub demo                                 # a small transformer -> hybrid, distilled, on CPU, no network
    ssm-hub convert state-spaces/mamba-130m-hf ./mamba-130m-ssm-hub
    ssm-hub convert ./mamba-130m-ssm-hub ./mamba-130m-transformers --to mamba --dtype bfloat16
    ssm-hub convert Qwen/Qwen2.5-0.5B ./qwen-hybrid --to ssm_hub_hybrid --attention-layers every:4:3
    ssm-hub train --config debug_mamba2 train.max_steps=20   # a recipe shipped with ssm_hub, or a YAML file
    ssm-hub distill --teacher T --student S --data text.txt --output distilled   # after convert --to ssm_hub_hybrid
    ssm-hub push distilled me/my-hybrid          # with a model card, to the Hub (HF_ENDPOINT, HF_TOKEN)
    python -m ssm_hub.cli convert ...            # the same without the console script

Each subcommand is one ``add_<name>_command(subparsers)`` function that declares its arguments and sets
``run`` to the function that carries it out (and ``interrupted`` to what Ctrl-C prints); ``SUBCOMMANDS`` lists them.
Building the parser and parsing take the standard library only (and PyYAML, which the recipe reader imports), and
the library is imported inside ``run``: a command says what it is about to do on its first status line before torch
and transformers load, which takes seconds.

Every command writes its output folder through ssm_hub.output_folder: a folder that holds anything is refused
unless ``--overwrite`` (or ``--resume``) is given, and then only what an earlier run of the command wrote is
replaced. Every error is one line with exit status 2, Ctrl-C exits with 130 and says how to pick up again, and
``--debug`` adds the traceback (ssm_hub.error_reporting). Long work says what it is doing as it goes, in status
lines and bars on stderr (ssm_hub.progress).
"""

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from ssm_hub.error_reporting import ArgumentParser, add_reporting_flags, report_error, report_interrupt
from ssm_hub import progress


def _number(kind, low, low_included: bool = True, high=None):
    """An argparse type: a ``kind`` (int or float) of at least ``low`` (above it unless ``low_included``) and below
    ``high``; a wrong value is refused before any work, on one line."""
    bound = f"{'at least' if low_included else 'above'} {low}" + (f" and below {high}" if high is not None else "")
    noun = "a whole number" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun}, {bound}, got {text!r}") from None
        if (value < low if low_included else value <= low) or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"must be {noun}, {bound}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


steps = _number(int, 0)
positive_int = _number(int, 1)
positive_float = _number(float, 0, low_included=False)
non_negative_float = _number(float, 0)


def add_overwrite_flag(parser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"write into a folder that is not empty: replaces what an earlier ssm-hub {what} wrote "
                             "there (recorded in its .ssm-hub-manifest.json) and never removes anything else")


def add_convert_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a Mamba / Mamba-2 / Jamba / Bamba checkpoint to ssm_hub or transformers, or seed an "
             "ssm_hub_hybrid from a Llama-family or GPT-2 transformer",
        description="Convert a Mamba / Mamba-2 / hybrid checkpoint between transformers' native format (Mamba, "
                    "Mamba2, Jamba, Bamba), mamba_ssm's MambaLMHeadModel and ssm_hub's format; or, with --to "
                    "ssm_hub_hybrid --attention-layers SPEC, seed an ssm_hub_hybrid from a Llama, Mistral, Qwen2, "
                    "Qwen3, Phi-3, Persimmon or GPT-2 model, its replaced attention layers becoming Mamba-2 layers "
                    "built from their weights (--to ssm_hub_multimodal: an ssm_hub_multimodal from Fuyu likewise, "
                    "or without --attention-layers a hybrid given a patch embedding). Reads safetensors only. The "
                    "source's tokenizer, chat templates and generation settings are copied (a source without a "
                    "tokenizer is said so: distill then needs --tokenizer), and a summary of what was written is "
                    "printed.",
    )
    parser.add_argument("source", help="a checkpoint folder or a Hub model id (e.g. state-spaces/mamba-130m-hf)")
    parser.add_argument("output", help="the folder to write the converted checkpoint to")
    parser.add_argument("--to", choices=("ssm_hub", "mamba", "mamba2", "jamba", "bamba", "ssm_hub_hybrid",
                                         "ssm_hub_multimodal"),
                        default="ssm_hub",
                        help="ssm_hub (default), transformers' native MambaForCausalLM (mamba) / Mamba2ForCausalLM "
                             "(mamba2) / JambaForCausalLM (jamba) / BambaForCausalLM (bamba), ssm_hub_hybrid "
                             "seeded from a transformer (with --attention-layers), or ssm_hub_multimodal: seeded "
                             "from Fuyu (with --attention-layers) or an ssm_hub_hybrid given a fresh patch "
                             "embedding and a processor (without)")
    parser.add_argument("--attention-layers", metavar="SPEC",
                        help="with --to ssm_hub_hybrid (or ssm_hub_multimodal from Fuyu): the attention layers to "
                             "keep: all, none, every:K[:OFFSET], "
                             "a list such as 3,7,11, or auto:N (the N whose replacement alone costs most on a "
                             "probe text; scores written to the output folder)")
    parser.add_argument("--mixer-init", choices=("attention", "fresh"), default=None,
                        help="with --to ssm_hub_hybrid: seed the new Mamba-2 mixers from the attention weights they "
                             "replace (attention, the default) or start them as a new model's (fresh), keeping "
                             "the teacher's other weights")
    images = parser.add_argument_group("with --to ssm_hub_multimodal, extending a hybrid")
    images.add_argument("--patch-size", type=positive_int, default=None, help="pixels per patch side (default: 16)")
    images.add_argument("--merge-size", type=positive_int, default=None,
                        help="patches per token side: merge-size x merge-size patches become one token (default: 1)")
    images.add_argument("--max-image-size", type=positive_int, default=None,
                        help="the processor resizes images to this longest side (default: 512)")
    images.add_argument("--mixture-of-mamba", action="store_true",
                        help="image tokens get their own Mamba-2 in_proj and out_proj (copies of the text ones)")
    images.add_argument("--modality-mlps", action="store_true", help="and their own MLPs")
    images.add_argument("--modality-norms", action="store_true", help="and their own norms")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast floating-point weights to this dtype (default: keep the stored dtypes)")
    add_overwrite_flag(parser, "convert")
    parser.set_defaults(run=run_convert, interrupted=lambda args: f"{args.output} was left as it was")


def run_convert(args: argparse.Namespace) -> None:
    seeding = args.attention_layers is not None
    if args.to == "ssm_hub_hybrid" and not seeding:
        raise ValueError("--to ssm_hub_hybrid and --attention-layers go together: seeding a hybrid from a "
                         "transformer needs both")
    if seeding and args.to not in ("ssm_hub_hybrid", "ssm_hub_multimodal"):
        raise ValueError("--attention-layers seeds an ssm_hub_hybrid (--to ssm_hub_hybrid) or, from Fuyu, an "
                         "ssm_hub_multimodal (--to ssm_hub_multimodal)")
    if args.mixer_init is not None and not seeding:
        raise ValueError("--mixer-init applies to seeding from a transformer (with --attention-layers) only")
    image_flags = {"--patch-size": args.patch_size, "--merge-size": args.merge_size,
                   "--max-image-size": args.max_image_size, "--mixture-of-mamba": args.mixture_of_mamba or None,
                   "--modality-mlps": args.modality_mlps or None, "--modality-norms": args.modality_norms or None}
    given = [flag for flag, value in image_flags.items() if value is not None]
    if given and (args.to != "ssm_hub_multimodal" or seeding):
        raise ValueError(f"{', '.join(given)} apply to extending a hybrid with images (--to ssm_hub_multimodal "
                         "without --attention-layers) only")
    if Path(args.source).resolve() == Path(args.output).resolve():
        raise ValueError(f"the output must be another folder than the source, got {args.output} for both")
    from ssm_hub.output_folder import claim_output_folder

    # Written into a staging folder and moved into place only once complete (ssm_hub.output_folder).
    with claim_output_folder(args.output, "convert", overwrite=args.overwrite, staged=True) as folder:
        convert_into(args, folder.staging)
    from ssm_hub.conversion.formats.checkpoint import describe_checkpoint

    print(f"wrote {args.output} ({args.to} format):")
    for line in describe_checkpoint(args.output):
        print(f"  {line}")


def convert_into(args: argparse.Namespace, output: Path) -> None:
    if args.to == "ssm_hub_multimodal" and args.attention_layers is not None:
        from ssm_hub.conversion.seeding.from_fuyu import seed_multimodal

        seed_multimodal(args.source, output, args.attention_layers, dtype=args.dtype,
                        mixer_init=args.mixer_init or "attention")
    elif args.to == "ssm_hub_multimodal":
        from ssm_hub.conversion.seeding.extend_with_images import extend_with_images

        sizes = {name: value for name, value in (("patch_size", args.patch_size), ("merge_size", args.merge_size),
                                                  ("max_image_size", args.max_image_size)) if value is not None}
        extend_with_images(args.source, output, **sizes, mixture_of_mamba=args.mixture_of_mamba,
                           modality_mlps=args.modality_mlps, modality_norms=args.modality_norms, dtype=args.dtype)
    elif args.to == "ssm_hub_hybrid":
        from ssm_hub.conversion.seeding.from_attention import seed_hybrid

        seed_hybrid(args.source, output, args.attention_layers, dtype=args.dtype,
                    mixer_init=args.mixer_init or "attention")
    else:
        from ssm_hub.conversion.formats.checkpoint import convert_checkpoint

        convert_checkpoint(args.source, output, to=args.to, dtype=args.dtype)


def add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="turn a small transformer into a hybrid and distil it, on CPU in a few minutes (no network)",
        description="Train a small Llama teacher on pydoc_data.topics (English text shipped with Python), seed an "
                    "ssm_hub_hybrid from it (one attention layer in four kept), distil it, evaluate teacher and "
                    "student on held-out documents, save, reload with AutoModelForCausalLM and generate. "
                    "--teacher and --data point it at a real model and text.",
    )
    parser.add_argument("--output", default="ssm-hub-demo", help="folder for everything written (default: %(default)s)")
    parser.add_argument("--teacher", help="a Llama-family model (folder or Hub id) instead of training one")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="text files instead of pydoc_data.topics")
    parser.add_argument("--teacher-steps", type=positive_int, default=500,
                        help="optimizer steps of the demo's own teacher (default: %(default)s)")
    parser.add_argument("--align-steps", type=steps, default=100, help="(default: %(default)s)")
    parser.add_argument("--kl-steps", type=steps, default=200, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    add_overwrite_flag(parser, "demo")
    parser.set_defaults(run=run_demo, interrupted=lambda args: "start again with: " + _command(
        args.cli_arguments, drop=("--overwrite",), add=["--overwrite"]))


def run_demo(args: argparse.Namespace) -> None:
    from ssm_hub.demo import run_demo as demo

    demo(output_dir=args.output, teacher=args.teacher, data=args.data, teacher_steps=args.teacher_steps,
         align_steps=args.align_steps, kl_steps=args.kl_steps, seed=args.seed, overwrite=args.overwrite)


def add_train_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune any ssm_hub model from a YAML recipe through transformers' Trainer",
        description="Run a recipe (model, tokenizer, data, train = TrainingArguments, optional lora) through "
                    "transformers' Trainer: packed data with per-document positions, checkpoints, resume, "
                    "evaluation, tokens/s in the logs and loss_curve.png next to the checkpoints.",
    )
    parser.add_argument("--config", required=True,
                        help="a recipe YAML file, or the name of one shipped with ssm_hub (e.g. debug_mamba2)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted recipe keys with YAML values, e.g. train.max_steps=20 model.config.hidden_size=64")
    add_launch_flags(parser)
    parser.set_defaults(run=run_train, interrupted=train_interrupted)


LAUNCH_FLAGS = ("--accelerate-config", "--num-processes")


def add_launch_flags(parser) -> None:
    parser.add_argument(LAUNCH_FLAGS[0], default=None, metavar="NAME_OR_FILE",
                        help="launch through accelerate with this config: ddp, fsdp2, zero3 (shipped) or a file")
    parser.add_argument(LAUNCH_FLAGS[1], type=positive_int, default=None,
                        help="with --accelerate-config: processes (GPUs) to launch (default: the config's)")


def relaunched(args: argparse.Namespace, cli_arguments: list[str]) -> int | None:
    """With --accelerate-config, run ``ssm-hub CLI_ARGUMENTS`` in the processes accelerate launches and return their
    exit status; None when the command is to run here."""
    if args.accelerate_config is not None:
        from ssm_hub.training.launch import launch

        return launch(args.accelerate_config, cli_arguments, args.num_processes)
    if args.num_processes is not None:
        raise ValueError("--num-processes needs --accelerate-config")
    return None


def without_launch_flags(arguments: list[str]) -> list[str]:
    """The command-line arguments less --accelerate-config and --num-processes (with their values): what each
    launched process runs."""
    kept, skip_value = [], False
    for argument in arguments:
        if skip_value:
            skip_value = False
        elif argument in LAUNCH_FLAGS:
            skip_value = True
        elif not argument.startswith(tuple(f"{flag}=" for flag in LAUNCH_FLAGS)):
            kept.append(argument)
    return kept


def run_train(args: argparse.Namespace) -> int:
    from ssm_hub.training.config import load_recipe, recipe_path

    recipe = recipe_path(args.config)
    # A bad key, a data file or an output_dir in use fails here, before any work or any process is launched.
    loaded = load_recipe(recipe, args.overrides)
    args.output_dir = loaded.train["output_dir"]
    from ssm_hub.training.run import check_before_work, train

    check_before_work(loaded)
    status = relaunched(args, ["train", "--config", str(recipe), *args.overrides])
    if status is not None:
        return status
    from ssm_hub.training.launch import end_process_group

    summary = train(load_recipe(recipe, args.overrides))
    end_process_group()
    if os.environ.get("RANK", "0") == "0":  # under a distributed launcher, every process has the same summary
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0


def train_interrupted(args: argparse.Namespace) -> str:
    """Where the interrupted run's last complete checkpoint is, and the command that resumes from it."""
    output_dir = getattr(args, "output_dir", None)
    if output_dir is None:
        return "nothing was written"
    again = ("train.resume_from_checkpoint=", "train.overwrite_output_dir=")
    complete = [path for path in Path(output_dir).glob("checkpoint-*")
                if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()]
    if not complete:
        return (f"no checkpoint was saved in {output_dir} yet; start again with: "
                + _command(args.cli_arguments, drop=again, add=["train.overwrite_output_dir=true"]))
    last = max(complete, key=lambda path: int(path.name.split("-")[-1]))
    return (f"the last checkpoint is {last}; resume with: "
            + _command(args.cli_arguments, drop=again, add=[f"train.resume_from_checkpoint={last}"]))


def _command(arguments: list[str], drop: tuple[str, ...] = (), add: list[str] = ()) -> str:
    """The ``ssm-hub`` command line of ``arguments`` less those starting with ``drop``, plus ``add``, quoted for a
    shell."""
    kept = [argument for argument in arguments if not argument.startswith(drop)]
    return shlex.join(["ssm-hub", *kept, *add])


def add_distill_command(subparsers) -> None:
    from ssm_hub.training.config import BUILTIN_DATA

    parser = subparsers.add_parser(
        "distill",
        allow_abbrev=False,  # the launch flags are taken out of the arguments by their full names
        help="distil a student seeded with `ssm-hub convert --to ssm_hub_hybrid` from its teacher",
        description="Staged distillation through transformers' Trainer: optionally the replaced layers' matrix "
                    "orientation against the teacher's attention matrices (--orient-steps), the replaced layers' "
                    "hidden-state alignment against the frozen teacher (--align-steps), then end-to-end token KL (--kl-steps, plus "
                    "--ce-weight times the cross-entropy). Writes the distilled student, distillation.json (held-out "
                    "perplexity of both, mean token KL and greedy agreement after seeding and after each stage) and "
                    "each stage's checkpoints and loss curve.",
    )
    parser.add_argument("--teacher", required=True, help="the teacher (a folder or Hub id)")
    parser.add_argument("--student", required=True, help="the seeded student (a folder or Hub id)")
    parser.add_argument("--output", required=True, help="the folder for the distilled student and the report")
    parser.add_argument("--tokenizer", default=None, metavar="FOLDER_OR_HUB_ID",
                        help="the tokenizer to use (the teacher's, a folder or Hub id) when the student folder has "
                             "none: ssm-hub convert says so when the teacher had none to copy (default: the "
                             "student's)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", metavar="FILE", help="text (.txt, documents split at blank lines) or "
                        ".json/.jsonl files")
    source.add_argument("--dataset", help="a datasets name (Hub or local), its 'text' column")
    source.add_argument("--builtin", choices=BUILTIN_DATA,
                        help="text that ships with Python, the associative-recall task (ssm_hub.training.mqar), or "
                             "captioned shapes (ssm_hub.training.shapes: image-text, for an ssm_hub_multimodal "
                             "student)")
    parser.add_argument("--seq-len", type=_number(int, 2), default=256,
                        help="tokens per packed row (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=_number(float, 0, low_included=False, high=1), default=0.05,
                        help="documents held out (default: %(default)s)")
    parser.add_argument("--max-documents", type=positive_int, default=None)
    parser.add_argument("--orient-steps", type=steps, default=0,
                        help="matrix-orientation steps, before alignment (default: %(default)s, skipped)")
    parser.add_argument("--align-steps", type=steps, default=100,
                        help="hidden-state alignment steps (default: %(default)s)")
    parser.add_argument("--kl-steps", type=steps, default=200, help="end-to-end KL steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="rows per device and step (default: %(default)s)")
    parser.add_argument("--eval-batch-size", type=positive_int, default=64,
                        help="held-out rows per forward call of the evaluations; lower it if a batch's logits (rows "
                             "x seq-len x vocabulary, for each model) do not fit (default: %(default)s)")
    parser.add_argument("--learning-rate", type=positive_float, default=1e-3, help="(default: %(default)s)")
    parser.add_argument("--ce-weight", type=non_negative_float, default=0.0,
                        help="cross-entropy weight in the KL stage")
    parser.add_argument("--freeze-mlp", action="store_true", help="keep the MLPs frozen in the KL stage")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (on a GPU)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the seed of the data order and of anything drawn at random (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each stage from its last checkpoint in --output (an interrupted run)")
    parser.add_argument("--speed-contexts", type=positive_int, nargs="*", default=None, metavar="TOKENS",
                        help="context lengths at which to time prefill and decode and measure the cache, teacher "
                             "against student (default: 2048 8192 32768 on a GPU, 512 2048 on the CPU; the flag alone: skip)")
    add_overwrite_flag(parser, "distill")
    add_launch_flags(parser)
    parser.set_defaults(run=run_distill, interrupted=lambda args: "resume with: " + _command(
        args.cli_arguments, drop=("--overwrite", "--resume"), add=["--resume"]))


def run_distill(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from ssm_hub.conversion.distillation.distill import distill, report_lines
    from ssm_hub.output_folder import check_output_folder, claim_output_folder
    from ssm_hub.training.config import DataSection
    from ssm_hub.training.launch import end_process_group

    if args.overwrite and args.resume:
        raise ValueError("--overwrite and --resume contradict each other: overwriting removes the checkpoints a "
                         "resume needs; give one of them")
    data = DataSection(files=args.data or [], dataset=args.dataset, builtin=args.builtin, seq_len=args.seq_len,
                       eval_fraction=args.eval_fraction, max_documents=args.max_documents)
    data.check()
    data.check_files()
    output = dict(overwrite=args.overwrite, resume=args.resume, resume_flag="--resume")
    # Under a distributed launcher, the first process checks the output folder and keeps its record.
    main_process = os.environ.get("RANK", "0") == "0"
    if main_process:
        check_output_folder(args.output, "distill", **output)
    status = relaunched(args, without_launch_flags(args.cli_arguments))
    if status is not None:
        return status
    speed_contexts = default_speed_contexts() if args.speed_contexts is None else args.speed_contexts
    with claim_output_folder(args.output, "distill", **output) if main_process else nullcontext():
        report = distill(args.teacher, args.student, data, args.output, orient_steps=args.orient_steps,
                         align_steps=args.align_steps, kl_steps=args.kl_steps, batch_size=args.batch_size,
                         eval_batch_size=args.eval_batch_size,
                         learning_rate=args.learning_rate, ce_weight=args.ce_weight, freeze_mlp=args.freeze_mlp,
                         bf16=args.bf16, seed=args.seed, speed_contexts=speed_contexts, resume=args.resume,
                         tokenizer=args.tokenizer)
    end_process_group()
    if os.environ.get("RANK", "0") == "0":
        print("\n".join(report_lines(report)))
        print(f"wrote {args.output}")
    return 0


def default_speed_contexts() -> list[int]:
    import torch

    return [2048, 8192, 32768] if torch.cuda.is_available() else [512, 2048]


def add_push_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload an ssm_hub model folder to the Hugging Face Hub with a model card",
        description="Render a model card (the architecture, how it was seeded and distilled, the evaluation table "
                    "and the loss curves, from the folder's config.json, seeding.json and distillation.json) and "
                    "upload it with the model, its config and code, the tokenizer or processor and the reports, in "
                    "one commit; nothing else in the folder is uploaded (--include adds files) and the folder is "
                    "not changed. huggingface_hub's HF_ENDPOINT and HF_TOKEN apply.",
    )
    parser.add_argument("folder", help="the model folder (e.g. the output of ssm-hub distill)")
    parser.add_argument("repo_id", help="the Hub repo to create or update, e.g. me/my-hybrid")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--base-model", help="the Hub id for the card's base_model (default: seeding.json's "
                                             "teacher, when that is a Hub id)")
    parser.add_argument("--card", choices=("keep", "replace"), default="keep",
                        help="when the folder has its own README.md: upload it as the card (keep, the default) or "
                             "upload the generated card instead (replace); the folder's file is never changed")
    parser.add_argument("--include", nargs="+", default=[], metavar="PATTERN",
                        help="more files to upload, as glob patterns relative to the folder (e.g. notes.md 'eval/*')")
    parser.set_defaults(run=run_push, interrupted=lambda args: f"nothing was committed to {args.repo_id} unless "
                                                               "'pushed' was printed; push again")


def run_push(args: argparse.Namespace) -> int:
    from ssm_hub.conversion.publishing.push import push

    url = push(args.folder, args.repo_id, private=args.private, base_model=args.base_model, card=args.card,
               include=args.include, log=print)
    print(f"pushed: {url}")
    return 0


SUBCOMMANDS = (add_demo_command, add_train_command, add_convert_command, add_distill_command, add_push_command)
"""Registration functions, one per subcommand, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="ssm-hub", description="ssm_hub: state-space models for transformers.")
    add_reporting_flags(parser, top_level=True)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    for command in subparsers.choices.values():
        add_reporting_flags(command)
    return parser


_SAID_AT_IMPORT: list[str] = []
"""The command whose first line the console script said from ssm_hub's __init__ (:func:`announce_console_command`),
until :func:`main` takes it up."""


def announce(command: str) -> None:
    """Show status lines (what long work is doing, on stderr) from now on, starting with the command's first line,
    which is said before the library loads: torch and transformers take seconds, and silence looks hung."""
    if _SAID_AT_IMPORT == [command]:
        _SAID_AT_IMPORT.clear()
        return
    progress.show_status()
    progress.status(f"ssm-hub {command}: loading torch and transformers")


def announce_console_command() -> None:
    """In the console script (``ssm-hub COMMAND ...``), the command's first status line, said from ssm_hub's __init__
    before it imports torch and transformers: the console script imports the package before :func:`main` runs.
    Nothing for ``--help`` or ``--version``, or when no known command is named: :func:`main` reports those."""
    if Path(sys.argv[0]).name != "ssm-hub":
        return
    argv = sys.argv[1:]
    commands = {add_command.__name__.removeprefix("add_").removesuffix("_command") for add_command in SUBCOMMANDS}
    command = next((argument for argument in argv if not argument.startswith("-")), None)
    if command in commands and not {"-h", "--help", "--version"} & set(argv):
        announce(command)
        _SAID_AT_IMPORT.append(command)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status: 0, 2 for any error (one line on stderr, the traceback too with
    --debug), 130 for Ctrl-C (with how to pick up again)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, --version, or a usage error already printed on one line
        return exit.code if isinstance(exit.code, int) else 2
    args.cli_arguments = argv  # what a launch through accelerate runs again in each process
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    announce(args.command)
    if not args.debug:
        # huggingface_hub warns at each retry of a request (about 20 lines over 50 s when the Hub cannot be reached);
        # the error that ends them is reported on one line, naming the endpoint.
        logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        return report_interrupt(args.interrupted(args) if hasattr(args, "interrupted") else None)
    except Exception as error:
        return report_error(error, debug=args.debug)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
