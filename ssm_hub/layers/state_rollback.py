"""The SSM mixers' side of transformers' cache rollback, which assisted decoding and prompt lookup rely on.

A verifying forward runs the drafted tokens through the model, and transformers' loop then calls
``cache.crop(-n)`` to drop the ``n`` rejected ones. An attention layer just cuts its keys and values; a recurrent
layer can only go back to a state it kept. transformers (>= 5.25) asks for that with
``cache.activate_past_recording(recurrent_states_to_keep=k)``, after which a linear-attention cache layer

- keeps every conv input handed to ``update_conv_state`` since the last crop (not only the last K - 1), and a crop
  cuts the rejected ones off the end, leaving the K - 1 before them;
- takes a list of recurrent states from ``update_recurrent_state``, the states after each of the call's last
  tokens, oldest first; it files the state it held before the call followed by all of them but the last, and a
  crop of ``n`` tokens restores the ``n``-th last of those (the state after the last accepted token).

So while the cache records, a mixer hands over its raw conv inputs, starts its conv from the K - 1 recorded before
them, and runs the scan over the first tokens in one chunked call and over the last ones one decode step each, which
yields their states without re-running any accepted token. How many are stepped (see recorded_state_count): every
token of a call that follows a rollback (a verifying window: the last accepted token and the draft), else the last
``k + 1`` (the first call, prompt and draft together; a chunked prefill). Memory per layer: those states, the
cache's copy of the state before the call, and the conv inputs since the last rollback.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def recorded_state_count(cache, layer_idx: int, seq_len: int, seq_idx: torch.Tensor | None,
                         kernel_size: int) -> int:
    """How many of the current ``seq_len`` tokens' states layer ``layer_idx`` (conv width ``kernel_size``) must hand
    the cache one by one: 0 unless the cache records past states (see the module docstring)."""
    if cache is None or not cache.is_recording_past(layer_idx):
        return 0
    recorded = cache.get_conv_state(layer_idx)
    if recorded is not None and recorded.shape[-1] < kernel_size:
        # Nothing recorded since the last rollback: a verifying window, all but whose first token may be rejected.
        # It can hold more than recurrent_states_to_keep drafted tokens: a draft with another tokenizer proposes
        # that many of its own tokens, which the target's tokenizer may split further.
        count = seq_len
    else:
        # Rolling back all k drafted tokens of a k + 1 token window needs the state after the window's first token:
        # the k + 1-th last, which the cache only has if it is given k + 1 states (transformers' own Mamba models
        # give k, and restore the state before the window instead).
        count = min((cache.get_recurrent_states_to_keep(layer_idx) or 0) + 1, seq_len)
    if seq_idx is not None:
        # The stepped tokens continue one state; a document starting among them would need it reset.
        documents = seq_idx[:, max(seq_len - count - 1, 0):]  # the stepped tokens' and the one before them
        if bool((documents != documents[:, -1:]).any()):
            raise ValueError(
                f"a document starts among the last {count} tokens (seq_idx, cu_seqlens or restarting position_ids) "
                "while the cache records states for assisted decoding: pass one document a row"
            )
    return count


def record_conv_inputs(cache, layer_idx: int, conv_input: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Hand the recording cache this call's conv inputs ``conv_input`` [B, T, C]; return the conv's initial state
    [B, C, K - 1]: the K - 1 inputs recorded before them, zeros where the sequence had not started."""
    window = kernel_size - 1
    recorded = cache.update_conv_state(conv_input.transpose(1, 2), layer_idx, conv_kernel_size=window)
    before = recorded[..., : recorded.shape[-1] - conv_input.shape[1]]
    before = before[..., max(before.shape[-1] - window, 0):]
    return F.pad(before, (window - before.shape[-1], 0))


def first_tokens(end: int, *tensors: torch.Tensor | None) -> tuple:
    """The first ``end`` tokens of each [B, T, ...] tensor (None stays None); a tensor itself when that is all of it,
    so that a plain forward puts no slicing into autograd (whose backward would copy every gradient)."""
    return tuple(t if t is None or end == t.shape[1] else t[:, :end] for t in tensors)


def scan_then_step(scan: Callable, step: Callable, state: torch.Tensor | None, seq_len: int, stepped: int):
    """A recurrence over ``seq_len`` tokens, its last ``stepped`` tokens' states wanted one by one.

    ``scan(end, state) -> (y [B, end, ...], final state)`` runs the first ``seq_len - stepped`` tokens in one call;
    ``step(t, state) -> (y_t [B, ...], new state)`` runs token t. Returns (y [B, seq_len, ...], the states after
    each of the last ``stepped`` tokens, oldest first), or with ``stepped`` 0 (y, scan's final state). ``state``:
    the state before the first token; it may be None (zeros) only when the scan runs.
    """
    head = seq_len - stepped
    outputs, states = [], []
    if head > 0:
        y, state = scan(head, state)
        outputs.append(y)
    for t in range(head, seq_len):
        y, state = step(t, state)
        outputs.append(y.unsqueeze(1))
        states.append(state)
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return y, (states if stepped else state)
