"""Packed documents (``cu_seqlens``) as the launchers hand them to the kernels. Needs no triton.

The ops' conventions (``ssm_hub.ops.varlen``) hold; these helpers live here because kernels import nothing of
ssm_hub.
"""

import torch


def document_numbers(cu_seqlens: torch.Tensor, seqlen: int, device: torch.device) -> torch.Tensor:
    """cu_seqlens [S + 1] -> [1, T] int64 document number of each token, found on ``device`` (no host sync)."""
    positions = torch.arange(seqlen, device=device, dtype=torch.int64)
    return torch.searchsorted(cu_seqlens.to(device=device, dtype=torch.int64)[1:], positions, right=True)[None]


def num_states(batch: int, cu_seqlens: torch.Tensor | None) -> int:
    """How many final states a scan returns: one per document of ``cu_seqlens``, else one per row."""
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
