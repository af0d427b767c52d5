"""Seed an ssm_hub_hybrid from a pretrained Llama-family transformer: the attention layers that are not kept become
Mamba-2 layers built from their weights (as in Mamba-in-the-Llama and mmMamba); everything else is copied.

    from ssm_hub.conversion.seeding.from_attention import seed_hybrid
    seed_hybrid("Qwen/Qwen2.5-0.5B", "qwen-hybrid", attention_layers="every:4:3")   # keep layers 3, 7, 11, ...

or from a shell: ``ssm-hub convert TEACHER OUT --to ssm_hub_hybrid --attention-layers SPEC``.

Teachers: transformers' LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (its per-head
RMSNorms on queries and keys come along: ``attention_qk_norm``) and Phi3ForCausalLM (its fused qkv_proj and
gate_up_proj are split), with default RoPE and SwiGLU MLPs; PersimmonForCausalLM (Fuyu's decoder: its fused
per-head query_key_value split, LayerNorms on queries and keys, a plain relu^2 MLP, biases everywhere; FuyuForCausalLM
seeds an ssm_hub_multimodal through ssm_hub.conversion.seeding.from_fuyu); and GPT2LMHeadModel through its own map
(its Conv1D weights transposed, its fused c_attn split): the student then has GPT-2's block (LayerNorms, learned
absolute positions, a plain MLP with GPT-2's activation, biases everywhere). Weights are read from safetensors only.

SPEC (``ssm_hub.models.hybrid.layer_layout.parse_layer_selection``): ``all`` keeps every attention layer (the student then computes the teacher's
logits exactly: the sanity check), ``none`` replaces them all, ``every:K[:OFFSET]`` keeps the layers with
``layer % K == OFFSET`` (OFFSET 0 if left out), ``3,7,11`` keeps those, and ``auto:N`` keeps the N layers whose
replacement alone costs most: the KL divergence from the teacher's next-token distribution on a probe text
(:func:`probe_layer_importance`; ``auto:0`` and N = all layers need no probe). The output folder's ``seeding.json``
records the teacher, SPEC, the kept layers and, for a probed auto:N, the probe's scores.

A replaced layer, with H query heads and Hkv key/value heads of size P, becomes a Mamba-2 layer with H heads of size
P, H groups and state size P, so that its scan is a linear attention with one key and one query per head (both
works use these sizes) and its gated norm normalises each head:
- x <- V, B <- K (each key/value head repeated for the H // Hkv query heads that share it, as mmMamba repeats k and
  v), C <- Q, out_proj <- O, biases likewise (zero where the teacher has none); no 1/sqrt(P) is folded in (neither
  work does);
- the conv starts as the identity (a 1 on the current token's tap, bias 0), as in mmMamba, so x, B and C reach the
  scan as the projections give them (through the mixer's SiLU);
- dt's projection rows start at zero (mmMamba), so every token's step is softplus(dt_bias), with dt log-uniform in
  [time_step_min, time_step_max] (both works: [0.001, 0.1]); A is drawn uniform in [1, 16] as Mamba-2 and
  Mamba-in-the-Llama draw it;
- D starts at zero (mmMamba leaves it out: attention has no skip path); the gate's rows (z) are drawn like any
  projection (normal, std initializer_range; both works draw them at random) and the gated norm's weight is one.
RoPE has no counterpart in the scan and is dropped for the replaced layers (neither work applies it to B or C).
Qwen3's and Persimmon's per-head query and key norms cannot be carried over whole either: their weights scale C's
and B's rows (each head-dim channel as the norm scales it), and the normalisation of each token (and a LayerNorm's
bias) is dropped. The
random draws are seeded per layer, so a layer seeds the same way in the probe and in the written model.

``mixer_init="fresh"`` (``--mixer-init fresh``) instead starts each replaced layer's Mamba-2 mixer as a new
ssm_hub_hybrid's (its ``_init_weights``: out_proj small, so the layer starts close to a skip) and keeps everything
else from the teacher; the attention weights of those layers go unused. On the character-level Shakespeare check
(benchmarks/quality/distillation_quality.py, H100, one run) such a pure-SSM student distilled to a held-out perplexity of
4.874 against the attention-seeded one's 5.071, at the same settings and budget.
"""

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from ssm_hub.conversion.formats.checkpoint import (
    copy_tokenizer_files,
    parse_dtype,
    read_config,
    read_weights,
    save_weights,
    source_and_output,
)
from ssm_hub.layers.ssm_init import inverse_softplus, sample_time_steps
from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig
from ssm_hub.models.hybrid.layer_layout import parse_layer_selection
from ssm_hub.models.hybrid.modeling_hybrid import SSM_MIXER_CLASSES, SsmHubHybridForCausalLM
from ssm_hub.output_folder import staged_model_folder

SUPPORTED_TEACHERS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "persimmon": "PersimmonForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
SEEDING_FILE = "seeding.json"  # what was seeded from what: the model card reads it
MIXER_INITS = ("attention", "fresh")
# The attention tensors a layer may have, in Llama's names, and with attention_qk_norm Qwen3's per-head norms;
# anything else has no place.
ATTENTION_TENSORS = {f"{projection}.{kind}" for projection in ("q_proj", "k_proj", "v_proj", "o_proj")
                     for kind in ("weight", "bias")}
QK_NORM_TENSORS = {f"{norm}.{kind}" for norm in ("q_norm", "k_norm") for kind in ("weight", "bias")}


def student_config(teacher: dict, attention_layers: list[int]) -> SsmHubHybridConfig:
    """The ssm_hub_hybrid config of a student of ``teacher`` (its config.json as a dict) keeping
    ``attention_layers``; ValueError for a teacher the student cannot reproduce."""
    model_type = teacher.get("model_type")
    if model_type not in SUPPORTED_TEACHERS:
        raise ValueError(f"cannot seed from a teacher of model_type {model_type!r}: supported teachers are "
                         + ", ".join(f"{name} ({model_type})" for model_type, name in SUPPORTED_TEACHERS.items()))
    if model_type == "gpt2":
        return _gpt2_student_config(teacher, attention_layers)
    if model_type == "persimmon":
        return _persimmon_student_config(teacher, attention_layers)
    hidden, layers = teacher["hidden_size"], teacher["num_hidden_layers"]
    heads = teacher["num_attention_heads"]
    kv_heads = teacher.get("num_key_value_heads") or heads
    head_dim = teacher.get("head_dim") or hidden // heads
    if teacher.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{model_type} teacher with hidden_act {teacher['hidden_act']!r}: ssm_hub_hybrid's MLP "
                         f"is SwiGLU (silu)")
    if (heads * head_dim) % hidden:
        raise ValueError(f"{model_type} teacher: heads x head_dim ({heads} x {head_dim}) must be a multiple of "
                         f"hidden_size ({hidden}) to become a Mamba-2 layer's inner width")
    if heads % kv_heads:
        raise ValueError(f"{model_type} teacher: num_attention_heads ({heads}) must be a multiple of "
                         f"num_key_value_heads ({kv_heads})")
    bias = model_type == "qwen2" or bool(teacher.get("attention_bias", False))
    window = teacher.get("sliding_window") if teacher.get("use_sliding_window", model_type == "mistral") else None
    kinds = teacher.get("layer_types") or ["sliding_attention" if window else "full_attention"] * layers
    attention_kind = {"full_attention": "attention", "sliding_attention": "sliding_attention"}
    unknown = sorted(set(kinds) - set(attention_kind))
    if unknown:
        raise ValueError(f"{model_type} teacher with layer_types {unknown}: only full and sliding attention seed")
    mixers = [attention_kind[kinds[layer]] if layer in attention_layers else "mamba2" for layer in range(layers)]
    return _student_config(
        teacher, hidden, heads, kv_heads, head_dim, mixers, tie_default=False,
        attention_bias=bias, rope_parameters=_teacher_rope_parameters(teacher),
        max_position_embeddings=teacher.get("max_position_embeddings", 4096),
        sliding_window=window if "sliding_attention" in kinds else None,
        intermediate_size=teacher["intermediate_size"], mlp_bias=bool(teacher.get("mlp_bias", False)),
        mamba_proj_bias=bias, layer_norm_epsilon=teacher.get("rms_norm_eps", 1e-6),
        attention_qk_norm=model_type == "qwen3",
    )


def _student_config(teacher: dict, hidden: int, heads: int, kv_heads: int, head_dim: int, mixers: list[str],
                    tie_default: bool, **block) -> SsmHubHybridConfig:
    """The fields every student shares (the teacher's sizes and token ids; each seeded Mamba-2 layer with a head
    and a group per query head and the head dim as its state size, module docstring), plus the ``block`` fields of
    the teacher's family."""
    return SsmHubHybridConfig(
        vocab_size=teacher["vocab_size"], hidden_size=hidden, num_hidden_layers=len(mixers), mixer_types=mixers,
        ffn_types=["mlp"] * len(mixers), num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        mamba_d_state=head_dim, mamba_d_head=head_dim, mamba_n_groups=heads, mamba_expand=heads * head_dim // hidden,
        residual_in_fp32=False, initializer_range=teacher.get("initializer_range", 0.02),
        tie_word_embeddings=bool(teacher.get("tie_word_embeddings", tie_default)),
        pad_token_id=teacher.get("pad_token_id"), bos_token_id=teacher.get("bos_token_id"),
        eos_token_id=teacher.get("eos_token_id"), **block,
    )


def teacher_layer_count(teacher: dict) -> int:
    """The number of layers of ``teacher`` (its config.json as a dict): GPT-2 calls it n_layer."""
    return teacher["n_layer"] if teacher.get("model_type") == "gpt2" else teacher["num_hidden_layers"]


def _gpt2_student_config(teacher: dict, attention_layers: list[int]) -> SsmHubHybridConfig:
    """GPT-2's block in the hybrid: LayerNorms, learned absolute positions (no RoPE), a plain MLP, biases
    everywhere; heads are full multi-head (no GQA)."""
    if teacher.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("gpt2 teacher with scale_attn_by_inverse_layer_idx: ssm_hub_hybrid's attention scales "
                         "scores by 1 / sqrt(head_dim) only, so its logits would not match the teacher's")
    if not teacher.get("scale_attn_weights", True):
        raise ValueError("gpt2 teacher with scale_attn_weights = false: ssm_hub_hybrid's attention always scales "
                         "scores by 1 / sqrt(head_dim)")
    hidden, layers, heads = teacher["n_embd"], teacher["n_layer"], teacher["n_head"]
    if hidden % heads:
        raise ValueError(f"gpt2 teacher: n_embd ({hidden}) must be divisible by n_head ({heads})")
    head_dim = hidden // heads
    mixers = ["attention" if layer in attention_layers else "mamba2" for layer in range(layers)]
    return _student_config(
        teacher, hidden, heads, heads, head_dim, mixers, tie_default=True,
        attention_bias=True, use_rope=False, absolute_position_embeddings=True,
        max_position_embeddings=teacher["n_positions"], mlp_type="plain",
        hidden_act=teacher.get("activation_function", "gelu_new"), mlp_bias=True,
        intermediate_size=teacher.get("n_inner") or 4 * hidden, norm_type="layer", mamba_proj_bias=True,
        layer_norm_epsilon=teacher.get("layer_norm_epsilon", 1e-5),
    )


def _teacher_rope_parameters(teacher: dict) -> dict:
    """The teacher's RoPE as transformers reads its config: ``rope_parameters`` with the class's defaults (theta,
    partial rotary factor), the older ``rope_theta`` / ``rope_scaling`` fields and Phi-3's ``"su"`` / ``"yarn"``
    names standardised. The student's attention computes every rope_type transformers has the same way
    (ssm_hub.layers.attention), so scaled RoPE (Llama 3, YaRN, LongRoPE, ...) seeds too."""
    fields = dict(teacher)
    model_type = fields.pop("model_type")
    return dict(AutoConfig.for_model(model_type, **fields).rope_parameters)


def _persimmon_student_config(teacher: dict, attention_layers: list[int]) -> SsmHubHybridConfig:
    """Persimmon's block in the hybrid: LayerNorms, per-head LayerNorms on queries and keys, partial RoPE, a plain
    MLP (relu^2), biases everywhere; full multi-head attention."""
    hidden, layers, heads = teacher["hidden_size"], teacher["num_hidden_layers"], teacher["num_attention_heads"]
    if hidden % heads:
        raise ValueError(f"persimmon teacher: hidden_size ({hidden}) must be divisible by num_attention_heads "
                         f"({heads})")
    mixers = ["attention" if layer in attention_layers else "mamba2" for layer in range(layers)]
    return _student_config(
        teacher, hidden, heads, heads, hidden // heads, mixers, tie_default=False,
        attention_bias=True, rope_parameters=_teacher_rope_parameters(teacher),
        max_position_embeddings=teacher.get("max_position_embeddings", 16384), mlp_type="plain",
        hidden_act=teacher.get("hidden_act", "relu2"), mlp_bias=True, intermediate_size=teacher["intermediate_size"],
        norm_type="layer", mamba_proj_bias=True, layer_norm_epsilon=teacher.get("layer_norm_eps", 1e-5),
        attention_qk_norm=bool(teacher.get("qk_layernorm", True)),
    )


def _llama_names_from_persimmon(weights: dict[str, torch.Tensor], config: SsmHubHybridConfig
                                ) -> dict[str, torch.Tensor]:
    """Persimmon's tensors in Llama's names: query_key_value, laid out [head, (q, k, v), head dim], split into
    q / k / v; dense -> o_proj; q/k_layernorm -> q/k_norm; dense_h_to_4h / dense_4h_to_h -> up / down_proj;
    final_layernorm -> norm."""
    heads, head_dim = config.num_attention_heads, config.head_dim
    renamed = {}
    names = {"self_attn.dense": "self_attn.o_proj", "self_attn.q_layernorm": "self_attn.q_norm",
             "self_attn.k_layernorm": "self_attn.k_norm", "mlp.dense_h_to_4h": "mlp.up_proj",
             "mlp.dense_4h_to_h": "mlp.down_proj"}
    for name, tensor in weights.items():
        if name.startswith("model.final_layernorm."):
            renamed["model.norm." + name.rsplit(".", 1)[1]] = tensor
            continue
        parts = name.split(".")
        if not (name.startswith("model.layers.") and len(parts) > 4):
            renamed[name] = tensor
            continue
        prefix, module, kind = ".".join(parts[:3]) + ".", ".".join(parts[3:-1]), parts[-1]
        if module == "self_attn.query_key_value":
            per_head = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:])
            for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                renamed[f"{prefix}self_attn.{projection}.{kind}"] = \
                    per_head[:, index].reshape(heads * head_dim, *tensor.shape[1:]).contiguous()
        else:
            renamed[f"{prefix}{names.get(module, module)}.{kind}"] = tensor
    return renamed


def _llama_names_from_gpt2(weights: dict[str, torch.Tensor], config: SsmHubHybridConfig) -> dict[str, torch.Tensor]:
    """GPT-2's tensors in Llama's names: its Conv1D weights ([in, out]) transposed to Linear's [out, in], the fused
    c_attn split into q / k / v. The causal-mask buffers that older checkpoints store (attn.bias, attn.masked_bias)
    are not weights and are dropped."""
    renamed = {}
    fused_qkv = {}
    for name, tensor in weights.items():
        name = name.removeprefix("transformer.")
        parts = name.split(".")
        if parts[0] == "h" and len(parts) == 4 and parts[2] == "attn" and parts[3] in ("bias", "masked_bias"):
            continue
        if parts[0] != "h":
            top = {"wte.weight": "model.embed_tokens.weight", "wpe.weight": "model.embed_positions.weight",
                   "ln_f.weight": "model.norm.weight", "ln_f.bias": "model.norm.bias"}
            renamed[top.get(name, name)] = tensor
            continue
        layer, inner = parts[1], ".".join(parts[2:])
        prefix = f"model.layers.{layer}."
        if inner.startswith("attn.c_attn."):
            fused_qkv[(prefix, parts[-1])] = tensor
            continue
        linear = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
        norms = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}
        module, kind = ".".join(parts[2:-1]), parts[-1]
        if module in linear:
            renamed[f"{prefix}{linear[module]}.{kind}"] = tensor.t().contiguous() if kind == "weight" else tensor
        elif module in norms:
            renamed[f"{prefix}{norms[module]}.{kind}"] = tensor
        else:
            renamed[name] = tensor  # no place in the student: student_weights names it
    for (prefix, kind), tensor in fused_qkv.items():
        parts = (tensor.t() if kind == "weight" else tensor).split(config.hidden_size)
        for projection, part in zip(("q_proj", "k_proj", "v_proj"), parts):
            renamed[f"{prefix}self_attn.{projection}.{kind}"] = part.contiguous()
    return renamed


def _teacher_layer(weights: dict, model_type: str, layer: int, config: SsmHubHybridConfig) -> dict[str, torch.Tensor]:
    """One teacher layer in Llama's names (q/k/v/o_proj, gate/up/down_proj, the two norms), with Phi-3's fused
    projections split; every tensor taken is removed from ``weights``."""
    prefix = f"model.layers.{layer}."
    take = {name[len(prefix):]: weights.pop(name) for name in [n for n in weights if n.startswith(prefix)]}
    if model_type == "phi3":
        query, key_value = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        # Clones: views of one fused tensor would share its storage, which safetensors refuses to save.
        q, k, v = (part.clone() for part in take.pop("self_attn.qkv_proj.weight").split([query, key_value, key_value]))
        gate, up = (part.clone() for part in take.pop("mlp.gate_up_proj.weight").chunk(2))
        take.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
                     "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up})
    return take


def _fresh_mamba(initialiser: SsmHubHybridForCausalLM, layer: int, seed: int,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A new ssm_hub_hybrid's Mamba-2 mixer tensors for ``layer``, as ``initialiser._init_weights`` draws them,
    seeded per layer."""
    config = initialiser.config
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed * 1_000_003 + layer)
        mixer = SSM_MIXER_CLASSES["mamba2"](config.ssm_config("mamba2"), layer_idx=layer)
        for module in reversed(list(mixer.modules())):  # children first, as transformers initialises a model
            initialiser._init_weights(module)
    return {name: tensor.detach().to(dtype) for name, tensor in mixer.state_dict().items()}


def _seeded_mamba(attention: dict[str, torch.Tensor], config: SsmHubHybridConfig, layer: int,
                  seed: int) -> dict[str, torch.Tensor]:
    """The Mamba-2 layer's tensors (names under ``mamba.``) seeded from one attention layer's (module docstring)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    inner = heads * head_dim
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    dtype = attention["q_proj.weight"].dtype

    def per_query_head(tensor):  # [Hkv * P, ...] -> [H * P, ...]: each key/value head once per query head it serves
        grouped = tensor.reshape(kv_heads, head_dim, *tensor.shape[1:])
        return grouped.repeat_interleave(heads // kv_heads, dim=0).reshape(inner, *tensor.shape[1:])

    def scaled_by_norm(name, tensor, rows_per_head):  # a per-head norm's weight folded into the rows it scales
        if f"{name}.weight" not in attention:
            return tensor
        scale = attention[f"{name}.weight"]
        return (tensor.reshape(rows_per_head, head_dim, *tensor.shape[1:])
                * scale.reshape(1, head_dim, *([1] * (tensor.ndim - 1)))).reshape(tensor.shape)

    query = scaled_by_norm("q_norm", attention["q_proj.weight"], heads)
    key = scaled_by_norm("k_norm", attention["k_proj.weight"], kv_heads)
    gate = torch.randn(inner, config.hidden_size, generator=generator) * config.initializer_range
    dt_rows = torch.zeros(heads, config.hidden_size)
    in_proj = torch.cat([gate.to(dtype), per_query_head(attention["v_proj.weight"]),
                         per_query_head(key), query, dt_rows.to(dtype)])
    conv_channels = inner + 2 * heads * head_dim
    conv = torch.zeros(conv_channels, 1, config.mamba_d_conv, dtype=dtype)
    conv[:, 0, -1] = 1  # the current token's tap: the conv starts as the identity
    ssm = config.ssm_config("mamba2")
    A = torch.empty(heads).uniform_(*ssm.A_init_range, generator=generator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
        dt = sample_time_steps(heads, ssm)
    seeded = {
        "in_proj.weight": in_proj, "conv1d.weight": conv, "conv1d.bias": torch.zeros(conv_channels, dtype=dtype),
        "dt_bias": inverse_softplus(dt).to(dtype), "A_log": torch.log(A).to(dtype),
        "D": torch.zeros(heads, dtype=dtype), "norm.weight": torch.ones(inner, dtype=dtype),
        "out_proj.weight": attention["o_proj.weight"],
    }
    if config.mamba_proj_bias:
        def bias(name, rows):
            return attention.get(name, torch.zeros(rows, dtype=dtype))

        seeded["in_proj.bias"] = torch.cat([
            torch.zeros(inner, dtype=dtype), per_query_head(bias("v_proj.bias", kv_heads * head_dim)),
            per_query_head(scaled_by_norm("k_norm", bias("k_proj.bias", kv_heads * head_dim), kv_heads)),
            scaled_by_norm("q_norm", bias("q_proj.bias", inner), heads),
            torch.zeros(heads, dtype=dtype),
        ])
        seeded["out_proj.bias"] = bias("o_proj.bias", config.hidden_size)
    return seeded


def student_weights(teacher_weights: dict[str, torch.Tensor], model_type: str, config: SsmHubHybridConfig,
                    seed: int = 0, mixer_init: str = "attention") -> dict[str, torch.Tensor]:
    """The student's state dict from the teacher's (Llama names), the replaced layers' mixers seeded from their
    attention or fresh (``mixer_init``, module docstring). Copied tensors are shared, not cloned. Every teacher
    tensor must have a place: ValueError naming the ones the student has none for."""
    if mixer_init not in MIXER_INITS:
        raise ValueError(f"mixer_init must be one of {MIXER_INITS}, got {mixer_init!r}")
    if mixer_init == "fresh":
        with torch.device("meta"):
            initialiser = SsmHubHybridForCausalLM(config)  # for its _init_weights alone, which reads the config
    renaming = {"gpt2": _llama_names_from_gpt2, "persimmon": _llama_names_from_persimmon}
    weights = renaming[model_type](teacher_weights, config) if model_type in renaming else dict(teacher_weights)

    def need(tensors: dict, name: str, where: str = "") -> torch.Tensor:
        if name not in tensors:
            raise ValueError(f"the teacher has no {where}{name}")
        return tensors.pop(name)

    embeddings = need(weights, "model.embed_tokens.weight")
    student = {"model.embed_tokens.weight": embeddings, "model.final_layernorm.weight": need(weights, "model.norm.weight")}
    norm_kinds = ("weight", "bias") if config.norm_type == "layer" else ("weight",)
    if config.norm_type == "layer":
        student["model.final_layernorm.bias"] = need(weights, "model.norm.bias")
    if config.absolute_position_embeddings:
        student["model.embed_positions.weight"] = need(weights, "model.embed_positions.weight")
    head = weights.pop("lm_head.weight", None)
    if not config.tie_word_embeddings:
        if head is None:
            raise ValueError("the teacher has no lm_head.weight but does not tie its embeddings")
        student["lm_head.weight"] = head
    elif head is not None and not torch.equal(head, embeddings):
        raise ValueError("the teacher's config ties its embeddings, but its lm_head.weight differs from them")
    else:
        student["lm_head.weight"] = embeddings  # tied: the model's state dict names the head too
    for layer, mixer in enumerate(config.mixer_types):
        taken = _teacher_layer(weights, model_type, layer, config)
        prefix = where = f"model.layers.{layer}."
        for kind in norm_kinds:
            student[f"{prefix}input_layernorm.{kind}"] = need(taken, f"input_layernorm.{kind}", where)
            student[f"{prefix}pre_ff_layernorm.{kind}"] = need(taken, f"post_attention_layernorm.{kind}", where)
        for name in [n for n in taken if n.startswith("mlp.")]:
            student[prefix + "feed_forward." + name[4:]] = taken.pop(name)
        placed = ATTENTION_TENSORS | (QK_NORM_TENSORS if config.attention_qk_norm else set())
        attention = {name[len("self_attn."):]: taken.pop(name) for name in [n for n in taken if n.startswith("self_attn.")]
                     if name[len("self_attn."):] in placed}
        missing = [f"{where}self_attn.{name}.weight" for name in ("q_proj", "k_proj", "v_proj", "o_proj")
                   + (("q_norm", "k_norm") if config.attention_qk_norm else ()) if f"{name}.weight" not in attention]
        missing += [f"{where}self_attn.{norm}.bias" for norm in ("q_norm", "k_norm")
                    if config.attention_qk_norm and config.norm_type == "layer" and f"{norm}.bias" not in attention]
        if missing:
            raise ValueError(f"the teacher has no {', '.join(missing)}")
        biases = sorted(name for name in attention if name.endswith(".bias"))
        if biases and not config.attention_bias:
            raise ValueError(f"teacher layer {layer} has attention biases ({', '.join(biases)}) but its config does "
                             f"not say attention_bias")
        if mixer == "mamba2":
            mamba = (_seeded_mamba(attention, config, layer, seed) if mixer_init == "attention"
                     else _fresh_mamba(initialiser, layer, seed, attention["o_proj.weight"].dtype))
            student.update({prefix + "mamba." + name: tensor for name, tensor in mamba.items()})
        else:
            for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
                student[f"{prefix}self_attn.{projection}.weight"] = attention.pop(f"{projection}.weight")
                if config.attention_bias:
                    rows = student[f"{prefix}self_attn.{projection}.weight"].shape[0]
                    student[f"{prefix}self_attn.{projection}.bias"] = attention.pop(
                        f"{projection}.bias", torch.zeros(rows, dtype=student[prefix + "input_layernorm.weight"].dtype))
            if config.attention_qk_norm:
                for norm in ("q_norm", "k_norm"):
                    for kind in norm_kinds:
                        student[f"{prefix}self_attn.{norm}.{kind}"] = attention.pop(f"{norm}.{kind}")
        if taken:
            raise ValueError(f"teacher layer {layer} has tensors the student has no place for: "
                             + ", ".join(sorted(taken)))
    if weights:
        raise ValueError("the teacher has tensors the student has no place for: " + ", ".join(sorted(weights)))
    return student


def _model(config: SsmHubHybridConfig, weights: dict[str, torch.Tensor]) -> SsmHubHybridForCausalLM:
    """The student with ``weights`` (shared, not copied), without a random initialisation first."""
    with torch.device("meta"):
        model = SsmHubHybridForCausalLM(config)
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def probe_ids(tokenizer_folder: Path, sequences: int = 8, length: int = 128) -> torch.Tensor:
    """[sequences, length] token ids of English text that ships with Python (pydoc's topics), cut from one long
    stream, with the teacher's tokenizer."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"auto:N measures each layer on text tokenized with the teacher's tokenizer, and none "
                         f"loads from {tokenizer_folder}: {error}") from None
    stream = tokenizer("\n\n".join(topics[key] for key in sorted(topics)), return_tensors="pt").input_ids[0]
    if stream.numel() < sequences * length:
        raise ValueError(f"the probe text gives {stream.numel()} tokens, fewer than {sequences} x {length}")
    return stream[: sequences * length].view(sequences, length)


@torch.no_grad()
def probe_layer_importance(teacher_weights: dict[str, torch.Tensor], teacher: dict, ids: torch.Tensor,
                           seed: int = 0, mixer_init: str = "attention") -> dict[int, float]:
    """For each layer, the mean per-token KL(teacher || student) on ``ids`` when that layer alone becomes a Mamba-2
    layer initialised as ``mixer_init`` says: how much the model loses without that attention layer. (The
    all-attention student computes the teacher's logits, so it stands in for the teacher.)"""
    layers = teacher_layer_count(teacher)

    def log_probs(kept):
        config = student_config(teacher, kept)
        model = _model(config, student_weights(teacher_weights, teacher["model_type"], config, seed, mixer_init))
        return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)

    reference = log_probs(list(range(layers)))
    scores = {}
    for layer in range(layers):
        replaced = log_probs([kept for kept in range(layers) if kept != layer])
        kl = (reference.exp() * (reference - replaced)).sum(-1)
        scores[layer] = kl.mean().item()
    return scores


def seed_hybrid(teacher: str | Path, output_dir: str | Path, attention_layers: str = "all",
                dtype: str | torch.dtype | None = None, seed: int = 0, mixer_init: str = "attention") -> Path:
    """Write an ssm_hub_hybrid seeded from ``teacher`` (a local folder or a Hub model id) to ``output_dir``,
    keeping the attention layers ``attention_layers`` names, the others' mixers seeded from attention or fresh
    (``mixer_init``; module docstring); the teacher's tokenizer and generation files are copied and
    ``seeding.json`` records the seeding. Returns the output folder."""
    source_dir, output_dir = source_and_output(teacher, output_dir)
    config_dict = read_config(source_dir)
    student_config(config_dict, [])  # an unsupported teacher fails here, before its weights are read
    weights = read_weights(source_dir, teacher, parse_dtype(dtype))
    config, seeded, record = seeded_student(config_dict, weights, source_dir, attention_layers, seed, mixer_init)
    with staged_model_folder(output_dir) as staging:  # moved into place once complete
        save_weights(SsmHubHybridForCausalLM, config, seeded, staging)
        copy_tokenizer_files(source_dir, staging)
        (staging / SEEDING_FILE).write_text(json.dumps({"teacher": str(teacher), **record}, indent=1) + "\n")
    return output_dir


def seeded_student(teacher: dict, weights: dict[str, torch.Tensor], source_dir: Path, attention_layers: str,
                   seed: int, mixer_init: str) -> tuple[SsmHubHybridConfig, dict[str, torch.Tensor], dict]:
    """(the student's config, its weights, what seeding.json records) for ``teacher`` (its config.json as a dict)
    with ``weights`` (its safetensors), ``attention_layers`` a SPEC; ``auto:N`` probes with the tokenizer in
    ``source_dir``."""
    kept = parse_layer_selection(attention_layers, teacher_layer_count(teacher))
    scores = None
    if isinstance(kept, tuple):
        scores = probe_layer_importance(weights, teacher, probe_ids(source_dir), seed, mixer_init)
        kept = sorted(sorted(scores, key=lambda layer: -scores[layer])[: kept[1]])
    config = student_config(teacher, kept)
    record = {"teacher_model_type": teacher["model_type"], "attention_layers": str(attention_layers),
              "kept_attention_layers": kept, "mixer_init": mixer_init, "seed": seed}
    if scores is not None:
        record["probe"] = {"what": "mean per-token KL(teacher || student) on 8 x 128 tokens of pydoc's topics when "
                                   "the layer alone becomes a Mamba-2 layer initialised as mixer_init says",
                           "scores": scores}
    return config, student_weights(weights, teacher["model_type"], config, seed, mixer_init), record
