"""A command's first status line comes before torch and transformers load (issue 22, point 4: ``ssm-hub train``
printed nothing for the seconds that importing them takes). The console script imports the ssm_hub package, which
says the line before its own imports; the tests run the installed script under ``python -X importtime``, whose
lines on stderr say when each module loads."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONSOLE_SCRIPT = shutil.which("ssm-hub", path=str(Path(sys.executable).parent)) or shutil.which("ssm-hub")


def run_console_script(tmp_path, command: str, **environment) -> list[str]:
    """stderr lines of ``ssm-hub COMMAND`` given arguments with which it fails after loading the library: convert a
    model that does not exist, train into a folder that holds a file of its own."""
    taken = tmp_path / "taken"
    taken.mkdir(exist_ok=True)
    (taken / "notes.txt").write_text("mine\n")
    arguments = {"convert": ["convert", str(tmp_path / "no-such-model"), str(tmp_path / "out")],
                 "train": ["train", "--config", "debug_mamba", f"train.output_dir={taken}"]}[command]
    completed = subprocess.run([sys.executable, "-X", "importtime", CONSOLE_SCRIPT, *arguments], capture_output=True,
                               text=True, timeout=300, cwd=tmp_path, env={**os.environ, **environment})
    assert completed.returncode == 2, completed.stderr
    return completed.stderr.splitlines()


def first_import(lines: list[str], module: str) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith("import time:") and line.split("|")[-1].strip()
                == module)


@pytest.mark.skipif(CONSOLE_SCRIPT is None, reason="the ssm-hub console script is not installed")
@pytest.mark.parametrize("command", ["convert", "train"])
def test_the_first_line_comes_before_torch_and_transformers_load(command, tmp_path):
    lines = run_console_script(tmp_path, command)
    said = [i for i, line in enumerate(lines) if not line.startswith("import time:")]
    assert lines[said[0]] == f"[0:00] ssm-hub {command}: loading torch and transformers"
    assert said[0] < first_import(lines, "torch") and said[0] < first_import(lines, "transformers")
    # The command went on to load the library and failed there, on one line.
    assert lines[said[-1]].startswith("ssm-hub: error:") and len(said) == 2


@pytest.mark.skipif(CONSOLE_SCRIPT is None, reason="the ssm-hub console script is not installed")
def test_transformers_quiet_mode_silences_the_first_line_too(tmp_path):
    """TRANSFORMERS_VERBOSITY=error turns the status lines off (ssm_hub.progress), the first one included, which is
    decided before transformers is imported."""
    lines = [line for line in run_console_script(tmp_path, "convert", TRANSFORMERS_VERBOSITY="error")
             if not line.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith("ssm-hub: error:")
