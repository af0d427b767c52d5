"""PEFT on ssm_hub models: default LoRA targets, adapters that take effect, and a Trainer run that trains only them."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from conftest import tiny_config


def test_lora_without_target_modules_uses_our_defaults(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(DEFAULT_TARGETS[model_type])


def _set_lora_b(peft_model, target: str, value: float):
    for name, module in peft_model.named_modules():
        if name.endswith(target) and hasattr(module, "lora_B"):
            for adapter in module.lora_B.values():
                torch.nn.init.constant_(adapter.weight, value)


DEFAULT_TARGETS = {"ssm_hub_mamba": ["in_proj", "x_proj", "dt_proj", "out_proj"], "ssm_hub_mamba2": ["in_proj", "out_proj"]}


@pytest.mark.parametrize("model_type, target", [(m, t) for m, targets in DEFAULT_TARGETS.items() for t in targets])
def test_nonzero_lora_delta_changes_the_output(model_type, target):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    input_ids = torch.randint(1, 64, (2, 9))
    before = model(input_ids).logits
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=[target])).eval()
    torch.testing.assert_close(peft_model(input_ids=input_ids).logits, before)  # lora_B starts at zero
    _set_lora_b(peft_model, target, 0.5)
    after = peft_model(input_ids=input_ids).logits
    assert not torch.allclose(after, before, atol=1e-4), f"a LoRA delta on {target} was bypassed"
    # Cached decoding goes through the same modules.
    generated = peft_model.generate(input_ids=input_ids[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0,
                                    eos_token_id=None)
    assert generated.shape == (2, 7)


def test_lora_on_the_fused_conv_is_refused_not_dropped(model_type):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    # PEFT adapts a depthwise conv only with a rank divisible by its groups (= channels).
    rank = model.backbone.layers[0].mixer.conv1d.groups
    peft_model = get_peft_model(model, LoraConfig(r=rank, target_modules=["conv1d"]))
    with pytest.raises(ValueError, match="conv1d is wrapped by a PEFT adapter"):
        peft_model(input_ids=torch.randint(1, 64, (1, 5)))


def test_trainer_with_lora_changes_only_adapter_weights(model_type, tmp_path):
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
    before = {name: p.detach().clone() for name, p in peft_model.named_parameters()}
    rows = torch.randint(1, 64, (16, 12)).tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True,
    )
    Trainer(model=peft_model, args=args, train_dataset=dataset).train()
    changed = {name for name, p in peft_model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed, "training changed nothing"
    assert all("lora_" in name for name in changed), sorted(changed)
    assert any("lora_B" in name for name in changed)
