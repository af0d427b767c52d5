"""`ssm-hub demo`, the README's main job, on a short budget: a small Llama teacher, a hybrid seeded from it, distilled,
evaluated, saved, reloaded and generating."""

from transformers import AutoModelForCausalLM

from ssm_hub.cli import main
from ssm_hub.demo import run_demo


def test_demo_turns_a_teacher_into_a_distilled_hybrid(tmp_path):
    lines = []
    result = run_demo(output_dir=str(tmp_path / "demo"), teacher_steps=30, align_steps=4, kl_steps=8,
                      speed_contexts=(64,), log=lines.append)
    evaluations = result["evaluations"]
    assert list(evaluations) == ["seeded", "after_align", "after_kl"]
    assert evaluations["after_kl"]["mean_token_kl"] < evaluations["seeded"]["mean_token_kl"]
    # Distillation lowers the student's held-out perplexity (at this budget, 721 -> 548).
    assert evaluations["after_kl"]["student_perplexity"] < 0.9 * evaluations["seeded"]["student_perplexity"]
    assert result["reload_exact"] is True
    assert result["completion"].startswith("The import statement") and len(result["completion"]) > 25
    assert result["attention_layers"] == "every:4:3"
    assert [row["context"] for row in result["speed"]] == [64] and result["speed"][0]["cache_ratio"] < 1
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "demo" / "distilled")
    assert type(student).__name__ == "SsmHubHybridForCausalLM"
    assert student.config.mixer_types == ["mamba2", "mamba2", "mamba2", "attention"]
    assert (tmp_path / "demo" / "teacher" / "model.safetensors").exists()
    assert any("greedy agreement" in line for line in lines) and any("teacher:" in line for line in lines)


def test_demo_rejects_a_non_positive_teacher_budget(tmp_path, capsys):
    assert main(["demo", "--teacher-steps", "0", "--output", str(tmp_path)]) == 2
    assert "argument --teacher-steps: must be" in capsys.readouterr().err
