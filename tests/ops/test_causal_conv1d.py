"""Causal depthwise conv1d against torch's conv1d, varlen semantics, final states, decoding steps, dispatch."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_backend_rules
from ssm_hub.backend import triton_available
from ssm_hub.ops import causal_conv1d, causal_conv1d_step

F64 = torch.float64
WIDTHS = [2, 3, 4]


def rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def torch_conv(x, weight, bias=None, activation=None, history=None):
    """torch's grouped conv1d with K - 1 zeros (or ``history`` [B, C, K - 1]) before each row."""
    width = weight.shape[1]
    seq = x.transpose(1, 2)
    seq = F.pad(seq, (width - 1, 0)) if history is None else torch.cat([history.to(x.dtype), seq], dim=-1)
    y = F.conv1d(seq, weight[:, None], bias, groups=x.shape[-1]).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_torch_conv1d(width, activation, with_bias):
    x, weight = rand(2, 33, 5), rand(5, width, seed=1)
    bias = rand(5, seed=2) if with_bias else None
    y = causal_conv1d(x, weight, bias, activation=activation)
    torch.testing.assert_close(y, torch_conv(x, weight, bias, activation))


@pytest.mark.parametrize("width", WIDTHS)
def test_gradients_match_torch_conv1d(width):
    x, weight, bias, history = rand(2, 9, 3), rand(3, width, seed=1), rand(3, seed=2), rand(2, 3, width - 1, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, history)]
    upstream = rand(2, 9, 3, seed=4)
    (causal_conv1d(*leaves[:3], activation="silu", initial_state=leaves[3]) * upstream).sum().backward()
    got = [leaf.grad for leaf in leaves]
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, history)]
    (torch_conv(*leaves[:3], activation="silu", history=leaves[3]) * upstream).sum().backward()
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g, leaf.grad)


@pytest.mark.parametrize("width", WIDTHS)
def test_initial_and_final_state(width):
    x, weight, history = rand(2, 12, 4), rand(4, width, seed=1), rand(2, 4, width - 1, seed=2)
    y, final = causal_conv1d(x, weight, initial_state=history, return_final_state=True)
    torch.testing.assert_close(y, torch_conv(x, weight, history=history))
    torch.testing.assert_close(final, x[:, -(width - 1) :].transpose(1, 2))


def test_final_state_of_a_row_shorter_than_the_window():
    x, weight, history = rand(1, 2, 3), rand(3, 4, seed=1), rand(1, 3, 3, seed=2)
    _, final = causal_conv1d(x, weight, initial_state=history, return_final_state=True)
    torch.testing.assert_close(final, torch.cat([history[..., 2:], x.transpose(1, 2)], dim=-1))
    _, final = causal_conv1d(x, weight, return_final_state=True)
    torch.testing.assert_close(final, torch.cat([torch.zeros(1, 3, 1, dtype=F64), x.transpose(1, 2)], dim=-1))


def test_final_state_in_input_dtype():
    x = rand(2, 6, 3, dtype=torch.bfloat16)
    y, final = causal_conv1d(x, rand(3, 4, seed=1).float(), initial_state=rand(2, 3, 3).float(),
                             return_final_state=True)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16


# Row 0: documents of 5, 1 (shorter than the window) and 14 tokens; row 1: 18 tokens then 2 (a short last document).
DOCS = {0: [(0, 5), (5, 6), (6, 20)], 1: [(0, 18), (18, 20)]}


@pytest.mark.parametrize("width", WIDTHS)
def test_seq_idx_packed_row_equals_documents_run_alone(width):
    x, weight, bias, history = rand(2, 20, 3), rand(3, width, seed=1), rand(3, seed=2), rand(2, 3, width - 1, seed=3)
    seq_idx = torch.zeros(2, 20, dtype=torch.int32)
    for row, docs in DOCS.items():
        for number, (start, end) in enumerate(docs):
            seq_idx[row, start:end] = number
    y, final = causal_conv1d(x, weight, bias, "silu", initial_state=history, seq_idx=seq_idx, return_final_state=True)
    for row, docs in DOCS.items():
        for number, (start, end) in enumerate(docs):
            # Only each row's first document reads the row's initial state; later ones start from zeros.
            alone, alone_final = causal_conv1d(
                x[row : row + 1, start:end], weight, bias, "silu",
                initial_state=history[row : row + 1] if number == 0 else None, return_final_state=True,
            )
            torch.testing.assert_close(y[row : row + 1, start:end], alone)
        torch.testing.assert_close(final[row : row + 1], alone_final)  # only the last document's inputs


@pytest.mark.parametrize("width", WIDTHS)
def test_cu_seqlens_documents_have_their_own_states(width):
    bounds = [0, 5, 6, 20]
    x, weight, bias = rand(1, 20, 3), rand(3, width, seed=1), rand(3, seed=2)
    history = rand(3, 3, width - 1, seed=3)
    y, final = causal_conv1d(x, weight, bias, initial_state=history, cu_seqlens=torch.tensor(bounds),
                             return_final_state=True)
    assert final.shape == (3, 3, width - 1)
    for d, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone, alone_final = causal_conv1d(x[:, start:end], weight, bias, initial_state=history[d : d + 1],
                                           return_final_state=True)
        torch.testing.assert_close(y[:, start:end], alone)
        torch.testing.assert_close(final[d : d + 1], alone_final)


@pytest.mark.parametrize("width", WIDTHS)
def test_steps_equal_the_full_conv(width):
    x, weight, bias, history = rand(2, 10, 3), rand(3, width, seed=1), rand(3, seed=2), rand(2, 3, width - 1, seed=3)
    y, final = causal_conv1d(x, weight, bias, "silu", initial_state=history, return_final_state=True)
    state, outputs = history, []
    for t in range(10):
        before = state.clone()
        y_t, next_state = causal_conv1d_step(x[:, t], state, weight, bias, "silu")
        assert torch.equal(state, before)  # the step is pure
        outputs.append(y_t)
        state = next_state
    torch.testing.assert_close(torch.stack(outputs, dim=1), y)
    torch.testing.assert_close(state, final)


def small_call(backend):
    return causal_conv1d(rand(1, 3, 2), rand(2, 4), backend=backend)


def small_step(backend):
    return causal_conv1d_step(rand(1, 2), rand(1, 2, 3), rand(2, 4), backend=backend)


@pytest.mark.parametrize("name, call", [("causal_conv1d", small_call), ("causal_conv1d_step", small_step)])
def test_backends(name, call, monkeypatch):
    assert_backend_rules(call, name, True, monkeypatch)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_triton_backend_matches_torch(how, monkeypatch):
    # On CPU the kernel runs in Triton's interpreter (conftest.py turns it on); on a GPU, on the GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.delenv("SSM_HUB_BACKEND", raising=False)
    x, history = rand(2, 9, 3, dtype=torch.float32).to(device), rand(2, 3, 3, seed=1, dtype=torch.float32).to(device)
    weight, bias = rand(3, 4, seed=2, dtype=torch.float32).to(device), rand(3, seed=3, dtype=torch.float32).to(device)
    expected = causal_conv1d(x, weight, bias, "silu", initial_state=history, return_final_state=True, backend="torch")
    if how == "environment":
        monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    y, final = causal_conv1d(x, weight, bias, "silu", initial_state=history, return_final_state=True,
                             backend="triton" if how == "argument" else "auto")
    torch.testing.assert_close(y, expected[0])
    torch.testing.assert_close(final, expected[1])


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("how", ["argument", "environment"])
def test_step_triton_backend_matches_torch(how, monkeypatch):
    # On CPU the kernel runs in Triton's interpreter (conftest.py turns it on); on a GPU, on the GPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.delenv("SSM_HUB_BACKEND", raising=False)
    x, state = rand(2, 3, dtype=torch.float32).to(device), rand(2, 3, 3, seed=1, dtype=torch.float32).to(device)
    weight, bias = rand(3, 4, seed=2, dtype=torch.float32).to(device), rand(3, seed=3, dtype=torch.float32).to(device)
    expected = causal_conv1d_step(x, state, weight, bias, "silu", backend="torch")
    if how == "environment":
        monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    y, new_state = causal_conv1d_step(x, state, weight, bias, "silu", backend="triton" if how == "argument" else "auto")
    torch.testing.assert_close(y, expected[0])
    torch.testing.assert_close(new_state, expected[1])


@pytest.mark.parametrize("width", WIDTHS)
def test_step_reads_state_slots_through_indices(width):
    x, weight, bias = rand(3, 4), rand(4, width, seed=1), rand(4, seed=2)
    pool = rand(5, 4, width - 1, seed=3)
    before = pool.clone()
    indices = torch.tensor([4, 1, 4])
    y, new_state = causal_conv1d_step(x, pool, weight, bias, "silu", state_indices=indices)
    assert torch.equal(pool, before)
    assert new_state.shape == (3, 4, width - 1)
    y_ref, new_ref = causal_conv1d_step(x, pool[indices], weight, bias, "silu")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(new_state, new_ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"state_indices must have an integer dtype"):
        causal_conv1d_step(x, pool, weight, state_indices=indices.double())
    with pytest.raises(ValueError, match=r"state_indices must have shape \[B\] = \(3,\), got \(2,\)"):
        causal_conv1d_step(x, pool, weight, state_indices=indices[:2])
    with pytest.raises(ValueError, match=rf"conv_state must have shape \[slots, C, K - 1\] = \(5, 4, {width - 1}\)"):
        causal_conv1d_step(x, rand(5, 4, width), weight, state_indices=indices)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(x=rand(2, 6)), r"x must have shape \[B, T, C\]"),
        (dict(weight=rand(3, 4)), r"weight must have shape \[C, K\] with C = 4 and K >= 2, got \(3, 4\)"),
        (dict(weight=rand(4, 1)), r"weight must have shape \[C, K\] with C = 4 and K >= 2, got \(4, 1\)"),
        (dict(bias=rand(3)), r"bias must have shape \[C\] = \(4,\), got \(3,\)"),
        (dict(activation="relu"), r"activation must be one of \(None, 'silu'\), got 'relu'"),
        (dict(initial_state=rand(2, 4, 2)), r"initial_state must have shape \[B, C, K - 1\] = \(2, 4, 3\), got"),
        (dict(seq_idx=torch.zeros(2, 5, dtype=torch.int32)), r"seq_idx must have shape \[B, T\]"),
        (dict(cu_seqlens=torch.tensor([0, 6])), r"cu_seqlens .* batch size must be 1"),
        (dict(seq_idx=torch.zeros(2, 6, dtype=torch.int32), cu_seqlens=torch.tensor([0, 6])), r"not both"),
    ],
)
def test_bad_inputs_name_the_argument(changes, message):
    args = dict(x=rand(2, 6, 4), weight=rand(4, 4), bias=None, activation=None)
    with pytest.raises(ValueError, match=message):
        causal_conv1d(**{**args, **changes})


def test_bad_step_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"conv_state must have shape \[B, C, K - 1\] = \(2, 4, 3\), got \(2, 4, 4\)"):
        causal_conv1d_step(rand(2, 4), rand(2, 4, 4), rand(4, 4))
    with pytest.raises(ValueError, match=r"activation must be one of"):
        causal_conv1d_step(rand(2, 4), rand(2, 4, 3), rand(4, 4), activation="gelu")
