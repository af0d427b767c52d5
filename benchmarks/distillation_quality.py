"""The language-modelling half of the distillation quality check, on one CUDA GPU: a character-level Llama teacher
on tinyshakespeare, students seeded from it and distilled on at most 20% of its training tokens, and the same
architectures trained from scratch on that budget.

    python benchmarks/distillation_quality.py --data path/to/tinyshakespeare.txt
    python benchmarks/distillation_quality.py --data FILE --quick --runs /tmp/quality   # tiny sizes: a CPU smoke run

Every step runs through the command line a user types, and a step whose output folder is complete is not run again
(so a run cut short resumes):
1. ``teacher``: ``ssm-hub train --config shakespeare_char_llama`` (it ends on its best held-out checkpoint);
2. ``scratch_mamba2``: ``ssm-hub train --config shakespeare_char_mamba2``, a Mamba-2 of the teacher's size on 20% of
   its tokens;
3. ``ssm-hub convert`` seeds two students from the teacher: ``hybrid_25`` keeps 2 of its 8 attention layers
   (every:4:3) and ``ssm`` none; ``random_ssm`` is the ``ssm`` student's architecture with random weights;
4. ``ssm-hub distill`` (alignment, then end-to-end KL) distils each of the three on the budget: 20% of the teacher's
   training tokens, the same rows per step;
5. ``scratch_ssm``: the ``ssm`` student's architecture, from random weights, trained by ``ssm-hub train`` with the
   plain language-modelling loss on the same budget.

Every final model is then evaluated the same way, on the held-out documents that all runs share (the recipes' and
distillation's ``eval_fraction``), and the report checks the targets: the 25%-attention hybrid within 2% of the
teacher's perplexity; the distilled ``ssm`` student at least 3% better than ``scratch_ssm``; the seeded students
better than the random one at the same budget. It writes ``distillation_quality_<device>.{json,md}`` to
benchmarks/results/ (``--output``).
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
BUDGET_FRACTION = 0.2
HYBRID_SPEC = "every:4:3"  # attention in layers 3 and 7 of 8: 25%
ALIGN_SHARE = 0.2  # of the distillation steps; the rest are end-to-end KL
QUICK = {  # tiny sizes and steps: checks that the pipeline runs, not what it reaches
    "teacher": ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_attention_heads=4",
                "model.config.num_key_value_heads=4", "train.max_steps=10", "train.eval_steps=5",
                "train.save_steps=5"],
    "scratch": ["model.config.hidden_size=32", "model.config.head_dim=16", "model.config.num_hidden_layers=2",
                "model.config.state_size=8", "train.eval_steps=1", "train.save_steps=1"],
    "shared": ["data.seq_len=64", "train.per_device_train_batch_size=4", "train.per_device_eval_batch_size=8",
               "train.bf16=false", "train.use_cpu=true", "data.max_documents=400"],
}


def run(command: list[str], log: Path) -> None:
    print("running", " ".join(command[2:5]), "->", log.name, flush=True)
    with open(log, "w") as output:
        status = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONSAFEPATH": "1"}).returncode
    if status != 0:
        raise SystemExit(f"failed ({status}); the end of {log}:\n" + log.read_text()[-3000:])


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "ssm_hub.cli", *arguments]


def recipe_steps(name: str, overrides: list[str]) -> tuple[int, int, int]:
    """(max_steps, rows per step, seq_len) of a shipped recipe with ``overrides``."""
    from ssm_hub.training import load_recipe
    from ssm_hub.training.config import recipe_path

    recipe = load_recipe(recipe_path(name), overrides)
    return recipe.train["max_steps"], recipe.train["per_device_train_batch_size"], recipe.data.seq_len


def random_student(seeded: Path, output: Path, seed: int = 0) -> None:
    """``seeded``'s architecture and tokenizer with the model class's own random initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ssm_hub.conversion.checkpoint import copy_tokenizer_files

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(seeded)).save_pretrained(output)
    copy_tokenizer_files(seeded, output)


@torch.no_grad()
def held_out_perplexities(models: dict[str, Path], teacher: Path, data, device) -> dict[str, float]:
    """Each model's perplexity on the held-out rows of ``data``, computed alike (and the teacher's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssm_hub.conversion.distill import evaluate_against_teacher
    from ssm_hub.training.data import read_documents, train_and_eval_datasets

    _, held_out = train_and_eval_datasets(read_documents(data), AutoTokenizer.from_pretrained(teacher), data)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher).to(device).eval()
    perplexities = {}
    for name, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        result = evaluate_against_teacher(model, teacher_model, held_out)
        perplexities[name] = result["student_perplexity"]
        perplexities["teacher"] = result["teacher_perplexity"]
        del model
    return perplexities


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="tinyshakespeare.txt")
    parser.add_argument("--runs", type=Path, default=Path("build/distillation_quality"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps, for a smoke run on a CPU")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    shared = [f"data.files=[{data}]", *(QUICK["shared"] if args.quick else [])]
    runs = {name: args.runs / name for name in (
        "teacher", "scratch_mamba2", "seeded_hybrid_25", "seeded_ssm", "random_ssm", "distilled_hybrid_25",
        "distilled_ssm", "distilled_random_ssm", "scratch_ssm")}

    teacher_overrides = [*shared, *(QUICK["teacher"] if args.quick else []), f"train.output_dir={runs['teacher']}"]
    teacher_steps, rows, seq_len = recipe_steps("shakespeare_char_llama", teacher_overrides)
    budget_steps = int(BUDGET_FRACTION * teacher_steps)
    if not (runs["teacher"] / "model.safetensors").is_file():
        run(cli("train", "--config", "shakespeare_char_llama", *teacher_overrides), args.runs / "teacher.log")
    scratch_overrides = [*shared, *(QUICK["scratch"] if args.quick else []), f"train.max_steps={budget_steps}",
                         f"train.output_dir={runs['scratch_mamba2']}"]
    if not (runs["scratch_mamba2"] / "model.safetensors").is_file():
        run(cli("train", "--config", "shakespeare_char_mamba2", *scratch_overrides), args.runs / "scratch_mamba2.log")

    for name, spec in (("seeded_hybrid_25", HYBRID_SPEC), ("seeded_ssm", "none")):
        if not (runs[name] / "model.safetensors").is_file():
            run(cli("convert", str(runs["teacher"]), str(runs[name]), "--to", "ssm_hub_hybrid", "--attention-layers",
                    spec), args.runs / f"{name}.log")
    if not (runs["random_ssm"] / "model.safetensors").is_file():
        random_student(runs["seeded_ssm"], runs["random_ssm"])

    from ssm_hub.training.config import DataSection

    overrides = {key.split("=")[0]: key.split("=", 1)[1] for key in shared}
    eval_fraction = 0.1  # the recipes'
    data_section = DataSection(files=[str(data)], seq_len=seq_len, eval_fraction=eval_fraction,
                               max_documents=int(overrides["data.max_documents"]) if args.quick else None)
    align_steps = max(1, int(ALIGN_SHARE * budget_steps))
    distill_common = ["--data", str(data), "--seq-len", str(seq_len), "--eval-fraction", str(eval_fraction),
                      "--align-steps", str(align_steps), "--kl-steps", str(budget_steps - align_steps),
                      "--batch-size", str(rows), "--speed-contexts"]
    if args.quick:
        distill_common += ["--max-documents", str(data_section.max_documents)]
    elif torch.cuda.is_available():
        distill_common.append("--bf16")
    for student, output in (("seeded_hybrid_25", "distilled_hybrid_25"), ("seeded_ssm", "distilled_ssm"),
                            ("random_ssm", "distilled_random_ssm")):
        if not (runs[output] / "distillation.json").is_file():
            run(cli("distill", "--teacher", str(runs["teacher"]), "--student", str(runs[student]), "--output",
                    str(runs[output]), *distill_common), args.runs / f"{output}.log")
    scratch_ssm_overrides = [
        *shared, f"train.max_steps={budget_steps}", f"train.output_dir={runs['scratch_ssm']}",
        f"model.pretrained={runs['random_ssm']}", "model.type=null", "model.config={}",
        f"tokenizer.pretrained={runs['random_ssm']}", "tokenizer.characters=false",
        *([f"train.eval_steps={budget_steps}", f"train.save_steps={budget_steps}"] if args.quick else []),
    ]
    if not (runs["scratch_ssm"] / "model.safetensors").is_file():
        run(cli("train", "--config", "shakespeare_char_mamba2", *scratch_ssm_overrides), args.runs / "scratch_ssm.log")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evaluated = ("scratch_mamba2", "distilled_hybrid_25", "distilled_ssm", "distilled_random_ssm", "scratch_ssm")
    perplexity = held_out_perplexities({name: runs[name] for name in evaluated}, runs["teacher"], data_section, device)
    tokens = {"teacher": teacher_steps * rows * seq_len, **{name: budget_steps * rows * seq_len for name in evaluated}}
    checks = [
        ("25%-attention hybrid within 2% of the teacher's perplexity",
         perplexity["distilled_hybrid_25"] / perplexity["teacher"] - 1, "<= 0.02",
         perplexity["distilled_hybrid_25"] <= 1.02 * perplexity["teacher"]),
        ("distilled SSM student at least 3% better than the same SSM from scratch",
         1 - perplexity["distilled_ssm"] / perplexity["scratch_ssm"], ">= 0.03",
         perplexity["distilled_ssm"] <= 0.97 * perplexity["scratch_ssm"]),
        ("attention-seeded SSM student better than the randomly initialised one",
         1 - perplexity["distilled_ssm"] / perplexity["distilled_random_ssm"], "> 0",
         perplexity["distilled_ssm"] < perplexity["distilled_random_ssm"]),
    ]
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report = {"device": device_name, "quick": args.quick, "budget_fraction": BUDGET_FRACTION, "tokens": tokens,
              "held_out_perplexity": perplexity, "held_out_loss": {k: math.log(v) for k, v in perplexity.items()},
              "checks": [{"what": what, "measured": value, "target": target, "met": met}
                         for what, value, target, met in checks]}
    lines = [f"Distillation quality, character-level tinyshakespeare, on {device_name}" + (" (--quick)" if args.quick
                                                                                           else ""),
             "", "| model | training tokens | held-out loss | held-out perplexity |", "|---|---|---|---|"]
    for name in ("teacher", *evaluated):
        lines.append(f"| {name} | {tokens[name]:,} | {math.log(perplexity[name]):.4f} | {perplexity[name]:.3f} |")
    lines += ["", "| check | measured | target | met |", "|---|---|---|---|"]
    lines += [f"| {what} | {value:+.4f} | {target} | {'yes' if met else 'no'} |" for what, value, target, met in checks]
    lines += ["", "Command: `python benchmarks/distillation_quality.py --data tinyshakespeare.txt`"]
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"distillation_quality_{device_name.replace(' ', '_')}" + ("_quick" if args.quick else "")
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
