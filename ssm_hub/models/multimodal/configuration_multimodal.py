"""Configuration of ssm_hub's decoder-only vision-language model, model_type ``ssm_hub_multimodal``.

    from ssm_hub.models.multimodal.configuration_multimodal import SsmHubMultimodalConfig
    config = SsmHubMultimodalConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=4, mixer_types=["mamba2"] * 4,
                                    patch_size=16, image_token_id=1022, image_row_end_token_id=1023,
                                    mixture_of_mamba=True)

It is the hybrid stack's config (ssm_hub_hybrid: every layer layout, pure Mamba-2 or hybrid with attention and
MoE) plus the image side. There is no vision encoder: images are cut into ``patch_size`` squares that a linear
layer embeds (Fuyu's way), optionally ``merge_size x merge_size`` patches to a token. The processor writes each
image as rows of ``image_token_id`` placeholders, each row closed by ``image_row_end_token_id``; the model puts the
patch embeddings in place of the placeholders. The row-end token is how a 1-D scan knows the 2-D layout: it needs
no maximum grid (a learned 2-D position table would), works for any image shape, and is what Fuyu, the model this
one converts from, does.

Mixture-of-Mamba (Liang et al.): ``mixture_of_mamba`` gives the image tokens their own projections in every SSM
layer: in_proj (which in Mamba-2 also gives dt) and out_proj, and in Mamba-1 x_proj and dt_proj too; conv, A, D (and
Mamba-2's gated norm) stay shared. ``modality_mlps``
and ``modality_norms`` also give them their own dense MLPs and norms. Tokens are routed by the fixed modality mask
(image placeholders and row ends are image, everything else text), with no learned router.
"""

from ssm_hub.models.config_base import require_positive_int
from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig

MODALITIES = ("text", "image")


class SsmHubMultimodalConfig(SsmHubHybridConfig):
    model_type = "ssm_hub_multimodal"

    num_channels: int = 3
    patch_size: int = 16
    merge_size: int = 1
    image_token_id: int | None = None
    image_row_end_token_id: int | None = None
    mixture_of_mamba: bool = False
    modality_mlps: bool = False
    modality_norms: bool = False

    @property
    def routes_modalities(self) -> bool:
        """Whether any part of the blocks is copied per modality (image tokens routed apart from text)."""
        return self.mixture_of_mamba or self.modality_mlps or self.modality_norms

    def check(self) -> None:
        super().check()
        name = type(self).__name__
        require_positive_int(self, "num_channels", "patch_size", "merge_size")
        for flag in ("mixture_of_mamba", "modality_mlps", "modality_norms"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{name}.{flag} must be a bool, got {getattr(self, flag)!r}")
        for field in ("image_token_id", "image_row_end_token_id"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value < self.vocab_size):
                raise ValueError(f"{name}.{field} must be a token id in [0, vocab_size = {self.vocab_size}), "
                                 f"got {value!r}")
        if self.image_token_id is not None and self.image_token_id == self.image_row_end_token_id:
            raise ValueError(f"{name}: image_token_id and image_row_end_token_id must differ, both are "
                             f"{self.image_token_id}")
        if self.modality_mlps and any(ffn in ("moe", "pkm") for ffn in self.ffn_types):
            raise ValueError(f"{name}.modality_mlps copies the dense MLPs per modality; the layout has MoE or PKM "
                             f"feed-forwards ({self.ffn_types}), which would stay shared: use mlp layers")
