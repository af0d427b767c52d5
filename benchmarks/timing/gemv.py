"""Decoding's projections on one row: ssm_hub's matrix-vector kernel against cuBLAS (torch.nn.functional.linear),
in one process on one CUDA GPU, bf16.

    python benchmarks/timing/gemv.py          # writes benchmarks/results/gemv/<device>.{json,md}
    python benchmarks/timing/gemv.py --sweep  # also times other launch rules (kernels/gemv.py's BLOCK_N, MAX_BLOCK_K)

Shapes: the projections of the long-context benchmarks' models (hidden 1024): Mamba-2's in_proj (1024 -> 4384) and
out_proj (2048 -> 1024), a SwiGLU MLP's gate and up (1024 -> 2 x 2816, with the gate: ours one kernel, cuBLAS two
products and two elementwise kernels) and down (2816 -> 1024). Each timing is a CUDA graph of calls over 16 copies
of the weights (more bytes than the L2 cache holds, as a model's 24 layers are), median of do_bench's replays,
divided by 16. The floor is one read of the weight at the rate a device-to-device copy moves bytes (read plus
written) here (benchmarks/common.py's measured_copy_bandwidth).
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from ssm_hub.kernels import gemv
from ssm_hub.ops.linear import linear, swiglu_linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import measured_copy_bandwidth, result_stem, results_dir, time_ms

COPIES = 16
SHAPES = {  # name: (out_features, in_features, swiglu)
    "mamba2 in_proj": (4384, 1024, False),
    "mamba2 out_proj": (1024, 2048, False),
    "mlp gate + up": (2816, 1024, True),
    "mlp down": (1024, 2816, False),
}
RULES = {"BLOCK_N": (4, 8, 16, 32), "MAX_BLOCK_K": (512, 1024, 2048, 4096)}


def graph_us(calls) -> float:
    """Median microseconds of one call: ``calls`` (one per weight copy) captured in one CUDA graph."""
    for call in calls:  # compile and warm up outside the graph
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return time_ms(graph.replay) * 1e3 / len(calls)


def calls(name: str, weights, x, ours: bool):
    if SHAPES[name][2]:
        if ours:
            return [lambda w=w: swiglu_linear(x, *w, backend="triton") for w in weights]
        return [lambda w=w: F.silu(F.linear(x, w[0])) * F.linear(x, w[1]) for w in weights]
    if ours:
        return [lambda w=w: linear(x, w[0], backend="triton") for w in weights]
    return [lambda w=w: F.linear(x, w[0]) for w in weights]


def sweep(inputs) -> list[dict]:
    """Every rule of the family (kernels/gemv.py's constants) on every shape; the committed rule is restored."""
    committed = {constant: getattr(gemv, constant) for constant in RULES}
    results = []
    for values in itertools.product(*RULES.values()):
        rule = dict(zip(RULES, values))
        for constant, value in rule.items():
            setattr(gemv, constant, value)
        times = {name: graph_us(calls(name, weights, x, ours=True)) for name, (weights, x) in inputs.items()}
        results.append({**rule, "us": times, "total_us": sum(times.values())})
        print(json.dumps(results[-1]), flush=True)
    for constant, value in committed.items():
        setattr(gemv, constant, value)
    return sorted(results, key=lambda result: result["total_us"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time every launch rule of the family")
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    bandwidth = measured_copy_bandwidth()
    inputs = {}
    for name, (out_features, in_features, swiglu) in SHAPES.items():
        weights = [[torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * in_features**-0.5
                    for _ in range(2 if swiglu else 1)] for _ in range(COPIES)]
        inputs[name] = (weights, torch.randn(1, 1, in_features, device="cuda", dtype=torch.bfloat16))
    rows = []
    with torch.no_grad():
        swept = sweep(inputs) if args.sweep else None
        for name, (weights, x) in inputs.items():
            ours, cublas = calls(name, weights, x, ours=True), calls(name, weights, x, ours=False)
            error = (ours[0]().float() - cublas[0]().float()).norm() / cublas[0]().float().norm()
            ours_us, cublas_us = graph_us(ours), graph_us(cublas)
            weight_bytes = sum(w.numel() * w.element_size() for w in weights[0])
            rows.append({"projection": name, "out_features": SHAPES[name][0], "in_features": SHAPES[name][1],
                         "cublas_us": cublas_us, "ours_us": ours_us, "speedup": cublas_us / ours_us,
                         "floor_us": weight_bytes / bandwidth * 1e6, "relative_error": error.item()})
            print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name()
    stem = result_stem(device)
    rule = {constant: getattr(gemv, constant) for constant in RULES}
    report = {"benchmark": "gemv", "device": device, "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_bytes_per_second": bandwidth, "rule": rule, "rows": rows, "sweep": swept}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Decoding's projections on one row, {device}, bf16: ours (one Triton kernel; rule {rule}) against "
             f"cuBLAS; weights read from memory (16 copies); floor = one read of the weight at the copy rate "
             f"({bandwidth / 1e12:.2f} TB/s read plus written)", "",
             "| projection | cuBLAS (us) | ours (us) | speed-up | floor (us) | ours / floor | relative error |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['projection']} | {row['cublas_us']:.2f} | {row['ours_us']:.2f} | {row['speedup']:.2f}x "
                     f"| {row['floor_us']:.2f} | {row['ours_us'] / row['floor_us']:.2f} "
                     f"| {row['relative_error']:.1e} |")
    if swept:
        lines += ["", "Launch rules, fastest first (sum over the four projections, us): " + "; ".join(
            f"{result['BLOCK_N']}/{result['MAX_BLOCK_K']}: {result['total_us']:.1f}"
            for result in swept[:8]) + " (BLOCK_N/MAX_BLOCK_K)"]
    lines += ["", f"Command: `python benchmarks/timing/gemv.py{' --sweep' if args.sweep else ''}`"]
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
