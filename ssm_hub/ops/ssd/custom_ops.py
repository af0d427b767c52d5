"""The SSD kernels registered as torch custom ops (``torch.ops.ssm_hub.*``), with fake implementations so that
``torch.compile`` traces through them without graph breaks. Registering needs no triton; the kernels are imported
when an op first runs."""

import torch

from ssm_hub.ops.device import on_input_device
from ssm_hub.ops.kernel_op import contiguous, kernel_op


@kernel_op("ssm_hub::ssd_step", mutates_args=())
@on_input_device
def ssd_step_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    state_indices: torch.Tensor | None,
    A_is_log: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ssm_hub.kernels.ssd_step import ssd_step_fwd

    A, D, dt_bias, state_indices = contiguous(A, D, dt_bias, state_indices)
    return ssd_step_fwd(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, state_indices, A_is_log)


@ssd_step_triton.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, state_indices, A_is_log):
    batch, heads, head_dim = x.shape
    return torch.empty_like(x), x.new_empty((batch, heads, head_dim, B.shape[-1]), dtype=torch.float32)


@kernel_op("ssm_hub::ssd_step_", mutates_args=("state",))
@on_input_device
def ssd_step_in_place_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    state_indices: torch.Tensor | None,
    A_is_log: bool,
) -> torch.Tensor:
    from ssm_hub.kernels.ssd_step import ssd_step_fwd

    A, D, dt_bias, state_indices = contiguous(A, D, dt_bias, state_indices)
    return ssd_step_fwd(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, state_indices, A_is_log, in_place=True
    )[0]


@ssd_step_in_place_triton.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, state_indices, A_is_log):
    return torch.empty_like(x)


# The chunked scan's optional inputs come back from the backward as empty tensors (a custom op cannot return None).
_SCAN_OPTIONAL = ("D", "z", "dt_bias", "initial_states")


@kernel_op("ssm_hub::ssd_chunked_scan_fwd", mutates_args=())
@on_input_device
def ssd_chunked_scan_fwd_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    doc_mode: int,
    num_final: int,
    A_is_log: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [B, T, H, P] in x's dtype, final states [num_final, H, P, N] float32, then the intermediates the backward
    reads: dt and a [B, H, chunks, L] float32, the states entering each chunk [B, chunks, H, P, N] and the scores
    [B, chunks, G, L, L] in x's dtype); documents as ``ssm_hub.kernels.ssd_chunked_scan`` describes them.
    ``A_is_log``: A is Mamba-2's A_log, and the scan uses A = -exp(A_log)."""
    from ssm_hub.kernels.ssd_chunked_scan import ssd_chunked_scan_fwd

    A, D, dt_bias = contiguous(A, D, dt_bias)
    return ssd_chunked_scan_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
                                initial_states, doc_ids, doc_mode, num_final, A_is_log)


@ssd_chunked_scan_fwd_triton.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, doc_ids, doc_mode,
      num_final, A_is_log=False):
    batch, seqlen, heads, head_dim = x.shape
    groups, state_size = B.shape[2:]
    chunks = -(-seqlen // chunk_size)
    dt_out = x.new_empty((batch, heads, chunks, chunk_size), dtype=torch.float32)
    return (torch.empty_like(x), x.new_empty((num_final, heads, head_dim, state_size), dtype=torch.float32), dt_out,
            torch.empty_like(dt_out), x.new_empty((batch, chunks, heads, head_dim, state_size)),
            C.new_empty((batch, chunks, groups, chunk_size, chunk_size)))


@kernel_op("ssm_hub::ssd_chunked_scan_bwd", mutates_args=())
@on_input_device
def ssd_chunked_scan_bwd_triton(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: torch.Tensor | None,
    doc_ids: torch.Tensor | None,
    doc_mode: int,
    num_final: int,
    dt_out: torch.Tensor,
    cum: torch.Tensor,
    states: torch.Tensor,
    scores: torch.Tensor,
    packed_xBC: bool = False,
    A_is_log: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states); empty tensors for the inputs that are None.
    ``dt_out``, ``cum``, ``states``, ``scores``: the last four outputs of ``ssd_chunked_scan_fwd``.
    ``packed_xBC``: dx, dB and dC come back as one [B, T, H * P + 2 * G * N] tensor in dx's place (dB and dC
    empty), as Mamba-2's conv output holds x, B and C; see ``ssm_hub.kernels.ssd_chunked_scan_bwd``.
    ``A_is_log``: as in ``ssd_chunked_scan_fwd``; dA is then A_log's gradient."""
    from ssm_hub.kernels.ssd_chunked_scan_bwd import ssd_chunked_scan_bwd

    A, D, dt_bias, dfinal = contiguous(A, D, dt_bias, dfinal)
    grads = ssd_chunked_scan_bwd(dy, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min,
                                 dt_max, initial_states, doc_ids, doc_mode, num_final, dt_out, cum, states, scores,
                                 packed_xBC, A_is_log)
    return tuple(grad if grad is not None else x.new_empty(0) for grad in grads)


@ssd_chunked_scan_bwd_triton.register_fake
def _(dy, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, doc_ids,
      doc_mode, num_final, dt_out, cum, states, scores, packed_xBC=False, A_is_log=False):
    def like(tensor):
        return tensor.new_empty(tensor.shape) if tensor is not None else x.new_empty(0)

    if packed_xBC:
        batch, seqlen, heads, head_dim = x.shape
        dxBC = x.new_empty((batch, seqlen, heads * head_dim + 2 * B.shape[2] * B.shape[3]))
        return (dxBC, *(like(t) for t in (dt, A, None, None, D, z, dt_bias, initial_states)))
    return tuple(like(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, doc_ids, doc_mode, \
        num_final, A_is_log = inputs
    _, _, *intermediates = output
    ctx.mark_non_differentiable(*intermediates)
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, doc_ids, *intermediates)
    ctx.options = (chunk_size, dt_softplus, dt_min, dt_max, doc_mode, num_final, A_is_log)


def _backward(ctx, dy, dfinal, *_intermediate_grads):
    x, dt, A, B, C, D, z, dt_bias, initial_states, doc_ids, *intermediates = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max, doc_mode, num_final, A_is_log = ctx.options
    if dy is None:
        dy = torch.zeros_like(x)
    grads = ssd_chunked_scan_bwd_triton(
        dy, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states,
        doc_ids, doc_mode, num_final, *intermediates, False, A_is_log,
    )
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial = grads
    present = dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    optional = dict(zip(_SCAN_OPTIONAL, (dD, dz, ddt_bias, dinitial)))
    optional = {name: grad if present[name] is not None else None for name, grad in optional.items()}
    return (dx, ddt, dA, dB, dC, None, optional["D"], optional["z"], optional["dt_bias"], None, None, None,
            optional["initial_states"], None, None, None, None)


ssd_chunked_scan_fwd_triton.register_autograd(_backward, setup_context=_setup_context)
