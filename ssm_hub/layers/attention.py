"""Causal self-attention (grouped-query, optional sliding window, optional RoPE), with Llama's
parameter names and conventions, for the attention layers of hybrid SSM / attention models.

The layer follows transformers v5's attention contract, so masks, caches and kernels come from transformers:

- the mask is whatever ``transformers.masking_utils`` (``create_causal_mask`` /
  ``create_sliding_window_causal_mask``) built for the chosen implementation: a 4-D additive or boolean mask for
  ``eager`` / ``sdpa``, ``None`` or the 2-D padding mask for the flash implementations. The layer never edits it.
- keys and values go through ``cache.update(key_states, value_states, layer_idx)`` of any transformers ``Cache``.
- the attention itself is ``ALL_ATTENTION_FUNCTIONS[attn_implementation]`` (sdpa, flash_attention_2/3, flex ...),
  or :func:`eager_attention` for ``"eager"``. Extra keyword arguments (``position_ids``, ``cu_seq_lens_q/k``,
  ``max_length_q/k`` for packed flash-attention batches) are passed through to it unchanged.
- ``output_attentions=True`` returns the attention probabilities too. Only the eager path computes them (sdpa and
  the flash kernels never form them), so that call runs :func:`eager_attention` whatever the implementation, as
  transformers' eager mode would; its mask must then be an eager one (4-D), or ``None`` for plain causal attention.

RoPE (:class:`RotaryEmbedding`, :func:`apply_rotary`) and the check of ``rope_parameters`` live in
:mod:`ssm_hub.layers.rope`.
"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ssm_hub.layers.linear import KernelLinear
from ssm_hub.layers.norms import RMSNorm
from ssm_hub.layers.rope import RotaryEmbedding, apply_rotary, check_positive_int, rope_config

QK_NORMS = ("rms", "layer")


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention with transformers' interface: ``query [B, Nq, Tq, D]``, ``key/value [B, Nk, Tk, D]``, a 4-D
    additive or boolean mask broadcastable to ``[B, Nq, Tq, Tk]`` (it already carries causality, padding and any
    sliding window) -> ``(output [B, Tq, Nq, D], probabilities [B, Nq, Tq, Tk])``. Softmax in float32."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class SelfAttention(nn.Module):
    """Causal multi-head / grouped-query self-attention with Llama's parameter names (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``), optional RoPE and optional sliding window. ``qk_norm`` ("rms", Qwen3's; "layer",
    Persimmon's) normalises each head's queries and keys over the head dim before RoPE (``q_norm``, ``k_norm``).
    ``rope_parameters`` (default RoPE when None) and ``max_position_embeddings`` set the layer's own RoPE (see
    :func:`rope_config`), used when the caller passes no ``position_embeddings``.

    ``attn_implementation`` is an attribute the model may set (e.g. from ``config._attn_implementation``); it is
    ``"eager"`` or a key of transformers' ``ALL_ATTENTION_FUNCTIONS``. Attention functions read ``is_causal``,
    ``num_key_value_groups``, ``layer_idx``, ``training`` and (flash) ``config._attn_implementation`` from the
    module; ``config`` is a read-only view of ``attn_implementation``.
    """

    is_causal = True

    def __init__(self, hidden_size: int, num_attention_heads: int, num_key_value_heads: int,
                 head_dim: int | None = None, attention_bias: bool = False, attention_dropout: float = 0.0,
                 use_rope: bool = True, rope_parameters: dict | None = None, sliding_window: int | None = None,
                 layer_idx: int = 0, attn_implementation: str = "sdpa", qk_norm: str | None = None,
                 qk_norm_eps: float = 1e-6, max_position_embeddings: int | None = None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_attention_heads", num_attention_heads),
                            ("num_key_value_heads", num_key_value_heads)):
            check_positive_int("SelfAttention", name, value)
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"SelfAttention: num_attention_heads ({num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads, got num_key_value_heads={num_key_value_heads}")
        if head_dim is None:
            if hidden_size % num_attention_heads:
                raise ValueError(f"SelfAttention: without head_dim, hidden_size ({hidden_size}) must be a multiple "
                                 f"of num_attention_heads, got num_attention_heads={num_attention_heads}")
            head_dim = hidden_size // num_attention_heads
        check_positive_int("SelfAttention", "head_dim", head_dim)
        if (isinstance(attention_dropout, bool) or not isinstance(attention_dropout, (int, float))
                or not 0 <= attention_dropout < 1):
            raise ValueError(f"SelfAttention: attention_dropout must be in [0, 1), got {attention_dropout!r}")
        if sliding_window is not None:
            check_positive_int("SelfAttention", "sliding_window", sliding_window)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ValueError(f"SelfAttention: layer_idx must be a non-negative int, got {layer_idx!r}")
        self._check_implementation(attn_implementation)
        if qk_norm is not None and qk_norm not in QK_NORMS:
            raise ValueError(f"SelfAttention: qk_norm must be None or one of {QK_NORMS}, got {qk_norm!r}")

        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.num_key_value_groups = num_attention_heads // num_key_value_heads
        self.head_dim = head_dim
        self.scaling = head_dim ** -0.5
        self.attention_dropout = float(attention_dropout)
        self.sliding_window = sliding_window
        self.layer_idx = layer_idx
        self.attn_implementation = attn_implementation
        self.use_rope = use_rope
        # Used only when the caller passes no position_embeddings (models share one RotaryEmbedding instead).
        self.rotary_emb = None
        if use_rope:
            rope = rope_parameters if rope_parameters is not None else {"rope_type": "default"}
            self.rotary_emb = RotaryEmbedding(rope_config(head_dim, rope, max_position_embeddings,
                                                          owner="SelfAttention.rope_parameters"))

        self.q_proj = KernelLinear(hidden_size, num_attention_heads * head_dim, bias=attention_bias)
        self.k_proj = KernelLinear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.v_proj = KernelLinear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.o_proj = KernelLinear(num_attention_heads * head_dim, hidden_size, bias=attention_bias)
        self.q_norm = self.k_norm = None
        if qk_norm == "rms":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps), RMSNorm(head_dim, eps=qk_norm_eps)
        elif qk_norm == "layer":
            self.q_norm, self.k_norm = nn.LayerNorm(head_dim, eps=qk_norm_eps), nn.LayerNorm(head_dim, eps=qk_norm_eps)

    @staticmethod
    def _check_implementation(attn_implementation) -> None:
        if attn_implementation != "eager" and attn_implementation not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(f"SelfAttention: attn_implementation must be 'eager' or one of "
                             f"{sorted(ALL_ATTENTION_FUNCTIONS)}, got {attn_implementation!r}")

    @property
    def config(self) -> SimpleNamespace:
        # transformers' flash-attention wrapper reads module.config._attn_implementation to pick its kernel.
        return SimpleNamespace(_attn_implementation=self.attn_implementation)

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, output_attentions: bool = False,
                **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``hidden_states [B, T, H]`` -> ``[B, T, H]``; with ``output_attentions``, ``(that, probabilities
        [B, Nq, T, Tk])`` from the eager path (see the module docstring for the mask it needs).

        ``position_embeddings``: ``(cos, sin)``, each ``[B, T, R]``, from a shared :class:`RotaryEmbedding`; when
        ``None`` (and ``use_rope``) they are computed from ``kwargs["position_ids"]``, else from the cache length.
        Ignored when ``use_rope=False``. ``cache``: a transformers ``Cache`` (updated in place at ``layer_idx``).
        """
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)

        if self.use_rope:
            if position_embeddings is None:
                position_ids = kwargs.get("position_ids")
                if position_ids is None:
                    past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                    position_ids = torch.arange(length, device=hidden_states.device)[None] + past
                position_embeddings = self.rotary_emb(query, position_ids)
            query, key = apply_rotary(query, key, *position_embeddings)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        if output_attentions:
            attention, attention_mask = eager_attention, self._eager_mask(attention_mask, query, key)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.attn_implementation, eager_attention)
        output, probabilities = attention(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        output = self.o_proj(output.reshape(batch, length, -1))
        return (output, probabilities) if output_attentions else output

    @staticmethod
    def _eager_mask(attention_mask, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
        """The mask for the eager path: a 4-D mask as it is; ``None`` (sdpa's "plain causal", which transformers
        only gives where there is no cached past, so queries and keys line up) as the causal mask it stands for."""
        if attention_mask is None:
            length = query.shape[2]
            if length == 1:
                return None
            if key.shape[2] != length:
                raise ValueError(f"SelfAttention: output_attentions with no mask needs as many keys as queries "
                                 f"(plain causal attention), got {key.shape[2]} keys for {length} queries")
            return torch.ones(length, length, dtype=torch.bool, device=query.device).tril()[None, None]
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 4:
            raise ValueError("SelfAttention: output_attentions computes the probabilities on the eager path, which "
                             f"needs a 4-D mask (or None for plain causal attention), got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}; build the mask for "
                             "the 'eager' implementation")
        return attention_mask
