"""Conventions and input checks shared by the ops: packed documents (``seq_idx`` / ``cu_seqlens``), shapes, dtypes.

Every op that carries state along time accepts two ways of packing several documents into one call:

- ``seq_idx`` [B, T] (integer): a document id per token, normally non-decreasing along each row. Wherever it
  changes from one token to the next a new document starts there: recurrent states and convolution windows
  restart from zero, so a packed row gives exactly the outputs of each document run alone. ``initial_state(s)``
  [B, ...] belong to the first document of each row and final states [B, ...] are those at the end of each row
  (so of each row's last document).
- ``cu_seqlens`` [S + 1] (integer): the cumulative lengths of S documents packed into one row (batch 1), from 0 to
  T, strictly increasing. Each document starts from its own initial state [S, ...] and ends in its own final state
  [S, ...].

Without either, each row is one document. Passing both is an error.
"""

import torch


def check_tensor(name: str, tensor, layout: str, shape=None, integer: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tensor`` is a tensor laid out as ``layout`` (e.g. "[B, T, H, P]").

    ``shape`` is the expected size of every dim; without it only the number of dims is checked. The dtype must be
    floating point, or an integer type when ``integer``.
    """
    ndim = layout.count(",") + 1
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {layout}, got {type(tensor).__name__}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(tensor.shape)}")
    if integer and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise ValueError(f"{name} must have an integer dtype, got {tensor.dtype}")
    if not integer and not tensor.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {tensor.dtype}")


def num_states(batch: int, cu_seqlens: torch.Tensor | None) -> int:
    """How many final states an op returns: one per document of ``cu_seqlens``, else one per row."""
    return cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch


def check_varlen(seq_idx, cu_seqlens, batch: int, seqlen: int) -> list[int] | None:
    """Validate the document layout of a [batch, seqlen] input; return ``cu_seqlens`` as a list, or None.

    Reading the values of ``cu_seqlens`` (to check them, and because the ops plan their work from them) copies that
    small tensor to the host.
    """
    if seq_idx is not None and cu_seqlens is not None:
        raise ValueError("pass seq_idx or cu_seqlens, not both: they describe the same document boundaries")
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, "[B, T]", (batch, seqlen), integer=True)
    if cu_seqlens is None:
        return None
    check_tensor("cu_seqlens", cu_seqlens, "[S + 1]", integer=True)
    if batch != 1:
        raise ValueError(f"cu_seqlens packs documents into one row, so the batch size must be 1, got {batch}")
    bounds = cu_seqlens.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seqlen:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {seqlen}, got {bounds}")
    if any(end <= start for start, end in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents), got {bounds}")
    return bounds


def check_states(name: str, states, batch: int, cu_seqlens, layout: str, dims: tuple[int, ...]) -> None:
    """Check per-row states [B, *dims], or per-document states [S, *dims] when ``cu_seqlens`` is given.

    ``layout`` names ``dims``, e.g. "H, P, N".
    """
    if states is None:
        return
    if cu_seqlens is None:
        check_tensor(name, states, f"[B, {layout}]", (batch, *dims))
    else:
        check_tensor(name, states, f"[S, {layout}] (one per document of cu_seqlens)", (len(cu_seqlens) - 1, *dims))


def compute_dtype(*tensors) -> torch.dtype:
    """The dtype the references compute in: float32, or float64 when any input is float64 (tests check in float64)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def document_starts(batch: int, seqlen: int, seq_idx=None, cu_seqlens=None, device=None) -> torch.Tensor:
    """[B, T] bool: True at the first token of every document (so always at t = 0).

    With ``seq_idx`` a document starts wherever the id differs from the previous token's; with ``cu_seqlens``
    (a list of bounds, batch 1) at every bound but the last.
    """
    starts = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
    starts[:, 0] = True
    if seq_idx is not None:
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    if cu_seqlens is not None:
        starts[0, cu_seqlens[:-1]] = True
    return starts


def document_ids(starts: torch.Tensor) -> torch.Tensor:
    """[B, T] document starts -> [B, T] int64 document number per token, counting from 0 in each row."""
    return starts.long().cumsum(dim=1) - 1


def sequence_ends(batch: int, seqlen: int, cu_seqlens=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of the last token of each row, or of each document with ``cu_seqlens``: where final states
    are read. Two int64 tensors [B] (or [S])."""
    if cu_seqlens is None:
        return torch.arange(batch, device=device), torch.full((batch,), seqlen - 1, device=device)
    ends = torch.tensor(cu_seqlens[1:], device=device) - 1
    return torch.zeros_like(ends), ends


def seq_idx_to_cu_seqlens(seq_idx: torch.Tensor) -> torch.Tensor:
    """seq_idx [B, T] -> cu_seqlens [S + 1] (int32) of the same documents in the flattened [B * T] stream.

    A document ends where the id changes and at the end of every row, so rows never merge.
    """
    check_tensor("seq_idx", seq_idx, "[B, T]", integer=True)
    batch, seqlen = seq_idx.shape
    starts = document_starts(batch, seqlen, seq_idx=seq_idx, device=seq_idx.device).flatten()
    bounds = torch.nonzero(starts).flatten()
    total = torch.tensor([batch * seqlen], device=seq_idx.device)
    return torch.cat([bounds, total]).to(torch.int32)


def cu_seqlens_to_seq_idx(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [S + 1] -> seq_idx [1, T] (int32): token t gets the number of the document that holds it."""
    check_tensor("cu_seqlens", cu_seqlens, "[S + 1]", integer=True)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths)[None]
