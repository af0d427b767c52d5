"""The engine of checkpoint conversion: declarative maps of config fields and weights, and their checked application.

A weight map is a tuple of :class:`WeightRule`: a source key pattern, the target key it becomes, and the shape the
tensor must have as a function of the config; ``{i}`` stands for a layer index and expands over
``range(config.num_hidden_layers)``. :func:`apply_weight_map` checks a whole state dict against a map and raises
one ``ValueError`` that lists every unknown source key, every missing key and every mis-shaped tensor, so a bad
checkpoint is diagnosed in one run and no tensor is ever dropped silently.

A config map is a tuple of :class:`ConfigField`: a field of the source config.json (a dotted path such as
``ssm_cfg.d_state`` for mamba_ssm's nested dict), the target field it becomes (``None``: dropped, with the reason),
the value the source format assumes when the field is absent, and the values the target can express.
:func:`apply_config_map` turns a source config.json into keyword arguments for the target config class.

A :class:`ConversionMap` pairs the two. Each family's maps live in a module of their own beside this one: ``mamba``
(transformers' Mamba and Mamba2, and ssm_hub's own), ``mamba_ssm``, ``hybrid`` (ssm_hub_hybrid's own), ``jamba`` and
``bamba``; ``checkpoint`` picks one for a checkpoint and writes the result.
"""

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedConfig


def always(config) -> bool:
    return True


def _any_value(value) -> bool:
    return True


@dataclass(frozen=True)
class WeightRule:
    """One tensor: where it is in the source, where it goes, and the shape it must have.

    ``present_if`` says whether the config has this tensor at all (a bias only with ``use_bias``); a tensor whose
    condition is false must be absent from the source, else it is reported as unknown. ``tied_to`` names the target
    key this tensor equals when ``config.tie_word_embeddings``: then the source may omit it, and if it has it, it
    must be equal to the tensor it is tied to.
    """

    source: str
    target: str
    shape: Callable[[Any], tuple[int, ...]]
    present_if: Callable[[Any], bool] = always
    tied_to: str | None = None


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()
"""``ConfigField.default`` for a field that the source format requires (no default)."""


@dataclass(frozen=True)
class ConfigField:
    """One field of a source config.json and what becomes of it.

    ``source`` is a key of the source config.json, dotted for nested dicts (``"ssm_cfg.d_state"``), or ``None`` for a
    value the source format fixes without storing it (then ``default`` is that value). ``target`` is the target
    config's field, or ``None`` when the field is dropped; ``reason`` says why. ``default`` is what the source format
    assumes when the field is absent. ``supported`` accepts the values the target can express; any other value raises
    a ValueError quoting ``reason``.
    """

    source: str | None
    target: str | None
    default: Any = ABSENT
    supported: Callable[[Any], bool] = _any_value
    reason: str = ""


@dataclass(frozen=True)
class SizeFromWeight:
    """A target config field read from a tensor's shape instead of the source config (mamba_ssm's padded vocab)."""

    target: str
    weight: str
    dim: int


@dataclass(frozen=True)
class ConversionMap:
    """Everything needed to turn one checkpoint format into another: config fields and weights.

    ``weights`` is a tuple of rules, or a function of the target config that returns them (a hybrid's tensors
    depend on its layer layout). ``finish`` derives the target fields that no single source field gives (Jamba's
    period form from ssm_hub's per-layer lists, and back): it receives the flattened source config and the target
    keyword arguments built so far, returns the final keyword arguments, and raises ValueError for a layout the
    target cannot express. ``prepare_weights`` turns the source state dict into the tensors the rules name
    before they are checked (Jamba's checkpoints store each expert's projections apart; the rules name the fused
    3-D tensors).
    """

    description: str
    config_fields: tuple[ConfigField, ...]
    weights: tuple[WeightRule, ...] | Callable[[Any], tuple[WeightRule, ...]]
    sizes_from_weights: tuple[SizeFromWeight, ...] = ()
    finish: Callable[[dict, dict], dict] | None = None
    prepare_weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def weight_rules(self, config) -> tuple[WeightRule, ...]:
        return self.weights(config) if callable(self.weights) else self.weights

    def prepared(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.prepare_weights(state_dict) if self.prepare_weights is not None else state_dict


def with_source_names(rules: tuple[WeightRule, ...], sources: Mapping[str, str]) -> tuple[WeightRule, ...]:
    """``rules`` with the source key of the rules targeting each key of ``sources`` replaced by its value."""
    targets = {rule.target for rule in rules}
    unused = sorted(set(sources) - targets)
    if unused:
        raise ValueError(f"with_source_names: no rule targets {unused}")
    return tuple(replace(rule, source=sources.get(rule.target, rule.source)) for rule in rules)


GENERIC_FIELDS = frozenset(PreTrainedConfig().to_dict()) - {
    "_name_or_path", "architectures", "dtype", "model_type", "transformers_version",
}
"""Settings every transformers config has (return_dict, id2label ...): passed through unchanged."""


def same_fields(names: tuple[str, ...], defaults_from: type, but: tuple[str, ...] = ()) -> tuple[ConfigField, ...]:
    # A field absent from a config.json has the value its config class gives it, so that is the default.
    return tuple(ConfigField(name, name, default=getattr(defaults_from, name)) for name in names if name not in but)


def dropped(names: tuple[str, ...], reason: str) -> tuple[ConfigField, ...]:
    return tuple(ConfigField(name, None, reason=reason) for name in names)


REWRITTEN_ON_SAVE = dropped(
    ("_name_or_path", "architectures", "auto_map", "model_type", "transformers_version"),
    "describes the source checkpoint; save_pretrained writes the target's own",
)
DTYPE_FIELDS = dropped(
    ("dtype", "torch_dtype"), "the written tensors set the dtype (convert_checkpoint's dtype argument casts them)"
)


def equals(expected) -> Callable[[Any], bool]:
    """A ``ConfigField.supported`` that accepts ``expected`` only."""
    return lambda value: value == expected


def only_at(name: str, expected, reason: str) -> ConfigField:
    """A source field the target can hold only at ``expected``: dropped then, an error naming ``reason`` else."""
    return ConfigField(name, None, default=expected, supported=equals(expected), reason=reason)


def apply_config_map(
    source_config: Mapping[str, Any],
    conversion_map: ConversionMap,
    weight_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the target config class, from a source config.json loaded as a dict.

    ``weight_shapes`` (source key -> shape) supplies the fields in ``conversion_map.sizes_from_weights``. Raises one
    ValueError listing every missing required field and every value the target cannot express. Fields that the map
    does not know are ignored with a warning that names them.
    """
    nested = {field.source.split(".", 1)[0]
              for field in conversion_map.config_fields if field.source and "." in field.source}
    flat = _flatten(source_config, nested)
    target_kwargs: dict[str, Any] = {}
    problems = []
    known = set()
    for field in conversion_map.config_fields:
        if field.source is None:
            value = field.default
        elif field.source in flat:
            known.add(field.source)
            value = flat[field.source]
        elif field.default is ABSENT:
            if field.target is not None:
                problems.append(f"{field.source}: required (becomes {field.target}) but absent")
            continue
        else:
            value = field.default
        if not field.supported(value):
            problems.append(f"{field.source} = {value!r} is not supported: {field.reason}")
        elif field.target is not None:
            target_kwargs[field.target] = value
    if not problems and conversion_map.finish is not None:
        try:
            target_kwargs = conversion_map.finish(flat, dict(target_kwargs))
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ValueError(
            f"cannot convert the config ({conversion_map.description}):\n  " + "\n  ".join(problems)
        )
    for size in conversion_map.sizes_from_weights:
        if weight_shapes is not None and size.weight in weight_shapes:
            target_kwargs[size.target] = weight_shapes[size.weight][size.dim]
    for name in GENERIC_FIELDS & flat.keys():
        target_kwargs[name] = flat[name]
        known.add(name)
    ignored = sorted(set(flat) - known - nested)
    if ignored:
        warnings.warn(
            f"{conversion_map.description}: ignoring config fields that this conversion does not know: {ignored}",
            stacklevel=2,
        )
    return target_kwargs


def _flatten(config: Mapping[str, Any], nested: set[str]) -> dict[str, Any]:
    flat = dict(config)
    for name in nested:
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"config field {name} must be a JSON object, got {value!r}")
        flat.update({f"{name}.{key}": item for key, item in value.items()})
    return flat


@dataclass(frozen=True)
class _ExpectedTensor:
    source: str
    target: str
    shape: tuple[int, ...]
    tied_to: str | None


def apply_weight_map(
    state_dict: Mapping[str, torch.Tensor], rules: tuple[WeightRule, ...], config
) -> dict[str, torch.Tensor]:
    """Rename ``state_dict`` by ``rules``, checking every key and shape against ``config``.

    ``config`` has transformers' field names (hidden_size, num_hidden_layers ...). Returns a dict holding every
    target key; a tied tensor that the source omitted is filled with the tensor it is tied to, so the result loads
    into the target model with ``strict=True``. Raises one ValueError listing every unknown source key, every
    missing key, every mis-shaped tensor and every tied tensor that differs from its partner.
    """
    expected = _expand(rules, config)
    tied = config.tie_word_embeddings
    converted: dict[str, torch.Tensor] = {}
    missing: list[_ExpectedTensor] = []
    misshaped: list[tuple[_ExpectedTensor, tuple[int, ...]]] = []
    for tensor_spec in expected:
        tensor = state_dict.get(tensor_spec.source)
        if tensor is None:
            if not (tied and tensor_spec.tied_to):
                missing.append(tensor_spec)
        elif tuple(tensor.shape) != tensor_spec.shape:
            misshaped.append((tensor_spec, tuple(tensor.shape)))
        else:
            converted[tensor_spec.target] = tensor
    differing_ties = []
    for tensor_spec in expected:
        if not (tied and tensor_spec.tied_to) or tensor_spec.tied_to not in converted:
            continue
        partner = converted[tensor_spec.tied_to]
        own = converted.get(tensor_spec.target)
        if own is not None and not torch.equal(own.to(partner.dtype), partner):
            differing_ties.append(
                f"{tensor_spec.source} differs from the tensor it is tied to ({tensor_spec.tied_to}) although "
                f"tie_word_embeddings is true: untie the config or drop the tensor"
            )
        converted[tensor_spec.target] = partner
    unknown = sorted(set(state_dict) - {tensor_spec.source for tensor_spec in expected})

    problems = []
    if unknown:
        problems.append("unknown source keys (no rule maps them):")
        problems += [f"  {line}" for line in _collapse_layers(unknown)]
    if missing:
        problems.append("missing keys:")
        problems += [f"  {line}" for line in _collapse_layers(_describe_key(spec) for spec in missing)]
    if misshaped:
        problems.append("mis-shaped tensors:")
        problems += [f"  {line}" for line in _collapse_layers(
            f"{spec.source}: expected shape {list(spec.shape)}, got {list(got)}" for spec, got in misshaped
        )]
    if differing_ties:
        problems.append("tied tensors that differ:")
        problems += [f"  {line}" for line in differing_ties]
    if problems:
        raise ValueError("the checkpoint does not match the weight map:\n" + "\n".join(problems))
    return converted


def _expand(rules: tuple[WeightRule, ...], config) -> list[_ExpectedTensor]:
    expected = []
    for rule in rules:
        if ("{i}" in rule.source) != ("{i}" in rule.target):
            raise ValueError(f"WeightRule {rule.source} -> {rule.target}: '{{i}}' must be in both patterns or neither")
        if not rule.present_if(config):
            continue
        shape = tuple(rule.shape(config))
        layers = range(config.num_hidden_layers) if "{i}" in rule.source else [None]
        for layer in layers:
            expected.append(_ExpectedTensor(
                rule.source.replace("{i}", str(layer)), rule.target.replace("{i}", str(layer)), shape, rule.tied_to
            ))
    return expected


def _describe_key(spec: _ExpectedTensor) -> str:
    return spec.source if spec.source == spec.target else f"{spec.source} (becomes {spec.target})"


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _collapse_layers(lines) -> list[str]:
    """Merge lines that differ only in a layer index into ``x.layers.{i}.y (layers 0-23)``, in first-seen order."""
    layers_by_pattern: dict[str, list[int]] = {}
    for line in lines:
        match = _LAYER_INDEX.search(line)
        if match is None:
            layers_by_pattern.setdefault(line, [])
        else:
            pattern = line[:match.start()] + ".layers.{i}." + line[match.end():]
            layers_by_pattern.setdefault(pattern, []).append(int(match.group(1)))
    return [pattern.replace("{i}", str(layers[0])) if len(layers) == 1
            else pattern if not layers else f"{pattern} (layers {_ranges(sorted(set(layers)))})"
            for pattern, layers in layers_by_pattern.items()]


def _ranges(numbers: list[int]) -> str:
    spans = []
    start = previous = numbers[0]
    for number in numbers[1:] + [None]:
        if number is not None and number == previous + 1:
            previous = number
            continue
        spans.append(str(start) if start == previous else f"{start}-{previous}")
        if number is not None:
            start = previous = number
    return ", ".join(spans)
