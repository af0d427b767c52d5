"""Per-modality modules chosen by a fixed modality mask (Mixture-of-Mamba): each token goes through the module of
its own modality, with no learned router.

    routing = ModalityRouting.from_ids(modality_ids, count=2)      # once per forward: [B, T], 0 = text, 1 = image
    out = route_by_modality([text_proj, image_proj], x, routing)   # x [B, T, D] -> [B, T, D_out]
    out = per_modality(proj, modality_copies(make_proj, 2), x, routing)   # a layer's own module and its copies

Which modalities occur, and where, is found once per forward (:meth:`ModalityRouting.from_ids`: the counts and each
modality's token indices, read on the host), so the layers route without synchronising again. When only one
modality occurs, its module runs on the whole tensor as it is, so a model whose tokens are all text computes exactly
what the plain model computes.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModalityRouting:
    """Each token's modality, [B, T] int64, and for every modality that occurs its tokens' flat indices (B * T)."""

    ids: torch.Tensor
    token_indices: tuple[tuple[int, torch.Tensor], ...]

    @classmethod
    def from_ids(cls, ids: torch.Tensor, count: int) -> "ModalityRouting":
        flat = ids.reshape(-1)
        occurring = torch.bincount(flat, minlength=count).tolist()
        if len(occurring) > count:
            raise ValueError(f"modality ids must be in [0, {count}), got {len(occurring) - 1}")
        return cls(ids, tuple((modality, (flat == modality).nonzero().squeeze(1))
                              for modality, tokens in enumerate(occurring) if tokens))

    @property
    def single_modality(self) -> int | None:
        """The one modality that occurs, or None when several do."""
        return self.token_indices[0][0] if len(self.token_indices) == 1 else None


def route_by_modality(modules: list[nn.Module] | nn.ModuleList, x: torch.Tensor,
                      routing: ModalityRouting | None) -> torch.Tensor:
    """``modules[m]`` applied to the tokens of modality m of ``x`` [..., D]; the modules must act token by token.
    Without ``routing`` every token is modality 0."""
    if routing is None:
        return modules[0](x)
    if routing.single_modality is not None:
        return modules[routing.single_modality](x)
    flat = x.reshape(-1, x.shape[-1])
    out = None
    for modality, indices in routing.token_indices:  # together they cover every token once
        part = modules[modality](flat.index_select(0, indices))
        if out is None:
            out = part.new_empty(flat.shape[0], part.shape[-1])
        out.index_copy_(0, indices, part.to(out.dtype))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def modality_copies(make: Callable[[], nn.Module], modalities: int) -> nn.ModuleList | None:
    """One module from ``make`` for each modality after the first (whose module is the layer's own), or None for a
    single modality."""
    return nn.ModuleList(make() for _ in range(modalities - 1)) if modalities > 1 else None


def per_modality(module: nn.Module, copies: nn.ModuleList | None, x: torch.Tensor,
                 routing: ModalityRouting | None) -> torch.Tensor:
    """``module`` on every token of ``x``, or, with the other modalities' ``copies``, each token through its own."""
    return module(x) if copies is None else route_by_modality([module, *copies], x, routing)
