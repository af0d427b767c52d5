"""Initial values of the SSM time step shared by Mamba and Mamba-2 (Gu & Dao, 2023, section 3.6)."""

import math

import torch


def sample_time_steps(count: int, config) -> torch.Tensor:
    """dt log-uniform in [time_step_min, time_step_max], floored at time_step_floor."""
    log_min, log_max = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = torch.exp(torch.rand(count) * (log_max - log_min) + log_min)
    return dt.clamp(min=config.time_step_floor)


def inverse_softplus(values: torch.Tensor) -> torch.Tensor:
    """x such that softplus(x) == values; the model stores dt through softplus so it stays positive."""
    return values + torch.log(-torch.expm1(-values))
