"""Sequence scans (Mamba-2 SSD, Mamba-1 selective scan) against mamba_ssm, fla and the HBM floor, on one CUDA GPU.

All candidates run in one process, in the same run.

What is timed (issue "Triton kernels", Benchmarks):

- Mamba-2 SSD chunked scan at the shapes of SSD_SHAPES: the 130M model's (24 heads x head_dim 64, state 128, one
  group) at B8 x L2048, B4 x L8192 and B2 x L32768, and the shapes of larger models (Nemotron-H-8B's mixer: 128 heads,
  8 groups, with z), a small state with groups, a 2.7B-class model at 64K tokens and short rows. Chunk 256; x / dt /
  B / C / z in bf16, A / D / dt_bias in fp32, dt_softplus on. Candidates: ssm_hub ``ssd_chunked_scan``
  backend="triton" and backend="torch" (the reference), mamba_ssm 2.3.x ``mamba_chunk_scan_combined`` and fla
  ``chunk_simple_gla`` (forward only; the equivalent linear-attention form, for the shapes without z).
- Mamba-1 selective scan at the shapes of MAMBA1_SHAPES (a 130M-class d_inner 1536 at B8 x L2048, Falcon-Mamba-7B's
  d_inner 5120 at B2 x L16384), state 16, with z and delta_bias (delta_softplus on): ssm_hub ``selective_scan``
  backend="triton" and backend="torch" (where it fits in memory), and mamba_ssm's CUDA ``selective_scan_fn`` only
  when ``selective_scan_cuda`` is a real build (benchmarks/tools/build_cuda_baselines.py), not the empty stub of
  benchmarks/README.md.

Each candidate is timed forward and forward+backward (backward of its outputs against pre-made gradient tensors) with
``triton.testing.do_bench`` (median). A candidate that cannot run is kept in the table with the reason ("no backward
kernel yet", "out of memory", "not installed: ..."). Every shape also gets its HBM floor: the bytes of the inputs
read once plus the outputs written once (forward+backward: plus the output gradient read once and every input
gradient written once), over the copy bandwidth (measured_copy_bandwidth of benchmarks/common.py). Ratios are
speed-ups against mamba_ssm (its time / the candidate's; above 1 is faster), and for Mamba-1 also against our torch
reference.

mamba_ssm without its CUDA build: see benchmarks/README.md (its source package on PYTHONPATH with an empty
``selective_scan_cuda`` module). fla: ``pip install flash-linear-attention``.

    python benchmarks/timing/scans.py                    # all; writes benchmarks/results/scans/<device>.{json,md,png}
    python benchmarks/timing/scans.py --shapes B8xL2048  # a subset of the shapes (several allowed, either scan)
    python benchmarks/timing/scans.py --cases ssd        # only the SSD scan (or: mamba1)
"""

import argparse
import json
import math
import platform
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import free_memory, graph_ms, measured_copy_bandwidth, result_stem, results_dir, time_ms



class SsdShape(NamedTuple):
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    state: int
    groups: int
    gate: bool  # with z, as layers that gate inside the scan call it
    like: str


class Mamba1Shape(NamedTuple):
    batch: int
    seq_len: int
    dim: int
    state: int
    like: str


SSD_SHAPES = {
    "B8xL2048": SsdShape(8, 2048, 24, 64, 128, 1, False, "130M"),
    "B4xL8192": SsdShape(4, 8192, 24, 64, 128, 1, False, "130M, longer rows"),
    "B2xL32768": SsdShape(2, 32768, 24, 64, 128, 1, False, "130M, long rows"),
    "B4xL2048_H128_G8": SsdShape(4, 2048, 128, 64, 128, 8, True, "Nemotron-H-8B mixer"),
    "B4xL4096_H32_N64_G8": SsdShape(4, 4096, 32, 64, 64, 8, True, "small state, groups"),
    "B1xL65536_H48": SsdShape(1, 65536, 48, 64, 128, 1, False, "2.7B-class, long context"),
    "B16xL512_z": SsdShape(16, 512, 24, 64, 128, 1, True, "short rows"),
}
MAMBA1_SHAPES = {
    "B8xL2048_D1536": Mamba1Shape(8, 2048, 1536, 16, "130M-class"),
    "B2xL16384_D5120": Mamba1Shape(2, 16384, 5120, 16, "Falcon-Mamba-7B width"),
}
CHUNK = 256

BASELINE = "mamba_ssm"  # the candidate name prefix ratios are taken against
NO_BACKWARD = "no backward kernel yet"


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def time_graph_ms(fn) -> float | None:
    """:func:`graph_ms` of ``fn``, or None when ``fn`` cannot be captured: the other candidates keep their numbers."""
    try:
        return graph_ms(fn)
    except Exception:  # a candidate that syncs with the host or allocates outside the graph pool
        return None


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def tensors_of(output):
    """The tensors among a candidate's outputs (fla returns (o, None))."""
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in output if isinstance(t, torch.Tensor)]


def measure(make_forward, leaves, grads=None, backward=True) -> dict:
    """Time one candidate forward, then forward+backward.

    ``make_forward(requires_grad)`` returns (callable, reference output or None); with ``requires_grad`` the callable
    reads ``leaves`` (which require grad). ``grads``: pre-made output gradients, built here from the first forward's
    outputs when None. Each mode's status is "ok", the reason it cannot run, or "out of memory".
    """
    result = {}
    for mode in ("forward", "forward_backward"):
        if mode == "forward_backward" and not backward:
            result[mode] = {"status": "not timed (forward only)"}
            continue
        free_memory()
        try:
            fn = make_forward(mode == "forward_backward")
            if mode == "forward":
                timed = fn
                grad_to_none = None
            else:
                outputs = tensors_of(fn())  # raises here when the candidate has no backward
                out_grads = grads if grads is not None else [torch.randn_like(o) for o in outputs]
                del outputs

                def timed(fn=fn, out_grads=out_grads):
                    torch.autograd.backward(tensors_of(fn()), out_grads)

                grad_to_none = leaves
            ms = time_ms(timed, grad_to_none=grad_to_none)
            peak = torch.cuda.max_memory_allocated() / 2**30
            result[mode] = {"status": "ok", "ms": ms, "graph_ms": time_graph_ms(timed), "peak_memory_gib": peak}
        except torch.cuda.OutOfMemoryError as error:
            result[mode] = {"status": "out of memory", "error": str(error).splitlines()[0]}
        except NotImplementedError as error:
            message = str(error)
            if mode == "forward_backward" and "backward" in message:
                status = NO_BACKWARD
            else:  # ssm_hub's messages read "backend='triton' was requested for <op>, but <reason>. Use ..."
                status = "not implemented: " + message.split(", but ", 1)[-1].split(". ", 1)[0]
            result[mode] = {"status": status, "error": message}
        except Exception as error:  # keep the other candidates' numbers; the reason goes in the table
            result[mode] = {"status": f"error: {type(error).__name__}", "error": str(error)[:500]}
        finally:
            fn = timed = None
            for leaf in leaves:
                leaf.grad = None
        free_memory()
    return result


def relative_error(output, reference) -> float:
    output, reference = output.float(), reference.float()
    return ((output - reference).norm() / reference.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------------
# Optional baselines: (callable or None, "why not" or None, version or None)


def load_mamba_ssm_chunk_scan():
    try:
        import mamba_ssm
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as error:  # not installed, or its import chain needs a CUDA build
        return None, f"not installed or not importable: {type(error).__name__}: {error}", None
    return mamba_chunk_scan_combined, None, getattr(mamba_ssm, "__version__", "unknown")


def load_fla_simple_gla():
    try:
        import fla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as error:
        return None, f"not installed or not importable: {type(error).__name__}: {error}", None
    return chunk_simple_gla, None, getattr(fla, "__version__", "unknown")


def load_mamba_ssm_cuda_selective_scan():
    """mamba_ssm's ``selective_scan_fn`` only when ``selective_scan_cuda`` is a real build, not the empty stub."""
    try:
        import selective_scan_cuda
    except Exception as error:
        return None, f"selective_scan_cuda not importable (CUDA extension not built): {type(error).__name__}: {error}"
    if not all(hasattr(selective_scan_cuda, name) for name in ("fwd", "bwd")):
        where = getattr(selective_scan_cuda, "__file__", "?")
        return None, f"selective_scan_cuda at {where} is a stub without fwd/bwd: mamba_ssm's CUDA scan is not built"
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:
        return None, f"mamba_ssm not importable: {type(error).__name__}: {error}"
    return selective_scan_fn, None


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-2 SSD chunked scan


def inverse_softplus(y):
    return y + torch.log(-torch.expm1(-y))


def ssd_inputs(shape: SsdShape):
    """Inputs as a Mamba-2 layer makes them: softplus(dt + dt_bias) in [1e-3, 0.1], A in [-16, -1]."""
    batch, seq_len, heads, head_dim, state, groups = shape[:6]
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    dt_init = torch.exp(torch.empty(heads, device="cuda").uniform_(math.log(1e-3), math.log(0.1)))
    inputs = dict(
        x=torch.randn(batch, seq_len, heads, head_dim, **bf16),
        dt=(torch.randn(batch, seq_len, heads, device="cuda") * 0.5).to(torch.bfloat16),
        A=-torch.empty(heads, device="cuda").uniform_(1, 16),
        B=torch.randn(batch, seq_len, groups, state, **bf16),
        C=torch.randn(batch, seq_len, groups, state, **bf16),
        D=torch.randn(heads, device="cuda"),
        dt_bias=inverse_softplus(dt_init),
    )
    if shape.gate:
        inputs["z"] = torch.randn(batch, seq_len, heads, head_dim, **bf16)
    return inputs


def ssd_floor_bytes(inputs) -> tuple[int, int]:
    """(forward, forward+backward) bytes: inputs read, y written; fwd+bwd adds dy read, each input gradient written."""
    input_bytes = nbytes(*inputs.values())
    output_bytes = nbytes(inputs["x"])  # y has x's shape and dtype
    return input_bytes + output_bytes, 2 * (input_bytes + output_bytes)


def ssd_candidates(shape: SsdShape, inputs, leaves):
    """name -> (make_forward(requires_grad) or None, why not, forward only)."""
    from ssm_hub.ops.ssd import ssd_chunked_scan

    def source(requires_grad):
        return leaves if requires_grad else inputs

    def ours(backend):
        def make(requires_grad):
            t = source(requires_grad)
            return lambda: ssd_chunked_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], CHUNK, D=t["D"], z=t.get("z"),
                                            dt_bias=t["dt_bias"], dt_softplus=True, backend=backend)
        return make

    candidates = {
        "ssm_hub triton": (ours("triton"), None, False),
        "ssm_hub torch reference": (ours("torch"), None, False),
    }

    combined, why_not, _ = load_mamba_ssm_chunk_scan()
    if combined is None:
        candidates["mamba_ssm mamba_chunk_scan_combined"] = (None, why_not, False)
    else:
        def make_mamba(requires_grad):
            t = source(requires_grad)
            return lambda: combined(t["x"], t["dt"], t["A"], t["B"], t["C"], CHUNK, D=t["D"], z=t.get("z"),
                                    dt_bias=t["dt_bias"], dt_softplus=True)
        candidates["mamba_ssm mamba_chunk_scan_combined"] = (make_mamba, None, False)

    simple_gla, why_not, _ = load_fla_simple_gla()
    if shape.gate:
        candidates["fla chunk_simple_gla (fwd only)"] = (None, "not comparable: fla's simple GLA has no z gate", True)
    elif simple_gla is None:
        candidates["fla chunk_simple_gla (fwd only)"] = (None, why_not, True)
    else:
        # SSD is linear attention with a scalar per-head decay: y_t = sum_{s<=t} (C_t . B_s) exp(sum_{s<r<=t} dt_r A)
        # dt_s x_s. fla's simple GLA computes o_t = sum_{s<=t} scale (q_t . k_s) exp(G_t - G_s) v_s with G the
        # cumulative sum of g, so the equivalent form is q = C, k = B (repeated to the heads), v = x * dt,
        # g = dt * A, scale = 1, with dt already biased and softplus'd. That preparation and the D skip (fla has none)
        # are done outside the timed call, so fla does slightly less work than the others. fla's backward is not
        # timed: fla refuses triton < 3.7.1 on Hopper for its gated backward.
        with torch.no_grad():
            dt = F.softplus(inputs["dt"].float() + inputs["dt_bias"])  # [B, T, H]
            per_group = shape.heads // shape.groups
            fla_inputs = dict(
                q=inputs["C"].repeat_interleave(per_group, dim=2).contiguous(),
                k=inputs["B"].repeat_interleave(per_group, dim=2).contiguous(),
                v=(inputs["x"].float() * dt[..., None]).to(torch.bfloat16),
                g=(dt * inputs["A"]).contiguous(),  # fp32 log-decay per step
            )
            del dt

        def make_fla(requires_grad):
            return lambda: simple_gla(q=fla_inputs["q"], k=fla_inputs["k"], v=fla_inputs["v"], g=fla_inputs["g"],
                                      scale=1.0)
        candidates["fla chunk_simple_gla (fwd only)"] = (make_fla, None, True)
    return candidates


def check_ssd_output(name, make, inputs, reference):
    """Relative error of a candidate's forward against the reference output (catches a wrong mapping)."""
    if reference is None:
        return None
    try:
        with torch.no_grad():
            output = tensors_of(make(False)())[0]
            if name.startswith("fla"):  # fla has no D skip: add it for the comparison only
                output = output.float() + inputs["D"][:, None] * inputs["x"].float()
            return relative_error(output, reference)
    except Exception:  # the timing records why it does not run
        return None
    finally:
        free_memory()


def run_ssd(shape_name, bandwidth) -> list[dict]:
    shape = SSD_SHAPES[shape_name]
    batch, seq_len = shape.batch, shape.seq_len
    torch.manual_seed(0)
    inputs = ssd_inputs(shape)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    floor_fwd, floor_fwd_bwd = ssd_floor_bytes(inputs)
    case = (f"ssd B{batch} L{seq_len} H{shape.heads} P{shape.head_dim} N{shape.state} G{shape.groups} chunk{CHUNK}"
            f"{' z' if shape.gate else ''} ({shape.like})")
    candidates = ssd_candidates(shape, inputs, leaves)

    # The output every candidate is compared with: mamba_ssm's, else our torch reference's.
    reference = None
    for ref_name in ("mamba_ssm mamba_chunk_scan_combined", "ssm_hub torch reference"):
        make = candidates[ref_name][0]
        if make is None:
            continue
        try:
            with torch.no_grad():
                reference = tensors_of(make(False)())[0].float()
            reference_name = ref_name
            break
        except Exception:
            free_memory()
    rows = []
    for name, (make, why_not, forward_only) in candidates.items():
        row = {"benchmark": "ssd_chunked_scan", "shape": shape_name, "case": case, "batch": batch, "seq_len": seq_len,
               "candidate": name,
               "floor_forward_ms": floor_fwd / bandwidth * 1e3,
               "floor_forward_backward_ms": floor_fwd_bwd / bandwidth * 1e3}
        if make is None:
            row.update(forward={"status": why_not}, forward_backward={"status": why_not})
        else:
            if reference is not None and name != reference_name:
                row["relative_error_vs"] = reference_name
                row["relative_error"] = check_ssd_output(name, make, inputs, reference)
            row.update(measure(make, list(leaves.values()), backward=not forward_only))
            if forward_only:
                row["forward_backward"] = {"status": "not timed (fla refuses triton < 3.7.1 on Hopper for its gated "
                                                     "backward)"}
        print(f"{shape_name:>10} | {name:<38} | fwd {describe(row['forward'])} "
              f"| fwd+bwd {describe(row['forward_backward'])}", flush=True)
        rows.append(row)
    del reference
    free_memory()
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Mamba-1 selective scan


def mamba1_inputs(batch, seq_len, dim, state):
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    dt_init = torch.exp(torch.empty(dim, device="cuda").uniform_(math.log(1e-3), math.log(0.1)))
    return dict(
        u=torch.randn(batch, seq_len, dim, **bf16),
        delta=(torch.randn(batch, seq_len, dim, device="cuda") * 0.5).to(torch.bfloat16),
        A=-torch.arange(1, state + 1, device="cuda", dtype=torch.float32).repeat(dim, 1),  # Mamba-1's S4D-real init
        B=torch.randn(batch, seq_len, state, **bf16),
        C=torch.randn(batch, seq_len, state, **bf16),
        D=torch.ones(dim, device="cuda"),
        z=torch.randn(batch, seq_len, dim, **bf16),
        delta_bias=inverse_softplus(dt_init),
    )


def run_mamba1(shape_name, bandwidth) -> list[dict]:
    from ssm_hub.ops.selective_scan import selective_scan

    batch, seq_len, dim, state, like = MAMBA1_SHAPES[shape_name]
    torch.manual_seed(0)
    inputs = mamba1_inputs(batch, seq_len, dim, state)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    input_bytes, output_bytes = nbytes(*inputs.values()), nbytes(inputs["u"])
    floor_fwd, floor_fwd_bwd = input_bytes + output_bytes, 2 * (input_bytes + output_bytes)
    case = f"selective_scan B{batch} L{seq_len} D{dim} N{state} z delta_bias ({like})"

    def ours(backend):
        def make(requires_grad):
            t = leaves if requires_grad else inputs
            return lambda: selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                          delta_bias=t["delta_bias"], delta_softplus=True, backend=backend)
        return make

    candidates = {"ssm_hub triton": (ours("triton"), None), "ssm_hub torch reference": (ours("torch"), None)}
    scan_fn, why_not = load_mamba_ssm_cuda_selective_scan()
    if scan_fn is None:
        candidates["mamba_ssm CUDA selective_scan_fn"] = (None, why_not)
    else:
        # mamba_ssm's layout is [B, D, L] (B/C [B, N, L]), contiguous in L as its Mamba layer produces it: the same
        # values, transposed once outside the timing.
        def channels_first(t):
            return t.transpose(1, 2).contiguous() if t.dim() == 3 else t

        theirs = {k: channels_first(v) for k, v in inputs.items()}
        their_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in theirs.items()}

        def make_mamba(requires_grad):
            t = their_leaves if requires_grad else theirs
            return lambda: scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                                   delta_bias=t["delta_bias"], delta_softplus=True)
        make_mamba.leaves = their_leaves
        candidates["mamba_ssm CUDA selective_scan_fn"] = (make_mamba, None)

    rows = []
    for name, (make, why_not) in candidates.items():
        row = {"benchmark": "selective_scan", "shape": shape_name, "case": case, "batch": batch,
               "seq_len": seq_len, "candidate": name,
               "floor_forward_ms": floor_fwd / bandwidth * 1e3,
               "floor_forward_backward_ms": floor_fwd_bwd / bandwidth * 1e3}
        if make is None:
            row.update(forward={"status": why_not}, forward_backward={"status": why_not})
        else:
            own_leaves = getattr(make, "leaves", leaves)
            row.update(measure(make, list(own_leaves.values())))
        print(f"{shape_name:>10} | {name:<38} | fwd {describe(row['forward'])} "
              f"| fwd+bwd {describe(row['forward_backward'])}", flush=True)
        rows.append(row)
    free_memory()
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Ratios, report


def describe(entry) -> str:
    return f"{entry['ms']:.4f} ms" if entry["status"] == "ok" else entry["status"][:70]


def add_ratios(rows):
    """speedup_vs_mamba_ssm (and, for Mamba-1, speedup_vs_torch_reference) and fraction_of_floor, per mode."""
    for row in rows:
        same = [r for r in rows if r["benchmark"] == row["benchmark"] and r["shape"] == row["shape"]]
        baseline = next((r for r in same if r["candidate"].startswith(BASELINE)), None)
        reference = next((r for r in same if r["candidate"] == "ssm_hub torch reference"), None)
        for mode, floor_key in (("forward", "floor_forward_ms"), ("forward_backward", "floor_forward_backward_ms")):
            entry = row[mode]
            if entry["status"] != "ok":
                continue
            entry["fraction_of_floor"] = row[floor_key] / entry["ms"]
            if baseline is not None and baseline[mode]["status"] == "ok":
                entry["speedup_vs_mamba_ssm"] = baseline[mode]["ms"] / entry["ms"]
                if entry.get("graph_ms") and baseline[mode].get("graph_ms"):
                    entry["graph_speedup_vs_mamba_ssm"] = baseline[mode]["graph_ms"] / entry["graph_ms"]
            if row["benchmark"] == "selective_scan" and reference is not None and reference[mode]["status"] == "ok":
                entry["speedup_vs_torch_reference"] = reference[mode]["ms"] / entry["ms"]


def fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report) -> str:
    lines = [
        f"Sequence scans on {report['device']} (torch {report['torch']}, triton {report['triton']}); measured copy "
        f"bandwidth {report['copy_bandwidth_TBps']:.2f} TB/s. Times are medians in ms: eager (do_bench, as a training "
        "loop calls the op, Python and launch overhead included) and graph (CUDA-graph replays: device time only). "
        "vs mamba_ssm = mamba_ssm's time / the candidate's (above 1 is faster), eager / graph; floor = inputs read "
        "once + outputs written once (fwd+bwd: plus dy read and every input gradient written) over the copy "
        "bandwidth.",
        "",
        f"mamba_ssm: {report['mamba_ssm']}; fla: {report['fla']}; mamba_ssm CUDA selective scan: "
        f"{report['mamba_ssm_cuda_selective_scan']}",
        "",
        "| scan | shape | candidate | fwd ms eager / graph | fwd vs mamba_ssm | fwd floor ms "
        "| fwd+bwd ms eager / graph | fwd+bwd vs mamba_ssm | fwd+bwd floor ms | rel. err. | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        fwd, both = r["forward"], r["forward_backward"]
        notes = []
        if fwd["status"] != "ok" and fwd["status"] == both["status"]:
            notes.append(fwd["status"][:160])
        else:
            for mode, entry in (("fwd", fwd), ("fwd+bwd", both)):
                if entry["status"] != "ok":
                    notes.append(f"{mode}: {entry['status'][:90]}")
                elif "speedup_vs_torch_reference" in entry and r["candidate"] != "ssm_hub torch reference":
                    notes.append(f"{mode} {entry['speedup_vs_torch_reference']:.1f}x torch reference")
        for mode, entry in (("fwd", fwd), ("fwd+bwd", both)):
            if entry["status"] == "ok":
                notes.append(f"{mode} at {entry['fraction_of_floor']:.1%} of floor")
        rel = r.get("relative_error")

        def pair(entry, eager, graph, spec):
            return f"{fmt(entry.get(eager), spec)} / {fmt(entry.get(graph), spec)}"

        lines.append(
            f"| {r['benchmark']} | {r['shape']} | {r['candidate']} "
            f"| {pair(fwd, 'ms', 'graph_ms', '.3f')} "
            f"| {pair(fwd, 'speedup_vs_mamba_ssm', 'graph_speedup_vs_mamba_ssm', '.2f')} "
            f"| {r['floor_forward_ms']:.4f} "
            f"| {pair(both, 'ms', 'graph_ms', '.3f')} "
            f"| {pair(both, 'speedup_vs_mamba_ssm', 'graph_speedup_vs_mamba_ssm', '.2f')} "
            f"| {r['floor_forward_backward_ms']:.4f} | {fmt(rel, '.1e')} | {'; '.join(notes)} |"
        )
    lines += ["", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot written (pip install matplotlib for one)")
        return None
    # The 130M shape at three lengths: one line per candidate.
    rows = [r for r in report["rows"]
            if r["benchmark"] == "ssd_chunked_scan" and SSD_SHAPES[r["shape"]].like.startswith("130M")]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["candidate"] for r in rows):
        points = sorted((r["seq_len"], r["forward"]["ms"]) for r in rows
                        if r["candidate"] == name and r["forward"]["status"] == "ok")
        if points:
            axis.plot(*zip(*points), marker="o", label=name)
    floor = sorted({(r["seq_len"], r["floor_forward_ms"]) for r in rows})
    axis.plot(*zip(*floor), linestyle="--", color="grey", label="HBM floor")
    shapes = sorted({(r["seq_len"], r["shape"]) for r in rows})
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks([s for s, _ in shapes], [label for _, label in shapes])
    axis.set_xlabel("shape (batch x sequence length)")
    axis.set_ylabel("forward time (ms, eager do_bench median)")
    axis.set_title(f"SSD chunked scan forward, 130M shape (H24 P64 N128), bf16\n{report['device']}", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def main():
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--shapes", nargs="+", choices=[*SSD_SHAPES, *MAMBA1_SHAPES],
                        default=[*SSD_SHAPES, *MAMBA1_SHAPES], help="shapes to run (default: all)")
    parser.add_argument("--cases", nargs="+", choices=("ssd", "mamba1"), default=["ssd", "mamba1"],
                        help="which scans to time (default: both)")
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/timing/scans.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "nothing was timed")
    import triton

    bandwidth = measured_copy_bandwidth()
    print(f"measured copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in args.shapes:
        if shape in SSD_SHAPES and "ssd" in args.cases:
            rows += run_ssd(shape, bandwidth)
        elif shape in MAMBA1_SHAPES and "mamba1" in args.cases:
            rows += run_mamba1(shape, bandwidth)
    add_ratios(rows)

    device = torch.cuda.get_device_name()
    _, mamba_why, mamba_version = load_mamba_ssm_chunk_scan()
    _, fla_why, fla_version = load_fla_simple_gla()
    _, cuda_scan_why = load_mamba_ssm_cuda_selective_scan()
    report = {
        "benchmark": "scans", "device": device, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "command": " ".join(["python", *sys.argv]),
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "mamba_ssm": mamba_why or mamba_version, "fla": fla_why or fla_version,
        "mamba_ssm_cuda_selective_scan": cuda_scan_why or "built",
        "ssd_shapes": {name: shape._asdict() for name, shape in SSD_SHAPES.items()},
        "ssd_config": {"chunk": CHUNK, "dtypes": "x/dt/B/C/z bf16, A/D/dt_bias fp32", "dt_softplus": True},
        "mamba1_shapes": {name: shape._asdict() for name, shape in MAMBA1_SHAPES.items()},
        "mamba1_config": {"dtypes": "u/delta/B/C/z bf16, A/D/delta_bias fp32", "delta_softplus": True},
        "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device)
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.output / f"{stem}.md").write_text(table)
    print(table)
    png = plot(report, args.output / f"{stem}.png")
    if png is not None:
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
