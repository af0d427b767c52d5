"""ssm_hub's hybrid SSM / attention / mixture-of-experts language model (model_type ``ssm_hub_hybrid``).

    import ssm_hub
    from transformers import AutoModelForCausalLM
    from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig
    config = SsmHubHybridConfig(hidden_size=256, num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=2)
    model = AutoModelForCausalLM.from_config(config)

Each layer is ``x + mixer(norm(x))`` then, unless its feed-forward is ``"none"``, ``x + ffn(norm(x))``. The mixer is
a Mamba-1 or Mamba-2 mixer (the pure-SSM models' own, built from ``config.ssm_config(kind)``) or self-attention;
the feed-forward a SwiGLU MLP, a mixture of experts or a product-key memory. Module names follow transformers' Jamba and Bamba
(``model.embed_tokens``, ``input_layernorm``, ``mamba`` / ``self_attn``, ``pre_ff_layernorm``, ``feed_forward``,
``model.final_layernorm``), so that their checkpoints convert by a declarative map.

The cache is transformers' own: ``DynamicCache(config=...)`` / ``StaticCache`` build conv + recurrent state slots
for the SSM layers and key/value slots for the attention layers from ``config.layer_types``. Attention masks come
from ``transformers.masking_utils`` (causal, sliding window, padding); the SSM layers read the 2-D padding mask and
the document boundaries of packed rows (``position_ids`` restarts, ``seq_idx``, ``cu_seqlens``) as the pure-SSM
models do, and the attention masks keep each query inside the same documents, with or without a cache.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, StaticLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ssm_hub.generation import GraphDecodingGenerationMixin
from ssm_hub.layers.attention import SelfAttention
from ssm_hub.layers.rope import RotaryEmbedding
from ssm_hub.layers.mamba2_mixer import Mamba2Mixer
from ssm_hub.layers.mamba_mixer import MambaMixer
from ssm_hub.layers.modality_routing import ModalityRouting, modality_copies, per_modality
from ssm_hub.layers.mlp import PlainMLP, SwiGLUMLP
from ssm_hub.layers.moe import MoEExperts, SparseMoE, TopKRouter, load_balancing_loss, router_z_loss
from ssm_hub.layers.pkm import ProductKeyMemory
from ssm_hub.layers.norms import GatedRMSNorm, RMSNorm
from ssm_hub.layers.sequence_boundaries import (
    check_position_range,
    packing_inputs_as_tensors,
    padding_mask,
    positions_within_documents,
    resolve_seq_idx,
    same_document_mask_function,
)
from ssm_hub.models.checkpoint_loading import StrictLoadingMixin
from ssm_hub.models.common import (
    LOSS_KWARGS,
    PACKING_KWARGS,
    cache_from_aliases,
    embeddings_and_cache,
    init_conv1d,
    init_mixer,
    lm_head_logits_and_loss,
    pooled_classification,
    prepare_classifier_call,
    reject_unknown_kwargs,
)
from ssm_hub.models.hybrid.configuration_hybrid import (
    ATTENTION_MIXERS,
    CACHE_LAYER_TYPES,
    SsmHubHybridConfig,
)
from ssm_hub.models.remote_code import save_with_remote_code

SSM_MIXER_CLASSES = {"mamba": MambaMixer, "mamba2": Mamba2Mixer}
# Keyword arguments the attention implementations take for packed rows (flash attention's varlen path).
ATTENTION_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# The outputs' fields in the order of transformers' MoE outputs (MoeModelOutputWithPast, MoeCausalLMOutputWithPast),
# which is the order of their return_dict=False tuples (fields left None are skipped). ``attentions``, with
# output_attentions: one [batch, heads, queries, keys] tensor of attention probabilities per attention layer, in
# layer order; the SSM layers have none (as in transformers' Jamba and Bamba).
@dataclass
class HybridModelOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class HybridSequenceClassifierOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class HybridCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass(frozen=True)
class ModalityLayout:
    """Which parts of each block get one copy per modality (ssm_hub_multimodal's Mixture-of-Mamba): the SSM mixers'
    projections (Mamba-2: in_proj, out_proj; Mamba-1: in_proj, x_proj, dt_proj, out_proj), the dense MLPs, the two
    norms. The first modality (text) uses the block's own
    modules; the others their copies in ``modality_*``."""

    count: int
    mixers: bool
    mlps: bool
    norms: bool


def _norm(config: SsmHubHybridConfig) -> nn.Module:
    """The blocks' and the final norm: RMSNorm, or LayerNorm with a bias (``norm_type="layer"``, GPT-2)."""
    if config.norm_type == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
    return RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def _feed_forward(config: SsmHubHybridConfig, ffn_type: str) -> nn.Module:
    if ffn_type == "mlp" and config.mlp_type == "plain":
        return PlainMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=config.mlp_bias)
    if ffn_type == "mlp":
        return SwiGLUMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
    if ffn_type == "pkm":
        return ProductKeyMemory(
            config.hidden_size, config.pkm_num_keys, config.pkm_heads, config.pkm_key_dim, config.pkm_topk
        )
    return SparseMoE(
        config.hidden_size, config.num_experts, config.num_experts_per_tok,
        config.moe_intermediate_size or config.intermediate_size, scoring=config.router_scoring,
        norm_topk_prob=config.norm_topk_prob,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size or None,
        shared_expert_gate=config.shared_expert_gate,
    )


class HybridBlock(GradientCheckpointingLayer):
    """One layer: pre-norm mixer (SSM or attention), then an optional pre-norm feed-forward (MLP, MoE or PKM).
    ``modalities`` gives the parts that ssm_hub_multimodal's Mixture-of-Mamba copies per modality."""

    def __init__(self, config: SsmHubHybridConfig, layer_idx: int, modalities: ModalityLayout | None = None):
        super().__init__()
        self.mixer_type = config.mixer_types[layer_idx]
        self.layer_type = CACHE_LAYER_TYPES[self.mixer_type]
        self.ffn_type = config.ffn_types[layer_idx]
        self.residual_in_fp32 = config.residual_in_fp32
        self.input_layernorm = _norm(config)
        if self.mixer_type in ATTENTION_MIXERS:
            self.self_attn = SelfAttention(
                config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                head_dim=config.attention_head_dim, attention_bias=config.attention_bias,
                attention_dropout=config.attention_dropout, use_rope=config.use_rope,
                rope_parameters=config.rope_parameters, max_position_embeddings=config.max_position_embeddings,
                sliding_window=config.sliding_window if self.mixer_type == "sliding_attention" else None,
                layer_idx=layer_idx, attn_implementation=config._attn_implementation or "sdpa",
                qk_norm=config.norm_type if config.attention_qk_norm else None, qk_norm_eps=config.layer_norm_epsilon,
            )
        else:
            copies = modalities.count if modalities is not None and modalities.mixers else 1
            self.mamba = SSM_MIXER_CLASSES[self.mixer_type](config.ssm_config(self.mixer_type), layer_idx=layer_idx,
                                                            modalities=copies)
        if self.ffn_type != "none":
            self.pre_ff_layernorm = _norm(config)
            self.feed_forward = _feed_forward(config, self.ffn_type)
        count = modalities.count if modalities is not None else 1
        norms = count if modalities is not None and modalities.norms else 1
        self.modality_input_layernorm = modality_copies(lambda: _norm(config), norms)
        self.modality_pre_ff_layernorm = modality_copies(lambda: _norm(config), norms if self.ffn_type != "none" else 1)
        mlps = count if modalities is not None and modalities.mlps and self.ffn_type == "mlp" else 1
        self.modality_feed_forward = modality_copies(lambda: _feed_forward(config, "mlp"), mlps)

    def forward(self, hidden_states, residual=None, cache=None, padding_mask=None, seq_idx=None,
                attention_masks=None, position_embeddings=None, attention_kwargs=None,
                modality: ModalityRouting | None = None, output_attentions: bool = False):
        """mamba_ssm's form of the pre-norm block, which lets each residual add and the norm after it run as one op
        (one kernel without gradients): takes the previous block's last branch output and the residual stream
        before it (for the first block: the embeddings and None) and returns (this block's last branch output, the
        residual stream entering that branch, the MoE router logits or None, the attention probabilities or None).
        The stream after the block is the sum of the first two, which the next block or the model's final norm
        forms. The probabilities come from an attention layer asked for them (``output_attentions``)."""
        decoded = None
        if residual is None:
            residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
            normed = per_modality(self.input_layernorm, self.modality_input_layernorm,
                                  hidden_states.to(self.input_layernorm.weight.dtype), modality)
        else:
            # A Mamba-2 mixer takes this residual add and the input norm into its one-op decode step.
            decode_after_norm = getattr(getattr(self, "mamba", None), "decode_after_norm", None)
            if decode_after_norm is not None and self.modality_input_layernorm is None:
                decoded = decode_after_norm(hidden_states, residual, self.input_layernorm, cache, padding_mask,
                                            seq_idx)
            if decoded is None:
                normed, residual = add_and_norm(self.input_layernorm, self.modality_input_layernorm, hidden_states,
                                                residual, modality)
        attention_probabilities = None
        if decoded is not None:
            mixed, residual = decoded
        elif self.mixer_type not in ATTENTION_MIXERS:
            mixed = self.mamba(normed, cache=cache, padding_mask=padding_mask, seq_idx=seq_idx, modality=modality)
        elif output_attentions:
            mixed, attention_probabilities = self.self_attn(
                normed, position_embeddings=position_embeddings, attention_mask=attention_masks[self.layer_type],
                cache=cache, output_attentions=True, **attention_kwargs)
        else:
            mixed = self.self_attn(normed, position_embeddings=position_embeddings,
                                   attention_mask=attention_masks[self.layer_type], cache=cache, **attention_kwargs)
        if self.ffn_type == "none":
            return mixed, residual, None, attention_probabilities
        normed, residual = add_and_norm(self.pre_ff_layernorm, self.modality_pre_ff_layernorm, mixed, residual,
                                        modality)
        router_logits = None
        if self.ffn_type == "moe":
            fed, router_logits = self.feed_forward(normed)
        else:
            fed = per_modality(self.feed_forward, self.modality_feed_forward, normed, modality)
        return fed, residual, router_logits, attention_probabilities


def add_and_norm(norm, modality_norms, x, residual, modality: ModalityRouting | None):
    """(the norm of residual + x in the norm's dtype, residual + x): one op for an RMSNorm shared by every modality
    (see RMSNorm.add_and_norm), the add and then the norm otherwise (a LayerNorm, per-modality norms)."""
    if type(norm) is RMSNorm and modality_norms is None:
        return norm.add_and_norm(x, residual)
    total = residual + x
    return per_modality(norm, modality_norms, total.to(norm.weight.dtype), modality), total


class SsmHubHybridPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """Base of the hybrid (and multimodal) model classes. ``from_pretrained`` raises for a checkpoint with missing or
    unexpected tensors (``strict=False`` loads it anyway) and reads safetensors only
    (ssm_hub.models.checkpoint_loading)."""

    # get_input_embeddings / set_input_embeddings: transformers' defaults find embed_tokens (here or in .model).
    config_class = SsmHubHybridConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _is_stateful = True

    def _init_weights(self, module):
        """N(0, initializer_range) for every projection, embedding and expert (as Jamba and Llama), unit norms, and the
        SSM mixers' own parameters as the pure-SSM models initialise them, out_proj scaled by 1/sqrt(layers), and
        the RoPE frequencies recomputed."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init_conv1d(module)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            init.ones_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RotaryEmbedding):
            # Its frequencies are non-persistent buffers: after loading on the meta device they hold nothing yet.
            module.reset_frequencies(module.inv_freq.device)
        elif isinstance(module, ProductKeyMemory):
            # Lample et al.: sub-keys uniform within 1 / sqrt(their size), values N(0, 1 / hidden_size); the query
            # projection is a Linear, initialised above like every projection.
            bound = (module.key_dim // 2) ** -0.5
            init.uniform_(module.keys, -bound, bound)
            init.normal_(module.values.weight, mean=0.0, std=module.values.embedding_dim**-0.5)
        if isinstance(module, (MambaMixer, Mamba2Mixer)):
            kind = "mamba" if isinstance(module, MambaMixer) else "mamba2"
            init_mixer(module, self.config.ssm_config(kind), self.config.rescale_prenorm_residual,
                       self.config.num_hidden_layers)

    def post_init(self):
        super().post_init()
        self._fit_tp_plan()

    def _fit_tp_plan(self) -> None:
        """Adjust the tensor-parallel plan transformers gathered (``self._tp_plan``, read by ``tp_plan="auto"``).

        transformers applies ``config.base_model_tp_plan`` at the root of the base model, and there also splits
        ``embed_tokens`` over the vocabulary. The plan's names start at the hybrid backbone's ``layers``; a model
        that wraps the backbone under another name with the same config (ssm_hub_multimodal's ``language_model``)
        gets them from that child, prefixed, so the unprefixed copies are dropped. A language-model head is split
        over the vocabulary like the embeddings (``colwise_gather_output``, as transformers' Llama): a tied head and
        its embeddings are one tensor, which must be split the same way."""
        plan = getattr(self, "_tp_plan", None)
        if not plan:
            return
        if "layers" not in self._modules:
            for key in self.config.base_model_tp_plan or {}:
                plan.pop(key, None)
        head = getattr(self, "lm_head", None)
        if isinstance(head, nn.Linear) and any(key.rpartition(".")[2] == "embed_tokens" for key in plan):
            plan.setdefault("lm_head", "colwise_gather_output")

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """transformers' switch (it updates ``config._attn_implementation``), passed on to the attention layers,
        which pick their attention function by their own ``attn_implementation``."""
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.attn_implementation = self.config._attn_implementation

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' save_pretrained, plus the model's code next to the weights (see models.remote_code)."""
        save_with_remote_code(self, super().save_pretrained, save_directory, push_to_hub, kwargs)

    def _causal_lm_forward(self, labels, logits_to_keep, return_dict, attention_mask, **inputs):
        """The forward of a causal-LM head on ``self.model`` (the hybrid's, the multimodal model's): the model on
        ``attention_mask`` and ``inputs``, less the loss's own keyword arguments (LOSS_KWARGS, which go to
        ``self.loss_function``), then the head's logits and loss plus the router losses, as a HybridCausalLMOutput
        (a tuple unless ``return_dict``, by default ``config.return_dict``)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        loss_kwargs = {key: inputs.pop(key) for key in LOSS_KWARGS if key in inputs}
        outputs = self.model(attention_mask=attention_mask, **inputs, return_dict=True)
        logits, loss = lm_head_logits_and_loss(self, outputs.last_hidden_state, labels, logits_to_keep, loss_kwargs)
        loss, aux_loss = self._add_router_losses(loss, outputs.router_logits, attention_mask)
        output = HybridCausalLMOutput(loss=loss, aux_loss=aux_loss, logits=logits, cache=outputs.cache,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                      router_logits=outputs.router_logits)
        return output if return_dict else output.to_tuple()

    def _add_router_losses(self, loss, router_logits, attention_mask):
        """(loss + aux, aux): ``router_aux_loss_coef`` x the load-balancing loss plus ``router_z_loss_coef`` x the
        z-loss over the MoE layers' router logits; (loss, None) without router logits."""
        if not router_logits:
            return loss, None
        config = self.config
        # Padding tokens are routed too, but must not count towards the balance.
        mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 else None
        aux_loss = config.router_aux_loss_coef * load_balancing_loss(
            router_logits, config.num_experts, config.num_experts_per_tok, mask)
        if config.router_z_loss_coef:
            aux_loss = aux_loss + config.router_z_loss_coef * router_z_loss(router_logits, mask)
        if loss is not None:
            loss = loss + aux_loss.to(loss.device)
        return loss, aux_loss


def _check_absolute_positions(position_ids: torch.Tensor, limit: int) -> None:
    """The caller's positions checked against the table of learned absolute positions (one host sync). Skipped while
    compiling or capturing a CUDA graph, where the sync cannot happen."""
    if position_ids.numel() == 0 or torch.compiler.is_compiling() or (
            position_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    low, high = torch.aminmax(position_ids)
    check_position_range(low.item(), high.item(), limit)


class SsmHubHybridModel(SsmHubHybridPreTrainedModel):
    """Embeddings (plus absolute position embeddings, if the config has them) -> hybrid blocks -> final norm.
    ``modalities``: the parts of each block copied per modality (ssm_hub_multimodal's backbone); None for text."""

    def __init__(self, config: SsmHubHybridConfig, modalities: ModalityLayout | None = None):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size) \
            if config.absolute_position_embeddings else None
        self.has_attention = any(mixer in ATTENTION_MIXERS for mixer in config.mixer_types)
        # The attention layers' shared RoPE, from config.rope_parameters as it is now (it may have been edited since
        # the config was built). Built before the layers, so that a bad value is reported against the config.
        self.rotary_emb = RotaryEmbedding(config) if self.has_attention and config.use_rope else None
        self.layers = nn.ModuleList([HybridBlock(config, layer_idx=i, modalities=modalities)
                                     for i in range(config.num_hidden_layers)])
        self.final_layernorm = _norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _past_length(self, cache) -> int | torch.Tensor:
        """How many tokens came before the current ones, read from an attention layer's cache slot (the SSM layers'
        slots do not count tokens); 0 without a cache or without attention layers."""
        if cache is None or not self.has_attention:
            return 0
        first_attention_layer = next(index for index, kind in enumerate(self.config.layer_types)
                                     if kind != "linear_attention")
        return cache.get_seq_length(first_attention_layer)

    def _known_past_length(self, cache, past) -> int | None:
        """How many tokens came before the current ones, where the host knows it without waiting for the device: 0
        without a cache or before its first tokens, ``past`` (:meth:`_past_length`) from a dynamic attention slot;
        None after earlier tokens otherwise (a static slot counts them on the device, an SSM slot not at all)."""
        if cache is None:
            return 0
        if "linear_attention" in self.config.layer_types and not cache.has_previous_state():
            return 0
        return past if self.has_attention and isinstance(past, int) else None

    def _attention_masks(self, inputs_embeds, attention_mask, cache, position_ids, seq_idx, past,
                         eager: bool = False) -> dict:
        """The attention layers' masks by cache layer kind, as transformers' generate also precomputes them; with
        ``seq_idx`` (packed rows), restricted to each query's own document. ``eager``: the masks of the eager
        implementation whatever the model's (output_attentions computes the probabilities on the eager path)."""
        masks = {}
        # transformers leaves out the mask of a single query unless the cache is compileable, which it takes to mean
        # static; a static cache recording SSM states for assisted decoding is not compileable, yet its attention
        # layers hold empty and rolled-back slots that only the mask hides.
        static_attention = cache is not None and any(isinstance(layer, StaticLayer) for layer in cache.layers)
        config = self.config
        if eager and config._attn_implementation != "eager":
            # masking_utils picks the mask's form by config._attn_implementation.
            config = copy.copy(config)
            config._attn_implementation = "eager"
        mask_kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           cache=cache, position_ids=position_ids, allow_is_causal_skip=not static_attention)
        if seq_idx is not None:
            # Without position_ids: from them transformers would find the documents too, but only without a cache,
            # and then hand the mask function positions within documents instead of the indices it reads.
            mask_kwargs.update(position_ids=None, and_mask_function=same_document_mask_function(seq_idx, past))
        if "full_attention" in self.config.layer_types:
            masks["full_attention"] = create_causal_mask(**mask_kwargs)
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        modality: ModalityRouting | None = None,
        **kwargs,
    ) -> HybridModelOutput | tuple:
        r"""
        attention_mask: 2-D padding mask (attention masks are built from it) covering the cached tokens and the
            current ones, as in transformers: [batch, past + seq_len] (a mask of another length is a ValueError, where
            the cached tokens can be counted; after a static cache's first tokens it only has to be long enough); or
            the masks by cache layer kind ("full_attention", "sliding_attention", "linear_attention": the SSM layers'
            2-D padding mask) as transformers' generate precomputes them.
        position_ids: positions for RoPE or the absolute position embeddings; a restart at 0 inside a row also starts
            a new document (packed rows).
        cache: a transformers ``Cache`` built from this config (``DynamicCache(config=...)`` or ``StaticCache``).
        output_attentions: also return ``attentions``, each attention layer's probabilities [batch, heads, queries,
            keys]; they come from the eager path (with eager masks), whatever the attention implementation.
        modality: each token's modality, for the blocks' per-modality parts (ssm_hub_multimodal); None: text.
        kwargs: packing boundaries ``seq_idx`` [B, T], ``cu_seqlens`` / ``cu_seq_lens_q`` [S+1] (batch 1), and
        flash attention's ``cu_seq_lens_k`` / ``max_length_q`` / ``max_length_k`` (the index ones, and position_ids,
        as tensors or Python lists); ``cache_position`` [T], the
        current tokens' positions in the whole sequence (transformers' older convention), used as the positions
        when there are no position_ids and no document boundaries.
        """
        cache = cache_from_aliases(cache, kwargs)
        cache_position = kwargs.pop("cache_position", None)
        reject_unknown_kwargs(type(self).__name__, kwargs, PACKING_KWARGS)
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        output_router_logits = output_router_logits if output_router_logits is not None else config.output_router_logits
        return_dict = return_dict if return_dict is not None else config.return_dict
        inputs_embeds, cache = embeddings_and_cache(self, self.embed_tokens, input_ids, inputs_embeds, cache,
                                                    use_cache)
        batch_size, seq_len = inputs_embeds.shape[:2]

        # Document boundaries for the SSM layers come from the caller's position_ids (before any default).
        position_ids = packing_inputs_as_tensors(position_ids, kwargs, inputs_embeds.device)
        seq_idx = resolve_seq_idx(batch_size, seq_len, position_ids, kwargs)
        past = self._past_length(cache)
        precomputed_masks = attention_mask if isinstance(attention_mask, dict) else None
        if precomputed_masks is not None:
            ssm_padding_mask = precomputed_masks.get("linear_attention")
        else:
            ssm_padding_mask = padding_mask(attention_mask, seq_len, self._known_past_length(cache, past))
        if position_ids is None and seq_idx is not None:
            # Documents given as seq_idx / cu_seqlens only: positions restart with each document, so that each one is
            # positioned (RoPE, absolute embeddings) as it would be alone.
            position_ids = positions_within_documents(seq_idx)
        if position_ids is None and cache_position is not None:
            position_ids = cache_position[None]
        if position_ids is None:
            if self.embed_positions is not None and not self.has_attention and cache is not None \
                    and cache.has_previous_state():
                # Only attention layers' caches know how many tokens came before.
                raise ValueError("a model with absolute position embeddings and no attention layer needs position_ids "
                                 "when it continues from a cache (generate passes them)")
            if self.embed_positions is not None and past + seq_len > config.max_position_embeddings:
                raise ValueError(f"positions up to {past + seq_len - 1} exceed the model's "
                                 f"max_position_embeddings ({config.max_position_embeddings}) absolute positions")
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past)[None]
        elif self.embed_positions is not None:
            _check_absolute_positions(position_ids, config.max_position_embeddings)
        if self.embed_positions is not None:
            inputs_embeds = inputs_embeds + self.embed_positions(position_ids)
        attention_masks, position_embeddings = None, None
        attention_kwargs = {name: kwargs[name] for name in ATTENTION_KWARGS if kwargs.get(name) is not None}
        if self.has_attention:
            attention_masks = precomputed_masks or self._attention_masks(
                inputs_embeds, attention_mask, cache, position_ids, seq_idx, past, eager=bool(output_attentions))
            if self.rotary_emb is not None:
                position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
            attention_kwargs["position_ids"] = position_ids

        # Each block's input (the residual stream entering it) for output_hidden_states, then the final normed state.
        all_hidden_states = (inputs_embeds,) if output_hidden_states else None
        all_router_logits = () if output_router_logits else None
        all_attentions = () if output_attentions else None
        hidden_states, residual = inputs_embeds, None
        for index, block in enumerate(self.layers):
            if output_hidden_states and index > 0:
                all_hidden_states += (residual + hidden_states,)
            hidden_states, residual, router_logits, attention_probabilities = block(
                hidden_states, residual, cache=cache, padding_mask=ssm_padding_mask, seq_idx=seq_idx,
                attention_masks=attention_masks, position_embeddings=position_embeddings,
                attention_kwargs=attention_kwargs, modality=modality, output_attentions=bool(output_attentions),
            )
            if output_router_logits and router_logits is not None:
                all_router_logits += (router_logits,)
            if output_attentions and attention_probabilities is not None:
                all_attentions += (attention_probabilities,)
        hidden_states, _ = add_and_norm(self.final_layernorm, None, hidden_states, residual, None)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        output = HybridModelOutput(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states,
                                   attentions=all_attentions, router_logits=all_router_logits)
        return output if return_dict else output.to_tuple()


class SsmHubHybridForCausalLM(SsmHubHybridPreTrainedModel, GraphDecodingGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SsmHubHybridConfig):
        super().__init__(config)
        self.model = SsmHubHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> HybridCausalLMOutput | tuple:
        r"""
        labels: token ids, shifted inside the loss; -100 is ignored. ``shift_labels``: labels already shifted (used
        instead). ``num_items_in_batch`` (passed by Trainer under gradient accumulation) normalises the summed loss.
        output_router_logits: return the MoE layers' router logits and add the load-balancing loss (times
        ``router_aux_loss_coef``) and the router z-loss (times ``router_z_loss_coef``) to the loss.
        logits_to_keep: compute logits for the last N positions only (0 = all), or for the given indices.
        """
        return self._causal_lm_forward(
            labels, logits_to_keep, return_dict, attention_mask, input_ids=input_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, output_router_logits=output_router_logits, **kwargs,
        )


class SsmHubHybridForSequenceClassification(SsmHubHybridPreTrainedModel):
    """The hybrid model + a linear score head read at each row's last non-padding token."""

    def __init__(self, config: SsmHubHybridConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = SsmHubHybridModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HybridSequenceClassifierOutput | tuple:
        r"""
        use_cache: accepted for compatibility with transformers' classifiers; a classifier keeps no cache, so True
        is an error rather than silently ignored.
        output_router_logits: as for the causal LM: return the router logits and add the router losses.
        """
        return_dict = prepare_classifier_call(self, use_cache, return_dict, kwargs)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=False, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, output_router_logits=output_router_logits, return_dict=True,
            **kwargs,
        )
        pooled_logits, loss = pooled_classification(self, outputs.last_hidden_state, input_ids, attention_mask, labels)
        loss, aux_loss = self._add_router_losses(loss, outputs.router_logits, attention_mask)
        output = HybridSequenceClassifierOutput(loss=loss, aux_loss=aux_loss, logits=pooled_logits,
                                                hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                                router_logits=outputs.router_logits)
        return output if return_dict else output.to_tuple()


# Auto classes these models answer to; ssm_hub.auto registers them and checkpoints carry them as auto_map.
AUTO_MAP = {
    "AutoModel": "SsmHubHybridModel",
    "AutoModelForCausalLM": "SsmHubHybridForCausalLM",
    "AutoModelForSequenceClassification": "SsmHubHybridForSequenceClassification",
}
