"""Where a 130M Mamba-2's batch-1 decode step spends its time, on one CUDA GPU.

    python benchmarks/profiles/profile_decode.py                  # ssm_hub (backend from SSM_HUB_BACKEND), bf16
    python benchmarks/profiles/profile_decode.py --output /tmp/out

Prints its tables and writes the numbers to benchmarks/results/profile_decode/<device>.json (``--output``: another
folder).

After a 128-token prefill into a static cache it times one decode step (model forward on one token) three ways:
eagerly (Python and launches included), as a CUDA-graph replay of the same step (the device time alone, what
generate's default decoder pays per token on top of its sampling), and kernel by kernel with torch.profiler (name,
launches per step, device time per step), which says which kernels a faster step must fuse or speed up. The eager
step's host time is also split by function with cProfile (the functions with the most time of their own).

Then a whole plain ``generate`` call (batch 1, a 512-token prompt, 256 new tokens, after a first call that
captures): its wall time, the part spent before the first decode step (generate's setup and the eager prefill)
and the part in the replayed steps, and its host time by function (cumulative), which says what a batch-1 call
pays besides the steps.
"""

import argparse
import cProfile
import importlib
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import OURS, build_mamba2_130m, per_step_ms, result_stem, results_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=50288)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output", type=Path, default=results_dir(__file__), help="folder for <device>.json")
    args = parser.parse_args()
    model = build_mamba2_130m(OURS, args.vocab_size).to("cuda", torch.bfloat16).eval()
    cache = StaticCache(config=model.config, max_cache_len=1024)
    tokens = torch.randint(1, args.vocab_size, (1, 1), device="cuda")

    def step():
        model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)

    with torch.no_grad():
        model(input_ids=torch.randint(1, args.vocab_size, (1, 128), device="cuda"), cache=cache, use_cache=True)
        step()  # compiles the decode kernels, which must not count as a step's time
        eager_ms = per_step_ms(step, args.steps)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph_ms = per_step_ms(graph.replay, args.steps)
        profiled_steps = 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled_steps):
                step()
            torch.cuda.synchronize()
        host_profile = cProfile.Profile()
        host_profile.enable()
        for _ in range(profiled_steps):
            step()
        host_profile.disable()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.device_time
    table = sorted(
        ({"kernel": name, "launches_per_step": n / profiled_steps, "us_per_step": us / profiled_steps}
         for name, (n, us) in kernels.items()),
        key=lambda row: -row["us_per_step"],
    )
    report = {
        "device": torch.cuda.get_device_name(), "eager_step_ms": eager_ms, "graph_step_ms": graph_ms,
        "kernel_launches_per_step": sum(row["launches_per_step"] for row in table),
        "kernel_us_per_step": sum(row["us_per_step"] for row in table), "kernels": table,
    }
    print(f"{report['device']}: eager step {eager_ms:.3f} ms, graph replay {graph_ms:.3f} ms "
          f"({1e3 / graph_ms:.0f} tokens/s), {report['kernel_launches_per_step']:.0f} launches, "
          f"{report['kernel_us_per_step']:.0f} us of kernels per step")
    for row in table[:25]:
        print(f"{row['us_per_step']:8.1f} us {row['launches_per_step']:5.0f}x  {row['kernel'][:110]}")
    print(f"host time of {profiled_steps} eager steps, by function (own time first):")
    pstats.Stats(host_profile).sort_stats("tottime").print_stats(25)
    report["generate_call"] = profile_generate_call(model, args.vocab_size)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{result_stem(report['device'])}.json").write_text(json.dumps(report, indent=2) + "\n")


def profile_generate_call(model, vocab_size: int, prompt_len: int = 512, new_tokens: int = 256) -> dict:
    """Wall time of a plain generate call, split at the first replayed step (``_run`` of ssm_hub.generation)."""
    generation = importlib.import_module("ssm_hub.generation")
    model.generation_config.eos_token_id = None
    prompt = torch.randint(1, vocab_size, (1, prompt_len), device="cuda")
    marks = {}
    run_steps = generation._run

    def timed_steps(*args, **kwargs):
        torch.cuda.synchronize()
        marks["steps_start"] = time.perf_counter()
        return run_steps(*args, **kwargs)

    generation._run = timed_steps
    try:
        model.generate(prompt, max_new_tokens=new_tokens, pad_token_id=0)  # captures the step
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, pad_token_id=0)
        torch.cuda.synchronize()
        end = time.perf_counter()
    finally:
        generation._run = run_steps
    split = {"call_ms": (end - start) * 1e3, "before_first_step_ms": (marks["steps_start"] - start) * 1e3,
             "steps_ms": (end - marks["steps_start"]) * 1e3}
    print(f"generate(batch 1, prompt {prompt_len}, {new_tokens} new tokens): "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in split.items()))
    call_profile = cProfile.Profile()
    call_profile.enable()
    model.generate(prompt, max_new_tokens=new_tokens, pad_token_id=0)
    call_profile.disable()
    print("host time of that call by function (cumulative, under cProfile):")
    pstats.Stats(call_profile).sort_stats("cumulative").print_stats(40)
    return split


if __name__ == "__main__":
    main()
