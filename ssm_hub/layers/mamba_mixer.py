"""The Mamba-1 mixer (selective scan): in_proj -> causal conv1d + SiLU -> x_proj -> dt_proj -> selective scan
(gated by silu(z)) -> out_proj.

Parameter names match transformers' MambaMixer, so native checkpoints map one to one. dt_proj is called as a
module (bias included) rather than read as a tensor, so a LoRA adapter on it takes effect. With
``config.inner_layernorms`` the low-rank dt, B and C go through RMSNorms (``dt_layernorm``, ``b_layernorm``,
``c_layernorm``) before use, as in Jamba.

With ``modalities`` > 1 (Mixture-of-Mamba) every modality after the first has its own in_proj, x_proj, dt_proj (bias
included) and out_proj, in ``modality_*``; the conv, A and D stay shared. Tokens are routed by a fixed modality mask
(ssm_hub.layers.modality_routing); modality 0 uses the plain projections.
"""

import torch
from torch import nn

from transformers import initialization as init

from ssm_hub.layers.linear import KernelLinear
from ssm_hub.layers.mixer_state import cached_states, conv_over_sequence
from ssm_hub.layers.modality_routing import ModalityRouting, modality_copies, per_modality
from ssm_hub.layers.norms import RMSNorm
from ssm_hub.layers.peft_compat import unwrapped_conv_parameters
from ssm_hub.layers.ssm_init import inverse_softplus, sample_time_steps
from ssm_hub.layers.state_rollback import first_tokens, record_conv_inputs, scan_then_step
from ssm_hub.ops.causal_conv1d import causal_conv1d_step
from ssm_hub.ops.selective_scan import selective_scan, selective_scan_step


class MambaMixer(nn.Module):
    def __init__(self, config, layer_idx: int, modalities: int = 1):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.hidden_size * config.expand
        self.state_size = config.state_size
        self.time_step_rank = config.time_step_rank
        self.conv_kernel_size = config.conv_kernel

        self.in_proj = KernelLinear(self.hidden_size, 2 * self.intermediate_size, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.intermediate_size, self.intermediate_size, kernel_size=self.conv_kernel_size,
            groups=self.intermediate_size, padding=self.conv_kernel_size - 1, bias=config.use_conv_bias,
        )
        self.x_proj = KernelLinear(self.intermediate_size, self.time_step_rank + 2 * self.state_size, bias=False)
        self.dt_proj = KernelLinear(self.time_step_rank, self.intermediate_size, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.intermediate_size, self.state_size))
        self.D = nn.Parameter(torch.empty(self.intermediate_size))
        self.out_proj = KernelLinear(self.intermediate_size, self.hidden_size, bias=config.use_bias)
        self.inner_layernorms = config.inner_layernorms
        if self.inner_layernorms:
            eps = config.layer_norm_epsilon
            self.dt_layernorm = RMSNorm(self.time_step_rank, eps=eps)
            self.b_layernorm = RMSNorm(self.state_size, eps=eps)
            self.c_layernorm = RMSNorm(self.state_size, eps=eps)
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            plain = getattr(self, name)
            setattr(self, f"modality_{name}", modality_copies(
                lambda: KernelLinear(plain.in_features, plain.out_features, bias=plain.bias is not None), modalities))

    @torch.no_grad()
    def init_ssm_parameters(self, config) -> None:
        """Mamba's init: A = -[1..N] per channel (S4D-real, stored as log), D = 1, dt_proj.weight ~ U(+-rank^-0.5 *
        time_step_scale) (or constant), and dt_proj.bias = softplus^-1(dt) with dt ~ logU(time_step_min,
        time_step_max) floored at time_step_floor."""
        A = torch.arange(1, self.state_size + 1, dtype=torch.float32).expand(self.intermediate_size, -1)
        init.copy_(self.A_log, torch.log(A))
        init.ones_(self.D)
        dt_init_std = self.time_step_rank**-0.5 * config.time_step_scale
        for dt_proj in (self.dt_proj, *(self.modality_dt_proj or ())):
            if config.time_step_init_scheme == "constant":
                init.constant_(dt_proj.weight, dt_init_std)
            else:
                init.uniform_(dt_proj.weight, -dt_init_std, dt_init_std)
            init.copy_(dt_proj.bias, inverse_softplus(sample_time_steps(self.intermediate_size, config)))

    def _project(self, name: str, x: torch.Tensor, modality: ModalityRouting | None) -> torch.Tensor:
        """Projection ``name`` of x, each token through its modality's copy when the projections are routed."""
        return per_modality(getattr(self, name), getattr(self, f"modality_{name}"), x, modality)

    def _selection(self, x: torch.Tensor, modality: ModalityRouting | None = None):
        """Input-dependent dt, B, C from the conv output x (any leading shape)."""
        dt_low_rank, B, C = self._project("x_proj", x, modality).split(
            [self.time_step_rank, self.state_size, self.state_size], dim=-1)
        if self.inner_layernorms:
            dt_low_rank, B, C = self.dt_layernorm(dt_low_rank), self.b_layernorm(B), self.c_layernorm(C)
        return self._project("dt_proj", dt_low_rank, modality), B, C

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        padding_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        modality: ModalityRouting | None = None,
    ) -> torch.Tensor:
        """``modality``: which projections each token takes (only with ``modalities`` > 1; None: modality 0)."""
        seq_len = hidden_states.shape[1]
        # Non-zero while the cache records states for assisted decoding (see ssm_hub.layers.state_rollback).
        stepped_tokens, conv_state, ssm_state = cached_states(cache, self.layer_idx, seq_len, seq_idx,
                                                              self.conv_kernel_size)

        x, gate = self._project("in_proj", hidden_states, modality).chunk(2, dim=-1)
        if padding_mask is not None:
            x = x * padding_mask[..., None].to(x.dtype)

        if conv_state is not None and ssm_state is not None and seq_len == 1 and not stepped_tokens:
            # Decode: one token against the cached conv window and recurrent state, both updated in place.
            conv_weight, conv_bias = self._conv_parameters()
            x, _ = causal_conv1d_step(x[:, 0], conv_state, conv_weight, conv_bias, activation="silu", in_place=True)
            dt, B, C = self._selection(x, modality)
            # A_log as it is: the step computes A = -exp(A_log) in its kernel, which saves a launch or two a layer.
            y, _ = selective_scan_step(
                ssm_state, x, dt, self.A_log, B, C, D=self.D, z=gate[:, 0], delta_softplus=True, A_is_log=True,
                in_place=True,
            )
            return self._project("out_proj", y[:, None].to(hidden_states.dtype), modality)

        if stepped_tokens:
            conv_state = record_conv_inputs(cache, self.layer_idx, x, self.conv_kernel_size)
        y, conv_state, ssm_state = self._sequence(x, gate, padding_mask, seq_idx, conv_state, ssm_state,
                                                  cache is not None, modality, stepped_tokens)
        if cache is not None:
            if not stepped_tokens:
                # The conv window is the last conv_kernel - 1 inputs; the cache keeps exactly that many.
                cache.update_conv_state(conv_state, self.layer_idx, conv_kernel_size=self.conv_kernel_size - 1)
            cache.update_recurrent_state(ssm_state, self.layer_idx)
        return self._project("out_proj", y.to(hidden_states.dtype), modality)

    def _conv_parameters(self):
        return unwrapped_conv_parameters(self.conv1d, f"layer {self.layer_idx} mixer.conv1d")

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _sequence(self, x, gate, padding_mask, seq_idx, conv_state, ssm_state, want_states: bool, modality=None,
                  stepped_tokens: int = 0):
        """conv -> dt, B, C -> selective scan (gated) over a sequence: (y, final conv state or None, final SSM state
        or None). With ``stepped_tokens``, the last that many tokens run one decode step each and the SSM states
        after each of them come back instead of the final one, oldest first (see layers.state_rollback)."""
        x, conv_state = conv_over_sequence(x, *self._conv_parameters(), conv_state, seq_idx, padding_mask, want_states)
        dt, B, C = self._selection(x, modality)

        def scan(end, state):
            head_x, head_dt, head_B, head_C, head_gate, head_seq_idx = first_tokens(end, x, dt, B, C, gate, seq_idx)
            scan_out = selective_scan(
                head_x, head_dt, self._A(), head_B, head_C, D=self.D, z=head_gate, delta_softplus=True,
                initial_state=state, seq_idx=head_seq_idx, return_final_state=want_states,
            )
            return scan_out if want_states else (scan_out, None)

        def step(t, state):
            return selective_scan_step(state, x[:, t], dt[:, t], self.A_log, B[:, t], C[:, t], D=self.D, z=gate[:, t],
                                       delta_softplus=True, A_is_log=True)

        if stepped_tokens and ssm_state is None:
            ssm_state = x.new_zeros(x.shape[0], self.intermediate_size, self.state_size, dtype=torch.float32)
        y, ssm_state = scan_then_step(scan, step, ssm_state, x.shape[1], stepped_tokens)
        return y, conv_state, ssm_state
