"""`ssm-hub demo`, the README's main job, on a short time budget."""

from transformers import AutoModelForCausalLM

from ssm_hub.cli import main
from ssm_hub.demo import run_demo


def test_demo_trains_saves_reloads_and_generates(tmp_path):
    lines = []
    result = run_demo(output_dir=str(tmp_path / "demo"), train_seconds=3, log=lines.append)
    assert result["steps"] > 0 and result["loss_after"] < result["loss_before"]
    assert result["reload_exact"] is True
    assert result["completion"].startswith("The import statement") and len(result["completion"]) > 25
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "demo")
    assert type(model).__name__ == "SsmHubMamba2ForCausalLM"
    assert (tmp_path / "demo" / "model.safetensors").exists() and (tmp_path / "demo" / "tokenizer.json").exists()
    assert any("held-out loss after training" in line for line in lines)


def test_demo_rejects_a_non_positive_budget(tmp_path, capsys):
    assert main(["demo", "--seconds", "0", "--output", str(tmp_path)]) == 1
    assert "--seconds must be positive" in capsys.readouterr().err
