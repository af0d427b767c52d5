"""How the SSM mixers (Mamba-1, Mamba-2) take their state from transformers' cache and carry it through the causal
conv: a layer's cache slots as a forward reads them, and the conv over a sequence, which starts from the cached conv
window and hands back the next one.
"""

import torch

from ssm_hub.layers.state_rollback import recorded_state_count
from ssm_hub.ops.causal_conv1d import causal_conv1d


def cached_states(cache, layer_idx: int, seq_len: int, seq_idx: torch.Tensor | None,
                  kernel_size: int) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """(stepped tokens, conv state, recurrent state) of layer ``layer_idx`` (conv width ``kernel_size``) for a call
    on ``seq_len`` tokens: how many of them must hand the cache their states one by one (non-zero only while the
    cache records states for assisted decoding, see ssm_hub.layers.state_rollback), then the cached conv window and
    recurrent state, None without a cache or before its first tokens."""
    stepped_tokens = recorded_state_count(cache, layer_idx, seq_len, seq_idx, kernel_size)
    if cache is None:
        return stepped_tokens, None, None
    return stepped_tokens, cache.get_conv_state(layer_idx), cache.get_recurrent_state(layer_idx)


def conv_over_sequence(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       conv_state: torch.Tensor | None, seq_idx: torch.Tensor | None,
                       padding_mask: torch.Tensor | None, want_state: bool):
    """(SiLU(causal conv1d of x) [B, T, C], the final conv window [B, C, K - 1] or None unless ``want_state``), the
    conv continuing from ``conv_state`` (None: zeros) and restarting at each document of ``seq_idx``. Padded positions
    (``padding_mask`` [B, T], 0 = padding) are zeroed after the conv too, which adds its bias to them, so that they
    feed zeros into the scan."""
    conv_out = causal_conv1d(x, weight, bias, activation="silu", initial_state=conv_state, seq_idx=seq_idx,
                             return_final_state=want_state)
    out, conv_state = conv_out if want_state else (conv_out, None)
    if padding_mask is not None:
        out = out * padding_mask[..., None].to(out.dtype)
    return out, conv_state
