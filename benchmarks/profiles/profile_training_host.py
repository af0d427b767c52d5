"""Where the host (CPU) time of a 130M Mamba-2 training step goes, on one CUDA GPU.

    python benchmarks/profiles/profile_training_host.py            # ssm_hub on its kernels, bf16 autocast
    python benchmarks/profiles/profile_training_host.py --batch 8 --seq-len 2048 --vocab-size 50288 --kernels 40

Prints the split and writes it to benchmarks/results/profile_training_host/<device>_b<batch>_l<seq-len>.txt
(``--output``: another folder).

The step (forward, loss, backward; no optimizer) runs at batch 1 x 256 tokens, where the GPU work is a few ms: the
wall time per step is then the host's time to issue it. The time spent inside ssm_hub's kernel launchers (the
public functions of ssm_hub.kernels: their Python plus Triton's launch of each kernel) and inside Triton's
JITFunction.run alone is summed per step; the rest is autograd, torch's dispatch and the model's own Python. At the
benchmark shape (batch 8 x 2048) a step that issues more slowly than the GPU runs it is bound by the host.
``--kernels N`` adds torch.profiler's table of the N ops and kernels with the most device time per step, which
says where the GPU time of a device-bound step goes.
"""

import argparse
import functools
import importlib
import inspect
import pkgutil
import sys
import time
from pathlib import Path

import torch
import triton
from torch.profiler import ProfilerActivity, profile

import ssm_hub.kernels
import ssm_hub.ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import OURS, build_mamba2_130m, per_step_ms, result_stem, results_dir

TRITON_RUN = "triton JITFunction.run (all launches)"


class HostTimer:
    """Sums wall time per label; a launcher called inside another launcher counts towards the outer one only."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.launches = 0
        self._depth = 0

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + seconds

    def wrap_launcher(self, label: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self._depth:
                return function(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)
                self._depth -= 1

        return timed

    def wrap_triton_run(self, run):
        @functools.wraps(run)
        def timed(kernel, *args, **kwargs):
            self.launches += 1
            start = time.perf_counter()
            try:
                return run(kernel, *args, **kwargs)
            finally:
                self.add(TRITON_RUN, time.perf_counter() - start)

        return timed


def time_launchers(timer: HostTimer) -> None:
    """Wrap every public launcher of ssm_hub.kernels, where it is defined and where ssm_hub.ops imported it."""
    modules = [importlib.import_module(f"ssm_hub.kernels.{info.name}")
               for info in pkgutil.iter_modules(ssm_hub.kernels.__path__)]
    modules += [importlib.import_module(info.name)
                for info in pkgutil.walk_packages(ssm_hub.ops.__path__, "ssm_hub.ops.")]
    for module in modules:
        for name, function in list(vars(module).items()):
            if (inspect.isfunction(function) and function.__module__.startswith("ssm_hub.kernels.")
                    and not name.startswith("_")):
                label = f"launcher {function.__module__.rsplit('.', 1)[-1]}.{name}"
                setattr(module, name, timer.wrap_launcher(label, function))
    triton.runtime.jit.JITFunction.run = timer.wrap_triton_run(triton.runtime.jit.JITFunction.run)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="the default keeps the embedding and LM head out of what this measures")
    parser.add_argument("--kernels", type=int, default=0, help="add the device-time table of this many ops")
    parser.add_argument("--output", type=Path, default=results_dir(__file__), help="folder for the report")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    model = build_mamba2_130m(OURS, args.vocab_size).cuda().train()
    input_ids = torch.randint(0, args.vocab_size, (args.batch, args.seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()

    for _ in range(5):  # compilation and autotuning before the timers go in
        step()
    kernel_table = ""
    if args.kernels:
        profiled_steps = 3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for _ in range(profiled_steps):
                step()
            torch.cuda.synchronize()
        kernel_table = (f"\ndevice time of {profiled_steps} steps by op and kernel:\n"
                        + profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.kernels,
                                                        max_name_column_width=70))
    timer = HostTimer()
    time_launchers(timer)
    wall_ms = per_step_ms(step, args.steps)
    lines = [f"130M Mamba-2 forward + backward at batch {args.batch} x {args.seq_len}, vocabulary {args.vocab_size}, "
             f"on {torch.cuda.get_device_name()}",
             f"host wall time per step {wall_ms:.1f} ms; Triton launches per step {timer.launches / args.steps:.0f}"]
    for label, seconds in sorted(timer.seconds.items(), key=lambda item: -item[1]):
        lines.append(f"{seconds / args.steps * 1e3:8.2f} ms  {label}")
    report = "\n".join(lines) + "\n" + kernel_table
    print(report)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(torch.cuda.get_device_name(), f"b{args.batch}_l{args.seq_len}")
    (args.output / f"{stem}.txt").write_text(report)


if __name__ == "__main__":
    main()
