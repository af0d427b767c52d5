"""Configuration of ssm_hub's Mamba-1 (selective scan) language model, model_type ``ssm_hub_mamba``.

Field names are those of transformers' ``MambaConfig``; ``time_step_rank="auto"`` means ceil(hidden_size / 16).
``inner_layernorms`` adds Jamba's RMSNorms on dt, B and C after ``x_proj`` (transformers' Mamba has none).
"""

import math

from ssm_hub.models.config_base import (
    SsmHubConfig,
    require_choice,
    require_int_at_least,
    require_positive_float,
    require_positive_int,
    require_time_step_range,
)


class SsmHubMambaConfig(SsmHubConfig):
    model_type = "ssm_hub_mamba"

    vocab_size: int = 50280
    hidden_size: int = 768
    num_hidden_layers: int = 24
    state_size: int = 16
    expand: int = 2
    conv_kernel: int = 4
    time_step_rank: str | int = "auto"
    time_step_scale: float = 1.0
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_init_scheme: str = "random"
    time_step_floor: float = 1e-4
    use_bias: bool = False
    use_conv_bias: bool = True
    inner_layernorms: bool = False
    hidden_act: str = "silu"
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0

    def __post_init__(self, **kwargs):
        if self.time_step_rank == "auto" and isinstance(self.hidden_size, int):
            self.time_step_rank = math.ceil(self.hidden_size / 16)
        super().__post_init__(**kwargs)
        self.check()

    def check(self) -> None:
        """Raise ValueError on any inconsistent field."""
        require_positive_int(
            self, "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "expand", "time_step_rank"
        )
        require_positive_float(self, "layer_norm_epsilon", "time_step_scale")
        require_choice(self, "hidden_act", ("silu",))
        require_choice(self, "time_step_init_scheme", ("random", "constant"))
        require_time_step_range(self)
        require_int_at_least(self, "conv_kernel", 2)
