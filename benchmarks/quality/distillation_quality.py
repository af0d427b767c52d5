"""The distillation quality check on one CUDA GPU, on two tasks whose answer is known: character-level language
modelling of tinyshakespeare and multi-query associative recall (ssm_hub.training.mqar). For each, a transformer
teacher, students seeded from it and distilled on at most 20% of its training tokens, and the same architectures
trained from scratch or distilled from random weights on that budget.

    python benchmarks/quality/distillation_quality.py --data path/to/tinyshakespeare.txt
    python benchmarks/quality/distillation_quality.py --data FILE --tasks mqar   # one task (its own results file)
    python benchmarks/quality/distillation_quality.py --data FILE --quick --runs /tmp/quality   # tiny: a CPU smoke run

For each task, every step runs through the command line a user types, the independent ones at once, and a step
whose output is complete is not run again (so a run cut short resumes):
1. ``teacher``: ``ssm-hub train`` with the task's teacher recipe (shakespeare_char_llama, mqar_llama);
2. ``scratch_mamba2``: a Mamba-2 of the teacher's size on 20% of its tokens (shakespeare_char_mamba2, mqar_mamba2);
3. ``ssm-hub convert`` seeds four students from the teacher: ``hybrid_25`` keeps 25% of its attention layers (the
   last of every four) and ``ssm`` none, their new Mamba-2 mixers seeded from the attention weights;
   ``fresh_hybrid_25`` and ``fresh_ssm`` keep the same layers, their new mixers initialised as a new model's
   (``--mixer-init fresh``), everything else the teacher's; ``random_ssm`` is the ``ssm`` student's architecture
   with random weights;
4. ``ssm-hub distill`` distils each of the five on the budget, 20% of the teacher's training tokens with the same
   rows per step: the attention-seeded students and the random one align their new layers first (20% of the
   steps), then train on end-to-end KL; the fresh-mixer students train on KL alone. (Alignment fits each new mixer
   to the attention output it replaces, which is what a seeded mixer starts near; a fresh mixer starts near a skip,
   and aligning it first left it worse on Shakespeare: perplexity 4.86 against 4.67-4.70 on KL alone, H100.)
5. ``scratch_ssm``: the ``ssm`` student's architecture, from random weights, trained by ``ssm-hub train`` with the
   plain language-modelling loss on the same budget.

Every final model is then evaluated alike on the held-out documents that all runs of a task share: perplexity (for
the recall task over the queried values, the tokens its training loss covers), and for the recall task the fraction
of queried values recalled. The checks, on both tasks: each 25%-attention hybrid within 2% of the teacher's perplexity
(and, for recall, at 95% or more of its recall); each distilled pure-SSM student (``ssm``, ``fresh_ssm``) at least
3% better in perplexity than ``scratch_ssm``; the attention-seeded ``ssm`` student better than the random one at the
same budget. Writes benchmarks/results/distillation_quality/<device>[_quick][_<tasks, when not all>].{json,md}
(``--output``: another folder).
"""

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import result_stem, results_dir

BUDGET_FRACTION = 0.2
ALIGN_SHARE = 0.2  # of the distillation steps; the rest are end-to-end KL
SEEDED = (("seeded_hybrid_25", "every:4:3", "attention"), ("seeded_fresh_hybrid_25", "every:4:3", "fresh"),
          ("seeded_ssm", "none", "attention"), ("seeded_fresh_ssm", "none", "fresh"))
# distilled student: (the student it starts from, whether its new layers are aligned before the KL stage)
DISTILLED = {"distilled_hybrid_25": ("seeded_hybrid_25", True),
             "distilled_fresh_hybrid_25": ("seeded_fresh_hybrid_25", False),
             "distilled_ssm": ("seeded_ssm", True), "distilled_fresh_ssm": ("seeded_fresh_ssm", False),
             "distilled_random_ssm": ("random_ssm", True)}
HYBRIDS = ("distilled_hybrid_25", "distilled_fresh_hybrid_25")
EVALUATED = ("scratch_mamba2", *DISTILLED, "scratch_ssm")
# Every run on the first visible GPU: with more in sight, Trainer would spread a run over them with DataParallel,
# each at the recipe's rows per device, and the budgets (steps x rows) would no longer be the tokens each run saw.
ONE_GPU = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}
QUICK_SHARED = ["train.per_device_train_batch_size=4", "train.per_device_eval_batch_size=8", "train.bf16=false",
                "train.use_cpu=true", "data.max_documents=400", "data.seq_len=64"]


@dataclass(frozen=True)
class Task:
    name: str
    teacher_recipe: str
    scratch_recipe: str
    uses_data_file: bool
    quick_teacher: tuple[str, ...]
    quick_scratch: tuple[str, ...]


TASKS = {
    "shakespeare": Task("shakespeare", "shakespeare_char_llama", "shakespeare_char_mamba2", True,
                        ("model.config.hidden_size=32", "model.config.intermediate_size=64",
                         "model.config.num_attention_heads=4", "model.config.num_key_value_heads=4",
                         "train.max_steps=10", "train.eval_steps=5", "train.save_steps=5"),
                        ("model.config.hidden_size=32", "model.config.head_dim=16", "model.config.num_hidden_layers=2",
                         "model.config.state_size=8", "train.eval_steps=1", "train.save_steps=1")),
    "mqar": Task("mqar", "mqar_llama", "mqar_mamba2", False,
                 ("model.config.hidden_size=32", "model.config.intermediate_size=64", "train.max_steps=10",
                  "train.eval_steps=5", "train.save_steps=5"),
                 ("model.config.hidden_size=32", "model.config.head_dim=16", "model.config.num_hidden_layers=2",
                  "model.config.state_size=8", "train.eval_steps=1", "train.save_steps=1")),
}


def run_together(jobs: list[tuple[list[str], Path, Path]]) -> None:
    """Run the (command, log file, file it writes last) jobs whose last file is missing, all at once (they are
    independent, and each leaves most of a GPU idle); exit with the end of the log of the first that fails."""
    started = []
    for command, log, written in jobs:
        if written.is_file():
            continue
        print("running", " ".join(command[2:5]), "->", log.name, flush=True)
        with open(log, "w") as output:  # the child keeps its own copy of the handle
            started.append((subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                             env={**os.environ, **ONE_GPU, "PYTHONSAFEPATH": "1"}), log))
    for process, log in started:
        if process.wait() != 0:
            raise SystemExit(f"failed ({process.returncode}); the end of {log}:\n" + log.read_text()[-3000:])


def cli(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "ssm_hub.cli", *arguments]


def random_student(seeded: Path, output: Path, seed: int = 0) -> None:
    """``seeded``'s architecture and tokenizer with the model class's own random initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ssm_hub.conversion.formats.checkpoint import copy_tokenizer_files

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(seeded)).save_pretrained(output)
    copy_tokenizer_files(seeded, output)


def data_arguments(data) -> list[str]:
    """``ssm-hub distill``'s data flags for a recipe's data section, so that it packs and holds out the same."""
    source = ["--data", *data.files] if data.files else ["--builtin", data.builtin]
    limit = ["--max-documents", str(data.max_documents)] if data.max_documents is not None else []
    return [*source, *limit, "--seq-len", str(data.seq_len), "--eval-fraction", str(data.eval_fraction)]


@torch.no_grad()
def evaluate(models: dict[str, Path], teacher: Path, data, recall: bool, device) -> dict[str, dict]:
    """{model: {"perplexity", and with ``recall`` "recall"}} on the held-out part of ``data``, the teacher's too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssm_hub.conversion.distillation.distill import evaluate_against_teacher
    from ssm_hub.training.data import read_documents, split_held_out, train_and_eval_datasets
    from ssm_hub.training.mqar import recall_accuracy

    documents = read_documents(data)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    _, held_out = train_and_eval_datasets(documents, tokenizer, data)
    held_out_documents = split_held_out(documents, data.eval_fraction)[1]
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher).to(device).eval()
    results = {"teacher": {}}
    for name, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        scores = evaluate_against_teacher(model, teacher_model, held_out)
        results[name] = {"perplexity": scores["student_perplexity"]}
        results["teacher"]["perplexity"] = scores["teacher_perplexity"]
        if recall:
            results[name]["recall"] = recall_accuracy(model, tokenizer, held_out_documents)
        del model
    if recall:
        results["teacher"]["recall"] = recall_accuracy(teacher_model, tokenizer, held_out_documents)
    return results


def run_task(task: Task, data_file: Path | None, runs: Path, quick: bool, device) -> dict:
    from ssm_hub.training import load_recipe
    from ssm_hub.training.config import recipe_path

    runs.mkdir(parents=True, exist_ok=True)
    folders = {name: runs / name for name in ("teacher", *(seeded for seeded, _, _ in SEEDED), "random_ssm",
                                               *EVALUATED)}
    shared = [f"data.files=[{data_file}]"] if task.uses_data_file else []
    shared += QUICK_SHARED if quick else []
    teacher_overrides = [*shared, *(task.quick_teacher if quick else ()), f"train.output_dir={folders['teacher']}"]
    teacher_recipe = load_recipe(recipe_path(task.teacher_recipe), teacher_overrides)
    teacher_steps, rows = teacher_recipe.train["max_steps"], teacher_recipe.train["per_device_train_batch_size"]
    data, budget_steps = teacher_recipe.data, int(BUDGET_FRACTION * teacher_steps)
    run_together([(cli("train", "--config", task.teacher_recipe, *teacher_overrides), runs / "teacher.log",
                   folders["teacher"] / "model.safetensors")])
    scratch_overrides = [*shared, *(task.quick_scratch if quick else ()), f"train.max_steps={budget_steps}",
                         f"train.output_dir={folders['scratch_mamba2']}"]
    layers = teacher_recipe.model.config["num_hidden_layers"]
    if layers % 4:
        raise ValueError(f"{task.name}: 25% attention needs a multiple of 4 layers; the teacher has {layers}")
    run_together([
        (cli("train", "--config", task.scratch_recipe, *scratch_overrides), runs / "scratch_mamba2.log",
         folders["scratch_mamba2"] / "model.safetensors"),
        *((cli("convert", str(folders["teacher"]), str(folders[name]), "--to", "ssm_hub_hybrid", "--attention-layers",
               spec, "--mixer-init", mixer_init), runs / f"{name}.log", folders[name] / "model.safetensors")
          for name, spec, mixer_init in SEEDED),
    ])
    if not (folders["random_ssm"] / "model.safetensors").is_file():
        random_student(folders["seeded_ssm"], folders["random_ssm"])

    distill_flags = [*data_arguments(data), "--batch-size", str(rows), "--speed-contexts"]
    if torch.cuda.is_available() and not quick:
        distill_flags.append("--bf16")

    def stages(aligned: bool) -> list[str]:
        align_steps = max(1, int(ALIGN_SHARE * budget_steps)) if aligned else 0
        return ["--align-steps", str(align_steps), "--kl-steps", str(budget_steps - align_steps)]

    jobs = [(cli("distill", "--teacher", str(folders["teacher"]), "--student", str(folders[student]), "--output",
                 str(folders[output]), *distill_flags, *stages(aligned)), runs / f"{output}.log",
             folders[output] / "distillation.json")
            for output, (student, aligned) in DISTILLED.items()]
    scratch_ssm_overrides = [
        *shared, f"train.max_steps={budget_steps}", f"train.output_dir={folders['scratch_ssm']}",
        f"model.pretrained={folders['random_ssm']}", "model.type=null", "model.config={}",
        f"tokenizer.pretrained={folders['random_ssm']}", "tokenizer.characters=false",
        *([f"train.eval_steps={budget_steps}", f"train.save_steps={budget_steps}"] if quick else []),
    ]
    jobs.append((cli("train", "--config", task.scratch_recipe, *scratch_ssm_overrides), runs / "scratch_ssm.log",
                 folders["scratch_ssm"] / "model.safetensors"))
    run_together(jobs)

    recall = task.name == "mqar"
    scores = evaluate({name: folders[name] for name in EVALUATED}, folders["teacher"], data, recall, device)
    perplexity = {name: result["perplexity"] for name, result in scores.items()}
    checks = [
        *((f"{hybrid} (25% attention) within 2% of the teacher's perplexity",
           perplexity[hybrid] / perplexity["teacher"] - 1, "<= 0.02",
           perplexity[hybrid] <= 1.02 * perplexity["teacher"])
          for hybrid in HYBRIDS),
        *((f"{student} at least 3% better in perplexity than the same SSM from scratch",
           1 - perplexity[student] / perplexity["scratch_ssm"], ">= 0.03",
           perplexity[student] <= 0.97 * perplexity["scratch_ssm"])
          for student in ("distilled_ssm", "distilled_fresh_ssm")),
        ("attention-seeded SSM student better in perplexity than the randomly initialised one",
         1 - perplexity["distilled_ssm"] / perplexity["distilled_random_ssm"], "> 0",
         perplexity["distilled_ssm"] < perplexity["distilled_random_ssm"]),
    ]
    if recall:
        for hybrid in HYBRIDS:
            ratio = scores[hybrid]["recall"] / max(scores["teacher"]["recall"], 1e-12)
            checks.append((f"{hybrid}'s recall, as a fraction of the teacher's", ratio, ">= 0.95", ratio >= 0.95))
    tokens = {"teacher": teacher_steps * rows * data.seq_len,
              **{name: budget_steps * rows * data.seq_len for name in EVALUATED}}
    return {"scores": scores, "tokens": tokens,
            "checks": [{"what": what, "measured": value, "target": target, "met": met}
                       for what, value, target, met in checks]}


def markdown(report: dict) -> str:
    lines = [f"Distillation quality on {report['device']}" + (" (--quick: tiny sizes)" if report["quick"] else "")]
    for name, result in report["tasks"].items():
        recall = "recall" in result["scores"]["teacher"]
        lines += ["", f"**{name}**", "", "| model | training tokens | held-out loss | held-out perplexity |"
                  + (" recall |" if recall else ""), "|---|---|---|---|" + ("---|" if recall else "")]
        for model in ("teacher", *EVALUATED):
            score = result["scores"][model]
            lines.append(f"| {model} | {result['tokens'][model]:,} | {math.log(score['perplexity']):.4f} | "
                         f"{score['perplexity']:.3f} |" + (f" {score['recall']:.3f} |" if recall else ""))
        lines += ["", "| check | measured | target | met |", "|---|---|---|---|"]
        lines += [f"| {check['what']} | {check['measured']:+.4f} | {check['target']} | "
                  f"{'yes' if check['met'] else 'no'} |" for check in result["checks"]]
    lines += ["", "Command: `python benchmarks/quality/distillation_quality.py --data tinyshakespeare.txt`"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="tinyshakespeare.txt")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--runs", type=Path, default=Path("build/distillation_quality"))
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps, for a smoke run on a CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report = {"device": device_name, "quick": args.quick, "budget_fraction": BUDGET_FRACTION, "tasks": {
        name: run_task(TASKS[name], args.data.resolve(), args.runs / name, args.quick, device) for name in args.tasks}}
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device_name, "quick" if args.quick else "",
                       "" if set(args.tasks) == set(TASKS) else "_".join(args.tasks))
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
