"""Routed experts of a mixture-of-experts feed-forward: the public op and its one dispatch point. The math is in
``reference.py``.

Three implementations compute the same values:

- ``"loop"``: the reference, one expert at a time (a gather, three matmuls and a scatter-add per expert).
- ``"grouped_mm"``: dropless grouped matmul. The (token, slot) pairs are sorted by expert so that each expert's
  rows are contiguous, and one ``grouped_mm`` call per projection runs every expert at once on its own rows.
- ``"dense"``: every expert on every token, each output weighted by the token's routing weight for that expert
  (zero where it was not routed): E / k times the loop's matmul work, but no shape depends on the routing, so
  ``torch.compile`` traces it in one graph.

``"auto"`` picks ``grouped_mm`` where torch provides it (``torch.nn.functional.grouped_mm``, else
``torch._grouped_mm``) and it runs forward and backward for the weights' device and dtype (checked once per
device and dtype by a tiny call), and the row sizes suit its kernels (multiples of 16 bytes); else the loop, or,
under ``torch.compile`` and while a CUDA graph is captured (where the loop's data-dependent gathers would break the
graph or wait for the host), ``dense``.
"""

import torch
import torch.nn.functional as F

from ssm_hub.ops.moe.reference import check_inputs, moe_experts_ref
from ssm_hub.ops.varlen import compute_dtype

__all__ = ["moe_experts", "moe_experts_ref", "grouped_mm_supported", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("auto", "loop", "grouped_mm", "dense")

# The grouped GEMM kernels read rows whose byte strides are multiples of this (CPU backward and CUDA alike).
_ROW_ALIGNMENT_BYTES = 16

_SUPPORT: dict[tuple, bool] = {}


def _grouped_mm_function():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    grouped_mm = _grouped_mm_function()
    if grouped_mm is None:
        return False
    try:
        with torch.enable_grad():
            a = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
            b = torch.ones(2, 16, 16, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
            out = grouped_mm(a, b, offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
            out.backward(torch.ones_like(out))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False
    return True


def _capturing(device: torch.device) -> bool:
    """While a CUDA graph is captured on ``device`` (generate's decode step)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _tracing_or_capturing(device: torch.device) -> bool:
    """Under torch.compile, or while a CUDA graph is captured on ``device``: nothing may wait for the host."""
    return torch.compiler.is_compiling() or _capturing(device)


def grouped_mm_supported(device, dtype) -> bool:
    """Whether torch's grouped matmul runs forward and backward on ``device`` in ``dtype`` (probed once, cached)."""
    device = torch.device(device)
    key = (device.type, device.index, dtype)
    if key not in _SUPPORT:
        if _tracing_or_capturing(device):  # the probe can't be traced or captured: those use what eager found
            return False
        _SUPPORT[key] = _probe_grouped_mm(device, dtype)
    return _SUPPORT[key]


def _unsupported_reason(hidden, gate_up_proj, down_proj) -> str | None:
    if _grouped_mm_function() is None:
        return f"this torch ({torch.__version__}) has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    if not grouped_mm_supported(gate_up_proj.device, gate_up_proj.dtype):
        return f"torch's grouped_mm does not run on {gate_up_proj.device.type} in {gate_up_proj.dtype}"
    if _capturing(gate_up_proj.device):
        # torch 2.11's CUDA grouped_mm copies between host and device, which a capture refuses.
        return "torch's grouped_mm cannot be captured in a CUDA graph"
    if torch.compiler.is_compiling() and gate_up_proj.dtype != torch.bfloat16:
        # Its fake (meta) implementation, which torch.compile traces, accepts bf16 only (torch 2.11 to 2.13).
        return f"torch.compile traces grouped_mm in bfloat16 only, got {gate_up_proj.dtype}"
    size = gate_up_proj.element_size()
    sizes = {"H": hidden.shape[1], "I": down_proj.shape[2]}
    misaligned = [f"{name}={n}" for name, n in sizes.items() if n * size % _ROW_ALIGNMENT_BYTES != 0]
    if misaligned:
        return (f"its kernels need rows of a multiple of {_ROW_ALIGNMENT_BYTES} bytes, got {', '.join(misaligned)} "
                f"in {gate_up_proj.dtype}")
    if any(weight.data_ptr() % _ROW_ALIGNMENT_BYTES != 0 for weight in (gate_up_proj, down_proj)):
        return f"its kernels need weights aligned to {_ROW_ALIGNMENT_BYTES} bytes"
    return None


def moe_experts(hidden, expert_indices, expert_weights, gate_up_proj, down_proj, implementation="auto"):
    """Routed SwiGLU experts: hidden [T, H], expert_indices / expert_weights [T, k], gate_up_proj [E, 2 * I, H],
    down_proj [E, H, I] -> [T, H] in hidden's dtype.

    Arguments and returns as :func:`ssm_hub.ops.moe.reference.moe_experts_ref`; ``implementation`` is "auto",
    "loop" or "grouped_mm" (see the module docstring). Both implementations take gradients for hidden,
    expert_weights, gate_up_proj and down_proj, and read the weights only inside the call (so a PEFT
    parametrisation of them is honoured).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    check_inputs(hidden, expert_indices, expert_weights, gate_up_proj, down_proj)
    if implementation == "loop":
        return moe_experts_ref(hidden, expert_indices, expert_weights, gate_up_proj, down_proj)
    if implementation == "dense":
        return _moe_experts_dense(hidden, expert_indices, expert_weights, gate_up_proj, down_proj)
    reason = _unsupported_reason(hidden, gate_up_proj, down_proj)
    if reason is None:
        return _moe_experts_grouped_mm(hidden, expert_indices, expert_weights, gate_up_proj, down_proj)
    if implementation == "grouped_mm":
        raise NotImplementedError(f"implementation='grouped_mm' was requested for moe_experts, but {reason}. "
                                  f"Use implementation='loop' or 'auto'.")
    if _tracing_or_capturing(hidden.device):
        # The loop reads each expert's token count on the host, which neither a trace nor a CUDA graph capture
        # (generate's decode step) can do.
        return _moe_experts_dense(hidden, expert_indices, expert_weights, gate_up_proj, down_proj)
    return moe_experts_ref(hidden, expert_indices, expert_weights, gate_up_proj, down_proj)


def _moe_experts_dense(hidden, expert_indices, expert_weights, gate_up_proj, down_proj) -> torch.Tensor:
    """The reference's values with every expert run on every token; inputs already checked."""
    acc_dtype = compute_dtype(hidden, expert_weights, gate_up_proj, down_proj)
    tokens, num_experts = hidden.shape[0], gate_up_proj.shape[0]
    # 1. The routing as a dense [T, E] matrix: token t's weight for expert e, zero where e was not chosen.
    routing = torch.zeros(tokens, num_experts, dtype=acc_dtype, device=hidden.device)
    routing = routing.scatter_add(1, expert_indices.long(), expert_weights.to(acc_dtype))
    # 2. SwiGLU of every expert on every token, in the weights' dtype: [E, T, I] -> [E, T, H].
    gate, up = torch.einsum("th,eoh->eto", hidden.to(gate_up_proj.dtype), gate_up_proj).chunk(2, dim=-1)
    outputs = torch.einsum("eti,ehi->eth", F.silu(gate) * up, down_proj)
    # 3. Weighted sum over the experts, accumulated in float32 (float64 for float64 inputs).
    return torch.einsum("eth,te->th", outputs.to(acc_dtype), routing).to(hidden.dtype)


def _moe_experts_grouped_mm(hidden, expert_indices, expert_weights, gate_up_proj, down_proj) -> torch.Tensor:
    """The reference's values with one grouped matmul per projection; inputs already checked."""
    grouped_mm = _grouped_mm_function()
    tokens, top_k = expert_indices.shape
    num_experts = gate_up_proj.shape[0]
    pairs = expert_indices.reshape(-1).long()  # pair p = (token p // k, slot p % k)

    # 1. Sort the pairs by expert (stable, so each expert's rows stay in token order) and find where each
    #    expert's rows end. The counts come from a scatter-add, not bincount: no copy to the host.
    order = pairs.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=pairs.device)
    counts = counts.scatter_add(0, pairs, torch.ones_like(pairs))
    offs = counts.cumsum(0).to(torch.int32)
    x = hidden.to(gate_up_proj.dtype)[order // top_k]  # [T * k, H], grouped by expert

    # 2. SwiGLU for every expert at once. grouped_mm computes a @ b per group, with b [E, K, N]: the transposed
    #    (column-major) view of the [E, N, K] weights, as for F.linear.
    gate, up = grouped_mm(x, gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offs)

    # 3. Routing weights, in float32 (float64 when an input is float64).
    acc_dtype = compute_dtype(hidden, expert_weights, gate_up_proj, down_proj)
    y = y.to(acc_dtype) * expert_weights.reshape(-1)[order, None].to(acc_dtype)

    # 4. Un-sort with the inverse permutation (a gather, deterministic) and sum each token's k rows.
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    out = y[inverse].reshape(tokens, top_k, -1).sum(dim=1)
    return out.to(hidden.dtype)
