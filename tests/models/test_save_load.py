"""Saving and loading: safetensors only, identical logits, and the trust_remote_code export."""

import ast
import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from ssm_hub import SsmHubMamba2ForCausalLM


def test_save_writes_safetensors_only_and_reloads_identically(model_type, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    input_ids = torch.randint(1, 64, (2, 9))
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_checkpoint_carries_auto_map_and_four_files_of_code(causal_lm_type, tmp_path):
    AutoModelForCausalLM.from_config(tiny_config(causal_lm_type)).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(auto_map)
    kind = causal_lm_type.removeprefix("ssm_hub_")
    assert {p.name for p in tmp_path.glob("*.py")} == {f"configuration_{kind}.py", f"modeling_{kind}.py",
                                                        "ssm_hub_ops.py", "ssm_hub_kernels.py"}
    assert auto_map["AutoConfig"].startswith(f"configuration_{kind}.")
    assert all(target.startswith(f"modeling_{kind}.") for key, target in auto_map.items() if key != "AutoConfig")
    for code_file in tmp_path.glob("*.py"):
        for node in ast.walk(ast.parse(code_file.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("ssm_hub"), (code_file.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("ssm_hub") for alias in node.names), code_file.name


# The start of a script for a fresh interpreter in which `import ssm_hub` fails, as on a machine without the package.
HIDE_SSM_HUB = textwrap.dedent(
    """
    import sys, importlib.abc

    class HideSsmHub(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "ssm_hub" or name.startswith("ssm_hub."):
                raise ImportError("ssm_hub is hidden in this test")
            return None

    sys.meta_path.insert(0, HideSsmHub())
    """
)
REMOTE_CODE_SCRIPT = HIDE_SSM_HUB + textwrap.dedent(
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoint, expected_file = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert "ssm_hub" not in sys.modules
    expected = load_file(expected_file)
    logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)
    out = model.generate(expected["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    model.save_pretrained(checkpoint + "-resaved")
    print("REMOTE_CODE_OK", type(model).__module__)
    """
)


def assert_loads_without_ssm_hub(model, checkpoint, input_ids, tmp_path) -> None:
    """``model``, saved in ``checkpoint``, loads with trust_remote_code in a process where ssm_hub cannot be imported
    and gives the same logits on ``input_ids`` (REMOTE_CODE_SCRIPT)."""
    with torch.no_grad():
        save_file({"input_ids": input_ids, "logits": model(input_ids).logits}, tmp_path / "expected.safetensors")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(checkpoint), str(tmp_path / "expected.safetensors")],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "REMOTE_CODE_OK transformers_modules." in result.stdout


def test_loads_with_trust_remote_code_without_ssm_hub(model_type, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    assert_loads_without_ssm_hub(model, checkpoint, torch.randint(1, 64, (2, 9)), tmp_path)
    # Code loaded from a checkpoint saves itself again as the same files.
    resaved = tmp_path / "checkpoint-resaved"
    assert {p.name: p.read_text() for p in checkpoint.glob("*.py")} == {p.name: p.read_text() for p in
                                                                        resaved.glob("*.py")}


def test_untied_head_round_trips(model_type, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, tie_word_embeddings=False)).eval()
    assert model.lm_head.weight.data_ptr() != model.backbone.embeddings.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.backbone.embeddings.weight)


class UserSubclass(SsmHubMamba2ForCausalLM):
    """A user's own subclass, defined outside ssm_hub."""


def test_a_user_subclass_saves_as_the_ssm_hub_class_it_extends(tmp_path):
    model = UserSubclass(tiny_config("ssm_hub_mamba2")).eval()
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_mamba2.SsmHubMamba2ForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(1, 64, (1, 5))
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_push_to_hub_from_save_pretrained_uploads_after_the_code_is_written(tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_config(tiny_config("ssm_hub_mamba2"))
    uploads = []

    def fake_push_to_hub(self, repo_id, **kwargs):
        uploads.append((repo_id, kwargs, sorted(p.name for p in tmp_path.glob("*.py"))))

    monkeypatch.setattr(type(model), "push_to_hub", fake_push_to_hub)
    model.save_pretrained(tmp_path, push_to_hub=True, repo_id="me/tiny", commit_message="hello")
    (repo_id, kwargs, code_files), = uploads
    assert repo_id == "me/tiny" and kwargs == {"commit_message": "hello"}
    assert set(code_files) == {"configuration_mamba2.py", "modeling_mamba2.py", "ssm_hub_ops.py", "ssm_hub_kernels.py"}


def test_remote_code_does_not_require_triton(model_type, tmp_path):
    from transformers.dynamic_module_utils import get_imports

    AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(tmp_path)
    required = {name for code_file in tmp_path.glob("*.py") for name in get_imports(code_file)}
    third_party = required - set(sys.stdlib_module_names)
    assert third_party <= {"torch", "transformers"}, third_party
