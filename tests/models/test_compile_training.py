"""torch.compile(model) for training: every model type traces with the Triton ops (custom ops with fake
implementations) into one graph and gives eager's loss and gradients, and the recipe key ``train.torch_compile``
compiles the model Trainer trains.

On CPU the kernels run in Triton's interpreter and the compiled graph on the ``aot_eager`` backend (inductor's CPU
path would build C++ for every test); the GPU timings of inductor are benchmarks/timing/against_llama.py's.
Run: pytest tests/models/test_compile_training.py
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import randomised, tiny_config
from ssm_hub.training import load_recipe, train
from ssm_hub.training.config import recipe_path

MIXER_FILES = ("mamba_mixer.py", "mamba2_mixer.py")


def loss_and_gradients(model, run, **inputs):
    """(loss, gradients by parameter name) of one step of ``run`` (the model, or its compiled wrapper)."""
    model.zero_grad(set_to_none=True)
    loss = run(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_compiled_matches_eager(model, fullgraph: bool, **inputs):
    expected_loss, expected_grads = loss_and_gradients(model, model, **inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    loss, grads = loss_and_gradients(model, compiled, **inputs)
    # fp32 throughout; the compiled graph may fuse or reorder a sum, so a few ulps apart.
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("model_type", ["ssm_hub_mamba", "ssm_hub_mamba2", "ssm_hub_hybrid"])
def test_training_step_compiles_in_one_graph_and_matches_eager(model_type, monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")  # the kernels' custom ops, not the torch reference
    torch._dynamo.reset()
    # hidden_size 16, not the tiny configs' 32: the same layers, ops and graph with half the channels and heads, so
    # fewer kernel programs, which Triton's interpreter runs one by one (most of this test's time).
    model = randomised(AutoModelForCausalLM.from_config(tiny_config(model_type, hidden_size=16))).train()
    assert_compiled_matches_eager(model, fullgraph=True, input_ids=torch.randint(1, 64, (2, 16)))


def test_multimodal_training_breaks_the_graph_only_where_images_are_placed(monkeypatch):
    from test_multimodal_model import image_tokens, model_for, padded

    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")
    torch._dynamo.reset()
    model = model_for().train()
    pixels, sizes = padded([torch.randn(3, 8, 4), torch.randn(3, 4, 8)])
    inputs = dict(input_ids=torch.tensor([[5, *image_tokens(8, 4), 7], [6, 7, 8, *image_tokens(4, 8)]]),
                  pixel_values=pixels, image_sizes=sizes)
    # Where the images go depends on the data (placeholder counts, modality routing): those breaks are expected;
    # none may come from a mixer.
    explanation = torch._dynamo.explain(lambda: model(**inputs, labels=inputs["input_ids"]).loss)()
    frames = [frame.filename for reason in explanation.break_reasons for frame in reason.user_stack]
    assert frames and not [f for f in frames if f.endswith(MIXER_FILES)]
    assert_compiled_matches_eager(model, fullgraph=False, **inputs)


def test_recipe_key_torch_compile_trains_the_compiled_model(tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def recording_compile(model, **kwargs):
        compiled.append((type(model).__name__, kwargs.get("backend")))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    histories = []
    for flags in ([], ["train.torch_compile=true", "train.torch_compile_backend=aot_eager"]):
        torch._dynamo.reset()
        recipe = load_recipe(recipe_path("debug_mamba2"), [f"train.output_dir={tmp_path / str(len(flags))}",
                                                           "train.max_steps=3", "train.logging_steps=1",
                                                           "train.eval_strategy=no", "train.save_strategy=no",
                                                           *flags])
        summary = train(recipe)
        histories.append(summary)
    assert compiled == [("SsmHubMamba2ForCausalLM", "aot_eager")]
    assert histories[1]["steps"] == histories[0]["steps"] == 3
