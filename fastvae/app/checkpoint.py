"""Checkpoints: safetensors tensors + a JSON config, no pickle, written atomically.

On-disk layout of a checkpoint directory (what ``fastvae train --out DIR`` writes)::

    DIR/checkpoint.safetensors   the checkpoint, one file:
        tensors  "model.<name>"    the model's state_dict
                 "optim.<i>.<key>" optimizer state tensors (training checkpoints)
                 "rng.<name>"      random generator states (uint8)
        header metadata (safetensors' str -> str dict):
                 "format" = "fastvae-checkpoint-1"
                 "config" = JSON: {"model": model.config(), "train": {...} or absent}
    DIR/config.json              a readable copy of that JSON config

The loader reads the config from the safetensors header, which is written in
the same atomic step as the weights, so the two can never disagree.
``config.json`` is for people and other tools.

Every file is written to a temporary file in the same directory, flushed to
disk, then moved over the old one with ``os.replace``: a crash mid-save leaves
the last good checkpoint in place.
"""

import json
import os
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastvae._io import atomic_write, atomic_write_text
from fastvae.models import model_from_config

FORMAT = "fastvae-checkpoint-1"
FILENAME = "checkpoint.safetensors"
CONFIG_FILENAME = "config.json"


def _cpu(t):
    return t.detach().to("cpu").contiguous().clone()


def flatten_optimizer(state_dict):
    """``optimizer.state_dict()`` -> (tensors, JSON-able rest)."""
    tensors, rest = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = _cpu(value)
            else:
                rest["state"].setdefault(str(index), {})[key] = value
    return tensors, rest


def unflatten_optimizer(tensors, rest):
    state = {int(i): dict(values) for i, values in rest["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def checkpoint_file(path):
    """The checkpoint file for ``path`` (a checkpoint directory or the file itself)."""
    path = os.fspath(path)
    file = os.path.join(path, FILENAME) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        where = f"no {FILENAME} in directory {path}" if os.path.isdir(path) else f"{path} does not exist"
        raise FileNotFoundError(f"checkpoint not found: {where}")
    return file


def save(directory, model, *, tensors=None, train=None):
    """Write ``model`` (plus extra training ``tensors`` and the JSON-able ``train``
    state) as ``directory/checkpoint.safetensors`` and ``directory/config.json``."""
    config = {"model": model.config()}
    if train is not None:
        config["train"] = train
    text = json.dumps(config, indent=1)
    all_tensors = {f"model.{k}": _cpu(v) for k, v in model.state_dict().items()}
    all_tensors.update({k: _cpu(v) for k, v in (tensors or {}).items()})
    metadata = {"format": FORMAT, "config": text}
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, FILENAME),
                 lambda tmp: save_file(all_tensors, tmp, metadata=metadata))
    atomic_write_text(os.path.join(directory, CONFIG_FILENAME), text + "\n")


def load(path):
    """``(config, tensors)`` of a checkpoint (directory or file); tensors on CPU."""
    file = checkpoint_file(path)
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable safetensors checkpoint: {err}") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{file} is not a fastvae checkpoint (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: the checkpoint's JSON config is unreadable: {err}") from None
    return config, tensors


def model_state(tensors):
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def load_model(path, device="cpu"):
    """Load a trained model from a checkpoint directory or its ``checkpoint.safetensors``.

    Returns the ``fastvae.models`` model in eval mode on ``device``. See the module
    docstring for the layout on disk.
    """
    config, tensors = load(path)
    model = model_from_config(config["model"])
    try:
        model.load_state_dict(model_state(tensors))
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path}: weights do not match its config: {err}") from None
    return model.to(device).eval()


def prepare_dir(path, what="--out"):
    """Create output directory ``path`` (and parents) and check that files can be
    written in it, with a clear error otherwise. Call it before expensive work."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable: {err.strerror or err}") from None
    return path
