"""The training recipe schema: a YAML file of four sections, checked key by key, with command-line overrides.

    model:     {type: ssm_hub_mamba2, config: {hidden_size: 64, ...}}   # from scratch, or
               {pretrained: path-or-hub-id}                             # fine-tune
    tokenizer: {pretrained: path-or-hub-id} or {train_bpe: 512}         # a byte-level BPE trained on the data
    data:      {files: [a.txt, b.jsonl]} or {dataset: name, split: train} or {builtin: python_docs | mqar};
               seq_len, text_field, eval_fraction, max_documents
    train:     TrainingArguments fields (output_dir, max_steps, learning_rate, ...), and overwrite_output_dir: true
               to replace what an earlier run wrote into output_dir (ssm_hub.training.run.check_before_work)
    lora:      LoraConfig fields, optional (LoRA fine-tuning)

Overrides use dotted keys and YAML values: ``train.max_steps=20 model.config.hidden_size=128``. An unknown key or a
value of the wrong type is a ValueError that names the key; ``train`` and ``lora`` are checked against the
fields of transformers' TrainingArguments and PEFT's LoraConfig. A recipe file that is not valid YAML is named
with the line and column, a data file that is not UTF-8 with the offset, before any work.
"""

import codecs
import dataclasses
import difflib
import enum
import hashlib
import json
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

    def check_files(self) -> None:
        """Each of data.files exists, is .txt / .json / .jsonl and is UTF-8 text: checked where a run starts, before
        any work (a recipe may name files of the machine it runs on, so loading it does not check them)."""
        for name in self.files:
            _check_data_file(Path(name))


DATA_FILE_SUFFIXES = (".txt", ".json", ".jsonl")


def _check_data_file(path: Path) -> None:
    """A data file must exist, be .txt / .json / .jsonl and be UTF-8 text: said before any work, naming the file."""
    if path.is_dir():
        raise ValueError(f"data.files: {path} is a folder: name the text files in it")
    if not path.is_file():
        raise ValueError(f"data.files: {path} is not a file")
    if path.suffix not in DATA_FILE_SUFFIXES:
        raise ValueError(f"data.files: {path} is neither .txt, .json nor .jsonl")
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks, decoded with this one
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                position = offset - pending + error.start
                raise ValueError(f"data.files: {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at "
                                 f"offset {position}): convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 "
                                 f"{path} > {path.stem}.utf8{path.suffix}") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"data.files: {path} is not UTF-8 text (it ends inside a character): convert it to "
                             "UTF-8") from None


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
        _check_fields("train", self.train, set(fields) | set(TRAIN_KEYS_OF_SSM_HUB))
        for key, value in self.train.items():
            if key == "resume_from_checkpoint" and isinstance(value, bool):
                continue  # Trainer reads true as "the latest checkpoint in output_dir"
            annotation = TRAIN_KEYS_OF_SSM_HUB.get(key) or fields[key]
            self.train[key] = _checked_value(f"train.{key}", value, annotation)
        for key in NON_NEGATIVE_TRAIN_KEYS:
            if key in self.train and self.train[key] < 0:
                raise ValueError(f"train.{key} must be at least 0, got {self.train[key]}")
        if "output_dir" not in self.train:
            raise ValueError("train.output_dir is required: checkpoints, logs and the loss curve go there")
        if self.train.get("overwrite_output_dir") and self.train.get("resume_from_checkpoint"):
            raise ValueError("train.overwrite_output_dir and train.resume_from_checkpoint contradict each other: "
                             "overwriting removes the checkpoints a resume needs; give one of them")
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


NON_NEGATIVE_TRAIN_KEYS = ("learning_rate", "weight_decay")
"""TrainingArguments fields that it takes at any value and the optimizer refuses when negative, after the data work."""

TRAIN_KEYS_OF_SSM_HUB = {"overwrite_output_dir": bool}
"""train keys that ssm-hub train reads itself, beside TrainingArguments' fields: overwrite_output_dir lets a run
replace what an earlier ``ssm-hub train`` wrote into output_dir (ssm_hub.output_folder)."""

MAY_CHANGE_ON_RESUME = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_steps",
                        "num_train_epochs", "logging_steps", "save_steps", "eval_steps", "save_total_limit",
                        "report_to", "dataloader_num_workers", "per_device_eval_batch_size")
"""train keys a resumed run may change (how long it runs, how often it logs and saves); any other change to the
recipe makes it a different run, which ``resume_from_checkpoint`` refuses."""


def recipe_record(recipe: "Recipe") -> dict:
    """{"recipe": the recipe as plain data, "recipe_sha256": the hash of what makes it the same run (everything but
    MAY_CHANGE_ON_RESUME)}: recorded beside the checkpoints, so that a resume can check that they are its own."""
    values = {"model": dataclasses.asdict(recipe.model), "tokenizer": dataclasses.asdict(recipe.tokenizer),
              "data": dataclasses.asdict(recipe.data), "train": dict(recipe.train), "lora": recipe.lora}
    values = json.loads(json.dumps(values, default=str))
    identity = _identity(values)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"recipe": values, "recipe_sha256": digest}


def _identity(values: dict) -> dict:
    return {**values, "train": {key: value for key, value in values["train"].items()
                                if key not in MAY_CHANGE_ON_RESUME}}


def recipe_differences(earlier: dict, now: dict) -> list[str]:
    """'key: earlier value -> value now' for each dotted key where two recipe records (:func:`recipe_record`'s
    "recipe") differ in what makes a run."""
    def flat(values, prefix=""):
        if not isinstance(values, dict):
            return {prefix: values}
        return {key: value for name, child in values.items() for key, value in flat(child, f"{prefix}{name}.").items()}

    def shown(values, key):
        return repr(values[key]) if key in values else "unset"

    before, after = flat(_identity(earlier)), flat(_identity(now))
    return [f"{key.rstrip('.')}: {shown(before, key)} then, {shown(after, key)} now"
            for key in sorted(before.keys() | after.keys()) if before.get(key, ...) != after.get(key, ...)]


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

    check_model_type(model_type)
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
    try:  # the config class's own checks of the values (the tokenizer's ids come later, from the data)
        AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.config: {error}") from None


def check_model_type(model_type: str) -> None:
    """model.type must be a registered model type; the error lists ssm_hub's and the closest names, not the hundreds
    that transformers registers."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import ssm_hub  # noqa: F401  (registers the ssm_hub model types)

    if model_type in CONFIG_MAPPING:
        return
    known = list(CONFIG_MAPPING.keys())
    ours = sorted(name for name in known if name.startswith("ssm_hub_"))
    closest = difflib.get_close_matches(str(model_type), known, n=3, cutoff=0.6)
    raise ValueError(f"model.type {model_type!r} is not a registered model type: ssm_hub's are {', '.join(ours)}"
                     + (f"; the closest names are {', '.join(closest)}" if closest else "")
                     + " (any transformers model type, such as llama, works too)")


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
    shipped = importlib.resources.files("ssm_hub.recipes")
    shipped = shipped / subfolder if subfolder else shipped
    available = sorted(entry.name.removesuffix(".yaml") for entry in shipped.iterdir() if entry.name.endswith(".yaml"))
    if path.is_dir():
        raise ValueError(f"{what} {str(name)!r} is a folder: give a {what} YAML file in it, or the name of a shipped "
                         f"{what} ({', '.join(available)})")
    if path.suffix or len(path.parts) > 1:
        raise ValueError(f"{what} file {str(name)!r} not found (from {Path.cwd()}): check the path, or give the name "
                         f"of a shipped {what} ({', '.join(available)})")
    candidate = shipped / f"{path.name}.yaml"
    if candidate.is_file():
        return Path(str(candidate))
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
        try:
            node[leaf] = _parse_yaml(text)
        except yaml.YAMLError as error:
            raise ValueError(f"override {override!r}: its value is not valid YAML ({_yaml_problem(error)}): quote "
                             "it, e.g. key='value'") from None
    return raw


def _yaml_problem(error: yaml.YAMLError) -> str:
    return " ".join(str(getattr(error, "problem", None) or error).split())


def read_recipe_file(path: str | Path):
    """The YAML at ``path``; a syntax error or a file that is not UTF-8 is a ValueError naming the file, and for
    syntax the line and column."""
    try:
        with open(path, encoding="utf-8") as file:
            return _parse_yaml(file)
    except UnicodeDecodeError as error:
        raise ValueError(f"recipe file {path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start}): save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: not valid YAML ({_yaml_problem(error)}): fix the recipe's syntax there") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), raw: dict | None = None) -> Recipe:
    """The recipe at ``path`` (or the mapping ``raw``) with ``overrides`` applied, checked."""
    if raw is None:
        raw = read_recipe_file(path) or {}
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
