"""The training recipe schema: a YAML file of four sections, checked key by key, with command-line overrides.

    model:     {type: ssm_hub_mamba2, config: {hidden_size: 64, ...}}   # from scratch, or
               {pretrained: path-or-hub-id}                             # fine-tune
    tokenizer: {pretrained: path-or-hub-id} or {train_bpe: 512}         # a byte-level BPE trained on the data
    data:      {files: [a.txt, b.jsonl]} or {dataset: name, split: train} or {builtin: python_docs | mqar};
               seq_len, text_field, eval_fraction, max_documents
    train:     TrainingArguments fields (output_dir, max_steps, learning_rate, ...)
    lora:      LoraConfig fields, optional (LoRA fine-tuning)

Overrides use dotted keys and YAML values: ``train.max_steps=20 model.config.hidden_size=128``. An unknown key or a
value of the wrong type is a ValueError that names the key; ``train`` and ``lora`` are checked against the
fields of transformers' TrainingArguments and PEFT's LoraConfig.
"""

import dataclasses
import enum
import importlib.resources
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# text that ships with Python; ssm_hub.training.mqar's recall task; ssm_hub.training.shapes' captioned scenes (for
# ssm_hub_multimodal models: max_documents scenes, eval_fraction of that many more held out)
BUILTIN_DATA = ("python_docs", "mqar", "shapes")
MODEL_DTYPES = ("float32", "bfloat16", "float16")


class _YamlLoader(yaml.SafeLoader):
    """Reads scalars as YAML 1.2 does, not 1.1: ``1e-3`` (no dot) is a number, and only true / false are booleans,
    so ``eval_strategy: no`` and ``train.save_strategy=no`` reach TrainingArguments as the string it expects."""


_BOOL = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?(?:\d[\d_]*\.\d*|\.\d+)(?:[eE][-+]?\d+)?$"),
    list("-+0123456789."),
)


def _parse_yaml(text):
    return yaml.load(text, Loader=_YamlLoader)


@dataclass
class ModelSection:
    type: str | None = None  # a registered model_type, for training from scratch
    config: dict = field(default_factory=dict)  # fields of that type's config class
    pretrained: str | None = None  # a folder or Hub id to fine-tune
    dtype: str = "float32"  # of the weights being trained (mixed precision is train.bf16 / train.fp16)

    def check(self) -> None:
        if (self.type is None) == (self.pretrained is None):
            raise ValueError("model: give exactly one of model.type (train from scratch) or model.pretrained")
        if self.pretrained is not None and self.config:
            raise ValueError("model.config sets a new model's fields; with model.pretrained it would be ignored")
        if self.dtype not in MODEL_DTYPES:
            raise ValueError(f"model.dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        if self.type is not None:
            _check_model_config(self.type, self.config)


@dataclass
class TokenizerSection:
    pretrained: str | None = None  # a folder or Hub id
    train_bpe: int | None = None  # vocabulary size of a byte-level BPE trained on the training text
    characters: bool = False  # one token per character of the training text (character-level models)

    def check(self) -> None:
        given = [name for name, value in (("pretrained", self.pretrained), ("train_bpe", self.train_bpe),
                                          ("characters", self.characters or None)) if value is not None]
        if len(given) != 1:
            raise ValueError("tokenizer: give exactly one of tokenizer.pretrained, tokenizer.train_bpe or "
                             f"tokenizer.characters: true (given: {given or 'none'})")
        if self.train_bpe is not None and self.train_bpe < 260:
            raise ValueError(f"tokenizer.train_bpe must be at least 260 (256 bytes + merges), got {self.train_bpe}")


@dataclass
class DataSection:
    files: list[str] = field(default_factory=list)  # .txt (one document per blank-line-separated block), .json/.jsonl
    dataset: str | None = None  # a datasets name (Hub or local loading script/folder)
    dataset_config: str | None = None  # its configuration name, e.g. wikitext-2-raw-v1
    builtin: str | None = None  # text that ships with Python, for offline recipes
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 256
    eval_fraction: float = 0.05
    max_documents: int | None = None

    def check(self) -> None:
        sources = [name for name in ("files", "dataset", "builtin") if getattr(self, name)]
        if len(sources) != 1:
            raise ValueError(f"data: give exactly one of data.files, data.dataset or data.builtin, got {sources}")
        if self.builtin is not None and self.builtin not in BUILTIN_DATA:
            raise ValueError(f"data.builtin must be one of {BUILTIN_DATA}, got {self.builtin!r}")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents must be at least 1 (or null for all), got {self.max_documents}")


@dataclass
class Recipe:
    model: ModelSection
    tokenizer: TokenizerSection
    data: DataSection
    train: dict
    lora: dict | None = None

    def check(self) -> None:
        for section in (self.model, self.tokenizer, self.data):
            section.check()
        fields = _training_argument_fields()
        _check_fields("train", self.train, set(fields))
        for key, value in self.train.items():
            if key == "resume_from_checkpoint" and isinstance(value, bool):
                continue  # Trainer reads true as "the latest checkpoint in output_dir"
            self.train[key] = _checked_value(f"train.{key}", value, fields[key])
        if "output_dir" not in self.train:
            raise ValueError("train.output_dir is required: checkpoints, logs and the loss curve go there")
        if self.data.eval_fraction == 0 and self.train.get("eval_strategy", "no") != "no":
            raise ValueError(f"train.eval_strategy = {self.train['eval_strategy']!r} evaluates held-out data, but "
                             "data.eval_fraction = 0 holds none out: set one of them")
        if self.lora is not None:
            lora_fields = _lora_fields()
            _check_fields("lora", self.lora, set(lora_fields))
            if "task_type" in self.lora:
                raise ValueError("lora.task_type is set by ssm-hub train (CAUSAL_LM); remove it")
            for key, value in self.lora.items():
                self.lora[key] = _checked_value(f"lora.{key}", value, lora_fields[key])


def _init_fields(cls) -> dict[str, Any]:
    """A dataclass's init fields and their annotations, resolved where the class writes them as strings."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: keep the raw ones, which the checks then skip
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls) if f.init}


def _training_argument_fields() -> dict[str, Any]:
    from transformers import TrainingArguments

    return _init_fields(TrainingArguments)


def _lora_fields() -> dict[str, Any]:
    from peft import LoraConfig

    return _init_fields(LoraConfig)


def _check_model_config(model_type: str, values: dict) -> None:
    """model.config keys must be fields of the model type's config class (a config takes unknown ones silently)."""
    from transformers import AutoConfig

    import ssm_hub  # noqa: F401  (registers the ssm_hub model types)

    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError as error:
        raise ValueError(f"model.type: {error}") from None
    known = set(defaults.to_dict())
    for klass in type(defaults).__mro__:
        known |= set(getattr(klass, "__annotations__", {}))
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in model.config for {model_type}: "
                         f"{', '.join(f'model.config.{k}' for k in unknown)}")


def _checked_value(path: str, value, annotation):
    """``value`` checked against a dataclass field's annotation where it is made of plain types (Literal and other
    typing constructs are left to the class), and against the values of an Enum among them."""
    members = _members(annotation)
    if not all(isinstance(member, type) for member in members):
        return value
    enums = [member for member in members if issubclass(member, enum.Enum)]
    if enums and isinstance(value, str) and not isinstance(value, enum.Enum):
        allowed = [item.value for klass in enums for item in klass]
        if value not in allowed:
            raise ValueError(f"{path} must be one of {allowed}, got {value!r}")
        return value
    return _typed(path, value, annotation)


def _check_fields(section: str, values: dict, known: set[str]) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) in {section}: {', '.join(f'{section}.{k}' for k in unknown)}")


_SECTIONS = {"model": ModelSection, "tokenizer": TokenizerSection, "data": DataSection}


def _members(annotation) -> tuple[type, ...]:
    """The plain types a field annotation accepts: ``int | None`` -> (int, NoneType), ``list[str]`` -> (list,)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(typing.get_origin(a) or a for a in typing.get_args(annotation))
    return (typing.get_origin(annotation) or annotation,)


def _typed(path: str, value, annotation) -> Any:
    """``value`` checked against a field annotation (int, float, str, bool, list, dict, optional of those)."""
    allowed = _members(annotation)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in allowed:
        raise ValueError(f"{path} must be of type {_describe(allowed)}, got {value!r}")
    if not isinstance(value, tuple(a for a in allowed if a is not type(None))):
        raise ValueError(f"{path} must be of type {_describe(allowed)}, got {value!r} ({type(value).__name__})")
    return value


def _describe(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _section(name: str, values) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{name} must be a mapping, got {values!r}")
    cls = _SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) in {name}: {', '.join(f'{name}.{k}' for k in unknown)} "
                         f"(known: {', '.join(sorted(fields))})")
    return cls(**{key: _typed(f"{name}.{key}", value, fields[key].type) for key, value in values.items()})


def shipped_file(name: str | Path, what: str, subfolder: str = "") -> Path:
    """``name`` if it is a file; else, for a bare name, the YAML of that name shipped in ssm_hub.recipes (or its
    ``subfolder``). A path that does not exist is an error, never replaced by a shipped namesake."""
    path = Path(name)
    if path.is_file():
        return path
    if path.suffix or len(path.parts) > 1:
        raise ValueError(f"{what} file {str(name)!r} not found")
    shipped = importlib.resources.files("ssm_hub.recipes")
    shipped = shipped / subfolder if subfolder else shipped
    candidate = shipped / f"{path.name}.yaml"
    if candidate.is_file():
        return Path(str(candidate))
    available = sorted(entry.name.removesuffix(".yaml") for entry in shipped.iterdir() if entry.name.endswith(".yaml"))
    raise ValueError(f"no {what} file {str(name)!r} and no shipped {what} of that name (shipped: {available})")


def recipe_path(name: str | Path) -> Path:
    """A recipe file: ``name`` itself if it is a file, else the recipe of that name shipped in ssm_hub.recipes."""
    return shipped_file(name, "recipe")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` with each ``dotted.key=value`` override set (the value parsed as YAML); new keys are allowed here and
    checked with the rest."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"an override must look like section.key=value, got {override!r}")
        node = raw
        *parents, leaf = key.split(".")
        for index, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {override!r}: {'.'.join(parents[:index + 1])} is not a mapping")
            node = child
        node[leaf] = _parse_yaml(text)
    return raw


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), raw: dict | None = None) -> Recipe:
    """The recipe at ``path`` (or the mapping ``raw``) with ``overrides`` applied, checked."""
    if raw is None:
        with open(path, encoding="utf-8") as file:
            raw = _parse_yaml(file) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides))
    known = {"model", "tokenizer", "data", "train", "lora"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown} (known: {sorted(known)})")
    missing = sorted({"model", "tokenizer", "data", "train"} - set(raw))
    if missing:
        raise ValueError(f"the recipe has no {', '.join(missing)} section")
    for name in ("train", "lora"):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise ValueError(f"{name} must be a mapping, got {raw[name]!r}")
    recipe = Recipe(
        model=_section("model", raw["model"]), tokenizer=_section("tokenizer", raw["tokenizer"]),
        data=_section("data", raw["data"]), train=dict(raw["train"]), lora=raw.get("lora"),
    )
    recipe.check()
    return recipe
