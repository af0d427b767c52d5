"""transformers' own common model tests, fetched from the installed version's source distribution at test time.

The wheel of transformers carries no tests; its source distribution on PyPI carries the top-level
``tests/test_*_common.py`` and mixin files (not ``tests/models`` nor ``tests/generation``). They are downloaded with
pip into a cache in the temporary directory (one download per transformers version, shared by later runs) and
imported as the package ``transformers_common_tests``, never copied into this repository. When the download is
impossible (no network, no pip) :func:`load_common_tests` skips the calling test module and says why.
"""

import importlib
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import transformers

PACKAGE_NAME = "transformers_common_tests"
DOWNLOAD_TIMEOUT_S = 300
CACHE_ROOT = Path(tempfile.gettempdir()) / "ssm_hub_transformers_tests"


def _download_tests(version: str, destination: Path) -> None:
    """Download transformers==version's source distribution and extract its tests/ folder into destination."""
    with tempfile.TemporaryDirectory(dir=CACHE_ROOT) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", f"transformers=={version}", "--no-binary", ":all:", "--no-deps",
            "--disable-pip-version-check", "-d", scratch,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        archives = list(Path(scratch).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            last_lines = " | ".join((result.stderr or result.stdout).strip().splitlines()[-2:])
            raise RuntimeError(f"pip download of transformers=={version}'s source distribution failed: {last_lines}")
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(archives[0]) as archive:
            members = [member for member in archive.getmembers() if member.name.startswith(prefix)]
            archive.extractall(scratch, members=members, filter="data")
        # Renaming the finished folder into place keeps a concurrent or interrupted run from seeing half a tree.
        try:
            Path(scratch, prefix).rename(destination)
        except OSError:
            if not (destination / "test_modeling_common.py").is_file():
                raise


def _install_placeholder_module(name: str, class_name: str) -> None:
    """test_modeling_common imports a mixin from a folder the source distribution lacks (tests/generation,
    tests/exporters); an empty class of that name lets it import, and the tests of that mixin are simply absent."""
    module = types.ModuleType(name)
    setattr(module, class_name, type(class_name, (), {"__doc__": "Not in transformers' source distribution."}))
    sys.modules[name] = module


def _import_tests_package(tests_dir: Path) -> None:
    spec = importlib.util.spec_from_loader(PACKAGE_NAME, loader=None, is_package=True)
    package = importlib.util.module_from_spec(spec)
    package.__path__ = [str(tests_dir)]
    sys.modules[PACKAGE_NAME] = package
    for folder in ("generation", "exporters"):
        folder_package = types.ModuleType(f"{PACKAGE_NAME}.{folder}")
        folder_package.__path__ = []
        sys.modules[folder_package.__name__] = folder_package
    _install_placeholder_module(f"{PACKAGE_NAME}.generation.test_utils", "GenerationTesterMixin")
    _install_placeholder_module(f"{PACKAGE_NAME}.exporters.test_export", "ExportTesterMixin")


def load_common_tests() -> types.SimpleNamespace:
    """ModelTesterMixin and TrainingTesterMixin of the installed transformers; skips the calling module when they
    cannot be fetched."""
    version = transformers.__version__
    tests_dir = CACHE_ROOT / f"transformers-{version}-tests"
    if PACKAGE_NAME not in sys.modules:
        if not (tests_dir / "test_modeling_common.py").is_file():
            CACHE_ROOT.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tests_dir, ignore_errors=True)
            try:
                _download_tests(version, tests_dir)
            except (OSError, RuntimeError, subprocess.SubprocessError, tarfile.TarError) as error:
                pytest.skip(
                    f"transformers {version}'s common tests could not be downloaded from PyPI: {error}",
                    allow_module_level=True,
                )
        _import_tests_package(tests_dir)
    try:
        # Their marks (flash_attn_test, torch_compile_test ...) are registered in transformers' own conftest.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
            modeling_common = importlib.import_module(f"{PACKAGE_NAME}.test_modeling_common")
            training_mixin = importlib.import_module(f"{PACKAGE_NAME}.test_training_mixin")
    except ImportError as error:
        pytest.skip(f"transformers {version}'s common tests do not import here: {error}", allow_module_level=True)
    return types.SimpleNamespace(
        ModelTesterMixin=modeling_common.ModelTesterMixin, TrainingTesterMixin=training_mixin.TrainingTesterMixin
    )
