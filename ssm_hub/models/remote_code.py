"""Write a model's code next to its weights so the checkpoint loads with ``trust_remote_code=True`` where
ssm_hub is not installed.

transformers' own ``custom_object_save`` copies the model file and its single-dot relative imports only, which
cannot express ssm_hub's layered package (models -> layers -> ops). This walks the ssm_hub modules a model class
needs, writes each as one flat file in the checkpoint folder and rewrites ``from ssm_hub.a.b import x`` into
``from .a_b import x``. Model and config files keep their own names (``modeling_mamba2.py``), which is what the
``auto_map`` in config.json points at. Code loaded that way saves itself the same way: its imports are already
flat, so the walk copies them as they are.

Processors and image processors are exported alike (write_processing_remote_code): their modules go into the same
folder and ``auto_map`` entries into processor_config.json (the processor's, and its nested image processor's) or
preprocessor_config.json (an image processor saved alone), which is where AutoProcessor and AutoImageProcessor look.
"""

import ast
import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

AUTO_MAP_CLASSES_ATTRIBUTE = "AUTO_MAP"
# Keyword arguments of save_pretrained that only matter for an upload (see save_with_remote_code).
HUB_KWARGS = ("repo_id", "commit_message", "private", "create_pr", "revision", "token")
EXPORTABLE_PACKAGES = ("ssm_hub.", "transformers_modules.")


def _root_package(module_name: str) -> str:
    if module_name.split(".")[0] == "ssm_hub":
        return "ssm_hub"
    # Code loaded from a checkpoint lives in one flat package (transformers_modules.<name>.<file>).
    return module_name.rpartition(".")[0]


def _imported_modules(tree: ast.Module, module_name: str, is_package: bool, root: str):
    """Yield (node, absolute module name) for every import of a module inside ``root``."""
    package = module_name if is_package else module_name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == root or alias.name.startswith(root + "."):
                    raise ValueError(
                        f"{module_name}: `import {alias.name}` cannot be exported as remote code; "
                        f"use `from {alias.name.rpartition('.')[0]} import {alias.name.rpartition('.')[2]}`"
                    )
        elif isinstance(node, ast.ImportFrom):
            target = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            if target == root or target.startswith(root + "."):
                yield node, target


def _module_source(module_name: str) -> tuple[str, bool]:
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None) if module is not None else None
    if path is None:
        spec = importlib.util.find_spec(module_name)
        path = spec.origin
    return Path(path).read_text(encoding="utf-8"), Path(path).name == "__init__.py"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def collect_modules(start_modules: list[str]) -> dict[str, tuple[str, bool]]:
    """All modules of the start modules' package reachable through imports: name -> (source, is_package)."""
    root = _root_package(start_modules[0])
    found: dict[str, tuple[str, bool]] = {}
    pending = list(start_modules)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        source, is_package = _module_source(name)
        found[name] = (source, is_package)
        for node, target in _imported_modules(ast.parse(source), name, is_package, root):
            if target == root:
                raise ValueError(f"{name} imports from the package root {root}; import from the defining module")
            # `from pkg import submodule` would need the package's folder structure, which the flat bundle drops.
            submodules = [a.name for a in node.names if root == "ssm_hub" and _is_module(f"{target}.{a.name}")]
            if submodules:
                raise ValueError(f"{name} imports modules {submodules} from {target}; import names from them instead")
            pending.append(target)
    return found


def flat_names(modules: dict[str, tuple[str, bool]], start_modules: list[str]) -> dict[str, str]:
    """Each module's file name in the checkpoint: its own name where that is unique, else its dotted path inside
    the package joined with underscores (``ssm_hub.ops.ssd.reference`` -> ``ops_ssd_reference``)."""
    root = _root_package(start_modules[0])
    last = {name: name.rpartition(".")[2] for name in modules}
    counts: dict[str, int] = {}
    for name in modules:
        counts[last[name]] = counts.get(last[name], 0) + 1
    result = {}
    for name, (_, is_package) in modules.items():
        keeps_own_name = name in start_modules or (counts[last[name]] == 1 and not is_package)
        result[name] = last[name] if keeps_own_name else name[len(root) + 1:].replace(".", "_")
    if len(set(result.values())) != len(result):
        raise ValueError(f"remote-code export: two modules map to one file name: {result}")
    return result


def rewrite_imports(source: str, module_name: str, is_package: bool, names: dict[str, str]) -> str:
    """Replace every import of a bundled module by a single-dot import of its flat file."""
    root = _root_package(module_name)
    lines = source.splitlines(keepends=True)
    edits = []
    for node, target in _imported_modules(ast.parse(source), module_name, is_package, root):
        imported = ", ".join(alias.name + (f" as {alias.asname}" if alias.asname else "") for alias in node.names)
        indent = " " * node.col_offset
        edits.append((node.lineno - 1, node.end_lineno, f"{indent}from .{names[target]} import {imported}\n"))
    for start, end, text in sorted(edits, reverse=True):
        lines[start:end] = [text]
    return "".join(lines)


def exportable_class(cls: type) -> type:
    """The nearest class in ``cls``'s ancestry whose code can be exported: ssm_hub's own, or code loaded from a
    checkpoint. A user's subclass (in their own package or in ``__main__``) is saved as the ssm_hub class it
    extends; its own additions are not part of the checkpoint's code."""
    return next(c for c in cls.__mro__ if c.__module__.startswith(EXPORTABLE_PACKAGES))


def save_with_remote_code(obj, save_pretrained, save_directory, push_to_hub: bool, kwargs: dict) -> None:
    """Save through transformers' ``save_pretrained``, then write the code bundle, then upload if asked.

    transformers would upload inside its own save_pretrained, before the bundle exists, so the upload is done
    here afterwards through ``push_to_hub`` (which saves again, bundle included, to a temporary folder).
    """
    from transformers import PreTrainedModel
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.processing_utils import ProcessorMixin

    hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    if isinstance(obj, PreTrainedModel):  # its save_pretrained takes is_main_process (every rank may gather)
        save_pretrained(save_directory, **kwargs)
        if not obj.should_save_on_this_rank(kwargs.get("is_main_process", True)):
            return
    else:  # configs and processors would write their files on every process
        if not kwargs.pop("is_main_process", True):
            return
        save_pretrained(save_directory, **kwargs)
    if isinstance(obj, (ProcessorMixin, ImageProcessingMixin)):
        write_processing_remote_code(obj, save_directory)
    else:
        write_remote_code(type(obj), save_directory)
    if push_to_hub:
        repo_id = hub_kwargs.pop("repo_id", None) or Path(save_directory).name
        obj.push_to_hub(repo_id, **hub_kwargs)


def write_remote_code(model_or_config_class: type, save_directory: str | os.PathLike) -> list[Path]:
    """Write the flat code bundle for ``model_or_config_class`` and a complete ``auto_map`` into config.json."""
    save_directory = Path(save_directory)
    model_or_config_class = exportable_class(model_or_config_class)
    config_class = getattr(model_or_config_class, "config_class", None) or model_or_config_class
    start = [config_class.__module__]
    if model_or_config_class is not config_class:
        start.insert(0, model_or_config_class.__module__)
    names, written = write_code_bundle(start, save_directory)

    config_path = save_directory / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        auto_map = {"AutoConfig": f"{names[config_class.__module__]}.{config_class.__name__}"}
        if model_or_config_class is not config_class:
            model_module = sys.modules[model_or_config_class.__module__]
            for auto_class, class_name in getattr(model_module, AUTO_MAP_CLASSES_ATTRIBUTE).items():
                auto_map[auto_class] = f"{names[model_or_config_class.__module__]}.{class_name}"
        else:
            auto_map = {**config.get("auto_map", {}), **auto_map}
        config["auto_map"] = auto_map
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


def _code_bundle(start_modules: tuple[str, ...]) -> tuple[dict[str, str], dict[str, str]]:
    """(module name -> flat file name, flat file name -> rewritten source) of ``start_modules`` and every package
    module they import."""
    modules = collect_modules(list(start_modules))
    names = flat_names(modules, list(start_modules))
    sources = {names[module_name]: rewrite_imports(source, module_name, is_package, names)
               for module_name, (source, is_package) in modules.items()}
    return names, sources


# ssm_hub's own bundles, kept per process: the walk parses every module twice (about a second a save), and an
# installed package's sources do not change while it runs. Code loaded from a checkpoint is walked each time, since
# another checkpoint may bring other files under the same module names.
_ssm_hub_code_bundle = functools.lru_cache(maxsize=32)(_code_bundle)


def write_code_bundle(start_modules: list[str], save_directory: Path) -> tuple[dict[str, str], list[Path]]:
    """Write ``start_modules`` and every package module they import as flat files in ``save_directory``; returns
    (module name -> file name without ``.py``, the files written)."""
    bundle = _ssm_hub_code_bundle if _root_package(start_modules[0]) == "ssm_hub" else _code_bundle
    names, sources = bundle(tuple(start_modules))
    written = []
    for file_name, source in sources.items():
        path = save_directory / f"{file_name}.py"
        path.write_text(source, encoding="utf-8")
        written.append(path)
    return dict(names), written


def write_processing_remote_code(processing, save_directory: str | os.PathLike) -> list[Path]:
    """The flat code bundle for a processor or an image processor, with the ``auto_map`` entries that let
    AutoProcessor / AutoImageProcessor load it by trust_remote_code: a processor gets ``AutoProcessor`` at the top
    of processor_config.json and each of its image processors of ours ``AutoImageProcessor`` in its nested section;
    an image processor saved alone gets ``AutoImageProcessor`` in preprocessor_config.json. Sub-processors that are
    transformers' own classes need no entry."""
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

    save_directory = Path(save_directory)
    processing_class = exportable_class(type(processing))
    names, written = write_code_bundle([processing_class.__module__], save_directory)

    files = set(names.values())

    def reference(cls: type) -> str | None:
        """The auto_map entry of ``cls`` or of the nearest of its ancestors whose code is in the bundle; None for
        transformers' own classes. Code loaded from a checkpoint is matched by its file: transformers loads each
        file an auto_map names as a module of its own, so the image processor that AutoImageProcessor loaded is
        not the class that the processor's module imported from the same file."""
        for ancestor in cls.__mro__:
            module = ancestor.__module__
            file = names.get(module) or (module.rpartition(".")[2] if module.startswith("transformers_modules.")
                                         else None)
            if file in files:
                return f"{file}.{ancestor.__name__}"
        if cls.__module__.startswith(EXPORTABLE_PACKAGES):
            raise ValueError(f"remote-code export: {cls.__module__}.{cls.__name__} is not in the code bundle of "
                             f"{processing_class.__name__} ({sorted(files)})")
        return None

    if isinstance(processing, ImageProcessingMixin):
        config_path = save_directory / IMAGE_PROCESSOR_NAME
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["auto_map"] = {"AutoImageProcessor": reference(processing_class)}
    else:
        config_path = save_directory / PROCESSOR_NAME
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["auto_map"] = {"AutoProcessor": reference(processing_class)}
        for attribute in processing.get_attributes():
            part = getattr(processing, attribute)
            if isinstance(part, ImageProcessingMixin) and isinstance(config.get(attribute), dict):
                part_reference = reference(type(part))
                if part_reference is not None:
                    config[attribute]["auto_map"] = {"AutoImageProcessor": part_reference}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written
