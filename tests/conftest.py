"""Shared fixtures: tiny configs of every ssm_hub architecture, so each model test runs for all of them."""

import json
import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it is chosen when triton is imported, so it
# must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Python processes the tests start (`python -c`, `python -m`) must not put the working directory first on sys.path:
# in the repository root, its kernels/ folder would shadow Hugging Face's `kernels` package, which transformers
# imports (a dependency from transformers 5.25), and its ssm_hub/ folder the wheel that CI installs.
os.environ["PYTHONSAFEPATH"] = "1"

import pytest  # noqa: E402

import ssm_hub  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """transformers' common tests marked full_run_only (tests/transformers_common) run only when the run asks for
    ``-m transformers_common``; the README's ``pytest -q`` keeps CI's time bounded without them."""
    if "transformers_common" in (config.option.markexpr or ""):
        return
    kept, deselected = [], []
    for item in items:
        mark = item.get_closest_marker("transformers_common")
        (deselected if mark is not None and mark.kwargs.get("full_run_only") else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


def tiny_config(model_type: str, **overrides):
    if model_type == "ssm_hub_mamba":
        fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4)
        return ssm_hub.SsmHubMambaConfig(**{**fields, **overrides})
    if model_type == "ssm_hub_mamba2":
        fields = dict(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, n_groups=2,
            conv_kernel=4, chunk_size=8,
        )
        return ssm_hub.SsmHubMamba2Config(**{**fields, **overrides})
    if model_type == "ssm_hub_hybrid":
        # Mamba-2 + MLP, attention + MoE, Mamba-1 without a feed-forward: every layer kind a decode step captures.
        fields = dict(
            vocab_size=64, hidden_size=32, num_hidden_layers=3, mixer_types=["mamba2", "attention", "mamba"],
            ffn_types=["mlp", "moe", "none"], num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_head=8, mamba_n_groups=2,
            mamba_chunk_size=8,
        )
        return ssm_hub.SsmHubHybridConfig(**{**fields, **overrides})
    if model_type == "ssm_hub_multimodal":
        # The hybrid's layer kinds with the image side; text only (no image token ids), as a language model.
        fields = dict(
            vocab_size=64, hidden_size=32, num_hidden_layers=3, mixer_types=["mamba2", "attention", "mamba"],
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, mamba_d_state=8, mamba_d_head=8,
            mamba_n_groups=2, mamba_chunk_size=8, patch_size=4, mixture_of_mamba=True,
        )
        return ssm_hub.SsmHubMultimodalConfig(**{**fields, **overrides})
    raise ValueError(model_type)


MODEL_TYPES = ["ssm_hub_mamba", "ssm_hub_mamba2"]
# Every model type with a causal-LM class (AutoModelForCausalLM), and which of them have attention layers.
CAUSAL_LM_TYPES = [*MODEL_TYPES, "ssm_hub_hybrid", "ssm_hub_multimodal"]
WITH_ATTENTION = ("ssm_hub_hybrid", "ssm_hub_multimodal")


@pytest.fixture(params=MODEL_TYPES)
def model_type(request):
    return request.param


@pytest.fixture(params=CAUSAL_LM_TYPES)
def causal_lm_type(request):
    return request.param


@pytest.fixture(params=[{}, {"disable_compile": True}], ids=["default decoder", "transformers loop"])
def decoding(request):
    """generate() keyword arguments for each decoding path: the default (ssm_hub.generation's decoder) and
    transformers' own loop."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomised(model, scale: float = 0.05):
    """Perturb every parameter by ``scale`` standard deviations: transformers and ssm_hub initialise norms and D to
    ones, and a weight map that swapped two such tensors would otherwise go unnoticed in the logits. A larger scale
    makes a tiny model's tokens depend on its state more (a wrong state shows in greedy tokens)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def scaled_rope_parameters(rope_type: str, head_dim: int, original_max_position_embeddings: int,
                           partial_rotary_factor: float = 1.0, rope_theta: float = 500.0) -> dict:
    """transformers v5 ``rope_parameters`` of each scaled RoPE type (every type of transformers' ROPE_INIT_FUNCTIONS)
    for heads of ``head_dim`` channels, with values away from the defaults, so that a key left unread shows."""
    frequencies = int(head_dim * partial_rotary_factor) // 2
    keys = {
        "linear": dict(factor=4.0),
        "dynamic": dict(factor=4.0),
        "yarn": dict(factor=4.0, original_max_position_embeddings=original_max_position_embeddings, beta_fast=8.0),
        "longrope": dict(original_max_position_embeddings=original_max_position_embeddings,
                         short_factor=[1.0 + i / 8 for i in range(frequencies)],
                         long_factor=[2.0 + i for i in range(frequencies)]),
        "llama3": dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=original_max_position_embeddings),
        "proportional": dict(factor=2.0),
    }[rope_type]
    return {"rope_type": rope_type, "rope_theta": rope_theta, "partial_rotary_factor": partial_rotary_factor, **keys}


def assert_backend_rules(call, op_name: str, has_kernel: bool, monkeypatch) -> None:
    """The dispatch rules of ssm_hub.backend for one op, on CPU tensors without Triton's interpreter.

    ``call(backend)`` runs the op on small CPU inputs. "torch" and "auto" always run; "triton" cannot run here
    (no kernel, or no GPU and no interpreter) and must say why; an unknown backend is a ValueError; the
    environment variable decides what "auto" means while an explicit backend wins.
    """
    monkeypatch.delenv("SSM_HUB_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    call("torch")
    call("auto")
    reason = "not CUDA tensors|triton is not installed" if has_kernel else "no Triton kernel"
    with pytest.raises(NotImplementedError, match=f"{op_name}.*({reason})"):
        call("triton")
    with pytest.raises(ValueError, match="backend"):
        call("cuda")
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    with pytest.raises(NotImplementedError, match=op_name):
        call("auto")
    call("torch")
    monkeypatch.setenv("SSM_HUB_BACKEND", "torch")
    call("auto")


def assert_decode_step_is_one_graph(model, backend: str, monkeypatch) -> None:
    """After a 5-token prefill into a StaticCache, one decode step under ``backend`` traces into a single graph
    with no graph break (what torch.compile of a generate step needs)."""
    from transformers import StaticCache

    vocab = model.config.vocab_size
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(torch.randint(1, vocab, (1, 5)), cache=cache, use_cache=True)
        # Decode steps only run step kernels, so forcing triton reaches every kernel a token uses.
        monkeypatch.setenv("SSM_HUB_BACKEND", backend)
        explanation = torch._dynamo.explain(lambda token: model(token, cache=cache, use_cache=True).logits)(
            torch.randint(1, vocab, (1, 1))
        )
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def with_short_chunks(student, chunk_size: int = 32):
    """The seeded ``student`` folder with its Mamba-2 layers scanning in chunks of ``chunk_size`` tokens.

    seed_hybrid keeps SsmHubHybridConfig's chunks of 256 tokens (a GPU's); on CPU the torch scan pads every sequence
    to whole chunks and builds a [chunk, chunk] decay matrix per head and chunk, so each 32- or 64-token row of these
    runs would cost a 256-token one (most of these tests' time). The scan's result does not depend on the chunk
    length beyond rounding, and nothing here reads it."""
    config_file = student / "config.json"
    config = json.loads(config_file.read_text())
    config["mamba_chunk_size"] = chunk_size
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return student
