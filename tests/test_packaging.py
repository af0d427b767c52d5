"""The installed distribution ships kernels/, conversion/, recipes/ and model_cards/ inside ssm_hub only."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHIPPED_INSIDE = ("kernels", "conversion", "recipes", "model_cards")


def _is_editable_install() -> bool:
    direct_url = importlib.metadata.distribution("ssm-hub").read_text("direct_url.json")
    return bool(direct_url) and json.loads(direct_url).get("dir_info", {}).get("editable", False)


def test_wheel_has_no_top_level_kernels_conversion_or_recipes():
    if _is_editable_install():
        pytest.skip("an editable install has no file list; CI installs the wheel and runs this")
    files = [str(f) for f in importlib.metadata.files("ssm-hub")]
    top_level = {f.split("/")[0] for f in files}
    assert top_level.isdisjoint(SHIPPED_INSIDE), sorted(top_level)
    for folder in SHIPPED_INSIDE:
        assert f"ssm_hub/{folder}/__init__.py" in files, folder


def test_subpackages_import_under_ssm_hub():
    import ssm_hub.conversion
    import ssm_hub.kernels

    assert ssm_hub.kernels.__name__ == "ssm_hub.kernels"
    assert ssm_hub.conversion.__name__ == "ssm_hub.conversion"


IMPORT_WITHOUT_TRITON = """
import importlib.abc, sys

class HideTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is hidden in this test")

sys.meta_path.insert(0, HideTriton())
import torch, ssm_hub
from transformers import AutoModelForCausalLM
config = ssm_hub.SsmHubMamba2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, head_dim=8, state_size=4)
print(AutoModelForCausalLM.from_config(config)(torch.ones(1, 3, dtype=torch.long)).logits.shape)
"""


def test_import_and_forward_work_without_triton():
    result = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_TRITON], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([1, 3, 32])" in result.stdout


def test_transformers_imports_from_the_repository_root():
    """Python run in the checkout's root finds its kernels/ folder as a top-level ``kernels`` module (and its ssm_hub/
    folder as ssm_hub); that module hands the name to Hugging Face's kernels package, which transformers' hub-kernels
    integration imports. No PYTHONSAFEPATH."""
    root = Path(__file__).resolve().parent.parent
    code = ("import transformers, ssm_hub; from transformers.integrations import hub_kernels; import kernels; "
            "print(kernels.__file__)")
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONSAFEPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).parent != root / "kernels"
