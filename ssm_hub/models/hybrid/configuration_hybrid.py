"""Configuration of ssm_hub's hybrid SSM / attention / mixture-of-experts language model, model_type
``ssm_hub_hybrid`` (the Jamba / Samba / Hydra family).

The stack is described per layer by two explicit lists, which is what the config stores:

- ``mixer_types``: ``"mamba"`` (Mamba-1), ``"mamba2"``, ``"attention"`` (full causal attention) or
  ``"sliding_attention"`` (causal attention within ``sliding_window`` tokens). Samba- or Hydra-style sparse global
  attention is just a pattern of these.
- ``ffn_types``: the feed-forward after each mixer: ``"mlp"`` (SwiGLU, or GPT-2's plain MLP with
  ``mlp_type="plain"``), ``"moe"``, ``"pkm"`` (product-key memory, ``pkm_*`` fields) or ``"none"``.

Llama-style stacks are the default (RMSNorm, RoPE in the attention layers, SwiGLU). ``norm_type="layer"``,
``absolute_position_embeddings=True`` with ``use_rope=False``, and ``mlp_type="plain"`` with GPT-2's ``hidden_act``
give GPT-2's block instead, which is what a student seeded from a GPT-2 teacher uses.

Jamba's period form is accepted instead of the lists: ``attn_layer_period`` / ``attn_layer_offset`` put an
attention layer wherever ``layer % period == offset`` (the other layers are ``ssm_type``), and
``expert_layer_period`` / ``expert_layer_offset`` put a MoE feed-forward likewise (the others are ``mlp``). Either
form gives the same stored lists; passing both forms is an error.

The mixers map onto transformers' cache vocabulary (``layer_types``): SSM layers are ``linear_attention`` (one conv
window and one recurrent state), attention layers ``full_attention`` or ``sliding_attention`` (keys and values), so
transformers' own ``DynamicCache`` / ``StaticCache`` build the hybrid cache from the config.

RoPE in the attention layers is set as transformers v5 sets it, by ``rope_parameters``: ``rope_type`` (every type
transformers has: "default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"), ``rope_theta``,
``partial_rotary_factor`` and the scaling keys of the type (``factor``, ``original_max_position_embeddings`` ...),
checked and computed by transformers' own RoPE code (ssm_hub.layers.attention); dynamic RoPE reads
``max_position_embeddings`` as the original context. Configs saved before it, with top-level ``rope_theta`` /
``partial_rotary_factor``, still load (those two are accepted as arguments and folded into it, and still read as
properties). ``base_model_tp_plan`` is transformers' tensor-parallel plan for the attention layers and dense MLPs.

Field names follow transformers' hybrids: Llama's for attention and the MLP, Jamba's and Qwen-MoE's for the
experts, Bamba's ``mamba_*`` names for the SSM layers. :meth:`ssm_config` turns the latter into the pure-SSM
config (``SsmHubMambaConfig`` / ``SsmHubMamba2Config``) whose mixer classes the SSM layers reuse, so their
checks and defaults are those of the pure-SSM models.
"""

from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import RopeParameters

from ssm_hub.layers.rope import RopeConfig, rope_config
from ssm_hub.models.config_base import (
    SsmHubConfig,
    require_choice,
    require_int_at_least,
    require_positive_float,
    require_positive_int,
)
from ssm_hub.models.hybrid.layer_layout import periodic_layers
from ssm_hub.models.mamba.configuration_mamba import SsmHubMambaConfig
from ssm_hub.models.mamba2.configuration_mamba2 import SsmHubMamba2Config

SSM_MIXERS = ("mamba", "mamba2")
ATTENTION_MIXERS = ("attention", "sliding_attention")
MIXER_TYPES = SSM_MIXERS + ATTENTION_MIXERS
FFN_TYPES = ("mlp", "moe", "pkm", "none")
# transformers' cache layer kind for each mixer.
CACHE_LAYER_TYPES = {
    "mamba": "linear_attention",
    "mamba2": "linear_attention",
    "attention": "full_attention",
    "sliding_attention": "sliding_attention",
}
# What rope_parameters holds when a key is not given: transformers' default RoPE over every channel of each head.
ROPE_DEFAULTS = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
# The RoPE fields that configs saved before rope_parameters store at the top level; accepted, and folded into it.
LEGACY_ROPE_FIELDS = ("rope_theta", "partial_rotary_factor")
ROUTER_SCORINGS = ("softmax", "sigmoid")
MLP_TYPES = ("swiglu", "plain")
NORM_TYPES = ("rms", "layer")



class SsmHubHybridConfig(SsmHubConfig):
    model_type = "ssm_hub_hybrid"
    # Stored as given; only layer_types is derived (from mixer_types).
    DERIVED_FIELDS = ("layer_types",)
    # Tensor parallelism (from_pretrained(..., tp_plan="auto")): Llama's plan for the attention layers (heads split
    # over the ranks) and the dense MLPs (gate / up split by columns, down by rows); the SSM mixers, the MoE and PKM
    # feed-forwards and the norms stay whole on every rank. A Mamba mixer cannot be split by transformers'
    # column / row styles: its in_proj packs z, x, B, C and dt (Mamba-1: x and z) into one output, its causal conv
    # runs over x, B and C together, B and C are shared by every head of a group, the gated RMSNorm reduces over
    # all inner channels, and Mamba-1's x_proj reduces over all of them too.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.feed_forward.gate_proj": "colwise",
        "layers.*.feed_forward.up_proj": "colwise",
        "layers.*.feed_forward.down_proj": "rowwise",
    }

    vocab_size: int = 65536
    hidden_size: int = 1024
    num_hidden_layers: int = 8
    # Layout: explicit lists, or Jamba's period form (turned into the lists).
    mixer_types: list[str] | None = None
    ffn_types: list[str] | None = None
    ssm_type: str = "mamba2"
    attn_layer_period: int | None = None
    attn_layer_offset: int | None = None
    expert_layer_period: int | None = None
    expert_layer_offset: int | None = None
    # Attention layers (Llama's names).
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_rope: bool = True
    # transformers v5's RoPE settings: {"rope_type": ..., "rope_theta": ..., "partial_rotary_factor": ..., and the
    # type's scaling keys} (the first head_dim * factor channels of each head rotate; Bamba: 0.5). Missing keys take
    # ROPE_DEFAULTS; transformers' standardisation adds original_max_position_embeddings (= max_position_embeddings)
    # for yarn, longrope and llama3 when it is not given.
    rope_parameters: RopeParameters | dict | None = None
    # Qwen3's / Persimmon's per-head norm (of norm_type) on queries and keys before RoPE.
    attention_qk_norm: bool = False
    max_position_embeddings: int = 262144
    sliding_window: int | None = None
    # Dense feed-forward: "swiglu" (Llama's gate / up / down projections, SiLU) or "plain" (GPT-2's: up, then
    # hidden_act, then down).
    mlp_type: str = "swiglu"
    intermediate_size: int = 4096
    hidden_act: str = "silu"
    mlp_bias: bool = False
    # Learned absolute position embeddings (GPT-2's), max_position_embeddings of them, added to the token embeddings.
    absolute_position_embeddings: bool = False
    # Mixture of experts (Jamba's and Qwen-MoE's names).
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    router_scoring: str = "softmax"
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int | None = None
    shared_expert_gate: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    output_router_logits: bool = False
    # Product-key memory (Lample et al.'s names, prefixed): pkm_num_keys ** 2 slots of hidden_size values.
    pkm_num_keys: int = 256
    pkm_heads: int = 4
    pkm_key_dim: int = 256
    pkm_topk: int = 32
    # SSM layers (Bamba's names), mapped onto the pure-SSM configs by ssm_config().
    mamba_d_state: int = 128
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_d_head: int = 64
    mamba_n_heads: int | None = None
    mamba_n_groups: int = 1
    mamba_chunk_size: int = 256
    mamba_dt_rank: str | int = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_inner_layernorms: bool = False  # Jamba's RMSNorms on dt, B and C (Mamba-1 layers)
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    # Shared.
    norm_type: str = "rms"  # the blocks' and the final norm: "rms" (RMSNorm) or "layer" (LayerNorm with a bias, GPT-2)
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        self.time_step_limit = tuple(self.time_step_limit)
        self._resolve_rope_parameters(kwargs)
        self._resolve_layout()
        super().__post_init__(**kwargs)
        self.check()

    def _resolve_rope_parameters(self, kwargs: dict) -> None:
        """Fill ``rope_parameters`` (a copy: the caller's dict is left alone) from ROPE_DEFAULTS, folding in the
        names used before it (popped from ``kwargs``): the top-level ``rope_theta`` / ``partial_rotary_factor`` of
        ssm_hub's earlier configs, transformers' ``rope_scaling`` (the dict's earlier name) and its ``type`` key
        (``rope_type``'s, dropped)."""
        name = type(self).__name__
        given = self.rope_parameters if self.rope_parameters is not None else {}
        scaling = kwargs.pop("rope_scaling", None)
        if scaling is not None:
            if given:
                raise ValueError(f"{name}: rope_scaling is the earlier name of rope_parameters; give one of them, "
                                 f"got rope_scaling={scaling!r} and rope_parameters={given!r}")
            given = scaling
        if not isinstance(given, dict):
            raise ValueError(f"{name}.rope_parameters must be a dict (rope_type, rope_theta, partial_rotary_factor) "
                             f"or None, got {given!r}")
        rope = dict(given)
        if "type" in rope:
            # As transformers reads it: rope_type wins where both are there (its standardisation keeps the old key,
            # e.g. Phi-3's "su" beside the "longrope" it stands for).
            rope.setdefault("rope_type", rope.pop("type"))
        for field in LEGACY_ROPE_FIELDS:
            if field not in kwargs:
                continue
            value = kwargs.pop(field)
            if field in rope and rope[field] != value:
                raise ValueError(f"{name}: {field}={value!r} disagrees with rope_parameters[{field!r}]="
                                 f"{rope[field]!r}; give it once, in rope_parameters")
            rope[field] = value
        self.rope_parameters = {**ROPE_DEFAULTS, **rope}

    @property
    def rope_theta(self) -> float:
        """``rope_parameters["rope_theta"]``, under the name configs used before rope_parameters."""
        return self.rope_parameters.get("rope_theta", ROPE_DEFAULTS["rope_theta"])

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters = {**self.rope_parameters, "rope_theta": value}

    @property
    def partial_rotary_factor(self) -> float:
        """``rope_parameters["partial_rotary_factor"]``, under the name configs used before rope_parameters."""
        return self.rope_parameters.get("partial_rotary_factor", ROPE_DEFAULTS["partial_rotary_factor"])

    @partial_rotary_factor.setter
    def partial_rotary_factor(self, value: float) -> None:
        self.rope_parameters = {**self.rope_parameters, "partial_rotary_factor": value}

    def _resolve_layout(self) -> None:
        """Turn the period form into the explicit lists (stored), defaulting to Jamba's 1 attention layer in 8."""
        require_positive_int(self, "num_hidden_layers")
        layers = self.num_hidden_layers
        periods = {"attn": (self.attn_layer_period, self.attn_layer_offset),
                   "expert": (self.expert_layer_period, self.expert_layer_offset)}
        lists = {"attn": ("mixer_types", self.mixer_types), "expert": ("ffn_types", self.ffn_types)}
        for kind, (period, offset) in periods.items():
            list_name, explicit = lists[kind]
            if explicit is not None and (period is not None or offset is not None):
                raise ValueError(f"SsmHubHybridConfig: give either {list_name} or {kind}_layer_period / "
                                 f"{kind}_layer_offset, not both")
        require_choice(self, "ssm_type", SSM_MIXERS)
        if self.mixer_types is None:
            period, offset = periods["attn"]
            if period is None and offset is None:
                period, offset = 8, 4
            attention = periodic_layers(layers, period, offset, "attn_layer_period", "attn_layer_offset",
                                        context="SsmHubHybridConfig.")
            self.mixer_types = ["attention" if i in attention else self.ssm_type for i in range(layers)]
        if self.ffn_types is None:
            period, offset = periods["expert"]
            if period is None and offset is None:
                self.ffn_types = ["mlp"] * layers
            else:
                experts = periodic_layers(layers, period, offset, "expert_layer_period", "expert_layer_offset",
                                          context="SsmHubHybridConfig.")
                self.ffn_types = ["moe" if i in experts else "mlp" for i in range(layers)]
        # The lists are what the config stores; the period form has done its work.
        self.mixer_types = list(self.mixer_types)
        self.ffn_types = list(self.ffn_types)
        self.attn_layer_period = self.attn_layer_offset = None
        self.expert_layer_period = self.expert_layer_offset = None
        for list_name, choices in (("mixer_types", MIXER_TYPES), ("ffn_types", FFN_TYPES)):
            values = getattr(self, list_name)
            if len(values) != layers:
                raise ValueError(f"SsmHubHybridConfig.{list_name} must have one entry per layer (num_hidden_layers = "
                                 f"{layers}), got {len(values)}: {values}")
            wrong = sorted({v for v in values if v not in choices}, key=str)
            if wrong:
                raise ValueError(f"SsmHubHybridConfig.{list_name} entries must be among {choices}, got {wrong}")

    @property
    def layer_types(self) -> list[str]:
        return [CACHE_LAYER_TYPES[mixer] for mixer in self.mixer_types]

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def check(self) -> None:
        """Raise ValueError on any inconsistent field."""
        name = type(self).__name__
        require_positive_int(self, "vocab_size", "hidden_size", "intermediate_size", "mamba_d_state",
                             "mamba_expand", "mamba_d_head", "mamba_n_groups", "mamba_chunk_size")
        require_int_at_least(self, "mamba_d_conv", 2)
        require_positive_float(self, "layer_norm_epsilon")
        require_choice(self, "mlp_type", MLP_TYPES)
        require_choice(self, "norm_type", NORM_TYPES)
        if self.mlp_type == "swiglu":
            require_choice(self, "hidden_act", ("silu",))
        elif self.hidden_act not in ACT2FN:
            raise ValueError(f"{name}.hidden_act must be one of transformers' activations ({sorted(ACT2FN)}), "
                             f"got {self.hidden_act!r}")
        if not isinstance(self.absolute_position_embeddings, bool):
            raise ValueError(f"{name}.absolute_position_embeddings must be a bool, "
                             f"got {self.absolute_position_embeddings!r}")
        if self.absolute_position_embeddings:
            require_positive_int(self, "max_position_embeddings")
        if not isinstance(self.attention_qk_norm, bool):
            raise ValueError(f"{name}.attention_qk_norm must be a bool, got {self.attention_qk_norm!r}")
        if any(mixer in ATTENTION_MIXERS for mixer in self.mixer_types):
            require_positive_int(self, "num_attention_heads", "num_key_value_heads")
            if self.num_attention_heads % self.num_key_value_heads != 0:
                raise ValueError(f"{name}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                                 f"num_key_value_heads ({self.num_key_value_heads})")
            if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(f"{name}: hidden_size ({self.hidden_size}) must be divisible by "
                                 f"num_attention_heads ({self.num_attention_heads}) when head_dim is not given")
            if self.head_dim is not None:
                require_positive_int(self, "head_dim")
            if self.use_rope:
                self.check_rope_parameters()
            if not 0.0 <= self.attention_dropout < 1.0:
                raise ValueError(f"{name}.attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if "sliding_attention" in self.mixer_types:
            require_positive_int(self, "sliding_window")
        if "moe" in self.ffn_types:
            require_positive_int(self, "num_experts", "num_experts_per_tok")
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(f"{name}: num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                                 f"num_experts ({self.num_experts})")
            if self.moe_intermediate_size is not None:
                require_positive_int(self, "moe_intermediate_size")
            if self.shared_expert_intermediate_size is not None:
                require_int_at_least(self, "shared_expert_intermediate_size", 0)
            require_choice(self, "router_scoring", ROUTER_SCORINGS)
            for coefficient in ("router_aux_loss_coef", "router_z_loss_coef"):
                value = getattr(self, coefficient)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f"{name}.{coefficient} must be a number >= 0, got {value!r}")
        if "pkm" in self.ffn_types:
            require_positive_int(self, "pkm_num_keys", "pkm_heads", "pkm_key_dim", "pkm_topk")
            if self.pkm_key_dim % 2:
                raise ValueError(f"{name}.pkm_key_dim must be even (it is split into two halves), "
                                 f"got {self.pkm_key_dim}")
            if self.pkm_topk > self.pkm_num_keys:
                raise ValueError(f"{name}: pkm_topk ({self.pkm_topk}) must not exceed pkm_num_keys "
                                 f"({self.pkm_num_keys})")
        for kind in SSM_MIXERS:
            if kind in self.mixer_types:
                try:
                    self.ssm_config(kind)  # the pure-SSM config checks its own fields
                except ValueError as error:
                    raise ValueError(f"{name}: the {kind} layers' fields (mamba_*, time_step_*) are inconsistent: "
                                     f"{error}") from error

    def check_rope_parameters(self) -> None:
        """Raise ValueError unless ``rope_parameters`` describes RoPE the attention layers implement: a rope_type of
        transformers' with its required keys and sound values, and a ``partial_rotary_factor`` leaving an even
        number (>= 2) of rotated channels per head (ssm_hub.layers.rope.rope_config, which names the key). The
        model checks again when it is built, as the config may have changed since."""
        rope_config(self.attention_head_dim, self.rope_parameters, self.max_position_embeddings,
                    owner=f"{type(self).__name__}.rope_parameters")

    def _validate_longrope_rope_parameters(self, rope_parameters: dict, ignore_keys: set | None = None) -> None:
        # transformers' save-time validation (validate_rope) runs this with the config itself, and it reads
        # config.head_dim, None here when the head size derives from hidden_size: run it with the head size set.
        view = RopeConfig(head_dim=self.attention_head_dim, max_position_embeddings=self.max_position_embeddings)
        view._validate_longrope_rope_parameters(rope_parameters, ignore_keys=ignore_keys)

    def ssm_config(self, kind: str):
        """The pure-SSM config of the ``kind`` ("mamba" or "mamba2") layers, from the ``mamba_*`` fields; the SSM
        mixers are built from it. Its checks name the pure-SSM fields: ``state_size`` is ``mamba_d_state``,
        ``head_dim`` / ``num_heads`` / ``n_groups`` / ``chunk_size`` are ``mamba_d_head`` / ``mamba_n_heads`` /
        ``mamba_n_groups`` / ``mamba_chunk_size``, ``conv_kernel`` is ``mamba_d_conv``, ``expand`` is
        ``mamba_expand``, ``time_step_rank`` is ``mamba_dt_rank``."""
        shared = dict(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers, vocab_size=self.vocab_size,
            state_size=self.mamba_d_state, expand=self.mamba_expand, conv_kernel=self.mamba_d_conv,
            use_bias=self.mamba_proj_bias, use_conv_bias=self.mamba_conv_bias,
            layer_norm_epsilon=self.layer_norm_epsilon, residual_in_fp32=self.residual_in_fp32,
            initializer_range=self.initializer_range, rescale_prenorm_residual=self.rescale_prenorm_residual,
            time_step_min=self.time_step_min, time_step_max=self.time_step_max, time_step_floor=self.time_step_floor,
        )
        if kind == "mamba":
            return SsmHubMambaConfig(
                **shared, time_step_rank=self.mamba_dt_rank, inner_layernorms=self.mamba_inner_layernorms
            )
        if kind == "mamba2":
            return SsmHubMamba2Config(**shared, head_dim=self.mamba_d_head, num_heads=self.mamba_n_heads,
                                      n_groups=self.mamba_n_groups, chunk_size=self.mamba_chunk_size,
                                      time_step_limit=self.time_step_limit)
        raise ValueError(f"ssm_config: kind must be one of {SSM_MIXERS}, got {kind!r}")
