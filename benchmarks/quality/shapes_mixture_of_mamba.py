"""Does the vision-language model see, and does Mixture-of-Mamba help: the shapes captioning recipe
(recipes/shapes_multimodal.yaml) trained on one CUDA GPU with shared projections, with Mixture-of-Mamba (the image
tokens' own SSM projections) and with Mixture-of-Mamba plus the image tokens' own MLPs and norms (``--variants``).

    python benchmarks/quality/shapes_mixture_of_mamba.py                # on a CUDA GPU
    python benchmarks/quality/shapes_mixture_of_mamba.py --cpu --steps 600  # fewer steps, on the CPU in float32
    python benchmarks/quality/shapes_mixture_of_mamba.py --quick --output /tmp/out  # tiny steps on the CPU: a smoke run

Writes benchmarks/results/shapes_mixture_of_mamba/<device, or cpu>[_steps<N>][_quick].{json,md,png}.

A variant already in the results file (same device, steps and overrides) is not trained again, so a run cut short
resumes; delete the file to measure all afresh.

Every run is the recipe as a user trains it (``ssm_hub.training.train``, what ``ssm-hub train`` calls) with one
override, so the three see the same scenes in the same order, for the same steps, rows and tokens. Routing is by a
fixed modality mask and each token goes through one copy of each routed module, so the compute per token is the
same in all three; only the parameter count grows. Reported per run: the training and held-out losses over the
steps (both curves in one plot), the final held-out loss on the captions, exact-match caption accuracy on held-out
scenes whose captions no training scene has, parameters, wall time and training tokens/s.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import result_stem, results_dir

RECIPE = "shapes_multimodal"
VARIANTS = {
    "shared": [],
    "mixture_of_mamba": ["model.config.mixture_of_mamba=true"],
    "mixture_of_mamba_mlps_norms": ["model.config.mixture_of_mamba=true", "model.config.modality_mlps=true",
                                    "model.config.modality_norms=true"],
}
ON_CPU = ["train.bf16=false", "train.use_cpu=true"]
QUICK = ["train.max_steps=6", "train.eval_steps=3", "train.save_steps=6", "train.logging_steps=1",
         "train.per_device_train_batch_size=8", "train.per_device_eval_batch_size=8", "data.max_documents=160"]


def run(name: str, overrides: list[str], runs: Path) -> dict:
    """Train one variant; its summary, log history, parameter count and wall time."""
    from safetensors import safe_open

    from ssm_hub.training import load_recipe, train
    from ssm_hub.training.config import recipe_path

    output_dir = runs / name
    recipe = load_recipe(recipe_path(RECIPE), [*overrides, f"train.output_dir={output_dir}"])
    started = time.perf_counter()
    summary = train(recipe)
    seconds = time.perf_counter() - started
    with safe_open(output_dir / "model.safetensors", "pt") as weights:  # tied weights are stored once
        parameters = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    throughput = [entry["tokens_per_second"] for entry in history if "tokens_per_second" in entry]
    return {
        "overrides": overrides, "caption_accuracy": summary["caption_accuracy"], "eval_loss": summary["eval_loss"],
        "train_loss": summary["train_loss"], "steps": summary["steps"], "parameters": parameters,
        "wall_seconds": seconds,
        "tokens_per_second": sorted(throughput)[len(throughput) // 2] if throughput else None,  # median of logs
        "train_curve": [(entry["step"], entry["loss"]) for entry in history if "loss" in entry],
        "eval_curve": [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry],
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot


    figure, axis = pyplot.subplots(figsize=(8, 4.5))
    for (name, result), colour in zip(report["runs"].items(), ("tab:blue", "tab:orange", "tab:green")):
        steps, losses = zip(*result["train_curve"])
        # Each logged training loss is already the mean over its logging interval.
        axis.plot(steps, losses, color=colour, label=f"{name}: train")
        if result["eval_curve"]:
            steps, losses = zip(*result["eval_curve"])
            axis.plot(steps, losses, color=colour, linestyle="--", marker="o", label=f"{name}: held-out")
    axis.set_xlabel("step")
    axis.set_ylabel("loss on the captions")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"{RECIPE} on {report['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def markdown(report: dict) -> str:
    lines = [f"Shapes captioning (`{RECIPE}`) on {report['device']}" + (" (--quick)" if report["quick"] else ""),
             "", "| variant | parameters | final held-out loss | caption exact match (held-out captions) | "
             "wall time | training tokens/s |", "|---|---|---|---|---|---|"]
    for name, result in report["runs"].items():
        tokens = f"{result['tokens_per_second']:,.0f}" if result["tokens_per_second"] else "-"
        lines.append(f"| {name} | {result['parameters']:,} | {result['eval_loss']:.4f} | "
                     f"{result['caption_accuracy']:.3f} | {result['wall_seconds']:.0f} s | {tokens} |")
    steps = next(iter(report["runs"].values()))["steps"]
    lines += ["", f"Same recipe, steps ({steps}), rows and scenes in every run; loss curves in `{report['plot']}`.",
              ""]
    commands = dict.fromkeys(result["command"] for result in report["runs"].values())
    lines += [f"Command{'s' if len(commands) > 1 else ''}: " + ", ".join(f"`{command}`" for command in commands)]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("build/shapes_mixture_of_mamba"))
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    parser.add_argument("--steps", type=int, help="training steps of every run (default: the recipe's)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--cpu", action="store_true", help="train on the CPU, in float32")
    parser.add_argument("--quick", action="store_true", help="a few steps on the CPU, to try the script")
    args = parser.parse_args()
    # One GPU: with more in sight, Trainer would spread each run over them with DataParallel.
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    import torch

    on_cpu = args.cpu or args.quick
    if not on_cpu and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --cpu)")
    overrides = [*(ON_CPU if on_cpu else []), *(QUICK if args.quick else []),
                 *([f"train.max_steps={args.steps}"] if args.steps else [])]
    device = f"cpu ({os.cpu_count()} cores)" if on_cpu else torch.cuda.get_device_name()
    stem = result_stem("cpu" if on_cpu else device, f"steps{args.steps}" if args.steps else "",
                       "quick" if args.quick else "")
    report = {"device": device, "quick": args.quick, "recipe": RECIPE,
              "command": " ".join(["python benchmarks/quality/shapes_mixture_of_mamba.py", *sys.argv[1:]]),
              "plot": f"{stem}.png", "runs": {}}
    args.output.mkdir(parents=True, exist_ok=True)
    if (args.output / f"{stem}.json").is_file():  # same device and steps: a variant already measured is kept
        earlier = json.loads((args.output / f"{stem}.json").read_text())
        report["runs"] = {name: {"command": earlier["command"], **result} for name, result in earlier["runs"].items()}
    for name in args.variants:  # the files are rewritten after each run, so a run cut short keeps the ones before
        if name in report["runs"] and report["runs"][name]["overrides"] == [*VARIANTS[name], *overrides]:
            print(f"{name}: measured already, in {args.output / stem}.json")
            continue
        report["runs"][name] = {**run(name, [*VARIANTS[name], *overrides], args.runs), "command": report["command"]}
        plot(report, args.output / report["plot"])
        (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.output / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
