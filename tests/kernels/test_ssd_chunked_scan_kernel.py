"""The SSD chunked-scan forward kernel against the reference: y and final states, every option, T not a multiple
of the chunk, groups, fp32 and bf16; and the inputs it refuses (gradients, varlen)."""

import pytest
import torch

from kernel_testing import DEVICE, TOLERANCES, requires_triton
from ssm_hub.ops.ssd import ssd_chunked_scan

pytestmark = requires_triton


def _inputs(batch, seqlen, heads, head_dim, groups, state_size, dtype):
    def rand(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype)

    return dict(
        x=rand(batch, seqlen, heads, head_dim), dt=rand(batch, seqlen, heads),
        A=-(torch.rand(heads, device=DEVICE) * 2 + 0.2), B=rand(batch, seqlen, groups, state_size),
        C=rand(batch, seqlen, groups, state_size),
    )


def _with_options(inputs, options, batch, heads, head_dim, state_size):
    if options == "all":
        inputs.update(
            D=torch.randn(heads, head_dim, device=DEVICE), z=torch.randn_like(inputs["x"]),
            dt_bias=torch.randn(heads, device=DEVICE), dt_softplus=True, dt_limit=(0.05, 1.5),
            initial_states=torch.randn(batch, heads, head_dim, state_size, device=DEVICE),
        )
    elif options == "D_per_head":
        inputs.update(D=torch.randn(heads, device=DEVICE), dt_softplus=True,
                      initial_states=torch.randn(batch, heads, head_dim, state_size, device=DEVICE))
    else:  # plain: dt used as given, so keep it positive
        inputs["dt"] = inputs["dt"].abs()
    return inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "seqlen, chunk_size, options, groups",
    [
        (1, 16, "all", 2), (1, 32, "plain", 1), (63, 16, "all", 2), (63, 16, "plain", 1), (63, 32, "D_per_head", 2),
        (257, 32, "all", 2), (257, 16, "D_per_head", 2), (257, 32, "plain", 1),
    ],
)
def test_kernel_matches_reference(dtype, seqlen, chunk_size, options, groups):
    batch, heads, head_dim, state_size = 2 if seqlen < 100 else 1, 4, 16, 16  # one row for long T: interpreter time
    inputs = _inputs(batch, seqlen, heads, head_dim, groups, state_size, dtype)
    inputs = _with_options(inputs, options, batch, heads, head_dim, state_size)
    y, final = ssd_chunked_scan(**inputs, chunk_size=chunk_size, return_final_states=True, backend="triton")
    y_ref, final_ref = ssd_chunked_scan(**inputs, chunk_size=chunk_size, return_final_states=True, backend="torch")
    assert y.dtype == dtype and final.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(final, final_ref, **TOLERANCES[dtype])


def test_kernel_takes_odd_sizes_small_chunks_and_strided_inputs():
    # P, N and L below 16 and not powers of two (the kernel pads its tiles), x a non-contiguous view.
    batch, seqlen, heads, head_dim, groups, state_size = 2, 13, 4, 5, 2, 7
    inputs = _inputs(batch, seqlen, heads, head_dim, groups, state_size, torch.float32)
    inputs = _with_options(inputs, "all", batch, heads, head_dim, state_size)
    inputs["x"] = torch.randn(batch, seqlen, heads, 2 * head_dim, device=DEVICE)[..., ::2]
    for chunk_size in (1, 6):
        y = ssd_chunked_scan(**inputs, chunk_size=chunk_size, backend="triton")
        assert isinstance(y, torch.Tensor)
        torch.testing.assert_close(y, ssd_chunked_scan(**inputs, chunk_size=chunk_size, backend="torch"),
                                   **TOLERANCES[torch.float32])


@pytest.mark.parametrize("chunk_size", [40, 64])
def test_kernel_walks_long_chunks_in_blocks(chunk_size, monkeypatch):
    # On a GPU chunks of 256 tokens are walked in blocks of MAX_BLOCK_L; blocks of 16 exercise that path here.
    import ssm_hub.kernels.ssd_chunked_scan as module

    monkeypatch.setattr(module, "MAX_BLOCK_L", 16)
    batch, seqlen, heads, head_dim, groups, state_size = 1, 150, 4, 16, 2, 16
    inputs = _inputs(batch, seqlen, heads, head_dim, groups, state_size, torch.float32)
    inputs = _with_options(inputs, "all", batch, heads, head_dim, state_size)
    y, final = ssd_chunked_scan(**inputs, chunk_size=chunk_size, return_final_states=True, backend="triton")
    y_ref, final_ref = ssd_chunked_scan(**inputs, chunk_size=chunk_size, return_final_states=True, backend="torch")
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(final, final_ref, **TOLERANCES[torch.float32])


def test_environment_variable_selects_the_kernel(monkeypatch):
    inputs = _inputs(1, 20, 4, 16, 1, 16, torch.float32)
    called = []
    import ssm_hub.kernels.ssd_chunked_scan as module

    launcher = module.ssd_chunked_scan_fwd
    monkeypatch.setattr(module, "ssd_chunked_scan_fwd", lambda *args: called.append(1) or launcher(*args))
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    y = ssd_chunked_scan(**inputs, chunk_size=16)
    assert called
    torch.testing.assert_close(y, ssd_chunked_scan(**inputs, chunk_size=16, backend="torch"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_keeps_the_reference_until_the_kernel_is_validated(monkeypatch):
    monkeypatch.delenv("SSM_HUB_BACKEND", raising=False)
    inputs = _inputs(1, 40, 4, 16, 1, 16, torch.float32)
    import ssm_hub.kernels.ssd_chunked_scan as module

    monkeypatch.setattr(module, "ssd_chunked_scan_fwd", lambda *args: pytest.fail("auto ran the kernel"))
    ssd_chunked_scan(**inputs, chunk_size=16)


def test_kernel_refuses_gradients_and_varlen():
    inputs = _inputs(1, 8, 4, 16, 1, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="ssd_chunked_scan.*no backward yet"):
        ssd_chunked_scan(**{**inputs, "x": inputs["x"].requires_grad_()}, chunk_size=4, backend="triton")
    inputs = _inputs(1, 8, 4, 16, 1, 16, torch.float32)
    with torch.no_grad():  # no gradient will be asked for: the forward kernel is enough
        ssd_chunked_scan(**{**inputs, "x": inputs["x"].requires_grad_()}, chunk_size=4, backend="triton")
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], device=DEVICE)
    with pytest.raises(NotImplementedError, match="ssd_chunked_scan.*seq_idx / cu_seqlens"):
        ssd_chunked_scan(**inputs, chunk_size=4, seq_idx=seq_idx, backend="triton")
    cu_seqlens = torch.tensor([0, 3, 8], device=DEVICE)
    with pytest.raises(NotImplementedError, match="ssd_chunked_scan.*seq_idx / cu_seqlens"):
        ssd_chunked_scan(**inputs, chunk_size=4, cu_seqlens=cu_seqlens, backend="triton")
