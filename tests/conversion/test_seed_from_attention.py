"""Seeding an ssm_hub_hybrid from a Llama-family or GPT-2 teacher (ssm_hub.conversion.seeding.from_attention): ``all``
gives the teacher's logits; replaced layers are Mamba-2 layers built from the attention weights; every SPEC form; auto:N keeps
the layers its probe ranks highest; bad teachers and specs are named. Tiny random teachers built here."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PersimmonConfig,
    PersimmonForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ssm_hub.cli import main
from ssm_hub.conversion.seeding.from_attention import SEEDING_FILE, seed_hybrid

SIZES = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
             vocab_size=300, max_position_embeddings=64, tie_word_embeddings=False)
TEACHERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SIZES)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SIZES, sliding_window=5)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SIZES)),
    # head_dim 16 with hidden 32 and 4 heads: Qwen3's heads need not tile the hidden size.
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SIZES, head_dim=16)),
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**SIZES, pad_token_id=0)),
    "persimmon": lambda: PersimmonForCausalLM(PersimmonConfig(**{**SIZES, "num_key_value_heads": None})),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=4, n_head=4, n_inner=48, vocab_size=300,
                                               n_positions=64, bos_token_id=None, eos_token_id=None)),
}


def _teacher(name, folder, seed=0):
    torch.manual_seed(seed)
    model = TEACHERS[name]().eval()
    with torch.no_grad():  # random biases and norm weights too, so that copying them is checked
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(".bias") or "norm" in parameter_name:
                parameter.normal_()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_keeping_every_attention_layer_reproduces_the_teachers_logits(name, tmp_path):
    teacher = _teacher(name, tmp_path / "teacher")
    seed_hybrid(tmp_path / "teacher", tmp_path / "student", "all")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.model_type == "ssm_hub_hybrid"
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "longrope", "llama3"])
def test_a_teacher_with_scaled_rope_seeds_a_student_with_its_logits(rope_type, tmp_path):
    # Llama 3's, long-context Qwen's and Mistral's and Phi-3.5's RoPE: the student's attention computes each as
    # transformers does, so keeping every layer reproduces the teacher past its original context.
    from conftest import scaled_rope_parameters

    torch.manual_seed(0)
    head_dim = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    rope = scaled_rope_parameters(rope_type, head_dim, original_max_position_embeddings=8)
    teacher = LlamaForCausalLM(LlamaConfig(**{**SIZES, "max_position_embeddings": 32}, rope_parameters=rope)).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    seed_hybrid(tmp_path / "teacher", tmp_path / "student", "all")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.rope_parameters["rope_type"] == rope_type
    ids = torch.randint(0, SIZES["vocab_size"], (2, 40))  # past max_position_embeddings, where the scaling acts
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_replaced_layer_is_a_mamba2_layer_built_from_the_attention_weights(tmp_path):
    teacher = _teacher("qwen2", tmp_path / "teacher")
    seed_hybrid(tmp_path / "teacher", tmp_path / "student", "every:2:1")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.mixer_types == ["mamba2", "attention", "mamba2", "attention"]
    attention, mamba = teacher.model.layers[2].self_attn, student.model.layers[2].mamba
    heads, head_dim, inner = 4, 8, 32
    z, x, B, C, dt = mamba.in_proj.weight.split([inner, inner, inner, inner, heads])

    def per_query_head(weight):  # two key/value heads, each serving two query heads
        return weight.view(2, head_dim, -1).repeat_interleave(2, dim=0).reshape(inner, -1)

    torch.testing.assert_close(x, per_query_head(attention.v_proj.weight))
    torch.testing.assert_close(B, per_query_head(attention.k_proj.weight))
    torch.testing.assert_close(C, attention.q_proj.weight)
    torch.testing.assert_close(mamba.out_proj.weight, attention.o_proj.weight)
    bias = mamba.in_proj.bias.split([inner, inner, inner, inner, heads])
    torch.testing.assert_close(bias[1], per_query_head(attention.v_proj.bias[:, None])[:, 0])
    torch.testing.assert_close(bias[3], attention.q_proj.bias)
    assert (dt == 0).all() and (bias[0] == 0).all() and (mamba.D == 0).all() and (mamba.norm.weight == 1).all()
    assert z.std() > 0  # the gate is drawn, not copied
    identity = torch.zeros_like(mamba.conv1d.weight)
    identity[:, 0, -1] = 1
    assert torch.equal(mamba.conv1d.weight, identity) and (mamba.conv1d.bias == 0).all()
    assert 1 <= (-mamba.A_log.exp()).abs().min() and (-mamba.A_log.exp()).abs().max() <= 16
    # Everything that is not attention is copied: the kept layers, the MLPs, the norms, the embeddings, the head.
    torch.testing.assert_close(student.model.layers[2].feed_forward.up_proj.weight,
                               teacher.model.layers[2].mlp.up_proj.weight)
    torch.testing.assert_close(student.model.layers[1].self_attn.k_proj.bias, teacher.model.layers[1].self_attn.k_proj.bias)
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12))
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()


def test_a_qwen3_teachers_query_and_key_norms_are_kept_or_folded_into_the_seeded_rows(tmp_path):
    teacher = _teacher("qwen3", tmp_path / "teacher")
    seed_hybrid(tmp_path / "teacher", tmp_path / "student", "every:2:1")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.attention_qk_norm and student.config.head_dim == 16
    kept, replaced = student.model.layers[1].self_attn, student.model.layers[0].mamba
    torch.testing.assert_close(kept.q_norm.weight, teacher.model.layers[1].self_attn.q_norm.weight)
    torch.testing.assert_close(kept.k_norm.weight, teacher.model.layers[1].self_attn.k_norm.weight)
    attention = teacher.model.layers[0].self_attn
    heads, head_dim = 4, 16
    inner = heads * head_dim
    _, _, B, C, _ = replaced.in_proj.weight.split([inner, inner, inner, inner, heads])
    query = attention.q_proj.weight.view(heads, head_dim, -1) * attention.q_norm.weight[None, :, None]
    key = attention.k_proj.weight.view(2, head_dim, -1) * attention.k_norm.weight[None, :, None]
    torch.testing.assert_close(C, query.reshape(inner, -1))
    torch.testing.assert_close(B, key.repeat_interleave(2, dim=0).reshape(inner, -1))


def test_a_gpt2_teacher_seeds_through_its_own_map(tmp_path):
    """Conv1D weights transposed and c_attn split; an older checkpoint's names (no "transformer." prefix, the causal
    mask stored as attn.bias) read the same; the SSM-only student generates with absolute positions as it computes
    without a cache."""
    teacher = _teacher("gpt2", tmp_path / "teacher")
    from safetensors.torch import save_file

    old_style = {name.removeprefix("transformer."): tensor.contiguous() for name, tensor in teacher.state_dict().items()
                 if name != "lm_head.weight"}
    for layer in range(4):
        old_style[f"h.{layer}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(old_style, tmp_path / "teacher" / "model.safetensors")
    seed_hybrid(tmp_path / "teacher", tmp_path / "student", "every:2:1")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    config = student.config
    assert (config.norm_type, config.mlp_type, config.absolute_position_embeddings, config.use_rope) == \
        ("layer", "plain", True, False)
    attention = teacher.transformer.h[2].attn
    q, k, v = attention.c_attn.weight.t().split(32)
    mamba = student.model.layers[2].mamba
    z, x, B, C, dt = mamba.in_proj.weight.split([32, 32, 32, 32, 4])
    torch.testing.assert_close(x, v)
    torch.testing.assert_close(B, k)
    torch.testing.assert_close(C, q)
    torch.testing.assert_close(mamba.in_proj.bias[96:128], attention.c_attn.bias[:32])  # C's bias is q's
    torch.testing.assert_close(mamba.out_proj.weight, attention.c_proj.weight.t())
    torch.testing.assert_close(mamba.out_proj.bias, attention.c_proj.bias)
    torch.testing.assert_close(student.model.layers[1].self_attn.v_proj.bias, teacher.transformer.h[1].attn.c_attn.bias[64:])
    torch.testing.assert_close(student.model.layers[2].feed_forward.up_proj.weight,
                               teacher.transformer.h[2].mlp.c_fc.weight.t())
    torch.testing.assert_close(student.model.embed_positions.weight, teacher.transformer.wpe.weight)
    torch.testing.assert_close(student.model.layers[0].input_layernorm.bias, teacher.transformer.h[0].ln_1.bias)

    seed_hybrid(tmp_path / "teacher", tmp_path / "ssm_only", "none")
    ssm_only = AutoModelForCausalLM.from_pretrained(tmp_path / "ssm_only").eval()
    prompt = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        generated = ssm_only.generate(prompt, max_new_tokens=6, do_sample=False)
        ids = prompt
        for _ in range(6):  # greedy without a cache: the whole sequence, positions from 0
            ids = torch.cat([ids, ssm_only(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, ids)
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings \\(64\\)"):
        ssm_only(torch.zeros(1, 65, dtype=torch.long))
    # Positions the caller gives are checked too: past the table, or negative (a padded row's -1, say).
    with pytest.raises(ValueError, match="positions from 60 to 64 exceed"):
        ssm_only(prompt, position_ids=torch.arange(60, 65)[None])
    with pytest.raises(ValueError, match="positions from -1 to 3 exceed"):
        ssm_only(prompt, position_ids=torch.arange(-1, 4)[None])
    from transformers import DynamicCache

    fresh = DynamicCache(config=ssm_only.config)  # a first prefill into a cache of one's own needs no positions
    with torch.no_grad():
        torch.testing.assert_close(ssm_only(prompt, cache=fresh, use_cache=True).logits, ssm_only(prompt).logits)
    with pytest.raises(ValueError, match="absolute position embeddings and no attention layer needs position_ids"):
        ssm_only(prompt[:, :1], cache=fresh, use_cache=True)
    # Generation that would run past the table fails with the same error, before any step on the default path.
    for eager in (False, True):
        with pytest.raises(ValueError, match="to 64 exceed the model's max_position_embeddings \\(64\\)"):
            ssm_only.generate(prompt, max_new_tokens=61, do_sample=False, disable_compile=eager)
    assert ssm_only.generate(prompt, max_new_tokens=60, do_sample=False).shape == (1, 65)


def test_seeding_is_reproducible_layer_by_layer(tmp_path):
    _teacher("llama", tmp_path / "teacher")
    seed_hybrid(tmp_path / "teacher", tmp_path / "none", "none")
    seed_hybrid(tmp_path / "teacher", tmp_path / "some", "0,3")
    none = AutoModelForCausalLM.from_pretrained(tmp_path / "none")
    some = AutoModelForCausalLM.from_pretrained(tmp_path / "some")
    for layer in (1, 2):  # replaced in both: the same draws
        assert torch.equal(none.model.layers[layer].mamba.in_proj.weight, some.model.layers[layer].mamba.in_proj.weight)
        assert torch.equal(none.model.layers[layer].mamba.A_log, some.model.layers[layer].mamba.A_log)


def test_auto_keeps_the_layers_whose_replacement_costs_most_and_writes_the_scores(tmp_path):
    from pydoc_data.topics import topics

    from ssm_hub.training.data import train_tokenizer

    _teacher("llama", tmp_path / "teacher")
    train_tokenizer([topics[key] for key in sorted(topics)][:200], SIZES["vocab_size"]).save_pretrained(
        tmp_path / "teacher")
    seed_hybrid(tmp_path / "teacher", tmp_path / "student", "auto:2")
    report = json.loads((tmp_path / "student" / SEEDING_FILE).read_text())
    scores = {int(layer): score for layer, score in report["probe"]["scores"].items()}
    assert sorted(scores) == [0, 1, 2, 3] and all(score > 0 for score in scores.values())
    assert report["kept_attention_layers"] == sorted(sorted(scores, key=scores.get, reverse=True)[:2])
    assert report["teacher"] == str(tmp_path / "teacher") and report["attention_layers"] == "auto:2"
    kinds = AutoModelForCausalLM.from_pretrained(tmp_path / "student").config.mixer_types
    assert [layer for layer, kind in enumerate(kinds) if kind == "attention"] == report["kept_attention_layers"]
    assert (tmp_path / "student" / "tokenizer.json").is_file()


def test_auto_without_a_tokenizer_says_what_it_needs(tmp_path):
    _teacher("llama", tmp_path / "teacher")
    with pytest.raises(ValueError, match="tokenized with the teacher's tokenizer"):
        seed_hybrid(tmp_path / "teacher", tmp_path / "student", "auto:1")


def test_unsupported_teachers_and_unplaced_tensors_are_named(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                             word_embed_proj_dim=32, vocab_size=100)).save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="model_type 'opt'.*LlamaForCausalLM \\(llama\\).*GPT2LMHeadModel \\(gpt2\\)"):
        seed_hybrid(tmp_path / "opt", tmp_path / "out", "all")
    teacher = _teacher("llama", tmp_path / "teacher")
    state = {name: tensor.contiguous() for name, tensor in teacher.state_dict().items()}
    state["model.layers.1.self_attn.q_norm.weight"] = torch.ones(8)  # Qwen3's, but a Llama student has no place
    from safetensors.torch import save_file

    save_file(state, tmp_path / "teacher" / "model.safetensors")
    with pytest.raises(ValueError, match="teacher layer 1 has tensors the student has no place for: self_attn.q_norm"):
        seed_hybrid(tmp_path / "teacher", tmp_path / "out", "none")
    del state["model.layers.1.self_attn.q_norm.weight"]
    save_file({name: tensor for name, tensor in state.items() if name != "model.layers.3.self_attn.o_proj.weight"},
              tmp_path / "teacher" / "model.safetensors")
    for spec in ("all", "none"):  # missing whether the layer is kept or replaced
        with pytest.raises(ValueError, match="the teacher has no model.layers.3.self_attn.o_proj.weight"):
            seed_hybrid(tmp_path / "teacher", tmp_path / "out", spec)
    state["model.layers.2.self_attn.v_proj.bias"] = torch.ones(16)  # a bias the config does not announce
    save_file(state, tmp_path / "teacher" / "model.safetensors")
    with pytest.raises(ValueError, match="teacher layer 2 has attention biases \\(v_proj.bias\\)"):
        seed_hybrid(tmp_path / "teacher", tmp_path / "out", "none")


def test_cli_seeds_a_hybrid_and_needs_both_flags(tmp_path, capsys):
    _teacher("mistral", tmp_path / "teacher")
    assert main(["convert", str(tmp_path / "teacher"), str(tmp_path / "student"), "--to", "ssm_hub_hybrid",
                 "--attention-layers", "every:2"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    kinds = AutoModelForCausalLM.from_pretrained(tmp_path / "student").config.mixer_types
    assert kinds == ["sliding_attention", "mamba2", "sliding_attention", "mamba2"]
    assert main(["convert", str(tmp_path / "teacher"), str(tmp_path / "other"), "--attention-layers", "all"]) == 2
    assert "--attention-layers seeds an ssm_hub_hybrid (--to ssm_hub_hybrid)" in capsys.readouterr().err


def test_fresh_mixers_start_as_a_new_models_and_keep_everything_else(tmp_path, capsys):
    teacher = _teacher("llama", tmp_path / "teacher")
    assert main(["convert", str(tmp_path / "teacher"), str(tmp_path / "fresh"), "--to", "ssm_hub_hybrid",
                 "--attention-layers", "0", "--mixer-init", "fresh"]) == 0
    seed_hybrid(tmp_path / "teacher", tmp_path / "seeded", "0")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "fresh").eval()
    seeded = AutoModelForCausalLM.from_pretrained(tmp_path / "seeded").eval()
    assert json.loads((tmp_path / "fresh" / SEEDING_FILE).read_text())["mixer_init"] == "fresh"
    for name, tensor in fresh.state_dict().items():
        if ".mamba." not in name:  # the kept attention layer, MLPs, norms, embeddings and head: the teacher's
            assert torch.equal(tensor, seeded.state_dict()[name]), name
    for layer in (1, 2, 3):
        mamba, attention = fresh.model.layers[layer].mamba, teacher.model.layers[layer].self_attn
        # ssm_hub_hybrid's own initialisation: out_proj N(0, 0.02) scaled by 1/sqrt(layers), not the teacher's O
        assert abs(mamba.out_proj.weight.std().item() - 0.02 / 2) < 0.004
        assert not torch.equal(mamba.out_proj.weight, attention.o_proj.weight)
        assert (mamba.D == 1).all() and (mamba.conv1d.weight != 0).all()
    again = AutoModelForCausalLM.from_pretrained(
        seed_hybrid(tmp_path / "teacher", tmp_path / "again", "0", mixer_init="fresh"))
    assert torch.equal(again.model.layers[2].mamba.in_proj.weight, fresh.model.layers[2].mamba.in_proj.weight)
    assert not torch.equal(fresh.model.layers[1].mamba.in_proj.weight, fresh.model.layers[2].mamba.in_proj.weight)
    with pytest.raises(ValueError, match="mixer_init must be one of"):
        seed_hybrid(tmp_path / "teacher", tmp_path / "bad", "0", mixer_init="zeros")
    assert main(["convert", str(tmp_path / "teacher"), str(tmp_path / "other"), "--to", "mamba2",
                 "--mixer-init", "fresh"]) == 2
    assert "--mixer-init applies to seeding from a transformer" in capsys.readouterr().err
