"""The product-key memory against dense scoring over every slot, its gradients, its cost and its argument checks."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ssm_hub.layers.pkm import ProductKeyMemory


def dense_memory_read(memory: ProductKeyMemory, hidden: torch.Tensor) -> torch.Tensor:
    """The definition: score every one of the num_keys ** 2 slots, keep the top k per head, softmax, sum."""
    half = memory.key_dim // 2
    queries = memory.query(hidden).view(-1, memory.heads, 2, half)
    first = torch.einsum("nhd,hkd->nhk", queries[:, :, 0], memory.keys[:, 0])
    second = torch.einsum("nhd,hkd->nhk", queries[:, :, 1], memory.keys[:, 1])
    every_slot = (first[..., :, None] + second[..., None, :]).flatten(-2)  # slot a * num_keys + b
    scores, slots = every_slot.topk(memory.topk, dim=-1)
    values = memory.values.weight[slots]  # [N, heads, k, hidden]
    return (scores.softmax(-1)[..., None] * values).sum(dim=(1, 2))


def test_sparse_read_equals_dense_scoring_over_every_slot():
    memory = ProductKeyMemory(hidden_size=24, num_keys=16, heads=3, key_dim=8, topk=5).double()
    hidden = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(memory(hidden), dense_memory_read(memory, hidden.view(-1, 24)).view(2, 7, 24))


def test_gradients_match_the_dense_read():
    memory = ProductKeyMemory(hidden_size=16, num_keys=8, heads=2, key_dim=6, topk=3).double()
    hidden = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    sparse = torch.autograd.grad(memory(hidden).square().sum(), [hidden, *memory.parameters()])
    dense = torch.autograd.grad(dense_memory_read(memory, hidden).square().sum(), [hidden, *memory.parameters()])
    for got, expected in zip(sparse, dense):
        torch.testing.assert_close(got, expected)
    assert all(g.abs().sum() > 0 for g in sparse)


def test_cost_grows_with_num_keys_not_with_the_number_of_slots():
    # 4096 sub-keys per half: 16.7M slots. Scoring them all would take 2 * tokens * heads * 16.7M multiply-adds.
    memory = ProductKeyMemory(hidden_size=8, num_keys=4096, heads=2, key_dim=8, topk=4)
    hidden = torch.randn(32, 8)
    with FlopCounterMode(display=False) as counter:
        memory.slots_and_weights(hidden)
    assert counter.get_total_flops() < 32 * 2 * 4096 * 8 * 4  # query projection + 2 x num_keys sub-key scores


@pytest.mark.parametrize("kwargs, message", [
    (dict(key_dim=7), "key_dim must be even"),
    (dict(topk=17), "topk must be at most num_keys=16"),
    (dict(heads=0), "heads must be a positive int"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProductKeyMemory(**{**dict(hidden_size=8, num_keys=16, heads=2, key_dim=8, topk=4), **kwargs})
