"""Hostile cases against the training app (issue 11, items 7 to 10): `--resume`
that silently changed the run, tampered checkpoints, data that loaded wrong or
crashed, options that gave a traceback. Each failed before its fix."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from fastvae.app import checkpoint, cli
from fastvae.app import train as train_module
from fastvae.app.data import Data, load_data
from fastvae.app.train import TrainConfig, fit
from fastvae.models import MLPVAE

SMALL = ["--hidden", "32", "16", "--latent-dim", "4", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(*args):
    return cli.main(["train", *args])


def one_line_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def rewrite(path, edit):
    """Apply ``edit(config, tensors)`` to a checkpoint and save it with a consistent
    hash: what someone who tampers with the file on purpose can do."""
    file = checkpoint.checkpoint_file(path)
    with safe_open(file, framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(header["config"])
    edit(config, tensors)
    text = json.dumps(config)
    save_file(tensors, file, metadata={"format": header["format"], "config": text,
                                       "sha256": checkpoint.content_hash(text, tensors)})


def weights(path):
    return checkpoint.model_state(checkpoint.load(path)[1])


# ---- item 7: --resume restores the run ---------------------------------------------


RUN = [*SMALL, "--anneal", "linear", "--anneal-epochs", "2", "--free-bits", "0.05",
       "--seed", "3", "--batch-size", "32", "--lr", "0.002"]


def test_readme_resume_continues_the_run_in_its_directory(tmp_path, monkeypatch):
    """`fastvae train --resume runs/x --epochs 80`, exactly as the README writes it:
    no other flag, and the result equals the uninterrupted run."""
    monkeypatch.chdir(tmp_path)
    assert train("--out", "full", *RUN, "--epochs", "3") == 0
    assert train("--out", "x", *RUN, "--epochs", "2") == 0
    assert train("--resume", "x", "--epochs", "3", "--no-progress") == 0
    assert sorted(os.listdir(tmp_path)) == ["full", "x"]  # nothing under the default runs/train
    full, resumed = checkpoint.load("full"), checkpoint.load("x")
    assert full[0]["train"]["history"] == resumed[0]["train"]["history"]
    assert full[0]["train"]["options"] == resumed[0]["train"]["options"]
    assert full[1].keys() == resumed[1].keys()
    for name, tensor in full[1].items():  # weights, Adam state and noise generator, bit for bit
        assert torch.equal(tensor, resumed[1][name]), name


def test_resume_flags_must_agree_with_the_saved_run(tmp_path, capsys):
    run = tmp_path / "run"
    np.save(tmp_path / "other.npy", np.random.default_rng(0).random((30, 64)).astype(np.float32))
    assert train("--out", str(run), *RUN, "--epochs", "1") == 0
    before = (run / checkpoint.FILENAME).read_bytes()
    for flags, named in ((["--seed", "4"], "--seed 4"), (["--batch-size", "16"], "--batch-size 16"),
                         (["--lr", "0.01"], "--lr 0.01"), (["--free-bits", "0"], "--free-bits"),
                         (["--anneal", "none"], "--anneal none"), (["--hidden", "32", "8"], "--hidden"),
                         (["--model", "ae"], "--model ae"), (["--recon", "mse"], "--recon mse"),
                         (["--data", str(tmp_path / "other.npy")], "differs from the data"),
                         (["--out", str(tmp_path / "elsewhere")], "--out")):
        code = train("--resume", str(run), "--epochs", "2", "--no-progress", *flags)
        one_line_error(capsys, code, named)
    assert (run / checkpoint.FILENAME).read_bytes() == before
    assert not (tmp_path / "elsewhere").exists()
    # flags that agree with the saved ones are accepted
    assert train("--resume", str(run), "--epochs", "2", *RUN) == 0
    assert [e["epoch"] for e in checkpoint.load(run)[0]["train"]["history"]] == [1, 2]


def test_resume_refuses_to_stretch_a_cyclical_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--out", str(run), *SMALL, "--anneal", "cyclical", "--cycles", "2", "--epochs", "2") == 0
    one_line_error(capsys, train("--resume", str(run), "--epochs", "3", "--no-progress"),
                   "--epochs 3", "cyclical")


def test_resume_refuses_other_data_under_the_same_name(tmp_path, capsys):
    data = tmp_path / "d.npy"
    rng = np.random.default_rng(0)
    np.save(data, rng.random((30, 12)).astype(np.float32))
    assert train("--out", str(tmp_path / "run"), "--data", str(data), *SMALL, "--epochs", "1") == 0
    moved = tmp_path / "moved.npy"
    os.replace(data, moved)  # the same data under another path is accepted
    assert train("--resume", str(tmp_path / "run"), "--data", str(moved), "--epochs", "2",
                 "--no-progress") == 0
    np.save(moved, rng.random((30, 12)).astype(np.float32))  # the file changed since
    one_line_error(capsys, train("--resume", str(tmp_path / "run"), "--epochs", "3", "--no-progress"),
                   "--data", "differs from the data the run was trained on")


# ---- item 8: checkpoints are checked before they are trusted -------------------------


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = MLPVAE((64,), latent_dim=4, hidden=(32, 16))
    checkpoint.save(tmp_path / "ckpt", model)
    return tmp_path / "ckpt"


def test_a_huge_config_is_refused_before_any_real_model_is_built(saved, monkeypatch, tmp_path, capsys):
    rewrite(saved, lambda config, tensors: config["model"].update(hidden=[2 ** 25, 64]))
    build = checkpoint.model_from_config

    def only_on_meta(config):
        if torch.empty(0).device.type != "meta":
            raise AssertionError(f"a real model was built from an unchecked config: {config}")
        return build(config)

    monkeypatch.setattr(checkpoint, "model_from_config", only_on_meta)
    with pytest.raises(ValueError, match=r"weights do not match its config: .*encoder\.1\.weight"):
        checkpoint.load_model(saved)
    one_line_error(capsys, cli.main(["export", str(saved), "--out", str(tmp_path / "onnx")]),
                   "weights do not match")


def test_flipped_weight_bytes_are_detected(saved):
    file = saved / checkpoint.FILENAME
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x10  # a bit of the last tensor's bytes
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupt"):
        checkpoint.load_model(saved)


def test_a_checkpoint_without_its_hash_is_refused(saved):
    file = str(saved / checkpoint.FILENAME)
    with safe_open(file, framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, file, metadata={"format": header["format"], "config": header["config"]})
    with pytest.raises(ValueError, match="SHA-256"):
        checkpoint.load_model(saved)


def _shrink(tensors, name):
    tensors[name] = tensors[name][:3].clone()


TAMPERED = [
    ("no-epoch", lambda c, t: c["train"].pop("epoch"), "train.epoch"),
    ("history-not-a-list", lambda c, t: c["train"].update(history="many"), "train.history"),
    ("no-options", lambda c, t: c["train"].pop("options"), "train.options"),
    ("bad-option", lambda c, t: c["train"]["options"].update(epochs="many"), "options"),
    ("world-size-0", lambda c, t: c["train"].update(world_size=0), "train.world_size"),
    ("lr-a-string", lambda c, t: c["train"]["optimizer"]["param_groups"][0].update(lr="fast"),
     "param_groups"),
    ("rng-wrong-size", lambda c, t: _shrink(t, "rng.noise.0"), "rng.noise.0"),
    ("rng-missing", lambda c, t: t.pop("rng.noise.0"), "rng.noise.0"),
    ("weight-wrong-shape", lambda c, t: _shrink(t, "model.encoder.1.weight"), "encoder.1.weight"),
    ("weight-extra", lambda c, t: t.update({"model.extra.weight": torch.zeros(2)}), "extra.weight"),
    ("weight-missing", lambda c, t: t.pop("model.decoder.0.bias"), "decoder.0.bias"),
    ("optim-wrong-shape", lambda c, t: _shrink(t, "optim.0.exp_avg"), "optim.0.exp_avg"),
    ("optim-extra", lambda c, t: t.update({"optim.99.exp_avg": torch.zeros(2)}), "optim.99.exp_avg"),
    ("optim-missing", lambda c, t: t.pop("optim.2.exp_avg_sq"), "optim.2.exp_avg_sq"),
    ("stray-tensor", lambda c, t: t.update({"payload": torch.zeros(2)}), "payload"),
    # values that passed the checks above and crashed the resumed run inside torch
    ("rng-not-a-state", lambda c, t: t["rng.noise.0"].zero_(), "rng.noise.0 is not a generator state"),
    ("amsgrad-a-string", lambda c, t: c["train"]["optimizer"]["param_groups"][0].update(
        amsgrad="no"), "amsgrad must be true or false"),
    ("seed-a-float", lambda c, t: c["train"]["options"].update(seed=1.5), "seed must be an int"),
    ("seed-too-large", lambda c, t: c["train"]["options"].update(seed=2**63),
     "seed must be in [-2**50, 2**50]"),
    ("optim-step-negative", lambda c, t: t["optim.0.step"].fill_(-5.0), "optim.0.step holds"),
    ("optim-sq-negative", lambda c, t: t["optim.1.exp_avg_sq"].fill_(-1.0), "optim.1.exp_avg_sq"),
    ("optim-avg-nan", lambda c, t: t["optim.1.exp_avg"].fill_(float("nan")), "optim.1.exp_avg"),
    ("lr-negative", lambda c, t: c["train"]["optimizer"]["param_groups"][0].update(lr=-1.0),
     "out of Adam's range"),
    # found by a third review: a world size of 10^8 took a minute and 8.8 GB listing the
    # generator states it lacked; a huge input shape printed torch's C++ stack trace; a
    # negative beta (which the command line refuses) trained
    ("world-size-huge", lambda c, t: c["train"].update(world_size=10**12),
     "lacks rng.noise.1: its train.world_size is 1000000000000, and it holds 1"),
    ("input-shape-huge", lambda c, t: c["model"].update(input_shape=[1, 2**40, 2**40]),
     "the model config is invalid"),
    ("model-beta-negative", lambda c, t: c["model"].update(beta=-1.0),
     "beta of a model must be >= 0"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train("--out", str(run), *SMALL, "--epochs", "1") == 0
    return run


@pytest.mark.parametrize("edit, field", [case[1:] for case in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_a_tampered_resume_checkpoint_is_a_one_line_error(trained, tmp_path, capsys, edit, field):
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoint.FILENAME).write_bytes((trained / checkpoint.FILENAME).read_bytes())
    rewrite(run, edit)
    before = (run / checkpoint.FILENAME).read_bytes()
    capsys.readouterr()
    one_line_error(capsys, train("--resume", str(run), "--epochs", "2", *SMALL), field)
    assert (run / checkpoint.FILENAME).read_bytes() == before


def test_free_bits_whose_batch_floor_passes_float32_are_a_one_line_error(tmp_path, capsys):
    """--free-bits 3e38 fits float32, but not times the batch size: torch's "value cannot be
    converted to type float without overflow" traceback came out of the first step."""
    run = tmp_path / "run"
    one_line_error(capsys, train("--out", str(run), *SMALL, "--free-bits", "3e38",
                                 "--batch-size", "2"),
                   "--free-bits times the batch size (3e+38 x 2) must be at most")
    assert not run.exists()
    with pytest.raises(ValueError, match="free_bits times the batch size"):
        TrainConfig(free_bits=2e38, batch_size=2)
    assert TrainConfig(free_bits=1.7e38, batch_size=2).free_bits == 1.7e38


# ---- item 9: 16-bit images -------------------------------------------------------------


def test_16_bit_pngs_are_scaled_by_their_depth(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 65536, size=(4, 8, 8), dtype=np.uint16)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    data = load_data(str(tmp_path))
    got = torch.cat([data.train, data.test])[:, 0].numpy()
    want = images.astype(np.float64) / 65535
    order = lambda a: a[np.argsort(a.reshape(len(a), -1).sum(1))]  # noqa: E731  (the split shuffles)
    np.testing.assert_allclose(order(got), order(want), rtol=1e-6, atol=0)


def test_float_images_are_refused_clearly(tmp_path, capsys):
    for i in range(3):
        Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / f"{i}.tif")
    one_line_error(capsys, train("--data", str(tmp_path), "--out", str(tmp_path / "run"), *SMALL),
                   "mode 'F'")


# ---- item 10: one-line errors instead of tracebacks ---------------------------------------


def test_samples_without_values_are_refused(tmp_path, capsys):
    np.save(tmp_path / "empty.npy", np.zeros((20, 0), np.float32))
    one_line_error(capsys, train("--data", str(tmp_path / "empty.npy"), "--out", str(tmp_path / "r"),
                                 *SMALL), "(20, 0)")
    assert not (tmp_path / "r").exists()


def test_a_decompression_bomb_is_refused(tmp_path, capsys, monkeypatch):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i}.png")
    # 64 pixels over twice the limit is what Pillow treats as a bomb; a real one would be huge
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    one_line_error(capsys, train("--data", str(tmp_path), "--out", str(tmp_path / "r"), *SMALL),
                   "decompression bomb")


@pytest.mark.parametrize("flags, named", [
    (["--device", "meta"], "--device"),
    (["--hidden", "1000000000"], "--hidden 1000000000"),
    # past what a tensor size can hold (a C++ stack trace from torch before)
    (["--hidden", "100000000000000000000"], "a layer is too large for a tensor"),
    (["--seed", "99999999999999999999"], "--seed must be in [0, 4294967295]"),
    (["--seed", "-1"], "--seed must be in"),
    # finite for Python, not for the float32 loss (a RuntimeError traceback before)
    (["--beta", "1e39"], "--beta must be >= 0 and at most float32's maximum"),
    (["--free-bits", "1e39"], "--free-bits must be >= 0 and at most float32's maximum"),
], ids=["device-meta", "hidden-huge", "hidden-past-int64", "seed-past-int64", "seed-negative",
        "beta-past-float32", "free-bits-past-float32"])
def test_impossible_options_are_refused_before_anything_is_written(tmp_path, capsys, flags, named):
    code = train("--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress", *flags)
    one_line_error(capsys, code, named)
    assert not (tmp_path / "r").exists()


def test_fewer_training_samples_than_processes_is_refused(monkeypatch):
    monkeypatch.setattr(train_module, "_world", lambda: (0, 2))
    x = torch.rand(2, 6)
    data = Data("two", x[:1], x[1:])
    with pytest.raises(ValueError, match="1 training sample.*fewer than the 2 processes"):
        fit(MLPVAE((6,), latent_dim=2, hidden=(4,)), data, TrainConfig(epochs=1), progress=False)


def test_an_empty_resume_is_a_missing_checkpoint_not_a_fresh_run(tmp_path, capsys, monkeypatch):
    """`--resume "$RUN"` with RUN unset trained a new run into runs/train and exited 0."""
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, train("--resume", "", "--epochs", "1", *SMALL), "checkpoint not found")
    assert not (tmp_path / "runs").exists()


def test_a_fresh_run_does_not_replace_a_config_json_of_another_kind(tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "config.json").write_text('{"mine": 1}')
    one_line_error(capsys, train("--out", str(out), "--epochs", "1", *SMALL),
                   "already holds a config.json", "--overwrite")
    assert (out / "config.json").read_text() == '{"mine": 1}'
    assert train("--out", str(out), "--epochs", "1", *SMALL, "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["model"]["class"] == "MLPVAE"


def test_a_diverged_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    """A NaN loss saved over the last good checkpoint and the run exited 0."""
    out = tmp_path / "run"
    assert train("--out", str(out), "--epochs", "1", *SMALL) == 0
    good = (out / checkpoint.FILENAME).read_bytes()
    real_epoch = train_module._train_one_epoch

    def diverging(run, cfg, state, epoch, log):  # what a too-large --lr does to the weights
        sums, beta = real_epoch(run, cfg, state, epoch, log)
        with torch.no_grad():
            for p in run.model.parameters():
                p.fill_(float("nan"))
        return sums.fill_(float("nan")), beta

    monkeypatch.setattr(train_module, "_train_one_epoch", diverging)
    capsys.readouterr()
    one_line_error(capsys, train("--resume", str(out), "--epochs", "3"),
                   "training diverged at epoch 2: loss is nan", "smaller learning rate",
                   "keeps the last epoch")
    assert (out / checkpoint.FILENAME).read_bytes() == good


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path, capsys):
    """--out was created up front and stayed behind, empty, when the first epoch diverged
    (found by a CLI review); a folder that existed before is kept."""
    out = tmp_path / "new" / "run"
    one_line_error(capsys, train("--out", str(out), "--epochs", "1", "--lr", "1e30", *SMALL),
                   "training diverged at epoch 1")
    assert not out.exists()
    out.mkdir(parents=True)
    one_line_error(capsys, train("--out", str(out), "--epochs", "1", "--lr", "1e30", *SMALL),
                   "training diverged at epoch 1")
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_run_with_a_seed_from_before_the_bound_resumes(trained, tmp_path, capsys):
    """A fresh run's --seed is 0..2^32-1, but runs trained before that bound (--seed -1) still
    resume with the seed they hold (the review of the bound found them refused)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / checkpoint.FILENAME).write_bytes((trained / checkpoint.FILENAME).read_bytes())
    rewrite(run, lambda c, t: c["train"]["options"].update(seed=-1))
    assert train("--resume", str(run), "--epochs", "2") == 0, capsys.readouterr().err
    assert checkpoint.load(run)[0]["train"]["options"]["seed"] == -1
