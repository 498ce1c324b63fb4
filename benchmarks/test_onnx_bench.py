"""Inference of an exported VAE: onnxruntime (fp32 and int8) against PyTorch eager.

The decoder (z -> data-space x_hat) and the scorer (x -> per-sample loss at
z = mu) of an MLP VAE 784 -> 400 -> 20 (decoder 20 -> 400 -> 784, the issue's
target: onnxruntime >= 1.5x eager at batch 1), at batch 1 (latency) and 256
(throughput). int8 is the dynamically quantized decoder.

Each case, eager included, first checks its output against a float64 reference
(the network in float64, the sigmoid and the loss from their formulas in numpy;
a benchmark can fail), then times one call. With benchmarking disabled (CI) a tiny model is exported and
each case runs once.
"""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
pytest.importorskip("onnxruntime")

from benchmarks.conftest import MAX_ROUNDS, MIN_ROUNDS, ROUND_SECONDS, full_run  # noqa: E402
from fastvae.models import MLPVAE  # noqa: E402
from fastvae.onnx import export  # noqa: E402
from fastvae.runtime import PART_IO, VAERuntime  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

FULL_MODEL = dict(input_shape=(784,), latent_dim=20, hidden=(400,))
TINY_MODEL = dict(input_shape=(16,), latent_dim=4, hidden=(8,))
BATCHES = (1, 256)
CASES = [("decoder", "eager"), ("decoder", "ort"), ("decoder", "ort_int8"),
         ("scorer", "eager"), ("scorer", "ort")]
# each implementation must match the float64 reference this closely before it is timed
TOLERANCE = {"eager": 1e-5, "ort": 1e-4, "ort_int8": 5e-2}


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    sizes = FULL_MODEL if full_run(request.config) else TINY_MODEL
    model = MLPVAE(recon="bce_logits", **sizes).eval()
    out = tmp_path_factory.mktemp("onnx_bench") / "export"
    meta = export(model, out, parts=("decoder", "scorer"), quantize=True)
    return model, out, meta


def _input(model, part, batch):
    g = torch.Generator().manual_seed(batch)
    if part == "decoder":
        return torch.randn(batch, *model.latent_shape, generator=g)
    return torch.rand(batch, *model.input_shape, generator=g)


def _reference(model, part, inp):
    """float64: the decoder's probabilities 1 / (1 + e^-l), or the per-sample score
    sum(log(1 + e^l) - x l) + beta * 1/2 sum(mu^2 + e^lv - 1 - lv) at z = mu."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        if part == "decoder":
            return 1.0 / (1.0 + np.exp(-model64.decoder(inp.double()).numpy()))
        x = inp.double()
        mu, logvar = model64.encode(x)
        logits, x, mu, logvar = (t.numpy() for t in (model64.decoder(mu), x, mu, logvar))
    recon = (np.logaddexp(0.0, logits) - x * logits).sum(1)
    kl = 0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar).sum(1)
    return recon + model.beta * kl


def _step(model, out, part, impl, inp):
    """A zero-argument callable running one inference; returns a numpy array."""
    if impl == "eager":
        method = model.decode if part == "decoder" else model.score

        def eager():
            with torch.inference_mode():
                return method(inp).numpy()
        return eager
    # the session itself, without VAERuntime's input checks: the graph's cost
    runtime = VAERuntime(out, providers=["CPUExecutionProvider"], quantized=impl == "ort_int8")
    session = runtime._session(part)
    feed = {PART_IO[part][0][0]: inp.numpy()}
    return lambda: session.run(None, feed)[0]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("part, impl", CASES, ids=[f"{p}:{i}" for p, i in CASES])
def test_onnx_inference(benchmark, request, exported, part, impl, batch):
    model, out, meta = exported
    inp = _input(model, part, batch)
    step = _step(model, out, part, impl, inp)
    got = step()
    want = _reference(model, part, inp)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err <= TOLERANCE[impl], f"{impl} {part}: relative error {err:.3g}"
    benchmark.extra_info["max_rel_err"] = err
    benchmark.group = f"cpu:onnx/{part}/batch{batch}"
    benchmark.extra_info.update(op=f"onnx_{part}", impl=impl, batch=batch, device="cpu",
                                model=f"MLPVAE{tuple(model.input_shape)}->{model.latent_shape}",
                                torch_threads=torch.get_num_threads())
    rounds = 1
    if full_run(request.config):
        import time

        start = time.perf_counter()
        step()
        once = time.perf_counter() - start
        rounds = int(min(MAX_ROUNDS * 10, max(MIN_ROUNDS, ROUND_SECONDS / max(once, 1e-9))))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
