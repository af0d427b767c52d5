"""Tensor parallelism of the hybrid: the config's ``base_model_tp_plan`` names the attention projections (q / k / v
by columns, o by rows) and the dense MLPs (gate / up by columns, down by rows) and nothing of the SSM mixers, the
experts or the product-key memories; the causal LM's head is split over the vocabulary like the embeddings; and two
processes (gloo on CPU) loading a checkpoint with transformers' tensor parallelism hold halves of exactly those
weights and give the single-process logits and greedy tokens."""

import json
import subprocess
import sys

import pytest
import torch
from transformers.distributed.parallel_utils import _get_parameter_plan

import ssm_hub
from conftest import tiny_config
from test_hybrid_model import tiny

SPLIT_BY_COLUMNS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
SPLIT_BY_ROWS = ("o_proj", "down_proj")

TP_WORKER = r'''
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers.distributed.configuration_utils import DistributedConfig
import ssm_hub


def check(checkpoint, report):
    split = ssm_hub.SsmHubHybridForCausalLM.from_pretrained(
        checkpoint, distributed_config=DistributedConfig(tp_size=dist.get_world_size())).eval()
    whole = ssm_hub.SsmHubHybridForCausalLM.from_pretrained(checkpoint).eval()
    full_shapes = {name: list(p.shape) for name, p in whole.named_parameters()}
    local_shapes = {name: list(p.to_local().shape if isinstance(p, DTensor) else p.shape)
                    for name, p in split.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, whole.config.vocab_size, (2, 9), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0
    generate = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = split(input_ids, attention_mask=mask).logits
        expected = whole(input_ids, attention_mask=mask).logits
        same_tokens = torch.equal(split.generate(input_ids, **generate), whole.generate(input_ids, **generate))
    result = dict(
        sharded={name: [full_shapes[name], shape] for name, shape in local_shapes.items()
                 if shape != full_shapes[name]},
        max_logit_difference=(logits - expected)[mask.bool()].abs().max().item(),
        same_tokens=same_tokens,
    )
    with open(f"{report}.{dist.get_rank()}.json", "w") as file:
        json.dump(result, file)


dist.init_process_group("gloo")
for checkpoint in sys.argv[1:]:
    check(checkpoint, checkpoint + ".report")
dist.destroy_process_group()
'''


def plan_entry_in(plan: dict, parameter_name: str) -> str | None:
    return _get_parameter_plan(parameter_name, plan, is_weight=True)


def plan_entry(model, parameter_name: str) -> str | None:
    return plan_entry_in(model.tp_plan, parameter_name)


@pytest.mark.parametrize("class_name", ["SsmHubHybridModel", "SsmHubHybridForCausalLM",
                                        "SsmHubHybridForSequenceClassification"])
def test_plan_splits_attention_and_dense_mlps_only(class_name):
    # Every feed-forward kind (MLP, MoE, PKM, none) and every mixer kind, SwiGLU MLPs; then GPT-2's plain MLP (which
    # has no gate_proj for that entry to match).
    for config in (tiny(), tiny(mlp_type="plain", hidden_act="gelu_new", ffn_types=["mlp"] * 5)):
        model = getattr(ssm_hub, class_name)(config)
        names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        unused = [pattern for pattern in model.tp_plan if all(plan_entry_in({pattern: "x"}, name) is None
                                                               for name in names)]
        assert unused == ([] if config.mlp_type == "swiglu" else [key for key in model.tp_plan
                                                                   if key.endswith("feed_forward.gate_proj")])
        for name in names:
            module = name.rsplit(".", 2)[-2]
            style = plan_entry(model, name)
            if ".mamba." in name or ".experts" in name or ".router" in name or "_layernorm" in name or \
                    ".feed_forward." in name and module not in SPLIT_BY_COLUMNS + SPLIT_BY_ROWS:
                assert style is None, name  # SSM mixers, MoE, PKM and norms stay whole on every rank
            elif module in SPLIT_BY_COLUMNS:
                assert style == "colwise", name
            elif module in SPLIT_BY_ROWS:
                assert style == "rowwise", name
        heads = {"SsmHubHybridForCausalLM": "colwise_gather_output"}
        assert model.tp_plan.get("lm_head") == heads.get(class_name)


def test_the_multimodal_model_takes_the_plan_from_its_backbone():
    model = ssm_hub.SsmHubMultimodalForConditionalGeneration(tiny_config("ssm_hub_multimodal"))
    assert all(key.startswith("model.language_model.") for key in model.tp_plan if key != "lm_head")
    assert plan_entry(model, "model.language_model.layers.1.self_attn.q_proj.weight") == "colwise"
    assert model.tp_plan["lm_head"] == "colwise_gather_output"
    assert model.tp_plan["model.language_model.embed_tokens"] == "embedding_rowwise"


def test_two_processes_hold_halves_and_give_the_same_logits_and_tokens(tmp_path):
    checkpoints = {}
    for tie_word_embeddings in (True, False):
        model = ssm_hub.SsmHubHybridForCausalLM(tiny(tie_word_embeddings=tie_word_embeddings))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        checkpoints[tie_word_embeddings] = tmp_path / f"tied_{tie_word_embeddings}"
        model.save_pretrained(checkpoints[tie_word_embeddings])
    worker = tmp_path / "tp_worker.py"
    worker.write_text(TP_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
               *map(str, checkpoints.values())]
    launched = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    for tie_word_embeddings, checkpoint in checkpoints.items():
        reports = [json.loads(checkpoint.with_name(f"{checkpoint.name}.report.{rank}.json").read_text())
                   for rank in (0, 1)]
        # Attention layers 1 and 3, the MLP of layer 0, the embeddings and the head (one tensor when tied): each
        # split in two.
        expected = {f"model.layers.{i}.self_attn.{p}.weight" for i in (1, 3)
                    for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {f"model.layers.0.feed_forward.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        expected |= {"model.embed_tokens.weight"} if tie_word_embeddings else {"model.embed_tokens.weight",
                                                                               "lm_head.weight"}
        for report in reports:
            assert report["max_logit_difference"] < 1e-5 and report["same_tokens"]
            assert set(report["sharded"]) == expected
        for name, (full, first) in reports[0]["sharded"].items():
            second = reports[1]["sharded"][name][1]
            split_dim = 1 if name.rsplit(".", 2)[-2] in SPLIT_BY_ROWS else 0
            assert first[split_dim] + second[split_dim] == full[split_dim], name  # the vocabulary (97): 49 + 48
            assert first[1 - split_dim] == second[1 - split_dim] == full[1 - split_dim], name
