"""Profile of `ssm-hub train` steps under DDP or FSDP2 on several GPUs: host and device time per op, on rank 0.

    python -m accelerate.commands.launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 \\
        benchmarks/profiles/profile_distributed_step.py --data tinyshakespeare.txt
    (the same with recipes/accelerate/ddp.yaml)

It trains the recipe (default gpu_mamba2_130m) for 13 steps at benchmarks/timing/multi_gpu.py's 16 x 2048 tokens per
GPU, with no checkpoint and no evaluation but the final one. Steps 2-7 are timed without the profiler (each after a
CUDA synchronisation); steps 8-11 run under torch.profiler, and rank 0 writes the op tables sorted by host (self
CPU) time and by device time to benchmarks/results/profile_distributed_step/<device>_<ddp | fsdp2>.txt (``--output``:
another folder). A step whose host time exceeds its device time is bound by the host, and a second GPU cannot make
it faster.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback

import ssm_hub.training.run as training_run
from ssm_hub.training import load_recipe
from ssm_hub.training.config import recipe_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import result_stem, results_dir

TIMED_STEPS = range(2, 8)
PROFILED_STEPS = (8, 12)  # [first, end)


class StepProfile(TrainerCallback):
    def __init__(self, output: Path):
        self.output = output
        self.step_seconds = []
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.start = time.perf_counter()
        if state.global_step == PROFILED_STEPS[0] and args.process_index == 0:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        if state.global_step - 1 in TIMED_STEPS:  # global_step counts this step already
            self.step_seconds.append(time.perf_counter() - self.start)
        if state.global_step == PROFILED_STEPS[1] and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            steps = PROFILED_STEPS[1] - PROFILED_STEPS[0]
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.output.write_text(
                f"step seconds without the profiler (steps {TIMED_STEPS.start}-{TIMED_STEPS.stop - 1}): "
                f"{[round(s, 4) for s in sorted(self.step_seconds)]}\n"
                f"tables over {steps} profiled steps\n"
                + averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
                + averages.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60))
            self.profiler = None


def launch_mode(accelerator) -> str:
    """How the run was launched, named as recipes/accelerate names its configs: ddp, fsdp2 (or fsdp1), else
    accelerate's own name of the distributed type."""
    kind = accelerator.distributed_type
    if kind == DistributedType.MULTI_GPU:
        return "ddp"
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    return str(kind.value).lower()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="gpu_mamba2_130m")
    parser.add_argument("--data", type=Path, required=True, help="the recipe's text file (tinyshakespeare)")
    parser.add_argument("--rows-per-gpu", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--output", type=Path, default=results_dir(__file__), help="folder for the tables")
    args = parser.parse_args()
    recipe = load_recipe(recipe_path(args.recipe), [
        f"data.files=[{args.data.resolve()}]", f"data.seq_len={args.seq_len}",
        f"train.per_device_train_batch_size={args.rows_per_gpu}", "train.dataloader_drop_last=true",
        "train.output_dir=build/profile_distributed_step", f"train.max_steps={PROFILED_STEPS[1] + 1}",
        "train.eval_strategy=no", "train.save_strategy=no", "train.per_device_eval_batch_size=1",
    ])
    trainer_class = training_run._recipe_trainer_class

    def with_profile():
        class ProfiledTrainer(trainer_class()):
            def __init__(self, *positional, **keywords):
                super().__init__(*positional, **keywords)
                stem = result_stem(torch.cuda.get_device_name(), launch_mode(self.accelerator))
                self.add_callback(StepProfile(args.output / f"{stem}.txt"))

        return ProfiledTrainer

    training_run._recipe_trainer_class = with_profile
    training_run.train(recipe)


if __name__ == "__main__":
    main()
