"""The new likelihoods in the models and `fastvae train`: --recon gaussian, laplace,
continuous_bernoulli and --obs-logvar learned|optimal|FLOAT, through checkpoints,
resume and the ONNX export."""

import json
import math

import numpy as np
import pytest
import torch

from fastvae import _numerics
from fastvae.app import checkpoint, cli
from fastvae.models import MLPVAE, ConvVAE, MLPAutoencoder, model_from_config

SMALL = ["--hidden", "32", "16", "--latent-dim", "4", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(out, *args):
    return cli.main(["train", "--out", str(out), *SMALL, *args])


def test_learned_obs_logvar_is_trained_saved_and_resumed(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--epochs", "2", "--recon", "gaussian", "--obs-logvar", "learned") == 0
    config, tensors = checkpoint.load(run)
    assert config["model"]["obs_logvar"] == "learned"
    learned = tensors["model.obs_logvar"]
    assert learned.shape == () and learned.item() != 0.0  # trained away from its start, 0
    model = checkpoint.load_model(run)
    assert torch.equal(model.obs_logvar.detach(), learned)
    # resume: the parameter and its Adam state come back; the option must not change
    assert train(run, "--epochs", "3", "--resume", str(run)) == 0
    assert checkpoint.load(run)[0]["train"]["epoch"] == 3
    assert train(run, "--epochs", "4", "--resume", str(run), "--obs-logvar", "optimal") == 2


@pytest.mark.parametrize("args", [
    ["--recon", "laplace", "--obs-logvar", "optimal"],
    ["--recon", "gaussian", "--obs-logvar", "-1.5"],
    ["--recon", "continuous_bernoulli", "--arch", "conv", "--channels", "4", "8"],
    ["--recon", "laplace", "--model", "ae", "--obs-logvar", "learned"],
], ids=["laplace-optimal", "gaussian-float", "cb-conv", "ae-laplace-learned"])
def test_train_with_each_likelihood(tmp_path, args):
    assert train(tmp_path, "--epochs", "2", *args) == 0
    config, _ = checkpoint.load(tmp_path)
    history = config["train"]["history"]
    assert all(np.isfinite(e[k]) for e in history for k in ("loss", "recon", "test_loss"))
    model = checkpoint.load_model(tmp_path)
    assert model.recon == args[1]


def test_bad_obs_logvar_options(tmp_path, capsys):
    assert train(tmp_path / "a", "--epochs", "1", "--obs-logvar", "learned") == 2  # bce_logits
    assert "obs_logvar='learned' with recon='bce_logits'" in capsys.readouterr().err
    assert not (tmp_path / "a" / checkpoint.FILENAME).exists()
    for bad in ("sometimes", "nan", "inf"):
        with pytest.raises(SystemExit):
            train(tmp_path / "b", "--recon", "gaussian", "--obs-logvar", bad)
        assert "--obs-logvar" in capsys.readouterr().err


def test_model_obs_logvar_rules_and_config_round_trip():
    for bad, error in (("learned", ValueError), (0.5, ValueError)):
        with pytest.raises(error, match="obs_logvar"):
            MLPVAE((6,), recon="mse", obs_logvar=bad)
    with pytest.raises(ValueError, match="obs_logvar"):
        MLPVAE((6,), recon="gaussian", obs_logvar="fitted")
    with pytest.raises(TypeError, match="obs_logvar of a model .* got a tensor"):  # not read as 0
        MLPVAE((6,), recon="gaussian", obs_logvar=torch.tensor(0.5))
    with pytest.raises(ValueError, match="obs_logvar"):
        MLPVAE((6,), recon="gaussian", obs_logvar=math.inf)
    for obs in (None, -0.5, "learned", "optimal"):
        model = MLPVAE((6,), recon="laplace", obs_logvar=obs)
        again = model_from_config(json.loads(json.dumps(model.config())))
        assert again.config() == model.config()
        assert ("obs_logvar" in dict(model.named_parameters())) == (obs == "learned")
    # configs of models without one are unchanged (older checkpoints still load)
    assert "obs_logvar" not in MLPVAE((6,)).config()


def test_learned_obs_logvar_gets_the_gradient_of_the_loss():
    torch.manual_seed(0)
    model = MLPAutoencoder((6,), latent_dim=2, hidden=(4,), recon="gaussian", obs_logvar="learned")
    with torch.no_grad():
        model.obs_logvar.fill_(0.3)
    x = torch.randn(5, 6)
    model.loss(x).loss.backward()
    with torch.no_grad():
        out = model(x)
    # d/ds of the batch mean of sum_j 1/2 [(out - x)^2 e^-s + s + log 2pi]
    want = (0.5 * (1 - (out - x).double() ** 2 * math.exp(-0.3))).sum() / 5
    torch.testing.assert_close(model.obs_logvar.grad.double(), want, rtol=1e-5, atol=1e-6)


def test_continuous_bernoulli_decodes_to_its_mean():
    torch.manual_seed(0)
    model = MLPVAE((6,), latent_dim=2, hidden=(4,), recon="continuous_bernoulli")
    z = torch.randn(7, 2)
    with torch.no_grad():
        logits = model.decoder(z)
        got = model.decode(z)
    want = torch.distributions.ContinuousBernoulli(logits=logits.double()).mean
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert ((got > 0) & (got < 1)).all()
    assert _numerics.cb_log_normalizer_grad(torch.zeros(1)).item() == 0.0  # mean 1/2 at l = 0


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize("recon,obs", [("gaussian", "learned"), ("laplace", "learned"),
                                       ("continuous_bernoulli", None)])
def test_onnx_export_of_each_likelihood_matches_pytorch(tmp_path, recon, obs):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from fastvae import onnx as fv_onnx

    torch.manual_seed(3)
    model = ConvVAE((1, 8, 8), latent_dim=3, channels=(4, 8), recon=recon, obs_logvar=obs).eval()
    if obs == "learned":
        with torch.no_grad():
            model.obs_logvar.fill_(-0.8)  # a trained value, not the initial 0
    fv_onnx.export(model, tmp_path / "out")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 8, 8, generator=g)
    z = 4.0 * torch.randn(5, 3, generator=g)  # decoder logits across the CB series' threshold
    with torch.no_grad():
        score, decoded = model.score(x), model.decode(z)
    for part, arg, want in (("scorer", x, score), ("decoder", z, decoded)):
        session = ort.InferenceSession(str(tmp_path / "out" / f"{part}.onnx"),
                                       providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: arg.numpy()})
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
