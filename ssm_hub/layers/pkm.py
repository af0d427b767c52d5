"""Product-key memory (PKM; Lample et al., 2019, "Large Memory Layers with Product Keys"): a feed-forward that reads
a large table of values through a sparse top-k over keys, the factual memory of the Hydra architecture.

The memory has ``num_keys ** 2`` slots. Slot ``(a, b)`` has the key ``[k1_a ; k2_b]``, the concatenation of a
sub-key from each of two sets of ``num_keys``, so its score against a query ``[q1 ; q2]`` is
``q1 . k1_a + q2 . k2_b``. The best k slots are therefore among the pairs of the k best sub-keys of each half: the
layer scores 2 x num_keys sub-keys and k x k candidate pairs per head, never all num_keys ** 2 slots, and the
result is exactly the top-k over the whole memory. The k values it reads, weighted by the softmax of their
scores, are summed over the heads (``F.embedding_bag``, which never materialises the [tokens, k, hidden] gather).

    memory = ProductKeyMemory(hidden_size=512, num_keys=256, heads=4, key_dim=256, topk=32)  # 65,536 slots
    out = memory(hidden_states)  # [B, T, 512]
"""

import torch
import torch.nn.functional as F
from torch import nn


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ProductKeyMemory: {name} must be a positive int, got {value!r}")


class ProductKeyMemory(nn.Module):
    """forward(hidden [..., hidden_size]) -> [..., hidden_size]. Parameters: ``query`` (Linear to heads x key_dim),
    ``keys`` [heads, 2, num_keys, key_dim / 2] (the two sub-key sets of each head), ``values`` (Embedding of
    num_keys ** 2 rows of hidden_size)."""

    def __init__(self, hidden_size: int, num_keys: int, heads: int, key_dim: int, topk: int):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_keys", num_keys), ("heads", heads),
                            ("key_dim", key_dim), ("topk", topk)):
            _check_positive_int(name, value)
        if key_dim % 2:
            raise ValueError(f"ProductKeyMemory: key_dim must be even (it is split into two halves), got {key_dim}")
        if topk > num_keys:
            raise ValueError(f"ProductKeyMemory: topk must be at most num_keys={num_keys}, got {topk}")
        self.num_keys, self.heads, self.key_dim, self.topk = num_keys, heads, key_dim, topk
        self.query = nn.Linear(hidden_size, heads * key_dim, bias=False)
        self.keys = nn.Parameter(torch.empty(heads, 2, num_keys, key_dim // 2))
        self.values = nn.Embedding(num_keys**2, hidden_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Lample et al.: sub-keys uniform within 1 / sqrt(their size), values N(0, 1 / hidden_size).
        bound = (self.key_dim // 2) ** -0.5
        nn.init.uniform_(self.keys, -bound, bound)
        nn.init.normal_(self.values.weight, std=self.values.embedding_dim**-0.5)

    def slots_and_weights(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot indices [N, heads, topk] int64, softmax weights [N, heads, topk]) for hidden [N, H]; scores are
        taken in float32 at least, so that bf16 rounding does not reorder the top k."""
        tokens = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        queries = self.query(hidden).view(tokens, self.heads, 2, self.key_dim // 2).to(dtype)
        # 1. Score each half of each head's query against its own sub-key set: [N, heads, 2, num_keys].
        sub_scores = torch.einsum("nhsd,hskd->nhsk", queries, self.keys.to(dtype))
        best, index = sub_scores.topk(self.topk, dim=-1)
        # 2. The k x k candidate pairs: summed scores, and slot a * num_keys + b.
        pair_scores = best[:, :, 0, :, None] + best[:, :, 1, None, :]
        pair_slots = index[:, :, 0, :, None] * self.num_keys + index[:, :, 1, None, :]
        # 3. The top k pairs are the top k slots of the whole memory.
        scores, position = pair_scores.flatten(-2).topk(self.topk, dim=-1)
        slots = pair_slots.flatten(-2).gather(-1, position)
        return slots, scores.softmax(dim=-1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])
        slots, weights = self.slots_and_weights(hidden)
        tokens = hidden.shape[0]
        out = F.embedding_bag(
            slots.view(tokens, -1), self.values.weight,
            per_sample_weights=weights.view(tokens, -1).to(self.values.weight.dtype), mode="sum",
        )
        return out.view(shape).to(hidden_states.dtype)
