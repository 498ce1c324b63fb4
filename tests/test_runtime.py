"""The torch-free runtime (fastvae.runtime.VAERuntime) and `fastvae infer`:
results against the PyTorch model, reproducible sampling, every bad input,
broken export directories, and import + inference with torch unimportable.

The models are exported once per module (PyTorch is used here only to make
the exports and the references).
"""

import csv
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
pytest.importorskip("onnxruntime")

from test_onnx import TinyConvVAE, TinyMLPVAE, rel_err, seeded  # noqa: E402

from fastvae import onnx as fv_onnx  # noqa: E402
from fastvae.app import cli  # noqa: E402
from fastvae.runtime import VAERuntime  # noqa: E402

RTOL = 1e-4
# torch's exporter trips its own deprecation warning (torch 2.13); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """An MLP VAE on flat 12-dim data (bce_logits), exported with int8 parts."""
    model = seeded(TinyMLPVAE, seed=11)
    out = tmp_path_factory.mktemp("rt_mlp") / "export"
    fv_onnx.export(model, out, quantize=True)
    return model, str(out)


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    """A conv VAE on (1, 8, 8) images with a (2, 4, 4) latent map (mse)."""
    model = seeded(TinyConvVAE, seed=12)
    out = tmp_path_factory.mktemp("rt_conv") / "export"
    fv_onnx.export(model, out, parts=("encoder", "decoder"))
    return model, str(out)


@pytest.fixture(scope="module")
def mlp_rt(mlp):
    return VAERuntime(mlp[1])


def torch_decode(model, z):
    with torch.no_grad():
        return model.decode(torch.from_numpy(np.asarray(z, np.float32))).numpy()


# ---- results ----------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 37])
def test_matches_pytorch(mlp, conv, batch):
    for model, out in (mlp, conv):
        rt = VAERuntime(out)
        assert rt.input_shape == model.input_shape and rt.latent_shape == model.latent_shape
        x = np.random.default_rng(batch).random((batch, *model.input_shape), dtype=np.float32)
        with torch.no_grad():
            mu, logvar = model.encode(torch.from_numpy(x))
        got_mu, got_logvar = rt.encode(x)
        assert got_mu.dtype == np.float32
        assert rel_err(got_mu, mu.numpy()) <= RTOL
        assert rel_err(got_logvar, logvar.numpy()) <= RTOL
        assert rel_err(rt.reconstruct(x), torch_decode(model, mu.numpy())) <= RTOL
        z = np.random.default_rng(batch + 1).standard_normal((batch, *model.latent_shape))
        assert rel_err(rt.decode(z), torch_decode(model, z)) <= RTOL


def test_score_matches_pytorch(mlp, mlp_rt):
    model, _ = mlp
    x = np.random.default_rng(0).random((37, 12), dtype=np.float32)
    with torch.no_grad():
        want = model.score(torch.from_numpy(x)).numpy()
    got = mlp_rt.score(x)
    assert got.shape == (37,)
    assert rel_err(got, want) <= RTOL


def test_sample_is_the_decoded_standard_normal_of_its_seed(mlp, mlp_rt):
    model, _ = mlp
    a = mlp_rt.sample(16, seed=123)
    assert a.shape == (16, 12)
    np.testing.assert_array_equal(a, mlp_rt.sample(16, seed=123))
    assert not np.array_equal(a, mlp_rt.sample(16, seed=124))
    assert not np.array_equal(mlp_rt.sample(16), mlp_rt.sample(16))  # no seed: fresh noise
    z = np.random.default_rng(123).standard_normal((16, 3), dtype=np.float32)
    assert rel_err(a, torch_decode(model, z)) <= RTOL


def test_float64_float16_and_lists_are_cast(mlp_rt):
    x = np.random.default_rng(1).random((4, 12))
    want = mlp_rt.encode(x.astype(np.float32))[0]
    np.testing.assert_array_equal(mlp_rt.encode(x)[0], want)
    np.testing.assert_array_equal(mlp_rt.encode(x.astype(np.float32).tolist())[0], want)
    half = x.astype(np.float16)
    np.testing.assert_array_equal(mlp_rt.encode(half)[0], mlp_rt.encode(half.astype(np.float32))[0])
    # non-contiguous input
    wide = np.random.default_rng(2).random((4, 24), dtype=np.float32)
    np.testing.assert_array_equal(mlp_rt.encode(wide[:, ::2])[0],
                                  mlp_rt.encode(np.ascontiguousarray(wide[:, ::2]))[0])


def test_quantized_runtime(mlp):
    model, out = mlp
    rt8 = VAERuntime(out, quantized=True)
    z = np.random.default_rng(3).standard_normal((8, 3), dtype=np.float32)
    got = rt8.decode(z)
    assert rel_err(got, torch_decode(model, z)) < 0.05
    assert not np.array_equal(got, VAERuntime(out).decode(z))  # really the int8 graph


def test_static_batch_export_runs_any_batch_in_chunks(tmp_path):
    model = seeded(TinyMLPVAE, seed=13)
    fv_onnx.export(model, tmp_path / "e", parts=("decoder",), batch=4)
    rt = VAERuntime(tmp_path / "e")
    assert rt.static_batch == 4
    for n in (1, 4, 10):
        z = np.random.default_rng(n).standard_normal((n, 3), dtype=np.float32)
        assert rel_err(rt.decode(z), torch_decode(model, z)) <= RTOL


class PriorVAENoScore(torch.nn.Module):
    """A user's VAE with a (2, 2) latent map, a learned prior of that shape and an
    optional gaussian obs_logvar, and no score(): the export builds its scorer."""

    def __init__(self, recon="mse", obs_logvar=None):
        super().__init__()
        self.enc = torch.nn.Linear(6, 8)
        self.dec = torch.nn.Linear(4, 6)
        self.input_shape, self.latent_shape = (6,), (2, 2)
        self.recon, self.beta, self.prior = recon, 0.7, "learned"
        if obs_logvar is not None:
            self.obs_logvar = obs_logvar
        g = torch.Generator().manual_seed(5)
        self.prior_mu = torch.nn.Parameter(torch.randn(2, 2, generator=g))
        self.prior_logvar = torch.nn.Parameter(0.5 * torch.randn(2, 2, generator=g))

    def encode(self, x):
        mu, logvar = self.enc(x).reshape(-1, 2, 2, 2).unbind(1)
        return mu, logvar

    def decode(self, z):
        return self.dec(z.flatten(1))


@pytest.mark.parametrize("recon, obs_logvar", [("mse", None), ("gaussian", 0.4)])
def test_user_model_with_a_learned_prior_and_no_score(tmp_path, recon, obs_logvar):
    """The scorer built for a model without score() used N(0, I) and unit variance although
    the model has a learned prior (which the metadata records and sample() draws from) and
    an obs_logvar; a prior shaped like a (2, 2) latent map was written nested, and the
    runtime refused its own export as corrupt."""
    model = seeded(PriorVAENoScore, seed=3, recon=recon, obs_logvar=obs_logvar)
    meta = fv_onnx.export(model, tmp_path / "e")
    assert meta["prior"]["mu"] == model.prior_mu.detach().reshape(-1).tolist()
    rt = VAERuntime(tmp_path / "e")
    x = np.random.default_rng(0).random((5, 6)).astype(np.float32)
    # from the math, in float64: recon at z = mu, plus beta KL(N(mu, e^lv) || N(pm, e^plv))
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    xd = torch.from_numpy(x).double()
    mu, lv = (xd @ p["enc.weight"].T + p["enc.bias"]).reshape(-1, 2, 2, 2).unbind(1)
    x_hat = mu.flatten(1) @ p["dec.weight"].T + p["dec.bias"]
    sq = (x_hat - xd) ** 2
    recon_terms = sq if obs_logvar is None else \
        0.5 * (sq * np.exp(-obs_logvar) + obs_logvar + np.log(2 * np.pi))
    pm, plv = p["prior_mu"], p["prior_logvar"]
    kl = 0.5 * (plv - lv + (lv.exp() + (mu - pm) ** 2) * torch.exp(-plv) - 1)
    want = recon_terms.sum(1) + 0.7 * kl.flatten(1).sum(1)
    assert rel_err(rt.score(x), want.numpy()) <= RTOL
    # samples come from the learned prior: decode(pm + e^(plv / 2) eps), eps of the seed
    eps = np.random.default_rng(9).standard_normal((3, 2, 2), dtype=np.float32)
    z = pm.float().numpy() + np.exp(0.5 * plv.float().numpy()) * eps
    assert rel_err(rt.sample(3, seed=9), torch_decode(model, z)) <= RTOL


def test_a_prior_whose_std_overflows_float32_is_not_exported(tmp_path):
    from fastvae.models import MLPVAE

    torch.manual_seed(0)
    model = MLPVAE((6,), latent_dim=3, hidden=(8,), prior="learned").eval()
    with torch.no_grad():
        model.prior_logvar.fill_(200.0)  # std e^100: inf in float32, every sample NaN
    with pytest.raises(ValueError, match="model.prior_logvar reaches 200, where its std overflows"):
        fv_onnx.export(model, tmp_path / "e", parts=("decoder",))
    assert os.listdir(tmp_path) == []


def test_a_fixed_batch_refuses_a_scorer_that_couples_the_samples(tmp_path):
    """obs_logvar="optimal" fits the scale to the batch scored; a fixed batch makes the
    runtime split the data and pad the last chunk with zeros, which changed every score
    of that chunk (48% off) without a word."""
    from fastvae.models import MLPVAE

    torch.manual_seed(0)
    model = MLPVAE((6,), latent_dim=2, hidden=(8,), recon="gaussian", obs_logvar="optimal").eval()
    with pytest.raises(ValueError, match="batch 4: this model's score of a sample depends on "
                                         "the other samples"):
        fv_onnx.export(model, tmp_path / "e", batch=4)
    assert os.listdir(tmp_path) == []
    # the encoder and decoder have no such coupling; a dynamic scorer scores the batch given
    fv_onnx.export(model, tmp_path / "fixed", parts=("encoder", "decoder"), batch=4)
    fv_onnx.export(model, tmp_path / "dynamic")
    x = np.random.default_rng(1).random((7, 6)).astype(np.float32)
    with torch.no_grad():
        want = model.score(torch.from_numpy(x)).numpy()
    assert rel_err(VAERuntime(tmp_path / "dynamic").score(x), want) <= RTOL


# ---- bad inputs -------------------------------------------------------------


@pytest.mark.parametrize("method, value, error, match", [
    ("encode", np.ones((2, 12), np.int64), TypeError, r"x must hold floating-point.*int64"),
    ("encode", np.ones((2, 12), bool), TypeError, r"x .*bool"),
    ("encode", np.ones((2, 12), np.complex64), TypeError, "x .*complex64"),
    ("encode", "abc", TypeError, "x must be a numpy array"),
    ("encode", np.ones(12, np.float32), ValueError, r"x must have shape \(N, 12\), got \(12,\)"),
    ("encode", np.ones((2, 13), np.float32), ValueError, r"x must have shape \(N, 12\), got \(2, 13\)"),
    ("encode", np.ones((2, 1, 12), np.float32), ValueError, "x must have shape"),
    ("encode", np.ones((0, 12), np.float32), ValueError, "x has an empty batch"),
    ("encode", np.full((2, 12), np.nan, np.float32), ValueError, "x contains NaN or Inf"),
    ("encode", np.full((2, 12), np.inf), ValueError, "x contains NaN or Inf"),
    ("encode", np.full((2, 12), 1e300), ValueError, "x contains NaN or Inf.*float32"),
    ("reconstruct", np.ones((2, 12), np.int32), TypeError, "x must hold floating-point"),
    ("score", np.ones((2, 11), np.float32), ValueError, "x must have shape"),
    ("score", np.full((2, 12), 1.5, np.float32), ValueError, r"x must hold values in \[0, 1\]"),
    ("score", np.full((2, 12), -0.1, np.float32), ValueError, r"x must hold values in \[0, 1\]"),
    ("decode", np.ones((2, 12), np.float32), ValueError, r"z must have shape \(N, 3\)"),
    ("decode", np.ones((2, 3), np.int8), TypeError, "z must hold floating-point"),
    ("decode", np.array([[np.nan, 0, 0]]), ValueError, "z contains NaN"),
])
def test_bad_arrays(mlp_rt, method, value, error, match):
    with pytest.raises(error, match=match):
        getattr(mlp_rt, method)(value)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n": 0}, ValueError, "n must be positive"),
    ({"n": -3}, ValueError, "n must be positive"),
    ({"n": 2.0}, TypeError, "n must be an int"),
    ({"n": True}, TypeError, "n must be an int"),
    ({"n": 2, "seed": -1}, ValueError, "seed must be non-negative"),
    ({"n": 2, "seed": "7"}, TypeError, "seed must be None or an int"),
    ({"n": 2, "seed": 1.5}, TypeError, "seed must be None or an int"),
    ({"n": 2**62}, ValueError, r"n=\d+: .* do not fit in memory"),  # (numpy's error named no n)
])
def test_bad_sample_arguments(mlp_rt, kwargs, error, match):
    with pytest.raises(error, match=match):
        mlp_rt.sample(**kwargs)


def test_missing_part_and_missing_int8(conv):
    _, out = conv
    rt = VAERuntime(out)
    assert rt.parts == ("encoder", "decoder")
    with pytest.raises(ValueError, match="no scorer part"):
        rt.score(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="quantized=True.*no int8"):
        VAERuntime(out, quantized=True)
    with pytest.raises(TypeError, match="quantized must be a bool, got str 'no'"):
        VAERuntime(out, quantized="no")  # (a non-empty string read as True before)


def test_bad_providers(mlp):
    with pytest.raises(ValueError, match="providers.*NoSuchExecutionProvider"):
        VAERuntime(mlp[1], providers=["NoSuchExecutionProvider"])
    with pytest.raises(TypeError, match="providers"):
        VAERuntime(mlp[1], providers="CPUExecutionProvider")


# ---- broken export directories -----------------------------------------------


@pytest.fixture
def broken(mlp, tmp_path):
    """A fresh copy of the MLP export to damage."""
    target = tmp_path / "copy"
    target.mkdir()
    for name in os.listdir(mlp[1]):
        (target / name).write_bytes(open(os.path.join(mlp[1], name), "rb").read())
    return target


def test_missing_directory_and_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="out_dir .*does not exist"):
        VAERuntime(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="out_dir"):
        VAERuntime(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        VAERuntime(tmp_path)
    with pytest.raises(TypeError, match="out_dir must be a path"):
        VAERuntime(3)


def test_corrupt_or_foreign_metadata(broken):
    meta_path = broken / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="metadata.json is corrupt"):
        VAERuntime(broken)
    meta_path.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match="not fastvae ONNX metadata"):
        VAERuntime(broken)
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        VAERuntime(broken)
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "latent_shape"}))
    with pytest.raises(ValueError, match="corrupt.*latent_shape"):
        VAERuntime(broken)
    # a prior beyond float32's range (finite in the JSON's float64), or a logvar whose std
    # exp(logvar / 2) overflows float32 (above 2 log(float32 max) ~ 177.4), sampled NaN silently
    for mu, logvar in (([1e39] * 3, [0.0] * 3), ([0.0] * 3, [-1e39] * 3), ([0.0] * 3, [178.0] * 3)):
        meta_path.write_text(json.dumps({**meta, "prior": {"mu": mu, "logvar": logvar}}))
        with pytest.raises(ValueError, match="prior.(mu|logvar) must be a list of 3 finite float32"):
            VAERuntime(broken)
    meta_path.write_text(json.dumps({**meta, "prior": {"mu": [1.0] * 3, "logvar": [177.0] * 3}}))
    wide = VAERuntime(broken)
    assert wide.metadata["prior"]["logvar"] == [177.0] * 3  # std 4e38: finite
    # ... but its samples mu + std eps overflow: refused, not decoded from inf (into NaN
    # images that a PNG painted black and white)
    with pytest.raises(ValueError, match="prior overflows float32 in its samples"):
        wide.sample(4, seed=0)


def test_missing_onnx_file(broken):
    os.remove(broken / "decoder.onnx")
    with pytest.raises(FileNotFoundError, match="decoder.onnx.* is missing"):
        VAERuntime(broken)


def test_corrupt_onnx_file(broken):
    path = broken / "encoder.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="encoder.onnx.* is corrupt"):
        VAERuntime(broken)


def test_a_symlinked_metadata_file_is_refused(broken, tmp_path):
    """Nothing is read from outside the export: metadata.json a link (to a valid file
    elsewhere) is refused, as a linked part file is."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (broken / "metadata.json").rename(outside / "metadata.json")
    (broken / "metadata.json").symlink_to(outside / "metadata.json")
    with pytest.raises(ValueError, match="metadata.json is a symlink"):
        VAERuntime(broken)


def test_unloadable_or_misplaced_onnx_file_with_its_hash_is_a_python_error(broken):
    """A file whose recorded hash matches but which onnxruntime cannot load, or
    which is another part's graph: a ValueError, not onnxruntime's exception."""
    meta_path = broken / "metadata.json"
    meta = json.loads(meta_path.read_text())

    def replace_scorer(data):
        (broken / "scorer.onnx").write_bytes(data)
        meta["parts"]["scorer"]["sha256"] = hashlib.sha256(data).hexdigest()
        meta_path.write_text(json.dumps(meta))

    replace_scorer(b"\x08\x07garbage, not a protobuf" * 50)
    with pytest.raises(ValueError, match="scorer.onnx.* cannot be loaded"):
        VAERuntime(broken)
    replace_scorer((broken / "decoder.onnx").read_bytes())  # a valid graph of another part
    with pytest.raises(ValueError, match=r"inputs \('z',\).*a fastvae scorer has \('x',\)"):
        VAERuntime(broken)


# ---- `fastvae infer` ----------------------------------------------------------


def test_infer_sample_npy_and_undrawable_png(mlp, mlp_rt, tmp_path, capsys):
    _, out = mlp
    npy = tmp_path / "s.npy"
    assert cli.main(["infer", out, "--sample", "10", "--seed", "4", "--out", str(npy)]) == 0
    np.testing.assert_array_equal(np.load(npy), mlp_rt.sample(10, seed=4))
    # 12 features are not a square image
    assert cli.main(["infer", out, "--sample", "10", "--out", str(tmp_path / "g.png")]) == 2
    assert "cannot be drawn as images" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["s.npy"]  # no temp files left


def test_infer_sample_grid_layout(conv, tmp_path):
    from PIL import Image

    _, out = conv
    png = tmp_path / "grid.png"
    assert cli.main(["infer", out, "--sample", "6", "--seed", "0", "--out", str(png)]) == 0
    image = np.asarray(Image.open(png))
    # 6 images of 8x8 enlarged 4x to 32x32, 3 columns x 2 rows, 2-pixel borders
    assert image.shape == (2 * 34 + 2, 3 * 34 + 2)
    samples = VAERuntime(out).sample(6, seed=0)
    first = np.clip(samples[0, 0], 0, 1) * 255
    tile = image[2:34, 2:34].astype(np.float64)
    np.testing.assert_allclose(tile[::4, ::4], np.round(first), atol=1)


def test_infer_score_csv_and_reconstruct(mlp, mlp_rt, conv, tmp_path):
    _, out = mlp
    data = np.random.default_rng(5).random((7, 12), dtype=np.float32)
    np.save(tmp_path / "data.npy", data)
    scores = tmp_path / "scores.csv"
    assert cli.main(["infer", out, "--score", str(tmp_path / "data.npy"), "--out", str(scores)]) == 0
    with open(scores) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["index", "score"]
    assert [int(r[0]) for r in rows[1:]] == list(range(7))
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], mlp_rt.score(data), rtol=1e-6)

    recon = tmp_path / "recon.npy"
    assert cli.main(["infer", out, "--reconstruct", str(tmp_path / "data.npy"),
                     "--out", str(recon)]) == 0
    np.testing.assert_array_equal(np.load(recon), mlp_rt.reconstruct(data))

    # flat (N, 64) images for a (1, 8, 8) model, in a one-array .npz
    _, conv_out = conv
    images = np.random.default_rng(6).random((3, 64), dtype=np.float32)
    np.savez(tmp_path / "images.npz", images=images)
    assert cli.main(["infer", conv_out, "--reconstruct", str(tmp_path / "images.npz"),
                     "--out", str(recon)]) == 0
    np.testing.assert_array_equal(np.load(recon),
                                  VAERuntime(conv_out).reconstruct(images.reshape(3, 1, 8, 8)))


def test_infer_bad_input(mlp, tmp_path, capsys):
    _, out = mlp
    np.save(tmp_path / "ints.npy", np.ones((3, 12), np.int64))
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    cases = [
        (["--sample", "4", "--out", str(tmp_path / "x.jpg")], "--out must end with"),
        (["--score", str(tmp_path / "ints.npy"), "--out", str(tmp_path / "s.png")], "--out must end"),
        (["--score", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "s.csv")], "does not exist"),
        (["--score", str(tmp_path / "junk.npy"), "--out", str(tmp_path / "s.csv")], "cannot read data"),
        (["--score", str(tmp_path / "ints.npy"), "--out", str(tmp_path / "s.csv")], "floating-point"),
        (["--sample", "0", "--out", str(tmp_path / "s.npy")], "--sample must be >= 1, got 0"),
        (["--sample", "4", "--out", str(tmp_path / "no" / "s.npy")], "does not exist"),
    ]
    for args, message in cases:
        assert cli.main(["infer", out] + args) == 2, args
        assert message in capsys.readouterr().err, args
    assert cli.main(["infer", str(tmp_path / "nowhere"), "--sample", "2",
                     "--out", str(tmp_path / "s.npy")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["ints.npy", "junk.npy"]


# ---- without PyTorch -----------------------------------------------------------

BLOCK_TORCH = textwrap.dedent("""
    import sys

    class BlockTorch:
        # a meta path finder that makes torch (and anything under it) unimportable
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
""")


def test_runtime_works_with_torch_unimportable(mlp, mlp_rt, tmp_path):
    _, out = mlp
    expected = tmp_path / "expected.npy"
    np.save(expected, mlp_rt.sample(5, seed=9))
    script = BLOCK_TORCH + textwrap.dedent(f"""
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the torch blocker does not work")

        import numpy as np
        import fastvae
        import fastvae.runtime
        from fastvae.app.cli import main

        rt = fastvae.runtime.VAERuntime({out!r})
        np.testing.assert_array_equal(rt.sample(5, seed=9), np.load({str(expected)!r}))
        x = np.random.default_rng(0).random((3, 12), dtype=np.float32)
        assert rt.score(x).shape == (3,) and rt.reconstruct(x).shape == (3, 12)
        assert main(["infer", {out!r}, "--sample", "4", "--out", {str(tmp_path / "g.npy")!r}]) == 0
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print("torch-free OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch-free OK" in result.stdout
    assert np.load(tmp_path / "g.npy").shape == (4, 12)


def test_import_fastvae_runtime_does_not_import_torch():
    code = ("import sys, fastvae, fastvae.runtime, fastvae.app.cli, fastvae.app.infer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
