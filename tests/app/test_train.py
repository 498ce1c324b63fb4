"""`fastvae train`: end to end, schedules, determinism, exact resume, DDP, bad input."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from fastvae.app import checkpoint, cli
from fastvae.app import train as train_module
from fastvae.app.data import load_data
from fastvae.app.train import TrainConfig, beta_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--hidden", "32", "16", "--channels", "8", "16", "--latent-dim", "4", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train(out, *args):
    return cli.main(["train", "--out", str(out), *SMALL, *args])


def weights(path):
    return checkpoint.model_state(checkpoint.load(path)[1])


def history(path):
    return checkpoint.load(path)[0]["train"]["history"]


@pytest.mark.parametrize("args", [
    ["--model", "vae", "--arch", "mlp", "--anneal", "linear", "--anneal-epochs", "2"],
    ["--model", "vae", "--arch", "conv", "--free-bits", "0.1", "--recon", "bce"],
    ["--model", "ae", "--arch", "mlp", "--recon", "mse"],
    ["--model", "ae", "--arch", "conv", "--amp", "on"],  # bf16 autocast (on CPU here)
], ids=["vae-mlp", "vae-conv", "ae-mlp", "ae-conv-amp"])
def test_train_end_to_end(tmp_path, capsys, args):
    assert train(tmp_path / "run", "--epochs", "2", *args) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "run" / checkpoint.FILENAME) in printed
    model = checkpoint.load_model(tmp_path / "run")
    assert model.config()["class"].startswith("MLP" if "mlp" in args else "Conv")
    assert model.is_vae == ("vae" in args)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    epochs = history(tmp_path / "run")
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(np.isfinite(e[k]) for e in epochs for k in ("loss", "recon", "kl", "test_loss"))


def test_training_learns(tmp_path):
    assert train(tmp_path, "--epochs", "6") == 0
    test_losses = [e["test_loss"] for e in history(tmp_path)]
    assert test_losses[-1] < 0.8 * test_losses[0]


def test_beta_schedules():
    linear = TrainConfig(epochs=10, beta=2.0, anneal="linear", anneal_epochs=4)
    assert [beta_at(linear, t) for t in (0, 1, 2, 4, 7)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    cyc = TrainConfig(epochs=8, beta=1.0, anneal="cyclical", cycles=2)  # two 4-epoch cycles
    assert [beta_at(cyc, t) for t in (0, 1, 2, 3, 4, 5, 6.5)] == [0, 0.5, 1, 1, 0, 0.5, 1]
    assert beta_at(TrainConfig(beta=0.3), 5) == 0.3


def test_seed_makes_training_deterministic(tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert train(tmp_path / name, "--epochs", "1", "--seed", seed) == 0
    a, b, c = (weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_equals_uninterrupted_training(tmp_path, monkeypatch):
    common = ["--epochs", "3", "--anneal", "cyclical", "--cycles", "2", "--free-bits", "0.05",
              "--seed", "3"]
    assert train(tmp_path / "full", *common) == 0

    save = train_module._save

    def save_then_crash(*args, **kwargs):  # the job dies right after its first checkpoint
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save", save_then_crash)
    assert train(tmp_path / "part", *common) == 130  # the command's exit code for Ctrl-C
    monkeypatch.setattr(train_module, "_save", save)
    assert [e["epoch"] for e in history(tmp_path / "part")] == [1]
    assert train(tmp_path / "part", *common, "--resume", str(tmp_path / "part")) == 0

    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert history(tmp_path / "full") == history(tmp_path / "part")
    t_full, t_part = checkpoint.load(tmp_path / "full")[1], checkpoint.load(tmp_path / "part")[1]
    assert all(torch.equal(t_full[k], t_part[k]) for k in t_full if k.startswith(("optim.", "rng.")))


def test_resume_can_extend_a_finished_run(tmp_path):
    assert train(tmp_path / "full", "--epochs", "3", "--anneal", "linear") == 0
    assert train(tmp_path / "part", "--epochs", "2", "--anneal", "linear") == 0
    assert train(tmp_path / "part", "--epochs", "3", "--anneal", "linear",
                 "--resume", str(tmp_path / "part" / checkpoint.FILENAME)) == 0
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def _rejected(capsys, code, match):
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    _rejected(capsys, train(out, "--data", str(tmp_path / "missing.npy")), "not found")
    (tmp_path / "corrupt.npy").write_bytes(b"junk")
    _rejected(capsys, train(out, "--data", str(tmp_path / "corrupt.npy")), "cannot read data file")
    np.save(tmp_path / "wide.npy", np.linspace(0, 3, 40, dtype=np.float32).reshape(10, 4))
    _rejected(capsys, train(out, "--data", str(tmp_path / "wide.npy")), "needs them in [0, 1]")
    np.save(tmp_path / "flat.npy", np.random.default_rng(0).random((10, 6)).astype(np.float32))
    _rejected(capsys, train(out, "--data", str(tmp_path / "flat.npy"), "--arch", "conv"),
              "(C, H, W) for a conv model")
    np.save(tmp_path / "odd.npy", np.random.default_rng(0).random((10, 1, 6, 6)).astype(np.float32))
    _rejected(capsys, train(out, "--data", str(tmp_path / "odd.npy"), "--arch", "conv"),
              "divisible by 2**len(channels)")
    _rejected(capsys, train(out, "--model", "ae", "--free-bits", "1"), "VAEs (--model vae) only")
    _rejected(capsys, train(out, "--model", "ae", "--beta", "3"), "--beta 3.0: applies to VAEs")
    # messages name the option as typed (they named TrainConfig's fields: "epochs must be")
    _rejected(capsys, train(out, "--epochs", "0"), "--epochs must be >= 1")
    # infinite options (an infinite --lr trained a NaN model and exited 0)
    for flag, value in (("--lr", "inf"), ("--anneal-epochs", "inf"), ("--lr", "nan")):
        _rejected(capsys, train(out, flag, value), f"{flag} must be finite")
    _rejected(capsys, train(out, "--free-bits", "inf"), "--free-bits must be >= 0")
    _rejected(capsys, train(out, "--beta", "-1"), "--beta must be >= 0")
    _rejected(capsys, train(out, "--resume", str(tmp_path / "nothing")), "checkpoint not found")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    _rejected(capsys, train(tmp_path / "file" / "out", "--epochs", "1"), "is not writable")
    _rejected(capsys, train(tmp_path / "file", "--epochs", "1"), "is not a directory")


def test_a_fresh_run_does_not_replace_a_saved_run(tmp_path, capsys, monkeypatch):
    """A second `fastvae train` into the --out of a saved run (the default runs/train
    included) used to replace its checkpoint silently; now it is refused, naming --out,
    --resume and --overwrite, unless --overwrite is given."""
    monkeypatch.chdir(tmp_path)
    saved = tmp_path / "runs" / "train" / checkpoint.FILENAME
    assert cli.main(["train", *SMALL, "--epochs", "1"]) == 0
    before = saved.read_bytes()
    capsys.readouterr()
    code = cli.main(["train", *SMALL, "--epochs", "1", "--seed", "5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for words in (f"--out {os.path.join('runs', 'train')} already holds a trained run",
                  f"--resume {os.path.join('runs', 'train')}", "--overwrite"):
        assert words in err, err
    assert saved.read_bytes() == before
    _rejected(capsys, cli.main(["train", "--resume", "runs/train", "--overwrite", "--epochs", "2"]),
              "--overwrite replaces a run and --resume continues it")
    assert saved.read_bytes() == before
    assert cli.main(["train", *SMALL, "--epochs", "1", "--seed", "5", "--overwrite"]) == 0
    assert checkpoint.load(saved)[0]["train"]["options"]["seed"] == 5


def test_resume_finds_the_data_file_from_another_directory(tmp_path, capsys, monkeypatch):
    """The checkpoint recorded the data path as typed: resuming a `--data my.npy` run from
    another working directory failed with "data file not found: my.npy", no word of --data."""
    np.save(tmp_path / "my.npy", np.random.default_rng(0).random((30, 12)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    assert train("run", "--data", "my.npy", "--epochs", "1") == 0
    recorded = lambda: checkpoint.load(tmp_path / "run")[0]["train"]["data"]["name"]  # noqa: E731
    assert recorded() == os.path.realpath(tmp_path / "my.npy")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--no-progress"]) == 0
    # moved since: the error says where it looked and how to go on
    os.replace(tmp_path / "my.npy", tmp_path / "moved.npy")
    _rejected(capsys, cli.main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3",
                                "--no-progress"]), f"the run's data {recorded()} is not there; pass --data")
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--no-progress",
                     "--data", "../moved.npy"]) == 0
    assert recorded() == os.path.realpath(tmp_path / "moved.npy")
    assert train(tmp_path / "digits", "--epochs", "1") == 0  # a named data set stays a name
    assert checkpoint.load(tmp_path / "digits")[0]["train"]["data"]["name"] == "digits"


def _fake_torchvision_mnist(monkeypatch):
    """torchvision.datasets.MNIST's interface (root, train=, download=) -> .data (N, 28, 28)
    uint8 and .targets, serving fixed images where ``root``/MNIST exists (torchvision is
    not a dependency here)."""
    class FakeMNIST:
        def __init__(self, root, train, download):
            if not os.path.isdir(os.path.join(root, "MNIST")):
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            n = 24 if train else 8
            gen = torch.Generator().manual_seed(n)
            self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)
            self.targets = torch.arange(n) % 10

    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST = FakeMNIST
    vision = types.ModuleType("torchvision")
    vision.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", vision)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)


def test_resume_reads_a_torchvision_set_from_the_recorded_root(tmp_path, capsys, monkeypatch):
    """`--data mnist --data-root DIR` then `--resume` from another working directory
    looked for the files under ./data (--data-root was not recorded) and failed."""
    _fake_torchvision_mnist(monkeypatch)
    (tmp_path / "sets" / "MNIST").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert train("run", "--data", "mnist", "--data-root", "sets", "--epochs", "1") == 0
    recorded = checkpoint.load(tmp_path / "run")[0]["train"]["data"]
    assert recorded["name"] == "mnist"
    assert os.path.realpath(recorded["root"]) == os.path.realpath(tmp_path / "sets")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2",
                     "--no-progress"]) == 0
    assert len(history(tmp_path / "run")) == 2
    # an explicit --data-root wins; one that holds nothing is a one-line error naming the flag
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--no-progress",
                     "--data-root", "nowhere"]) != 0
    err = capsys.readouterr().err
    assert "mnist files not found under 'nowhere'" in err and "--data-root" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert len(history(tmp_path / "run")) == 2


def test_resume_of_another_architecture_is_refused(tmp_path, capsys):
    assert train(tmp_path / "vae", "--epochs", "1") == 0
    before = (tmp_path / "vae" / checkpoint.FILENAME).read_bytes()
    for other in (["--arch", "conv"], ["--model", "ae"], ["--latent-dim", "5"]):
        code = cli.main(["train", "--out", str(tmp_path / "vae"), *SMALL, *other, "--epochs", "2",
                         "--resume", str(tmp_path / "vae")])
        _rejected(capsys, code, "differs from the resumed run")
    assert (tmp_path / "vae" / checkpoint.FILENAME).read_bytes() == before


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """Two gloo processes, each taking half of every batch, average their gradients:
    for an AE (no sampling noise) that equals one process on the whole batch."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "d.npy", rng.random((80, 12)).astype(np.float32))  # 64 train = 4 batches
    args = ["train", "--data", str(tmp_path / "d.npy"), "--model", "ae", "--batch-size", "16",
            "--epochs", "2", "--hidden", "16", "--latent-dim", "3", "--no-progress",
            "--device", "cpu"]  # gloo on the CPU, also where there is a GPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastvae", *args, "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("checkpoint:") == 1  # only rank 0 reports and saves
    assert cli.main([*args, "--out", str(tmp_path / "single")]) == 0
    config, tensors = checkpoint.load(tmp_path / "ddp")
    assert config["train"]["world_size"] == 2 and {"rng.noise.0", "rng.noise.1"} <= set(tensors)
    ddp, single = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-5)
    for a, b in zip(history(tmp_path / "ddp"), history(tmp_path / "single")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_train_then_export_then_infer(tmp_path):
    """The command line chain: a trained checkpoint goes through `fastvae export`
    and `fastvae infer`, and the scores match the PyTorch model's."""
    assert train(tmp_path / "run", "--epochs", "1", "--arch", "conv") == 0
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "onnx")]) == 0
    test = load_data("digits").test[:20]
    np.save(tmp_path / "test.npy", test.numpy())
    assert cli.main(["infer", str(tmp_path / "onnx"), "--score", str(tmp_path / "test.npy"),
                     "--out", str(tmp_path / "scores.npy")]) == 0
    expected = checkpoint.load_model(tmp_path / "run").score(test).detach().numpy()
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), expected, rtol=1e-4)


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="LOCAL_RANK is 1 but this machine has 1 CUDA device"):
        with train_module.distributed(torch.device("cuda")):
            pass


def test_progress_in_a_log_is_one_line_per_epoch(tmp_path, capsys):
    small = [a for a in SMALL if a != "--no-progress"]
    assert cli.main(["train", "--out", str(tmp_path), *small, "--epochs", "3"]) == 0
    err = capsys.readouterr().err  # not a terminal under pytest: no live bar
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line.split(": epoch ")[1].split()[0] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "\r" not in err and all("test_loss" in line for line in lines)


def test_anneal_epochs_takes_a_fraction(tmp_path):
    """--anneal-epochs is a float (its default used to be the int 10, so argparse took ints only)."""
    assert train(tmp_path, "--epochs", "1", "--anneal", "linear", "--anneal-epochs", "1.5") == 0
    config = checkpoint.load(tmp_path)[0]["train"]
    assert config["options"]["anneal_epochs"] == 1.5
    steps = config["step"]
    assert config["history"][0]["beta"] == pytest.approx(beta_at(TrainConfig(anneal="linear",
                                                                             anneal_epochs=1.5),
                                                                  (steps - 1) / steps))


def test_train_config_takes_numpy_numbers_as_python_ones():
    """numpy scalars are numbers (the type checks refused them); stored as Python's, they
    keep the checkpoint's JSON valid."""
    import json

    cfg = TrainConfig(epochs=np.int64(3), lr=np.float32(1e-3), seed=np.int64(1))
    assert type(cfg.epochs) is int and type(cfg.lr) is float and type(cfg.seed) is int
    json.dumps(vars(cfg))
    with pytest.raises(TypeError, match="epochs must be an int, got float"):
        TrainConfig(epochs=2.5)
