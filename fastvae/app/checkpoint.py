"""Checkpoints: safetensors tensors + a JSON config, no pickle, written atomically.

On-disk layout of a checkpoint directory (what ``fastvae train --out DIR`` writes)::

    DIR/checkpoint.safetensors   the checkpoint, one file:
        tensors  "model.<name>"    the model's state_dict
                 "optim.<i>.<key>" optimizer state tensors (training checkpoints)
                 "rng.<name>"      random generator states (uint8)
        header metadata (safetensors' str -> str dict):
                 "format" = "fastvae-checkpoint-2"
                 "config" = JSON: {"model": model.config(), "train": {...} or absent}
                 "sha256" = SHA-256 of the config and every tensor (``content_hash``)
    DIR/config.json              a readable copy of that JSON config

The loader reads the config from the safetensors header, which is written in
the same atomic step as the weights, so the two can never disagree.
``config.json`` is for people and other tools. The hash catches flipped bytes
(it is an integrity check, not a signature: whoever can write the file can
rehash it). Before a model is built, its config is compared with the stored
tensor shapes on PyTorch's meta device, which allocates nothing: a tampered
config cannot make the loader allocate more than the file holds.

Every file is written to a temporary file in the same directory, flushed to
disk, then moved over the old one with ``os.replace``: a crash mid-save leaves
the last good checkpoint in place.
"""

import hashlib
import json
import os
import tempfile

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastvae._io import atomic_write, atomic_write_text
from fastvae.models import model_from_config

FORMAT = "fastvae-checkpoint-2"
FILENAME = "checkpoint.safetensors"
CONFIG_FILENAME = "config.json"


def _cpu(t):
    """``t`` on the CPU, as safetensors saves it: a copy only where one is needed (another
    device, another layout, or a view into a larger storage, which safetensors refuses as
    shared memory). A copy of every weight doubled a save's peak memory (a model that fit
    for training ran out of memory at its first checkpoint)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


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
    if not os.access(file, os.R_OK):  # (safetensors reports that as "No such file or directory")
        raise PermissionError(f"checkpoint {file} is not readable (permission denied)")
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
    metadata = {"format": FORMAT, "config": text, "sha256": content_hash(text, all_tensors)}
    os.makedirs(directory, exist_ok=True)

    def write(tmp):
        try:
            save_file(all_tensors, tmp, metadata=metadata)
        except SafetensorError as err:  # safetensors' own type for a failed write (disk full, ...)
            raise OSError(str(err)) from None
        sort_header_metadata(tmp)

    atomic_write(os.path.join(directory, FILENAME), write)
    atomic_write_text(os.path.join(directory, CONFIG_FILENAME), text + "\n")


def sort_header_metadata(path):
    """Rewrite the header of the safetensors file at ``path`` in place with its metadata
    keys sorted: safetensors writes them in a hash map's random order (safetensors#584),
    so saving the same run twice gave files with different bytes (and checksums). The
    format: an 8-byte little-endian header length, then the JSON header (padded with
    spaces), then the tensor data, which the header locates by offsets into it. The same
    keys and values in another order serialize to the same length, so only the header's
    bytes change (nothing of the tensor data is read or copied)."""
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        if not header.get("__metadata__"):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # (not for safetensors' compact JSON: left as it wrote it)
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


def content_hash(config_text, tensors):
    """SHA-256 of a checkpoint's JSON config and of every tensor: name, dtype, shape, bytes."""
    digest = hashlib.sha256(config_text.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name}:{t.dtype}:{list(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load(path):
    """``(config, tensors)`` of a checkpoint (directory or file); tensors on CPU.
    The stored hash is checked: a changed byte anywhere is a ``ValueError``."""
    file = checkpoint_file(path)
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"{file} is not a readable safetensors checkpoint: {err}") from None
    if metadata.get("format") == "fastvae-checkpoint-1":
        raise ValueError(f"{file} was written by an older fastvae (format fastvae-checkpoint-1, no "
                         f"integrity hash); this fastvae reads {FORMAT!r} only")
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{file} is not a fastvae checkpoint (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    text = metadata.get("config")
    if not isinstance(text, str):
        raise ValueError(f"{file}: the checkpoint has no JSON config")
    if metadata.get("sha256") != content_hash(text, tensors):
        raise ValueError(f"{file} is corrupt: its config and tensors do not match the SHA-256 "
                         f"recorded when it was saved")
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{file}: the checkpoint's JSON config is unreadable: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{file}: the checkpoint's config has no 'model' object")
    return config, tensors


def model_state(tensors):
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def build_model(config, tensors, where):
    """The model of ``config`` with the weights in ``tensors``, after checking on the
    meta device (no memory) that the config's parameter shapes are the stored ones."""
    try:
        with torch.device("meta"):
            skeleton = model_from_config(config)
    except (TypeError, ValueError, KeyError, OverflowError, RuntimeError) as err:
        # (the first line: torch's own messages may carry a C++ stack trace below it)
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"{where}: the model config is invalid: {reason}") from None
    check_weights(skeleton, model_state(tensors), where)
    model = model_from_config(config)
    model.load_state_dict(model_state(tensors))
    return model


def check_weights(model, weights, where):
    """Refuse weights whose names or shapes are not ``model``'s, naming them."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in weights.items()}
    problems = [f"missing {k}" for k in expected if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in expected]
    problems += [f"{k} has shape {list(stored[k])}, the config needs {list(shape)}"
                 for k, shape in expected.items() if k in stored and stored[k] != shape]
    problems += [f"{k} has dtype {v.dtype}" for k, v in weights.items()
                 if k in expected and not v.is_floating_point()]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"{where}: weights do not match its config: {shown}")


def load_model(path, device="cpu"):
    """Load a trained model from a checkpoint directory or its ``checkpoint.safetensors``.

    Returns the ``fastvae.models`` model in eval mode on ``device``. See the module
    docstring for the layout on disk.
    """
    config, tensors = load(path)
    return build_model(config["model"], tensors, f"checkpoint {path}").to(device).eval()


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
