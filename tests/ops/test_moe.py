"""The routed-experts op: the reference against a dense float64 definition, and grouped_mm against the loop."""

import pytest
import torch
import torch.nn.functional as F

import ssm_hub.ops.moe as moe_op
from ssm_hub.ops.moe import grouped_mm_supported, moe_experts, moe_experts_ref

needs_grouped_mm = pytest.mark.skipif(
    not grouped_mm_supported("cpu", torch.float32), reason="this torch has no CPU grouped_mm in float32"
)


def make_inputs(tokens=13, hidden=8, intermediate=4, experts=5, top_k=2, dtype=torch.float32, indices=None):
    if indices is None:
        indices = torch.rand(tokens, experts).argsort(dim=-1)[:, :top_k]  # k distinct experts per token
    return dict(
        hidden=torch.randn(tokens, hidden, dtype=dtype, requires_grad=True),
        expert_indices=indices,
        expert_weights=torch.rand(indices.shape, dtype=dtype, requires_grad=True),
        gate_up_proj=torch.randn(experts, 2 * intermediate, hidden, dtype=dtype, requires_grad=True),
        down_proj=torch.randn(experts, hidden, intermediate, dtype=dtype, requires_grad=True),
    )


GRAD_NAMES = ("hidden", "expert_weights", "gate_up_proj", "down_proj")


def forward_and_grads(inputs, implementation):
    out = moe_experts(**inputs, implementation=implementation)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * grad_out).sum(), [inputs[name] for name in GRAD_NAMES])
    return out, dict(zip(GRAD_NAMES, grads))


def dense_definition(hidden, expert_indices, expert_weights, gate_up_proj, down_proj):
    """Every expert on every token, then each token's k picks weighted and summed."""
    intermediate = down_proj.shape[2]
    gate_up = torch.einsum("eoh,th->teo", gate_up_proj, hidden)
    act = F.silu(gate_up[..., :intermediate]) * gate_up[..., intermediate:]
    all_experts = torch.einsum("ehi,tei->teh", down_proj, act)  # [T, E, H]
    picked = torch.gather(all_experts, 1, expert_indices[..., None].expand(-1, -1, hidden.shape[1]))
    return (picked * expert_weights[..., None]).sum(dim=1)


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_reference_matches_dense_definition_in_float64(top_k):
    inputs = make_inputs(top_k=top_k, dtype=torch.float64)
    torch.testing.assert_close(moe_experts_ref(**inputs), dense_definition(**inputs), rtol=1e-12, atol=1e-12)


def test_reference_in_bfloat16_returns_hiddens_dtype():
    inputs = {name: value.detach().bfloat16() if value.is_floating_point() else value
              for name, value in make_inputs(hidden=16, intermediate=8).items()}
    out = moe_experts_ref(**inputs)
    assert out.dtype == torch.bfloat16
    expected = dense_definition(**{n: v.double() if v.is_floating_point() else v for n, v in inputs.items()})
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())


CASES = {
    "k2": dict(top_k=2),
    "k1": dict(top_k=1),
    "k_equals_E": dict(top_k=5),
    # experts 1, 3 and 4 receive no token
    "idle_experts": dict(indices=torch.tensor([[0, 2], [2, 0]]).repeat(7, 1)[:13]),
    "same_expert_twice": dict(indices=torch.tensor([[1, 1], [3, 0]]).repeat(7, 1)[:13]),
    "one_token": dict(tokens=1, top_k=3),
}


@pytest.mark.parametrize("implementation", [pytest.param("grouped_mm", marks=needs_grouped_mm), "dense"])
@pytest.mark.parametrize("case", CASES)
def test_implementation_matches_loop_forward_and_every_gradient(implementation, case):
    inputs = make_inputs(**CASES[case])
    out_loop, grads_loop = forward_and_grads(inputs, "loop")
    out, grads = forward_and_grads(inputs, implementation)
    torch.testing.assert_close(out, out_loop, rtol=1e-5, atol=1e-5)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads[name], grads_loop[name], rtol=1e-5, atol=1e-5, msg=name)
    if case == "idle_experts":
        for name in ("gate_up_proj", "down_proj"):
            assert grads[name][[1, 3, 4]].abs().max() == 0
            assert grads[name][[0, 2]].abs().max() > 0


@needs_grouped_mm
def test_grouped_mm_matches_loop_in_bfloat16():
    inputs = {name: value.detach().bfloat16() if value.is_floating_point() else value
              for name, value in make_inputs(tokens=32, hidden=16, intermediate=8).items()}
    out_grouped = moe_experts(**inputs, implementation="grouped_mm")
    assert out_grouped.dtype == torch.bfloat16
    torch.testing.assert_close(out_grouped, moe_experts(**inputs, implementation="loop"), rtol=2e-2, atol=2e-2)


def _spy_on_grouped(monkeypatch):
    calls = []
    real = moe_op._moe_experts_grouped_mm

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(moe_op, "_moe_experts_grouped_mm", spy)
    return calls


@needs_grouped_mm
def test_auto_runs_grouped_mm_where_it_works(monkeypatch):
    calls = _spy_on_grouped(monkeypatch)
    inputs = make_inputs()
    torch.testing.assert_close(moe_experts(**inputs), moe_experts(**inputs, implementation="loop"))
    assert calls == [1]


@pytest.mark.parametrize("case", ["float64", "rows_not_16_bytes", "no_grouped_mm_in_torch"])
def test_auto_falls_back_to_the_loop(monkeypatch, case):
    calls = _spy_on_grouped(monkeypatch)
    if case == "no_grouped_mm_in_torch":
        monkeypatch.setattr(moe_op, "_grouped_mm_function", lambda: None)
    inputs = make_inputs(
        hidden=6 if case == "rows_not_16_bytes" else 8, dtype=torch.float64 if case == "float64" else torch.float32
    )
    out, grads = forward_and_grads(inputs, "auto")
    out_loop, grads_loop = forward_and_grads(inputs, "loop")
    torch.testing.assert_close(out, out_loop, rtol=0, atol=0)
    assert calls == []
    with pytest.raises(NotImplementedError, match="grouped_mm"):
        moe_experts(**inputs, implementation="grouped_mm")


@needs_grouped_mm
def test_auto_takes_the_dense_form_while_a_cuda_graph_is_captured(monkeypatch):
    # torch's CUDA grouped_mm copies between host and device, which a capture (generate's decode step) refuses,
    # and the loop reads token counts on the host: auto runs every expert on every token instead.
    calls = _spy_on_grouped(monkeypatch)
    monkeypatch.setattr(moe_op, "_capturing", lambda device: True)
    inputs = make_inputs()
    out = moe_experts(**inputs)
    assert calls == []
    torch.testing.assert_close(out, moe_experts(**inputs, implementation="dense"), rtol=0, atol=0)
    torch.testing.assert_close(out, moe_experts(**inputs, implementation="loop"))


def test_unknown_implementation_names_the_valid_ones():
    with pytest.raises(ValueError, match="implementation.*'auto', 'loop', 'grouped_mm', 'dense'"):
        moe_experts(**make_inputs(), implementation="sparse")


def test_auto_under_compile_traces_without_graph_breaks_where_grouped_mm_cannot():
    inputs = make_inputs(dtype=torch.float32)  # compile traces grouped_mm in bfloat16 only: auto takes "dense"
    explanation = torch._dynamo.explain(lambda **kw: moe_experts(**kw))(**inputs)
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    compiled = torch.compile(lambda **kw: moe_experts(**kw), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(**inputs), moe_experts(**inputs, implementation="loop"))


@pytest.mark.parametrize(
    "name, bad",
    [
        ("hidden", lambda t: t["hidden"][None]),
        ("expert_indices", lambda t: t["expert_indices"].float()),
        ("expert_indices", lambda t: t["expert_indices"][:-1]),
        ("expert_weights", lambda t: t["expert_weights"][:, :1]),
        ("gate_up_proj", lambda t: t["gate_up_proj"][:, :-1]),
        ("gate_up_proj", lambda t: t["gate_up_proj"][..., :-1]),
        ("down_proj", lambda t: t["down_proj"][:-1]),
    ],
)
def test_bad_inputs_raise_naming_the_argument(name, bad):
    inputs = make_inputs()
    inputs[name] = bad(inputs)
    for implementation in ("loop", "auto"):
        with pytest.raises(ValueError, match=name):
            moe_experts(**inputs, implementation=implementation)
