"""Distillation (ssm_hub.conversion.distillation.distill): the losses, what each stage trains, the teacher's per-layer states,
and ``ssm-hub distill`` end to end on a tiny Llama teacher and a student seeded from it, on CPU: what it reports as
it goes, and a final save that, interrupted, leaves no student that loads."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import with_short_chunks
from ssm_hub.cli import main
from ssm_hub.conversion.distillation.distill import (
    evaluate_against_teacher,
    hidden_alignment_loss,
    replaced_layers,
    set_trainable,
    teacher_layer_states,
    token_kl,
)
from ssm_hub.conversion.seeding.from_attention import seed_hybrid


def test_token_kl_is_the_mean_kl_of_the_next_token_distributions():
    teacher, student = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    expected = F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True,
                        reduction="none").sum(-1)
    torch.testing.assert_close(token_kl(teacher, student), expected.mean())
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    torch.testing.assert_close(token_kl(teacher, student, mask), expected[mask.bool()].mean())
    assert token_kl(teacher, teacher).abs() < 1e-6


def test_hidden_alignment_loss_is_scale_free_per_layer_and_row():
    target = [torch.randn(2, 4, 8), 100 * torch.randn(2, 4, 8)]
    target[0][1] *= 50  # one row of much larger activations
    off = [target[0] + 0.1, target[1] + 10]
    loss = hidden_alignment_loss(off, target)
    relative = [F.mse_loss(o[row], t[row]) / t[row].square().mean() for o, t in zip(off, target) for row in range(2)]
    torch.testing.assert_close(loss, torch.stack(relative).mean())
    # A mean over rows: two halves of the batch average to the whole batch's loss.
    halves = [hidden_alignment_loss([o[rows] for o in off], [t[rows] for t in target]) for rows in ([0], [1])]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss)
    assert hidden_alignment_loss(target, target) == 0
    # Padding is left out: with the last position of each row masked, what stands there changes nothing, and the
    # loss is that of the rows cut before it.
    mask = torch.ones(2, 4)
    mask[:, -1] = 0
    garbled = [o.clone() for o in off]
    for o in garbled:
        o[:, -1] = 1e6
    cut = hidden_alignment_loss([o[:, :-1] for o in off], [t[:, :-1] for t in target])
    torch.testing.assert_close(hidden_alignment_loss(garbled, target, mask), cut)


def test_evaluation_counts_only_the_tokens_that_carry_the_loss(teacher_and_student):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_and_student[0]).eval()
    student = AutoModelForCausalLM.from_pretrained(teacher_and_student[1]).eval()
    ids = torch.randint(0, 300, (3, 16))
    positions = torch.arange(16).expand(3, 16)
    labels = torch.full_like(ids, -100)
    labels[:, 5] = ids[:, 5]  # one counted target per row: predicted from position 4
    rows = [dict(input_ids=i, position_ids=p, labels=l) for i, p, l in zip(ids, positions, labels)]
    scores = evaluate_against_teacher(student, teacher, rows)
    with torch.no_grad():
        teacher_logits, student_logits = teacher(ids).logits[:, 4], student(ids).logits[:, 4]
    assert scores["tokens"] == 3
    torch.testing.assert_close(scores["student_perplexity"],
                               F.cross_entropy(student_logits, ids[:, 5]).exp().item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(scores["teacher_perplexity"],
                               F.cross_entropy(teacher_logits, ids[:, 5]).exp().item(), rtol=1e-5, atol=0)
    torch.testing.assert_close(scores["mean_token_kl"], token_kl(teacher_logits, student_logits).item(),
                               rtol=1e-5, atol=1e-7)
    every = evaluate_against_teacher(student, teacher, [dict(row, labels=row["input_ids"]) for row in rows])
    assert every["tokens"] == 3 * 15 and every["student_perplexity"] != scores["student_perplexity"]


@pytest.fixture
def teacher_and_student(tmp_path):
    from pydoc_data.topics import topics

    from ssm_hub.training.data import train_tokenizer

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                           num_key_value_heads=2, intermediate_size=48, vocab_size=300,
                                           max_position_embeddings=128, tie_word_embeddings=False,
                                           initializer_range=0.3))  # a peaked, not near-uniform, teacher
    teacher.save_pretrained(tmp_path / "teacher")
    train_tokenizer([topics[key] for key in sorted(topics)][:200], 300).save_pretrained(tmp_path / "teacher")
    seed_hybrid(tmp_path / "teacher", tmp_path / "student", "every:2:1")
    return tmp_path / "teacher", with_short_chunks(tmp_path / "student")


def test_each_stage_trains_what_it_should(teacher_and_student):
    student = AutoModelForCausalLM.from_pretrained(teacher_and_student[1])
    assert replaced_layers(student) == [0, 2]
    set_trainable(student, "align")
    trained = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("model.layers.0.mamba.", "model.layers.2.mamba.")) for name in trained)
    set_trainable(student, "orient")
    assert {name for name, p in student.named_parameters() if p.requires_grad} == trained
    set_trainable(student, "kl", freeze_mlp=True)
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    assert frozen and all(".feed_forward." in name for name in frozen)
    with pytest.raises(ValueError, match="stage must be one of"):
        set_trainable(student, "distil")


def test_teacher_layer_states_include_the_last_layers_raw_output(teacher_and_student):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_and_student[0]).eval()
    ids = torch.randint(0, 300, (2, 9))
    inputs, outputs = teacher_layer_states(teacher, ids, None)
    hidden = teacher(ids, output_hidden_states=True).hidden_states
    assert len(inputs) == len(outputs) == 4
    for layer in range(4):
        torch.testing.assert_close(inputs[layer], hidden[layer])
    for layer in range(3):
        torch.testing.assert_close(outputs[layer], hidden[layer + 1])
    torch.testing.assert_close(teacher.model.norm(outputs[-1]), hidden[-1])  # hidden[-1] is after the final norm


def test_distill_runs_both_stages_and_brings_the_student_closer(teacher_and_student, tmp_path, capsys):
    teacher, student = teacher_and_student
    output = tmp_path / "distilled"
    status = main(["distill", "--teacher", str(teacher), "--student", str(student), "--output", str(output),
                   "--builtin", "python_docs", "--max-documents", "120", "--seq-len", "64", "--eval-fraction", "0.1",
                   "--orient-steps", "3", "--align-steps", "12", "--kl-steps", "12", "--batch-size", "4",
                   "--learning-rate", "3e-3",
                   "--speed-contexts", "64", "128"])
    assert status == 0
    printed = capsys.readouterr()
    assert "greedy agreement" in printed.out
    # Every stage says what it does as it starts (issue 22, point 4): these status lines, in this order.
    error = printed.err.replace("\r", "\n")  # a bar that closes leaves a carriage return before the next line
    lines = iter(re.findall(r"^\[\d+:\d\d\] (.*)$", error, re.MULTILINE))
    for expected in ("teacher: loading", "student: loading", "evaluation seeded: teacher and student on",
                     "evaluation seeded: student perplexity", "evaluation seeded: greedy completions of 3",
                     "stage orient: 3 steps", "evaluation after_orient: teacher and student on",
                     "stage align: 12 steps", "evaluation after_align: teacher and student on",
                     "stage kl: 12 steps", "evaluation after_kl: student perplexity",
                     "speed: the teacher's prefill and 16 decode steps at a context of 64 tokens",
                     "speed: the student's prefill and 16 decode steps at a context of 64 tokens",
                     "speed: the student's prefill and 16 decode steps at a context of 128 tokens",
                     "saving: the distilled student and distillation.json"):
        assert any(line.startswith(expected) for line in lines), expected
    report = json.loads((output / "distillation.json").read_text())
    evaluations = report["evaluations"]
    assert list(evaluations) == ["seeded", "after_orient", "after_align", "after_kl"]
    assert evaluations["after_kl"]["mean_token_kl"] < evaluations["seeded"]["mean_token_kl"]
    assert evaluations["after_align"]["teacher_perplexity"] == pytest.approx(evaluations["seeded"]["teacher_perplexity"])
    speed = report["speed"]
    assert [row["context"] for row in speed] == [64, 128]
    # Two of four layers keep a key/value cache that grows with the context; the SSM layers hold a fixed state.
    assert speed[1]["cache_ratio"] < speed[0]["cache_ratio"] < 1
    assert all(row[model]["decode_tokens_per_second"] > 0 for row in speed for model in ("teacher", "student"))
    samples = report["samples"]["after_kl"]
    assert len(samples) == 3 and all(sample["prompt"] and isinstance(sample["student"], str) for sample in samples)
    assert [s["teacher"] for s in samples] == [s["teacher"] for s in report["samples"]["seeded"]]  # the same teacher
    align_losses = [loss for _, loss in report["train_loss"]["align"]]
    assert align_losses[-1] < align_losses[0]
    assert (output / "align" / "loss_curve.png").is_file() and (output / "kl" / "checkpoint-12").is_dir()
    # The checkpoints hold the optimizer, scheduler and RNG states as safetensors, not Trainer's pickles.
    checkpoint = sorted(path.name for path in (output / "kl" / "checkpoint-12").iterdir())
    assert "optimizer.safetensors" in checkpoint
    assert not [name for name in checkpoint if name.endswith((".pt", ".pth", ".bin"))], checkpoint
    distilled = AutoModelForCausalLM.from_pretrained(output)
    assert distilled.config.mixer_types == ["mamba2", "attention", "mamba2", "attention"]
    assert (output / "tokenizer.json").is_file()
    assert json.loads((output / "seeding.json").read_text())["attention_layers"] == "every:2:1"


def test_an_interrupted_final_save_leaves_no_student_that_loads(teacher_and_student, tmp_path, monkeypatch):
    """The distilled student, its tokenizer and distillation.json are written into a staging folder and renamed
    into the output together: Ctrl-C after the weights were written, before the tokenizer, leaves no model there
    (issue 22, point 1)."""
    from transformers import AutoTokenizer

    teacher, student = teacher_and_student
    output = tmp_path / "distilled"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(AutoTokenizer.from_pretrained(student)), "save_pretrained", interrupted)
    assert main(["distill", "--teacher", str(teacher), "--student", str(student), "--output", str(output),
                 "--builtin", "python_docs", "--max-documents", "40", "--seq-len", "32", "--eval-fraction", "0.1",
                 "--align-steps", "1", "--kl-steps", "1", "--batch-size", "4", "--speed-contexts"]) == 130
    assert (output / "kl" / "checkpoint-1").is_dir()  # the stages ran
    assert sorted(path.name for path in output.iterdir()) == [".ssm-hub-manifest.json", "align", "kl"]
    with pytest.raises((OSError, ValueError)):  # no config.json
        AutoModelForCausalLM.from_pretrained(output)


def test_matrix_orientation_brings_the_scans_matrices_towards_the_attention_matrices(teacher_and_student, tmp_path):
    from transformers import TrainingArguments

    from ssm_hub.conversion.distillation.distill import DistillationTrainer, ReplacedLayers
    from ssm_hub.training.config import DataSection
    from ssm_hub.training.data import read_documents, train_and_eval_datasets
    from transformers import AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_and_student[0])
    student = AutoModelForCausalLM.from_pretrained(teacher_and_student[1])
    data = DataSection(builtin="python_docs", max_documents=60, seq_len=32, eval_fraction=0.0)
    train, _ = train_and_eval_datasets(read_documents(data), AutoTokenizer.from_pretrained(teacher_and_student[1]), data)
    set_trainable(student, "orient")
    arguments = TrainingArguments(output_dir=str(tmp_path / "orient"), max_steps=15, per_device_train_batch_size=4,
                                  learning_rate=3e-3, logging_steps=1, report_to="none", save_strategy="no",
                                  use_cpu=True)
    with pytest.raises(ValueError, match="the 'orient' stage trains ReplacedLayers"):
        DistillationTrainer(model=student, teacher=teacher, stage="orient", args=arguments, train_dataset=train)
    layers = ReplacedLayers(student)
    trainer = DistillationTrainer(model=layers, teacher=teacher, stage="orient", args=arguments, train_dataset=train)
    batch = {key: torch.stack([train[i][key] for i in range(4)]) for key in ("input_ids", "position_ids", "labels")}
    before = trainer.compute_loss(layers, batch).item()
    trainer.train()
    assert trainer.compute_loss(layers, batch).item() < before
    assert teacher.config._attn_implementation == "eager"  # what orientation needs to read attention weights


def test_a_resumed_run_restores_each_finished_stage(teacher_and_student, tmp_path):
    from ssm_hub.conversion.distillation.distill import distill
    from ssm_hub.training.config import DataSection

    teacher, student = teacher_and_student
    data = DataSection(builtin="python_docs", max_documents=60, seq_len=32, eval_fraction=0.1)
    settings = dict(align_steps=4, kl_steps=4, batch_size=4)
    first = distill(str(teacher), str(student), data, str(tmp_path / "run"), learning_rate=3e-3, **settings)
    # Again with resume and another learning rate: every stage is found finished and its final weights restored;
    # nothing is retrained, so the other learning rate changes nothing.
    again = distill(str(teacher), str(student), data, str(tmp_path / "run"), learning_rate=3e-2, resume=True,
                    **settings)
    assert again["evaluations"]["after_kl"] == first["evaluations"]["after_kl"]
    # Without resume that learning rate trains another student.
    fresh = distill(str(teacher), str(student), data, str(tmp_path / "fresh"), learning_rate=3e-2, **settings)
    assert fresh["evaluations"]["after_kl"] != first["evaluations"]["after_kl"]


def test_the_seed_flag_reaches_the_run(teacher_and_student, tmp_path):
    """--seed sets the data order and whatever is drawn at random: the same seed twice gives the same student,
    another seed another one."""
    teacher, student = teacher_and_student
    arguments = ["distill", "--teacher", str(teacher), "--student", str(student), "--builtin", "python_docs",
                 "--max-documents", "60", "--seq-len", "32", "--eval-fraction", "0.1", "--align-steps", "0",
                 "--kl-steps", "2", "--batch-size", "4", "--speed-contexts"]

    def after_kl(name: str, seed: str) -> dict:
        assert main([*arguments, "--seed", seed, "--output", str(tmp_path / name)]) == 0
        return json.loads((tmp_path / name / "distillation.json").read_text())["evaluations"]["after_kl"]

    first = after_kl("first", "1")
    assert after_kl("again", "1") == first
    assert after_kl("other", "2") != first


def test_stages_after_orientation_run_the_teacher_with_its_own_attention(teacher_and_student, tmp_path, monkeypatch):
    from ssm_hub.conversion.distillation import distill as distillation
    from ssm_hub.training.config import DataSection

    seen = []
    original = distillation.DistillationTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append((self.stage, self.teacher.config._attn_implementation))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(distillation.DistillationTrainer, "compute_loss", spy)
    data = DataSection(builtin="python_docs", max_documents=40, seq_len=32, eval_fraction=0.1)
    report = distillation.distill(str(teacher_and_student[0]), str(teacher_and_student[1]), data, str(tmp_path / "d"),
                                  orient_steps=1, align_steps=0, kl_steps=1, batch_size=2)
    assert ("orient", "eager") in seen and ("kl", "sdpa") in seen
    assert list(report["evaluations"]) == ["seeded", "after_orient", "after_kl"]


def test_distill_takes_a_gpt2_teacher_and_an_ssm_only_student(tmp_path):
    """GPT-2's layers are found under transformer.h; a student with no attention layer runs every stage, generates
    and is timed with its absolute positions given."""
    from pydoc_data.topics import topics
    from transformers import GPT2Config, GPT2LMHeadModel

    from ssm_hub.training.data import train_tokenizer

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=48, vocab_size=300, n_positions=128,
                               bos_token_id=None, eos_token_id=None)).save_pretrained(tmp_path / "teacher")
    train_tokenizer([topics[key] for key in sorted(topics)][:200], 300).save_pretrained(tmp_path / "teacher")
    student = with_short_chunks(seed_hybrid(tmp_path / "teacher", tmp_path / "student", "none"))
    output = tmp_path / "distilled"
    assert main(["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(student),
                 "--output", str(output), "--builtin", "python_docs", "--max-documents", "60", "--seq-len", "64",
                 "--eval-fraction", "0.1", "--orient-steps", "2", "--align-steps", "2", "--kl-steps", "2",
                 "--batch-size", "2", "--speed-contexts", "32", "120"]) == 0
    report = json.loads((output / "distillation.json").read_text())
    # 120 tokens and 16 decode steps would run past the 128 learned positions: not timed, and the report says so.
    assert [row["context"] for row in report["speed"]] == [32] and report["speed_skipped"]["contexts"] == [120]
    assert "at most 112 tokens of context" in report["speed_skipped"]["why"]
    assert list(report["evaluations"]) == ["seeded", "after_orient", "after_align", "after_kl"]
    assert report["speed"][0]["student"]["decode_tokens_per_second"] > 0
    assert all(isinstance(sample["student"], str) for sample in report["samples"]["after_kl"])
    assert AutoModelForCausalLM.from_pretrained(output).config.mixer_types == ["mamba2", "mamba2"]


def test_two_processes_distil_like_one_with_the_same_global_batch(teacher_and_student, tmp_path):
    """Two processes (gloo on CPU): every stage, the replaced layers' ones included, trains on each process's half
    of the batch with averaged gradients, so the losses are one process's with the whole batch."""
    teacher, student = teacher_and_student
    arguments = ["--teacher", str(teacher), "--student", str(student), "--builtin", "python_docs", "--max-documents",
                 "60", "--seq-len", "32", "--eval-fraction", "0.1", "--orient-steps", "2", "--align-steps", "3",
                 "--kl-steps", "3", "--learning-rate", "3e-3", "--speed-contexts"]
    assert main(["distill", *arguments, "--output", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ssm_hub.cli", "distill", *arguments, "--output", str(tmp_path / "two"), "--batch-size", "2"]
    launched = subprocess.run(command, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("greedy agreement") == 1  # the report is printed by the first process only
    reports = {name: json.loads((tmp_path / name / "distillation.json").read_text()) for name in ("one", "two")}
    for stage in ("orient", "align", "kl"):
        losses = {name: [loss for _, loss in report["train_loss"][stage]] for name, report in reports.items()}
        assert len(losses["two"]) == {"orient": 2, "align": 3, "kl": 3}[stage]
        torch.testing.assert_close(losses["two"], losses["one"], rtol=0, atol=1e-4)
    assert reports["two"]["evaluations"]["after_kl"]["mean_token_kl"] == pytest.approx(
        reports["one"]["evaluations"]["after_kl"]["mean_token_kl"], abs=1e-4)


def test_distill_relaunches_itself_through_accelerate(teacher_and_student, tmp_path, capsys):
    from ssm_hub.cli import without_launch_flags

    assert without_launch_flags(["distill", "--accelerate-config", "ddp", "--teacher", "t", "--num-processes=2",
                                 "--output", "o"]) == ["distill", "--teacher", "t", "--output", "o"]
    teacher, student = teacher_and_student
    arguments = ["distill", "--teacher", str(teacher), "--student", str(student), "--builtin", "python_docs",
                 "--max-documents", "40", "--seq-len", "32", "--align-steps", "1", "--kl-steps", "1",
                 "--speed-contexts", "--output", str(tmp_path / "launched")]
    assert main([*arguments, "--num-processes", "2"]) == 2
    assert "--num-processes needs --accelerate-config" in capsys.readouterr().err
    config = tmp_path / "cpu.yaml"  # one CPU process: the launch path itself, end to end
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\n"
                      "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n")
    assert main([*arguments, "--accelerate-config", str(config)]) == 0
    assert (tmp_path / "launched" / "distillation.json").is_file()


def test_sharding_engines_are_refused(teacher_and_student, tmp_path, monkeypatch):
    """FSDP shards the student in place; the evaluations between stages need it whole, so distillation refuses it."""
    from transformers import Trainer, TrainingArguments

    from ssm_hub.conversion.distillation.distill import DistillationTrainer

    original = Trainer.create_accelerator_and_postprocess

    def as_under_fsdp(self):
        original(self)
        self.is_fsdp_enabled = True

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", as_under_fsdp)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_and_student[0])
    student = AutoModelForCausalLM.from_pretrained(teacher_and_student[1])
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="distillation runs data-parallel \\(accelerate config ddp\\)"):
        DistillationTrainer(model=student, teacher=teacher, stage="kl", args=arguments)


def short_run(teacher, student, output) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--output", str(output), "--builtin",
            "python_docs", "--max-documents", "40", "--seq-len", "32", "--eval-fraction", "0.1", "--align-steps", "0",
            "--kl-steps", "1", "--batch-size", "2", "--speed-contexts"]


def test_a_student_without_a_tokenizer_takes_the_teachers_through_the_tokenizer_flag(teacher_and_student, tmp_path,
                                                                                      capsys):
    """What ``ssm-hub convert`` writes from a teacher folder without tokenizer files."""
    from ssm_hub.conversion.formats.checkpoint import VOCABULARY_FILES

    teacher, student = teacher_and_student
    bare = tmp_path / "bare"
    shutil.copytree(student, bare)
    for pattern in VOCABULARY_FILES:
        for path in bare.glob(pattern):
            path.unlink()

    assert main(short_run(teacher, bare, tmp_path / "refused")) == 2
    error = capsys.readouterr().err
    assert f"the student {bare} has no tokenizer" in error and "as --tokenizer" in error
    assert main([*short_run(teacher, bare, tmp_path / "distilled"), "--tokenizer", str(teacher)]) == 0
    assert (tmp_path / "distilled" / "tokenizer.json").is_file()


def test_the_evaluations_run_eval_batch_size_rows_per_forward_call(teacher_and_student, tmp_path, monkeypatch,
                                                                   capsys):
    """--eval-batch-size (eval_batch_size=) sets how many held-out rows each evaluation call takes (issue 22, point 5:
    distill evaluated in batches of 8, whatever the run); a value that is not a positive whole number is refused,
    naming it."""
    from ssm_hub import SsmHubHybridForCausalLM
    from ssm_hub.conversion.distillation import distill as distillation
    from ssm_hub.training.config import DataSection

    teacher, student = teacher_and_student
    rows_per_call, evaluating = [], []  # the student's forward calls while an evaluation runs: their rows
    evaluate, forward = distillation.evaluate_against_teacher, SsmHubHybridForCausalLM.forward

    def evaluate_noted(*args, **kwargs):
        evaluating.append(True)
        try:
            return evaluate(*args, **kwargs)
        finally:
            evaluating.clear()

    def forward_counted(self, input_ids=None, **kwargs):
        if evaluating:
            rows_per_call.append(input_ids.shape[0])
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(distillation, "evaluate_against_teacher", evaluate_noted)
    monkeypatch.setattr(SsmHubHybridForCausalLM, "forward", forward_counted)
    assert main([*short_run(teacher, student, tmp_path / "distilled"), "--kl-steps", "0",
                 "--eval-batch-size", "3"]) == 0
    held_out = int(re.search(r"evaluation seeded: teacher and student on (\d+) held-out rows",
                             capsys.readouterr().err).group(1))
    assert held_out > 3 and rows_per_call == [3] * (held_out // 3) + ([held_out % 3] if held_out % 3 else [])
    assert json.loads((tmp_path / "distilled" / "distillation.json").read_text())["settings"]["eval_batch_size"] == 3

    assert main([*short_run(teacher, student, tmp_path / "refused"), "--eval-batch-size", "0"]) == 2
    assert "argument --eval-batch-size: must be a whole number, at least 1, got '0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_batch_size must be a positive whole number, got 0"):
        distillation.distill(str(teacher), str(student), DataSection(builtin="python_docs"), str(tmp_path / "python"),
                             eval_batch_size=0)
    assert not (tmp_path / "python").exists()


def test_a_teacher_with_only_pickled_weights_is_refused_naming_the_file(teacher_and_student, tmp_path, capsys):
    teacher, student = teacher_and_student
    pickled = tmp_path / "pickled"
    shutil.copytree(teacher, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()

    assert main(short_run(pickled, student, tmp_path / "distilled")) == 2
    error = capsys.readouterr().err
    assert f"no *.safetensors weights in {pickled}: it has only pytorch_model.bin" in error
