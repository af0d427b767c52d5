"""Publish an ssm_hub model folder to the Hugging Face Hub with a model card: ``ssm-hub push DIR REPO_ID``.

    from ssm_hub.conversion.publishing.push import push, render_model_card
    url = push("distilled/", "me/qwen-hybrid")

The card (model_cards/ssm_hub_model.md) is rendered from what the folder holds: config.json (the architecture and
its layer layout), seeding.json (the teacher and the kept attention layers, written by ``ssm-hub convert --to
ssm_hub_hybrid``) and distillation.json (the settings and the evaluation after each stage, written by ``ssm-hub
distill``), with the stages' loss curves. Its metadata names the teacher as ``base_model`` when the teacher is a
Hub id; an ssm_hub_multimodal model's card says image-text-to-text and shows the processor in use.

``push`` changes nothing in the folder: the card is rendered in memory. A README.md the folder already holds is
uploaded as the card instead, unless ``card="replace"``. The upload is one commit of an explicit list
(:func:`files_to_upload`): the model, its config and code, the tokenizer or processor, the reports and the loss
curves; never the Trainer checkpoints or anything else the folder holds, unless ``include`` names it.
huggingface_hub honours HF_ENDPOINT and HF_TOKEN.
"""

import json
from importlib.resources import files
from pathlib import Path
from string import Template

from ssm_hub.conversion.formats.checkpoint import TOKENIZER_FILES
from ssm_hub.conversion.distillation.distill import STAGES
from ssm_hub.conversion.seeding.from_attention import SEEDING_FILE

DISTILLATION_FILE = "distillation.json"
CARD_FILE = "README.md"
LOSS_CURVES = (*(f"{stage}/loss_curve.png" for stage in STAGES), "loss_curve.png")
UPLOADED = (
    "config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",  # the model
    "adapter_config.json", "adapter_model.safetensors",  # a LoRA adapter (ssm-hub train with lora)
    "*.py",  # the modelling code that auto_map names, for trust_remote_code
    *TOKENIZER_FILES, "processor_config.json", "preprocessor_config.json",
    SEEDING_FILE, DISTILLATION_FILE, "trainer_state.json", *LOSS_CURVES,  # the reports
)
"""What ``push`` uploads from a folder, as glob patterns relative to it (the card comes besides)."""
CARD_CHOICES = ("keep", "replace")
TEXT_USAGE = """import ssm_hub  # registers the ssm_hub model types; without it, pass trust_remote_code=True
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("$repo_id")
tokenizer = AutoTokenizer.from_pretrained("$repo_id")
print(tokenizer.decode(model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)[0]))"""
IMAGE_USAGE = """import ssm_hub  # registers the model type and its processor; without it, pass trust_remote_code=True
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("$repo_id")
processor = AutoProcessor.from_pretrained("$repo_id")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=Image.open("image.png"), return_tensors="pt")
print(processor.decode(model.generate(**inputs, max_new_tokens=30)[0, inputs["input_ids"].shape[1]:]))"""


def _read(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _cell(text: str) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def render_model_card(folder: str | Path, repo_id: str, base_model: str | None = None) -> str:
    """The README.md for ``folder`` published as ``repo_id`` (module docstring). ``base_model`` overrides the
    teacher named in seeding.json (a local teacher folder is not a Hub id, so it is left out of the metadata)."""
    folder = Path(folder)
    config = _read(folder, "config.json")
    if config is None or not str(config.get("model_type", "")).startswith("ssm_hub_"):
        raise ValueError(f"{folder} holds no ssm_hub model (config.json with an ssm_hub_* model_type)")
    seeding, distillation = _read(folder, SEEDING_FILE), _read(folder, DISTILLATION_FILE)
    teacher = base_model or (seeding or {}).get("teacher")
    model_type = config["model_type"]
    multimodal = model_type == "ssm_hub_multimodal"
    pipeline = "image-text-to-text" if multimodal else "text-generation"
    metadata = ["library_name: transformers", f"pipeline_tag: {pipeline}", "tags:",
                "- ssm_hub", f"- {config['model_type']}", "- state-space-model"]
    if distillation is not None:
        metadata.append("- distillation")
    if teacher and (base_model or _is_hub_id(teacher)):
        metadata.insert(0, f"base_model: {teacher}")
    layout = ""
    if "mixer_types" in config:
        kinds = config["mixer_types"]
        attention = [layer for layer, kind in enumerate(kinds) if "attention" in kind]
        layout = (f" It has {len(kinds)} layers: {len(attention)} attention "
                  f"({', '.join(map(str, attention)) or 'none'}) and {len(kinds) - len(attention)} SSM layers.")
    if multimodal:
        routed = "own" if config.get("mixture_of_mamba") else "shared"
        layout += (f" Images enter as {config['patch_size']}-pixel patches through a linear patch embedding (no vision "
                   f"encoder), each row of patches closed by a row-end token; image tokens take {routed} Mamba-2 "
                   "projections (Mixture-of-Mamba when own).")
    summary = f"An ssm_hub `{model_type}` model.{layout}"
    recipe = []
    if seeding is not None:
        recipe.append(f"- Seeded from `{seeding['teacher']}` ({seeding['teacher_model_type']}) with `ssm-hub convert "
                      f"--to {model_type} --attention-layers {seeding['attention_layers']}`: attention layers "
                      f"{seeding['kept_attention_layers']} kept, the others became Mamba-2 layers built from their "
                      f"weights (V to x, K to B, Q to C, O to out_proj).")
    if distillation is not None:
        settings = distillation["settings"]
        recipe.append("- Distilled with `ssm-hub distill`: " + ", ".join(f"{key} {value}" for key, value in settings.items())
                      + ".")
    evaluation = "No evaluation was recorded (no distillation.json)."
    if distillation is not None:
        rows = ["| after | teacher perplexity | student perplexity | mean token KL | greedy agreement |",
                "|---|---|---|---|---|"]
        for after, result in distillation["evaluations"].items():
            rows.append(f"| {after} | {result['teacher_perplexity']:.2f} | {result['student_perplexity']:.2f} | "
                        f"{result['mean_token_kl']:.4f} | {result['greedy_agreement']:.1%} |")
        tokens = next(iter(distillation["evaluations"].values()))["tokens"]
        evaluation = f"On {tokens:,} held-out tokens:\n\n" + "\n".join(rows)
        samples = distillation.get("samples", {})
        if samples:
            last = list(samples)[-1]
            evaluation += (f"\n\nGreedy completions of held-out openings ({last}):\n\n"
                           "| prompt | teacher | student |\n|---|---|---|\n"
                           + "\n".join(f"| {_cell(s['prompt'])} | {_cell(s['teacher'])} | {_cell(s['student'])} |"
                                        for s in samples[last]))
    if distillation is not None and distillation.get("speed"):
        rows = ["| context | student decode tokens/s | teacher decode tokens/s | decode speed-up | prefill speed-up | "
                "student cache / teacher cache |", "|---|---|---|---|---|---|"]
        for row in distillation["speed"]:
            rows.append(f"| {row['context']} | {row['student']['decode_tokens_per_second']:,.0f} | "
                        f"{row['teacher']['decode_tokens_per_second']:,.0f} | {row['decode_speedup']:.2f}x | "
                        f"{row['prefill_speedup']:.2f}x | {row['cache_ratio']:.2f} |")
        evaluation += ("\n\nSpeed at batch 1 on transformers' StaticCache, eager, measured where it was distilled:\n\n"
                       + "\n".join(rows))
    curves = [f"![training loss, {curve.split('/')[0] if '/' in curve else 'training'}]({curve})"
              for curve in LOSS_CURVES if (folder / curve).is_file()]
    template = Template((files("ssm_hub.model_cards") / "ssm_hub_model.md").read_text(encoding="utf-8"))
    return template.substitute(
        metadata="\n".join(metadata), title=repo_id.split("/")[-1], summary=summary,
        recipe="\n".join(recipe) or "Trained with ssm_hub.", evaluation=evaluation,
        loss_curves="\n\n".join(curves),
        usage=Template(IMAGE_USAGE if multimodal else TEXT_USAGE).substitute(repo_id=repo_id),
    )


def files_to_upload(folder: str | Path, include: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The paths, relative to ``folder``, that ``push`` uploads besides the card: those matching UPLOADED and the
    ``include`` patterns (each of which must match a file). ssm-hub's own records (hidden files) are never
    uploaded."""
    folder = Path(folder)
    names = set()
    for pattern in (*UPLOADED, *include):
        matched = {path.relative_to(folder).as_posix() for path in folder.glob(pattern) if path.is_file()}
        if pattern in include and not matched:
            raise ValueError(f"--include {pattern!r} matches no file in {folder}")
        names |= matched
    return sorted(name for name in names - {CARD_FILE}
                  if not any(part.startswith(".") for part in name.split("/")))


def push(folder: str | Path, repo_id: str, private: bool = False, base_model: str | None = None,
         token: str | None = None, card: str = "keep", include: tuple[str, ...] | list[str] = (), log=None) -> str:
    """Upload the model in ``folder`` with its card (module docstring) to ``repo_id`` in one commit, creating the
    repo if needed; returns the commit's URL. ``card``: "keep" uploads the folder's own README.md when it has one,
    "replace" the generated card. ``log``: a function given a line about what is uploaded."""
    from huggingface_hub import CommitOperationAdd, HfApi

    if card not in CARD_CHOICES:
        raise ValueError(f"card must be one of {CARD_CHOICES}, got {card!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give the model folder to push")
    rendered = render_model_card(folder, repo_id, base_model).encode("utf-8")  # checks that it holds our model
    names = files_to_upload(folder, include)
    own_card = (folder / CARD_FILE).is_file() and card == "keep"
    if log is not None:
        log(f"uploading {len(names)} files from {folder} and "
            + (f"its own {CARD_FILE} as the card (--card replace uploads the generated card instead)" if own_card
               else f"the generated card as {CARD_FILE}"))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE,
                                         path_or_fileobj=str(folder / CARD_FILE) if own_card else rendered))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.create_commit(repo_id, operations=operations, commit_message="Upload with ssm-hub push")
    return commit.commit_url
