"""Convert Mamba / Mamba-2 / hybrid checkpoints between mamba_ssm's, transformers' and ssm_hub's formats.

    from ssm_hub.conversion.formats.checkpoint import convert_checkpoint
    convert_checkpoint("state-spaces/mamba-130m-hf", "mamba-130m-ssm-hub")            # -> ssm_hub_mamba
    convert_checkpoint("mamba-130m-ssm-hub", "mamba-130m-transformers", to="mamba")  # -> transformers' MambaForCausalLM
    convert_checkpoint("ai21labs/Jamba-tiny-dev", "jamba-tiny-ssm-hub")               # -> ssm_hub_hybrid
    convert_checkpoint("jamba-tiny-ssm-hub", "jamba-tiny-transformers", to="jamba")   # -> transformers' JambaForCausalLM

or from a shell: ``ssm-hub convert SRC OUT [--to ssm_hub|mamba|mamba2|jamba|bamba] [--dtype bfloat16]``.

Every conversion goes through ssm_hub's format: source -> ssm_hub config and weights (checked by the declarative maps
of the family modules beside this one: mamba, mamba_ssm, hybrid, jamba, bamba; see engine) -> optionally transformers'
format. Weights are read from safetensors only: ssm_hub never unpickles a ``pytorch_model.bin``. The output is written
by the target model class's own ``save_pretrained``, so an ssm_hub checkpoint carries its ``auto_map`` and code. The
source's tokenizer, chat templates and generation settings are copied beside it (a source without a tokenizer is said
so, in a warning), and :func:`describe_checkpoint` sums up what a folder holds. Every function here (and in seeding)
that writes a model folder writes it into a staging folder first and moves it into place once complete
(ssm_hub.output_folder.staged_model_folder): an interrupted call leaves no half-written model that loads.
"""

import json
import logging
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub import list_repo_files, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file
from transformers import (
    BambaConfig,
    BambaForCausalLM,
    JambaConfig,
    JambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedConfig,
)

from ssm_hub.conversion.formats.bamba import BAMBA_TO_SSM_HUB_HYBRID, SSM_HUB_HYBRID_TO_BAMBA
from ssm_hub.conversion.formats.engine import ConversionMap, apply_config_map, apply_weight_map
from ssm_hub.conversion.formats.hybrid import SSM_HUB_HYBRID_TO_SSM_HUB
from ssm_hub.conversion.formats.jamba import JAMBA_TO_SSM_HUB_HYBRID, SSM_HUB_HYBRID_TO_JAMBA
from ssm_hub.conversion.formats.mamba import (
    SSM_HUB_MAMBA2_TO_SSM_HUB,
    SSM_HUB_MAMBA2_TO_TRANSFORMERS,
    SSM_HUB_MAMBA_TO_SSM_HUB,
    SSM_HUB_MAMBA_TO_TRANSFORMERS,
    TRANSFORMERS_MAMBA2_TO_SSM_HUB,
    TRANSFORMERS_MAMBA_TO_SSM_HUB,
)
from ssm_hub.conversion.formats.mamba_ssm import MAMBA_SSM_MAMBA1_TO_SSM_HUB, MAMBA_SSM_MAMBA2_TO_SSM_HUB
from ssm_hub.models.checkpoint_loading import PICKLED_WEIGHTS, pickled_weight_files, safetensors_only_message
from ssm_hub.models.hybrid.configuration_hybrid import SsmHubHybridConfig
from ssm_hub.models.hybrid.modeling_hybrid import SsmHubHybridForCausalLM
from ssm_hub.models.mamba.configuration_mamba import SsmHubMambaConfig
from ssm_hub.models.mamba.modeling_mamba import SsmHubMambaForCausalLM
from ssm_hub.models.mamba2.configuration_mamba2 import SsmHubMamba2Config
from ssm_hub.models.mamba2.modeling_mamba2 import SsmHubMamba2ForCausalLM
from ssm_hub.output_folder import staged_model_folder

logger = logging.getLogger(__name__)

TARGETS = ("ssm_hub", "mamba", "mamba2", "jamba", "bamba")
"""``to`` values: ssm_hub's own format, or transformers' native MambaForCausalLM / Mamba2ForCausalLM /
JambaForCausalLM / BambaForCausalLM."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Each source model_type, with the architecture it holds ("mamba" = Mamba-1, "mamba2" = Mamba-2, "hybrid" = an
# SSM / attention / MoE stack) and its map to ssm_hub.
_FORMATS_BY_MODEL_TYPE: dict[str, tuple[str, ConversionMap]] = {
    "mamba": ("mamba", TRANSFORMERS_MAMBA_TO_SSM_HUB),
    "mamba2": ("mamba2", TRANSFORMERS_MAMBA2_TO_SSM_HUB),
    "jamba": ("hybrid", JAMBA_TO_SSM_HUB_HYBRID),
    "bamba": ("hybrid", BAMBA_TO_SSM_HUB_HYBRID),
    SsmHubMambaConfig.model_type: ("mamba", SSM_HUB_MAMBA_TO_SSM_HUB),
    SsmHubMamba2Config.model_type: ("mamba2", SSM_HUB_MAMBA2_TO_SSM_HUB),
    SsmHubHybridConfig.model_type: ("hybrid", SSM_HUB_HYBRID_TO_SSM_HUB),
}
# mamba_ssm's config.json has no model_type; its ssm_cfg["layer"] names the mixer (absent: Mamba1).
_MAMBA_SSM_KEYS = ("d_model", "n_layer", "ssm_cfg")
_MAMBA_SSM_FORMATS_BY_LAYER: dict[str, tuple[str, ConversionMap]] = {
    "Mamba1": ("mamba", MAMBA_SSM_MAMBA1_TO_SSM_HUB),
    "Mamba2": ("mamba2", MAMBA_SSM_MAMBA2_TO_SSM_HUB),
}
SUPPORTED_FORMATS = (
    "transformers-native MambaForCausalLM / Mamba2ForCausalLM / JambaForCausalLM / BambaForCausalLM (model_type "
    "'mamba' / 'mamba2' / 'jamba' / 'bamba')",
    f"ssm_hub (model_type '{SsmHubMambaConfig.model_type}' / '{SsmHubMamba2Config.model_type}' / "
    f"'{SsmHubHybridConfig.model_type}')",
    "mamba_ssm MambaLMHeadModel (config.json with d_model, n_layer and ssm_cfg; Mamba1 or Mamba2 mixers)",
)

_SSM_HUB_CLASSES = {
    "mamba": (SsmHubMambaConfig, SsmHubMambaForCausalLM),
    "mamba2": (SsmHubMamba2Config, SsmHubMamba2ForCausalLM),
    "hybrid": (SsmHubHybridConfig, SsmHubHybridForCausalLM),
}
# Each transformers target: the architecture it holds, its classes and the map from ssm_hub's format.
_TRANSFORMERS_CLASSES = {
    "mamba": ("mamba", MambaConfig, MambaForCausalLM, SSM_HUB_MAMBA_TO_TRANSFORMERS),
    "mamba2": ("mamba2", Mamba2Config, Mamba2ForCausalLM, SSM_HUB_MAMBA2_TO_TRANSFORMERS),
    "jamba": ("hybrid", JambaConfig, JambaForCausalLM, SSM_HUB_HYBRID_TO_JAMBA),
    "bamba": ("hybrid", BambaConfig, BambaForCausalLM, SSM_HUB_HYBRID_TO_BAMBA),
}
_ARCHITECTURE_NAMES = {"mamba": "Mamba-1", "mamba2": "Mamba-2", "hybrid": "hybrid"}

VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "*.tiktoken")
"""The files that hold a tokenizer's vocabulary (one of them is enough): a folder without any has no tokenizer."""
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja")
TOKENIZER_FILES = (
    *VOCABULARY_FILES, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "merges.txt",
    *CHAT_TEMPLATE_FILES, "generation_config.json",
)
"""Files (glob patterns relative to the folder) copied unchanged from the source next to the converted weights: the
tokenizer, its chat templates (a template may also sit in tokenizer_config.json) and the generation settings."""
DISTILL_NEEDS_TOKENIZER = "`ssm-hub distill` will need --tokenizer (the teacher's tokenizer: its folder or Hub id)"


def convert_checkpoint(source: str | Path, output_dir: str | Path, to: str = "ssm_hub",
                       dtype: str | torch.dtype | None = None) -> Path:
    """Convert the checkpoint at ``source`` (a local folder or a Hub model id) and write it to ``output_dir``.

    ``to``: ``"ssm_hub"`` (model_type ssm_hub_mamba / ssm_hub_mamba2 / ssm_hub_hybrid), or ``"mamba"`` /
    ``"mamba2"`` / ``"jamba"`` / ``"bamba"`` for transformers' own MambaForCausalLM / Mamba2ForCausalLM /
    JambaForCausalLM / BambaForCausalLM. ``dtype`` ("float32", "bfloat16", "float16" or the torch
    dtype) casts every floating-point tensor; ``None`` keeps the stored dtypes. Hub ids are fetched with
    ``huggingface_hub.snapshot_download`` (config, safetensors, tokenizer and generation files only), which honours
    HF_ENDPOINT, HF_HUB_OFFLINE and the HF cache. Returns the output folder.

    Raises ValueError for an unknown format, a config the target cannot express, an architecture that ``to`` does not
    hold, a checkpoint without safetensors weights, and (in one message) every key and shape that does not match.
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, got {to!r}")
    cast_to = parse_dtype(dtype)
    source_dir, output_dir = source_and_output(source, output_dir)

    source_config = read_config(source_dir)
    architecture, to_ssm_hub = _detect_format(source_config, source_dir)
    if to != "ssm_hub" and _TRANSFORMERS_CLASSES[to][0] != architecture:
        fitting = [name for name, (held, *_) in _TRANSFORMERS_CLASSES.items() if held == architecture]
        raise ValueError(
            f"to={to!r} writes transformers' {_TRANSFORMERS_CLASSES[to][2].__name__}, but {source} holds a "
            f"{_ARCHITECTURE_NAMES[architecture]} model: use "
            + " or ".join(f"to={name!r}" for name in (*fitting, "ssm_hub"))
        )

    weights = read_weights(source_dir, source, cast_to)

    config_class, model_class = _SSM_HUB_CLASSES[architecture]
    with _naming(source, to_ssm_hub):
        shapes = {name: tuple(tensor.shape) for name, tensor in weights.items()}
        config = config_class(**apply_config_map(source_config, to_ssm_hub, shapes))
        weights = apply_weight_map(to_ssm_hub.prepared(weights), to_ssm_hub.weight_rules(config), config)
    if to != "ssm_hub":
        _, config_class, model_class, to_transformers = _TRANSFORMERS_CLASSES[to]
        with _naming(source, to_transformers):
            config = config_class(**apply_config_map(config.to_dict(), to_transformers))
            weights = apply_weight_map(weights, to_transformers.weight_rules(config), config)

    with staged_model_folder(output_dir) as staging:
        save_weights(model_class, config, weights, staging)
        copy_tokenizer_files(source_dir, staging)
    return output_dir


def source_and_output(source: str | Path, output_dir: str | Path) -> tuple[Path, Path]:
    """(the source's folder, fetched from the Hub for a model id; the output folder), refusing one folder for
    both."""
    output_dir = Path(output_dir)
    source_dir = _resolve_source(source)
    if output_dir.resolve() == source_dir.resolve():
        raise ValueError(f"output_dir must differ from the source folder, got {str(output_dir)!r} for both")
    return source_dir, output_dir


def read_weights(source_dir: Path, source: str | Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The checkpoint's safetensors weights, floating-point ones cast to ``dtype`` (None: as stored)."""
    weights = _read_safetensors(source_dir, source)
    if dtype is None:
        return weights
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in weights.items()}


def copy_tokenizer_files(source_dir: Path, output_dir: Path) -> None:
    """Copy the source's tokenizer, chat templates and generation settings (TOKENIZER_FILES). A source without a
    tokenizer is said so, as a warning on this module's logger: the converted model will have none either."""
    for pattern in TOKENIZER_FILES:
        for path in sorted(source_dir.glob(pattern)):
            if path.is_file():
                name = path.relative_to(source_dir)
                (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, output_dir / name)
    if not has_tokenizer(output_dir):
        logger.warning("%s holds no tokenizer (none of %s), so the converted model has none: %s", source_dir,
                       ", ".join(VOCABULARY_FILES), DISTILL_NEEDS_TOKENIZER)


def has_tokenizer(folder: Path) -> bool:
    return any(path.is_file() for pattern in VOCABULARY_FILES for path in Path(folder).glob(pattern))


def chat_templates(folder: Path) -> list[str]:
    """Where ``folder``'s tokenizer keeps chat templates: files, or tokenizer_config.json's "chat_template"."""
    found = sorted(path.relative_to(folder).as_posix() for pattern in CHAT_TEMPLATE_FILES
                   for path in folder.glob(pattern) if path.is_file())
    config = folder / "tokenizer_config.json"
    if config.is_file() and _read_json(config).get("chat_template"):
        found.append("tokenizer_config.json")
    return found


def describe_checkpoint(folder: str | Path) -> list[str]:
    """What a written checkpoint folder holds, as lines for a person: the model type and its layers by kind, the
    parameter count, the weight files, the tokenizer and chat template (or that there is none) and the other files,
    the model code counted rather than listed."""
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    kinds = layer_kinds(config)
    weights = sorted(folder.glob("*.safetensors"))
    parameters = 0
    for path in weights:
        with safe_open(path, framework="pt") as file:
            parameters += sum(math.prod(file.get_slice(name).get_shape()) for name in file.keys())
    megabytes = sum(path.stat().st_size for path in weights) / 2**20
    classes = ", ".join(config.architectures or [])
    lines = [
        f"model: {config.model_type}" + (f" ({classes})" if classes else "") + f", {sum(kinds.values())} layers ("
        + ", ".join(f"{count} {kind}" for kind, count in kinds.items()) + f"), {parameters:,} parameters",
        f"weights: {', '.join(path.name for path in weights)} ({megabytes:.1f} MiB)",
    ]
    tokenizer = sorted({path.relative_to(folder).as_posix() for pattern in TOKENIZER_FILES
                        for path in folder.glob(pattern) if path.is_file()} - {"generation_config.json"})
    if has_tokenizer(folder):
        templates = chat_templates(folder)
        lines.append(f"tokenizer: {', '.join(tokenizer)}; chat template: "
                     + (", ".join(templates) if templates else "none"))
    else:
        lines.append(f"tokenizer: none, as the source had none: {DISTILL_NEEDS_TOKENIZER}")
    code = sorted(folder.glob("*.py"))
    listed = {*(path.name for path in weights), *tokenizer, *(path.name for path in code)}
    files = (path.relative_to(folder) for path in folder.rglob("*") if path.is_file())
    # Names starting with a dot are ssm-hub's bookkeeping (the manifest), not the model's.
    others = sorted(name.as_posix() for name in files
                    if name.as_posix() not in listed and not any(part.startswith(".") for part in name.parts))
    if code:
        others.append(f"{len(code)} code files (*.py, for trust_remote_code)")
    lines.append(f"also: {', '.join(others)}")
    return lines


def layer_kinds(config: PreTrainedConfig) -> dict[str, int]:
    """How many layers of each kind ``config`` describes, in order of first appearance."""
    kinds = getattr(config, "mixer_types", None) or getattr(config, "layers_block_type", None)
    if not kinds:  # a pure SSM: every layer one kind, named by its model type
        kinds = [config.model_type.removeprefix("ssm_hub_")] * config.num_hidden_layers
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be None or one of {tuple(DTYPES)}, got {dtype!r}")


def check_model_reference(reference: str | Path, what: str = "source") -> None:
    """Raise ValueError, naming ``what`` and ``reference``, unless it is an existing folder or could be a Hub model
    id: checked before any work, so that a mistyped path is not tried on the Hub after minutes of data building."""
    path = Path(reference)
    if path.is_dir():
        return
    if path.exists():
        raise ValueError(f"{what} must be a checkpoint folder or a Hub model id, got the file {str(reference)!r}")
    try:
        validate_repo_id(str(reference))
    except HFValidationError:
        raise ValueError(f"{what} {str(reference)!r} is neither an existing folder nor a valid Hub model id") from None


def _resolve_source(source: str | Path) -> Path:
    """A local folder as is; anything else is a Hub model id, downloaded (config and safetensors only)."""
    check_model_reference(source)
    if Path(source).is_dir():
        return Path(source)
    repo_id = str(source)
    metadata = ["config.json", "*.safetensors.index.json", *TOKENIZER_FILES]
    folder = Path(snapshot_download(repo_id, allow_patterns=metadata))
    index = _find_index(folder)
    # With an index, fetch exactly its shards: repos such as mistralai's also ship a consolidated copy of the weights.
    shards = sorted(set(_read_json(index)["weight_map"].values())) if index else ["*.safetensors"]
    folder = Path(snapshot_download(repo_id, allow_patterns=metadata + shards))
    if not any(folder.glob("*.safetensors")):
        _raise_no_safetensors(repo_id, _hub_files_matching(repo_id, PICKLED_WEIGHTS))
    return folder


def _hub_files_matching(repo_id: str, patterns: tuple[str, ...]) -> list[str]:
    """Names in the Hub repo matching ``patterns``, for an error message; [] when the Hub cannot be asked (offline)."""
    try:
        names = list_repo_files(repo_id)
    except OSError:
        return []
    return sorted(name for name in names if any(Path(name).match(pattern) for pattern in patterns))


def _raise_no_safetensors(where: str, unreadable: list[str]) -> None:
    raise ValueError(
        safetensors_only_message(where, unreadable) + ". mamba_ssm's own repos (state-spaces/mamba-130m, "
        "state-spaces/mamba2-130m ...) ship only pytorch_model.bin: convert the transformers-native '-hf' repos "
        "instead (e.g. state-spaces/mamba-130m-hf)"
    )


def read_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder / 'config.json'} not found: a checkpoint folder needs its config.json")
    # transformers' reader, because transformers writes inf as {"__float__": "Infinity"} (time_step_limit).
    return PreTrainedConfig.get_config_dict(str(folder))[0]


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _detect_format(config: dict, source_dir: Path) -> tuple[str, ConversionMap]:
    model_type = config.get("model_type")
    if model_type in _FORMATS_BY_MODEL_TYPE:
        return _FORMATS_BY_MODEL_TYPE[model_type]
    if model_type is None and all(key in config for key in _MAMBA_SSM_KEYS):
        ssm_cfg = config["ssm_cfg"] or {}
        layer = ssm_cfg.get("layer", "Mamba1") if isinstance(ssm_cfg, dict) else None
        if layer in _MAMBA_SSM_FORMATS_BY_LAYER:
            return _MAMBA_SSM_FORMATS_BY_LAYER[layer]
        raise ValueError(
            f"{source_dir / 'config.json'}: mamba_ssm ssm_cfg.layer = {layer!r} is not supported "
            f"(supported: {tuple(_MAMBA_SSM_FORMATS_BY_LAYER)})"
        )
    from ssm_hub.conversion.seeding.from_attention import SUPPORTED_TEACHERS

    if model_type in SUPPORTED_TEACHERS or model_type == "fuyu":
        target = "ssm_hub_multimodal" if model_type == "fuyu" else "ssm_hub_hybrid"
        raise ValueError(
            f"{source_dir / 'config.json'}: model_type {model_type!r} is a transformer, not an SSM checkpoint that "
            f"convert can rewrite: to seed an {target} from it, add --to {target} --attention-layers SPEC (e.g. "
            f"every:4:3 keeps one attention layer in four; see ssm-hub convert --help)"
        )
    found = f"model_type {model_type!r}" if model_type is not None else f"no model_type (keys: {sorted(config)})"
    raise ValueError(
        f"{source_dir / 'config.json'}: unsupported checkpoint format, {found}. Supported formats: "
        + "; ".join(SUPPORTED_FORMATS)
    )


def _find_index(folder: Path) -> Path | None:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    preferred = folder / "model.safetensors.index.json"
    if preferred in indexes:
        return preferred
    if len(indexes) > 1:
        raise ValueError(f"{folder} has several safetensors indexes ({[index.name for index in indexes]}); keep one")
    return indexes[0] if indexes else None


def _read_safetensors(folder: Path, source: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: the shards its index names, else model.safetensors, else all *.safetensors."""
    index = _find_index(folder)
    if index is not None:
        weight_map = _read_json(index)["weight_map"]
        weights = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise ValueError(f"{index} names the shard {shard}, which is not in {folder}")
            weights.update(load_file(folder / shard))
        unindexed = sorted(set(weights) ^ set(weight_map))
        if unindexed:
            raise ValueError(f"{index} and its shards disagree on these tensors: {unindexed}")
        return weights
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        _raise_no_safetensors(str(source), pickled_weight_files(folder))
    weights = {}
    for file in files:
        shard = load_file(file)
        repeated = sorted(set(shard) & set(weights))
        if repeated:
            raise ValueError(f"{file} repeats tensors of another *.safetensors file in {folder}: {repeated}")
        weights.update(shard)
    return weights


@contextmanager
def _naming(source, conversion_map: ConversionMap):
    """Prefix a ValueError with the checkpoint and the conversion step it came from."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{source} ({conversion_map.description}): {error}") from None


def save_weights(model_class: type, config, weights: dict[str, torch.Tensor], output_dir: Path) -> None:
    """Write ``weights`` with ``model_class.save_pretrained``, without allocating a randomly initialised model."""
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    produced = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    if expected != produced:
        # The maps and the model class disagree: a bug in ssm_hub, not in the checkpoint.
        differences = sorted(
            f"{name}: model {expected.get(name, 'has no such tensor')}, map {produced.get(name, 'has no such tensor')}"
            for name in expected.keys() | produced.keys() if expected.get(name) != produced.get(name)
        )
        raise ValueError(f"{model_class.__name__} does not match its weight map:\n  " + "\n  ".join(differences))
    # assign=True keeps each tensor's own dtype (mamba_ssm keeps some in float32) instead of the meta model's.
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    model.config.dtype = model.get_input_embeddings().weight.dtype
    model.save_pretrained(output_dir)
