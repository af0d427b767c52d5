"""KernelLinear and the SwiGLU feed-forward's fused projections: the same function as nn.Linear, adapters and hooks
still apply, and a bf16 decode step of one sequence runs the decode kernels (the matrix-vector product and the fused
residual add + RMSNorm; Triton's interpreter on a CPU) with the torch path's result."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, StaticCache

import ssm_hub
from ssm_hub.backend import triton_available
from ssm_hub.kernels import gated_rms_norm, gemv
from ssm_hub.layers.linear import KernelLinear, is_plain_linear
from ssm_hub.layers.mlp import SwiGLUMLP

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a CPU the kernels run in Triton's interpreter
# On a GPU "auto" must pick the decode kernels by itself; on a CPU only a forced "triton" runs them.
KERNEL_BACKEND = "auto" if DEVICE == "cuda" else "triton"


def test_kernel_linear_is_an_nn_linear():
    plain, ours = nn.Linear(16, 8), KernelLinear(16, 8)
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(3, 16)
    assert isinstance(ours, nn.Linear) and is_plain_linear(ours) and not is_plain_linear(plain)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)


def test_swiglu_projections_honour_hooks_and_adapters():
    mlp = SwiGLUMLP(16, 24).eval()
    x = torch.randn(2, 1, 16)
    gate, up = F.linear(x, mlp.gate_proj.weight), F.linear(x, mlp.up_proj.weight)
    torch.testing.assert_close(mlp(x), F.linear(F.silu(gate) * up, mlp.down_proj.weight))

    handle = mlp.up_proj.register_forward_hook(lambda module, inputs, output: 2 * output)
    assert not is_plain_linear(mlp.up_proj)
    torch.testing.assert_close(mlp(x), F.linear(F.silu(gate) * 2 * up, mlp.down_proj.weight))
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda module, inputs, output: output)
    assert not is_plain_linear(mlp.up_proj)  # a global hook must run too
    handle.remove()
    mlp.gate_proj.forward = lambda inputs: torch.zeros(2, 1, 24)  # as accelerate's offloading replaces forward
    assert not is_plain_linear(mlp.gate_proj)
    torch.testing.assert_close(mlp(x), torch.zeros(2, 1, 16))
    del mlp.gate_proj.forward

    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(SwiGLUMLP(16, 24), LoraConfig(r=2, target_modules=["gate_proj"], init_lora_weights=False))
    base = adapted.base_model.model
    lora_gate = base.gate_proj(x)
    assert not torch.allclose(lora_gate, F.linear(x, base.gate_proj.base_layer.weight))
    torch.testing.assert_close(adapted(x), base.down_proj(F.silu(lora_gate) * base.up_proj(x)))


def test_a_hooked_norm_runs_as_itself_in_the_block():
    """The block's fused residual add + norm must not skip hooks: with a global forward hook every RMSNorm runs as
    a module (the block's two and the final one)."""
    from ssm_hub.layers.norms import RMSNorm

    config = ssm_hub.SsmHubHybridConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, mixer_types=["mamba2"],
                                        intermediate_size=48, mamba_d_state=8, mamba_d_head=8, mamba_chunk_size=8)
    model = AutoModelForCausalLM.from_config(config).eval()
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: seen.append(module) if isinstance(module, RMSNorm) else None)
    try:
        model(torch.randint(1, 97, (1, 5)))
    finally:
        handle.remove()
    assert len(seen) == 3


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_bf16_decode_step_on_the_kernels_matches_the_torch_path(monkeypatch):
    """A hybrid with Mamba-2, attention and Mamba-1 layers and SwiGLU MLPs, in bf16: one decode step after a prefill,
    on the kernels and in torch, from the same cache. Every projection of the step goes through the matrix-vector
    kernel (Mamba-2's in_proj with its conv step behind and out_proj with the mixer's gated norm in front), and each
    residual add with the norm after it through one add_rms_norm launch."""
    config = ssm_hub.SsmHubHybridConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=3, mixer_types=["mamba2", "attention", "mamba"],
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, mamba_d_state=16, mamba_d_head=16,
        mamba_chunk_size=8)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE, torch.bfloat16).eval()
    prompt, token = torch.randint(1, 97, (1, 6), device=DEVICE), torch.randint(1, 97, (1, 1), device=DEVICE)
    launches = {"gemv": [], "normed gemv": [], "gemv with conv step": [], "rms_norm": [], "add_rms_norm": []}
    launch_gemv, launch_norm = gemv.gemv_fwd, gated_rms_norm.gated_rms_norm_fwd

    def counted_gemv(*args, norm=None, conv=None, residual=None):
        launches["gemv"].append(args)
        if norm is not None:
            launches["normed gemv"].append(args)
        if conv is not None:
            launches["gemv with conv step"].append(args)
        assert residual is None  # the hybrid's blocks add their residual in add_rms_norm
        return launch_gemv(*args, norm=norm, conv=conv, residual=residual)

    def counted_norm(*args, residual=None, out_dtype=None):
        launches["add_rms_norm" if residual is not None else "rms_norm"].append(args)
        return launch_norm(*args, residual=residual, out_dtype=out_dtype)

    monkeypatch.setattr(gemv, "gemv_fwd", counted_gemv)

    monkeypatch.setattr(gated_rms_norm, "gated_rms_norm_fwd", counted_norm)
    logits = {}
    for backend in ("torch", KERNEL_BACKEND):
        monkeypatch.setenv("SSM_HUB_BACKEND", backend)
        cache = StaticCache(config=config, max_cache_len=8)
        with torch.no_grad():
            model(prompt, cache=cache, use_cache=True)
            for calls in launches.values():
                calls.clear()
            logits[backend] = model(token, cache=cache, use_cache=True).logits.float()
    # Mamba-2: in_proj, out_proj; attention: q, k, v, o; Mamba-1: in_proj, x_proj, dt_proj, out_proj; each of the
    # three MLPs: gate and up as one launch, down.
    assert len(launches["gemv"]) == 2 + 4 + 4 + 3 * 2
    assert len(launches["normed gemv"]) == len(launches["gemv with conv step"]) == 1
    # Only the first block's input norm stands alone (the Mamba-2 mixer's gated norm runs in its out_proj); every
    # later norm adds the residual first: the other blocks' input norms, the three pre-MLP norms and the final norm.
    assert len(launches["rms_norm"]) == 1
    assert len(launches["add_rms_norm"]) == 2 + 3 + 1
    torch.testing.assert_close(logits[KERNEL_BACKEND], logits["torch"], rtol=2e-2, atol=2e-2)
