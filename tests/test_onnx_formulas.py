"""The plain formulas fastvae's functions become during ONNX export, run in
onnxruntime and held to numpy formulas written from the math: every recon and
reduction of ``vae_loss``, ``kl_divergence``, and ``sample_and_kl`` with a
clamp; and the exact log-sigmoid lowering of ``fastvae.onnx.export`` on
saturated logits.

One module exports every formula at once (the dynamo exporter takes seconds).
"""

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
ort = pytest.importorskip("onnxruntime")

import fastvae  # noqa: E402
from fastvae import onnx as fv_onnx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

RECONS = ("mse", "l1", "bce", "bce_logits")
REDUCTIONS = ("sum", "batchmean", "mean", "none")
BETA = 0.7
CLAMP = (-1.0, 1.0)
TINY_STD_CLAMP = (-60.0, -40.0)  # every logvar clamped to <= -40: z is mu up to 2e-9 std
RTOL = 1e-5


# ---- numpy, from the math ------------------------------------------------


def recon_terms(out, x, recon):
    if recon == "mse":
        return (out - x) ** 2
    if recon == "l1":
        return np.abs(out - x)
    if recon == "bce":  # each log floored at -100, as PyTorch does
        return -(x * np.maximum(np.log(out), -100) + (1 - x) * np.maximum(np.log1p(-out), -100))
    # bce_logits: -(x log s(l) + (1 - x) log(1 - s(l))) = log(1 + e^l) - x l, stably
    return np.logaddexp(0.0, out) - x * out


def kl_terms(mu, logvar, clamp=None):
    lv = logvar if clamp is None else np.clip(logvar, *clamp)
    return -0.5 * (1 + lv - mu**2 - np.exp(lv))


def reduced(terms, reduction):
    """sum: everything; batchmean: that / N; mean: that / (number of elements); none: per sample."""
    if reduction == "sum":
        return terms.sum()
    if reduction == "batchmean":
        return terms.sum() / terms.shape[0]
    if reduction == "mean":
        return terms.mean()
    return terms.reshape(terms.shape[0], -1).sum(1)


# ---- the exported module -------------------------------------------------


class EveryFormula(nn.Module):
    """(loss, recon, kl) of vae_loss for every recon x reduction, kl_divergence for
    every reduction, and sample_and_kl with two clamps."""

    def forward(self, values, probabilities, x, mu, logvar):
        outputs = []
        for recon in RECONS:
            x_hat = probabilities if recon == "bce" else values
            for reduction in REDUCTIONS:
                outputs.extend(fastvae.vae_loss(x_hat, x, mu, logvar, recon=recon, beta=BETA,
                                                reduction=reduction, return_parts=True))
        for reduction in REDUCTIONS:
            outputs.append(fastvae.kl_divergence(mu, logvar, reduction=reduction,
                                                 logvar_clamp=CLAMP))
        z_tiny, kl_tiny = fastvae.sample_and_kl(mu, logvar, logvar_clamp=TINY_STD_CLAMP)
        z, kl = fastvae.sample_and_kl(mu, logvar, logvar_clamp=CLAMP)
        return (*outputs, z_tiny, kl_tiny, z, kl)


def inputs():
    """Images (4, 2, 3, 5) and latents (4, 6): D != d, so a recon and a KL mean that
    divided by the other's size would show. Logits include saturated ones (+-60)."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 2, 3, 5, generator=g) * 3
    values[0, 0, 0, :4] = torch.tensor([60.0, -60.0, 30.0, -30.0])
    probabilities = torch.rand(4, 2, 3, 5, generator=g) * 0.98 + 0.01
    x = torch.rand(4, 2, 3, 5, generator=g)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # targets disagreeing with the logits
    mu = torch.randn(4, 6, generator=g)
    logvar = torch.randn(4, 6, generator=g) * 2
    return values, probabilities, x, mu, logvar


@pytest.fixture(scope="module")
def ort_outputs(tmp_path_factory):
    tensors = inputs()
    program = torch.onnx.export(EveryFormula().eval(), tensors, dynamo=True, verbose=False)
    path = tmp_path_factory.mktemp("formulas") / "formulas.onnx"
    program.save(str(path))
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {i.name: t.numpy() for i, t in zip(s.get_inputs(), tensors)})
    return [t.double().numpy() for t in tensors], got


def assert_close(got, want, rtol=RTOL, atol=1e-6):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("recon", RECONS)
def test_exported_vae_loss_matches_the_formula(ort_outputs, recon, reduction):
    (values, probabilities, x, mu, logvar), got = ort_outputs
    index = 3 * (RECONS.index(recon) * len(REDUCTIONS) + REDUCTIONS.index(reduction))
    loss, recon_part, kl_part = got[index:index + 3]
    x_hat = probabilities if recon == "bce" else values
    want_recon = reduced(recon_terms(x_hat, x, recon), reduction)
    want_kl = reduced(kl_terms(mu, logvar), reduction)
    assert np.isfinite(loss).all()
    assert_close(recon_part, want_recon)
    assert_close(kl_part, want_kl)
    assert_close(loss, want_recon + BETA * want_kl)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_exported_kl_divergence_with_a_clamp_matches_the_formula(ort_outputs, reduction):
    (_, _, _, mu, logvar), got = ort_outputs
    assert ((logvar < CLAMP[0]) | (logvar > CLAMP[1])).any()  # the clamp matters here
    kl = got[3 * len(RECONS) * len(REDUCTIONS) + REDUCTIONS.index(reduction)]
    assert_close(kl, reduced(kl_terms(mu, logvar, CLAMP), reduction))


def test_exported_sample_and_kl_uses_the_clamped_logvar(ort_outputs):
    (_, _, _, mu, logvar), got = ort_outputs
    z_tiny, kl_tiny, _, kl = got[-4:]
    assert_close(kl_tiny, reduced(kl_terms(mu, logvar, TINY_STD_CLAMP), "none"))
    assert_close(kl, reduced(kl_terms(mu, logvar, CLAMP), "none"))
    # the clamped std (<= e^-20) scales the noise: z is mu to 1e-8; unclamped, z - mu is O(1)
    assert_close(z_tiny, mu, rtol=0, atol=1e-7)


# ---- fastvae.onnx.export's exact log-sigmoid ----------------------------


class LogSigmoidScorer(nn.Module):
    """A model whose score calls F.binary_cross_entropy_with_logits, which the
    exporter lowers through aten.log_sigmoid; decode saturates at +-60."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(8, 4)
        self.dec = nn.Linear(2, 8)
        with torch.no_grad():
            self.dec.weight.mul_(0.01)
            self.dec.bias.copy_(torch.tensor([-60.0, 60.0, -30.0, 30.0, -17.5, 17.5, -1.0, 1.0]))
        self.input_shape, self.latent_shape = (8,), (2,)
        self.recon, self.beta = "bce_logits", 1.0

    def encode(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        return torch.sigmoid(self.dec(z))

    def score(self, x):
        mu, logvar = self.encode(x)
        bce = nn.functional.binary_cross_entropy_with_logits(self.dec(mu), x, reduction="none")
        return bce.sum(1) + fastvae.kl_divergence(mu, logvar, reduction="none")


def test_exported_log_sigmoid_is_exact_for_saturated_logits(tmp_path):
    """onnxruntime's Sigmoid is 0 below about -17, so a Log(Sigmoid(l)) lowering gives
    inf (or a loss that is off) for these logits; the export's own lowering is exact."""
    torch.manual_seed(0)
    model = LogSigmoidScorer().eval()
    fv_onnx.export(model, tmp_path / "e", parts=("scorer",))
    x = torch.zeros(3, 8)
    x[:, ::2] = 1.0  # target 1 under logits -60, -30, -17.5, -1: each costs about -logit
    s = ort.InferenceSession(str(tmp_path / "e" / "scorer.onnx"),
                             providers=["CPUExecutionProvider"])
    (got,) = s.run(None, {s.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        mu, logvar = (t.double().numpy() for t in model.encode(x))
        logits = model.dec(torch.from_numpy(mu).float()).double().numpy()
    want = recon_terms(logits, x.double().numpy(), "bce_logits").sum(1) \
        + reduced(kl_terms(mu, logvar), "none")
    assert np.isfinite(got).all()
    assert_close(got, want, rtol=1e-5)
