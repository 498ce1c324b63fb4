"""fastvae.checkpoint: safetensors + JSON round trips, atomic saves, clear errors."""

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastvae.app import checkpoint
from fastvae.models import MLPVAE, ConvVAE, MLPAutoencoder


def _trained_optimizer(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model.loss(torch.rand(4, *model.input_shape)).loss.backward()
        opt.step()
    return opt


def test_round_trip_from_directory_and_file(tmp_path):
    torch.manual_seed(0)
    model = ConvVAE((1, 8, 8), latent_dim=3, recon="bce_logits", beta=0.5)
    checkpoint.save(tmp_path, model, train={"epoch": 4})
    x = torch.rand(5, 1, 8, 8)
    for path in (tmp_path, tmp_path / checkpoint.FILENAME, str(tmp_path)):
        loaded = checkpoint.load_model(path)
        assert isinstance(loaded, ConvVAE) and not loaded.training
        assert loaded.config() == model.config()
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v)
        torch.testing.assert_close(loaded.score(x), model.score(x), rtol=0, atol=0)
    # the readable copy agrees with the header the loader uses
    with open(tmp_path / checkpoint.CONFIG_FILENAME) as f:
        assert json.load(f) == checkpoint.load(tmp_path)[0] == {"model": model.config(),
                                                               "train": {"epoch": 4}}


def test_file_is_plain_safetensors_without_pickle(tmp_path):
    checkpoint.save(tmp_path, MLPAutoencoder((6,), latent_dim=2, hidden=(4,)))
    raw = (tmp_path / checkpoint.FILENAME).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])  # safetensors: u64 length + JSON header + bytes
    assert header["__metadata__"]["format"] == checkpoint.FORMAT
    assert all(k.startswith("model.") for k in header if k != "__metadata__")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / checkpoint.FILENAME).st_mode & 0o777 == 0o666 & ~umask


def test_the_same_checkpoint_is_the_same_bytes(tmp_path):
    """safetensors writes its header metadata in a hash map's random order, so two saves
    of one run differed in their bytes (5 distinct files in 10 saves of one checkpoint);
    the header's metadata keys are now sorted, and the file stays plain safetensors."""
    torch.manual_seed(4)
    model = ConvVAE((1, 8, 8), latent_dim=3)
    opt = _trained_optimizer(model)
    tensors, rest = checkpoint.flatten_optimizer(opt.state_dict())
    files = set()
    for i in range(8):
        checkpoint.save(tmp_path / str(i), model, tensors=tensors, train={"optimizer": rest})
        files.add((tmp_path / str(i) / checkpoint.FILENAME).read_bytes())
    assert len(files) == 1
    raw = files.pop()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0
    header = json.loads(raw[8:8 + header_len])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(tmp_path / "0" / checkpoint.FILENAME), framework="pt") as f:
        assert f.metadata()["format"] == checkpoint.FORMAT
        for k, v in model.state_dict().items():
            assert torch.equal(f.get_tensor(f"model.{k}"), v)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(1)
    model = MLPAutoencoder((6,), latent_dim=2, hidden=(5,))
    opt = _trained_optimizer(model)
    tensors, rest = checkpoint.flatten_optimizer(opt.state_dict())
    checkpoint.save(tmp_path, model, tensors=tensors, train={"optimizer": rest})
    config, loaded_tensors = checkpoint.load(tmp_path)
    model2 = checkpoint.load_model(tmp_path).train()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(checkpoint.unflatten_optimizer(loaded_tensors, config["train"]["optimizer"]))
    x = torch.rand(4, 6)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m.loss(x).loss.backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(2)
    good = MLPAutoencoder((6,), latent_dim=2, hidden=(4,))
    checkpoint.save(tmp_path, good, train={"epoch": 1})
    before = sorted(os.listdir(tmp_path))

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # e.g. the job is killed while writing

    monkeypatch.setattr(checkpoint, "save_file", crash)
    newer = MLPAutoencoder((6,), latent_dim=2, hidden=(4,))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, newer, train={"epoch": 2})
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left behind
    config, tensors = checkpoint.load(tmp_path)
    assert config["train"] == {"epoch": 1}
    assert torch.equal(checkpoint.model_state(tensors)["encoder.1.weight"],
                       good.state_dict()["encoder.1.weight"])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.safetensors in directory"):
        checkpoint.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        checkpoint.load_model(corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a fastvae checkpoint"):
        checkpoint.load_model(foreign)
    # weights that do not fit the config
    mismatched = tmp_path / "mismatched.safetensors"
    model = MLPAutoencoder((6,), latent_dim=2, hidden=(4,))
    config = json.dumps({"model": MLPAutoencoder((6,), latent_dim=3, hidden=(4,)).config()})
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_file(tensors, str(mismatched), metadata={
        "format": checkpoint.FORMAT, "config": config,
        "sha256": checkpoint.content_hash(config, tensors)})  # consistent, but the wrong shapes
    with pytest.raises(ValueError, match="weights do not match its config"):
        checkpoint.load_model(mismatched)
    with safe_open(str(mismatched), framework="pt") as f:  # the file itself is fine
        assert f.metadata()["format"] == checkpoint.FORMAT


def test_prepare_dir(tmp_path):
    target = tmp_path / "a" / "b"
    assert checkpoint.prepare_dir(target) == str(target) and target.is_dir()
    assert os.listdir(target) == []  # the write probe is removed
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        checkpoint.prepare_dir(blocker)
    with pytest.raises(ValueError, match="is not writable"):
        checkpoint.prepare_dir(blocker / "sub")


def test_saving_copies_only_the_tensors_that_need_it(tmp_path):
    """Every weight was cloned on save, doubling a save's peak memory: a model that fit for
    training ran out of memory at its first checkpoint. A CPU tensor that owns its storage is
    saved as it is; a view into a larger storage (which safetensors refuses as shared) and a
    non-contiguous one are copied."""
    whole = torch.randn(4, 6)
    assert checkpoint._cpu(whole).data_ptr() == whole.data_ptr()
    for view in (whole[1:3], whole.t()):
        copy = checkpoint._cpu(view)
        assert torch.equal(copy, view) and copy.data_ptr() != whole.data_ptr()
        assert copy.untyped_storage().nbytes() == copy.numel() * copy.element_size()
    model = MLPVAE((4,), hidden=(3,))
    checkpoint.save(tmp_path, model, tensors={"extra.a": whole[:2], "extra.b": whole[2:]})
    config, tensors = checkpoint.load(tmp_path)
    assert torch.equal(tensors["extra.a"], whole[:2]) and torch.equal(tensors["extra.b"], whole[2:])
