"""Rotary position embedding (RoPE) for the attention layers, and the check of transformers v5's
``rope_parameters`` that the hybrid's config runs when it is built.

RoPE uses the rotate-half convention of transformers' Llama (and Bamba's for a partial rotary factor: the first
``rotary_dim`` channels of each head rotate, the rest pass through), so q/k weights converted from Llama, Mistral,
Jamba or Bamba checkpoints work unchanged. It takes every ``rope_type`` transformers has (default, linear, dynamic,
yarn, longrope, llama3, proportional): the frequencies and the cos/sin scaling come from transformers' own
``ROPE_INIT_FUNCTIONS``, and dynamic / longrope switch their frequencies with transformers' own
``dynamic_rope_update``, so the numbers are those of transformers' Llama with the same ``rope_parameters``.
:func:`rope_config` checks a ``rope_parameters`` dict the way transformers does, and refuses the values transformers
would only warn about and then compute nonsense from.

This module needs torch and transformers only (no kernels), so a config can import it.
"""

import copy

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

# "default" is not among transformers' RoPE functions: each transformers model computes it itself, as we do.
ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)
# The types whose frequencies depend on the context length the model was made for (dynamic compares with it, the
# others default original_max_position_embeddings to it).
ROPE_TYPES_READING_MAX_POSITIONS = ("dynamic", "yarn", "longrope", "llama3")
# rope_parameters keys that may hold None, for which transformers' RoPE functions compute a value; factor is one of
# them for yarn and longrope only (from max_position_embeddings / original_max_position_embeddings).
ROPE_KEYS_COMPUTED_WHEN_NONE = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RopeConfig(PreTrainedConfig):
    """What transformers' RoPE functions, ``dynamic_rope_update`` and ``validate_rope`` read from a model config,
    in a config of its own: ``head_dim`` always set (some of those functions fall back to
    ``hidden_size // num_attention_heads`` only when the attribute is missing, not when it is None, as in ssm_hub's
    configs), and a private copy of ``rope_parameters``, so that editing the model's config after a model was built
    does not change the model's RoPE, and transformers' standardisation does not edit the model's config."""

    head_dim: int = 64
    hidden_size: int = 64
    num_attention_heads: int = 1
    max_position_embeddings: int | None = None
    rope_parameters: dict | None = None


def rope_config(head_dim: int, rope_parameters: dict, max_position_embeddings: int | None = None,
                owner: str = "rope_parameters") -> RopeConfig:
    """``rope_parameters`` (transformers v5's dict: rope_type, rope_theta, partial_rotary_factor and the scaling keys
    of the type) checked and standardised as transformers does, in a :class:`RopeConfig` for heads of ``head_dim``
    channels. ``owner`` names the dict in errors (``"SsmHubHybridConfig.rope_parameters"``).

    transformers fills the keys it defaults (rope_theta; original_max_position_embeddings from
    ``max_position_embeddings`` for yarn, longrope and llama3), raises for missing required keys and logs a warning
    for keys the type does not read. Here a missing key, an unknown rope_type and the values transformers' checks only
    warn about (factor below 1, a non-positive theta, factors lists of the wrong length, high_freq_factor not above
    low_freq_factor ...) raise ``ValueError`` naming the key; unread keys keep transformers' warning.
    """
    check_positive_int(owner, "head_dim", head_dim)
    if not isinstance(rope_parameters, dict):
        raise ValueError(f"{owner} must be a dict (rope_type, rope_theta, partial_rotary_factor and the scaling keys "
                         f"of the type), got {rope_parameters!r}")
    nested = sorted(key for key, value in rope_parameters.items() if isinstance(value, dict))
    if nested:
        raise ValueError(f"{owner} holds dicts under {nested}: RoPE per layer type (Gemma 3's) is not supported, "
                         f"every attention layer takes the same rope_parameters")
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{owner}: rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rope_type in ROPE_TYPES_READING_MAX_POSITIONS:
        check_positive_int(f"{owner} with rope_type {rope_type!r}", "max_position_embeddings",
                              max_position_embeddings)
    config = RopeConfig(head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1,
                        max_position_embeddings=max_position_embeddings,
                        rope_parameters=copy.deepcopy(rope_parameters))
    rope = config.rope_parameters
    _check_rope_values(rope, rope_type, head_dim, owner)
    try:
        config.validate_rope()
    except KeyError as error:  # transformers' way of saying a required key is missing
        raise ValueError(f"{owner}: {error.args[0]}") from None
    if rope_type == "llama3" and not rope["high_freq_factor"] > rope["low_freq_factor"]:
        # Its smoothing divides by their difference.
        raise ValueError(f"{owner}: high_freq_factor must exceed low_freq_factor, got high_freq_factor="
                         f"{rope['high_freq_factor']!r} and low_freq_factor={rope['low_freq_factor']!r}")
    if rope_type == "longrope":
        frequencies = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            if len(rope[key]) != frequencies:
                raise ValueError(f"{owner}: {key} must hold one number per rotary frequency (rotary_dim / 2 = "
                                 f"{frequencies}), got {len(rope[key])}")
    return config


def _check_rope_values(rope: dict, rope_type: str, head_dim: int, owner: str) -> None:
    """The values of the keys ``rope`` holds, each against what transformers' RoPE functions need of it (missing keys
    are left to transformers' check, which names them)."""
    def refuse(key: str, constraint: str):
        raise ValueError(f"{owner}: {key} must be {constraint}, got {rope[key]!r}")

    for key, value in rope.items():
        if value is None and (key in ROPE_KEYS_COMPUTED_WHEN_NONE
                              or (key == "factor" and rope_type in ("yarn", "longrope"))):
            continue
        if key in ("rope_theta", "attention_factor") and not (_is_number(value) and value > 0):
            refuse(key, "a positive number")
        elif key == "factor" and not (_is_number(value) and value >= 1):
            refuse(key, "a number >= 1 (the context extension ratio)")
        elif key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor", "high_freq_factor") \
                and not _is_number(value):
            refuse(key, "a number")
        elif key == "original_max_position_embeddings" and (isinstance(value, bool) or not isinstance(value, int)
                                                            or value < 1):
            refuse(key, "a positive int")
        elif key in ("short_factor", "long_factor") and not (
                isinstance(value, (list, tuple)) and all(_is_number(v) and v > 0 for v in value)):
            refuse(key, "a list of positive numbers")
        elif key == "truncate" and not isinstance(value, bool):
            refuse(key, "a bool")
    factor = rope.get("partial_rotary_factor", 1.0)
    if not (_is_number(factor) and 0 < factor <= 1):
        refuse("partial_rotary_factor", "in (0, 1]")
    # Proportional RoPE spans the whole head (zero frequencies past the rotated part); the others rotate the first
    # int(head_dim * factor) channels in rotate-half layout, which needs an even count.
    rotated = head_dim if rope_type == "proportional" else int(head_dim * factor)
    if rotated < 2 or rotated % 2:
        raise ValueError(f"{owner}: head_dim ({head_dim}) * partial_rotary_factor ({factor}) must give an even number "
                         f">= 2 of rotated channels, got {rotated}")


def default_rope_parameters(config, device: torch.device | str | None = None, seq_len: int | None = None,
                            layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Default RoPE in the signature of transformers' ``ROPE_INIT_FUNCTIONS``: ``inv_freq[i] = rope_theta **
    (-2 i / rotary_dim)``, ``rotary_dim = int(head_dim * partial_rotary_factor)`` (the arithmetic of transformers'
    Llama and Bamba), and no cos/sin scaling."""
    rope = config.rope_parameters
    dim = int(config.head_dim * rope.get("partial_rotary_factor", 1.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (rope["rope_theta"] ** exponents), 1.0


class RotaryEmbedding(nn.Module):
    """RoPE from ``config.rope_parameters``, as transformers' Llama computes it: ``forward(x, position_ids)`` gives
    ``cos, sin`` of ``position * inv_freq``, duplicated to ``rotary_dim`` channels (rotate-half layout) and multiplied
    by ``attention_scaling`` (yarn's and longrope's; 1 otherwise).

    ``config`` is any transformers-style config with ``rope_parameters``, ``max_position_embeddings`` where the type
    reads it, and ``head_dim`` (or ``hidden_size`` and ``num_attention_heads``); the module keeps a checked copy
    (:func:`rope_config`), or the :class:`RopeConfig` it is given. ``inv_freq``, ``original_inv_freq``,
    ``attention_scaling`` and ``max_seq_len_cached`` are the state transformers' ``dynamic_rope_update`` reads and
    updates: dynamic RoPE recomputes the frequencies for positions beyond the longest seen so far (and returns to the
    originals for short inputs), longrope switches between its short and long factors at
    ``original_max_position_embeddings``.

    The frequencies are non-persistent buffers, so they follow the model's device; they stay float32 under
    ``model.to(torch.bfloat16)`` (transformers' Llama lets that cast round them). After transformers loads a
    checkpoint on the meta device, the model's ``_init_weights`` recomputes them (:meth:`reset_frequencies`); a module
    still on the meta device at its first call computes them then.
    """

    def __init__(self, config):
        super().__init__()
        head_dim = getattr(config, "head_dim", None)
        if head_dim is None:
            head_dim = config.hidden_size // config.num_attention_heads
        if not isinstance(config, RopeConfig):  # a RopeConfig comes from rope_config, checked already
            config = rope_config(head_dim, config.rope_parameters, getattr(config, "max_position_embeddings", None),
                                 owner=f"{type(config).__name__}.rope_parameters")
        self.config = config
        self.rope_type = self.config.rope_parameters["rope_type"]
        self.rope_init_fn = ROPE_INIT_FUNCTIONS.get(self.rope_type, default_rope_parameters)
        self.head_dim = head_dim
        self.original_max_seq_len = self.config.max_position_embeddings
        self.reset_frequencies()
        self.rotary_dim = 2 * self.inv_freq.numel()

    def reset_frequencies(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the frequencies on ``device`` (the default device if None), as before any dynamic update."""
        inv_freq, self.attention_scaling = self.rope_init_fn(self.config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        self.max_seq_len_cached = self.original_max_seq_len

    def _apply(self, fn, recurse: bool = True):
        # Device moves apply to the frequencies, dtype casts do not: they are kept float32.
        def keep_dtype(tensor: torch.Tensor) -> torch.Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)

        return super()._apply(keep_dtype, recurse)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (read for its device and dtype only) and ``position_ids [B, T]`` -> ``(cos, sin)``, each
        ``[B, T, rotary_dim]`` in ``x``'s dtype."""
        if self.inv_freq.is_meta:
            # Built on the meta device and given its weights with no initialisation (load_state_dict(assign=True)):
            # the frequencies are no weights, so they are computed now, where the input is.
            self.reset_frequencies(x.device)
        return self._cos_sin(x, position_ids)

    @dynamic_rope_update
    def _cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)

    def extra_repr(self) -> str:
        return f"rope_type={self.rope_type}, head_dim={self.head_dim}, rotary_dim={self.rotary_dim}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [B, Nq, T, D]`` and ``k [B, Nk, T, D]`` by ``cos, sin [B, T, R]`` (R <= D): the first R channels of
    each head rotate in rotate-half layout, the remaining ``D - R`` pass through (partial rotary)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        x_rot = x_rot * cos + _rotate_half(x_rot) * sin
        return x_rot if x_pass.shape[-1] == 0 else torch.cat((x_rot, x_pass), dim=-1)

    return rotate(q), rotate(k)
