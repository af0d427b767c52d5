"""On a GPU the models pick the Triton kernels by default (SSM_HUB_BACKEND=auto); they must compute what the torch
reference computes. Marked gpu: run through the device tool, skipped on CPU-only machines."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_backend_matches_torch_reference(model_type, monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, hidden_size=64, num_hidden_layers=3)).cuda().eval()
    input_ids = torch.randint(1, 64, (3, 37), device="cuda")
    outputs = {}
    for backend in ("torch", "auto"):
        monkeypatch.setenv("SSM_HUB_BACKEND", backend)
        with torch.no_grad():
            logits = model(input_ids).logits
            generated = model.generate(input_ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        outputs[backend] = (logits, generated)
    torch.testing.assert_close(outputs["auto"][0], outputs["torch"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["auto"][1], outputs["torch"][1])


def test_auto_backend_trains_like_torch_reference(model_type, monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, hidden_size=64)).cuda().train()
    input_ids = torch.randint(1, 64, (2, 45), device="cuda")
    grads = {}
    for backend in ("torch", "auto"):
        monkeypatch.setenv("SSM_HUB_BACKEND", backend)
        model.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads["torch"].items():
        torch.testing.assert_close(grads["auto"][name], grad, rtol=1e-3, atol=1e-4, msg=name)


REMOTE_CODE_ON_GPU = """
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

checkpoint, expected_file = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).cuda().eval()
expected = load_file(expected_file, device="cuda")
with torch.no_grad():
    logits = model(expected["input_ids"]).logits
torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-4)
generated = model.generate(expected["input_ids"], max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
torch.testing.assert_close(generated, expected["generated"])
assert "ssm_hub" not in sys.modules
kernels = [name for name in sys.modules if name.endswith(".ssm_hub_kernels")]
assert kernels and all(name.startswith("transformers_modules.") for name in kernels), kernels
print("REMOTE_KERNELS_OK")
"""


def test_remote_code_runs_the_kernels_without_ssm_hub(causal_lm_type, tmp_path):
    """A checkpoint's own code (trust_remote_code, ssm_hub not installed) runs the Triton kernels on a GPU and computes
    what ssm_hub does."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file
    from test_save_load import HIDE_SSM_HUB

    model = AutoModelForCausalLM.from_config(tiny_config(causal_lm_type)).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    model.cuda()
    input_ids = torch.randint(1, 64, (2, 37), device="cuda")
    with torch.no_grad():
        logits = model(input_ids).logits
        generated = model.generate(input_ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    save_file({"input_ids": input_ids, "logits": logits, "generated": generated}, tmp_path / "expected.safetensors")
    result = subprocess.run([sys.executable, "-c", HIDE_SSM_HUB + REMOTE_CODE_ON_GPU, str(tmp_path / "checkpoint"),
                             str(tmp_path / "expected.safetensors")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "REMOTE_KERNELS_OK" in result.stdout
