"""Mamba-2's one-op decode step (ssm_hub.ops.mamba2_decode) against the ops it chains: the same kernels on the same
inputs, so outputs and both updated states are bit for bit those of (add_rms_norm,) linear_conv_step,
ssd_step(in_place=True) and gated_rms_norm_linear. Also which calls it declines, and that a model's eager decode runs
it."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from kernel_testing import DEVICE, requires_triton
from ssm_hub.ops.gated_rms_norm import add_rms_norm
from ssm_hub.ops.linear import gated_rms_norm_linear, linear_conv_step
from ssm_hub.ops.mamba2_decode import Mamba2DecodeWeights, PreNorm, mamba2_decode_on_kernels, mamba2_decode_step
from ssm_hub.ops.mamba2_sequence import Mamba2Sizes
from ssm_hub.ops.ssd import ssd_step

pytestmark = requires_triton

HIDDEN, D_INNER, HEADS, HEAD_DIM, STATE, WIDTH = 24, 48, 6, 8, 16, 4


def _sizes(n_groups, norm_groups, norm_before_gate, dtype):
    return Mamba2Sizes(D_INNER, n_groups, STATE, HEADS, HEAD_DIM, 8, (0.001, 0.5), norm_groups, 1e-5,
                       norm_before_gate, dtype)


def _inputs(sizes, dtype, bias):
    conv_dim = D_INNER + 2 * sizes.n_groups * STATE

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

    weights = Mamba2DecodeWeights(
        in_weight=randn(D_INNER + conv_dim + HEADS, HIDDEN, scale=HIDDEN ** -0.5),
        in_bias=randn(D_INNER + conv_dim + HEADS) if bias else None,
        conv_weight=randn(conv_dim, WIDTH, scale=0.5), conv_bias=randn(conv_dim) if bias else None,
        A_log=randn(HEADS), D=randn(HEADS), dt_bias=randn(HEADS),
        norm_weight=(torch.rand(D_INNER, device=DEVICE) + 0.5).to(dtype),
        out_weight=randn(HIDDEN, D_INNER, scale=D_INNER ** -0.5), out_bias=randn(HIDDEN) if bias else None,
    )
    hidden = randn(1, 1, HIDDEN)
    conv_state = randn(1, conv_dim, WIDTH - 1)
    ssm_state = torch.randn(1, HEADS, HEAD_DIM, STATE, device=DEVICE)
    return hidden, conv_state, ssm_state, weights


def _op_by_op(hidden, conv_state, ssm_state, w, sizes):
    """The mixer's decode as the three ops, each on the kernels."""
    groups = sizes.n_groups * STATE
    projected, xBC = linear_conv_step(hidden, w.in_weight, w.in_bias, conv_state, w.conv_weight, w.conv_bias,
                                      conv_start=D_INNER, activation="silu", backend="triton")
    gate, dt = projected[..., :D_INNER], projected[..., D_INNER + xBC.shape[-1]:]
    x, B, C = xBC.split([D_INNER, groups, groups], -1)
    y, _ = ssd_step(ssm_state, x.view(1, HEADS, HEAD_DIM), dt[:, 0], w.A_log, B.view(1, sizes.n_groups, STATE),
                    C.view(1, sizes.n_groups, STATE), D=w.D, dt_bias=w.dt_bias, dt_softplus=True,
                    dt_limit=sizes.dt_limit, A_is_log=True, in_place=True, backend="triton")
    return gated_rms_norm_linear(y.reshape(1, 1, D_INNER), gate, w.norm_weight, w.out_weight, w.out_bias,
                                 n_groups=sizes.norm_groups, eps=sizes.norm_eps,
                                 norm_before_gate=sizes.norm_before_gate, backend="triton")


# Each option in each value across two runs (the interpreter takes seconds a run). residual: the dtype of the
# residual stream a pre-norm block hands in (float32 with residual_in_fp32), or None for the mixer's op alone.
@pytest.mark.parametrize("dtype, n_groups, norm_groups, norm_before_gate, bias, residual", [
    (torch.bfloat16, 1, 1, False, False, torch.float32), (torch.float16, 2, 3, True, True, None),
])
def test_the_one_op_step_is_the_ops_it_chains(dtype, n_groups, norm_groups, norm_before_gate, bias, residual,
                                              monkeypatch):
    # CPU runs need the interpreter chosen explicitly ("auto" dispatches CPU tensors to torch).
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    sizes = _sizes(n_groups, norm_groups, norm_before_gate, dtype)
    hidden, conv_state, ssm_state, weights = _inputs(sizes, dtype, bias)
    pre_norm = None
    if residual is not None:
        pre_norm = PreNorm(torch.randn(1, 1, HIDDEN, device=DEVICE).to(residual),
                           (torch.rand(HIDDEN, device=DEVICE) + 0.5).to(dtype), 1e-5)
    want_conv_state, want_ssm_state = conv_state.clone(), ssm_state.clone()
    with torch.no_grad():
        assert mamba2_decode_on_kernels(hidden, conv_state, ssm_state, weights, sizes, pre_norm)
        for _ in range(3):  # the states carry from step to step
            mixer_input = hidden
            if pre_norm is not None:
                mixer_input, want_total = add_rms_norm(hidden, *pre_norm, backend="triton")
            want = _op_by_op(mixer_input, want_conv_state, want_ssm_state, weights, sizes)
            got = mamba2_decode_step(hidden, conv_state, ssm_state, weights, sizes, pre_norm)
            if pre_norm is not None:
                got, total = got
                assert total.dtype == residual and torch.equal(total, want_total)
            assert got.shape == (1, 1, HIDDEN) and got.dtype == dtype
            assert torch.equal(got, want)
            assert torch.equal(conv_state, want_conv_state) and torch.equal(ssm_state, want_ssm_state)
    assert bool(torch.isfinite(got).all())


def test_calls_the_kernels_do_not_cover_go_op_by_op(monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    sizes = _sizes(1, 1, False, torch.bfloat16)
    hidden, conv_state, ssm_state, weights = _inputs(sizes, torch.bfloat16, True)
    with torch.no_grad():
        assert mamba2_decode_on_kernels(hidden, conv_state, ssm_state, weights, sizes)
        assert not mamba2_decode_on_kernels(hidden.expand(2, 1, HIDDEN), conv_state.expand(2, -1, -1),
                                            ssm_state.expand(2, -1, -1, -1), weights, sizes)  # two rows
        assert not mamba2_decode_on_kernels(hidden.float(), conv_state, ssm_state, weights, sizes)  # float32 row
        assert not mamba2_decode_on_kernels(hidden, conv_state[..., :1], ssm_state, weights, sizes)  # wrong window
        assert not mamba2_decode_on_kernels(hidden, conv_state, ssm_state[..., :8], weights, sizes)  # wrong state
        wide = sizes._replace(intermediate_size=8192)
        assert not mamba2_decode_on_kernels(hidden, conv_state, ssm_state, weights, wide)  # norm row > one block
        pre_norm = PreNorm(hidden.float(), torch.ones(HIDDEN, device=DEVICE, dtype=torch.bfloat16), 1e-5)
        assert mamba2_decode_on_kernels(hidden, conv_state, ssm_state, weights, sizes, pre_norm)
        assert not mamba2_decode_on_kernels(hidden, conv_state, ssm_state, weights, sizes,
                                            pre_norm._replace(residual=hidden.float()[0]))  # residual of another shape
        assert not mamba2_decode_on_kernels(hidden, conv_state, ssm_state, weights, sizes,
                                            pre_norm._replace(weight=pre_norm.weight.float()))  # float32 norm weight
    trainable = weights._replace(out_weight=weights.out_weight.clone().requires_grad_())
    assert not mamba2_decode_on_kernels(hidden, conv_state, ssm_state, trainable, sizes)  # gradients needed
    monkeypatch.setenv("SSM_HUB_BACKEND", "torch")
    with torch.no_grad():
        assert not mamba2_decode_on_kernels(hidden, conv_state, ssm_state, weights, sizes)


# (model type, config overrides, the residual step per Mamba-2 layer call of one decode step: whether the layer's
# block hands its residual add and norm to the op). The pure model's first block has no residual stream to add to;
# the hybrid's Mamba-2 layer follows an attention layer.
MODELS = {
    "mamba2": ("ssm_hub_mamba2", {}, [False, True]),
    "hybrid": ("ssm_hub_hybrid", dict(mixer_types=["attention", "mamba2", "mamba"], ffn_types=["mlp", "mlp", "none"]),
               [True]),
}


@pytest.mark.parametrize("model", MODELS)
def test_an_eager_decode_step_of_the_model_runs_the_one_op(model, monkeypatch):
    """A bf16 model's decode steps on the kernels (the interpreter on CPU): every Mamba-2 layer runs the one op, with
    its block's residual step and norm where there is a residual stream, and the logits are those of the
    op-by-op path."""
    import ssm_hub.layers.mamba2_mixer as mixer_module
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    model_type, overrides, pattern = MODELS[model]
    torch.manual_seed(0)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE, torch.bfloat16).eval()
    prompt = torch.randint(1, config.vocab_size, (1, 5), device=DEVICE)
    tokens = torch.randint(1, config.vocab_size, (2, 1, 1), device=DEVICE)

    def decode():
        monkeypatch.setenv("SSM_HUB_BACKEND", "torch")  # the prefill's scan would take seconds in the interpreter
        cache = DynamicCache(config=config)
        model(prompt, cache=cache, use_cache=True)
        monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
        return [model(token, cache=cache, use_cache=True).logits for token in tokens]

    one_op = mixer_module.mamba2_decode_step
    calls = []
    monkeypatch.setattr(mixer_module, "mamba2_decode_step",
                        lambda *args: calls.append(args[-1] is not None) or one_op(*args))
    with torch.no_grad():
        got = decode()
        assert calls == pattern * len(tokens)
        monkeypatch.setattr(mixer_module, "mamba2_decode_on_kernels", lambda *args: False)
        want = decode()
    assert len(calls) == len(pattern) * len(tokens)  # the op-by-op run did not call it
    for got_logits, want_logits in zip(got, want):
        assert torch.equal(got_logits, want_logits)


def test_the_one_op_step_traces_into_one_compiled_graph(monkeypatch):
    """generate(cache_implementation="static") compiles the decode step: through its fake implementation the op
    traces into one graph (aot_eager here, as tests/models/test_compile_training.py does on CPU), which runs it with
    eager's logits and states."""
    from conftest import tiny_config
    from ssm_hub import SsmHubMamba2ForCausalLM

    torch.manual_seed(0)
    config = tiny_config("ssm_hub_mamba2")
    model = SsmHubMamba2ForCausalLM(config).to(DEVICE, torch.bfloat16).eval()
    prompt = torch.randint(1, config.vocab_size, (1, 5), device=DEVICE)
    token = torch.randint(1, config.vocab_size, (1, 1), device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    with torch.no_grad():
        for run in (model, compiled):
            monkeypatch.setenv("SSM_HUB_BACKEND", "torch")
            cache = StaticCache(config=config, max_cache_len=8)
            model(prompt, cache=cache, use_cache=True)
            monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
            logits = run(token, cache=cache, use_cache=True).logits
            results.append((logits, cache.get_conv_state(1).clone(), cache.get_recurrent_state(1).clone()))
        graph = torch._dynamo.explain(lambda t: model(t, cache=cache, use_cache=True).logits)(token)
    assert graph.graph_count == 1 and graph.graph_break_count == 0
    assert "ssm_hub.mamba2_decode_step" in "".join(str(g.graph) for g in graph.graphs)
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)
