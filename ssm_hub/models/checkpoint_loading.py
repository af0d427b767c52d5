"""How ssm_hub's model classes load a checkpoint: transformers' ``from_pretrained``, made strict where its silence
would be wrong.

    model = AutoModelForCausalLM.from_pretrained(folder)                # raises if a tensor is missing or unexpected
    model = AutoModelForCausalLM.from_pretrained(folder, strict=False)  # transformers' behaviour: a load report only

- **Every tensor accounted for.** transformers fills a tensor the checkpoint lacks with a fresh random
  initialisation and drops one the model has no place for, with a load-report warning. For an SSM a missing
  A_log or conv1d is never intended, so ``from_pretrained`` raises ``ValueError`` naming them. Not counted, as
  transformers does not count them either: tied weights (a tied ``lm_head.weight`` is not stored), non-persistent
  buffers, and the keys a class lists in ``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected``.
  A checkpoint that another class of the same model type wrote (its ``config.architectures`` names another class)
  may lack this class's head or hold the other's (``lm_head``, ``score``): a classifier started from a causal LM.
  ``strict=False`` loads anyway, as transformers would. The switch has no counterpart in transformers 5.25, whose
  ``from_pretrained`` only raises for shape mismatches (``ignore_mismatched_sizes``); its name is torch's
  ``load_state_dict(strict=...)``. A ``state_dict`` passed in memory (``from_pretrained(None, config=...,
  state_dict=...)``) is the caller's own and loads as transformers loads it, unless ``strict=True`` is given.
- **Safetensors only.** Loading a pickle (``pytorch_model.bin``) can run arbitrary code, so a folder holding only
  pickled weights is refused, naming the files and how to convert them; ``use_safetensors=False`` is the explicit
  way to read one anyway.
"""

from pathlib import Path

PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
"""Weight files that only ``torch.load`` (an unpickler) reads."""
HEAD_MODULES = ("lm_head", "score")
"""The heads that ssm_hub's model classes of one model type differ by."""
LISTED_KEYS = 20  # the error names this many keys of each kind, then counts the rest


def pickled_weight_files(folder: str | Path) -> list[str]:
    """The pickled weight files in ``folder`` when it holds no safetensors weights; [] when it has some, or none of
    either."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")):
        return []
    return sorted(path.name for pattern in PICKLED_WEIGHTS for path in folder.glob(pattern))


def safetensors_only_message(where: str, pickled: list[str]) -> str:
    """Why a checkpoint with only pickled weights is refused, and how to convert them once, if they are trusted."""
    found = f"it has only {', '.join(pickled)}; " if pickled else ""
    example = pickled[0] if pickled else "pytorch_model.bin"
    return (
        f"no *.safetensors weights in {where}: {found}ssm_hub reads safetensors only and never unpickles a "
        f"checkpoint (loading a pickle can run arbitrary code). If you trust the files, convert them once: load the "
        f"model with transformers' from_pretrained(..., use_safetensors=False) and save_pretrained it (it writes "
        f"safetensors), or for a single file run safetensors.torch.save_file({{k: v.clone().contiguous() for k, v "
        f"in torch.load('{example}', weights_only=True).items()}}, 'model.safetensors')"
    )


def check_safetensors(source, subfolder: str = "") -> None:
    """ValueError when the local checkpoint folder ``source`` holds pickled weights and no safetensors. Hub ids
    are left to transformers (``use_safetensors=True`` makes it look for safetensors files only)."""
    folder = Path(source) / subfolder
    if folder.is_dir():
        pickled = pickled_weight_files(folder)
        if pickled:
            raise ValueError(safetensors_only_message(str(folder), pickled))


def from_pretrained_safetensors(auto_class, source, **kwargs):
    """``auto_class.from_pretrained(source, use_safetensors=True, **kwargs)``, for a model of any type (a teacher):
    a local folder with only pickled weights is refused, naming them (:func:`check_safetensors`)."""
    check_safetensors(source, kwargs.get("subfolder") or "")
    return auto_class.from_pretrained(source, use_safetensors=True, **kwargs)


def _listed(keys: set[str]) -> str:
    names = sorted(keys)
    more = f" and {len(names) - LISTED_KEYS} more" if len(names) > LISTED_KEYS else ""
    return ", ".join(names[:LISTED_KEYS]) + more


def check_loaded_keys(model, loading_info: dict, source) -> None:
    """ValueError naming the tensors ``source`` lacked (left at their random initialisation) and those it held
    that ``model`` has no place for (dropped), after transformers' own exceptions (module docstring)."""
    missing, unexpected = set(loading_info["missing_keys"]), set(loading_info["unexpected_keys"])
    written_by = getattr(model.config, "architectures", None) or []
    if written_by and type(model).__name__ not in written_by:
        # Another class of this model type wrote it: the heads may differ, the body must not.
        missing = {key for key in missing if key.split(".")[0] not in HEAD_MODULES}
        unexpected = {key for key in unexpected if key.split(".")[0] not in HEAD_MODULES}
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, which would be left randomly initialised: "
                        f"{_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), which {type(model).__name__} has no place for: "
                        f"{_listed(unexpected)}")
    raise ValueError(f"{source} does not fit {type(model).__name__}: {'; '.join(problems)}. Check that the "
                     f"checkpoint and its config.json belong together; pass strict=False to from_pretrained to "
                     f"load it anyway (transformers' load report lists the same tensors)")


class StrictLoadingMixin:
    """``from_pretrained`` for ssm_hub's model classes: transformers', strict and safetensors-only (module
    docstring). Put before ``PreTrainedModel`` in the bases."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool | None = None, **kwargs):
        r"""
        transformers' ``PreTrainedModel.from_pretrained``, plus:

        strict: raise ``ValueError`` when the checkpoint lacks a tensor of the model or holds one the model has no
            place for, naming them (tied weights and non-persistent buffers are never missing; a head that differs
            from the class that wrote the checkpoint may be). Default: True for a checkpoint (a folder or a Hub
            id), False for a ``state_dict`` passed in memory. ``strict=False`` loads as transformers does.
        use_safetensors: default True here (a folder with only pickled weights is refused, naming them);
            ``False`` reads a pickle.
        """
        from_checkpoint = pretrained_model_name_or_path is not None and kwargs.get("gguf_file") is None
        if from_checkpoint and kwargs.get("use_safetensors") is None:
            check_safetensors(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            kwargs["use_safetensors"] = True
        wants_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                      output_loading_info=True, **kwargs)
        if strict is None:
            strict = pretrained_model_name_or_path is not None
        if strict:
            check_loaded_keys(model, loading_info, pretrained_model_name_or_path or "the state_dict")
        return (model, loading_info) if wants_info else model
