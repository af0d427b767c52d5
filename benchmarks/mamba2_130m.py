"""The 130M-parameter Mamba-2 the benchmarks compare on: ssm_hub's and transformers' own, built from one set of
fields (hidden 768, 24 layers, state 128, head_dim 64, chunk 256, tied embeddings)."""

import importlib.util
import os

import torch
import transformers

import ssm_hub

OURS = "ssm_hub"
TRANSFORMERS = "transformers Mamba2ForCausalLM"
CANDIDATES = (OURS, TRANSFORMERS)


def label(candidate: str) -> str:
    """The candidate's name in result tables: ours names the backend it ran (SSM_HUB_BACKEND), transformers' the
    kernels it found (its fast path needs both mamba_ssm and causal_conv1d importable, else it runs torch code)."""
    if candidate == OURS:
        backend = os.environ.get("SSM_HUB_BACKEND", "auto")
        return f"ssm_hub ({'torch reference' if backend == 'torch' else 'backend ' + backend})"
    fast_path = all(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))
    return f"{candidate} ({'mamba_ssm + causal_conv1d kernels' if fast_path else 'torch path'})"


def mamba2_130m_fields(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=768, num_hidden_layers=24, state_size=128, expand=2, head_dim=64,
        n_groups=1, conv_kernel=4, chunk_size=256, tie_word_embeddings=True,
    )


def build(candidate: str, vocab_size: int) -> torch.nn.Module:
    fields = mamba2_130m_fields(vocab_size)
    if candidate == OURS:
        return ssm_hub.SsmHubMamba2ForCausalLM(ssm_hub.SsmHubMamba2Config(**fields))
    if candidate == TRANSFORMERS:
        config = transformers.Mamba2Config(**fields, num_heads=fields["hidden_size"] * 2 // fields["head_dim"])
        return transformers.Mamba2ForCausalLM(config)
    raise ValueError(candidate)
