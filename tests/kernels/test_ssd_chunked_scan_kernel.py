"""The SSD chunked-scan kernels (forward and backward) against the reference: y, final states and the gradient of
every input, every option, T not a multiple of the chunk, groups, packed documents (seq_idx, and cu_seqlens with
per-document states), fp32 and bf16, determinism, and the custom op's registration."""

import pytest
import torch

from kernel_testing import DEVICE, requires_triton
from ssm_hub.ops.ssd import ssd_chunked_scan

pytestmark = requires_triton

DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(batch, seqlen, heads, head_dim, groups, state_size, dtype=torch.float32, options="all",
                num_states=None, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, cast=True):
        tensor = torch.randn(*shape, generator=generator).to(DEVICE)
        return tensor.to(dtype) if cast else tensor

    inputs = dict(
        x=rand(batch, seqlen, heads, head_dim), dt=rand(batch, seqlen, heads),
        A=-(torch.rand(heads, generator=generator).to(DEVICE) * 2 + 0.2), B=rand(batch, seqlen, groups, state_size),
        C=rand(batch, seqlen, groups, state_size),
    )
    states = rand(num_states or batch, heads, head_dim, state_size, cast=False)
    if options == "all":
        inputs.update(D=rand(heads, head_dim, cast=False), z=rand(batch, seqlen, heads, head_dim),
                      dt_bias=rand(heads, cast=False), dt_softplus=True, dt_limit=(0.05, 1.5), initial_states=states)
    elif options == "D_per_head":
        inputs.update(D=rand(heads, cast=False), dt_softplus=True, initial_states=states)
    else:  # plain: dt used as given, so keep it positive
        inputs["dt"] = inputs["dt"].abs()
    return inputs


def run(backend, inputs, chunk_size, seed=1, **kwargs):
    """y, final states and the gradients of every tensor input for a random loss on both outputs."""
    leaves = {name: value.detach().clone().requires_grad_(True) for name, value in inputs.items()
              if name in DIFFERENTIABLE}
    y, final = ssd_chunked_scan(**{**inputs, **leaves}, chunk_size=chunk_size, return_final_states=True,
                                backend=backend, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=generator).to(DEVICE)
    dfinal = torch.randn(final.shape, generator=generator).to(DEVICE)
    ((y.float() * dy).sum() + (final * dfinal).sum()).backward()
    return y, final, {name: leaf.grad for name, leaf in leaves.items()}


def assert_close(got, expected, dtype, kind="output"):
    """``kind``: "output" (y, final states), "gradient", or "through_decay" (gradients that flow through the log
    decays: dt, A, dt_bias, and D's, all sums over many tokens). Errors are measured against the tensor's largest
    entry: every term of these sums carries a rounding relative to its own size, not to the sum's.

    float32, "output" and "gradient": 1e-5. The kernels decay by exp(a_t - a_s) with a the cumulative sum of dt A
    along the chunk (the reference sums each segment on its own), so the exponent carries the rounding of |a|, up to
    ~50 in these tests (a few 1e-6), and the GPU's exp adds ~2^-22; sums over tokens, heads and channels are added
    in another order than the reference's.
    float32, "through_decay": 1e-4. The kernels build d a_t from row sums minus column sums of the [L, L] products,
    which largely cancel, so the result carries the rounding of those terms: about 1e-5 of the gradient's largest
    entry in these tests (the reference's own float32 error, against float64, is a few times smaller).
    bf16: 3e-2. The kernels multiply bf16 operands (as the tensor cores take them) where the reference multiplies in
    float32, so each product carries a bf16 rounding (2^-8) and sums of many of them drift by a few of those.
    """
    assert got.dtype == expected.dtype and got.shape == expected.shape
    relative = 3e-2 if dtype == torch.bfloat16 else (1e-4 if kind == "through_decay" else 1e-5)
    scale = expected.float().abs().max().clamp_min(1.0)
    assert (got.float() - expected.float()).abs().max() <= relative * scale


def assert_matches_reference(inputs, chunk_size, dtype=torch.float32, **kwargs):
    y, final, grads = run("triton", inputs, chunk_size, **kwargs)
    y_ref, final_ref, grads_ref = run("torch", inputs, chunk_size, **kwargs)
    assert y.dtype == inputs["x"].dtype and final.dtype == torch.float32
    assert_close(y, y_ref, dtype)
    assert_close(final, final_ref, dtype)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None, name
        kind = "through_decay" if name in ("dt", "A", "D", "dt_bias") else "gradient"
        assert_close(grads[name], grads_ref[name], dtype, kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "seqlen, chunk_size, options, groups",
    [(1, 16, "all", 2), (63, 16, "all", 2), (63, 32, "plain", 1), (63, 16, "D_per_head", 2), (257, 64, "all", 2)],
)
def test_kernel_matches_reference(dtype, seqlen, chunk_size, options, groups):
    batch = 2 if seqlen < 100 else 1  # one row for long T: interpreter time
    inputs = make_inputs(batch, seqlen, 4, 16, groups, 16, dtype, options)
    assert_matches_reference(inputs, chunk_size, dtype)


def test_kernel_takes_odd_sizes_small_chunks_and_strided_inputs():
    # P, N and L below 16 and not powers of two (the kernels pad their tiles); x and z non-contiguous views, as
    # the mixer slices them out of one projection. T = 7: chunks of 6 end on a one-token chunk, chunks of 1 pass
    # the state through every token (the interpreter's time grows with the chunks, so no more tokens than that).
    inputs = make_inputs(2, 7, 6, 5, 2, 7)
    inputs["x"] = torch.randn(2, 7, 6, 10, device=DEVICE)[..., ::2]
    inputs["z"] = torch.randn(2, 7, 6, 10, device=DEVICE)[..., 1::2]
    for chunk_size in (1, 6):
        assert_matches_reference(inputs, chunk_size)


@pytest.mark.parametrize("chunk_size", [40, 64])
def test_kernel_walks_long_chunks_in_blocks(chunk_size, monkeypatch):
    # On a GPU chunks of 256 tokens are walked in blocks of MAX_BLOCK_L; blocks of 16 exercise that path here.
    import ssm_hub.kernels.ssd_chunked_scan as module

    monkeypatch.setattr(module, "MAX_BLOCK_L", 16)
    assert_matches_reference(make_inputs(1, 150, 4, 16, 2, 16), chunk_size)


def test_kernel_seq_idx_documents():
    # Row 0: documents of 3, 13, 1, 30 and 33 tokens: one starts on a chunk boundary (16), one fills a chunk's last
    # token, one spans chunks. Row 1: one document, then a last one of a single token. The row's initial state
    # belongs to its first document and the final state to its last; ids need not be consecutive.
    seq_idx = torch.zeros(2, 80, dtype=torch.int64, device=DEVICE)
    for start in (3, 16, 17, 47):
        seq_idx[0, start:] += 1
    seq_idx[1, 79] = 5
    assert_matches_reference(make_inputs(2, 80, 4, 16, 2, 16), 16, seq_idx=seq_idx)


@pytest.mark.parametrize("with_states", [True, False])
def test_kernel_cu_seqlens_documents_have_their_own_states(with_states):
    # Documents of 1, 15, 17, 16 and 6 tokens with chunks of 16: each with its own initial and final state (the
    # chunk-aligned layout), or none (the seq_idx masks).
    cu_seqlens = torch.tensor([0, 1, 16, 33, 49, 55], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, 55, 4, 16, 2, 16, num_states=5)
    if not with_states:
        del inputs["initial_states"]
        y = ssd_chunked_scan(**inputs, chunk_size=16, cu_seqlens=cu_seqlens, backend="triton")
        assert_close(y, ssd_chunked_scan(**inputs, chunk_size=16, cu_seqlens=cu_seqlens, backend="torch"),
                     torch.float32)
    assert_matches_reference(inputs, 16, cu_seqlens=cu_seqlens)


def test_kernel_bf16_documents():
    seq_idx = torch.zeros(2, 63, dtype=torch.int64, device=DEVICE)
    seq_idx[:, 30:] = 1
    assert_matches_reference(make_inputs(2, 63, 4, 16, 1, 16, torch.bfloat16), 16, torch.bfloat16, seq_idx=seq_idx)


def test_kernel_is_deterministic():
    # No float atomics: two backward passes give bitwise the same gradients.
    inputs = make_inputs(1, 70, 8, 16, 2, 16)
    first, second = run("triton", inputs, 16), run("triton", inputs, 16)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


def test_kernel_forward_only_and_final_state_only_gradients():
    inputs = make_inputs(2, 20, 4, 16, 1, 16)
    with torch.no_grad():
        y = ssd_chunked_scan(**inputs, chunk_size=8, backend="triton")
    assert_close(y, ssd_chunked_scan(**inputs, chunk_size=8, backend="torch"), torch.float32)
    # A loss on the final states alone still reaches every input.
    grads = {}
    for backend in ("triton", "torch"):
        x, states = inputs["x"].clone().requires_grad_(True), inputs["initial_states"].clone().requires_grad_(True)
        _, final = ssd_chunked_scan(**{**inputs, "x": x, "initial_states": states}, chunk_size=8,
                                    return_final_states=True, backend=backend)
        final.sum().backward()
        grads[backend] = (x.grad, states.grad)
    for got, expected in zip(grads["triton"], grads["torch"]):
        assert_close(got, expected, torch.float32, "gradient")


def test_custom_op_is_registered_for_compile_and_autograd():
    # Schema, fake implementation (the shapes torch.compile traces with), autograd registration, AOT dispatch.
    inputs = make_inputs(1, 9, 2, 16, 1, 16)
    args = [inputs[name].clone().requires_grad_(True) for name in ("x", "dt", "A", "B", "C")]
    options = [inputs[name].clone().requires_grad_(True) for name in ("D", "z", "dt_bias")]
    states = inputs["initial_states"].clone().requires_grad_(True)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2]], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(
        torch.ops.ssm_hub.ssd_chunked_scan_fwd.default,
        (*args, 4, *options, True, 0.05, 1.5, states, doc_ids, 1, 1),
    )


def test_backward_writes_packed_gradients_into_one_tensor():
    # Mamba-2's x, B and C are views of one conv output; with packed_xBC the backward writes their gradients into
    # one tensor of that layout (no concatenation after it), equal to the three separate gradients.
    batch, seqlen, heads, head_dim, groups, state_size = 2, 9, 2, 16, 1, 16
    inputs = make_inputs(batch, seqlen, heads, head_dim, groups, state_size, options="D_per_head")
    xBC = torch.cat([inputs["x"].flatten(2), inputs["B"].flatten(2), inputs["C"].flatten(2)], dim=-1)
    x, B, C = xBC.split([heads * head_dim, groups * state_size, groups * state_size], dim=-1)
    x, B, C = x.view_as(inputs["x"]), B.view_as(inputs["B"]), C.view_as(inputs["C"])
    ops = torch.ops.ssm_hub
    scan = (x, inputs["dt"], inputs["A"], B, C, 4, inputs["D"], None, None, True, 0.0, float("inf"), None, None, 0,
            batch)
    y, _, *intermediates = ops.ssd_chunked_scan_fwd(*scan)
    dy = torch.randn_like(y)
    separate = ops.ssd_chunked_scan_bwd(dy, None, *scan, *intermediates, False)
    packed = ops.ssd_chunked_scan_bwd(dy, None, *scan, *intermediates, True)
    dx, _, _, dB, dC = separate[:5]
    assert packed[0].shape == xBC.shape and packed[3].numel() == packed[4].numel() == 0
    torch.testing.assert_close(packed[0], torch.cat([dx.flatten(2), dB.flatten(2), dC.flatten(2)], dim=-1),
                               rtol=0, atol=0)
    for got, expected in zip(packed[5:], separate[5:]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.library.opcheck(ops.ssd_chunked_scan_bwd.default, (dy, None, *scan, *intermediates, True))


def test_kernel_takes_A_log():
    # Mamba-2 keeps A as A_log; the kernels compute A = -exp(A_log) themselves, and give A_log's gradient.
    inputs = make_inputs(2, 13, 2, 16, 1, 16)
    A_log = torch.log(-inputs["A"]).requires_grad_(True)
    A = -torch.exp(A_log)
    results = []
    for a, is_log in ((A, False), (A_log, True)):
        args = (inputs["x"], inputs["dt"], a, inputs["B"], inputs["C"], 4, inputs["D"], inputs["z"], inputs["dt_bias"],
                True, 0.05, 1.5, None, None, 0, 2, is_log)
        y = torch.ops.ssm_hub.ssd_chunked_scan_fwd(*args)[0]
        (grad,) = torch.autograd.grad((y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum(),
                                      A_log)
        results.append((y, grad))
    (y_plain, grad_plain), (y_log, grad_log) = results
    assert_close(y_log, y_plain, torch.float32)
    assert_close(grad_log, grad_plain, torch.float32, "through_decay")


def test_environment_variable_selects_the_kernel(monkeypatch):
    inputs = make_inputs(1, 20, 4, 16, 1, 16, options="plain")
    called = []
    import ssm_hub.kernels.ssd_chunked_scan as module

    launcher = module.ssd_chunked_scan_fwd
    monkeypatch.setattr(module, "ssd_chunked_scan_fwd", lambda *args: called.append(1) or launcher(*args))
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    y = ssd_chunked_scan(**inputs, chunk_size=16)
    assert called
    assert_close(y, ssd_chunked_scan(**inputs, chunk_size=16, backend="torch"), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_has_no_nan_or_offset_overflow_on_long_bf16_sequences():
    # 2^17 tokens x 64 heads x 256 channels is 2^31 elements: offsets past int32 must still be right. Large dt
    # (strong decay) in bf16 must not overflow an exponent into inf / NaN.
    seqlen, heads, head_dim = 2**17, 64, 256
    inputs = make_inputs(1, seqlen, heads, head_dim, 1, 16, torch.bfloat16, options="D_per_head")
    inputs["dt"] = inputs["dt"] * 8
    y, final = ssd_chunked_scan(**inputs, chunk_size=256, return_final_states=True, backend="triton")
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    # The last tokens, past offset 2^31, against the reference run on the tail from the state before it.
    tail = 512

    def tokens(part):
        return {name: part(value) if name in ("x", "dt", "B", "C", "z") else value for name, value in inputs.items()}

    _, before = ssd_chunked_scan(**tokens(lambda t: t[:, :-tail]), chunk_size=256, return_final_states=True,
                                 backend="triton")
    y_ref = ssd_chunked_scan(**{**tokens(lambda t: t[:, -tail:]), "initial_states": before}, chunk_size=256,
                             backend="torch")
    assert_close(y[:, -tail:], y_ref, torch.bfloat16)
