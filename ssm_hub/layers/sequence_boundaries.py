"""Where documents start inside a row, and which positions are padding.

Packed training rows (transformers' ``DataCollatorWithFlattening``) mark document starts by restarting
``position_ids`` at 0, or give ``cu_seq_lens_q`` / ``cu_seqlens`` (flash-attention style, batch 1) or
``seq_idx`` directly. An SSM must reset its recurrent and conv state at each start, or state leaks from one
document into the next. Everything is turned into one ``seq_idx`` tensor [B, T] (document number per token,
non-decreasing) that the ops understand. Attention layers get the same boundaries as a mask function for
``transformers.masking_utils``, so that attention stays inside the documents the SSM layers reset at.
"""

from collections.abc import Callable

import torch

from ssm_hub.ops.varlen import cu_seqlens_to_seq_idx

# Names under which transformers' collators and attention kwargs hand over flash-attention style boundaries.
CU_SEQLENS_KWARGS = ("cu_seqlens", "cu_seq_lens_q")
# The packing keyword arguments that hold token indices, with the dtype a Python list of them becomes (flash
# attention's varlen path takes int32 cumulative lengths).
INDEX_KWARGS = {"seq_idx": torch.int32, "cu_seqlens": torch.int32, "cu_seq_lens_q": torch.int32,
                "cu_seq_lens_k": torch.int32}


def as_index_tensor(name: str, value, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``value`` as a tensor: a tensor as it is, a (nested) list or tuple of whole numbers, as a collator without
    ``return_tensors="pt"`` gives it, as a ``dtype`` tensor on ``device``; anything else is a ValueError naming
    ``name``."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        tensor = torch.tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor or a list of whole numbers (rows of equal length), got a "
                         f"{type(value).__name__}: {error}") from None
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold whole numbers, got {tensor.dtype} values")
    return tensor.to(dtype)


def packing_inputs_as_tensors(position_ids, kwargs: dict, device: torch.device) -> torch.Tensor | None:
    """``position_ids`` and the index-valued packing keyword arguments in ``kwargs`` (INDEX_KWARGS, replaced in
    place) as tensors on ``device`` where they came as lists (:func:`as_index_tensor`); returns the position_ids."""
    for name, dtype in INDEX_KWARGS.items():
        if kwargs.get(name) is not None:
            kwargs[name] = as_index_tensor(name, kwargs[name], device, dtype)
    return None if position_ids is None else as_index_tensor("position_ids", position_ids, device, torch.long)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[S+1] cumulative lengths of a batch-1 packed row -> seq_idx [1, T]."""
    if cu_seqlens.ndim != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != seq_len:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor starting at 0 and ending at the sequence length {seq_len}, "
            f"got {cu_seqlens.tolist()}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    return cu_seqlens_to_seq_idx(cu_seqlens)


def positions_within_documents(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx [B, T] -> each token's position inside its document [B, T] (int64), counting from 0."""
    positions = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand_as(seq_idx)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
    return positions - first


def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """A document starts wherever ``position_ids`` returns to 0 after the first token; None if no row restarts."""
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):
        return None
    seq_idx = torch.cumsum(restarts.to(torch.int32), dim=1)
    return torch.cat([torch.zeros_like(seq_idx[:, :1]), seq_idx], dim=1)


def resolve_seq_idx(
    batch_size: int, seq_len: int, position_ids: torch.Tensor | None, kwargs: dict
) -> torch.Tensor | None:
    """One ``seq_idx`` [B, T] from whichever boundary description the caller passed, or None for one document a row.

    Several descriptions at once must agree; passing conflicting ones would silently pick one, so it raises.
    """
    candidates = {}
    if kwargs.get("seq_idx") is not None:
        seq_idx = kwargs["seq_idx"]
        if seq_idx.shape != (batch_size, seq_len):
            raise ValueError(f"seq_idx must have shape {(batch_size, seq_len)}, got {tuple(seq_idx.shape)}")
        candidates["seq_idx"] = seq_idx.to(torch.int32)
    for name in CU_SEQLENS_KWARGS:
        if kwargs.get(name) is not None:
            if batch_size != 1:
                raise ValueError(f"{name} describes a packed batch of one row, but the batch has {batch_size} rows")
            candidates[name] = seq_idx_from_cu_seqlens(kwargs[name], seq_len)
    if position_ids is not None and seq_len > 1:
        if position_ids.shape[-1] != seq_len or position_ids.ndim != 2:
            raise ValueError(f"position_ids must have shape [batch, {seq_len}], got {tuple(position_ids.shape)}")
        from_positions = seq_idx_from_position_ids(position_ids)
        if from_positions is not None:
            candidates["position_ids"] = from_positions.expand(batch_size, -1)
    if not candidates:
        return None
    names = list(candidates)
    first = candidates[names[0]]
    for name in names[1:]:
        # Compare boundaries, not numbering: a source may number documents from a different offset.
        if not torch.equal(torch.diff(first, dim=1) != 0, torch.diff(candidates[name], dim=1) != 0):
            raise ValueError(f"{names[0]} and {name} describe different document boundaries")
    return first


def same_document_mask_function(seq_idx: torch.Tensor, first_position: int | torch.Tensor) -> Callable:
    """A mask function for transformers' mask builders (``and_mask_function`` of ``create_causal_mask``): a query
    attends only to keys of its own document, given by the current tokens' ``seq_idx`` [B, T].

    transformers finds documents in ``position_ids`` only when there is neither a cache nor a 2-D mask; this holds
    in every mode. Mask functions see absolute positions: a cache's earlier tokens are ``0 .. first_position - 1``
    and count as the current tokens' first document, the one the SSM layers' cached state continues. Positions after
    the current tokens (a static cache's empty slots) are masked by causality whatever this returns.
    """
    last = seq_idx.shape[1] - 1

    def same_document(batch_idx, head_idx, q_idx, kv_idx):
        query_document = seq_idx[batch_idx, (q_idx - first_position).clamp(0, last)]
        key_document = seq_idx[batch_idx, (kv_idx - first_position).clamp(0, last)]
        return query_document == key_document

    return same_document


def padding_mask(attention_mask: torch.Tensor | None, seq_len: int, past: int | None) -> torch.Tensor | None:
    """The 2-D padding mask sliced to the current tokens, or None when nothing is padded.

    Padded positions get zero input to the conv and the scan, so a left-padded row computes exactly what the
    unpadded row computes (the state before the first real token stays zero). The mask covers the cached tokens
    and the current ones, as transformers' generate passes it; ``past`` is how many tokens the cache holds (0
    without a cache), or None where it holds some but the count cannot be read without waiting for the device. A
    mask of another length is a ValueError naming both: the current tokens' part of it would be a guess.
    """
    if attention_mask is None:
        return None
    if attention_mask.ndim != 2:
        raise ValueError(
            f"ssm_hub SSM models take a 2-D padding attention_mask [batch, seq_len], got {attention_mask.ndim}-D"
        )
    check_mask_length(attention_mask, seq_len, past)
    if seq_len == 1:
        return None
    mask = attention_mask[:, -seq_len:]
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


def check_mask_length(attention_mask: torch.Tensor, seq_len: int, past: int | None) -> None:
    """ValueError unless the 2-D ``attention_mask`` covers ``past`` cached tokens and ``seq_len`` current ones
    (``past`` None: some cached tokens, as many as the mask says; then it only has to cover the current ones)."""
    length = attention_mask.shape[-1]
    if past is None:
        if length < seq_len:
            raise ValueError(f"attention_mask covers {length} positions, fewer than the input's {seq_len} tokens: it "
                             "must cover the cached tokens and the current ones")
    elif length != past + seq_len:
        cached = f" after {past} cached tokens" if past else " and no cached tokens precede them"
        raise ValueError(f"attention_mask covers {length} positions but the input has {seq_len} tokens{cached}: "
                         f"the mask must cover exactly {past + seq_len} positions (the cached tokens and the "
                         "current ones)")


def check_position_range(low: int, high: int, limit: int) -> None:
    """Learned absolute positions index a table of ``limit`` rows: positions from ``low`` to ``high`` outside it are
    an error naming them (on a GPU the lookup would fail with a device-side assert that names nothing)."""
    if low < 0 or high >= limit:
        raise ValueError(f"positions from {low} to {high} exceed the model's max_position_embeddings ({limit}) "
                         f"absolute positions (valid: 0 to {limit - 1})")
