"""Decode-step kernels against the HBM bandwidth floor and mamba_ssm, in one process on one CUDA GPU.

Shapes (issue "Triton kernels", decode target): Mamba-2 ``ssd_step`` at batch 128, 48 heads x 64 x state 128, and
Mamba-1 ``selective_scan_step`` at batch 128, d_inner 1536 x state 16; x / dt / B / C in bf16, state in fp32.
The state is the only large tensor: the floor is one read and one write of it. Candidates: ours (Triton), our
torch reference, and mamba_ssm's Triton ``selective_state_update`` when mamba_ssm imports (its source package on
PYTHONPATH with an empty ``selective_scan_cuda`` module; see benchmarks/README.md).

    python benchmarks/timing/decode_step.py        # writes benchmarks/results/decode_step/<device>.{json,md}
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from ssm_hub.ops.selective_scan import selective_scan_step
from ssm_hub.ops.ssd import ssd_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import measured_copy_bandwidth, result_stem, results_dir, time_ms


def mamba_ssm_state_update():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception as error:  # not installed, or its import chain needs a CUDA build
        return None, f"{type(error).__name__}: {error}"
    return selective_state_update, None


def ssd_case(batch=128, heads=48, head_dim=64, state_size=128, groups=1):
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    inputs = dict(
        state=torch.randn(batch, heads, head_dim, state_size, device="cuda"),
        x=torch.randn(batch, heads, head_dim, **bf16), dt=torch.randn(batch, heads, **bf16),
        A=-torch.rand(heads, device="cuda") * 4, B=torch.randn(batch, groups, state_size, **bf16),
        C=torch.randn(batch, groups, state_size, **bf16), D=torch.randn(heads, device="cuda"),
        z=torch.randn(batch, heads, head_dim, **bf16), dt_bias=torch.randn(heads, device="cuda"), dt_softplus=True,
    )
    state_bytes = inputs["state"].numel() * 4 * 2

    def ours(backend):
        return lambda: ssd_step(**inputs, backend=backend)

    def theirs(update):
        # mamba_ssm takes per-(head, head_dim) parameters; stride-0 expansions select its tied-head-dim path.
        expanded = dict(
            dt=inputs["dt"][..., None].expand(-1, -1, head_dim), A=inputs["A"][:, None, None].expand(-1, head_dim, state_size),
            D=inputs["D"][:, None].expand(-1, head_dim), dt_bias=inputs["dt_bias"][:, None].expand(-1, head_dim),
        )
        state = inputs["state"].clone()
        return lambda: update(state, inputs["x"], expanded["dt"], expanded["A"], inputs["B"], inputs["C"],
                              expanded["D"], z=inputs["z"], dt_bias=expanded["dt_bias"], dt_softplus=True)

    label = f"ssd_step B{batch} H{heads} P{head_dim} N{state_size}"
    return label, state_bytes, ours, theirs


def selective_case(batch=128, dim=1536, state_size=16):
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    inputs = dict(
        state=torch.randn(batch, dim, state_size, device="cuda"), u=torch.randn(batch, dim, **bf16),
        delta=torch.randn(batch, dim, **bf16), A=-torch.rand(dim, state_size, device="cuda"),
        B=torch.randn(batch, state_size, **bf16), C=torch.randn(batch, state_size, **bf16),
        D=torch.randn(dim, device="cuda"), z=torch.randn(batch, dim, **bf16),
        delta_bias=torch.randn(dim, device="cuda"), delta_softplus=True,
    )
    state_bytes = inputs["state"].numel() * 4 * 2

    def ours(backend):
        return lambda: selective_scan_step(**inputs, backend=backend)

    def theirs(update):
        state = inputs["state"].clone()
        return lambda: update(state, inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], inputs["D"],
                              z=inputs["z"], dt_bias=inputs["delta_bias"], dt_softplus=True)

    return f"selective_scan_step B{batch} D{dim} N{state_size}", state_bytes, ours, theirs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    bandwidth = measured_copy_bandwidth()
    update, why_not = mamba_ssm_state_update()
    rows = []
    for label, state_bytes, ours, theirs in (ssd_case(), selective_case()):
        candidates = {"ssm_hub triton": ours("triton"), "ssm_hub torch reference": ours("torch")}
        if update is not None:
            candidates["mamba_ssm selective_state_update"] = theirs(update)
        for name, fn in candidates.items():
            try:
                ms = time_ms(fn)
            except NotImplementedError as error:
                rows.append({"case": label, "candidate": name, "status": str(error)})
                continue
            achieved = state_bytes / (ms * 1e-3)
            rows.append({"case": label, "candidate": name, "status": "ok", "ms": ms,
                         "state_bandwidth_TBps": achieved / 1e12, "fraction_of_copy_bandwidth": achieved / bandwidth})
    device = torch.cuda.get_device_name()
    report = {"benchmark": "decode_step", "device": device, "torch": torch.__version__,
              "copy_bandwidth_TBps": bandwidth / 1e12, "mamba_ssm": why_not or "imported", "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device)
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Decode-step kernels on {device}; measured copy bandwidth {bandwidth / 1e12:.2f} TB/s "
             "(state bytes = one fp32 read + one fp32 write)", "",
             "| case | candidate | time (ms) | state TB/s | of copy bandwidth |", "|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['case']} | {r['candidate']} | {r['ms']:.4f} | {r['state_bandwidth_TBps']:.2f} | "
                         f"{r['fraction_of_copy_bandwidth']:.0%} |")
        else:
            lines.append(f"| {r['case']} | {r['candidate']} | - | - | {r['status'][:60]} |")
    if why_not:
        lines += ["", f"mamba_ssm not measured: {why_not}"]
    table = "\n".join(lines) + "\n"
    (args.output / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
