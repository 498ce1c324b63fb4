"""The likelihoods with a scale (recon="gaussian", "laplace", obs_logvar) and the
continuous Bernoulli, on both backends, against tests/reference.py (float64, from
the math) and torch.distributions."""

import math

import numpy as np
import pytest
import reference as ref
import torch
from backends import CPU_BACKENDS

import fastvae
from fastvae import ops

BACKENDS = CPU_BACKENDS  # triton: the kernels, interpreted on CPU tensors
REDUCTIONS = ("sum", "batchmean", "mean", "none")
X_SHAPE, Z_SHAPE = (3, 2, 4, 5), (3, 6)

# obs_logvar layouts: a float, a learned scalar (0-dim and 1-element), per channel,
# per element (a decoder's variance head), one broadcast over the batch, "optimal"
OBS_LAYOUTS = {
    "default": lambda g: None,
    "float": lambda g: -0.7,
    "scalar": lambda g: torch.tensor(0.4),
    "one_element": lambda g: torch.tensor([[[[-0.3]]]]),
    "channel": lambda g: 0.5 * torch.randn(1, 2, 1, 1, generator=g),
    "element": lambda g: 0.5 * torch.randn(X_SHAPE, generator=g),
    "batch_broadcast": lambda g: 0.5 * torch.randn(2, 1, 5, generator=g),
    "optimal": lambda g: "optimal",
}


def make(recon, obs_layout="default", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_hat = 2.0 * torch.randn(X_SHAPE, generator=g, dtype=torch.float64)
    x = torch.rand(X_SHAPE, generator=g, dtype=torch.float64)
    mu = torch.randn(Z_SHAPE, generator=g, dtype=torch.float64)
    logvar = torch.randn(Z_SHAPE, generator=g, dtype=torch.float64)
    x_hat, x, mu, logvar = (t.to(dtype) for t in (x_hat, x, mu, logvar))
    obs = OBS_LAYOUTS[obs_layout](g)
    if isinstance(obs, torch.Tensor):
        obs = obs.to(dtype).requires_grad_()
    for t in (x_hat, mu, logvar):
        t.requires_grad_()
    return x_hat, x, mu, logvar, obs


def differentiable(x_hat, mu, logvar, obs):
    return [x_hat, mu, logvar] + ([obs] if isinstance(obs, torch.Tensor) else [])


def reference_loss_and_grads(x_hat, x, mu, logvar, obs, recon, reduction, grad_out, beta=0.5):
    """The oracle's values and its autograd gradients (float64)."""
    leaves = [t.detach().double().requires_grad_() for t in differentiable(x_hat, mu, logvar, obs)]
    obs_ref = leaves[3] if isinstance(obs, torch.Tensor) else obs
    if obs == "optimal":  # the fitted scale is a constant: the oracle reads it as a number
        err = (x_hat.detach().double() - x.double())
        err = err.square() if recon == "gaussian" else err.abs()
        obs_ref = math.log(err.mean().item())
    parts = ref.vae_loss(leaves[0], x, leaves[1], leaves[2], recon, beta, reduction,
                         obs_logvar=obs_ref)
    grads = torch.autograd.grad((parts[0] * grad_out.double()).sum(), leaves)
    return [p.detach() for p in parts], grads


CASES = [("gaussian", layout) for layout in OBS_LAYOUTS] + \
        [("laplace", layout) for layout in ("default", "scalar", "channel", "element", "optimal")] + \
        [("continuous_bernoulli", "default")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recon,obs_layout", CASES)
def test_values_and_gradients_match_the_oracle(backend, recon, obs_layout):
    fastvae.set_backend(backend)
    for reduction in REDUCTIONS:
        x_hat, x, mu, logvar, obs = make(recon, obs_layout)
        parts = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=0.5, reduction=reduction,
                                 obs_logvar=obs, return_parts=True)
        grad_out = torch.rand(parts.loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
        inputs = differentiable(x_hat, mu, logvar, obs)
        got = torch.autograd.grad((parts.loss * grad_out).sum(), inputs)
        want_parts, want = reference_loss_and_grads(x_hat, x, mu, logvar, obs, recon, reduction,
                                                    grad_out)
        for g, w in zip(parts, want_parts):
            assert g.dtype == torch.float32 and g.shape == w.shape
            torch.testing.assert_close(g.double(), w, rtol=2e-6, atol=2e-5)
        for t, g, w in zip(inputs, got, want):
            assert g.shape == t.shape and g.dtype == t.dtype
            # a scalar obs_logvar's gradient sums 120 terms of size ~1
            torch.testing.assert_close(g.double(), w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recon", ["gaussian", "laplace", "continuous_bernoulli"])
def test_gradient_with_respect_to_the_target(backend, recon):
    fastvae.set_backend(backend)
    x_hat, x, mu, logvar, _ = make(recon)
    x = x.requires_grad_()
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, reduction="mean")
    got = torch.autograd.grad(loss, x)[0]
    x64 = x.detach().double().requires_grad_()
    want = torch.autograd.grad(ref.reduce(ref.recon_elementwise(x_hat.detach(), x64, recon), "mean"),
                               x64)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_bernoulli_is_torch_distributions_log_prob(backend):
    fastvae.set_backend(backend)
    # logits near 0 (where the normalizer is 0/0), across the series' threshold, large
    logits = torch.tensor([[0.0, 1e-6, -1e-3, 0.02, -0.3, 0.49999, 0.5, -0.50001, 0.7, -2.0],
                           [5.0, -9.0, 12.0, -20.0, 3.3, 1.5, -1.0, 0.25, 8.0, -0.05]])
    x = torch.rand(logits.shape, generator=torch.Generator().manual_seed(3))
    got = fastvae.vae_loss(logits, x, torch.zeros(2, 1), torch.zeros(2, 1),
                           recon="continuous_bernoulli", reduction="none")
    dist = torch.distributions.ContinuousBernoulli(logits=logits.double())
    want = -dist.log_prob(x.double()).sum(1)
    # torch's own normaliser is a Taylor expansion for probabilities in (0.499, 0.501)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_bernoulli_of_a_saturated_logit_keeps_its_digits(backend):
    """-log CB(x | l) = max(l, 0) - l x + log1p(e^-|l|) - log C(l): with l large and x = 1
    the first terms cancel exactly and the value is -log C(l) ~ -log l. The PyTorch path
    added -log C(l) to -l x before max(l, 0), rounding it at the scale of l (-11.515625
    for -11.512925 at l = 1e5); the mirror case (l < 0, x = 0) was exact."""
    fastvae.set_backend(backend)
    logits = torch.tensor([[1e4, -1e4, 1e5, -1e5, 300.0, -300.0]])
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]])
    got = fastvae.vae_loss(logits.repeat(2, 1), x.repeat(2, 1), torch.zeros(2, 1),
                           torch.zeros(2, 1), recon="continuous_bernoulli", reduction="none")
    # from the definition in float64: here max(l, 0) - l x = 0, log1p(e^-|l|) = 0 and
    # log C(l) = log(|l| / tanh(|l| / 2)) = log |l| (tanh = 1 to double precision)
    want = -sum(math.log(abs(v)) for v in logits[0].tolist())
    torch.testing.assert_close(got.double(), torch.full((2,), want, dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_continuous_bernoulli_normaliser_and_its_derivative_near_zero_and_far():
    from fastvae import _numerics

    for dtype, tol in ((torch.float32, 5e-7), (torch.float64, 1e-14)):
        logits = torch.tensor([0.0, 1e-8, 1e-4, -0.04, 0.049, 0.051, 0.3, -0.499, 0.501, 2.0, -30.0,
                          90.0, 200.0], dtype=torch.float64)
        # from the definition, in high precision: log(l / tanh(l / 2)) (-> log 2)
        want = [math.log(2.0) if v == 0 else math.log(abs(v) / math.tanh(abs(v) / 2))
                if abs(v) > 1e-3 else math.log(2.0) + v * v / 12 - 7 * v ** 4 / 1440
                for v in logits.tolist()]
        want_grad = [v / 6 - 7 * v ** 3 / 360 if abs(v) < 1e-3 else
                     1 / v - 1 / math.sinh(v) if abs(v) < 700 else 1 / v for v in logits.tolist()]
        got = _numerics.cb_log_normalizer(logits.to(dtype)).double()
        got_grad = _numerics.cb_log_normalizer_grad(logits.to(dtype)).double()
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)
        torch.testing.assert_close(got_grad, torch.tensor(want_grad, dtype=torch.float64),
                                   rtol=tol, atol=tol)


def test_gaussian_and_laplace_match_torch_distributions():
    x_hat, x, mu, logvar, _ = make("gaussian")
    s = torch.randn(X_SHAPE, generator=torch.Generator().manual_seed(4))
    for recon, dist in (("gaussian", torch.distributions.Normal(x_hat.detach(), torch.exp(s / 2))),
                        ("laplace", torch.distributions.Laplace(x_hat.detach(), torch.exp(s)))):
        got = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, obs_logvar=s, beta=0.0,
                               reduction="none")
        want = -dist.log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_laplace_is_latent_diffusions_l1_plus_logvar_plus_log_2():
    """LDM's nll: |x - x_hat| / exp(logvar) + logvar, per element; fastvae's laplace
    is the exact negative log-likelihood, log 2 more per element."""
    x_hat, x, mu, logvar, _ = make("laplace")
    s = torch.tensor(0.3)
    got = fastvae.vae_loss(x_hat, x, mu, logvar, recon="laplace", obs_logvar=s, beta=0.0)
    ldm = ((x - x_hat).abs() / torch.exp(s) + s).sum()
    torch.testing.assert_close(got, ldm + x.numel() * math.log(2.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recon", ["gaussian", "laplace"])
def test_optimal_is_the_minimum_over_every_scale_and_a_constant_to_the_gradient(backend, recon):
    fastvae.set_backend(backend)
    x_hat, x, mu, logvar, _ = make(recon)
    optimal = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, obs_logvar="optimal", beta=0.0)
    err = (x_hat.detach() - x)
    err = err.square() if recon == "gaussian" else err.abs()
    s_star = math.log(err.double().mean().item())
    for s in (s_star - 0.1, s_star + 0.1, 0.0):
        other = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, obs_logvar=s, beta=0.0)
        assert optimal < other
    # d/dx_hat with the fitted scale held fixed: (x_hat - x)/sigma^2 or sign(x_hat - x)/b
    grad = torch.autograd.grad(optimal, x_hat)[0]
    diff = (x_hat.detach() - x).double()
    want = diff / math.exp(s_star) if recon == "gaussian" else diff.sign() / math.exp(s_star)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-7)


def test_gradcheck_float64():
    for recon, layout in CASES:
        x_hat, x, mu, logvar, obs = make(recon, layout, dtype=torch.float64)
        # "optimal": per sample, the fitted scale's own dependence on x_hat is left out
        # of the gradient (numerical differences see it); the batch's total is
        # stationary in the scale, so there the constant scale gives the exact gradient
        reduction = "sum" if obs == "optimal" else "none"

        def loss(x_hat, *rest, x=x, mu=mu, logvar=logvar, recon=recon, obs=obs,
                 reduction=reduction):
            o = rest[0] if rest else obs
            return fastvae.vae_loss(x_hat, x, mu.detach(), logvar.detach(), recon=recon,
                                    obs_logvar=o, reduction=reduction)

        inputs = (x_hat,) + ((obs,) if isinstance(obs, torch.Tensor) else ())
        assert torch.autograd.gradcheck(loss, inputs), (recon, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("recon,obs_layout", [("gaussian", "scalar"), ("gaussian", "element"),
                                              ("gaussian", "optimal"), ("laplace", "channel"),
                                              ("continuous_bernoulli", "default")])
def test_half_inputs_compute_in_float32(backend, dtype, recon, obs_layout):
    fastvae.set_backend(backend)
    x_hat, x, mu, logvar, obs = make(recon, obs_layout, dtype=dtype)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, obs_logvar=obs, reduction="none")
    assert loss.dtype == torch.float32
    grad_out = torch.ones_like(loss)
    want_parts, want = reference_loss_and_grads(x_hat, x, mu, logvar, obs, recon, "none", grad_out,
                                                beta=1.0)
    torch.testing.assert_close(loss.double(), want_parts[0], rtol=1e-5, atol=1e-4)
    inputs = differentiable(x_hat, mu, logvar, obs)
    got = torch.autograd.grad(loss.sum(), inputs)
    for t, g, w in zip(inputs, got, want):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2 if g.numel() > 1 else 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recon,obs_layout", [("gaussian", "scalar"), ("gaussian", "element"),
                                              ("laplace", "optimal"), ("gaussian", "optimal"),
                                              ("continuous_bernoulli", "default")])
def test_nan_propagates(backend, recon, obs_layout):
    fastvae.set_backend(backend)
    x_hat, x, mu, logvar, obs = make(recon, obs_layout)
    with torch.no_grad():
        x_hat[1, 0, 0, 0] = float("nan")
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, obs_logvar=obs, reduction="none")
    assert torch.isnan(loss[1])
    if obs != "optimal":  # the others' samples do not see it
        assert torch.isfinite(loss[[0, 2]]).all()
    if isinstance(obs, torch.Tensor):
        nan_obs = obs.detach().clone().fill_(float("nan"))
        assert torch.isnan(fastvae.vae_loss(x_hat.detach().nan_to_num(), x, mu, logvar, recon=recon,
                                            obs_logvar=nan_obs)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recon", ["gaussian", "laplace"])
@pytest.mark.parametrize("obs", [-1000.0, torch.tensor(-1000.0), torch.tensor(-1000.0, dtype=torch.float64)])
def test_a_scale_beyond_float_range_overflows_to_inf_like_the_formula(backend, recon, obs):
    """e^-s overflows for s < -709.8: the loss is +inf, as torch's own formula gives, not an
    OverflowError from the host arithmetic."""
    fastvae.set_backend(backend)
    x_hat, x, mu, logvar, _ = make(recon)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, obs_logvar=obs, reduction="none")
    err = (x_hat - x).square() if recon == "gaussian" else (x_hat - x).abs()
    s = torch.as_tensor(obs, dtype=torch.float64)
    want = (err.double() * torch.exp(-s)).flatten(1).sum(1)  # the one term that overflows
    assert torch.isinf(want).all()
    torch.testing.assert_close(loss.double(), want)


def test_float64_results_for_float64_inputs():
    x_hat, x, mu, logvar, obs = make("gaussian", "channel", dtype=torch.float64)
    assert fastvae.vae_loss(x_hat, x, mu, logvar, recon="gaussian", obs_logvar=obs).dtype == \
        torch.float64


def test_bad_inputs_are_refused_with_the_argument_named():
    x_hat, x, mu, logvar, _ = make("gaussian")
    bad = [
        (dict(recon="mse", obs_logvar=0.0), ValueError, "obs_logvar"),
        (dict(recon="continuous_bernoulli", obs_logvar="optimal"), ValueError, "obs_logvar"),
        (dict(recon="gaussian", obs_logvar="optimum"), ValueError, "obs_logvar"),
        (dict(recon="gaussian", obs_logvar=torch.zeros(3)), ValueError, "obs_logvar.*broadcast"),
        (dict(recon="gaussian", obs_logvar=torch.zeros(2, 3, 4, 5)), ValueError, "obs_logvar"),
        (dict(recon="laplace", obs_logvar=torch.zeros(1, dtype=torch.int64)), TypeError, "obs_logvar"),
        (dict(recon="gaussian", obs_logvar=float("inf")), ValueError, "obs_logvar"),
        (dict(recon="gaussian", obs_logvar=float("nan")), ValueError, "obs_logvar"),
        (dict(recon="gaussian", obs_logvar=[0.0]), TypeError, "obs_logvar"),
        (dict(recon="gaussian", obs_logvar=True), TypeError, "obs_logvar"),
        (dict(recon="gaussian", obs_logvar=torch.zeros(1, device="meta")), ValueError, "obs_logvar"),
        (dict(recon="gaussian", obs_logvar=torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])),
         TypeError, "obs_logvar must be a dense .* got a nested tensor"),
    ]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            fastvae.vae_loss(x_hat, x, mu, logvar, **kwargs)
    with pytest.raises(ValueError, match="x must hold targets in"):
        fastvae.vae_loss(x_hat, x + 0.5, mu, logvar, recon="continuous_bernoulli")
    with pytest.raises(ValueError, match="x must hold targets in"):
        fastvae.vae_loss(x_hat, -x, mu, logvar, recon="continuous_bernoulli")
    with pytest.raises(ValueError, match="recon"):
        fastvae.VAELoss(recon="poisson")
    with pytest.raises(ValueError, match="obs_logvar"):
        fastvae.VAELoss(recon="mse", obs_logvar=1.0)


def test_vae_loss_module_with_a_learned_obs_logvar():
    x_hat, x, mu, logvar, _ = make("gaussian")
    s = torch.nn.Parameter(torch.tensor(0.2))
    loss_fn = fastvae.VAELoss(recon="gaussian", obs_logvar=s, reduction="batchmean")
    loss_fn(x_hat, x, mu, logvar).backward()
    want = ref.reduce(0.5 * (1 - (x_hat.detach().double() - x) ** 2 * math.exp(-0.2)), "batchmean")
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-5, atol=1e-6)
    assert "gaussian" in repr(loss_fn)


def test_vae_loss_module_keeps_a_fixed_obs_logvar_tensor_as_a_buffer():
    """A plain tensor (a fixed per-channel scale) is module state: saved in the state dict
    and moved / cast with the module, as a Parameter would be."""
    x_hat, x, mu, logvar, _ = make("gaussian")
    scale = torch.tensor([[[[0.2]], [[-0.4]]]])
    loss_fn = fastvae.VAELoss(recon="gaussian", obs_logvar=scale)
    assert torch.equal(loss_fn.state_dict()["obs_logvar"], scale)
    loss_fn.double()
    assert loss_fn.obs_logvar.dtype == torch.float64
    want = fastvae.vae_loss(x_hat.double(), x.double(), mu.double(), logvar.double(), recon="gaussian",
                            obs_logvar=scale.double())
    torch.testing.assert_close(loss_fn(x_hat.double(), x.double(), mu.double(), logvar.double()), want)


def test_opcheck():
    for recon, layout in [("gaussian", "scalar"), ("gaussian", "channel"), ("laplace", "element"),
                          ("gaussian", "optimal"), ("continuous_bernoulli", "default")]:
        x_hat, x, mu, logvar, obs = make(recon, layout)
        tensor_obs = obs if isinstance(obs, torch.Tensor) else None
        for reduction in ("sum", "none"):
            torch.library.opcheck(ops.vae_loss_op, (
                x_hat, x, mu, logvar, None, tensor_obs, None, None, 0.5, recon,
                0.0, obs == "optimal", reduction, None, None, 0.0, True, True, False))


@pytest.mark.parametrize("layout", ["scalar", "channel"])
def test_compile_fullgraph_with_a_learned_obs_logvar(layout):
    torch._dynamo.reset()
    x_hat, x, mu, logvar, obs = make("gaussian", layout)

    def step(x_hat, mu, logvar, obs):
        return fastvae.vae_loss(x_hat, x, mu, logvar, recon="gaussian", obs_logvar=obs,
                                reduction="batchmean")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = (x_hat, mu, logvar, obs)
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, inputs)
    want = step(*inputs)
    want_grads = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_torch_func_grad_and_jacrev_through_the_composite_path():
    for recon, layout in [("gaussian", "scalar"), ("laplace", "channel"), ("gaussian", "optimal"),
                          ("continuous_bernoulli", "default")]:
        x_hat, x, mu, logvar, obs = make(recon, layout)
        with_obs = isinstance(obs, torch.Tensor)

        def loss(x_hat, o, x=x, mu=mu, logvar=logvar, recon=recon, obs=obs, with_obs=with_obs):
            return fastvae.vae_loss(x_hat, x, mu.detach(), logvar.detach(), recon=recon,
                                    obs_logvar=o if with_obs else obs, reduction="none")

        o = obs.detach() if with_obs else torch.zeros(())
        g_xhat, g_obs = torch.func.grad(lambda a, b: loss(a, b).sum(), argnums=(0, 1))(
            x_hat.detach(), o)
        eager = [t.detach().requires_grad_() for t in (x_hat, o)]
        want = torch.autograd.grad(loss(*eager).sum(), eager, allow_unused=True)
        torch.testing.assert_close(g_xhat, want[0], rtol=1e-5, atol=1e-6)
        if with_obs:
            torch.testing.assert_close(g_obs, want[1], rtol=1e-5, atol=1e-5)
        jac = torch.func.jacrev(loss)(x_hat.detach(), o)
        assert jac.shape == (X_SHAPE[0],) + X_SHAPE
        # sample n's loss does not depend on sample m's prediction, except through
        # the fitted scale, which is a constant
        torch.testing.assert_close(jac[0, 1], torch.zeros_like(jac[0, 1]))
        torch.testing.assert_close(jac.sum(0), want[0], rtol=1e-5, atol=1e-6)


class _LearnedScaleLoss(torch.nn.Module):
    """A user's loss module: VAELoss with a learned per-channel obs_logvar."""

    def __init__(self, recon):
        super().__init__()
        obs = None
        if recon != "continuous_bernoulli":
            obs = torch.nn.Parameter(torch.tensor([[[[-0.6]], [[0.4]]]]))
        self.loss = fastvae.VAELoss(recon=recon, obs_logvar=obs, reduction="none")

    def forward(self, x_hat, x, mu, logvar):
        return self.loss(x_hat, x, mu, logvar)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.parametrize("recon", ["gaussian", "laplace", "continuous_bernoulli"])
def test_plain_dynamo_onnx_export_runs_in_onnxruntime(tmp_path, recon):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    module = _LearnedScaleLoss(recon).eval()
    x_hat, x, mu, logvar, _ = make(recon)
    args = tuple(t.detach() for t in (x_hat, x, mu, logvar))
    if recon == "continuous_bernoulli":  # saturated logits: no log(sigmoid) in the graph
        args = (args[0] * 12.0,) + args[1:]
    program = torch.onnx.export(module, args, dynamo=True, verbose=False)
    path = tmp_path / "loss.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), args)})
    obs = None if recon == "continuous_bernoulli" else module.loss.obs_logvar.detach()
    want = ref.vae_loss(*args, recon, 1.0, "none", obs_logvar=obs)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recon,obs_logvar", [("mse", None), ("l1", None), ("gaussian", 0.4),
                                              ("laplace", -0.3), ("gaussian", "optimal")])
@pytest.mark.parametrize("rows", [3, "large"])
def test_a_float32_target_of_a_bfloat16_x_hat_gets_a_float32_precise_gradient(
        backend, recon, obs_logvar, rows):
    """d/dx = -d/dx_hat for these recons, taken from x_hat's gradient buffer: for a bfloat16
    x_hat that buffer is bfloat16, and a float32 target requiring grad got bfloat16's
    precision (0.4% off). Also past SMALL_NUMEL (the general path)."""
    if rows == "large":
        if backend == "triton":  # (the interpreter: keep it small)
            rows = 5
        else:
            rows = ops._torch_impl.SMALL_NUMEL // 64 + 1
    fastvae.set_backend(backend)
    g = torch.Generator().manual_seed(11)
    x_hat = torch.randn(rows, 64, generator=g).bfloat16().requires_grad_()
    x = torch.randn(rows, 64, generator=g).requires_grad_()
    mu, logvar = torch.randn(rows, 2, generator=g), torch.randn(rows, 2, generator=g)
    loss = fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, obs_logvar=obs_logvar,
                            reduction="batchmean")
    g_xhat, g_x = torch.autograd.grad(loss, (x_hat, x), torch.tensor(0.75))
    assert g_xhat.dtype == torch.bfloat16 and g_x.dtype == torch.float32
    x64 = x.detach().double().requires_grad_()
    xhat64 = x_hat.detach().double().requires_grad_()
    want = ref.reduce(ref.recon_elementwise(xhat64, x64, recon, obs_logvar), "batchmean") * 0.75
    w_xhat, w_x = torch.autograd.grad(want, (xhat64, x64))
    torch.testing.assert_close(g_x.double(), w_x, rtol=2e-6, atol=1e-9)
    torch.testing.assert_close(g_xhat.double(), w_xhat, rtol=2 ** -8, atol=1e-9)
