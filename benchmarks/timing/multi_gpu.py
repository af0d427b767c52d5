"""Multi-GPU training check: `ssm-hub train` on one GPU, under DDP and under FSDP2 on two, for a 130M-shape Mamba-2
and a hybrid with mixture-of-experts (recipes gpu_mamba2_130m and gpu_hybrid_moe), with the same global batch.

    python benchmarks/timing/multi_gpu.py --data path/to/tinyshakespeare.txt   # on a machine with 2 CUDA GPUs
    python benchmarks/timing/multi_gpu.py --data FILE --runs build/multi_gpu --report-only   # tables and plot again

For each recipe it runs, each through the command line a user types, with ``--rows-per-gpu`` rows of ``--seq-len``
tokens per GPU and step (default 16 x 2048: at 8 x 1024 a 130M step is bound by the CPU on the device tool's
machines, and a second GPU cannot help):
- ``single``: one GPU, twice the rows, so the global batch of two GPUs;
- ``ddp`` and ``fsdp2``: two GPUs through accelerate (``--accelerate-config ddp|fsdp2 --num-processes 2``);
- ``fsdp2_resumed``: the FSDP2 run again from its sharded checkpoint at step 60, to step 120.
When two GPUs are free the two recipes' ``single`` runs go at the same time, one per GPU. Before training, the rows
Trainer feeds each step over three epochs are recorded in one process and in two (under the ddp launcher), to check
that both see the same rows in every step. After training, each run's final model (saved whole) is loaded with
from_pretrained and evaluated over the held-out rows. Trainer's own evaluations run with one row per process and
step: with more, two processes pad an uneven last batch with rows from the start and count them in the loss.

The report compares the loss curves (logged every 5 steps) and the training tokens/s (the median over the logging
intervals, so the first interval's compilation and the evaluations do not count), and writes
benchmarks/results/multi_gpu/<device>.{json,md,png}. A finished run (one whose output holds trainer_state.json)
is not run again.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import result_stem, results_dir

RECIPES = ("gpu_mamba2_130m", "gpu_hybrid_moe")
MODES = ("single", "ddp", "fsdp2", "fsdp2_resumed")
RESUME_STEP = 60  # the recipes' save_steps


def settings(data: Path, rows_per_gpu: int, seq_len: int, processes: int) -> list[str]:
    """The recipe overrides every run and check shares. dataloader_drop_last: an epoch's rows rarely fill its last
    step, and that short step differs between one process (a batch of the few rows left) and two (topped up with
    rows from the epoch's start); with AdamW a step of a few rows is a full-size step in a noisy direction, which
    set the one-GPU curve apart from the two-GPU ones after each epoch in the first run."""
    return [f"data.files=[{data}]", f"data.seq_len={seq_len}", "train.per_device_eval_batch_size=1",
            f"train.per_device_train_batch_size={rows_per_gpu * (2 // processes)}", "train.dataloader_drop_last=true"]


def command(recipe: str, mode: str, runs: Path, data: Path, rows_per_gpu: int, seq_len: int) -> list[str]:
    processes = 1 if mode == "single" else 2
    overrides = [f"train.output_dir={runs / f'{recipe}_{mode}'}", *settings(data, rows_per_gpu, seq_len, processes)]
    if mode == "fsdp2_resumed":
        overrides.append(f"train.resume_from_checkpoint={runs / f'{recipe}_fsdp2' / f'checkpoint-{RESUME_STEP}'}")
    launcher = [] if mode == "single" else ["--accelerate-config", mode.split("_")[0], "--num-processes", "2"]
    return [sys.executable, "-m", "ssm_hub.cli", "train", "--config", recipe, *launcher, *overrides]


def finished(runs: Path, recipe: str, mode: str) -> bool:
    return (runs / f"{recipe}_{mode}" / "trainer_state.json").is_file()


def start(command_line: list[str], log: Path, gpus: str) -> tuple[subprocess.Popen, float]:
    print(f"running {log.stem} on GPU(s) {gpus}", flush=True)
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus, "PYTHONSAFEPATH": "1"}
    return subprocess.Popen(command_line, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=environment), time.perf_counter()


def record_order(recipe_name: str, overrides: list[str], path: Path, epochs: int = 3) -> None:
    """Writes the rows (as indices into the packed training set) that Trainer's training dataloader gives this
    process in each step of ``epochs`` epochs, as the training loop asks for them (set_epoch, then iterate)."""
    from transformers import Trainer, TrainingArguments, set_seed

    from ssm_hub.training import load_recipe
    from ssm_hub.training.config import recipe_path
    from ssm_hub.training.data import read_documents, train_and_eval_datasets
    from ssm_hub.training.run import build_model, build_tokenizer

    recipe = load_recipe(recipe_path(recipe_name), overrides)
    arguments = TrainingArguments(**recipe.train)
    set_seed(arguments.seed)
    documents = read_documents(recipe.data)
    tokenizer = build_tokenizer(recipe, documents)
    train_data, eval_data = train_and_eval_datasets(documents, tokenizer, recipe.data)
    index = {train_data[row]["input_ids"].numpy().tobytes(): row for row in range(len(train_data))}
    loader = Trainer(model=build_model(recipe, tokenizer), args=arguments, train_dataset=train_data,
                     eval_dataset=eval_data).get_train_dataloader()
    steps = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        steps += [[index[row.cpu().numpy().tobytes()] for row in batch["input_ids"]] for batch in loader]
    path.write_text(json.dumps({"rank": int(os.environ.get("RANK", 0)), "steps": steps}))


def check_data_order(runs: Path, data: Path, rows_per_gpu: int, seq_len: int) -> dict:
    """{"steps": compared, "same_rows": steps whose rows are the same set in one process and in two}."""
    recipe = RECIPES[0]
    orders = runs / "data_order"
    orders.mkdir(exist_ok=True)
    script = [str(Path(__file__).resolve()), "--record-order", recipe, "--data", str(data),
              "--rows-per-gpu", str(rows_per_gpu), "--seq-len", str(seq_len)]
    from ssm_hub.training.launch import accelerate_config_path

    for processes, launcher, gpus in (
        (1, [sys.executable], "0"),
        (2, [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(accelerate_config_path("ddp")), "--num_processes", "2"], "0,1"),
    ):
        process, _ = start([*launcher, *script, "--runs", str(orders / f"processes_{processes}")],
                           runs / f"data_order_{processes}.log", gpus)
        if process.wait() != 0:
            raise SystemExit(f"recording the data order failed; see {runs / f'data_order_{processes}.log'}")
    one = json.loads((orders / "processes_1" / "rank_0.json").read_text())["steps"]
    two = [json.loads((orders / "processes_2" / f"rank_{rank}.json").read_text())["steps"] for rank in (0, 1)]
    same = sum(sorted(rows) == sorted(first + second) for rows, first, second in zip(one, *two))
    return {"steps": len(one), "steps_in_two_processes": len(two[0]), "same_rows": same}


def run_all(runs: Path, data: Path, rows_per_gpu: int, seq_len: int) -> dict:
    """Runs what is not finished yet; returns {run name: wall seconds} of the runs made now."""
    walls = {}

    def launch(recipe, mode, gpus):
        return start(command(recipe, mode, runs, data, rows_per_gpu, seq_len), runs / f"{recipe}_{mode}.log", gpus)

    def wait(jobs):
        for name, (process, began) in jobs.items():
            if process.wait() != 0:
                raise SystemExit(f"{name} failed (exit {process.returncode}); see {runs / (name + '.log')}")
            walls[name] = time.perf_counter() - began

    singles = [recipe for recipe in RECIPES if not finished(runs, recipe, "single")]
    for first in range(0, len(singles), 2):  # one recipe per GPU at a time
        wait({f"{recipe}_single": launch(recipe, "single", str(gpu))
              for gpu, recipe in enumerate(singles[first:first + 2])})
    for mode in MODES[1:]:
        for recipe in RECIPES:
            if not finished(runs, recipe, mode):
                wait({f"{recipe}_{mode}": launch(recipe, mode, "0,1")})
    return walls


def history(runs: Path, recipe: str, mode: str) -> list[dict]:
    return json.loads((runs / f"{recipe}_{mode}" / "trainer_state.json").read_text())["log_history"]


def series(log: list[dict], key: str) -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in log if key in entry}


def reloaded_eval_loss(recipe_name: str, output: Path, overrides: list[str]) -> float:
    """The eval loss of a run's final model, loaded with from_pretrained, over the run's held-out rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ssm_hub.training import load_recipe
    from ssm_hub.training.config import recipe_path
    from ssm_hub.training.data import read_documents, train_and_eval_datasets

    recipe = load_recipe(recipe_path(recipe_name), overrides)
    tokenizer = AutoTokenizer.from_pretrained(output)
    _, evaluation = train_and_eval_datasets(read_documents(recipe.data), tokenizer, recipe.data)
    model = AutoModelForCausalLM.from_pretrained(output).cuda().eval()
    losses, rows = [], len(evaluation)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for begin in range(0, rows, 8):
            batch = [evaluation[index] for index in range(begin, min(begin + 8, rows))]
            inputs = {key: torch.stack([row[key] for row in batch]).cuda() for key in batch[0]}
            losses.append((model(**inputs).loss.float().item(), len(batch)))
    return sum(loss * count for loss, count in losses) / rows


def summarise(runs: Path, data: Path, rows_per_gpu: int, seq_len: int, walls: dict, data_order: dict | None) -> dict:
    overrides = settings(data, rows_per_gpu, seq_len, 1)
    global_batch = f"{2 * rows_per_gpu} x {seq_len} tokens"
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
        report[recipe] = {
            "losses": loss,
            "eval_losses": {mode: series(log, "eval_loss") for mode, log in logs.items()},
            "largest_loss_gap_to_single": {mode: largest_gap(mode) for mode in ("ddp", "fsdp2")},
            "largest_loss_gap_resumed_to_fsdp2_after_resume": resumed_gap,
            "tokens_per_second_median": tokens_per_second,
            "scaling_over_single": {mode: tokens_per_second[mode] / tokens_per_second["single"]
                                    for mode in ("ddp", "fsdp2")},
            "peak_memory_gib_per_gpu": memory,
            "reloaded_eval_loss": {mode: reloaded_eval_loss(recipe, runs / f"{recipe}_{mode}", overrides)
                                   for mode in ("single", "ddp", "fsdp2")},
        }
    return {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "global_batch": global_batch, "rows_per_gpu": rows_per_gpu, "seq_len": seq_len, "walls_seconds": walls, "data_order": data_order, "recipes": report}


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
        axis.set_title(f"{recipe}: training loss, {report['global_batch']}")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def markdown(report: dict) -> str:
    lines = [f"`ssm-hub train` on {report['gpus']} x {report['device']}: one GPU against two (DDP, FSDP2), same "
             f"global batch ({report['global_batch']}), bf16 autocast", "",
             "| recipe | run | tokens/s (median) | scaling over 1 GPU | peak memory per GPU (GiB) "
             "| largest train-loss gap to 1 GPU | last eval loss (Trainer) | final model reloaded: eval loss |",
             "|---|---|---|---|---|---|---|---|"]
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
            reloaded = result["reloaded_eval_loss"].get(mode)
            lines.append(
                f"| {recipe} | {mode} | {result['tokens_per_second_median'].get(mode, math.nan):,.0f} | "
                f"{'' if scaling is None else f'{scaling:.2f}x'} | {result['peak_memory_gib_per_gpu'][mode]:.1f} | "
                f"{gap_text} | {evals[max(evals)]:.4f} | {'' if reloaded is None else f'{reloaded:.4f}'} |"
            )
    order = report["data_order"]
    if order is not None:
        lines += ["", f"Rows per step, one process against two under the ddp launcher, over three epochs of "
                      f"{RECIPES[0]}'s data: the same rows in {order['same_rows']} of {order['steps']} steps "
                      f"({order['steps_in_two_processes']} steps in two processes)."]
    lines += ["", f"Command: `python benchmarks/timing/multi_gpu.py --data tinyshakespeare.txt --rows-per-gpu "
                  f"{report['rows_per_gpu']} --seq-len {report['seq_len']}`"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the text file the recipes train on")
    parser.add_argument("--runs", type=Path, default=Path("multi_gpu_runs"), help="folder for the runs")
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    parser.add_argument("--rows-per-gpu", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument("--record-order", metavar="RECIPE", help=argparse.SUPPRESS)  # the data-order check's child
    args = parser.parse_args()
    data, runs = args.data.resolve(), args.runs.resolve()
    if args.record_order is not None:
        runs.mkdir(parents=True, exist_ok=True)
        processes = int(os.environ.get("WORLD_SIZE", 1))
        record_order(args.record_order, settings(data, args.rows_per_gpu, args.seq_len, processes),
                     runs / f"rank_{os.environ.get('RANK', 0)}.json")
        return
    if torch.cuda.device_count() < 2:
        raise SystemExit(f"this benchmark needs 2 CUDA GPUs; {torch.cuda.device_count()} visible")
    runs.mkdir(parents=True, exist_ok=True)
    notes = runs / "walls_and_data_order.json"
    saved = json.loads(notes.read_text()) if notes.is_file() else {"walls_seconds": {}, "data_order": None}
    if not args.report_only:
        if saved["data_order"] is None:
            saved["data_order"] = check_data_order(runs, data, args.rows_per_gpu, args.seq_len)
            notes.write_text(json.dumps(saved))
        saved["walls_seconds"].update(run_all(runs, data, args.rows_per_gpu, args.seq_len))
        notes.write_text(json.dumps(saved))
    report = summarise(runs, data, args.rows_per_gpu, args.seq_len, saved["walls_seconds"], saved["data_order"])
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(report["device"])
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output / f"{stem}.md").write_text(markdown(report))
    plot(report, args.output / f"{stem}.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
