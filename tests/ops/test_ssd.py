"""The SSD chunked scan (Mamba-2) against the per-token recurrence, varlen semantics, decoding steps, dispatch."""


import pytest
import torch

from conftest import assert_backend_rules
from ssm_hub.ops import ssd_chunked_scan, ssd_step
from ssm_hub.ops.ssd import ssd_naive_ref

F64 = torch.float64


def make_inputs(batch=2, seqlen=40, heads=4, head_dim=3, groups=2, state_size=5, dtype=F64, D_per_channel=False,
                features=True, seed=0):
    """Random SSD inputs; with ``features`` also D, z, dt_bias + softplus + a dt_limit that clamps some steps."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype)

    inputs = dict(
        x=rand(batch, seqlen, heads, head_dim),
        dt=rand(batch, seqlen, heads) if features else torch.rand(batch, seqlen, heads, generator=g).to(dtype),
        A=-(torch.rand(heads, generator=g, dtype=F64) * 2 + 0.2).to(dtype),
        B=rand(batch, seqlen, groups, state_size),
        C=rand(batch, seqlen, groups, state_size),
    )
    if features:
        inputs.update(
            D=rand(heads, head_dim) if D_per_channel else rand(heads),
            z=rand(batch, seqlen, heads, head_dim),
            dt_bias=rand(heads),
            dt_softplus=True,
            dt_limit=(0.05, 1.5),
        )
    return inputs


def initial_states_for(inputs, count, seed=1):
    _, _, heads, head_dim = inputs["x"].shape
    state_size = inputs["B"].shape[-1]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, heads, head_dim, state_size, generator=g, dtype=F64).to(inputs["x"].dtype)


def rows(inputs, start, end, row=0):
    """The inputs of tokens [start, end) of one row, as a batch of one."""
    out = dict(inputs)
    for name in ("x", "dt", "B", "C", "z"):
        if name in out:
            out[name] = out[name][row : row + 1, start:end]
    return out


def test_two_tokens_by_hand():
    # One head, one channel, one state entry: the recurrence written out, every option on. The dt_limit clamps the
    # second step (softplus(2.5) > 1.2).
    x, dt_raw, B, C = [torch.tensor(v, dtype=F64) for v in ([0.5, -1.0], [0.3, 2.0], [2.0, 1.5], [1.0, -2.0])]
    A, D, dt_bias, z, h0 = [torch.tensor(v, dtype=F64) for v in ([-0.8], [0.25], [0.5], [0.7, -1.3], 0.4)]
    dt = torch.stack([torch.log1p(torch.exp(dt_raw[0] + dt_bias[0])), torch.tensor(1.2, dtype=F64)])
    h1 = torch.exp(dt[0] * A[0]) * h0 + dt[0] * x[0] * B[0]
    h2 = torch.exp(dt[1] * A[0]) * h1 + dt[1] * x[1] * B[1]
    gate = z * torch.sigmoid(z)
    expected = torch.stack([(h1 * C[0] + D[0] * x[0]) * gate[0], (h2 * C[1] + D[0] * x[1]) * gate[1]])
    for chunk_size in (1, 2):
        y, final = ssd_chunked_scan(
            x.view(1, 2, 1, 1), dt_raw.view(1, 2, 1), A, B.view(1, 2, 1, 1), C.view(1, 2, 1, 1), chunk_size, D=D,
            z=z.view(1, 2, 1, 1), dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.1, 1.2),
            initial_states=h0.view(1, 1, 1, 1), return_final_states=True,
        )
        torch.testing.assert_close(y.flatten(), expected)
        torch.testing.assert_close(final.flatten(), h2.view(1))


@pytest.mark.parametrize("seqlen, chunk_size", [(1, 4), (63, 16), (257, 64), (257, 100)])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("D_per_channel", [False, True])
def test_chunked_matches_naive(seqlen, chunk_size, groups, D_per_channel):
    inputs = make_inputs(seqlen=seqlen, groups=groups, D_per_channel=D_per_channel)
    h0 = initial_states_for(inputs, 2)
    y, final = ssd_chunked_scan(**inputs, chunk_size=chunk_size, initial_states=h0, return_final_states=True)
    y_ref, final_ref = ssd_naive_ref(**inputs, initial_states=h0, return_final_states=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)


def test_chunked_matches_naive_without_options():
    inputs = make_inputs(seqlen=50, features=False)
    y, final = ssd_chunked_scan(**inputs, chunk_size=16, return_final_states=True)
    y_ref, final_ref = ssd_naive_ref(**inputs, return_final_states=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)


def test_a_row_shorter_than_a_chunk_is_scanned_as_one_chunk_of_its_length(monkeypatch):
    # Padding a 9-token row to a chunk of 256 would cost a 256-token row's [L, L] work (the CPU demo's rows).
    import ssm_hub.ops.ssd.reference as reference

    chunk_lengths = []
    scan_chunks = reference._ssd_chunks

    def recording(x, *args):
        chunk_lengths.append(args[4])
        return scan_chunks(x, *args)

    monkeypatch.setattr(reference, "_ssd_chunks", recording)
    inputs = make_inputs(seqlen=9)
    y, final = ssd_chunked_scan(**inputs, chunk_size=256, return_final_states=True, backend="torch")
    assert chunk_lengths == [9]
    y_naive, final_naive = ssd_naive_ref(**inputs, return_final_states=True)
    torch.testing.assert_close(y, y_naive)
    torch.testing.assert_close(final, final_naive)


def test_initial_states_matter():
    # Guards the test above against an initial state that would be ignored by both implementations.
    inputs = make_inputs(seqlen=10)
    h0 = initial_states_for(inputs, 2)
    assert not torch.allclose(ssd_chunked_scan(**inputs, chunk_size=4, initial_states=h0),
                              ssd_chunked_scan(**inputs, chunk_size=4))


# Documents of row 0: a short one inside the first chunk, one crossing two chunk boundaries, one starting exactly at
# a chunk boundary; row 1: two documents, the second shorter than a chunk at the end.
DOCS = {0: [(0, 5), (5, 32), (32, 45)], 1: [(0, 38), (38, 45)]}


def test_seq_idx_packed_row_equals_documents_run_alone():
    chunk_size = 16
    inputs = make_inputs(seqlen=45)
    h0 = initial_states_for(inputs, 2)
    seq_idx = torch.zeros(2, 45, dtype=torch.int32)
    for row, docs in DOCS.items():
        for number, (start, end) in enumerate(docs):
            seq_idx[row, start:end] = number
    y, final = ssd_chunked_scan(**inputs, chunk_size=chunk_size, initial_states=h0, seq_idx=seq_idx,
                                return_final_states=True)
    for row, docs in DOCS.items():
        for number, (start, end) in enumerate(docs):
            # Only each row's first document starts from the row's initial state.
            alone, alone_final = ssd_chunked_scan(
                **rows(inputs, start, end, row), chunk_size=chunk_size,
                initial_states=h0[row : row + 1] if number == 0 else None, return_final_states=True,
            )
            torch.testing.assert_close(y[row : row + 1, start:end], alone)
        torch.testing.assert_close(final[row : row + 1], alone_final)  # the state at the end of the last document
    y_ref, final_ref = ssd_naive_ref(**inputs, initial_states=h0, seq_idx=seq_idx, return_final_states=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)


def test_cu_seqlens_documents_have_their_own_states():
    chunk_size = 16
    bounds = [0, 5, 32, 33, 45]
    inputs = rows(make_inputs(seqlen=45), 0, 45)
    h0 = initial_states_for(inputs, len(bounds) - 1)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    y, final = ssd_chunked_scan(**inputs, chunk_size=chunk_size, initial_states=h0, cu_seqlens=cu_seqlens,
                                return_final_states=True)
    assert final.shape == (len(bounds) - 1, *h0.shape[1:])
    for d, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone, alone_final = ssd_chunked_scan(**rows(inputs, start, end), chunk_size=chunk_size,
                                              initial_states=h0[d : d + 1], return_final_states=True)
        torch.testing.assert_close(y[:, start:end], alone)
        torch.testing.assert_close(final[d : d + 1], alone_final)
    y_ref, final_ref = ssd_naive_ref(**inputs, initial_states=h0, cu_seqlens=cu_seqlens, return_final_states=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)


def test_cu_seqlens_without_initial_states_equals_seq_idx():
    inputs = rows(make_inputs(seqlen=45), 0, 45)
    cu_seqlens = torch.tensor([0, 5, 32, 45])
    seq_idx = torch.tensor([[0] * 5 + [1] * 27 + [2] * 13])
    y_cu = ssd_chunked_scan(**inputs, chunk_size=16, cu_seqlens=cu_seqlens)
    y_seq = ssd_chunked_scan(**inputs, chunk_size=16, seq_idx=seq_idx)
    torch.testing.assert_close(y_cu, y_seq)


def grads(fn, inputs, names, **kwargs):
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in names}
    y, final = fn(**{**inputs, **leaves}, **kwargs, return_final_states=True)
    g = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=g, dtype=final.dtype)).sum()
    return dict(zip(names, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("varlen", ["none", "seq_idx", "cu_seqlens"])
def test_gradients_match_naive(varlen):
    inputs = make_inputs(seqlen=37, D_per_channel=True)
    if varlen == "none":
        inputs["initial_states"] = initial_states_for(inputs, 2)
    elif varlen == "seq_idx":
        inputs["initial_states"] = initial_states_for(inputs, 2)
        inputs["seq_idx"] = torch.tensor([[0] * 10 + [1] * 27, [0] * 20 + [1] * 17])
    else:
        inputs = rows(inputs, 0, 37)
        inputs["cu_seqlens"] = torch.tensor([0, 10, 30, 37])
        inputs["initial_states"] = initial_states_for(inputs, 3)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    got = grads(ssd_chunked_scan, inputs, names, chunk_size=8)
    expected = grads(ssd_naive_ref, inputs, names)
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
    h0 = initial_states_for(inputs, 2).float()
    y, final = ssd_chunked_scan(**inputs, chunk_size=32, initial_states=h0, return_final_states=True)
    assert y.dtype == dtype and final.dtype == torch.float32
    exact = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    y_ref, final_ref = ssd_naive_ref(**exact, initial_states=h0.double(), return_final_states=True)
    torch.testing.assert_close(y.double(), y_ref, **TOLERANCES[dtype]["y"])
    torch.testing.assert_close(final.double(), final_ref, **TOLERANCES[dtype]["state"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_sequence_with_large_dt_stays_finite(dtype):
    # dt * A down to about -300 per token: a chunk's cumulative decay reaches about -1e5, far beyond exp's range.
    inputs = make_inputs(batch=1, seqlen=4096, heads=2, head_dim=2, groups=1, state_size=2, dtype=dtype,
                         features=False)
    inputs["dt"] = (torch.rand(1, 4096, 2) * 30).to(dtype)
    inputs["A"] = torch.tensor([-10.0, -0.01], dtype=dtype)
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in ("x", "dt", "A", "B", "C")}
    y, final = ssd_chunked_scan(**leaves, chunk_size=256, return_final_states=True)
    (y.float().sum() + final.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    assert all(torch.isfinite(leaf.grad).all() for leaf in leaves.values())
    exact = {k: v.double() for k, v in inputs.items()}
    y_ref = ssd_naive_ref(**exact)
    torch.testing.assert_close(y.double(), y_ref, **TOLERANCES[dtype]["y"])


def test_steps_equal_the_scan():
    inputs = make_inputs(seqlen=20, D_per_channel=True)
    h0 = initial_states_for(inputs, 2)
    y, final = ssd_chunked_scan(**inputs, chunk_size=8, initial_states=h0, return_final_states=True)
    options = {k: inputs[k] for k in ("A", "D", "dt_bias", "dt_softplus", "dt_limit")}
    state, outputs = h0, []
    for t in range(20):
        before = state.clone()
        y_t, state_next = ssd_step(state, inputs["x"][:, t], inputs["dt"][:, t], B=inputs["B"][:, t],
                                   C=inputs["C"][:, t], z=inputs["z"][:, t], **options)
        assert torch.equal(state, before)  # the step is pure
        state = state_next
        outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs, dim=1), y)
    torch.testing.assert_close(state, final)


def test_step_state_is_float32_for_bf16_inputs():
    inputs = make_inputs(seqlen=1, dtype=torch.bfloat16, features=False)
    state = torch.zeros(2, 4, 3, 5)
    y, new = ssd_step(state, inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"], inputs["B"][:, 0], inputs["C"][:, 0])
    assert y.dtype == torch.bfloat16 and new.dtype == torch.float32


def small_call(backend):
    inputs = make_inputs(batch=1, seqlen=3, features=False)
    return ssd_chunked_scan(**inputs, chunk_size=2, backend=backend)


def small_step(backend):
    inputs = make_inputs(batch=1, seqlen=1, features=False)
    return ssd_step(torch.zeros(1, 4, 3, 5), inputs["x"][:, 0], inputs["dt"][:, 0], inputs["A"],
                    inputs["B"][:, 0], inputs["C"][:, 0], backend=backend)


@pytest.mark.parametrize("name, call, has_kernel", [("ssd_chunked_scan", small_call, True), ("ssd_step", small_step, True)])
def test_backends(name, call, has_kernel, monkeypatch):
    assert_backend_rules(call, name, has_kernel, monkeypatch)


def bad(**changes):
    inputs = make_inputs(batch=2, seqlen=6, heads=4, head_dim=3, groups=2, state_size=5)
    inputs.update(chunk_size=4)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    "inputs, message",
    [
        (bad(x=torch.zeros(2, 6, 4)), r"x must have shape \[B, T, H, P\]"),
        (bad(dt=torch.zeros(2, 6, 3)), r"dt must have shape \[B, T, H\] = \(2, 6, 4\), got \(2, 6, 3\)"),
        (bad(A=torch.zeros(3)), r"A must have shape \[H\] = \(4,\), got \(3,\)"),
        (bad(B=torch.zeros(2, 6, 3, 5), C=torch.zeros(2, 6, 3, 5)), r"B and C .* G that divides .* H=4, got G=3"),
        (bad(B=torch.zeros(2, 5, 2, 5)), r"B must have shape \[B, T, G, N\]"),
        (bad(C=torch.zeros(2, 6, 2, 4)), r"C must have shape \[B, T, G, N\] = \(2, 6, 2, 5\), got \(2, 6, 2, 4\)"),
        (bad(D=torch.zeros(4, 2)), r"D must have shape \[H, P\] = \(4, 3\), got \(4, 2\)"),
        (bad(z=torch.zeros(2, 6, 4, 2)), r"z must have shape \[B, T, H, P\]"),
        (bad(dt_bias=torch.zeros(5)), r"dt_bias must have shape \[H\]"),
        (bad(dt_limit=(1.0, 0.5)), r"dt_limit"),
        (bad(initial_states=torch.zeros(2, 4, 3, 4)), r"initial_states must have shape \[B, H, P, N\]"),
        (bad(seq_idx=torch.zeros(2, 6)), r"seq_idx must have an integer dtype"),
        (bad(seq_idx=torch.zeros(2, 5, dtype=torch.int32)), r"seq_idx must have shape \[B, T\]"),
        (bad(cu_seqlens=torch.tensor([0, 6])), r"cu_seqlens .* batch size must be 1"),
        (bad(seq_idx=torch.zeros(2, 6, dtype=torch.int32), cu_seqlens=torch.tensor([0, 6])), r"not both"),
        (bad(chunk_size=0), r"chunk_size must be a positive int"),
        (bad(x=torch.zeros(2, 0, 4, 3), dt=torch.zeros(2, 0, 4), B=torch.zeros(2, 0, 2, 5),
             C=torch.zeros(2, 0, 2, 5), z=None), r"x must hold at least one token"),
    ],
)
def test_bad_inputs_name_the_argument(inputs, message):
    with pytest.raises(ValueError, match=message):
        ssd_chunked_scan(**inputs)


def test_bad_cu_seqlens_and_states():
    inputs = rows(make_inputs(seqlen=6), 0, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0 and end at the sequence length 6"):
        ssd_chunked_scan(**inputs, chunk_size=4, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match=r"cu_seqlens must be strictly increasing"):
        ssd_chunked_scan(**inputs, chunk_size=4, cu_seqlens=torch.tensor([0, 2, 2, 6]))
    with pytest.raises(ValueError, match=r"initial_states must have shape \[S, H, P, N\].* = \(2, 4, 3, 5\), got"):
        ssd_chunked_scan(**inputs, chunk_size=4, cu_seqlens=torch.tensor([0, 2, 6]),
                         initial_states=torch.zeros(1, 4, 3, 5))


def test_bad_step_inputs_name_the_argument():
    inputs = make_inputs(batch=2, seqlen=1, features=False)
    args = dict(x=inputs["x"][:, 0], dt=inputs["dt"][:, 0], A=inputs["A"], B=inputs["B"][:, 0], C=inputs["C"][:, 0])
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, P, N\] = \(2, 4, 3, 5\), got \(2, 4, 3\)"):
        ssd_step(torch.zeros(2, 4, 3), **args)
    with pytest.raises(ValueError, match=r"dt must have shape \[B, H\]"):
        ssd_step(torch.zeros(2, 4, 3, 5), **{**args, "dt": torch.zeros(2, 3)})
