"""``ssm-hub push`` leaves the folder as it was and uploads an explicit list of files, and a network failure is one
line naming the endpoint (issue 22, points 1 and 2); against the local Hub stand-in of tests/hub, in process."""

import socket
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants
from test_cli_errors import error_line

import ssm_hub
from ssm_hub.cli import main
from ssm_hub.conversion.publishing.push import render_model_card

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hub"))
from hub_server import hub_server  # noqa: E402

OWN_CARD = b"# My model\n\nNotes I wrote by hand.\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


@pytest.fixture
def model_folder(tmp_path):
    """A tiny ssm_hub model saved with its code, next to a hand-written README.md and personal files."""
    folder = tmp_path / "model"
    ssm_hub.SsmHubMamba2ForCausalLM(ssm_hub.SsmHubMamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8, head_dim=16, num_heads=4, n_groups=1,
        chunk_size=8)).save_pretrained(folder)
    (folder / "README.md").write_bytes(OWN_CARD)
    (folder / "notes.txt").write_text("my password is hunter2\n")
    (folder / "personal.json").write_text('{"api_key": "secret"}\n')
    return folder


@pytest.fixture
def hub(monkeypatch):
    with hub_server() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("HF_TOKEN", "test-token")
        yield server


def test_push_leaves_the_folder_as_it_was_and_uploads_only_the_model(model_folder, hub, capsys):
    before = snapshot(model_folder)

    assert main(["push", str(model_folder), "me/tiny"]) == 0

    assert snapshot(model_folder) == before  # the hand-written README.md was not rewritten
    uploaded = hub.repos["me/tiny"]
    assert uploaded["README.md"] == OWN_CARD  # kept as the card (no --card replace)
    assert {"config.json", "model.safetensors", "modeling_mamba2.py"} <= set(uploaded)
    assert "notes.txt" not in uploaded and "personal.json" not in uploaded
    assert not any(name.startswith(".") for name in uploaded)
    assert "its own README.md as the card" in capsys.readouterr().out

    assert main(["push", str(model_folder), "me/tiny", "--card", "replace", "--include", "notes.txt"]) == 0

    assert snapshot(model_folder) == before
    uploaded = hub.repos["me/tiny"]
    assert uploaded["README.md"].decode() == render_model_card(model_folder, "me/tiny")
    assert "notes.txt" in uploaded and "personal.json" not in uploaded


def test_a_network_failure_during_push_is_one_line_naming_the_endpoint(model_folder, monkeypatch, capsys):
    with socket.socket() as unused:  # a port that nothing listens on
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "test-token")
    before = snapshot(model_folder)

    assert main(["push", str(model_folder), "me/tiny"]) == 2

    line = error_line(capsys)
    assert line.startswith(f"ssm-hub: error: cannot reach {endpoint} (ConnectError")
    assert "set HF_ENDPOINT (the Hub's address) / HF_TOKEN" in line
    assert snapshot(model_folder) == before
