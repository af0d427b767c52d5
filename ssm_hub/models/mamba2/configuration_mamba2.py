"""Configuration of ssm_hub's Mamba-2 (SSD) language model, model_type ``ssm_hub_mamba2``.

Field names are those of transformers' ``Mamba2Config`` so that users coming from transformers find what they
know; ``num_heads`` may be left out and is then ``hidden_size * expand // head_dim``.
"""

from ssm_hub.models.config_base import (
    SsmHubConfig,
    require_choice,
    require_int_at_least,
    require_positive_float,
    require_positive_int,
    require_time_step_range,
)


class SsmHubMamba2Config(SsmHubConfig):
    model_type = "ssm_hub_mamba2"

    vocab_size: int = 50288
    hidden_size: int = 768
    num_hidden_layers: int = 24
    state_size: int = 128
    expand: int = 2
    head_dim: int = 64
    num_heads: int | None = None
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 256
    use_bias: bool = False
    use_conv_bias: bool = True
    hidden_act: str = "silu"
    layer_norm_epsilon: float = 1e-5
    norm_before_gate: bool = False
    residual_in_fp32: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    A_init_range: list[float] | tuple[float, ...] = (1.0, 16.0)
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0

    def __post_init__(self, **kwargs):
        if self.num_heads is None and isinstance(self.head_dim, int) and self.head_dim > 0:
            inner = self.hidden_size * self.expand
            if inner % self.head_dim != 0:
                raise ValueError(
                    f"SsmHubMamba2Config: hidden_size * expand ({self.hidden_size} * {self.expand} = {inner}) must be "
                    f"divisible by head_dim ({self.head_dim})"
                )
            self.num_heads = inner // self.head_dim
        self.time_step_limit = tuple(self.time_step_limit)
        self.A_init_range = tuple(self.A_init_range)
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise ValueError on any inconsistent field."""
        require_positive_int(
            self, "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "head_dim",
            "num_heads", "n_groups", "chunk_size",
        )
        require_positive_float(self, "layer_norm_epsilon")
        require_choice(self, "hidden_act", ("silu",))
        require_time_step_range(self)
        require_int_at_least(self, "conv_kernel", 2)
        if self.num_heads * self.head_dim != self.intermediate_size:
            raise ValueError(
                f"SsmHubMamba2Config: num_heads * head_dim ({self.num_heads} * {self.head_dim}) must equal "
                f"hidden_size * expand ({self.intermediate_size})"
            )
        if self.num_heads % self.n_groups != 0:
            raise ValueError(
                f"SsmHubMamba2Config: num_heads ({self.num_heads}) must be divisible by n_groups ({self.n_groups})"
            )
        if len(self.time_step_limit) != 2 or not 0 <= self.time_step_limit[0] < self.time_step_limit[1]:
            raise ValueError(
                f"SsmHubMamba2Config.time_step_limit must be (low, high) with 0 <= low < high, got {self.time_step_limit}"
            )
        if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(
                f"SsmHubMamba2Config.A_init_range must be (low, high) with 0 < low <= high, got {self.A_init_range}"
            )
