"""`fastvae demo`: the quick run writes every file with finite, consistent numbers;
a short real run shows the VAE generating better than the AE."""

import json
import math
import os

import pytest
import torch
from PIL import Image

from fastvae.app import checkpoint, cli, metrics
from fastvae.app.data import load_data
from fastvae.app.demo import make_ood, measure
from fastvae.app.train import TrainConfig, fit
from fastvae.models import MLPVAE, MLPAutoencoder
from fastvae.runtime import VAERuntime

FIVE = ("test_recon", "sample_confidence", "sample_coverage", "fid", "auroc")
PNGS = ("samples.png", "reconstructions.png", "interpolations.png", "loss_curves.png")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the demo sets 1 thread on CPU; leave others as they were


def test_quick_demo_writes_every_file(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out

    with open(out / "metrics.json") as f:
        results = json.load(f)
    for kind in ("ae", "vae"):
        assert all(math.isfinite(results[kind][k]) for k in FIVE), results[kind]
        assert 0 <= results[kind]["sample_coverage"] <= 1 and 0 <= results[kind]["auroc"] <= 1
    assert math.isfinite(results["vae"]["posterior_kl"])
    assert 0 <= results["onnx_max_rel_err"] < 1e-4
    assert results["onnx_max_rel_err"] == max(results["onnx_rel_err"].values())

    for name in PNGS:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    report = (out / "report.md").read_text()
    for name in PNGS:
        assert f"]({name})" in report
    for kind in ("ae", "vae"):  # the table shows the measured numbers
        assert f"{results[kind]['fid']:.4g}" in report
    for name in ("report.md", "metrics.json", *PNGS, "onnx"):
        assert f"wrote {out / name}" in printed

    # the exported VAE and the checkpoints are usable
    vae = checkpoint.load_model(out / "checkpoints" / "vae")
    assert isinstance(vae, MLPVAE)
    assert isinstance(checkpoint.load_model(out / "checkpoints" / "ae"), MLPAutoencoder)
    runtime = VAERuntime(out / "onnx")
    test = load_data("digits").test[:16]
    torch.testing.assert_close(torch.from_numpy(runtime.score(test.numpy())), vae.score(test).detach(),
                               rtol=1e-4, atol=1e-4)
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_the_demo_runs_again_into_its_own_directory(tmp_path, capsys):
    """`make demo` runs on a fresh machine and again: a second demo replaces the first's
    files (checkpoints and export included) instead of being refused like `fastvae train`."""
    out = tmp_path / "demo"
    quick = ["demo", "--quick", "--epochs", "1", "--samples", "10", "--out", str(out), "--no-progress"]
    assert cli.main([*quick, "--seed", "0"]) == 0
    first = (out / "checkpoints" / "vae" / checkpoint.FILENAME).read_bytes()
    assert cli.main([*quick, "--seed", "1"]) == 0
    assert (out / "checkpoints" / "vae" / checkpoint.FILENAME).read_bytes() != first
    with open(out / "metrics.json") as f:
        assert json.load(f)["settings"]["seed"] == 1
    VAERuntime(out / "onnx")  # the export was replaced whole and loads
    assert not [f for _, _, files in os.walk(out) for f in files if ".tmp" in f]
    # both checkpoints resume with `fastvae train` (the autoencoder's recorded the VAE's
    # linear KL schedule, refused as "--anneal applies to VAEs only")
    for kind in ("ae", "vae"):
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(out / "checkpoints" / kind), "--epochs", "2",
                         "--no-progress"]) == 0, capsys.readouterr().err


def test_a_foreign_onnx_folder_is_refused_before_training(tmp_path, capsys):
    """Found only after both models had trained, leaving checkpoints and no report."""
    (tmp_path / "demo" / "onnx").mkdir(parents=True)
    (tmp_path / "demo" / "onnx" / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not an earlier fastvae export" in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path / "demo")) == ["onnx"]


def test_unwritable_out_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "file" / "demo")]) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and len(err.strip().splitlines()) == 1


def test_a_bad_epoch_count_names_the_option(tmp_path, capsys):
    """It said "epochs must be >= 1" (TrainConfig's name for it), not --epochs."""
    assert cli.main(["demo", "--epochs", "0", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "--epochs must be >= 1, got 0" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "demo").exists()


def test_the_vae_generates_better_than_the_autoencoder():
    """The demo's claim on a short budget: same architecture and epochs, the VAE's
    prior samples are closer to real digits and its codes fit the prior."""
    torch.set_num_threads(1)
    data = load_data("digits")
    judge = metrics.train_classifier(data.train, data.train_labels, epochs=15)
    ood = make_ood(data.test, torch.Generator().manual_seed(0))
    cfg = TrainConfig(epochs=25, anneal="linear", anneal_epochs=5)
    results = {}
    for cls in (MLPAutoencoder, MLPVAE):
        torch.manual_seed(0)
        model = cls(data.input_shape, latent_dim=8)
        fit(model, data, cfg, progress=False)
        results[cls], _ = measure(model.eval(), data, judge, ood, n_samples=500, seed=0)
    ae, vae = results[MLPAutoencoder], results[MLPVAE]
    assert vae["fid"] < 0.5 * ae["fid"]
    assert vae["sample_coverage"] > ae["sample_coverage"]
    assert vae["aggregate_kl"] < ae["aggregate_kl"]
    assert ae["test_recon"] < vae["test_recon"]  # the price: the AE reconstructs better


def test_make_ood_is_deterministic_and_differs_from_the_digits():
    test = load_data("digits").test
    a = make_ood(test, torch.Generator().manual_seed(0))
    b = make_ood(test, torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    corrupted, mirrored = a
    changed = (corrupted != test).float().mean().item()
    assert 0.05 < changed < 0.15  # about 10% of pixels replaced
    assert torch.equal(mirrored, test[..., torch.arange(test.shape[-1] - 1, -1, -1)])
