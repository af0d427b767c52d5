"""What the ssm_hub configs share: the remote-code export on save, and validators that raise ``ValueError``
naming the field, the constraint and the value, so a bad config fails at construction time instead of deep
inside a forward pass."""

from transformers import PreTrainedConfig

from ssm_hub.models.remote_code import save_with_remote_code


class SsmHubConfig(PreTrainedConfig):
    """Base of ssm_hub's configs: saving one also writes the code that reads it (trust_remote_code).

    The defaults below describe a pure SSM stack (every layer a mixer with ``expand * hidden_size`` inner channels);
    a config with other layer kinds overrides ``layer_types``.
    """

    # transformers' MambaConfig stores these two; here they are derived, and a stored value must agree.
    DERIVED_FIELDS = ("intermediate_size", "layer_types")

    def __post_init__(self, **kwargs):
        given = {name: kwargs.pop(name) for name in self.DERIVED_FIELDS if name in kwargs}
        super().__post_init__(**kwargs)
        for name, value in given.items():
            if value is not None and value != getattr(self, name):
                raise ValueError(
                    f"{type(self).__name__}.{name} is derived from the other fields ({getattr(self, name)!r}); "
                    f"got {value!r}"
                )

    @property
    def intermediate_size(self) -> int:
        return self.hidden_size * self.expand

    @property
    def layer_types(self) -> list[str]:
        # transformers' DynamicCache / StaticCache build one conv + recurrent state slot per "linear_attention" layer.
        return ["linear_attention"] * self.num_hidden_layers

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' save_pretrained, plus the config's code next to it (see models.remote_code)."""
        save_with_remote_code(self, super().save_pretrained, save_directory, push_to_hub, kwargs)


def require_positive_int(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


def require_positive_float(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive number, got {value!r}")


def require_int_at_least(config, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(config).__name__}.{name} must be an integer >= {minimum}, got {value!r}")


def require_choice(config, name: str, choices: tuple) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} must be one of {choices}, got {value!r}")


def require_time_step_range(config) -> None:
    """dt is initialised log-uniformly in [time_step_min, time_step_max] and floored at time_step_floor."""
    require_positive_float(config, "time_step_min", "time_step_max", "time_step_floor")
    if config.time_step_min > config.time_step_max:
        raise ValueError(
            f"{type(config).__name__}: time_step_min ({config.time_step_min}) must not exceed "
            f"time_step_max ({config.time_step_max})"
        )
