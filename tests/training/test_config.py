"""Recipe loading: every key checked and named in errors, YAML overrides, shipped recipes found by name."""

import pytest

from ssm_hub.training.config import apply_overrides, load_recipe, recipe_path

BASE = {
    "model": {"type": "ssm_hub_mamba2", "config": {"hidden_size": 32}},
    "tokenizer": {"train_bpe": 300},
    "data": {"builtin": "python_docs", "seq_len": 32},
    "train": {"output_dir": "out", "max_steps": 2},
}


def raw(**sections):
    return {**{k: dict(v) for k, v in BASE.items()}, **sections}


def test_a_valid_recipe_loads_with_typed_sections():
    recipe = load_recipe(raw=raw())
    assert recipe.model.type == "ssm_hub_mamba2" and recipe.data.seq_len == 32 and recipe.train["max_steps"] == 2
    assert recipe.data.eval_fraction == 0.05 and recipe.lora is None


@pytest.mark.parametrize("sections, message", [
    (dict(model={"type": "ssm_hub_mamba2", "hiden_size": 3}), r"unknown key\(s\) in model: model.hiden_size"),
    (dict(data={"builtin": "python_docs", "seqlen": 3}), r"data.seqlen"),
    (dict(train={"output_dir": "out", "lerning_rate": 1e-3}), r"unknown key\(s\) in train: train.lerning_rate"),
    (dict(lora={"rank": 4}), r"unknown key\(s\) in lora: lora.rank"),
    (dict(optimizer={}), r"unknown top-level key\(s\) \['optimizer'\]"),
    (dict(data={"builtin": "python_docs", "seq_len": "long"}), r"data.seq_len must be of type int, got 'long'"),
    (dict(data={"builtin": "python_docs", "seq_len": True}), r"data.seq_len must be of type int, got True"),
    (dict(tokenizer={"train_bpe": 300, "pretrained": "gpt2"}), "exactly one of tokenizer.pretrained"),
    (dict(tokenizer={"train_bpe": 300, "characters": True}), r"given: \['train_bpe', 'characters'\]"),
    (dict(data={"files": ["a.txt"], "builtin": "python_docs"}), "exactly one of data.files, data.dataset"),
    (dict(data={"builtin": "wikipedia"}), "data.builtin must be one of"),
    (dict(model={"pretrained": "x", "config": {"a": 1}}), "with model.pretrained it would be ignored"),
    (dict(train={"max_steps": 2}), "train.output_dir is required"),
    (dict(model={"type": "ssm_hub_mamba2", "config": {"hiden_size": 3}}), "model.config.hiden_size"),
    (dict(model={"type": "ssm_hub_mamba2", "dtype": "int8"}), "model.dtype must be one of"),
    (dict(model={"type": "ssm_hub_mamba7"}), "model.type"),
    (dict(lora={"task_type": "CAUSAL_LM"}), "lora.task_type is set by ssm-hub train"),
    (dict(lora={"r": "8"}), "lora.r must be of type int"),
    (dict(train={"output_dir": "out", "lr_scheduler_type": "cosin"}), r"train.lr_scheduler_type must be one of \[.*'cosine'"),
    (dict(data={"builtin": "python_docs", "eval_fraction": 0}, train={"output_dir": "o", "eval_strategy": "steps"}),
     "data.eval_fraction = 0 holds none out"),
    (dict(data={"builtin": "python_docs", "max_documents": 0}), "data.max_documents must be at least 1"),
    (dict(train={"output_dir": "out", "max_steps": "ten"}), r"train.max_steps must be of type int, got 'ten'"),
    (dict(train={"output_dir": "out", "bf16": "yes"}), r"train.bf16 must be of type bool"),
])
def test_bad_recipes_name_the_key(sections, message):
    with pytest.raises(ValueError, match=message):
        load_recipe(raw=raw(**sections))


def test_missing_section_is_named():
    incomplete = raw()
    del incomplete["data"]
    with pytest.raises(ValueError, match="the recipe has no data section"):
        load_recipe(raw=incomplete)


def test_overrides_set_nested_keys_with_yaml_values():
    recipe = load_recipe(raw=raw(), overrides=[
        "train.max_steps=7", "model.config.num_hidden_layers=3", "data.eval_fraction=0", "lora.r=4",
        "train.learning_rate=1e-3",
    ])
    assert recipe.train["max_steps"] == 7 and recipe.model.config == {"hidden_size": 32, "num_hidden_layers": 3}
    assert recipe.data.eval_fraction == 0.0 and recipe.lora == {"r": 4} and recipe.train["learning_rate"] == 1e-3
    with pytest.raises(ValueError, match="must look like section.key=value"):
        apply_overrides(raw(), ["train.max_steps"])
    with pytest.raises(ValueError, match="model.type is not a mapping"):
        apply_overrides(raw(), ["model.type.x=1"])


def test_yaml_words_yes_no_on_off_stay_strings():
    """YAML 1.1 would read ``no`` as False, and Trainer's ``eval_strategy=no`` would be rejected as a bool."""
    recipe = load_recipe(raw=raw(), overrides=["train.eval_strategy=no", "train.save_strategy=no", "train.bf16=true"])
    assert recipe.train["eval_strategy"] == "no" and recipe.train["save_strategy"] == "no"
    assert recipe.train["bf16"] is True
    with pytest.raises(ValueError, match=r"train.bf16 must be of type bool, got 'yes'"):
        load_recipe(raw=raw(), overrides=["train.bf16=yes"])


def test_shipped_recipes_are_found_by_name_and_load():
    for name in ("debug_mamba", "debug_mamba2", "debug_hybrid", "debug_lora", "shakespeare_mamba2",
                 "shakespeare_hybrid", "gpu_mamba2_130m", "gpu_hybrid_moe"):
        assert load_recipe(recipe_path(name)).train["output_dir"].endswith(name)
    with pytest.raises(ValueError, match="no shipped recipe of that name .*debug_mamba2"):
        recipe_path("no_such_recipe")
    with pytest.raises(ValueError, match=r"recipe file 'my_runs/debug_mamba2.yaml' not found \(from .*\): check the "
                                         r"path, or give the name of a shipped recipe \(.*debug_mamba2"):
        recipe_path("my_runs/debug_mamba2.yaml")  # a missing file is never replaced by the shipped namesake


def test_resume_from_checkpoint_may_be_true_or_a_path():
    assert load_recipe(raw=raw(), overrides=["train.resume_from_checkpoint=true"]).train["resume_from_checkpoint"]
    assert load_recipe(raw=raw(), overrides=["train.resume_from_checkpoint=out/checkpoint-2"]).train[
        "resume_from_checkpoint"] == "out/checkpoint-2"


def test_accelerate_configs_ship_and_build_the_launch_command(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    from ssm_hub.training.launch import accelerate_command, accelerate_config_path

    kinds = {name: load_config_from_file(str(accelerate_config_path(name))).distributed_type
             for name in ("ddp", "fsdp2", "zero3")}
    assert {name: str(kind).split(".")[-1] for name, kind in kinds.items()} == {
        "ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}
    command = accelerate_command("fsdp2", ["train", "--config", "r.yaml", "train.max_steps=3"], num_processes=2)
    assert command[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path("fsdp2"))]
    assert command[5:] == ["--num_processes", "2", "-m", "ssm_hub.cli", "train", "--config", "r.yaml",
                           "train.max_steps=3"]
    with pytest.raises(ValueError, match=r"no shipped accelerate config of that name \(shipped: \['ddp', 'fsdp2', 'zero3'\]\)"):
        accelerate_config_path("fsdp1")
    with pytest.raises(ValueError, match="--num-processes must be at least 1"):
        accelerate_command("ddp", ["train", "--config", "r.yaml"], num_processes=0)
