"""The Python functions that write a model folder (convert_checkpoint, seed_hybrid, seed_multimodal,
extend_with_images) write it whole or not at all, as the command line does (issue 22, point 1): interrupted after the
weights were written, a call leaves no folder, or the folder as it was; and a new model replaces the weights of the
one the folder held instead of mixing with them."""

import hashlib

import pytest
from test_convert import save, tiny_mamba
from test_extend_with_images import text_model  # noqa: F401  (a module fixture: a tiny hybrid with a tokenizer)
from test_seed_from_attention import _teacher
from test_seed_from_fuyu import fuyu  # noqa: F401  (a module fixture: a tiny Fuyu with its tokenizer)
from transformers import AutoModelForCausalLM, PreTrainedModel

from ssm_hub.conversion.formats.checkpoint import convert_checkpoint
from ssm_hub.conversion.seeding.extend_with_images import extend_with_images
from ssm_hub.conversion.seeding.from_attention import seed_hybrid
from ssm_hub.conversion.seeding.from_fuyu import seed_multimodal

WRITERS = {
    "convert_checkpoint": lambda sources, output: convert_checkpoint(sources["mamba"], output),
    "seed_hybrid": lambda sources, output: seed_hybrid(sources["llama"], output, "every:2:1"),
    "seed_multimodal": lambda sources, output: seed_multimodal(sources["fuyu"], output, "every:2:1"),
    "extend_with_images": lambda sources, output: extend_with_images(sources["hybrid"], output, patch_size=4),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, fuyu, text_model):  # noqa: F811
    folder = tmp_path_factory.mktemp("sources")
    _teacher("llama", folder / "llama")
    return {"mamba": save(tiny_mamba(), folder / "mamba"), "llama": folder / "llama", "fuyu": fuyu[0],
            "hybrid": text_model}


def contents(folder) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_call_interrupted_after_the_weights_leaves_the_folder_as_it_was(writer, sources, tmp_path, monkeypatch):
    save_pretrained = PreTrainedModel.save_pretrained

    def interrupted_after_the_weights(self, *args, **kwargs):
        save_pretrained(self, *args, **kwargs)
        raise KeyboardInterrupt

    output = tmp_path / "out"
    with monkeypatch.context() as patched:
        patched.setattr(PreTrainedModel, "save_pretrained", interrupted_after_the_weights)
        with pytest.raises(KeyboardInterrupt):
            WRITERS[writer](sources, output)
    assert not output.exists()

    WRITERS[writer](sources, output)
    earlier = contents(output)
    assert "config.json" in earlier and not any(name.startswith(".") for name in earlier)
    with monkeypatch.context() as patched:
        patched.setattr(PreTrainedModel, "save_pretrained", interrupted_after_the_weights)
        with pytest.raises(KeyboardInterrupt):
            WRITERS[writer](sources, output)
    assert contents(output) == earlier


def test_a_new_model_replaces_the_weights_of_the_one_the_folder_held(sources, tmp_path):
    output = save(tiny_mamba(), tmp_path / "out", max_shard_size="20KB")
    assert (output / "model.safetensors.index.json").is_file()
    (output / "notes.txt").write_text("mine\n")
    convert_checkpoint(sources["mamba"], output)
    weights = sorted(path.name for path in output.glob("*.safetensors*"))
    assert weights == ["model.safetensors"]  # the earlier shards and their index went with the earlier model
    assert (output / "notes.txt").read_text() == "mine\n"
    AutoModelForCausalLM.from_pretrained(output)
