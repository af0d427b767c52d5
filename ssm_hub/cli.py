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
``run`` to the function that carries it out; ``SUBCOMMANDS`` lists them. Library imports happen inside ``run`` so
that ``ssm-hub --help`` stays fast.
"""

import argparse
import os
import sys


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
                    "or without --attention-layers a hybrid given a patch embedding). Reads safetensors only.",
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
    images.add_argument("--patch-size", type=int, default=None, help="pixels per patch side (default: 16)")
    images.add_argument("--merge-size", type=int, default=None,
                        help="patches per token side: merge-size x merge-size patches become one token (default: 1)")
    images.add_argument("--max-image-size", type=int, default=None,
                        help="the processor resizes images to this longest side (default: 512)")
    images.add_argument("--mixture-of-mamba", action="store_true",
                        help="image tokens get their own Mamba-2 in_proj and out_proj (copies of the text ones)")
    images.add_argument("--modality-mlps", action="store_true", help="and their own MLPs")
    images.add_argument("--modality-norms", action="store_true", help="and their own norms")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="cast floating-point weights to this dtype (default: keep the stored dtypes)")
    parser.set_defaults(run=run_convert)


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
    if args.to == "ssm_hub_multimodal" and seeding:
        from ssm_hub.conversion.seed_from_fuyu import seed_multimodal

        output = seed_multimodal(args.source, args.output, args.attention_layers, dtype=args.dtype,
                                 mixer_init=args.mixer_init or "attention")
    elif args.to == "ssm_hub_multimodal":
        from ssm_hub.conversion.extend_with_images import extend_with_images

        sizes = {name: value for name, value in (("patch_size", args.patch_size), ("merge_size", args.merge_size),
                                                  ("max_image_size", args.max_image_size)) if value is not None}
        output = extend_with_images(args.source, args.output, **sizes, mixture_of_mamba=args.mixture_of_mamba,
                                    modality_mlps=args.modality_mlps, modality_norms=args.modality_norms,
                                    dtype=args.dtype)
    elif args.to == "ssm_hub_hybrid":
        from ssm_hub.conversion.seed_from_attention import seed_hybrid

        output = seed_hybrid(args.source, args.output, args.attention_layers, dtype=args.dtype,
                             mixer_init=args.mixer_init or "attention")
    else:
        from ssm_hub.conversion.checkpoint import convert_checkpoint

        output = convert_checkpoint(args.source, args.output, to=args.to, dtype=args.dtype)
    print(f"wrote {output} ({args.to} format):")
    for path in sorted(output.iterdir()):
        print(f"  {path.name}")


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
    parser.add_argument("--teacher-seconds", type=float, default=60.0,
                        help="training time of the demo's own teacher (default: %(default)s)")
    parser.add_argument("--align-steps", type=int, default=100, help="(default: %(default)s)")
    parser.add_argument("--kl-steps", type=int, default=200, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from ssm_hub.demo import run_demo as demo

    if args.teacher is None and args.teacher_seconds <= 0:
        raise ValueError(f"--teacher-seconds must be positive, got {args.teacher_seconds}")
    demo(output_dir=args.output, teacher=args.teacher, data=args.data, teacher_seconds=args.teacher_seconds,
         align_steps=args.align_steps, kl_steps=args.kl_steps, seed=args.seed)


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
    parser.set_defaults(run=run_train)


LAUNCH_FLAGS = ("--accelerate-config", "--num-processes")


def add_launch_flags(parser) -> None:
    parser.add_argument(LAUNCH_FLAGS[0], default=None, metavar="NAME_OR_FILE",
                        help="launch through accelerate with this config: ddp, fsdp2, zero3 (shipped) or a file")
    parser.add_argument(LAUNCH_FLAGS[1], type=int, default=None,
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
    from ssm_hub.training import load_recipe, train
    from ssm_hub.training.config import recipe_path

    recipe = recipe_path(args.config)
    load_recipe(recipe, args.overrides)  # a bad key fails here, before any process is launched
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", metavar="FILE", help="text (.txt, documents split at blank lines) or "
                        ".json/.jsonl files")
    source.add_argument("--dataset", help="a datasets name (Hub or local), its 'text' column")
    source.add_argument("--builtin", choices=BUILTIN_DATA,
                        help="text that ships with Python, the associative-recall task (ssm_hub.training.mqar), or "
                             "captioned shapes (ssm_hub.training.shapes: image-text, for an ssm_hub_multimodal "
                             "student)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed row (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=0.05, help="documents held out (default: %(default)s)")
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--orient-steps", type=int, default=0,
                        help="matrix-orientation steps, before alignment (default: %(default)s, skipped)")
    parser.add_argument("--align-steps", type=int, default=100, help="hidden-state alignment steps (default: %(default)s)")
    parser.add_argument("--kl-steps", type=int, default=200, help="end-to-end KL steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per device and step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="(default: %(default)s)")
    parser.add_argument("--ce-weight", type=float, default=0.0, help="cross-entropy weight in the KL stage")
    parser.add_argument("--freeze-mlp", action="store_true", help="keep the MLPs frozen in the KL stage")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (on a GPU)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the seed of the data order and of anything drawn at random (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each stage from its last checkpoint in --output (an interrupted run)")
    parser.add_argument("--speed-contexts", type=int, nargs="*", default=None, metavar="TOKENS",
                        help="context lengths at which to time prefill and decode and measure the cache, teacher "
                             "against student (default: 2048 8192 32768 on a GPU, 512 2048 on the CPU; none: skip)")
    add_launch_flags(parser)
    parser.set_defaults(run=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    from ssm_hub.conversion.distill import distill, report_lines
    from ssm_hub.training.config import DataSection
    from ssm_hub.training.launch import end_process_group

    data = DataSection(files=args.data or [], dataset=args.dataset, builtin=args.builtin, seq_len=args.seq_len,
                       eval_fraction=args.eval_fraction, max_documents=args.max_documents)
    data.check()
    status = relaunched(args, without_launch_flags(args.cli_arguments))
    if status is not None:
        return status
    report = distill(args.teacher, args.student, data, args.output, orient_steps=args.orient_steps,
                     align_steps=args.align_steps,
                     kl_steps=args.kl_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                     ce_weight=args.ce_weight, freeze_mlp=args.freeze_mlp, bf16=args.bf16,
                     seed=args.seed,
                     speed_contexts=default_speed_contexts() if args.speed_contexts is None else args.speed_contexts,
                     resume=args.resume)
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
        description="Render README.md (the architecture, how it was seeded and distilled, the evaluation table and "
                    "the loss curves, from the folder's config.json, seeding.json and distillation.json), then "
                    "upload the model, its code, tokenizer, card and reports (not the Trainer checkpoints). "
                    "huggingface_hub's HF_ENDPOINT and HF_TOKEN apply.",
    )
    parser.add_argument("folder", help="the model folder (e.g. the output of ssm-hub distill)")
    parser.add_argument("repo_id", help="the Hub repo to create or update, e.g. me/my-hybrid")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--base-model", help="the Hub id for the card's base_model (default: seeding.json's "
                                             "teacher, when that is a Hub id)")
    parser.set_defaults(run=run_push)


def run_push(args: argparse.Namespace) -> int:
    from ssm_hub.conversion.push import push

    print(f"pushed: {push(args.folder, args.repo_id, private=args.private, base_model=args.base_model)}")
    return 0


SUBCOMMANDS = (add_demo_command, add_train_command, add_convert_command, add_distill_command, add_push_command)
"""Registration functions, one per subcommand, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssm-hub", description="ssm_hub: state-space models for transformers.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status.

    Bad input (ValueError) and an unreachable or missing file or Hub repo (OSError, which huggingface_hub's errors
    are) print their message instead of a traceback.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.cli_arguments = argv  # what a launch through accelerate runs again in each process
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        status = args.run(args)
    except (ValueError, OSError) as error:
        print(f"ssm-hub: error: {error}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
