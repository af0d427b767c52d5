"""The merge behind the trust_remote_code export (ssm_hub.models.remote_code.merge_modules): modules merged into one
file behave as they did apart, whatever names they share. A small package is written to disk twice, as modules and
merged, and both are imported."""

import importlib
import sys
import textwrap

import pytest

from ssm_hub.models.remote_code import merge_modules

A = '''
"""Module a: the anchor of file ab, so its names win clashes there."""
import math

LIMIT = 3

try:
    import json
except ImportError as error:
    raise ImportError("no json") from error


def helper(x):
    return x + LIMIT


def min(values):  # a name of a builtin that module b calls
    return "a.min"
'''

B = '''
"""Module b: shares names with a in file ab."""
from pkg.a import LIMIT as A_LIMIT

LIMIT = 10

try:
    import math as m
except ImportError as error:
    raise ImportError("no math") from error


def helper(x):
    return min(x, LIMIT)


def limits():
    return A_LIMIT, LIMIT


def shadow(LIMIT):
    return LIMIT + sum(LIMIT for LIMIT in range(3))


def uses_lazy_imports():
    from pkg.a import helper as a_helper
    from pkg.c import SCALE
    return a_helper(1) * SCALE


class Thing:
    LIMIT = 100

    def limit(self):
        return LIMIT, self.LIMIT
'''

C = '''
"""Module c: a file of its own importing from file ab."""
from pkg.a import helper

SCALE = 2


def combined(x):
    from pkg.b import helper as b_helper
    return helper(x) + b_helper(x)
'''


def import_package(folder, package: str, files: dict[str, str]):
    """Write ``files`` (name -> source) as ``package`` in ``folder`` (which is on sys.path) and import its modules."""
    (folder / package).mkdir()
    (folder / package / "__init__.py").write_text("")
    for name, source in files.items():
        (folder / package / f"{name}.py").write_text(source)
    return {name: importlib.import_module(f"{package}.{name}") for name in files}


@pytest.fixture
def merged(tmp_path, monkeypatch):
    """The modules imported apart (package pkg, which they import by name) and a lookup of their names in the
    merged files (package merged_pkg, whose files import each other by relative imports)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = {"pkg.a": (A, False), "pkg.b": (B, False), "pkg.c": (C, False)}
    files = {"pkg.a": "ab", "pkg.b": "ab", "pkg.c": "c"}
    global_names, sources = merge_modules(modules, files, {"ab": "pkg.a"})
    separate = import_package(tmp_path, "pkg", {"a": A, "b": B, "c": C})
    together = import_package(tmp_path, "merged_pkg", sources)

    def merged_name(module: str, name: str):
        return getattr(together[files[f"pkg.{module}"]], global_names[(f"pkg.{module}", name)])

    yield separate, merged_name, sources
    for name in [name for name in sys.modules if name.split(".")[0] in ("pkg", "merged_pkg")]:
        del sys.modules[name]


def test_merged_modules_behave_as_the_separate_ones(merged):
    separate, merged_name, sources = merged
    assert set(sources) == {"ab", "c"}
    for module, name, arguments in [("a", "helper", (4,)), ("b", "helper", (50,)), ("b", "helper", (5,)),
                                    ("a", "min", ([1],)), ("b", "shadow", (7,)), ("b", "limits", ()), ("b", "uses_lazy_imports", ()),
                                    ("c", "combined", (5,))]:
        assert merged_name(module, name)(*arguments) == getattr(separate[module], name)(*arguments), (module, name)
    assert merged_name("b", "Thing")().limit() == separate["b"].Thing().limit() == (10, 100)
    assert merged_name("a", "LIMIT") == 3 and merged_name("b", "LIMIT") == 10


def test_the_anchor_keeps_its_names_and_clashing_names_of_others_are_renamed(merged):
    _, merged_name, sources = merged
    assert merged_name("a", "helper").__name__ == "helper"
    assert merged_name("b", "helper").__name__ == "helper__b"
    # a's `min` would hide the builtin that b calls.
    assert merged_name("a", "min").__name__ == "min__a"
    assert "from .ab import helper" in sources["c"]
    assert "import pkg" not in sources["ab"] and "from pkg" not in sources["c"]


def test_a_global_statement_is_refused():
    source = textwrap.dedent('''
        COUNT = 0

        def bump():
            global COUNT
            COUNT += 1
        ''')
    with pytest.raises(ValueError, match="pkg.a uses `global`"):
        merge_modules({"pkg.a": (source, False), "pkg.b": (B, False)}, {"pkg.a": "ab", "pkg.b": "ab"})
