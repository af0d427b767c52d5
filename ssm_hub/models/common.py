"""The plumbing every ssm_hub model shares: the keyword arguments a forward accepts, the backbone's input embeddings
and cache, the weight initialisation of convs and SSM mixers, and the causal-LM and sequence-classification heads'
logits and losses.

    from ssm_hub.models.common import check_cache_layers, lm_head_logits_and_loss
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import CacheLayerMixin, DynamicCache, LinearAttentionCacheLayerMixin
from transformers.loss.loss_utils import ForCausalLMLoss

from ssm_hub.ops.cross_entropy import cross_entropy

# Keyword arguments a packing collator or an attention-style caller may pass; the boundary ones become seq_idx,
# the max_length ones only matter to flash attention and carry nothing an SSM needs.
PACKING_KWARGS = ("seq_idx", "cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# Names under which transformers models (and code written for them) have passed the cache; all mean `cache`.
CACHE_ALIASES = ("past_key_values", "cache_params")
# Keyword arguments of transformers' loss functions that Trainer, context parallelism or a user pass to the model; the
# heads hand them to ``self.loss_function``, never to the backbone.
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# transformers' cache layer class for each cache layer kind (DynamicCache's; StaticCache's are subclasses of the
# same mixins).
CACHE_LAYER_MIXINS = {"linear_attention": LinearAttentionCacheLayerMixin, "full_attention": CacheLayerMixin,
                      "sliding_attention": CacheLayerMixin}


def cache_from_aliases(cache, kwargs: dict):
    """The one cache among ``cache`` and its older names; two different ones is an error."""
    for alias in CACHE_ALIASES:
        value = kwargs.pop(alias, None)
        if value is not None:
            if cache is not None and value is not cache:
                raise ValueError(f"pass the cache once: got both cache and {alias}")
            cache = value
    return cache


def check_cache_layers(cache, config) -> None:
    """Each layer reads its own kind of cache slot (conv + recurrent state for an SSM layer, keys and values for an
    attention layer, by ``config.layer_types``): only a cache built from the model's config has the right kind at
    every index."""
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) < config.num_hidden_layers or not all(
        isinstance(layer, CACHE_LAYER_MIXINS[kind]) for layer, kind in zip(layers, config.layer_types)
    ):
        raise ValueError(
            "the cache must be built from the model's config, with a slot of the right kind for every layer "
            f"({config.layer_types}): use DynamicCache(config=model.config) or "
            "StaticCache(config=model.config, max_cache_len=...)"
        )


def embeddings_and_cache(model, embeddings: nn.Module, input_ids, inputs_embeds, cache, use_cache: bool | None):
    """(inputs_embeds, cache or None) for a backbone's forward: the embeddings of ``input_ids`` by ``embeddings``
    (exactly one of the two must be given), and the cache the layers use. ``use_cache`` None: a cache passed in is
    used, otherwise one is made by default only outside training (``model.config.use_cache``), as transformers
    does; never under gradient checkpointing in training, whose recomputed forward would update the cache twice. A
    cache made here is ``DynamicCache(config=model.config)``; one passed in must fit the config (check_cache_layers).
    """
    config = model.config
    if use_cache is None:
        use_cache = cache is not None or (config.use_cache and not model.training)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = embeddings(input_ids)
    if model.gradient_checkpointing and model.training and torch.is_grad_enabled():
        use_cache = False
    if use_cache and cache is None:
        cache = DynamicCache(config=config)
    if not use_cache:
        cache = None
    if cache is not None:
        check_cache_layers(cache, config)
    return inputs_embeds, cache


def init_conv1d(conv: nn.Conv1d) -> None:
    """PyTorch's own Conv1d initialisation (kaiming-uniform weight, bias uniform within 1 / sqrt(fan_in)), through
    ``transformers.initialization`` so that weights loaded from a checkpoint are left as they are."""
    init.kaiming_uniform_(conv.weight, a=math.sqrt(5))
    if conv.bias is not None:
        bound = 1 / math.sqrt(conv.weight.shape[1] * conv.weight.shape[2])
        init.uniform_(conv.bias, -bound, bound)


def init_mixer(mixer: nn.Module, ssm_config, rescale_prenorm_residual: bool, num_layers: int) -> None:
    """An SSM mixer's own parameters (``mixer.init_ssm_parameters(ssm_config)``: A_log, D, dt), then, with
    ``rescale_prenorm_residual``, its output projections (``out_proj`` and any per-modality copies in
    ``modality_out_proj``) scaled by 1/sqrt(num_layers). transformers initialises children before parents, so the
    projections already hold their initial values here."""
    mixer.init_ssm_parameters(ssm_config)
    for out_weight in (projection.weight for projection in (mixer.out_proj, *(mixer.modality_out_proj or ()))):
        # A weight loaded from a checkpoint is marked initialised; scaling it again would shrink it at every load.
        if rescale_prenorm_residual and not getattr(out_weight, "_is_hf_initialized", False):
            # GPT-2 / mamba_ssm scheme: each layer adds one residual branch, so scale its output projection by
            # 1/sqrt(num_layers) to keep the residual stream's variance flat with depth.
            out_weight /= math.sqrt(num_layers)


def reject_unknown_kwargs(owner: str, kwargs: dict, allowed: tuple) -> None:
    """TypeError naming the keyword arguments of ``owner``'s forward that are not in ``allowed``."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"{owner}.forward got unexpected keyword arguments {unknown}")


def lm_head_logits_and_loss(model, hidden_states, labels, logits_to_keep, loss_kwargs: dict):
    """(logits, loss or None) of a causal-LM head ``model.lm_head`` over the last hidden states. The logits are in
    the head's output dtype (bfloat16 under bf16 autocast), as transformers' Llama returns them; generate upcasts.

    ``logits_to_keep``: the last N positions only (0 = all), or the given indices. The loss is
    ``model.loss_function``'s: labels shifted inside, or ``shift_labels`` already shifted (context parallelism splits
    the row after shifting, so they must not be shifted again); ``num_items_in_batch`` normalises a summed loss.
    While that is transformers' default (ForCausalLMLoss) it is computed by :func:`causal_lm_loss`, the same loss
    without a float32 copy of the logits; a loss function set on the model or chosen by ``config.loss_type`` is
    called as it is.
    """
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = model.lm_head(hidden_states[:, keep].to(model.lm_head.weight.dtype))
    loss = None
    if labels is not None or loss_kwargs.get("shift_labels") is not None:
        if model.loss_function is ForCausalLMLoss:
            loss = causal_lm_loss(logits, labels, **loss_kwargs)
        else:
            loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size,
                                       **loss_kwargs)
    return logits, loss


def causal_lm_loss(logits, labels, num_items_in_batch=None, ignore_index: int = -100, shift_labels=None):
    """transformers' ForCausalLMLoss on the per-token cross-entropy op (ssm_hub.ops.cross_entropy): token t predicts
    labels[t + 1] (or ``shift_labels[t]``), ``ignore_index`` tokens are left out, and the loss is their mean, or
    their sum over ``num_items_in_batch`` when given (the count over a whole gradient-accumulation step)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(logits.device)
    if shift_labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have the logits' shape without the vocabulary dim, {tuple(logits.shape[:-1])}, "
                         f"got {tuple(shift_labels.shape)}")
    total = cross_entropy(logits, shift_labels, ignore_index).sum()
    if num_items_in_batch is None:
        return total / (shift_labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def prepare_classifier_call(model, use_cache: bool | None, return_dict: bool | None, kwargs: dict) -> bool:
    """The return_dict a sequence classifier's forward uses (``model.config.return_dict`` when None), after refusing
    ``use_cache=True`` (a classifier keeps no cache, so it is an error rather than silently ignored) and dropping
    ``num_items_in_batch`` from ``kwargs`` (Trainer passes it; a classifier's loss has no use for it)."""
    if use_cache:
        raise ValueError(f"{type(model).__name__} keeps no cache: use_cache=True cannot be honoured")
    kwargs.pop("num_items_in_batch", None)
    return return_dict if return_dict is not None else model.config.return_dict


def last_token_index(input_ids, attention_mask, pad_token_id, seq_len: int, device) -> torch.Tensor:
    """Index of each row's last real token, from the attention mask, else from pad_token_id, else T - 1."""
    positions = torch.arange(seq_len, device=device)
    if attention_mask is not None:
        return (positions * attention_mask[:, -seq_len:].to(positions.dtype)).argmax(-1)
    if input_ids is not None and pad_token_id is not None:
        not_pad = (input_ids != pad_token_id).to(positions.dtype)
        return (positions * not_pad).argmax(-1)
    return torch.full((1,), seq_len - 1, device=device)


def pooled_classification(model, hidden_states, input_ids, attention_mask, labels):
    """(logits [B, num_labels] read by ``model.score`` at each row's last real token, loss or None)."""
    logits = model.score(hidden_states.to(model.score.weight.dtype))
    batch_size, seq_len = logits.shape[:2]
    last = last_token_index(input_ids, attention_mask, model.config.pad_token_id, seq_len, logits.device)
    pooled_logits = logits[torch.arange(batch_size, device=logits.device), last]
    loss = None
    if labels is not None:
        loss = model.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=model.config)
    return pooled_logits, loss
