"""Where the scans' time goes, kernel by kernel, and a sweep of their launch settings, on one CUDA GPU.

    python benchmarks/profiles/profile_scans.py --case ssd     # Mamba-2 SSD, B8 x L2048, 24 heads x 64, state 128
    python benchmarks/profiles/profile_scans.py --case mamba1  # Mamba-1 selective scan, B8 x L2048, d_inner 1536, N 16
    python benchmarks/profiles/profile_scans.py --case ssd --no-sweep --output /tmp/out

For ours and for the baseline (mamba_ssm's ``mamba_chunk_scan_combined`` for SSD; our torch reference for Mamba-1,
whose mamba_ssm kernel is CUDA-only; benchmarks/timing/scans.py compares everything at every shape), it times a
forward and a forward+backward two ways, eagerly with do_bench and as CUDA-graph replays (which removes the Python
and launch overhead both pay), and lists the CUDA kernels of each with their device times from torch.profiler. The
sweep walks the tuning knobs of ``ssm_hub.kernels`` one at a time (coordinate descent from the current values) on
the graph-replay times and reports the best value of each; the defaults in those modules come from its output.
mamba_ssm without its CUDA build: see benchmarks/README.md. Writes
benchmarks/results/profile_scans/<device>_<case>_b<batch>_l<seqlen>[_gate].json (``--output``: another folder),
updated as each timing comes in.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from ssm_hub.ops.selective_scan import selective_scan
from ssm_hub.ops.ssd import ssd_chunked_scan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import graph_ms, result_stem, results_dir, time_ms

HEADS, HEAD_DIM, STATE, GROUPS, CHUNK = 24, 64, 128, 1, 256
MAMBA1_DIM, MAMBA1_STATE = 1536, 16


def ssd_inputs(batch, seqlen, gate):
    device, bf16 = "cuda", torch.bfloat16
    inputs = dict(
        x=torch.randn(batch, seqlen, HEADS, HEAD_DIM, device=device, dtype=bf16),
        dt=torch.randn(batch, seqlen, HEADS, device=device, dtype=bf16) - 2,
        A=-torch.rand(HEADS, device=device) * 8 - 1,
        B=torch.randn(batch, seqlen, GROUPS, STATE, device=device, dtype=bf16),
        C=torch.randn(batch, seqlen, GROUPS, STATE, device=device, dtype=bf16),
        D=torch.randn(HEADS, device=device), dt_bias=torch.randn(HEADS, device=device) * 0.1,
    )
    if gate:
        inputs["z"] = torch.randn(batch, seqlen, HEADS, HEAD_DIM, device=device, dtype=bf16)
    return inputs


def mamba1_inputs(batch, seqlen, gate):
    device, bf16 = "cuda", torch.bfloat16
    inputs = dict(
        u=torch.randn(batch, seqlen, MAMBA1_DIM, device=device, dtype=bf16),
        delta=torch.randn(batch, seqlen, MAMBA1_DIM, device=device, dtype=bf16) - 2,
        A=-torch.arange(1, MAMBA1_STATE + 1, device=device, dtype=torch.float32).repeat(MAMBA1_DIM, 1),
        B=torch.randn(batch, seqlen, MAMBA1_STATE, device=device, dtype=bf16),
        C=torch.randn(batch, seqlen, MAMBA1_STATE, device=device, dtype=bf16),
        D=torch.randn(MAMBA1_DIM, device=device), delta_bias=torch.randn(MAMBA1_DIM, device=device) * 0.1,
    )
    if gate:
        inputs["z"] = torch.randn(batch, seqlen, MAMBA1_DIM, device=device, dtype=bf16)
    return inputs


def candidate(call, inputs, backward):
    """A callable running ``call(**leaves)`` (and its backward against a fixed output gradient)."""
    leaves = {k: v.detach().requires_grad_(backward) for k, v in inputs.items()}
    first = call(**leaves)
    dy = torch.randn_like(first)
    del first

    def run():
        y = call(**leaves)
        if backward:
            torch.autograd.backward(y, dy, inputs=list(leaves.values()))
            for leaf in leaves.values():
                leaf.grad = None
    return run


def ssd_candidates():
    def ours(backend):
        return lambda **t: ssd_chunked_scan(**t, chunk_size=CHUNK, dt_softplus=True, backend=backend)

    found = {"ours": ours("triton")}
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        found["mamba_ssm"] = lambda x, dt, A, B, C, D, dt_bias, z=None: mamba_chunk_scan_combined(
            x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    except ImportError as error:
        print("mamba_ssm not importable:", error)
    return found


def mamba1_candidates():
    def ours(backend):
        return lambda **t: selective_scan(**t, delta_softplus=True, backend=backend)

    return {"ours": ours("triton"), "torch_reference": ours("torch")}


def kernel_profile(fn) -> list[tuple[str, float]]:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5 / 1000) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def ssd_knobs():
    import ssm_hub.kernels.ssd_chunked_scan as fwd
    import ssm_hub.kernels.ssd_chunked_scan_bwd as bwd

    launches = [(4, 1), (4, 2), (8, 1), (8, 2)]
    knobs = {"STATE_BLOCK_P": (fwd, None, [32, 64]), "STATE_BLOCK_N": (fwd, None, [32, 64])}
    knobs.update({f"fwd.{k}": (fwd, k, launches) for k in ("state", "output")})
    knobs.update({f"bwd.{k}": (bwd, k, launches) for k in ("dx_bwd", "dB_dC_bwd")})
    return knobs


def mamba1_knobs():
    import ssm_hub.kernels.selective_scan as scan

    return {
        "_GPU_CHUNK": (scan, None, [16, 32]),
        "fwd": (scan, "fwd", [(16, 8192, 8), (16, 4096, 4), (32, 8192, 8), (8, 4096, 4), (16, 16384, 8)]),
        "bwd": (scan, "bwd", [(16, 4096, 8), (16, 2048, 4), (16, 8192, 8), (8, 2048, 4)]),
    }


def set_knob(module, key, name, value):
    if key is None:
        setattr(module, name, value)
    elif hasattr(module, "LAUNCH"):
        module.LAUNCH[key] = value
    else:
        module._GPU_TILE[key] = value


def sweep(knobs, ours, inputs) -> dict:
    log = {}
    for name, (module, key, values) in knobs.items():
        timings = {}
        for value in values:
            set_knob(module, key, name, value)
            try:
                timings[str(value)] = (graph_ms(candidate(ours, inputs, False)),
                                       graph_ms(candidate(ours, inputs, True)))
            except Exception as error:  # a setting that does not compile (registers, shared memory)
                timings[str(value)] = repr(error)[:200]
        ok = {v: t for v, t in timings.items() if isinstance(t, tuple)}
        forward_only = name.startswith("fwd.") or name.startswith("STATE_")
        best = min(ok, key=lambda v: ok[v][0] if forward_only else ok[v][1])
        set_knob(module, key, name, next(v for v in values if str(v) == best))
        log[name] = {"best": best, "timings": timings}
        print(f"{name} -> {best}  (forward, forward+backward ms) {ok[best]}", flush=True)
    return log


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("ssd", "mamba1"), default="ssd")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--gate", action="store_true", help="with z")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--output", type=Path, default=results_dir(__file__), help="folder for the JSON report")
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = (ssd_inputs if args.case == "ssd" else mamba1_inputs)(args.batch, args.seqlen, args.gate)
    candidates = ssd_candidates() if args.case == "ssd" else mamba1_candidates()
    report = {"device": torch.cuda.get_device_name(), "args": {k: str(v) for k, v in vars(args).items()}}
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / (result_stem(report["device"], args.case, f"b{args.batch}_l{args.seqlen}",
                                      "gate" if args.gate else "") + ".json")

    def measure(tag):
        for name, call in candidates.items():
            for backward in (False, True):
                mode = "forward_backward" if backward else "forward"
                fn = candidate(call, inputs, backward)
                entry = {}
                for timer, time in (("eager_ms", time_ms), ("graph_ms", graph_ms)):
                    try:
                        entry[timer] = time(fn)
                    except Exception as error:  # e.g. a baseline that cannot be captured in a graph
                        entry[timer] = float("nan")
                        entry[f"{timer}_error"] = repr(error)[:200]
                if tag == "before":
                    entry["kernels"] = kernel_profile(fn)
                report[f"{tag}.{name}.{mode}"] = entry
                path.write_text(json.dumps(report, indent=1))
                print(f"[{tag}] {name} {mode}: eager {entry['eager_ms']:.3f} ms, graph {entry['graph_ms']:.3f} ms")
                for kernel, ms in entry.get("kernels", [])[:10]:
                    print(f"      {ms:8.3f} ms  {kernel[:90]}")

    measure("before")
    if not args.no_sweep:
        report["sweep"] = sweep(ssd_knobs() if args.case == "ssd" else mamba1_knobs(), candidates["ours"], inputs)
        measure("after")
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
