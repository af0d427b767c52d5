"""The parts every pure-SSM language model shares: the residual block, the backbone, the causal-LM and
sequence-classification heads, weight initialisation and the trust_remote_code export on save.

An architecture (Mamba, Mamba-2) subclasses these and only names its config class and mixer class.
Caching goes through transformers' own ``DynamicCache`` / ``StaticCache``: the configs declare every layer as
``linear_attention``, so the cache holds one conv window and one recurrent state per layer, and ``generate``,
beam search and the static cache work as for any transformers model.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from ssm_hub.generation import GraphDecodingGenerationMixin
from ssm_hub.layers.norms import GatedRMSNorm, RMSNorm
from ssm_hub.layers.sequence_boundaries import packing_inputs_as_tensors, padding_mask, resolve_seq_idx
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
from ssm_hub.models.remote_code import save_with_remote_code

@dataclass
class SSMModelOutput(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SSMCausalLMOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SSMSequenceClassifierOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class SSMBlock(GradientCheckpointingLayer):
    """Pre-norm residual block ``x + mixer(norm(x))``, the residual stream kept in fp32 if the config asks, in
    mamba_ssm's form: the block adds the previous block's mixer output into the residual stream itself, so that the
    add, the cast and this block's norm run as one op (one kernel without gradients, see RMSNorm.add_and_norm).

    ``forward(mixer_output, residual)`` takes the previous block's mixer output and the residual stream before it
    (for the first block: the embeddings and None) and returns (this block's mixer output, the residual stream
    entering this block). The residual stream after a block is the sum of the two, which the next block (or the
    backbone's final norm) forms."""

    def __init__(self, config, layer_idx: int, mixer_class: type[nn.Module]):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = mixer_class(config, layer_idx=layer_idx)

    def forward(self, hidden_states, residual=None, cache=None, padding_mask=None, seq_idx=None):
        if residual is None:
            residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
            normed = self.norm(hidden_states.to(self.norm.weight.dtype))
        else:
            # A mixer that can (Mamba2Mixer) takes this residual add and norm into its one-op decode step.
            decode_after_norm = getattr(self.mixer, "decode_after_norm", None)
            decoded = (decode_after_norm(hidden_states, residual, self.norm, cache, padding_mask, seq_idx)
                       if decode_after_norm is not None else None)
            if decoded is not None:
                return decoded
            normed, residual = self.norm.add_and_norm(hidden_states, residual)
        return self.mixer(normed, cache=cache, padding_mask=padding_mask, seq_idx=seq_idx), residual


class SSMPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """Base of every ssm_hub SSM model class; an architecture sets ``config_class`` and ``mixer_class``.
    ``from_pretrained`` raises for a checkpoint with missing or unexpected tensors (``strict=False`` loads it anyway)
    and reads safetensors only (ssm_hub.models.checkpoint_loading)."""

    mixer_class: type[nn.Module]
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SSMBlock"]
    _is_stateful = True

    def _init_weights(self, module):
        """Mamba's initialisation: default Linear/conv init, N(0, initializer_range) embeddings, zero biases,
        the SSM parameters (A_log, D, dt) as the papers give them, and out_proj scaled by 1/sqrt(num_layers)."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            init_conv1d(module)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            init.ones_(module.weight)
        if isinstance(module, self.mixer_class):
            init_mixer(module, self.config, self.config.rescale_prenorm_residual, self.config.num_hidden_layers)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' save_pretrained, plus the model's code next to the weights (see models.remote_code)."""
        save_with_remote_code(self, super().save_pretrained, save_directory, push_to_hub, kwargs)


class SSMBackbone(SSMPreTrainedModel):
    """Embeddings -> SSM blocks -> final RMSNorm."""

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [SSMBlock(config, layer_idx=i, mixer_class=self.mixer_class) for i in range(config.num_hidden_layers)]
        )
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SSMModelOutput | tuple:
        r"""
        attention_mask: 2-D padding mask; padded positions feed zeros into the conv and the scan. As in
            transformers, it covers the cached tokens and the current ones: as long as the input without a cache
            (or before the cache's first tokens), at least as long with one; another length is a ValueError.
        position_ids: only used to find document starts in packed rows (a restart at 0 resets the state).
        cache: a transformers ``Cache`` built from this config (``DynamicCache(config=...)`` or ``StaticCache``).
        kwargs: packing boundaries ``seq_idx`` [B, T], ``cu_seqlens`` / ``cu_seq_lens_q`` [S+1] (batch 1), as
        tensors or Python lists; ``cache_position`` (transformers' older convention) is accepted and has nothing to
        say: SSM layers use no positions, and the cached state already carries what came before.
        """
        cache = cache_from_aliases(cache, kwargs)
        kwargs.pop("cache_position", None)
        if kwargs.pop("output_attentions", None):
            raise ValueError(f"{type(self).__name__} has no attention layers: output_attentions=True cannot be honoured")
        reject_unknown_kwargs(type(self).__name__, kwargs, PACKING_KWARGS)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inputs_embeds, cache = embeddings_and_cache(self, self.embeddings, input_ids, inputs_embeds, cache, use_cache)
        batch_size, seq_len = inputs_embeds.shape[:2]

        position_ids = packing_inputs_as_tensors(position_ids, kwargs, inputs_embeds.device)
        # The SSM layers' cache slots count no tokens: after earlier tokens, how many there were is not known.
        mask = padding_mask(attention_mask, seq_len, None if cache is not None and cache.has_previous_state() else 0)
        seq_idx = resolve_seq_idx(batch_size, seq_len, position_ids, kwargs)

        # Each block's input (the residual stream entering it) for output_hidden_states, then the final normed state.
        all_hidden_states = (inputs_embeds,) if output_hidden_states else None
        hidden_states, residual = inputs_embeds, None
        for index, block in enumerate(self.layers):
            hidden_states, residual = block(hidden_states, residual, cache=cache, padding_mask=mask, seq_idx=seq_idx)
            if output_hidden_states and index > 0:
                all_hidden_states += (residual,)
        hidden_states, _ = self.norm_f.add_and_norm(hidden_states, residual)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = SSMModelOutput(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)
        return output if return_dict else output.to_tuple()


class SSMForCausalLM(SSMPreTrainedModel, GraphDecodingGenerationMixin):
    """Backbone + LM head; an architecture sets ``backbone_class``."""

    backbone_class: type[SSMBackbone]
    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.backbone = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SSMCausalLMOutput | tuple:
        r"""
        labels: token ids, shifted inside the loss; -100 is ignored. ``shift_labels``: labels already shifted (used
        instead). ``num_items_in_batch`` (passed by Trainer under gradient accumulation) normalises the summed loss.
        logits_to_keep: compute logits for the last N positions only (0 = all), or for the given indices.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        loss_kwargs = {key: kwargs.pop(key) for key in LOSS_KWARGS if key in kwargs}
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=True, **kwargs,
        )
        logits, loss = lm_head_logits_and_loss(self, outputs.last_hidden_state, labels, logits_to_keep, loss_kwargs)
        output = SSMCausalLMOutput(loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


class SSMForSequenceClassification(SSMPreTrainedModel):
    """Backbone + a linear score head read at each row's last non-padding token."""

    backbone_class: type[SSMBackbone]

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = self.backbone_class(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SSMSequenceClassifierOutput | tuple:
        r"""
        use_cache: accepted for compatibility with transformers' classifiers; a classifier keeps no cache, so True
        is an error rather than silently ignored.
        """
        return_dict = prepare_classifier_call(self, use_cache, return_dict, kwargs)
        outputs = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=False, output_hidden_states=output_hidden_states,
            return_dict=True, **kwargs,
        )
        pooled_logits, loss = pooled_classification(self, outputs.last_hidden_state, input_ids, attention_mask, labels)
        output = SSMSequenceClassifierOutput(loss=loss, logits=pooled_logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()
