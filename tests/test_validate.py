"""Bad input: a clear ValueError/TypeError naming the argument, never a wrong number."""

import math

import pytest
import torch

import fastvae


def good(n=4):
    return [torch.rand(n, 6), torch.rand(n, 6), torch.randn(n, 3), torch.randn(n, 3)]


def call(*args, **kwargs):
    return fastvae.vae_loss(*args, **kwargs)


@pytest.mark.parametrize("case,error,match", [
    ("x shape", ValueError, r"x_hat and x must have the same shape.*\(4, 6\).*\(4, 5\)"),
    ("latent shape", ValueError, r"mu and logvar must have the same shape"),
    ("batch", ValueError, r"same batch size.*\(4, 6\).*\(3, 3\)"),
    ("empty batch", ValueError, r"x_hat has an empty batch"),
    ("0-dim", ValueError, r"mu must have a batch dimension"),
    ("int", TypeError, r"x must be a float16, bfloat16, float32 or float64 tensor, got torch.int64"),
    ("complex", TypeError, r"logvar must be .* got torch.complex64"),
    ("not a tensor", TypeError, r"x_hat must be a torch.Tensor, got list"),
    ("recon", ValueError, r"recon must be one of .*got 'cross_entropy'"),
    ("reduction", ValueError, r"reduction must be one of .*got 'avg'"),
    ("beta nan", ValueError, r"beta must be finite, got nan"),
    ("beta inf tensor", ValueError, r"beta must be finite, got inf"),
    ("beta str", TypeError, r"beta must be a float or a 0-dim tensor, got str"),
    ("beta 1-d", TypeError, r"beta must be a float or a 0-dim floating-point tensor"),
    ("clamp order", ValueError, r"logvar_clamp must satisfy lo <= hi, got \(5.0, -5.0\)"),
    ("clamp shape", TypeError, r"logvar_clamp must be None or a pair"),
    ("bce probs", ValueError, r"x_hat must hold probabilities in \[0, 1\]"),
    ("bce targets", ValueError, r"x must hold targets in \[0, 1\]"),
    ("bce_logits targets", ValueError, r"x must hold targets in \[0, 1\]"),
    ("bce nan", ValueError, r"x_hat must hold probabilities in \[0, 1\]"),
])
def test_bad_loss_input(case, error, match):
    x_hat, x, mu, logvar = good()
    kwargs = {}
    if case == "x shape":
        x = torch.rand(4, 5)
    elif case == "latent shape":
        logvar = torch.randn(4, 2)
    elif case == "batch":
        mu, logvar = torch.randn(3, 3), torch.randn(3, 3)
    elif case == "empty batch":
        x_hat, x = torch.rand(0, 6), torch.rand(0, 6)
    elif case == "0-dim":
        mu, logvar = torch.tensor(1.0), torch.tensor(1.0)
    elif case == "int":
        x = torch.ones(4, 6, dtype=torch.int64)
    elif case == "complex":
        logvar = torch.randn(4, 3, dtype=torch.complex64)
    elif case == "not a tensor":
        x_hat = [[0.5] * 6] * 4
    elif case == "recon":
        kwargs["recon"] = "cross_entropy"
    elif case == "reduction":
        kwargs["reduction"] = "avg"
    elif case == "beta nan":
        kwargs["beta"] = math.nan
    elif case == "beta inf tensor":
        kwargs["beta"] = torch.tensor(math.inf)
    elif case == "beta str":
        kwargs["beta"] = "1"
    elif case == "beta 1-d":
        kwargs["beta"] = torch.ones(2)
    elif case == "clamp order":
        kwargs["logvar_clamp"] = (5, -5)
    elif case == "clamp shape":
        kwargs["logvar_clamp"] = (1, 2, 3)
    elif case == "bce probs":
        x_hat = x_hat + 1.0
        kwargs["recon"] = "bce"
    elif case in ("bce targets", "bce_logits targets"):
        x = x - 2.0
        kwargs["recon"] = case.split()[0]
    elif case == "bce nan":
        x_hat[0, 0] = math.nan
        kwargs["recon"] = "bce"
    with pytest.raises(error, match=match):
        call(x_hat, x, mu, logvar, **kwargs)


def test_different_devices():
    x_hat, x, mu, logvar = good()
    x = x.to("meta")
    with pytest.raises(ValueError, match=r"one device.*x on meta"):
        call(x_hat, x, mu, logvar)


def test_vae_loss_module_checks_options_early():
    with pytest.raises(ValueError, match="recon must be one of"):
        fastvae.VAELoss(recon="kl")
    with pytest.raises(ValueError, match="logvar_clamp must satisfy"):
        fastvae.VAELoss(logvar_clamp=(1, 0))


@pytest.mark.parametrize("fn", ["kl_divergence", "reparameterize", "sample_and_kl"])
def test_bad_latent_input(fn):
    f = getattr(fastvae, fn)
    with pytest.raises(ValueError, match="mu and logvar must have the same shape"):
        f(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(TypeError, match="mu must be a float16"):
        f(torch.ones(4, 3, dtype=torch.int32), torch.randn(4, 3))
    with pytest.raises(ValueError, match="empty batch"):
        f(torch.randn(0, 3), torch.randn(0, 3))


def test_more_bad_inputs():
    x_hat, x, mu, logvar = good()
    with pytest.raises(ValueError, match=r"x_hat has no elements per sample: shape \(4, 0\)"):
        call(torch.rand(4, 0), torch.rand(4, 0), mu, logvar, reduction="mean")
    with pytest.raises(ValueError, match="mu has no elements per sample"):
        fastvae.kl_divergence(torch.randn(4, 0), torch.randn(4, 0), reduction="mean")
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str"):
        fastvae.reparameterize(mu, logvar, generator="x")
    with pytest.raises(ValueError, match="beta is on meta but the data is on cpu"):
        call(x_hat, x, mu, logvar, beta=torch.tensor(1.0, device="meta"))


def test_bad_posterior_input():
    with pytest.raises(ValueError, match=r"dim=5 is out of range for parameters of shape \(2, 4\)"):
        fastvae.GaussianPosterior(torch.randn(2, 4), dim=5)
    post = fastvae.GaussianPosterior(torch.randn(2, 4))
    with pytest.raises(ValueError, match="deterministic GaussianPosterior"):
        post.kl(fastvae.GaussianPosterior(torch.randn(2, 4), deterministic=True))


# ---- issue 11 item 12: arguments that used to slip through or fail obscurely ----

def _meta_generator():
    """A generator that says it lives on the meta device (torch refuses to make one
    directly on a machine without such an accelerator; its seed cannot be drawn)."""
    class MetaGenerator(torch.Generator):
        @property
        def device(self):
            return torch.device("meta")

    return MetaGenerator()


@pytest.mark.parametrize("fn", ["vae_loss", "kl_divergence", "sample_and_kl"])
@pytest.mark.parametrize("clamp,error,match", [
    ("12", TypeError, r"logvar_clamp must be None or a pair of numbers \(lo, hi\), got '12'"),
    (b"12", TypeError, r"logvar_clamp must be None or a pair of numbers"),
    (("a", "b"), TypeError, r"logvar_clamp must be None or a pair of numbers"),
    ((True, 2.0), TypeError, r"logvar_clamp must be None or a pair of numbers"),
    ((-math.inf, math.inf), ValueError, r"logvar_clamp bounds must be finite, got \(-inf, inf\)"),
    ((math.inf, math.inf), ValueError, r"logvar_clamp bounds must be finite"),
    ((-math.inf, -math.inf), ValueError, r"logvar_clamp bounds must be finite"),
    ((-(10**400), 0.0), ValueError, r"logvar_clamp bounds must be finite, got -1000.*too large"),
])
def test_bad_logvar_clamp(fn, clamp, error, match):
    x_hat, x, mu, logvar = good()
    args = (x_hat, x, mu, logvar) if fn == "vae_loss" else (mu, logvar)
    with pytest.raises(error, match=match):
        getattr(fastvae, fn)(*args, logvar_clamp=clamp)


def test_logvar_clamp_as_list_or_scalar_tensors_still_works():
    _, _, mu, logvar = good()
    want = fastvae.kl_divergence(mu, logvar, logvar_clamp=(-0.5, 0.5))
    for clamp in ([-0.5, 0.5], (torch.tensor(-0.5), torch.tensor(0.5)), (-0.5, 0.5)):
        torch.testing.assert_close(fastvae.kl_divergence(mu, logvar, logvar_clamp=clamp), want,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("beta", [10**400, -(10**400)], ids=["1e400", "-1e400"])
def test_beta_too_large_for_a_float(beta):
    x_hat, x, mu, logvar = good()
    with pytest.raises(ValueError, match=r"beta must be finite, got -?1000.*too large for a float"):
        call(x_hat, x, mu, logvar, beta=beta)
    with pytest.raises(ValueError, match=r"beta must be finite"):
        fastvae.VAELoss(beta=beta)


@pytest.mark.parametrize("kwargs, name", [({"beta": 1e39}, "beta"), ({"beta": -1e39}, "beta"),
                                          ({"free_bits": 1e39}, "free_bits")])
def test_a_weight_past_float32_is_refused_by_a_float32_loss(kwargs, name):
    """Finite for Python, not for the float32 loss: torch raised "value cannot be converted to
    type float without overflow" from inside the computation. A float64 loss holds it."""
    x_hat, x, mu, logvar = good()
    with pytest.raises(ValueError, match=rf"{name}=-?1e\+39 is beyond float32's range"):
        fastvae.vae_loss(x_hat, x, mu, logvar, **kwargs)
    if name == "free_bits":
        with pytest.raises(ValueError, match=r"free_bits=1e\+39 is beyond float32's range"):
            fastvae.kl_divergence(mu, logvar, **kwargs)
        assert fastvae.kl_divergence(mu.double(), logvar.double(), **kwargs).dtype == torch.float64
    loss = fastvae.vae_loss(x_hat.double(), x.double(), mu.double(), logvar.double(), **kwargs)
    assert loss.dtype == torch.float64 and not torch.isnan(loss)
    # float32's largest numbers are accepted (the loss may then overflow, as eager's would)
    assert fastvae.vae_loss(x_hat, x, mu, logvar, beta=3e38).dtype == torch.float32


def test_free_bits_whose_batch_floor_passes_float32_are_refused():
    """free_bits fits float32, but times the batch size (the floor the KL's column sums
    meet) it does not: torch raised "value cannot be converted to type float without
    overflow" from inside the computation. A float64 loss holds it; a float32 loss
    computes half of it."""
    x_hat, x, mu, logvar = good()  # (a batch of N)
    n = mu.shape[0]
    too_large = 3.4e38 / n * 1.01
    with pytest.raises(ValueError, match=rf"free_bits=.* times the batch size {n} .* beyond "
                                         r"float32's range"):
        fastvae.vae_loss(x_hat, x, mu, logvar, free_bits=too_large)
    with pytest.raises(ValueError, match=rf"times the batch size {n}"):
        fastvae.kl_divergence(mu, logvar, free_bits=too_large, reduction="batchmean")
    with pytest.raises(ValueError, match=rf"times the batch size {n}"):
        fastvae.VAELoss(free_bits=too_large)(x_hat, x, mu, logvar)
    wide = fastvae.kl_divergence(mu.double(), logvar.double(), free_bits=too_large,
                                 reduction="batchmean")
    assert wide.dtype == torch.float64 and wide.item() == pytest.approx(mu.shape[1] * too_large)
    half = fastvae.kl_divergence(mu, logvar, free_bits=too_large / 2, reduction="batchmean")
    assert half.dtype == torch.float32 and not torch.isnan(half)
    fn = torch.compile(lambda m, lv, fb: fastvae.kl_divergence(m, lv, free_bits=fb),
                       dynamic=True, backend="eager")
    fn(mu, logvar, 0.5)
    with pytest.raises(Exception, match=rf"times the batch size {n}"):
        fn(mu, logvar, too_large)


def test_huge_but_finite_python_int_beta_is_a_float():
    x_hat, x, mu, logvar = good()
    loss = call(x_hat, x, mu, logvar, beta=10**20)
    want = call(x_hat, x, mu, logvar, beta=1e20)
    torch.testing.assert_close(loss, want, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "nested", "jagged"])
@pytest.mark.parametrize("fn", ["vae_loss", "kl_divergence", "reparameterize", "sample_and_kl"])
def test_sparse_and_nested_tensors_are_refused_by_name(layout, fn):
    x_hat, x, mu, logvar = good()
    if layout in ("nested", "jagged"):
        bad = torch.nested.nested_tensor(
            [torch.randn(3), torch.randn(2)],
            layout=torch.jagged if layout == "jagged" else torch.strided)
        match = r"logvar must be a dense tensor, got a nested tensor"
    else:
        bad = logvar.to_sparse() if layout == "sparse_coo" else logvar.to_sparse_csr()
        match = rf"logvar must be a dense \(strided\) tensor, got layout torch.{layout}"
    args = (x_hat, x, mu, bad) if fn == "vae_loss" else (mu, bad)
    with pytest.raises(TypeError, match=match):
        getattr(fastvae, fn)(*args)


def test_sparse_beta_is_refused():
    x_hat, x, mu, logvar = good()
    with pytest.raises(TypeError, match="beta must be"):
        call(x_hat, x, mu, logvar, beta=torch.tensor(1.0).to_sparse())


@pytest.mark.parametrize("fn", ["reparameterize", "sample_and_kl"])
def test_generator_on_another_device_is_refused_by_name(fn):
    _, _, mu, logvar = good()
    with pytest.raises(ValueError, match=r"generator is on meta but the data is on cpu"):
        getattr(fastvae, fn)(mu, logvar, generator=_meta_generator())


def test_cached_checks_still_refuse_what_they_refused():
    """The metadata checks are remembered per (shapes, dtypes, devices, options); a
    failed check is never remembered, and a good key does not vouch for a bad one."""
    x_hat, x, mu, logvar = good()
    for _ in range(2):
        call(x_hat, x, mu, logvar, logvar_clamp=(-1.0, 1.0))
        with pytest.raises(ValueError, match="logvar_clamp must satisfy lo <= hi"):
            call(x_hat, x, mu, logvar, logvar_clamp=(1.0, -1.0))
        with pytest.raises(ValueError, match="x_hat and x must have the same shape"):
            call(x_hat, x[:, :5], mu, logvar)
        with pytest.raises(TypeError, match="x must be a float16"):
            call(x_hat, x.double().long(), mu, logvar)
        with pytest.raises(ValueError, match="reduction must be one of"):
            fastvae.kl_divergence(mu, logvar, reduction="avg")
        with pytest.raises(ValueError, match="one device"):
            call(x_hat, x.to("meta"), mu, logvar)


def test_the_broadcast_check_agrees_with_torch_broadcast_shapes():
    """_validate's own broadcast rule (a loop, for speed) against PyTorch's, on shapes
    with 1s, 0s, missing leading dims and mismatches."""
    import itertools

    from fastvae._validate import _broadcasts_to

    shapes = [(), (1,), (3,), (0,), (2, 3), (1, 3), (2, 1), (4, 2, 3), (1, 2, 3), (4, 1, 1),
              (5, 2, 3), (2, 3, 1), (0, 3), (4, 0, 3)]
    for a, b in itertools.product(shapes, repeat=2):
        try:
            want = torch.broadcast_shapes(a, b) == torch.Size(b)
        except RuntimeError:
            want = False
        assert _broadcasts_to(torch.Size(a), torch.Size(b)) == want, (a, b)


def test_a_weight_past_float32_is_refused_under_compile_with_dynamic_floats():
    """Under torch.compile(dynamic=True) the float is symbolic: its message must still be
    ours (a format spec made Dynamo raise 'Unknown format code')."""
    mu, logvar = torch.randn(3, 2), torch.randn(3, 2)
    fn = torch.compile(lambda m, lv, fb: fastvae.kl_divergence(m, lv, free_bits=fb),
                       dynamic=True, backend="eager")
    fn(mu, logvar, 0.5)  # (a first call with a float in range)
    with pytest.raises(Exception, match=r"free_bits=1e\+39 is beyond float32's range"):
        fn(mu, logvar, 1e39)
