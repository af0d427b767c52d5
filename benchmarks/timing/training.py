"""Training throughput and peak memory of ssm_hub (the backend SSM_HUB_BACKEND selects) against transformers'
own pure-torch Mamba-2, in the same process, on one CUDA GPU.

Shape (issue "Foundation", point 9): a 130M-parameter Mamba-2 (hidden 768, 24 layers, state 128, head_dim 64,
vocabulary 50288) at batch 8 x 2048 tokens, bf16 autocast over fp32 weights, AdamW. Each candidate runs
warm-up steps, then timed steps; an out-of-memory error is reported as such. On the kernels, ssm_hub also runs
with its fused training node switched off (each op's backward left to autograd: ssm_hub.ops.mamba2_sequence says
what the node changes), to show what the node costs and saves.

    SSM_HUB_BACKEND=torch python benchmarks/timing/training.py   # the torch reference
    python benchmarks/timing/training.py                         # the default backend (Triton kernels on CUDA)
    python benchmarks/timing/training.py --batch 2 --seq-len 512 --steps 2  # smaller, for a quick look

Writes benchmarks/results/training/<device>_<backend>_b<batch>_l<seq-len>.{json,md}. With ours on kernels (a backend
other than torch), transformers' row runs on mamba_ssm's kernels where mamba_ssm and causal_conv1d import, else on
its torch path, and the file name then ends in ``_transformers_torch_path``.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import (CANDIDATES, OURS, build_mamba2_130m, candidate_label, free_memory, result_stem, results_dir,
                    time_training_steps, transformers_fast_path)

WITHOUT_FUSED_NODE = "ssm_hub without the fused training node"


def measure(candidate: str, batch: int, seq_len: int, vocab_size: int, warmup: int, steps: int) -> dict:
    if candidate == WITHOUT_FUSED_NODE:
        from ssm_hub.layers.mamba2_mixer import Mamba2Mixer

        shipped = Mamba2Mixer._sequence_on_kernels
        Mamba2Mixer._sequence_on_kernels = lambda self, hidden_states: False
        try:
            return {**measure(OURS, batch, seq_len, vocab_size, warmup, steps),
                    "candidate": f"{candidate_label(OURS)}, fused training node off"}
        finally:
            Mamba2Mixer._sequence_on_kernels = shipped
    free_memory()
    result = {"candidate": candidate_label(candidate), "batch": batch, "seq_len": seq_len}
    model = None
    try:
        model = build_mamba2_130m(candidate, vocab_size).cuda().train()
        result["parameters"] = model.num_parameters()
        input_ids = torch.randint(0, vocab_size, (batch, seq_len), device="cuda")
        median, loss = time_training_steps(model, input_ids, warmup, steps)
        result.update(
            status="ok", step_seconds_median=median, tokens_per_second=batch * seq_len / median,
            peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30, final_loss=loss,
        )
    except torch.cuda.OutOfMemoryError as error:
        result.update(status="out of memory", peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
                      error=str(error).splitlines()[0])
    del model  # free the GPU before the next candidate
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=50288)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    backend = os.environ.get("SSM_HUB_BACKEND", "auto")
    candidates = CANDIDATES if backend == "torch" else (OURS, WITHOUT_FUSED_NODE, *CANDIDATES[1:])
    rows = []
    for candidate in candidates:
        rows.append(measure(candidate, args.batch, args.seq_len, args.vocab_size, args.warmup, args.steps))
        print(json.dumps(rows[-1]), flush=True)  # each row as it comes: a run cut short still shows what it measured
    device = torch.cuda.get_device_name()
    report = {
        "benchmark": "training", "device": device, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "backend_env": os.environ.get("SSM_HUB_BACKEND", "auto"), "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    torch_path = backend != "torch" and not transformers_fast_path()
    stem = result_stem(device, backend, f"b{args.batch}_l{args.seq_len}",
                       "transformers_torch_path" if torch_path else "")
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Mamba-2 130M training step, batch {args.batch} x {args.seq_len}, bf16 autocast, AdamW, on {device}",
        "", "| candidate | status | tokens/s | step (s) | peak memory (GiB) |", "|---|---|---|---|---|",
    ]
    for row in rows:
        tps = f"{row['tokens_per_second']:,.0f}" if row["status"] == "ok" else "-"
        step = f"{row['step_seconds_median']:.3f}" if row["status"] == "ok" else "-"
        lines.append(f"| {row['candidate']} | {row['status']} | {tps} | {step} | {row['peak_memory_gib']:.1f} |")
    table = "\n".join(lines) + "\n"
    (args.output / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
