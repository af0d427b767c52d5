"""The selective scan (Mamba-1) against the per-token recurrence, varlen semantics, decoding steps, dispatch."""


import pytest
import torch

from conftest import assert_backend_rules
from ssm_hub.backend import triton_available
from ssm_hub.ops import selective_scan, selective_scan_step, ssd_chunked_scan
from ssm_hub.ops.selective_scan import selective_scan_naive_ref, selective_scan_ref

F64 = torch.float64


def make_inputs(batch=2, seqlen=40, dim=3, state_size=4, dtype=F64, features=True, seed=0):
    """Random selective-scan inputs; with ``features`` also D, z, delta_bias + softplus."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype)

    inputs = dict(
        u=rand(batch, seqlen, dim),
        delta=rand(batch, seqlen, dim) if features else torch.rand(batch, seqlen, dim, generator=g).to(dtype),
        A=-(torch.rand(dim, state_size, generator=g, dtype=F64) * 2 + 0.2).to(dtype),
        B=rand(batch, seqlen, state_size),
        C=rand(batch, seqlen, state_size),
    )
    if features:
        inputs.update(D=rand(dim), z=rand(batch, seqlen, dim), delta_bias=rand(dim), delta_softplus=True)
    return inputs


def initial_state_for(inputs, count, seed=1):
    dim, state_size = inputs["A"].shape
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, dim, state_size, generator=g, dtype=F64).to(inputs["u"].dtype)


def rows(inputs, start, end, row=0):
    """The inputs of tokens [start, end) of one row, as a batch of one."""
    out = dict(inputs)
    for name in ("u", "delta", "B", "C", "z"):
        if name in out:
            out[name] = out[name][row : row + 1, start:end]
    return out


def test_two_tokens_by_hand():
    # One channel, two state entries: the recurrence written out, every option on.
    u, delta, z = [torch.tensor(v, dtype=F64) for v in ([0.5, -1.0], [0.3, -0.7], [0.7, -1.3])]
    B, C = torch.tensor([[2.0, 1.0], [1.5, -0.5]], dtype=F64), torch.tensor([[1.0, 0.5], [-2.0, 3.0]], dtype=F64)
    A, h0 = torch.tensor([[-0.8, -2.0]], dtype=F64), torch.tensor([0.4, -0.1], dtype=F64)
    D, delta_bias = torch.tensor([0.25], dtype=F64), torch.tensor([0.2], dtype=F64)
    dt = torch.log1p(torch.exp(delta + delta_bias))
    h1 = torch.exp(dt[0] * A[0]) * h0 + dt[0] * B[0] * u[0]
    h2 = torch.exp(dt[1] * A[0]) * h1 + dt[1] * B[1] * u[1]
    gate = z * torch.sigmoid(z)
    expected = torch.stack([(h1 @ C[0] + D[0] * u[0]) * gate[0], (h2 @ C[1] + D[0] * u[1]) * gate[1]])
    y, final = selective_scan(u.view(1, 2, 1), delta.view(1, 2, 1), A, B[None], C[None], D=D, z=z.view(1, 2, 1),
                              delta_bias=delta_bias, delta_softplus=True, initial_state=h0.view(1, 1, 2),
                              return_final_state=True)
    torch.testing.assert_close(y.flatten(), expected)
    torch.testing.assert_close(final.flatten(), h2)


@pytest.mark.parametrize("seqlen", [1, 63, 257])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_matches_naive(seqlen, chunk_size):
    inputs = make_inputs(seqlen=seqlen)
    h0 = initial_state_for(inputs, 2)
    y, final = selective_scan_ref(**inputs, initial_state=h0, return_final_state=True, chunk_size=chunk_size)
    y_ref, final_ref = selective_scan_naive_ref(**inputs, initial_state=h0, return_final_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)


def test_matches_naive_without_options():
    inputs = make_inputs(seqlen=50, features=False)
    y, final = selective_scan(**inputs, return_final_state=True)
    y_ref, final_ref = selective_scan_naive_ref(**inputs, return_final_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)
    h0 = initial_state_for(inputs, 2)
    assert not torch.allclose(selective_scan(**inputs, initial_state=h0), y)  # the initial state is used


def test_equals_ssd_when_decay_is_shared_by_the_state():
    # With A[d, n] = A[d] for all n, channel d is an SSD head of one channel (P = 1) whose B, C are one group:
    # two independent algorithms for the same recurrence.
    inputs = make_inputs(seqlen=45, dim=3, state_size=4, features=False)
    inputs["A"] = inputs["A"][:, :1].expand(3, 4).contiguous()
    h0 = initial_state_for(inputs, 2)
    y, final = selective_scan(**inputs, initial_state=h0, return_final_state=True)
    y_ssd, final_ssd = ssd_chunked_scan(
        inputs["u"][..., None], inputs["delta"], inputs["A"][:, 0], inputs["B"][:, :, None], inputs["C"][:, :, None],
        chunk_size=16, initial_states=h0[:, :, None], return_final_states=True,
    )
    torch.testing.assert_close(y, y_ssd[..., 0])
    torch.testing.assert_close(final, final_ssd[:, :, 0])


DOCS = {0: [(0, 5), (5, 32), (32, 45)], 1: [(0, 38), (38, 45)]}


def test_seq_idx_packed_row_equals_documents_run_alone():
    inputs = make_inputs(seqlen=45)
    h0 = initial_state_for(inputs, 2)
    seq_idx = torch.zeros(2, 45, dtype=torch.int64)
    for row, docs in DOCS.items():
        for number, (start, end) in enumerate(docs):
            seq_idx[row, start:end] = number + 3  # ids need not start at 0
    y, final = selective_scan(**inputs, initial_state=h0, seq_idx=seq_idx, return_final_state=True)
    for row, docs in DOCS.items():
        for number, (start, end) in enumerate(docs):
            # Only each row's first document starts from the row's initial state.
            alone, alone_final = selective_scan(**rows(inputs, start, end, row),
                                                initial_state=h0[row : row + 1] if number == 0 else None,
                                                return_final_state=True)
            torch.testing.assert_close(y[row : row + 1, start:end], alone)
        torch.testing.assert_close(final[row : row + 1], alone_final)
    y_ref, final_ref = selective_scan_naive_ref(**inputs, initial_state=h0, seq_idx=seq_idx, return_final_state=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)


def test_cu_seqlens_documents_have_their_own_states():
    bounds = [0, 5, 32, 33, 45]
    inputs = rows(make_inputs(seqlen=45), 0, 45)
    h0 = initial_state_for(inputs, len(bounds) - 1)
    y, final = selective_scan(**inputs, initial_state=h0, cu_seqlens=torch.tensor(bounds), return_final_state=True)
    assert final.shape == (len(bounds) - 1, *h0.shape[1:])
    for d, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone, alone_final = selective_scan(**rows(inputs, start, end), initial_state=h0[d : d + 1],
                                            return_final_state=True)
        torch.testing.assert_close(y[:, start:end], alone)
        torch.testing.assert_close(final[d : d + 1], alone_final)


def grads(fn, inputs, names, **kwargs):
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in names}
    y, final = fn(**{**inputs, **leaves}, **kwargs, return_final_state=True)
    g = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=final.dtype)).sum()
    return dict(zip(names, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("varlen", ["none", "seq_idx", "cu_seqlens"])
def test_gradients_match_naive(varlen):
    inputs = make_inputs(seqlen=37)
    if varlen == "none":
        inputs["initial_state"] = initial_state_for(inputs, 2)
    elif varlen == "seq_idx":
        inputs["initial_state"] = initial_state_for(inputs, 2)
        inputs["seq_idx"] = torch.tensor([[0] * 10 + [1] * 27, [0] * 20 + [1] * 17])
    else:
        inputs = rows(inputs, 0, 37)
        inputs["cu_seqlens"] = torch.tensor([0, 10, 30, 37])
        inputs["initial_state"] = initial_state_for(inputs, 3)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    got = grads(selective_scan, inputs, names)
    expected = grads(selective_scan_naive_ref, inputs, names)
    for name in names:
        assert got[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], expected[name], msg=lambda m: f"d/d{name}: {m}")


# bf16 inputs: the op computes in float32 from exactly the values a float64 run sees, so outputs differ by about
# one bf16 rounding of y (2^-8 relative) and final states (kept in float32) by float32 rounding only. float32
# inputs: float32 accumulation over <= 128 tokens, errors around 1e-6 relative.
TOLERANCES = {
    torch.float32: dict(y=dict(rtol=1e-4, atol=1e-4), state=dict(rtol=1e-4, atol=1e-4)),
    torch.bfloat16: dict(y=dict(rtol=1.6e-2, atol=2e-2), state=dict(rtol=1e-4, atol=1e-4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_close_to_float64(dtype):
    inputs = make_inputs(seqlen=128, dtype=dtype)
    h0 = initial_state_for(inputs, 2).float()
    y, final = selective_scan(**inputs, initial_state=h0, return_final_state=True)
    assert y.dtype == dtype and final.dtype == torch.float32
    exact = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y_ref, final_ref = selective_scan_naive_ref(**exact, initial_state=h0.double(), return_final_state=True)
    torch.testing.assert_close(y.double(), y_ref, **TOLERANCES[dtype]["y"])
    torch.testing.assert_close(final.double(), final_ref, **TOLERANCES[dtype]["state"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_with_large_dt_stays_finite(dtype):
    # dt * A down to about -600 per token: exp(-sum dt A) over a chunk would overflow if it were ever formed.
    inputs = make_inputs(batch=1, seqlen=4096, dim=2, state_size=2, dtype=dtype, features=False)
    inputs["delta"] = (torch.rand(1, 4096, 2) * 30).to(dtype)
    inputs["A"] = torch.tensor([[-20.0, -1.0], [-0.01, -0.5]], dtype=dtype)
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in ("u", "delta", "A", "B", "C")}
    y, final = selective_scan(**leaves, return_final_state=True)
    (y.float().sum() + final.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.values())
    y_ref = selective_scan_naive_ref(**{k: v.double() for k, v in inputs.items()})
    torch.testing.assert_close(y.double(), y_ref, **TOLERANCES[dtype]["y"])


def test_steps_equal_the_scan():
    inputs = make_inputs(seqlen=20)
    h0 = initial_state_for(inputs, 2)
    y, final = selective_scan(**inputs, initial_state=h0, return_final_state=True)
    options = {k: inputs[k] for k in ("A", "D", "delta_bias", "delta_softplus")}
    state, outputs = h0, []
    for t in range(20):
        before = state.clone()
        y_t, state_next = selective_scan_step(state, inputs["u"][:, t], inputs["delta"][:, t], B=inputs["B"][:, t],
                                              C=inputs["C"][:, t], z=inputs["z"][:, t], **options)
        assert torch.equal(state, before)  # the step is pure
        state = state_next
        outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs, dim=1), y)
    torch.testing.assert_close(state, final)


def test_step_state_is_float32_for_bf16_inputs():
    inputs = make_inputs(seqlen=1, dtype=torch.bfloat16, features=False)
    y, new = selective_scan_step(torch.zeros(2, 3, 4), inputs["u"][:, 0], inputs["delta"][:, 0], inputs["A"],
                                 inputs["B"][:, 0], inputs["C"][:, 0])
    assert y.dtype == torch.bfloat16 and new.dtype == torch.float32


def small_call(backend):
    return selective_scan(**make_inputs(batch=1, seqlen=3, features=False), backend=backend)


def small_step(backend):
    inputs = make_inputs(batch=1, seqlen=1, features=False)
    return selective_scan_step(torch.zeros(1, 3, 4), inputs["u"][:, 0], inputs["delta"][:, 0], inputs["A"],
                               inputs["B"][:, 0], inputs["C"][:, 0], backend=backend)


@pytest.mark.parametrize(
    "name, call, has_kernel", [("selective_scan", small_call, True), ("selective_scan_step", small_step, True)]
)
def test_backends(name, call, has_kernel, monkeypatch):
    assert_backend_rules(call, name, has_kernel, monkeypatch)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_step_triton_backend_matches_torch(how, monkeypatch):
    # On CPU the kernel runs in Triton's interpreter (conftest.py turns it on); on a GPU, on the GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.delenv("SSM_HUB_BACKEND", raising=False)
    inputs = make_inputs(batch=2, seqlen=1, dtype=torch.float32)
    step = {k: v[:, 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    step = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
    state = torch.randn(2, 3, 4, device=device)
    expected = selective_scan_step(state, **step, backend="torch")
    if how == "environment":
        monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    y, new_state = selective_scan_step(state, **step, backend="triton" if how == "argument" else "auto")
    torch.testing.assert_close(y, expected[0])
    torch.testing.assert_close(new_state, expected[1])


def test_step_reads_state_slots_through_indices():
    inputs = make_inputs(batch=3, seqlen=1)
    step = {k: v[:, 0] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    pool = initial_state_for(inputs, 5)
    before = pool.clone()
    indices = torch.tensor([4, 1, 4])
    y, new_state = selective_scan_step(pool, **step, state_indices=indices)
    assert torch.equal(pool, before)
    assert new_state.shape == (3, 3, 4)
    y_ref, new_ref = selective_scan_step(pool[indices], **step)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(new_state, new_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"state_indices must have an integer dtype"):
        selective_scan_step(pool, **step, state_indices=indices.double())
    with pytest.raises(ValueError, match=r"state_indices must have shape \[B\] = \(3,\), got \(2,\)"):
        selective_scan_step(pool, **step, state_indices=indices[:2])
    with pytest.raises(ValueError, match=r"state must have shape \[slots, D, N\] = \(5, 3, 4\), got \(5, 4, 3\)"):
        selective_scan_step(pool.transpose(1, 2), **step, state_indices=indices)


def bad(**changes):
    inputs = make_inputs(batch=2, seqlen=6, dim=3, state_size=4)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    "inputs, message",
    [
        (bad(u=torch.zeros(2, 6)), r"u must have shape \[B, T, D\]"),
        (bad(delta=torch.zeros(2, 6, 2)), r"delta must have shape \[B, T, D\] = \(2, 6, 3\), got \(2, 6, 2\)"),
        (bad(A=torch.zeros(2, 4)), r"A must have shape \[D, N\] with D = 3, got \(2, 4\)"),
        (bad(B=torch.zeros(2, 6, 5)), r"B must have shape \[B, T, N\] = \(2, 6, 4\), got \(2, 6, 5\)"),
        (bad(C=torch.zeros(2, 6, 3)), r"C must have shape \[B, T, N\]"),
        (bad(D=torch.zeros(4)), r"D must have shape \[D\] = \(3,\), got \(4,\)"),
        (bad(z=torch.zeros(1, 6, 3)), r"z must have shape \[B, T, D\]"),
        (bad(delta_bias=torch.zeros(3, 1)), r"delta_bias must have shape \[D\]"),
        (bad(initial_state=torch.zeros(2, 3)),
         r"initial_state must have shape \[B, D, N\] = \(2, 3, 4\), got \(2, 3\)"),
        (bad(seq_idx=torch.zeros(2, 6)), r"seq_idx must have an integer dtype"),
        (bad(cu_seqlens=torch.tensor([0, 6])), r"cu_seqlens .* batch size must be 1"),
        (bad(seq_idx=torch.zeros(2, 6, dtype=torch.int32), cu_seqlens=torch.tensor([0, 6])), r"not both"),
        (bad(u=torch.zeros(2, 6, 3, dtype=torch.int32)), r"u must have a floating-point dtype"),
    ],
)
def test_bad_inputs_name_the_argument(inputs, message):
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


def test_bad_step_inputs_name_the_argument():
    inputs = make_inputs(batch=2, seqlen=1, features=False)
    args = dict(u=inputs["u"][:, 0], delta=inputs["delta"][:, 0], A=inputs["A"], B=inputs["B"][:, 0],
                C=inputs["C"][:, 0])
    with pytest.raises(ValueError, match=r"state must have shape \[B, D, N\] = \(2, 3, 4\), got \(2, 4, 3\)"):
        selective_scan_step(torch.zeros(2, 4, 3), **args)
    with pytest.raises(ValueError, match=r"B must have shape \[B, N\]"):
        selective_scan_step(torch.zeros(2, 3, 4), **{**args, "B": torch.zeros(2, 5)})
