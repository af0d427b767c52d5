"""The selective-scan (Mamba-1) kernels against the reference: forward, final states and every gradient (u, delta, A,
B, C, D, z, delta_bias, initial state, through the final state too), odd sizes, each option alone, seq_idx and
cu_seqlens documents, several blocks of channels, strided inputs, fp32 and bf16, determinism, both scan paths, and
the custom ops' registration."""

import pytest
import torch

from kernel_testing import DEVICE, TOLERANCES, requires_triton
from ssm_hub.ops.selective_scan import selective_scan

pytestmark = requires_triton

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def make_inputs(batch, seqlen, dim, state_size, dtype=torch.float32, options=True, num_states=None, state=True):
    """Random inputs; with ``options`` D, z, delta_bias and softplus; parameters and the state in float32."""
    inputs = dict(
        u=rand(batch, seqlen, dim, seed=0, dtype=dtype),
        delta=rand(batch, seqlen, dim, seed=1, dtype=dtype),
        A=-(torch.rand(dim, state_size, generator=torch.Generator().manual_seed(2)) * 4 + 0.1).to(DEVICE),
        B=rand(batch, seqlen, state_size, seed=3, dtype=dtype),
        C=rand(batch, seqlen, state_size, seed=4, dtype=dtype),
        initial_state=rand(num_states or batch, dim, state_size, seed=5) if state else None,
    )
    if options:
        inputs.update(D=rand(dim, seed=6), z=rand(batch, seqlen, dim, seed=7, dtype=dtype), delta_bias=rand(dim, seed=8),
                      delta_softplus=True)
    else:
        # Without softplus the time steps must stay positive for the state to decay.
        inputs["delta"] = inputs["delta"].abs()
    return inputs


def run(backend, inputs, **varlen):
    """(y, final_state, grads of every tensor input) of a loss that reads y and the final state."""
    leaves = {k: v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y, final = selective_scan(**leaves, return_final_state=True, backend=backend, **varlen)
    loss = (y.float() * rand(*y.shape, seed=10)).sum() + (final * rand(*final.shape, seed=11)).sum()
    loss.backward()
    grads = {k: leaves[k].grad for k in GRAD_NAMES if isinstance(leaves.get(k), torch.Tensor)}
    return y, final, grads


def assert_matches_reference(inputs, tolerances=None, **varlen):
    y, final, grads = run("triton", inputs, **varlen)
    y_ref, final_ref, grads_ref = run("torch", inputs, **varlen)
    tolerances = tolerances or TOLERANCES[inputs["u"].dtype]
    assert y.dtype == y_ref.dtype and final.dtype == final_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **tolerances)
    torch.testing.assert_close(final, final_ref, **tolerances)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == grads_ref[name].dtype, name
        torch.testing.assert_close(grad, grads_ref[name], **tolerances, msg=lambda m: f"d{name}: {m}")


# (batch, T, D, N): T = 1, 63 and 257 as the issue asks (blocks of 32 tokens under the interpreter, 16 on a GPU: a
# single partial block, several with a partial last one); D = 20 at N = 16 is three blocks of channels under the
# interpreter, the last one partial; N = 5 is not a power of two.
@pytest.mark.parametrize("batch, seqlen, dim, state_size", [(2, 1, 20, 16), (2, 63, 20, 16), (1, 257, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(batch, seqlen, dim, state_size, dtype):
    assert_matches_reference(make_inputs(batch, seqlen, dim, state_size, dtype))


def test_kernel_without_options_or_initial_state():
    assert_matches_reference(make_inputs(2, 40, 6, 4, options=False, state=False))


@pytest.mark.parametrize("name", ["D", "z", "delta_bias", "delta_softplus"])
def test_each_option_alone(name):
    # Every option on its own, so that one applied in the wrong place cannot be hidden by another.
    inputs = make_inputs(2, 37, 6, 4, options=False)
    inputs[name] = make_inputs(2, 37, 6, 4)[name]
    if name == "delta_softplus":
        inputs["delta"] = rand(2, 37, 6, seed=1)  # negative deltas too: softplus must matter
    if name == "delta_bias":
        inputs[name] = inputs[name].abs()  # dt = delta + bias stays positive without softplus
    assert_matches_reference(inputs)


def test_kernel_seq_idx_restarts_the_state():
    # Row 0: documents of 1, 30, 1, 33 and 5 tokens, some starting on or next to a block boundary (32 tokens under
    # the interpreter, 16 on a GPU); row 1: 69 tokens then 1. The initial state belongs to each row's first document.
    seq_idx = torch.zeros(2, 70, dtype=torch.int32, device=DEVICE)
    for start in (1, 31, 32, 65):
        seq_idx[0, start:] += 1
    seq_idx[1, 69:] = 7
    assert_matches_reference(make_inputs(2, 70, 6, 4), seq_idx=seq_idx)


def test_packed_documents_equal_separate_runs():
    # A packed row gives each document's outputs and gradients as if it ran alone (from a zero state).
    lengths = [5, 40, 1, 24]
    inputs = make_inputs(1, sum(lengths), 6, 4, state=False)
    upstream = rand(1, sum(lengths), 6, seed=12)

    def outputs_and_grads(inputs, upstream, **varlen):
        leaves = {k: v.clone().requires_grad_(True) if k in ("u", "delta", "z") else v for k, v in inputs.items()}
        y, final = selective_scan(**leaves, return_final_state=True, backend="triton", **varlen)
        (y * upstream).sum().backward()
        return y, final, [leaves[k].grad for k in ("u", "delta", "z")]

    seq_idx = torch.repeat_interleave(torch.arange(4, device=DEVICE), torch.tensor(lengths, device=DEVICE))[None]
    y, final, grads = outputs_and_grads(inputs, upstream, seq_idx=seq_idx)
    start = 0
    for length in lengths:
        piece = {k: v[:, start : start + length] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
        y_doc, final_doc, grads_doc = outputs_and_grads(piece, upstream[:, start : start + length])
        torch.testing.assert_close(y[:, start : start + length], y_doc)
        torch.testing.assert_close([g[:, start : start + length] for g in grads], grads_doc)
        start += length
    # The row's final state is its last document's.
    torch.testing.assert_close(final, final_doc)


def test_kernel_cu_seqlens_documents_have_their_own_states():
    # Documents of 1, 31, 1, 31, 6 and 2 tokens, each with its own initial and final state.
    cu_seqlens = torch.tensor([0, 1, 32, 33, 64, 70, 72], dtype=torch.int32, device=DEVICE)
    assert_matches_reference(make_inputs(1, 72, 6, 4, num_states=6), cu_seqlens=cu_seqlens)
    assert_matches_reference(make_inputs(1, 72, 6, 4, state=False), cu_seqlens=cu_seqlens)


def test_kernel_bf16_with_documents():
    seq_idx = torch.zeros(2, 50, dtype=torch.int64, device=DEVICE)
    seq_idx[:, 20:] = 1
    assert_matches_reference(make_inputs(2, 50, 6, 4, dtype=torch.bfloat16), seq_idx=seq_idx)


def test_kernel_takes_strided_inputs():
    # As the Mamba mixer passes them: u and z halves of in_proj's output, delta / B / C slices of x_proj's, all
    # [B, T, *] views with a non-unit stride somewhere; A and the initial state transposed buffers.
    batch, seqlen, dim, state_size = 2, 40, 5, 3
    in_proj = rand(batch, seqlen, 2 * dim, seed=20).requires_grad_(True)
    x_proj = rand(batch, seqlen, dim + 2 * state_size + 1, seed=21).requires_grad_(True)
    A_buffer = (-torch.rand(state_size, dim) - 0.1).to(DEVICE).requires_grad_(True)
    state_buffer = rand(batch, state_size, dim, seed=22).requires_grad_(True)
    D, delta_bias = rand(dim, seed=23).requires_grad_(True), rand(dim, seed=24).requires_grad_(True)
    leaves = (in_proj, x_proj, A_buffer, state_buffer, D, delta_bias)
    outputs = {}
    for backend in ("triton", "torch"):
        for leaf in leaves:
            leaf.grad = None
        u, z = in_proj[..., :dim], in_proj[..., dim:]
        delta, B, C = x_proj[..., :dim], x_proj[..., dim : dim + state_size], x_proj[..., dim + state_size : -1]
        A, state = A_buffer.t(), state_buffer.transpose(1, 2)
        assert not any(t.is_contiguous() for t in (u, z, delta, B, C, A, state))
        y, final = selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                  initial_state=state, return_final_state=True, backend=backend)
        upstream = rand(batch, seqlen, 2 * dim, seed=25)[..., ::2]  # an upstream gradient that is itself strided
        ((y * upstream).sum() + final.square().sum()).backward()
        outputs[backend] = (y, final, *[leaf.grad for leaf in leaves])
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


def test_kernel_is_deterministic():
    cu_seqlens = torch.tensor([0, 5, 50, 70], device=DEVICE)
    inputs = make_inputs(1, 70, 20, 16, num_states=3)
    first, second = run("triton", inputs, cu_seqlens=cu_seqlens), run("triton", inputs, cu_seqlens=cu_seqlens)
    for a, b in zip([*first[:2], *first[2].values()], [*second[:2], *second[2].values()]):
        assert torch.equal(a, b)


def test_kernel_forward_only_and_final_state_only_gradients():
    inputs = make_inputs(2, 9, 4, 3)
    with torch.no_grad():
        y, final = selective_scan(**inputs, return_final_state=True, backend="triton")
    y_ref, final_ref = selective_scan(**inputs, return_final_state=True, backend="torch")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)
    # A loss on the final state alone still reaches every input.
    grads = {}
    for backend in ("triton", "torch"):
        leaves = {k: v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        _, final = selective_scan(**leaves, return_final_state=True, backend=backend)
        final.sum().backward()
        # C does not reach the final state: the reference leaves its gradient None, the kernel returns zeros.
        grads[backend] = [leaves[k].grad for k in GRAD_NAMES if k not in ("C", "D", "z")]
        grads[backend].append(torch.zeros_like(inputs["C"]) if leaves["C"].grad is None else leaves["C"].grad)
    torch.testing.assert_close(grads["triton"], grads["torch"])


@pytest.mark.parametrize("varlen", ["none", "cu_seqlens"])
def test_associative_scan_path_matches_the_sequential_one(varlen):
    # Under the interpreter the kernels scan row by row (tl.associative_scan runs one element at a time there); on a
    # GPU they use tl.associative_scan. Both paths, forward and backward, on one small case.
    from ssm_hub.kernels.selective_scan import selective_scan_bwd, selective_scan_fwd

    cu_seqlens = torch.tensor([0, 1, 33, 40], device=DEVICE) if varlen == "cu_seqlens" else None
    inputs = make_inputs(1, 40, 3, 2, num_states=3 if cu_seqlens is not None else None)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus",
                                "initial_state")]
    dy, dfinal = rand(1, 40, 3, seed=30), rand(inputs["initial_state"].shape[0], 3, 2, seed=31)
    results = {}
    for sequential in (True, False):
        y, final, checkpoints = selective_scan_fwd(*args, None, cu_seqlens, sequential_scan=sequential)
        grads = selective_scan_bwd(*args, None, cu_seqlens, checkpoints, dy, dfinal, sequential_scan=sequential)
        results[sequential] = (y, final, checkpoints, *grads)
    for got, expected in zip(results[False], results[True]):
        torch.testing.assert_close(got, expected, **TOLERANCES[torch.float32])


def test_custom_ops_are_registered_for_compile_and_autograd():
    # Schema, fake implementations (the shapes torch.compile traces with), autograd registration, AOT dispatch.
    inputs = make_inputs(1, 7, 3, 2, num_states=2)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    tensors = [inputs[k].clone().requires_grad_(True) for k in names]
    state = inputs["initial_state"].clone().requires_grad_(True)
    cu_seqlens = torch.tensor([0, 2, 7], device=DEVICE)
    torch.library.opcheck(torch.ops.ssm_hub.selective_scan_fwd.default,
                          (*tensors, True, state, None, cu_seqlens, True))
    y, final, checkpoints = torch.ops.ssm_hub.selective_scan_fwd(*tensors, True, state, None, cu_seqlens, True)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1, 1]], device=DEVICE)
    _, _, row_checkpoints = torch.ops.ssm_hub.selective_scan_fwd(
        *tensors, False, state[:1], seq_idx, None, True
    )
    torch.library.opcheck(
        torch.ops.ssm_hub.selective_scan_bwd.default,
        (*[t.detach() for t in tensors], False, state[:1].detach(), seq_idx, None, row_checkpoints,
         rand(1, 7, 3, seed=40), None),
    )
