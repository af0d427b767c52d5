"""The plumbing every ssm_hub model shares: the keyword arguments a forward accepts, the cache check, and the
causal-LM and sequence-classification heads' logits and losses.

    from ssm_hub.models.common import check_cache_layers, lm_head_logits_and_loss
"""

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin
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
