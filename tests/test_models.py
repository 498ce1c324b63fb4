"""fastvae.models: shapes, the loss/score formulas, sampling, config round trips, bad input."""

import pytest
import torch

from fastvae.models import MLPVAE, MODELS, ConvAutoencoder, ConvVAE, MLPAutoencoder, model_from_config

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [
    (MLPVAE, (64,)), (MLPVAE, (1, 8, 8)), (ConvVAE, (1, 8, 8)), (ConvVAE, (1, 28, 28)),
    (ConvVAE, (3, 64, 64)), (MLPAutoencoder, (1, 8, 8)), (ConvAutoencoder, (3, 16, 16)),
]


def kl_rows(mu, logvar):
    """KL(N(mu, e^logvar) || N(0, I)) per sample, straight from the formula."""
    return (-0.5 * (1 + logvar - mu**2 - logvar.exp())).sum(1)


def bce_logits_rows(logits, x):
    p = torch.sigmoid(logits.double())
    return -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1)


@pytest.mark.parametrize("cls,shape", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_shapes_of_every_method(cls, shape):
    torch.manual_seed(0)
    model = cls(shape, latent_dim=5)
    x = torch.rand(3, *shape)
    assert model.input_shape == shape and model.latent_shape == (5,)
    if cls in (MLPVAE, ConvVAE):
        out, mu, logvar = model(x)
        assert out.shape == x.shape and mu.shape == logvar.shape == (3, 5)
        assert [t.shape for t in model.encode(x)] == [(3, 5), (3, 5)]
    else:
        assert model(x).shape == x.shape and model.encode(x).shape == (3, 5)
    for result in (model.decode(torch.randn(3, 5)), model.sample(3), model.reconstruct(x)):
        assert result.shape == x.shape
        assert result.min() >= 0 and result.max() <= 1  # probabilities: bce_logits decodes with sigmoid
    assert model.score(x).shape == (3,)
    parts = model.loss(x)
    parts.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cls", [MLPVAE, ConvVAE])
def test_vae_criterion_score_and_free_bits_match_the_formulas(cls):
    torch.manual_seed(1)
    model = cls((1, 8, 8), latent_dim=4, beta=0.7).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    mu, logvar = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    logits = torch.randn(6, 1, 8, 8, dtype=torch.float64)

    parts = model.criterion(x, (logits, mu, logvar))
    recon = bce_logits_rows(logits, x)
    torch.testing.assert_close(parts.recon, recon.mean())
    torch.testing.assert_close(parts.kl, kl_rows(mu, logvar).mean())
    torch.testing.assert_close(parts.loss, (recon + 0.7 * kl_rows(mu, logvar)).mean())
    # a beta passed in (a schedule) overrides the model's
    torch.testing.assert_close(model.criterion(x, (logits, mu, logvar), beta=0.1).loss,
                               (recon + 0.1 * kl_rows(mu, logvar)).mean())

    # free bits: each dimension's batch-mean KL counts as at least lambda
    per_dim = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).mean(0)
    fb = model.criterion(x, (logits, mu, logvar), free_bits=0.8)
    torch.testing.assert_close(fb.loss, recon.mean() + 0.7 * per_dim.clamp(min=0.8).sum())
    torch.testing.assert_close(fb.kl, kl_rows(mu, logvar).mean())  # reported KL is the true one
    assert (per_dim < 0.8).any() and (per_dim > 0.8).any()  # the clamp really matters here

    # score: the loss per sample at z = mu (no noise)
    mu_x, logvar_x = model.encode(x)
    expected = bce_logits_rows(model.decoder(mu_x), x) + 0.7 * kl_rows(mu_x, logvar_x)
    torch.testing.assert_close(model.score(x), expected)
    rng_state = torch.get_rng_state()
    model.score(x)
    assert torch.equal(torch.get_rng_state(), rng_state)  # no noise drawn, even in training mode
    torch.testing.assert_close(model.reconstruct(x), torch.sigmoid(model.decoder(mu_x)))


@pytest.mark.parametrize("cls", [MLPAutoencoder, ConvAutoencoder])
def test_autoencoder_loss_is_reconstruction_only(cls):
    torch.manual_seed(2)
    model = cls((1, 8, 8), latent_dim=3).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    logits = model.decoder(model.encoder(x))
    expected = bce_logits_rows(logits, x)
    parts = model.loss(x)
    torch.testing.assert_close(parts.loss, expected.mean())
    torch.testing.assert_close(parts.recon, expected.mean())
    assert parts.kl.item() == 0
    torch.testing.assert_close(model.score(x), expected)


@pytest.mark.parametrize("recon", ["bce", "mse", "l1"])
def test_decode_is_in_data_space_for_each_recon(recon):
    torch.manual_seed(3)
    model = MLPVAE((10,), latent_dim=2, hidden=(8,), recon=recon)
    z = torch.randn(4, 2)
    raw = model.decoder(z)
    expected = torch.sigmoid(raw) if recon == "bce" else raw
    torch.testing.assert_close(model.decode(z), expected)
    x = torch.rand(4, 10)
    out, mu, logvar = model(x)
    if recon == "bce":  # what vae_loss takes for "bce": probabilities
        assert out.min() >= 0 and out.max() <= 1
    assert model.score(x).shape == (4,)


def test_forward_noise_follows_the_generator():
    model = MLPVAE((1, 8, 8), latent_dim=4)
    x = torch.rand(5, 1, 8, 8)
    a = model(x, generator=torch.Generator().manual_seed(7))[0]
    b = model(x, generator=torch.Generator().manual_seed(7))[0]
    c = model(x, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    s1 = model.sample(4, generator=torch.Generator().manual_seed(1))
    s2 = model.sample(4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, model.sample(4))


@pytest.mark.parametrize("cls,shape", CASES[:3] + CASES[5:],
                         ids=lambda c: getattr(c, "__name__", str(c)))
def test_config_round_trip(cls, shape):
    model = cls(shape, latent_dim=3, recon="mse", beta=0.5)
    rebuilt = model_from_config(model.config())
    assert type(rebuilt) is cls and rebuilt.config() == model.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    assert set(MODELS) == {"MLPVAE", "ConvVAE", "MLPAutoencoder", "ConvAutoencoder"}


def test_bad_input():
    model = ConvVAE((1, 8, 8), latent_dim=2)
    with pytest.raises(ValueError, match=r"shape \(N, 1, 8, 8\).*\(2, 1, 9, 8\)"):
        model.encode(torch.rand(2, 1, 9, 8))
    with pytest.raises(ValueError, match=r"got \(2, 64\)"):
        model(torch.rand(2, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model.score(torch.ones(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="divisible by 2\\*\\*len\\(channels\\) = 4"):
        ConvVAE((1, 10, 10))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        ConvAutoencoder((64,))
    with pytest.raises(ValueError, match="recon"):
        MLPVAE((4,), recon="huber")
    with pytest.raises(ValueError, match="latent_dim"):
        MLPVAE((4,), latent_dim=0)
    with pytest.raises(ValueError, match="beta must be finite"):
        MLPVAE((4,), beta=float("nan"))
    with pytest.raises(ValueError, match="not a fastvae model config"):
        model_from_config({"class": "ResNet"})
    with pytest.raises(ValueError, match=r"x must hold targets in \[0, 1\]"):
        MLPVAE((4,), hidden=(3,)).loss(torch.full((2, 4), 2.0))


def test_config_records_the_sizes_the_model_was_built_with():
    """Sizes from an array, numpy integers or a range are recorded as the plain ints the
    layers were built with, so the config is JSON and rebuilds the same model."""
    np = pytest.importorskip("numpy")
    import json

    model = MLPVAE((1, np.int64(8), 8), latent_dim=np.int32(3), hidden=np.array([32, 16]))
    config = json.loads(json.dumps(model.config()))
    assert config["hidden"] == [32, 16] and config["latent_dim"] == 3
    assert [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)] == [32, 16, 6]
    rebuilt = model_from_config(config)
    rebuilt.load_state_dict(model.state_dict())  # the same architecture
    conv = ConvVAE((1, 8, 8), channels=range(4, 6))
    assert conv.config()["channels"] == [4, 5]


@pytest.mark.parametrize("make,error,match", [
    (lambda: MLPVAE((1, 8.5, 8)), TypeError, r"input_shape\[1\] must be a positive int, got float 8.5"),
    (lambda: MLPVAE("18"), TypeError, "input_shape must be a list or tuple of positive ints, got str"),
    (lambda: MLPVAE(8), TypeError, "input_shape must be a list or tuple .*got int 8"),
    (lambda: MLPVAE((1, 0, 8)), ValueError, r"input_shape\[1\] must be a positive int, got 0"),
    (lambda: MLPVAE((4,), latent_dim=2.5), TypeError, "latent_dim must be a positive int, got float"),
    (lambda: MLPVAE((4,), latent_dim=True), TypeError, "latent_dim must be a positive int, got bool"),
    (lambda: MLPVAE((4,), latent_dim=None), TypeError, "latent_dim must be a positive int, got NoneType"),
    (lambda: MLPVAE((4,), hidden=(16.7,)), TypeError, r"hidden\[0\] must be a positive int, got float"),
    (lambda: MLPVAE((4,), hidden=16), TypeError, "hidden must be a list or tuple .*got int 16"),
    # an iterator would be used up by the layers: the config recorded [] for a 2-layer model
    (lambda: MLPVAE((4,), hidden=map(int, "3,4".split(","))), TypeError, "hidden must be .*got map"),
    (lambda: ConvVAE((1, 8, 8), channels=()), ValueError, "channels must not be empty"),
    (lambda: ConvVAE((1, 8, 8), channels=(4, -1)), ValueError, r"channels\[1\] must be a positive int"),
])
def test_bad_sizes_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_sample_checks_n_and_generator():
    model = MLPVAE((1, 8, 8), latent_dim=2)
    assert model.sample(0).shape == (0, 1, 8, 8)
    with pytest.raises(TypeError, match="n must be an int >= 0, got float 2.7"):
        model.sample(2.7)  # was 2 samples
    with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
        model.sample(-1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        model.sample(2, generator=5)


@pytest.mark.parametrize("cls", [MLPAutoencoder, ConvAutoencoder])
def test_autoencoder_loss_checks_the_vae_arguments_it_ignores(cls):
    model, x = cls((1, 8, 8), latent_dim=2), torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="beta must be finite"):
        model.loss(x, beta=float("nan"))
    with pytest.raises(ValueError, match="free_bits must be >= 0, got -1.0"):
        model.loss(x, free_bits=-1.0)
    torch.testing.assert_close(model.loss(x, beta=2.0, free_bits=0.5).loss, model.loss(x).loss)


def test_integer_tensors_and_numpy_scalars_are_sizes():
    """Anything with __index__ is an integer size (an integer 0-d tensor, numpy integers),
    as int() took it before sizes were checked; a float tensor is not."""
    np = pytest.importorskip("numpy")
    model = MLPVAE(torch.tensor([1, 8, 8]), latent_dim=torch.tensor(4), hidden=(np.int16(5),))
    assert model.config()["input_shape"] == [1, 8, 8] and model.config()["hidden"] == [5]
    assert model.sample(torch.tensor(3)).shape == (3, 1, 8, 8)
    with pytest.raises(TypeError, match="latent_dim must be a positive int, got Tensor"):
        MLPVAE((4,), latent_dim=torch.tensor(2.0))
