"""The Mamba-2 mixer (SSD): in_proj -> causal conv1d + SiLU -> chunked SSD scan -> gated RMSNorm -> out_proj.

Parameter names match transformers' Mamba2Mixer, so native checkpoints map one to one. All recurrence math is in
``ssm_hub.ops``; this module only projects, splits and reshapes, and talks to transformers' cache.

With ``modalities`` > 1 (Mixture-of-Mamba) every modality after the first has its own in_proj (which also gives
dt) and out_proj, in ``modality_in_proj`` / ``modality_out_proj``; the conv, A, D, dt_bias and the norm stay
shared. Tokens are routed by a fixed modality mask (ssm_hub.layers.modality_routing); modality 0 uses
``in_proj`` / ``out_proj`` themselves, so a text-only checkpoint loads into the text path unchanged.
"""

import torch
from torch import nn

from transformers import initialization as init

from ssm_hub.layers.linear import KernelLinear, is_plain_linear
from ssm_hub.layers.mixer_state import cached_states, conv_over_sequence
from ssm_hub.layers.modality_routing import ModalityRouting, modality_copies, per_modality
from ssm_hub.layers.norms import GatedRMSNorm, RMSNorm
from ssm_hub.layers.peft_compat import is_unhooked, unwrapped_conv_parameters
from ssm_hub.layers.ssm_init import inverse_softplus, sample_time_steps
from ssm_hub.layers.state_rollback import first_tokens, record_conv_inputs, recorded_state_count, scan_then_step
from ssm_hub.ops.causal_conv1d import causal_conv1d, causal_conv1d_step
from ssm_hub.ops.linear import gated_rms_norm_linear, linear_conv_step
from ssm_hub.ops.mamba2_decode import Mamba2DecodeWeights, PreNorm, mamba2_decode_on_kernels, mamba2_decode_step
from ssm_hub.ops.mamba2_sequence import Mamba2Sizes, mamba2_sequence_on_kernels, mamba2_sequence_train
from ssm_hub.ops.ssd import ssd_chunked_scan, ssd_mixing_matrix, ssd_step


class Mamba2Mixer(nn.Module):
    def __init__(self, config, layer_idx: int, modalities: int = 1):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.hidden_size * config.expand
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.n_groups = config.n_groups
        self.state_size = config.state_size
        self.conv_kernel_size = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.time_step_limit = tuple(config.time_step_limit)
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.state_size

        # in_proj output, in order: gate z [d_inner], conv input xBC [d_inner + 2 G N], dt [H].
        self.in_proj = KernelLinear(self.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=self.conv_kernel_size, groups=self.conv_dim,
            padding=self.conv_kernel_size - 1, bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(
            self.intermediate_size, n_groups=self.n_groups, eps=config.layer_norm_epsilon,
            norm_before_gate=config.norm_before_gate,
        )
        self.out_proj = KernelLinear(self.intermediate_size, self.hidden_size, bias=config.use_bias)
        self.modality_in_proj = modality_copies(
            lambda: KernelLinear(self.hidden_size, self.in_proj.out_features, bias=config.use_bias), modalities)
        self.modality_out_proj = modality_copies(
            lambda: KernelLinear(self.intermediate_size, self.hidden_size, bias=config.use_bias), modalities)

    @torch.no_grad()
    def init_ssm_parameters(self, config) -> None:
        """Mamba-2's init: A ~ U(A_init_range) (stored as log), D = 1, dt ~ logU(time_step_min, time_step_max)
        floored at time_step_floor and stored through the inverse softplus as dt_bias."""
        low, high = config.A_init_range
        init.copy_(self.A_log, torch.log(torch.empty(self.num_heads).uniform_(low, high)))
        init.ones_(self.D)
        init.copy_(self.dt_bias, inverse_softplus(sample_time_steps(self.num_heads, config)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        padding_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
        modality: ModalityRouting | None = None,
    ) -> torch.Tensor:
        """``modality``: which projections each token takes (only with ``modalities`` > 1; None: modality 0)."""
        batch_size, seq_len, _ = hidden_states.shape
        # Non-zero while the cache records states for assisted decoding (see ssm_hub.layers.state_rollback).
        stepped_tokens, conv_state, ssm_state = cached_states(cache, self.layer_idx, seq_len, seq_idx,
                                                              self.conv_kernel_size)

        decoding = conv_state is not None and ssm_state is not None and seq_len == 1 and not stepped_tokens
        if decoding:
            out = self._one_op_decode(hidden_states, conv_state, ssm_state, padding_mask)
            if out is not None:
                return out
        if decoding and padding_mask is None and self.modality_in_proj is None and is_plain_linear(self.in_proj):
            # Decode: in_proj and the conv step as one op (one kernel on one row), the conv window updated in place.
            conv_weight, conv_bias = self._conv_parameters()
            projected, xBC = linear_conv_step(hidden_states, self.in_proj.weight, self.in_proj.bias, conv_state,
                                              conv_weight, conv_bias, conv_start=self.intermediate_size,
                                              activation="silu")
            gate, dt = projected[..., :self.intermediate_size], projected[..., self.intermediate_size + self.conv_dim:]
            return self._decode_step(xBC, gate, dt, ssm_state, hidden_states.dtype, modality)

        projected = per_modality(self.in_proj, self.modality_in_proj, hidden_states, modality)
        gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        if padding_mask is not None:
            xBC = xBC * padding_mask[..., None].to(xBC.dtype)

        if decoding:
            # Decode: one token against the cached conv window and recurrent state, both updated in place.
            conv_weight, conv_bias = self._conv_parameters()
            xBC, _ = causal_conv1d_step(
                xBC[:, 0], conv_state, conv_weight, conv_bias, activation="silu", in_place=True
            )
            return self._decode_step(xBC, gate, dt, ssm_state, hidden_states.dtype, modality)

        if cache is None and torch.is_grad_enabled() and self._sequence_on_kernels(hidden_states):
            # Training on the kernels: one autograd node that keeps the scan's output but rebuilds the conv output
            # and the normed output in backward (see ssm_hub.ops.mamba2_sequence).
            return self._sequence_for_training(gate, xBC, dt, padding_mask, seq_idx, hidden_states.dtype, modality)
        if stepped_tokens:
            conv_state = record_conv_inputs(cache, self.layer_idx, xBC, self.conv_kernel_size)
        out, conv_state, ssm_state = self._sequence(
            gate, xBC, dt, padding_mask, seq_idx, conv_state, ssm_state, cache is not None, hidden_states.dtype,
            modality, stepped_tokens,
        )
        if cache is not None:
            if not stepped_tokens:
                # The conv window is the last conv_kernel - 1 inputs; the cache keeps exactly that many.
                cache.update_conv_state(conv_state, self.layer_idx, conv_kernel_size=self.conv_kernel_size - 1)
            cache.update_recurrent_state(ssm_state, self.layer_idx)
        return out

    def decode_after_norm(self, hidden_states: torch.Tensor, residual: torch.Tensor, norm: nn.Module, cache,
                          padding_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None):
        """A pre-norm block's residual add, its RMSNorm ``norm`` and this mixer's decode step as one op:
        (mixer output, residual stream entering the block), or None where the op does not cover the call, and the
        block runs the norm and the mixer as modules. ``hidden_states`` is the previous block's output. Neither the
        norm nor this mixer may be hooked or replaced, since the op reads their weights."""
        if (cache is None or seq_idx is not None or hidden_states.shape[1] != 1 or type(norm) is not RMSNorm
                or not is_unhooked(norm) or not is_unhooked(self)
                or recorded_state_count(cache, self.layer_idx, 1, None, self.conv_kernel_size)):
            return None
        conv_state, ssm_state = cache.get_conv_state(self.layer_idx), cache.get_recurrent_state(self.layer_idx)
        if conv_state is None or ssm_state is None:
            return None
        return self._one_op_decode(hidden_states, conv_state, ssm_state, padding_mask,
                                   PreNorm(residual, norm.weight, norm.variance_epsilon))

    def _one_op_decode(self, hidden_states, conv_state, ssm_state, padding_mask, pre_norm: PreNorm | None = None):
        """A decode step (one token against this layer's cached states) as one op on the kernels (see
        ssm_hub.ops.mamba2_decode), or None where that op does not cover the call. With ``pre_norm`` the op also takes
        the block's residual step and norm in front (see decode_after_norm). It reads the module weights directly, so
        it declines when a module it would bypass is wrapped, hooked or routed per modality."""
        if padding_mask is not None or self.modality_in_proj is not None:
            return None
        weights = self._decode_weights()
        sizes = self._sizes(hidden_states.dtype)
        if weights is None or not mamba2_decode_on_kernels(hidden_states, conv_state, ssm_state, weights, sizes,
                                                           pre_norm):
            return None
        return mamba2_decode_step(hidden_states, conv_state, ssm_state, weights, sizes, pre_norm)

    def _decode_step(self, xBC, gate, dt, ssm_state, out_dtype, modality) -> torch.Tensor:
        """The SSM step and the output of one token: xBC [B, conv_dim] after the conv, gate [B, 1, d_inner], dt
        [B, 1, H]; the recurrent state updated in place."""
        batch_size = xBC.shape[0]
        groups = self.n_groups * self.state_size
        x, B, C = xBC.split([self.intermediate_size, groups, groups], -1)
        # A_log as it is: the step computes A = -exp(A_log) in its kernel, which saves a launch or two a layer.
        y, _ = ssd_step(
            ssm_state, x.view(batch_size, self.num_heads, self.head_dim), dt[:, 0], self.A_log,
            B.view(batch_size, self.n_groups, self.state_size), C.view(batch_size, self.n_groups, self.state_size),
            A_is_log=True, in_place=True, **self._scan_kwargs(),
        )
        return self._output(y.reshape(batch_size, 1, self.intermediate_size), gate, out_dtype, modality)

    def _sequence_on_kernels(self, hidden_states: torch.Tensor) -> bool:
        return mamba2_sequence_on_kernels(hidden_states, self._sizes(hidden_states.dtype))

    def _sizes(self, out_dtype: torch.dtype) -> Mamba2Sizes:
        return Mamba2Sizes(
            self.intermediate_size, self.n_groups, self.state_size, self.num_heads, self.head_dim, self.chunk_size,
            self.time_step_limit, self.norm.n_groups, self.norm.variance_epsilon, self.norm.norm_before_gate,
            out_dtype,
        )

    def _decode_weights(self) -> Mamba2DecodeWeights | None:
        """The tensors the one-op decode step reads, or None when a module it would bypass is wrapped, hooked or
        routed per modality (then each runs as itself)."""
        norm = self.norm
        if not (is_plain_linear(self.in_proj) and is_plain_linear(self.out_proj) and self.modality_out_proj is None
                and type(norm) is GatedRMSNorm and is_unhooked(norm)):
            return None
        conv_weight, conv_bias = self._conv_parameters()
        return Mamba2DecodeWeights(self.in_proj.weight, self.in_proj.bias, conv_weight, conv_bias, self.A_log, self.D,
                                   self.dt_bias, norm.weight, self.out_proj.weight, self.out_proj.bias)

    def _sequence_for_training(self, gate, xBC, dt, padding_mask, seq_idx, out_dtype, modality=None):
        conv_weight, conv_bias = self._conv_parameters()
        sizes = self._sizes(out_dtype)
        # out_proj goes into the node (so its input need not be kept) unless something wraps or hooks it, such as
        # a PEFT adapter, or tokens are routed to per-modality out_projs: then it runs as itself on the node's
        # normed output.
        plain_out_proj = is_plain_linear(self.out_proj) and self.modality_out_proj is None
        out_weight, out_bias = (self.out_proj.weight, self.out_proj.bias) if plain_out_proj else (None, None)
        out = mamba2_sequence_train(xBC, dt, gate, conv_weight, conv_bias, self.A_log, self.D, self.dt_bias,
                                    self.norm.weight, out_weight, out_bias, padding_mask, seq_idx, sizes)
        return out if plain_out_proj else self._project_out(out, modality)

    def mixing_matrix(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H, T, T]: the scan this layer runs on ``hidden_states`` as one matrix per head (before the D skip,
        the gated norm and out_proj; see ssm_hub.ops.ssd.ssd_mixing_matrix), differentiable, for comparing with an
        attention layer's matrices (distillation's matrix orientation)."""
        batch_size, seq_len, _ = hidden_states.shape
        _, xBC, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        conv_weight, conv_bias = self._conv_parameters()
        xBC = causal_conv1d(xBC, conv_weight, conv_bias, activation="silu", seq_idx=seq_idx)
        _, B, C = xBC.split([self.intermediate_size, self.n_groups * self.state_size, self.n_groups * self.state_size], -1)
        groups = (batch_size, seq_len, self.n_groups, self.state_size)
        return ssd_mixing_matrix(dt, self._A(), B.reshape(groups), C.reshape(groups), dt_bias=self.dt_bias,
                                 dt_softplus=True, dt_limit=self.time_step_limit, seq_idx=seq_idx)

    def _conv_parameters(self):
        return unwrapped_conv_parameters(self.conv1d, f"layer {self.layer_idx} mixer.conv1d")

    def _A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _scan_kwargs(self) -> dict:
        return dict(D=self.D, dt_bias=self.dt_bias, dt_softplus=True, dt_limit=self.time_step_limit)

    def _sequence(self, gate, xBC, dt, padding_mask, seq_idx, conv_state, ssm_state, want_states: bool, out_dtype,
                  modality=None, stepped_tokens: int = 0):
        """conv -> chunked scan -> gated norm -> out_proj over a sequence: (output, final conv state or None,
        final SSM state or None). With ``stepped_tokens``, the last that many tokens run one decode step each and
        the SSM states after each of them come back instead of the final one, oldest first (see
        layers.state_rollback)."""
        batch_size, seq_len, _ = xBC.shape
        xBC, conv_state = conv_over_sequence(xBC, *self._conv_parameters(), conv_state, seq_idx, padding_mask,
                                             want_states)
        x, B, C = xBC.split([self.intermediate_size, self.n_groups * self.state_size, self.n_groups * self.state_size], -1)
        x = x.view(batch_size, seq_len, self.num_heads, self.head_dim)
        B = B.view(batch_size, seq_len, self.n_groups, self.state_size)
        C = C.view(batch_size, seq_len, self.n_groups, self.state_size)

        def scan(end, state):
            head_x, head_dt, head_B, head_C, head_seq_idx = first_tokens(end, x, dt, B, C, seq_idx)
            scan_out = ssd_chunked_scan(
                head_x, head_dt, self._A(), head_B, head_C, self.chunk_size, initial_states=state,
                seq_idx=head_seq_idx, return_final_states=want_states, **self._scan_kwargs(),
            )
            return scan_out if want_states else (scan_out, None)

        def step(t, state):
            return ssd_step(state, x[:, t], dt[:, t], self.A_log, B[:, t], C[:, t], A_is_log=True,
                            **self._scan_kwargs())

        if stepped_tokens and ssm_state is None:
            ssm_state = x.new_zeros(batch_size, self.num_heads, self.head_dim, self.state_size, dtype=torch.float32)
        y, ssm_state = scan_then_step(scan, step, ssm_state, seq_len, stepped_tokens)
        y = y.reshape(batch_size, seq_len, self.intermediate_size)
        return self._output(y, gate, out_dtype, modality), conv_state, ssm_state

    def _output(self, y: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype, modality=None) -> torch.Tensor:
        norm = self.norm
        if (self.modality_out_proj is None and is_plain_linear(self.out_proj) and type(norm) is GatedRMSNorm
                and is_unhooked(norm) and torch.promote_types(y.dtype, norm.weight.dtype) == dtype):
            # One op, which decoding one row runs as one kernel (the norm inside out_proj's matrix-vector product).
            return gated_rms_norm_linear(y, gate, norm.weight, self.out_proj.weight, self.out_proj.bias,
                                         n_groups=norm.n_groups, eps=norm.variance_epsilon,
                                         norm_before_gate=norm.norm_before_gate)
        return self._project_out(norm(y, gate).to(dtype), modality)

    def _project_out(self, normed: torch.Tensor, modality: ModalityRouting | None) -> torch.Tensor:
        return per_modality(self.out_proj, self.modality_out_proj, normed, modality)
