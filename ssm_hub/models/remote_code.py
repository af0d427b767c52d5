"""Write a model's code next to its weights so the checkpoint loads with ``trust_remote_code=True`` where
ssm_hub is not installed.

transformers' own ``custom_object_save`` copies the model file and its single-dot relative imports only, which
cannot express ssm_hub's layered package (models -> layers -> ops -> kernels). This walks the ssm_hub modules a model
class needs and merges them into a few files, as transformers' own generated model files are:

- ``configuration_<type>.py``: the config's module and all it imports;
- ``modeling_<type>.py``: the model, its layers and the generation support;
- ``ssm_hub_ops.py``: the ops (the backend choice, the custom-op registrations, the torch references);
- ``ssm_hub_kernels.py``: the Triton kernels, imported by the ops only when they run on a GPU.

Merging drops the imports between modules of one file, turns those between files into single-dot imports
(``from .ssm_hub_ops import ssd_chunked_scan``) and renames a module-level name where two modules of one file bind
it to different things (:class:`_Merge`). Model and config files keep the names the ``auto_map`` in config.json
points at. Code loaded that way saves itself the same way: each of its files is one module whose imports are
already single-dot, so the walk writes them as they are.

Processors and image processors are exported alike (write_processing_remote_code): ``processing_<type>.py`` and
``image_processing_<type>.py`` go into the same folder and ``auto_map`` entries into processor_config.json (the
processor's, and its nested image processor's) or preprocessor_config.json (an image processor saved alone), which
is where AutoProcessor and AutoImageProcessor look.
"""

import ast
import functools
import importlib.util
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

AUTO_MAP_CLASSES_ATTRIBUTE = "AUTO_MAP"
# Keyword arguments of save_pretrained that only matter for an upload (see save_with_remote_code).
HUB_KWARGS = ("repo_id", "commit_message", "private", "create_pr", "revision", "token")
EXPORTABLE_PACKAGES = ("ssm_hub.", "transformers_modules.")
# The files a model's bundle puts the ops (dispatch, custom ops, torch references) and the Triton kernels in.
OPS_FILE = "ssm_hub_ops"
KERNELS_FILE = "ssm_hub_kernels"


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


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_SCOPES = (*_FUNCTIONS, ast.Lambda, ast.ClassDef, *_COMPREHENSIONS)


def _nodes_in_scope(body: list[ast.AST]):
    """Every node of ``body`` that runs in the scope ``body`` belongs to: nested functions, lambdas, classes and
    comprehensions are yielded themselves (their names bind here) but not entered."""
    pending = list(reversed(body))
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, _SCOPES):
            pending.extend(reversed(list(ast.iter_child_nodes(node))))


def _bound_in(body: list[ast.AST], owner: str) -> set[str]:
    """Names that statements of one scope bind in it."""
    bound = set()
    for node in _nodes_in_scope(body):
        if isinstance(node, (ast.Global, ast.Nonlocal, ast.NamedExpr)):
            # Would bind names in another scope than the one they stand in; nothing in ssm_hub needs them.
            raise ValueError(f"remote-code export: {owner} uses `{type(node).__name__.lower()}`, which the merge into "
                             f"one file does not support")
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (*_FUNCTIONS, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return bound


def _arguments(arguments: ast.arguments) -> list[ast.arg]:
    return [*arguments.posonlyargs, *arguments.args, *filter(None, [arguments.vararg]), *arguments.kwonlyargs,
            *filter(None, [arguments.kwarg])]


def global_references(tree: ast.Module, owner: str) -> list[ast.Name]:
    """The ``ast.Name`` nodes of ``tree`` (loads, stores and deletes) that refer to the module's global of that
    name: those at module level and those in functions, lambdas, classes and comprehensions that no enclosing scope
    binds. A class body's names are not visible in the functions inside it, as in Python."""
    found = []

    def visit(node: ast.AST, scopes: list[tuple[str, set[str]]]) -> None:
        if isinstance(node, ast.Name):
            visible = [bound for depth, (kind, bound) in enumerate(reversed(scopes)) if kind != "class" or depth == 0]
            if not any(node.id in bound for bound in visible):
                found.append(node)
        elif isinstance(node, (*_FUNCTIONS, ast.Lambda)):
            # Decorators, defaults and annotations run in the enclosing scope; the body in the function's own.
            outer = [*getattr(node, "decorator_list", []), *node.args.defaults,
                     *(default for default in node.args.kw_defaults if default is not None),
                     *(a.annotation for a in _arguments(node.args) if a.annotation is not None)]
            if getattr(node, "returns", None) is not None:
                outer.append(node.returns)
            for child in outer:
                visit(child, scopes)
            body = node.body if isinstance(node.body, list) else [node.body]
            inner = scopes + [("function", {a.arg for a in _arguments(node.args)} | _bound_in(body, owner))]
            for child in body:
                visit(child, inner)
        elif isinstance(node, ast.ClassDef):
            for child in (*node.decorator_list, *node.bases, *node.keywords):
                visit(child, scopes)
            inner = scopes + [("class", _bound_in(node.body, owner))]
            for child in node.body:
                visit(child, inner)
        elif isinstance(node, _COMPREHENSIONS):
            # The first iterable runs in the enclosing scope; targets, conditions and the element in the
            # comprehension's own.
            first, *rest = node.generators
            visit(first.iter, scopes)
            targets = {name.id for generator in node.generators for name in ast.walk(generator.target)
                       if isinstance(name, ast.Name)}
            inner = scopes + [("comprehension", targets)]
            for child in (first.target, *first.ifs, *rest, *(getattr(node, field) for field in ("elt", "key", "value")
                                                              if hasattr(node, field))):
                visit(child, inner)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, scopes)

    for statement in tree.body:
        visit(statement, [])
    return found


@dataclass
class _Module:
    """One module of a bundle, parsed: its module-level bindings (local name -> ("def",) for its own definitions,
    ("external", ...) for an import from outside the package, ("package", module, name) for one from inside), its
    imports from inside the package (node, target module, whether at module level) and its references to globals."""

    name: str
    source: str
    tree: ast.Module
    bindings: dict[str, tuple]
    imports: list[tuple[ast.ImportFrom, str, bool]]
    references: list[ast.Name]


def _parse_module(name: str, source: str, is_package: bool, root: str) -> _Module:
    tree = ast.parse(source)
    module_level = list(_nodes_in_scope(tree.body))
    at_module_level = {id(node) for node in module_level}
    package_imports = [(node, target, id(node) in at_module_level)
                       for node, target in _imported_modules(tree, name, is_package, root)]
    package_targets = {id(node): target for node, target, _ in package_imports}
    kinds: dict[str, set[tuple]] = {}
    for node in module_level:
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.split(".")[0]
                kinds.setdefault(local, set()).add(("external", "import", alias.name if alias.asname else local))
        elif isinstance(node, ast.ImportFrom):
            target = package_targets.get(id(node))
            for alias in node.names:
                kind = ("package", target, alias.name) if target else ("external", "from", node.module, alias.name)
                kinds.setdefault(alias.asname or alias.name, set()).add(kind)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            kinds.setdefault(node.id, set()).add(("def",))
        elif isinstance(node, (*_FUNCTIONS, ast.ClassDef)) or isinstance(node, ast.ExceptHandler) and node.name:
            kinds.setdefault(node.name, set()).add(("def",))
    bindings = {}
    for local, found in kinds.items():
        if len(found) == 1:
            bindings[local] = found.pop()
        elif any(kind[0] == "package" for kind in found):
            raise ValueError(f"remote-code export: {name} binds {local} by an import from the package and otherwise")
        else:  # bound by an import and by an assignment (a fallback), or by two imports: the module's own
            bindings[local] = ("def",)
    return _Module(name, source, tree, bindings, package_imports, global_references(tree, name))


def _module_file_names(modules: dict[str, tuple[str, bool]], main_module: str, anchors: list[str]) -> dict[str, str]:
    """Which file each module goes to. Each anchor (a config's module, an image processor's) takes everything it
    imports into a file named after it, so that it loads alone; of the rest, the kernels go to KERNELS_FILE, the ops
    and the backend choice to OPS_FILE, and everything else to a file named after the main module. Code loaded from
    a checkpoint is already merged: each of its modules stays a file."""
    last = {name: name.rpartition(".")[2] for name in modules}
    if _root_package(main_module) != "ssm_hub":
        return last
    files = {}
    for anchor in anchors:
        for name in collect_modules([anchor]):
            files.setdefault(name, last[anchor])
    for name in modules:
        if name in files:
            continue
        if name.startswith("ssm_hub.kernels."):
            files[name] = KERNELS_FILE
        elif name.startswith("ssm_hub.ops.") or name == "ssm_hub.backend":
            files[name] = OPS_FILE
        else:
            files[name] = last[main_module]
    return files


def _dependencies_first(roots: list, dependencies, cycle: str) -> list:
    """``roots`` and all they reach through ``dependencies(node)``, each after the nodes it depends on; a node that
    depends on itself through others raises ValueError, ``cycle`` formatted with it."""
    order, state = [], {}

    def visit(node) -> None:
        if state.get(node) == "done":
            return
        if state.get(node) == "visiting":
            raise ValueError(cycle.format(node))
        state[node] = "visiting"
        for dependency in dependencies(node):
            visit(dependency)
        state[node] = "done"
        order.append(node)

    for root in roots:
        visit(root)
    return order


def _file_order(members: list[str], parsed: dict[str, _Module], files: dict[str, str], anchor: str | None
                ) -> list[str]:
    """The file's modules in an order where each comes after the modules it imports at module level (as Python
    would import them), starting from the module the file is named after."""
    def same_file_imports(name: str) -> list[str]:
        return [target for _, target, module_level in parsed[name].imports
                if module_level and files[target] == files[name]]

    return _dependencies_first(sorted(members, key=lambda member: (member != anchor, member)), same_file_imports,
                               "remote-code export: {} imports, at module level, a module that imports it back")


def _check_file_imports_acyclic(parsed: dict[str, _Module], files: dict[str, str]) -> None:
    """Files import each other at module level without a cycle (else one would see the other half-run)."""
    edges: dict[str, set[str]] = {}
    for name, module in parsed.items():
        for _, target, module_level in module.imports:
            if module_level and files[target] != files[name]:
                edges.setdefault(files[name], set()).add(files[target])
    _dependencies_first(sorted(edges), lambda file: sorted(edges.get(file, ())),
                        "remote-code export: {}.py would import, at module level, a file that imports it back")


class _Merge:
    """Names in the merged files: where two modules of one file bind one name to different things (two helpers
    ``_check``, a definition and a builtin one module reads) and the name is read, the binding of the module the
    file is named after (or the builtin, or the first module's) keeps it and the others are renamed
    ``<name>__<module>``. Names no module reads (``_`` of the registered fakes) may stay bound twice."""

    def __init__(self, parsed: dict[str, _Module], files: dict[str, str], priorities: dict[str, list[str]]):
        """``priorities``: each file's modules, the one whose bindings win clashes first."""
        self.parsed, self.files = parsed, files
        root = _root_package(next(iter(parsed)))
        self.merged: dict[str, dict[tuple, str]] = {}
        for file, order in priorities.items():
            keys: dict[str, dict[tuple, str]] = {}  # name -> identity -> first module binding it
            read = set()
            for name in order:
                module = parsed[name]
                for local, kind in module.bindings.items():
                    if kind[0] == "package" and files[kind[1]] == file:
                        continue
                    keys.setdefault(local, {}).setdefault(self.identity(name, local), name)
                for reference in module.references:
                    if isinstance(reference.ctx, ast.Load):
                        read.add(reference.id)
                        if reference.id not in module.bindings:
                            keys.setdefault(reference.id, {}).setdefault(("builtin",), name)
            for module in parsed.values():
                for node, target, _ in module.imports:
                    if files[target] == file:
                        read.update(alias.name for alias in node.names)
            merged = self.merged[file] = {}
            taken = set(keys)
            for local, identities in keys.items():
                keeper = ("builtin",) if ("builtin",) in identities else next(iter(identities))
                for identity, origin in identities.items():
                    if identity == keeper or local not in read:
                        merged[(local, identity)] = local
                        continue
                    renamed = f"{local}__{origin[len(root) + 1:].replace('.', '_')}"
                    if renamed in taken:
                        raise ValueError(f"remote-code export: renaming {origin}.{local} to {renamed} in {file}.py "
                                         f"clashes with a name there")
                    taken.add(renamed)
                    merged[(local, identity)] = renamed

    def identity(self, module_name: str, local: str) -> tuple:
        """What a module-level name of a module is bound to, followed through imports from inside the package."""
        kind = self.parsed[module_name].bindings.get(local)
        if kind is None:
            raise ValueError(f"remote-code export: {module_name} has no module-level name {local}")
        if kind[0] == "package":
            return self.identity(kind[1], kind[2])
        return ("def", module_name, local) if kind[0] == "def" else kind

    def global_name(self, module_name: str, local: str) -> str:
        """The name in the merged file of the global a module calls ``local``."""
        kind = self.parsed[module_name].bindings[local]
        if kind[0] == "package" and self.files[kind[1]] == self.files[module_name]:
            return self.global_name(kind[1], kind[2])
        return self.merged[self.files[module_name]][(local, self.identity(module_name, local))]

    def rewritten_source(self, module_name: str) -> str:
        """The module's source with its imports from inside the package pointed at the merged files (or dropped,
        where the name is in the same file) and its globals renamed as the merge needs."""
        module = self.parsed[module_name]
        lines = module.source.encode("utf-8").splitlines(keepends=True)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line))
        edits = []  # (start byte, end byte, text)

        def span(line: int, column: int, end_line: int, end_column: int, text: str) -> None:
            edits.append((starts[line - 1] + column, starts[end_line - 1] + end_column, text))

        for reference in module.references:
            if reference.id in module.bindings:
                new = self.global_name(module_name, reference.id)
                if new != reference.id:
                    span(reference.lineno, reference.col_offset, reference.end_lineno, reference.end_col_offset, new)
        direct = {id(node) for node in module.tree.body}
        package_imports = {id(node) for node, _, _ in module.imports}
        for node in _nodes_in_scope(module.tree.body):
            if isinstance(node, (*_FUNCTIONS, ast.ClassDef)):
                new = self.global_name(module_name, node.name)
                if new != node.name:
                    line = lines[node.lineno - 1]
                    keyword = line.index(b"class " if isinstance(node, ast.ClassDef) else b"def ", node.col_offset)
                    column = line.index(node.name.encode(), keyword)
                    span(node.lineno, column, node.lineno, column + len(node.name.encode()), new)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                new = self.global_name(module_name, node.name)
                if new != node.name:
                    line = lines[node.lineno - 1]
                    column = line.index(f" as {node.name}".encode(), node.col_offset) + len(" as ")
                    span(node.lineno, column, node.lineno, column + len(node.name.encode()), new)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in package_imports:
                for alias in node.names:
                    local = alias.asname or (alias.name if isinstance(node, ast.ImportFrom)
                                             else alias.name.split(".")[0])
                    new = self.global_name(module_name, local)
                    if new != local:
                        if "." in alias.name and not alias.asname:
                            raise ValueError(f"remote-code export: {module_name}: `import {alias.name}` binds a name "
                                             f"the merge must rename; import it with `as`")
                        span(alias.lineno, alias.col_offset, alias.end_lineno, alias.end_col_offset,
                             f"{alias.name} as {new}")
        for node, target, module_level in module.imports:
            same_file = self.files[target] == self.files[module_name]
            indent = " " * node.col_offset
            if same_file and module_level:
                # Its names are the other module's globals in this file, which the references above now name.
                if id(node) in direct:  # the whole line goes, a comment after the import with it
                    span(node.lineno, 0, node.end_lineno + 1, 0, "")
                    continue
                text = "pass"
            elif same_file:  # an import inside a function binds local names: bind them to the globals
                assignments = [f"{alias.asname or alias.name} = {self.global_name(target, alias.name)}"
                               for alias in node.names
                               if (alias.asname or alias.name) != self.global_name(target, alias.name)]
                text = "; ".join(assignments) or "pass"
            else:
                parts = []
                for alias in node.names:
                    local = alias.asname or alias.name
                    bound = self.global_name(module_name, local) if module_level else local
                    imported = self.global_name(target, alias.name)
                    parts.append(imported if imported == bound else f"{imported} as {bound}")
                text = _wrapped_import(f"from .{self.files[target]} import ", parts, indent)
            span(node.lineno, node.col_offset, node.end_lineno, node.end_col_offset, text)
        source = module.source.encode("utf-8")
        for start, end, text in sorted(edits, reverse=True):
            source = source[:start] + text.encode("utf-8") + source[end:]
        return source.decode("utf-8")


def _wrapped_import(head: str, parts: list[str], indent: str, width: int = 120) -> str:
    line = head + ", ".join(parts)
    if len(indent) + len(line) <= width:
        return line
    wrapped = textwrap.wrap(", ".join(parts), width - len(indent) - 4, break_on_hyphens=False)
    return head + "(\n" + "".join(f"{indent}    {part}\n" for part in wrapped) + f"{indent})"


def merge_modules(modules: dict[str, tuple[str, bool]], files: dict[str, str], anchors: dict[str, str] | None = None
                  ) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """Merge each group of ``modules`` (name -> (source, is_package)) that ``files`` (name -> file) puts together into
    one source. Imports between modules of one file are dropped, imports between files become single-dot imports,
    and globals are renamed where modules of one file clash (:class:`_Merge`). ``anchors`` names, for some files,
    the module whose names win clashes there (the one the file is named after). Returns ((module, module-level name)
    -> its name in its file, file -> source)."""
    root = _root_package(next(iter(modules)))
    parsed = {name: _parse_module(name, source, is_package, root) for name, (source, is_package) in modules.items()}
    anchors = anchors or {}
    members: dict[str, list[str]] = {}
    for name in modules:
        members.setdefault(files[name], []).append(name)
    _check_file_imports_acyclic(parsed, files)
    orders = {file: _file_order(names, parsed, files, anchors.get(file)) for file, names in members.items()}
    merge = _Merge(parsed, files, {file: sorted(order, key=lambda name: name != anchors.get(file))
                                   for file, order in orders.items()})
    sources = {}
    for file, order in orders.items():
        if len(order) == 1 and root != "ssm_hub":
            sources[file] = merge.rewritten_source(order[0])
            continue
        header = textwrap.fill(f"Generated by ssm_hub (ssm_hub.models.remote_code) for trust_remote_code, from "
                               f"{', '.join(order)}. Edit ssm_hub's sources, not this file.", 117)
        chunks = [f'"""{header}"""\n']
        chunks += [f"# {name}\n{merge.rewritten_source(name).strip()}\n" for name in order]
        sources[file] = "\n\n".join(chunks)
    global_names = {(name, local): merge.global_name(name, local)
                    for name, module in parsed.items() for local in module.bindings}
    return global_names, sources


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
    """Write the code bundle for ``model_or_config_class`` and a complete ``auto_map`` into config.json: the config's
    module and all it imports in ``configuration_<type>.py``; for a model, the model's in ``modeling_<type>.py``, the
    ops in OPS_FILE and the kernels in KERNELS_FILE."""
    save_directory = Path(save_directory)
    model_or_config_class = exportable_class(model_or_config_class)
    config_class = getattr(model_or_config_class, "config_class", None) or model_or_config_class
    config_module = config_class.__module__
    files, global_names, written = write_code_bundle(model_or_config_class.__module__, (config_module,),
                                                     save_directory)

    def reference(module: str, class_name: str) -> str:
        return f"{files[module]}.{global_names[(module, class_name)]}"

    config_path = save_directory / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        auto_map = {"AutoConfig": reference(config_module, config_class.__name__)}
        if model_or_config_class is not config_class:
            model_module = model_or_config_class.__module__
            for auto_class, class_name in getattr(sys.modules[model_module], AUTO_MAP_CLASSES_ATTRIBUTE).items():
                auto_map[auto_class] = reference(model_module, class_name)
        else:
            auto_map = {**config.get("auto_map", {}), **auto_map}
        config["auto_map"] = auto_map
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


def _code_bundle(main_module: str, anchors: tuple[str, ...]
                 ) -> tuple[dict[str, str], dict[tuple[str, str], str], dict[str, str]]:
    """(module -> file, (module, module-level name) -> its name in its file, file -> source) of ``main_module``,
    ``anchors`` (see _module_file_names) and every package module they import."""
    modules = collect_modules([main_module, *anchors])
    files = _module_file_names(modules, main_module, list(anchors))
    global_names, sources = merge_modules(modules, files, {files[name]: name for name in (main_module, *anchors)})
    return files, global_names, sources


# ssm_hub's own bundles, kept per process: the walk and the merge parse every module (about a second a save), and
# an installed package's sources do not change while it runs. Code loaded from a checkpoint is walked each time,
# since another checkpoint may bring other files under the same module names.
_ssm_hub_code_bundle = functools.lru_cache(maxsize=32)(_code_bundle)


def write_code_bundle(main_module: str, anchors: tuple[str, ...], save_directory: Path
                      ) -> tuple[dict[str, str], dict[tuple[str, str], str], list[Path]]:
    """Write the merged files of ``main_module`` and ``anchors`` in ``save_directory``; returns (module -> file name
    without ``.py``, (module, name) -> name in its file, the files written)."""
    bundle = _ssm_hub_code_bundle if _root_package(main_module) == "ssm_hub" else _code_bundle
    files, global_names, sources = bundle(main_module, tuple(anchors))
    written = []
    for file_name, source in sources.items():
        path = save_directory / f"{file_name}.py"
        path.write_text(source, encoding="utf-8")
        written.append(path)
    return dict(files), dict(global_names), written


def write_processing_remote_code(processing, save_directory: str | os.PathLike) -> list[Path]:
    """The code bundle for a processor or an image processor, with the ``auto_map`` entries that let
    AutoProcessor / AutoImageProcessor load it by trust_remote_code: a processor gets ``AutoProcessor`` at the top
    of processor_config.json and each of its image processors of ours ``AutoImageProcessor`` in its nested section;
    an image processor saved alone gets ``AutoImageProcessor`` in preprocessor_config.json. Sub-processors that are
    transformers' own classes need no entry."""
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.utils import IMAGE_PROCESSOR_NAME, PROCESSOR_NAME

    save_directory = Path(save_directory)
    processing_class = exportable_class(type(processing))
    # Each image processor of ours gets a file of its own, as transformers' image_processing_<type>.py.
    image_processors = () if isinstance(processing, ImageProcessingMixin) else tuple(
        exportable_class(type(part)).__module__ for part in map(processing.__getattribute__, processing.get_attributes())
        if isinstance(part, ImageProcessingMixin) and type(part).__module__.startswith(EXPORTABLE_PACKAGES))
    files, global_names, written = write_code_bundle(processing_class.__module__, image_processors, save_directory)
    written_files = set(files.values())

    def reference(cls: type) -> str | None:
        """The auto_map entry of ``cls`` or of the nearest of its ancestors whose code is in the bundle; None for
        transformers' own classes. Code loaded from a checkpoint is matched by its file: transformers loads each
        file an auto_map names as a module of its own, so the image processor that AutoImageProcessor loaded is
        not the class that the processor's module imported from the same file."""
        for ancestor in cls.__mro__:
            module = ancestor.__module__
            if module in files:
                return f"{files[module]}.{global_names[(module, ancestor.__name__)]}"
            if module.startswith("transformers_modules.") and module.rpartition(".")[2] in written_files:
                return f"{module.rpartition('.')[2]}.{ancestor.__name__}"
        if cls.__module__.startswith(EXPORTABLE_PACKAGES):
            raise ValueError(f"remote-code export: {cls.__module__}.{cls.__name__} is not in the code bundle of "
                             f"{processing_class.__name__} ({sorted(written_files)})")
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
