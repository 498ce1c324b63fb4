"""A learned (d,) diagonal Gaussian prior in fastvae.models, `fastvae train --prior
learned`, its checkpoint, its ONNX export metadata and the runtime's sampling."""

import numpy as np
import pytest
import reference as ref
import torch

import fastvae
from fastvae import models
from fastvae.app import checkpoint, cli
from tests.fusion import record_fused_calls


def test_learned_prior_model_loss_gradient_config_and_sampling():
    torch.manual_seed(0)
    model = models.MLPVAE((12,), latent_dim=3, hidden=(8,), recon="mse", beta=0.5,
                          prior="learned").double()
    assert model.prior_mu.shape == (3,) and model.prior_logvar.shape == (3,)
    with torch.no_grad():
        model.prior_mu.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.prior_logvar.copy_(torch.tensor([0.3, -0.2, 1.0]))
    x = torch.randn(5, 12, dtype=torch.float64)
    out, mu, logvar = torch.randn(5, 12, dtype=torch.float64), \
        torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    parts = model.criterion(x, (out, mu, logvar))
    kl = ref.kl_elementwise_prior(mu, logvar, model.prior_mu.detach(), model.prior_logvar.detach())
    want_kl = ref.reduce(kl, "batchmean")
    torch.testing.assert_close(parts.kl, want_kl)
    torch.testing.assert_close(parts.loss, ref.reduce((out - x) ** 2, "batchmean") + 0.5 * want_kl)
    # free bits through the fused op; the reported kl stays the true one
    fb = model.criterion(x, (out, mu, logvar), free_bits=1.5)
    torch.testing.assert_close(fb.loss, ref.reduce((out - x) ** 2, "batchmean")
                               + 0.5 * ref.kl_free_bits(kl, 1.5, "batchmean"))
    torch.testing.assert_close(fb.kl, want_kl)
    # the prior trains with the model
    model.loss(x).loss.backward()
    assert model.prior_mu.grad.abs().sum() > 0 and model.prior_logvar.grad.abs().sum() > 0
    # config and state_dict rebuild it
    again = models.model_from_config(model.config())
    assert again.prior == "learned"
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.prior_mu, model.prior_mu.float())
    # sample draws z from the learned prior
    seen = []
    model.decode = lambda z: seen.append(z) or z
    model.sample(20000, generator=torch.Generator().manual_seed(1))
    z = seen[0]
    torch.testing.assert_close(z.mean(0), model.prior_mu.detach(), atol=0.06, rtol=0)
    torch.testing.assert_close(z.std(0), torch.exp(0.5 * model.prior_logvar.detach()),
                               atol=0.06, rtol=0)


def test_prior_option_is_checked():
    with pytest.raises(ValueError, match="prior must be one of 'standard', 'learned'; got 'flow'"):
        models.MLPVAE((4,), prior="flow")


def test_train_with_a_learned_prior(tmp_path, one_thread):
    args = ["train", "--out", str(tmp_path), "--hidden", "16", "--latent-dim", "3",
            "--no-progress", "--epochs", "1", "--prior", "learned"]
    assert cli.main(args) == 0
    model = checkpoint.load_model(tmp_path)
    assert model.prior == "learned"
    assert not torch.equal(model.prior_mu, torch.zeros(3))  # it was trained
    assert cli.main(["train", "--out", str(tmp_path / "ae"), "--model", "ae", "--prior",
                     "learned", "--epochs", "1", "--no-progress"]) != 0


def test_export_records_the_prior_and_the_runtime_samples_from_it(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from fastvae import onnx as fv_onnx
    from fastvae.runtime import VAERuntime

    torch.manual_seed(2)
    model = models.MLPVAE((6,), latent_dim=2, hidden=(8,), recon="mse", prior="learned")
    with torch.no_grad():
        model.prior_mu.copy_(torch.tensor([3.0, -2.0]))
        model.prior_logvar.copy_(torch.tensor([0.5, -1.0]))
    meta = fv_onnx.export(model, tmp_path / "e", parts=("decoder",))
    assert meta["prior"] == {"mu": [3.0, -2.0], "logvar": [0.5, -1.0]}
    runtime = VAERuntime(str(tmp_path / "e"))
    got = runtime.sample(8, seed=5)
    z = np.random.default_rng(5).standard_normal((8, 2), dtype=np.float32)
    z = np.array([3.0, -2.0], dtype=np.float32) + np.exp(0.5 * np.array([0.5, -1.0],
                                                                         dtype=np.float32)) * z
    with torch.no_grad():
        want = model.decode(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class PriorVAEStep(torch.nn.Module):
    """A user's module with a learned (d,) prior, free bits and several samples."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(10, 8)
        self.dec = torch.nn.Linear(4, 10)
        self.loss_fn = fastvae.VAELoss(recon="mse", reduction="batchmean", beta=0.5,
                                       free_bits=0.3,
                                       prior_mu=torch.nn.Parameter(torch.randn(4)),
                                       prior_logvar=torch.nn.Parameter(torch.randn(4)))

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        logvar = logvar - 40.0  # std ~ 2e-9: every z is mu up to noise far below the tolerance
        z = fastvae.reparameterize(mu, logvar, num_samples=2)
        _, kl = fastvae.sample_and_kl(mu, logvar, prior_mu=self.loss_fn.prior_mu,
                                      prior_logvar=self.loss_fn.prior_logvar)
        return self.loss_fn(self.dec(z).mean(0), x, mu, logvar), kl


def test_user_module_with_prior_free_bits_and_samples_exports_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(3)
    model = PriorVAEStep()
    assert {"loss_fn.prior_mu", "loss_fn.prior_logvar"} <= dict(model.named_parameters()).keys()
    x = torch.rand(5, 10, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # the reference from the math, z = mu
        mu, logvar = model.enc(x).double().chunk(2, dim=1)
        logvar = logvar - 40.0
        pm, plv = (p.detach().double() for p in (model.loss_fn.prior_mu,
                                                  model.loss_fn.prior_logvar))
        terms = ref.kl_elementwise_prior(mu, logvar, pm, plv)
    per_element = terms.mean(0)  # a floor that holds some elements and not others
    fb = model.loss_fn.free_bits = float(per_element.median())
    assert (per_element < fb).any() and (per_element > fb).any()
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    path = tmp_path / "prior.onnx"
    program.save(str(path))
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    loss, kl = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want_loss = ref.reduce((model.dec(mu.float()).double() - x.double()) ** 2, "batchmean") \
            + 0.5 * ref.kl_free_bits(terms, fb, "batchmean")
        want_kl = ref.per_sample(terms)
    np.testing.assert_allclose(loss, want_loss.numpy(), rtol=1e-4)
    np.testing.assert_allclose(kl, want_kl.numpy(), rtol=1e-4)


# ---- broadcast half-precision gradients: summed in float32, rounded once -------------
#
# A broadcast prior's (or obs_logvar's) gradient is the sum of per-element terms over
# its broadcast dims. Each term was rounded to bfloat16 before the sum: where the terms
# cancel, a (256,) prior's gradient came out 196 ulps (87%) off (found by a numerics
# review). Now the terms are summed in float32 and rounded once: within half an ulp of
# the exact sum, up to float32's own rounding of the terms.


def _ulps(got, exact, dtype):
    """|got - exact| in units of ``dtype``'s spacing at ``exact`` (normal numbers)."""
    spacing = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact.abs())))
    return ((got.double() - exact).abs() / spacing).max().item()


def _cancelling_prior_case(dtype, batch, d):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(batch, d, generator=g).to(dtype)
    lv = torch.randn(batch, d, generator=g).to(dtype)
    pm = torch.zeros(d, dtype=dtype, requires_grad=True)  # sum of -mu e^-plv: cancels
    plv = torch.full((d,), -3.0, dtype=dtype, requires_grad=True)
    m, v, q = mu.double(), lv.double(), plv.detach().double()
    exact_pm = (-m * torch.exp(-q)).sum(0)
    exact_plv = (0.5 * (1 - (v.exp() + m ** 2) * torch.exp(-q))).sum(0)
    return mu, lv, pm, plv, exact_pm, exact_plv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["whole_tensor_ops", "fused_loop", "blocks_of_rows"])
def test_a_broadcast_half_precision_prior_gradient_is_rounded_once(dtype, path, monkeypatch):
    from fastvae import _cpu_fusion

    batch, d = {"whole_tensor_ops": (64, 16), "fused_loop": (64, 256),
                "blocks_of_rows": (520, 256)}[path]  # (2^10; 2^14, KL_MIN_NUMEL; > 2^17)
    mu, lv, pm, plv, exact_pm, exact_plv = _cancelling_prior_case(dtype, batch, d)
    fused = record_fused_calls(monkeypatch, "fused_kl")  # (fusion on, fresh state)
    monkeypatch.setattr(_cpu_fusion, "_enabled", path == "fused_loop")
    for _ in range(_cpu_fusion.COMPILE_AT_CALL):  # (the loop serves the third call)
        kl = fastvae.kl_divergence(mu, lv, prior_mu=pm, prior_logvar=plv)
        g_pm, g_plv = torch.autograd.grad(kl, (pm, plv))
    assert fused[-1:] == ([True] if path == "fused_loop" else [])
    assert g_pm.dtype == g_plv.dtype == dtype
    assert _ulps(g_pm, exact_pm, dtype) <= 0.6 and _ulps(g_plv, exact_plv, dtype) <= 0.6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_per_channel_half_precision_obs_logvar_gradient_is_rounded_once(dtype):
    g = torch.Generator().manual_seed(1)
    s = torch.tensor([-0.5, 0.0, 0.5]).reshape(1, 3, 1, 1).to(dtype).requires_grad_()
    x_hat = torch.randn(16, 3, 8, 8, generator=g)
    # errors of variance e^s: the terms 1/2 (1 - err e^-s) have mean 0 and cancel
    x = (x_hat + torch.exp(0.5 * s.detach().float()) * torch.randn(16, 3, 8, 8, generator=g))
    x_hat, x = x_hat.to(dtype), x.to(dtype)
    mu = lv = torch.zeros(16, 2, dtype=dtype)
    loss = fastvae.vae_loss(x_hat, x, mu, lv, recon="gaussian", obs_logvar=s)
    g_s, = torch.autograd.grad(loss, s)
    err = (x_hat.double() - x.double()) ** 2
    # d/ds of 1/2 [err e^-s + s]: 1/2 (1 - err e^-s), summed over all but the channels
    exact = (0.5 * (1 - err * torch.exp(-s.detach().double()))).sum(dim=(0, 2, 3), keepdim=True)
    assert g_s.dtype == dtype and _ulps(g_s, exact, dtype) <= 0.6
