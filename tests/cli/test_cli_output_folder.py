"""No command overwrites or deletes a file it did not write (issue 22, point 1), shown with ``ssm-hub convert``: a
folder that holds anything is refused before any work; ``--overwrite`` replaces only what an earlier convert wrote
(its manifest), never a model it did not write; an interrupted convert leaves the folder as it was. The policy
itself is ssm_hub.output_folder, which train, distill and demo share (tests/training/test_train_output_dir.py)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

import ssm_hub
from conftest import randomised
from ssm_hub.cli import main
from ssm_hub.output_folder import MANIFEST, STAGING_PREFIX

INPUT_IDS = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))


def snapshot(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def mamba2(seed: int) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    return randomised(Mamba2ForCausalLM(Mamba2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16, num_heads=4, n_groups=2,
        chunk_size=8)))


@pytest.fixture
def sources(tmp_path):
    for seed in (0, 1):
        mamba2(seed).save_pretrained(tmp_path / f"source{seed}")
    return tmp_path / "source0", tmp_path / "source1"


def logits(folder) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(INPUT_IDS).logits


def error_line(capsys) -> str:
    """The one line ssm-hub says about an error (after what the command printed as it worked: progress bars)."""
    error = capsys.readouterr().err
    assert "Traceback" not in error and sum(line.startswith("ssm-hub") for line in error.splitlines()) == 1, error
    return error.strip().splitlines()[-1]


def test_convert_into_a_folder_holding_an_older_sharded_model_changes_nothing(sources, tmp_path, capsys):
    output = tmp_path / "out"
    mamba2(2).save_pretrained(output, max_shard_size="20KB")  # an older model, in shards, that convert did not write
    assert (output / "model.safetensors.index.json").is_file()
    before = snapshot(output)
    capsys.readouterr()

    assert main(["convert", str(sources[0]), str(output)]) == 2
    line = error_line(capsys)
    assert f"the output folder {output} is not empty" in line and "give --overwrite" in line
    assert main(["convert", str(sources[0]), str(output), "--overwrite"]) == 2
    assert "which no earlier ssm-hub convert recorded writing" in error_line(capsys)

    assert snapshot(output) == before
    assert torch.equal(logits(output), logits(output))  # still loads


def test_overwrite_replaces_what_an_earlier_convert_wrote_and_nothing_else(sources, tmp_path, monkeypatch):
    output = tmp_path / "out"
    save = ssm_hub.SsmHubMamba2ForCausalLM.save_pretrained
    with monkeypatch.context() as patch:  # the earlier convert wrote shards and an index
        patch.setattr(ssm_hub.SsmHubMamba2ForCausalLM, "save_pretrained",
                      lambda self, folder, **kwargs: save(self, folder, max_shard_size="20KB", **kwargs))
        assert main(["convert", str(sources[0]), str(output)]) == 0
    shards = sorted(path.name for path in output.glob("model-*.safetensors"))
    assert len(shards) > 1 and (output / "model.safetensors.index.json").is_file()
    (output / "notes.txt").write_text("mine\n")

    assert main(["convert", str(sources[1]), str(output), "--overwrite"]) == 0

    assert not any(output.glob("model-*.safetensors")) and not (output / "model.safetensors.index.json").exists()
    assert (output / "model.safetensors").is_file() and (output / "notes.txt").read_text() == "mine\n"
    manifest = json.loads((output / MANIFEST).read_text())
    assert manifest["command"] == "convert" and "notes.txt" not in manifest["written"]
    assert "model.safetensors" in manifest["written"]
    assert (logits(output) - Mamba2ForCausalLM.from_pretrained(sources[1])(INPUT_IDS).logits).abs().max() <= 1e-5


def test_an_interrupted_convert_leaves_the_folder_as_it_was(sources, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    assert main(["convert", str(sources[0]), str(output)]) == 0
    before = snapshot(output)
    capsys.readouterr()

    def interrupted(*args):  # Ctrl-C after the new weights were written, before the tokenizer files
        raise KeyboardInterrupt

    monkeypatch.setattr("ssm_hub.conversion.formats.checkpoint.copy_tokenizer_files", interrupted)
    assert main(["convert", str(sources[1]), str(output), "--overwrite"]) == 130

    assert error_line(capsys) == f"ssm-hub: interrupted: {output} was left as it was"
    assert snapshot(output) == before
    assert not any(path.name.startswith(STAGING_PREFIX) for path in output.iterdir())
    # A failed convert into a new folder leaves no folder behind.
    monkeypatch.undo()
    assert main(["convert", str(tmp_path), str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_distill_and_demo_refuse_a_used_output_folder_before_any_work(tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine\n")
    distill = ["distill", "--teacher", "missing-teacher", "--student", "missing-student", "--builtin", "python_docs",
               "--output", str(output)]

    assert main(distill) == 2
    assert f"the output folder {output} is not empty (it holds 1 entry: notes.txt): give --overwrite" in \
        error_line(capsys)
    assert main([*distill, "--resume"]) == 2
    assert "holds no run of ssm-hub distill to resume" in error_line(capsys)
    assert main(["demo", "--output", str(output)]) == 2
    assert f"the output folder {output} is not empty" in error_line(capsys)
    assert snapshot(output) == {"notes.txt": b"mine\n"}
