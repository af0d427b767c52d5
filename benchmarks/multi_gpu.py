"""Multi-GPU training check: `ssm-hub train` on one GPU, under DDP and under FSDP2 on two, for a 130M-shape Mamba-2
and a hybrid with mixture-of-experts (recipes gpu_mamba2_130m and gpu_hybrid_moe), with the same global batch.

    python benchmarks/multi_gpu.py --data path/to/tinyshakespeare.txt          # on a machine with 2 CUDA GPUs
    python benchmarks/multi_gpu.py --data FILE --runs build/multi_gpu --report-only   # tables and plot again

For each recipe it runs, each through the command line a user types:
- ``single``: one GPU, 16 rows of 1024 tokens per step (the recipe's 8 per GPU, doubled);
- ``ddp`` and ``fsdp2``: two GPUs through accelerate (``--accelerate-config ddp|fsdp2 --num-processes 2``), 8 rows
  per GPU, so the same global batch and the same rows in each step as ``single``;
- ``fsdp2_resumed``: the FSDP2 run again from its sharded checkpoint at step 60, to step 120.
When two GPUs are free the two recipes' ``single`` runs go at the same time, one per GPU. Then the FSDP2 run's final
model (saved whole) is loaded with from_pretrained and its eval loss recomputed. The report compares the loss
curves (logged every 5 steps) and the training tokens/s (the median over the logging intervals, so the first
interval's compilation and the evaluations do not count), and writes multi_gpu_<device>.{json,md,png} to
benchmarks/results/. A finished run (one whose output holds trainer_state.json) is not run again.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
RECIPES = ("gpu_mamba2_130m", "gpu_hybrid_moe")
MODES = ("single", "ddp", "fsdp2", "fsdp2_resumed")
RESUME_STEP = 60  # the recipes' save_steps


def command(recipe: str, mode: str, runs: Path, data: Path) -> list[str]:
    overrides = [f"train.output_dir={runs / f'{recipe}_{mode}'}", f"data.files=[{data}]"]
    if mode == "single":
        overrides.append("train.per_device_train_batch_size=16")
    if mode == "fsdp2_resumed":
        overrides.append(f"train.resume_from_checkpoint={runs / f'{recipe}_fsdp2' / f'checkpoint-{RESUME_STEP}'}")
    launcher = [] if mode == "single" else ["--accelerate-config", mode.split("_")[0], "--num-processes", "2"]
    return [sys.executable, "-m", "ssm_hub.cli", "train", "--config", recipe, *launcher, *overrides]


def finished(runs: Path, recipe: str, mode: str) -> bool:
    return (runs / f"{recipe}_{mode}" / "trainer_state.json").is_file()


def start(recipe: str, mode: str, runs: Path, data: Path, gpus: str) -> tuple[subprocess.Popen, float]:
    log = open(runs / f"{recipe}_{mode}.log", "w")
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
    print(f"running {recipe} {mode} on GPU(s) {gpus}", flush=True)
    return subprocess.Popen(command(recipe, mode, runs, data), stdout=log, stderr=subprocess.STDOUT,
                            env=environment), time.perf_counter()


def run_all(runs: Path, data: Path) -> dict:
    """Runs what is not finished yet; returns {run name: wall seconds} of the runs made now."""
    walls = {}

    def wait(jobs):
        for name, (process, began) in jobs.items():
            if process.wait() != 0:
                raise SystemExit(f"{name} failed (exit {process.returncode}); see {runs / (name + '.log')}")
            walls[name] = time.perf_counter() - began

    singles = [recipe for recipe in RECIPES if not finished(runs, recipe, "single")]
    for first in range(0, len(singles), 2):  # one recipe per GPU at a time
        wait({f"{recipe}_single": start(recipe, "single", runs, data, str(gpu))
              for gpu, recipe in enumerate(singles[first:first + 2])})
    for mode in MODES[1:]:
        for recipe in RECIPES:
            if not finished(runs, recipe, mode):
                wait({f"{recipe}_{mode}": start(recipe, mode, runs, data, "0,1")})
    return walls


def history(runs: Path, recipe: str, mode: str) -> list[dict]:
    return json.loads((runs / f"{recipe}_{mode}" / "trainer_state.json").read_text())["log_history"]


def series(log: list[dict], key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in log if key in entry}


def reloaded_eval_loss(recipe_name: str, output: Path, data: Path) -> float:
    """The eval loss of the saved final model, loaded with from_pretrained, over the recipe's held-out rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssm_hub.training import load_recipe
    from ssm_hub.training.config import recipe_path
    from ssm_hub.training.data import read_documents, train_and_eval_datasets

    recipe = load_recipe(recipe_path(recipe_name), [f"data.files=[{data}]"])
    tokenizer = AutoTokenizer.from_pretrained(output)
    _, evaluation = train_and_eval_datasets(read_documents(recipe.data), tokenizer, recipe.data)
    model = AutoModelForCausalLM.from_pretrained(output).cuda().eval()
    losses, rows = [], len(evaluation)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for begin in range(0, rows, 8):  # Trainer's default eval batch, row for row
            batch = [evaluation[index] for index in range(begin, min(begin + 8, rows))]
            inputs = {key: torch.stack([row[key] for row in batch]).cuda() for key in batch[0]}
            losses.append((model(**inputs).loss.float().item(), len(batch)))
    return sum(loss * count for loss, count in losses) / rows


def summarise(runs: Path, data: Path, walls: dict) -> dict:
    report = {}
    for recipe in RECIPES:
        logs = {mode: history(runs, recipe, mode) for mode in MODES}
        loss = {mode: series(log, "loss") for mode, log in logs.items()}
        speed = {mode: list(series(log, "tokens_per_second").values())[1:] for mode, log in logs.items()}
        memory = {mode: max(series(log, "peak_memory_gib").values(), default=math.nan) for mode, log in logs.items()}
        single = loss["single"]

        def largest_gap(mode, after=0):
            gaps = [abs(value - single[step]) for step, value in loss[mode].items() if step in single and step > after]
            return max(gaps)

        resumed_gap = max(abs(value - loss["fsdp2"][step])
                          for step, value in loss["fsdp2_resumed"].items() if step > RESUME_STEP)
        tokens_per_second = {mode: statistics.median(values) for mode, values in speed.items() if values}
        final_eval = series(logs["fsdp2"], "eval_loss")
        report[recipe] = {
            "losses": loss,
            "eval_losses": {mode: series(log, "eval_loss") for mode, log in logs.items()},
            "largest_loss_gap_to_single": {mode: largest_gap(mode) for mode in ("ddp", "fsdp2")},
            "largest_loss_gap_resumed_to_fsdp2_after_resume": resumed_gap,
            "tokens_per_second_median": tokens_per_second,
            "scaling_over_single": {mode: tokens_per_second[mode] / tokens_per_second["single"]
                                    for mode in ("ddp", "fsdp2")},
            "peak_memory_gib_per_gpu": memory,
            "fsdp2_final_eval_loss": final_eval[max(final_eval)],
            "fsdp2_reloaded_eval_loss": reloaded_eval_loss(recipe, runs / f"{recipe}_fsdp2", data),
        }
    return {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
            "torch": torch.__version__, "walls_seconds": walls, "recipes": report}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, len(RECIPES), figsize=(6 * len(RECIPES), 4))
    styles = {"single": dict(lw=2.5, alpha=0.5), "ddp": dict(lw=1.2), "fsdp2": dict(lw=1.2, ls="--"),
              "fsdp2_resumed": dict(lw=1.2, ls=":", marker=".")}
    for axis, recipe in zip(axes, RECIPES):
        for mode, losses in report["recipes"][recipe]["losses"].items():
            steps = sorted(step for step in losses if mode != "fsdp2_resumed" or step > RESUME_STEP)
            label = {"single": "1 GPU", "ddp": "2 GPUs, DDP", "fsdp2": "2 GPUs, FSDP2",
                     "fsdp2_resumed": f"FSDP2 resumed at step {RESUME_STEP}"}[mode]
            axis.plot(steps, [losses[step] for step in steps], label=label, **styles[mode])
        axis.set_title(f"{recipe}: training loss, global batch 16 x 1024")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def markdown(report: dict) -> str:
    lines = [f"`ssm-hub train` on {report['gpus']} x {report['device']}: one GPU against two (DDP, FSDP2), same "
             "global batch (16 x 1024 tokens), bf16 autocast", "",
             "| recipe | run | tokens/s (median) | scaling over 1 GPU | peak memory per GPU (GiB) "
             "| largest train-loss gap to 1 GPU | final eval loss |", "|---|---|---|---|---|---|---|"]
    for recipe, result in report["recipes"].items():
        for mode in MODES:
            evals = result["eval_losses"][mode]
            scaling = result["scaling_over_single"].get(mode)
            gap = result["largest_loss_gap_to_single"].get(mode)
            if mode == "fsdp2_resumed":
                gap_text = (f"{result['largest_loss_gap_resumed_to_fsdp2_after_resume']:.4f} "
                            f"(to the uninterrupted FSDP2 run, after step {RESUME_STEP})")
            else:
                gap_text = "" if gap is None else f"{gap:.4f}"
            lines.append(
                f"| {recipe} | {mode} | {result['tokens_per_second_median'].get(mode, math.nan):,.0f} | "
                f"{'' if scaling is None else f'{scaling:.2f}x'} | {result['peak_memory_gib_per_gpu'][mode]:.1f} | "
                f"{gap_text} | {evals[max(evals)]:.4f} |"
            )
    lines.append("")
    for recipe, result in report["recipes"].items():
        lines.append(f"- {recipe}: the FSDP2 run's final model, reloaded with from_pretrained, evaluates to "
                     f"{result['fsdp2_reloaded_eval_loss']:.4f} (Trainer's final evaluation: "
                     f"{result['fsdp2_final_eval_loss']:.4f}).")
    lines += ["", "Command: `python benchmarks/multi_gpu.py --data tinyshakespeare.txt`"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the text file the recipes train on")
    parser.add_argument("--runs", type=Path, default=Path("multi_gpu_runs"), help="folder for the runs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    args = parser.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"this benchmark needs 2 CUDA GPUs; {torch.cuda.device_count()} visible")
    args.runs.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    walls = {} if args.report_only else run_all(args.runs.resolve(), data)
    report = summarise(args.runs.resolve(), data, walls)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"multi_gpu_{report['device'].replace(' ', '_')}"
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / f"{stem}.md").write_text(markdown(report))
    plot(report, args.output / f"{stem}.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
