"""Training state without pickle: an optimizer's, a learning-rate scheduler's or the random generators' state as one
safetensors file, its tensors as tensors and everything around them (nesting, numbers, strings) as JSON in the
file's metadata.

    save_state(optimizer.state_dict(), "checkpoint-10/optimizer.safetensors")
    optimizer.load_state_dict(load_state("checkpoint-10/optimizer.safetensors"))

torch.save would pickle these states, and reading a pickle runs whatever code it names; reading this file runs none.
What pickle keeps and JSON does not is written out: tuples (``random.setstate`` takes nothing else), dictionary keys
that are not strings (an optimizer's state is keyed by parameter number) and numpy arrays (numpy's generator state),
each as a one-key object whose key starts with "$". A state holding anything else is refused, naming it.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

STRUCTURE_KEY = "structure"
"""The metadata entry of the file that holds the state's JSON, tensors replaced by their names in the file."""
_PLAIN = (str, int, float, bool, type(None))


def _encode(value, tensors: dict[str, torch.Tensor], where: str):
    """``value`` as JSON, its tensors and arrays added to ``tensors`` under the names the JSON gives them."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().contiguous()
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        name = str(len(tensors))
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value))
        return {"$ndarray": name}
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item, tensors, f"{where}[{index}]") for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: _encode(item, tensors, f"{where}[{key!r}]") for key, item in value.items()}
        for key in value:
            if not isinstance(key, _PLAIN):
                raise ValueError(f"{where} has the key {key!r} of type {type(key).__name__}; a saved state's keys "
                                 "must be strings, numbers, booleans or None")
        return {"$items": [[key, _encode(item, tensors, f"{where}[{key!r}]")] for key, item in value.items()]}
    raise ValueError(f"{where} is a {type(value).__name__}, which a state saved without pickle cannot hold (tensors, "
                     "numpy arrays, numbers, strings, booleans, None, lists, tuples and dicts only)")


def _decode(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, content), = value.items()
        if tag == "$tensor":
            return tensors[content]
        if tag == "$ndarray":
            return tensors[content].numpy()
        if tag == "$tuple":
            return tuple(_decode(item, tensors) for item in content)
        if tag == "$items":
            return {key: _decode(item, tensors) for key, item in content}
    return {key: _decode(item, tensors) for key, item in value.items()}


def save_state(state, path: str | Path) -> None:
    """Write ``state`` (nested dicts, lists and tuples of tensors, numpy arrays and plain values) to ``path``, a
    safetensors file. Raises ValueError naming the first part of ``state`` that it cannot hold."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "the state")
    save_file(tensors, str(path), metadata={STRUCTURE_KEY: json.dumps(structure)})


def load_state(path: str | Path, device: str | torch.device = "cpu"):
    """The state that :func:`save_state` wrote to ``path``, its tensors on ``device``."""
    with safe_open(str(path), framework="pt", device=str(device)) as file:
        metadata = file.metadata() or {}
        if STRUCTURE_KEY not in metadata:
            raise ValueError(f"{path} is a safetensors file without the '{STRUCTURE_KEY}' entry that a saved state "
                             "has: it was not written by ssm_hub.training.state_files.save_state")
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    return _decode(json.loads(metadata[STRUCTURE_KEY]), tensors)
