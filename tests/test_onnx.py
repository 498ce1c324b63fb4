"""ONNX export (fastvae.onnx): parity with PyTorch in onnxruntime, dynamic
batch, no random ops, metadata, int8, atomic writes, bad arguments, and a
user's own module that calls fastvae exported with plain torch.onnx.export.

Each model is exported once per module (the dynamo exporter takes seconds).
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fastvae  # noqa: E402
from fastvae import onnx as fv_onnx  # noqa: E402

RTOL = 1e-4
# torch's exporter trips its own deprecation warning (torch 2.13); not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


# ---- small models with the interface the export needs ---------------------


class TinyMLPVAE(nn.Module):
    """Flat data; has score() (through fastvae.vae_loss)."""

    def __init__(self, input_dim=12, latent_dim=3, hidden=16, recon="bce_logits", beta=0.5):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(input_dim, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2 * latent_dim))
        self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.Tanh(),
                                 nn.Linear(hidden, input_dim))
        self.input_shape, self.latent_shape = (input_dim,), (latent_dim,)
        self.recon, self.beta = recon, beta

    def encode(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        return mu, logvar

    def loss_input(self, z):
        """What vae_loss takes: logits for bce_logits, probabilities for bce."""
        out = self.dec(z)
        return torch.sigmoid(out) if self.recon == "bce" else out

    def decode(self, z):
        out = self.loss_input(z)
        return torch.sigmoid(out) if self.recon == "bce_logits" else out

    def score(self, x):
        mu, logvar = self.encode(x)
        return fastvae.vae_loss(self.loss_input(mu), x, mu, logvar, recon=self.recon,
                                beta=self.beta, reduction="none")


class TinyConvVAE(nn.Module):
    """(1, 8, 8) images, a (2, 4, 4) latent map, and no score(): the export
    builds the scorer from encode/decode."""

    def __init__(self, recon="mse", beta=2.0):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(6, 4, 4, stride=2, padding=1))
        self.dec = nn.Sequential(nn.ConvTranspose2d(2, 6, 4, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv2d(6, 1, 3, padding=1))
        self.input_shape, self.latent_shape = (1, 8, 8), (2, 4, 4)
        self.recon, self.beta = recon, beta

    def encode(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        return self.dec(z)


def seeded(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


# ---- independent reference formulas (numpy, from the math) ---------------


def kl_rows(mu, logvar):
    kl = -0.5 * (1 + logvar - mu**2 - np.exp(logvar))
    return kl.reshape(len(kl), -1).sum(1)


def recon_rows(out, x, recon):
    out, x = out.astype(np.float64), x.astype(np.float64)
    if recon == "mse":
        terms = (out - x) ** 2
    elif recon == "l1":
        terms = np.abs(out - x)
    elif recon == "bce":  # logs clamped at -100, as PyTorch does
        with np.errstate(divide="ignore"):
            log_p, log_1mp = np.log(out), np.log1p(-out)
        terms = -(x * np.maximum(log_p, -100) + (1 - x) * np.maximum(log_1mp, -100))
    else:  # bce_logits: log(1 + e^l) - x*l, written stably
        terms = np.maximum(out, 0) - out * x + np.log1p(np.exp(-np.abs(out)))
    return terms.reshape(len(terms), -1).sum(1)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return np.abs(got - want).max() / np.abs(want).max()


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run1(path, array):
    s = session(path)
    return s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(array, np.float32)})


# ---- exports shared by the tests of this module -----------------------------


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory):
    model = seeded(TinyMLPVAE)
    out = tmp_path_factory.mktemp("mlp") / "export"
    meta = fv_onnx.export(model, out, quantize=True)
    return model, out, meta


@pytest.fixture(scope="module")
def conv_export(tmp_path_factory):
    model = seeded(TinyConvVAE, seed=1)
    out = tmp_path_factory.mktemp("conv") / "export"
    meta = fv_onnx.export(model, out)
    return model, out, meta


@pytest.fixture(params=["mlp", "conv"])
def exported(request, mlp_export, conv_export):
    return mlp_export if request.param == "mlp" else conv_export


# ---- parity -----------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 37])
def test_encoder_and_decoder_match_pytorch(exported, batch):
    model, out, _ = exported
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, *model.input_shape, generator=g)
    z = torch.randn(batch, *model.latent_shape, generator=g)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        x_hat = model.decode(z)
    got_mu, got_logvar = run1(out / "encoder.onnx", x.numpy())
    (got_x_hat,) = run1(out / "decoder.onnx", z.numpy())
    assert got_mu.shape == (batch, *model.latent_shape)
    assert got_x_hat.shape == (batch, *model.input_shape)
    assert rel_err(got_mu, mu.numpy()) <= RTOL
    assert rel_err(got_logvar, logvar.numpy()) <= RTOL
    assert rel_err(got_x_hat, x_hat.numpy()) <= RTOL


@pytest.mark.parametrize("batch", [1, 37])
def test_scorer_is_the_per_sample_vae_loss_at_the_posterior_mean(exported, batch):
    model, out, _ = exported
    x = torch.rand(batch, *model.input_shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        if model.recon == "bce_logits":
            loss_input = model.dec(mu)  # logits
        else:
            loss_input = model.decode(mu)
    mu, logvar, loss_input = mu.double().numpy(), logvar.double().numpy(), loss_input.numpy()
    want = recon_rows(loss_input, x.numpy(), model.recon) + model.beta * kl_rows(mu, logvar)
    (got,) = run1(out / "scorer.onnx", x.numpy())
    assert got.shape == (batch,)
    assert rel_err(got, want) <= RTOL


def test_dynamic_batch_runs_at_1000(exported):
    model, out, meta = exported
    assert meta["batch"] == "dynamic"
    x = torch.rand(1000, *model.input_shape, generator=torch.Generator().manual_seed(3))
    z = torch.randn(1000, *model.latent_shape, generator=torch.Generator().manual_seed(4))
    mu, _ = run1(out / "encoder.onnx", x.numpy())
    (x_hat,) = run1(out / "decoder.onnx", z.numpy())
    (score,) = run1(out / "scorer.onnx", x.numpy())
    with torch.no_grad():
        assert rel_err(mu, model.encode(x)[0].numpy()) <= RTOL
        assert rel_err(x_hat, model.decode(z).numpy()) <= RTOL
    assert score.shape == (1000,) and np.isfinite(score).all()


@pytest.mark.parametrize("recon", ["bce_logits", "bce"])
def test_scorer_is_exact_for_saturated_logits(tmp_path, recon):
    """A trained model emits logits far below -17 for dark pixels; a naive
    Log(Sigmoid(l)) lowering gives inf or a wrong loss there (onnxruntime's
    Sigmoid is 0 below about -17). Here half the logits are -60 or +60 and the
    targets disagree with most of them."""
    model = seeded(TinyMLPVAE, recon=recon, beta=1.0)
    with torch.no_grad():
        last = model.dec[-1]
        last.weight.mul_(0.1)
        last.bias.copy_(torch.tensor([-60.0, 60.0, -25.0, 25.0, -16.0, 16.0] * 2))
    out = tmp_path / "export"
    fv_onnx.export(model, out, parts=("scorer",))
    x = torch.zeros(5, 12)
    x[:, ::4] = 1.0  # targets 1 under logits -60, -16, -60; 0 under +60, +25, +16
    with torch.no_grad():
        want = model.score(x).double().numpy()
        mu, logvar = (t.double().numpy() for t in model.encode(x))
        loss_input = model.loss_input(torch.from_numpy(mu).float()).numpy()
    reference = recon_rows(loss_input, x.numpy(), recon) + kl_rows(mu, logvar)
    (got,) = run1(out / "scorer.onnx", x.numpy())
    assert np.isfinite(got).all()
    assert rel_err(want, reference) <= 1e-5  # PyTorch agrees with the math
    assert rel_err(got, reference) <= RTOL


@pytest.mark.parametrize("recon", ["l1", "bce"])
def test_scorer_parity_other_recons(tmp_path, recon):
    model = seeded(TinyMLPVAE, recon=recon, beta=0.25)
    meta = fv_onnx.export(model, tmp_path / "e", parts=("scorer",))
    x = torch.rand(9, 12, generator=torch.Generator().manual_seed(5))
    (got,) = run1(tmp_path / "e" / "scorer.onnx", x.numpy())
    with torch.no_grad():
        assert rel_err(got, model.score(x).numpy()) <= RTOL
    assert set(meta["parts"]) == {"scorer"}
    assert sorted(os.listdir(tmp_path / "e")) == ["metadata.json", "scorer.onnx"]


# ---- the files ------------------------------------------------------------


def all_op_types(model_proto):
    ops = set()

    def visit(graph):
        for node in graph.node:
            ops.add(node.op_type)
            for attr in node.attribute:
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model_proto.graph)
    for function in model_proto.functions:
        for node in function.node:
            ops.add(node.op_type)
    return ops


def test_files_pass_the_checker_and_hold_no_random_op(exported):
    _, out, meta = exported
    for part in ("encoder", "decoder", "scorer"):
        path = out / f"{part}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        ops = all_op_types(onnx.load(str(path)))
        assert ops, part
        assert not any(op.startswith("Random") or op in ("Multinomial", "Bernoulli") for op in ops)
        opset = {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]
        assert meta["opset"] == opset


def test_metadata(exported):
    model, out, meta = exported
    with open(out / "metadata.json") as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["input_shape"] == list(model.input_shape)
    assert on_disk["latent_shape"] == list(model.latent_shape)
    assert on_disk["recon"] == model.recon and on_disk["beta"] == model.beta
    assert on_disk["fastvae_version"] == fastvae.__version__
    assert on_disk["torch_version"] == torch.__version__
    for part in ("encoder", "decoder", "scorer"):
        info = on_disk["parts"][part]
        assert 0.0 <= info["max_rel_err"] <= RTOL
        assert info["sha256"] == hashlib.sha256((out / info["file"]).read_bytes()).hexdigest()


def test_int8_quantized_encoder_and_decoder(mlp_export):
    model, out, meta = mlp_export
    assert set(meta["quantized"]) == {"encoder", "decoder"}
    for part, inp in (("encoder", torch.rand(37, 12)), ("decoder", torch.randn(37, 3))):
        info = meta["quantized"][part]
        path = out / info["file"]
        onnx.checker.check_model(str(path))
        ops = all_op_types(onnx.load(str(path)))
        assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops
        with torch.no_grad():
            want = model.encode(inp)[0] if part == "encoder" else model.decode(inp)
        got = run1(path, inp.numpy())[0]
        # int8 weights: a few percent at most, and recorded honestly (not 0)
        assert rel_err(got, want.numpy()) < 0.05
        assert 0 < info["max_rel_err"] < 0.05
        lat = info["latency_ms"]
        assert lat["fp32"] > 0 and lat["int8"] > 0


def test_export_leaves_the_model_untouched(tmp_path):
    model = seeded(TinyMLPVAE).train().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fv_onnx.export(model, tmp_path / "e", parts=("decoder",))
    assert model.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_static_batch_and_explicit_opset(tmp_path):
    model = seeded(TinyMLPVAE)
    meta = fv_onnx.export(model, tmp_path / "e", parts=("encoder",), batch=5, opset=18)
    assert meta["batch"] == 5 and meta["opset"] == 18
    proto = onnx.load(str(tmp_path / "e" / "encoder.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    s = session(tmp_path / "e" / "encoder.onnx")
    assert s.get_inputs()[0].shape == [5, 12]
    x = torch.rand(5, 12)
    with torch.no_grad():
        assert rel_err(s.run(None, {"x": x.numpy()})[0], model.encode(x)[0].numpy()) <= RTOL
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # onnxruntime's own error type
        s.run(None, {"x": torch.rand(6, 12).numpy()})


def test_the_highest_opset_exports_without_the_converters_notices(tmp_path, caplog):
    """Opsets the exporter reaches through onnx's version converter (26-28 with onnx 1.23)
    logged "... fallback is enabled ..." once per part; the parity check covers it."""
    highest = fv_onnx._max_opset()
    model = seeded(TinyMLPVAE)
    with caplog.at_level("WARNING"):
        meta = fv_onnx.export(model, tmp_path / "e", parts=("decoder",), opset=highest)
    assert meta["opset"] == highest
    assert [r.getMessage() for r in caplog.records if "fallback" in r.getMessage()] == []


# ---- nothing half-written -------------------------------------------------


class RandomDecoder(TinyMLPVAE):
    def decode(self, z):
        return super().decode(z + torch.randn_like(z))


def test_random_op_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="random ops"):
        fv_onnx.export(seeded(RandomDecoder), tmp_path / "e", parts=("encoder", "decoder"))
    assert os.listdir(tmp_path) == []


def test_failed_export_keeps_the_previous_export(tmp_path, monkeypatch):
    out = tmp_path / "e"
    fv_onnx.export(seeded(TinyMLPVAE), out, parts=("decoder",))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    monkeypatch.setattr(fv_onnx, "PARITY_RTOL", -1.0)  # every part now "fails" its check
    with pytest.raises(fv_onnx.ExportParityError, match="encoder"):
        fv_onnx.export(seeded(TinyMLPVAE, seed=5), out, parts=("encoder", "decoder"))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["e"]  # no temp dir left behind


def test_reexport_replaces_an_earlier_export(tmp_path):
    out = tmp_path / "e"
    fv_onnx.export(seeded(TinyMLPVAE), out, parts=("encoder", "decoder"))
    fv_onnx.export(seeded(TinyMLPVAE, seed=3), out, parts=("decoder",))
    assert sorted(os.listdir(out)) == ["decoder.onnx", "metadata.json"]
    assert sorted(os.listdir(tmp_path)) == ["e"]


def test_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out_dir"):
        fv_onnx.export(seeded(TinyMLPVAE), tmp_path, parts=("decoder",))
    assert os.listdir(tmp_path) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="out_dir"):
        fv_onnx.export(seeded(TinyMLPVAE), tmp_path / "f", parts=("decoder",))
    # under a file: said so (it was "[Errno 17] File exists" from makedirs, after the export)
    with pytest.raises(NotADirectoryError, match=r"out_dir .*: '.*f' is not a directory"):
        fv_onnx.export(seeded(TinyMLPVAE), tmp_path / "f" / "sub" / "e", parts=("decoder",))
    assert os.listdir(tmp_path) == ["f"]


def test_failed_export_removes_the_folders_it_created(tmp_path, monkeypatch):
    """A failed export writes nothing: not the missing folders above out_dir either."""
    monkeypatch.setattr(fv_onnx, "PARITY_RTOL", -1.0)  # every part "fails" its check
    with pytest.raises(fv_onnx.ExportParityError):
        fv_onnx.export(seeded(TinyMLPVAE), tmp_path / "a" / "b" / "e", parts=("decoder",))
    assert os.listdir(tmp_path) == []
    (tmp_path / "kept").mkdir()  # an existing one stays
    with pytest.raises(fv_onnx.ExportParityError):
        fv_onnx.export(seeded(TinyMLPVAE), tmp_path / "kept" / "b" / "e", parts=("decoder",))
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


@pytest.mark.parametrize("kind", ["folder", "symlink"])
def test_refuses_to_replace_an_export_holding_something_else_under_a_part_name(tmp_path, kind):
    """An earlier export is replaced whole: only if each entry is one of its plain files
    (a folder or link under a part's name holds something else: refused, not deleted)."""
    out = tmp_path / "e"
    fv_onnx.export(seeded(TinyMLPVAE), out, parts=("decoder",))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    if kind == "folder":
        (out / "scorer.onnx").mkdir()
        (out / "scorer.onnx" / "notes.txt").write_text("mine")
    else:
        (out / "scorer.onnx").symlink_to(tmp_path / "mine" / "notes.txt")
    with pytest.raises(FileExistsError, match="out_dir"):
        fv_onnx.export(seeded(TinyMLPVAE), out, parts=("decoder",))
    assert (out / "scorer.onnx").exists() and (tmp_path / "mine" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("recon", ["bce_logits", "continuous_bernoulli"])
def test_a_logit_recon_model_without_score_is_refused_a_scorer(tmp_path, recon):
    """decode(z) gives data space: the loss of logits cannot be rebuilt from it exactly
    (bce on sigmoid(l) clamps where sigmoid rounds to 1; the continuous Bernoulli's mean
    has no closed inverse), so the scorer needs the model's own score(x); the other parts
    export."""
    model = seeded(TinyConvVAE, recon=recon)
    with pytest.raises(TypeError, match=rf"recon={recon!r} needs a score\(x\) method"):
        fv_onnx.export(model, tmp_path / "e")
    assert os.listdir(tmp_path) == []
    fv_onnx.export(model, tmp_path / "e", parts=("encoder", "decoder"))
    assert sorted(os.listdir(tmp_path / "e")) == ["decoder.onnx", "encoder.onnx", "metadata.json"]


# ---- bad arguments --------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"parts": ("encoder", "generator")}, ValueError, "parts"),
    ({"parts": ()}, ValueError, "parts"),
    ({"parts": ("decoder", "decoder")}, ValueError, "parts"),
    ({"opset": 9}, ValueError, "opset"),
    ({"opset": "18"}, ValueError, "opset"),
    ({"batch": 0}, ValueError, "batch"),
    ({"batch": "static"}, ValueError, "batch"),
    ({"quantize": "yes"}, TypeError, "quantize"),
])
def test_bad_options(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        fv_onnx.export(seeded(TinyMLPVAE), tmp_path / "e", **kwargs)
    assert os.listdir(tmp_path) == []


def test_bad_models(tmp_path):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fv_onnx.export(lambda x: x, tmp_path / "e")
    with pytest.raises(TypeError, match="encode"):
        fv_onnx.export(nn.Linear(2, 2), tmp_path / "e")
    for attr, value, match in (("recon", "gauss", "model.recon"), ("beta", float("nan"), "model.beta"),
                               ("input_shape", None, "model.input_shape"),
                               ("latent_shape", (3, 0), "model.latent_shape")):
        model = seeded(TinyMLPVAE)
        setattr(model, attr, value)
        with pytest.raises(TypeError, match=match):
            fv_onnx.export(model, tmp_path / "e")
    assert os.listdir(tmp_path) == []


# ---- a user's own module exports with plain torch.onnx.export ------------


class UserVAEStep(nn.Module):
    """Someone's model that calls fastvae's loss and sampling in its forward."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(10, 8)
        self.dec = nn.Linear(4, 10)

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, dim=1)
        logvar = logvar - 40.0  # std ~ 2e-9: z is mu up to noise far below the tolerance
        z = fastvae.reparameterize(mu, logvar)
        loss = fastvae.vae_loss(self.dec(z), x, mu, logvar, recon="bce_logits", beta=0.5,
                                reduction="none")
        kl = fastvae.kl_divergence(mu, logvar, reduction="none")
        return loss, kl


def test_user_module_exports_with_plain_dynamo_export(tmp_path):
    model = seeded(UserVAEStep)
    x = torch.rand(3, 10)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    path = tmp_path / "user.onnx"
    program.save(str(path))
    onnx.checker.check_model(str(path))
    assert not any(op.startswith("fastvae") for op in all_op_types(onnx.load(str(path))))
    x = torch.rand(3, 10, generator=torch.Generator().manual_seed(9))
    loss, kl = run1(path, x.numpy())
    # the reference, straight from the math (z = mu at this tiny std)
    with torch.no_grad():
        mu, logvar = model.enc(x).chunk(2, dim=1)
        logvar = logvar - 40.0
        logits = model.dec(mu)
    mu, logvar = mu.double().numpy(), logvar.double().numpy()
    want_kl = kl_rows(mu, logvar)
    want_loss = recon_rows(logits.numpy(), x.numpy(), "bce_logits") + 0.5 * want_kl
    assert rel_err(kl, want_kl) <= RTOL
    assert rel_err(loss, want_loss) <= RTOL


# ---- fastvae.models, and `fastvae export CHECKPOINT` ---------------------


@pytest.fixture(scope="module")
def library_exports(tmp_path_factory):
    """fastvae.models' MLP VAE exported with the API, and its conv VAE saved as a
    checkpoint and exported with the command line."""
    from fastvae.app import checkpoint, cli
    from fastvae.models import MLPVAE, ConvVAE

    root = tmp_path_factory.mktemp("library")
    mlp = seeded(MLPVAE, input_shape=(64,), latent_dim=4, hidden=(32, 16), recon="bce_logits",
                 beta=1.5)
    fv_onnx.export(mlp, root / "mlp")
    conv = seeded(ConvVAE, seed=2, input_shape=(1, 8, 8), latent_dim=5, channels=(4, 8),
                  recon="bce")
    (root / "ckpt").mkdir()
    checkpoint.save(root / "ckpt", conv)
    assert cli.main(["export", str(root / "ckpt"), "--out", str(root / "conv")]) == 0
    return {"mlp": (mlp, root / "mlp"), "conv": (conv, root / "conv")}


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("batch", [1, 37])
def test_library_models_match_pytorch(library_exports, kind, batch):
    model, out = library_exports[kind]
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, *model.input_shape, generator=g)
    z = torch.randn(batch, *model.latent_shape, generator=g)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        x_hat, score = model.decode(z), model.score(x)
    got_mu, got_logvar = run1(out / "encoder.onnx", x.numpy())
    assert rel_err(got_mu, mu.numpy()) <= RTOL
    assert rel_err(got_logvar, logvar.numpy()) <= RTOL
    assert rel_err(run1(out / "decoder.onnx", z.numpy())[0], x_hat.numpy()) <= RTOL
    assert rel_err(run1(out / "scorer.onnx", x.numpy())[0], score.numpy()) <= RTOL
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["model_class"] == type(model).__name__ and meta["recon"] == model.recon


def test_export_command_bad_input(tmp_path, capsys):
    from fastvae.app import checkpoint, cli
    from fastvae.models import MLPVAE, MLPAutoencoder

    assert cli.main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "ae").mkdir()
    checkpoint.save(tmp_path / "ae", seeded(MLPAutoencoder, input_shape=(64,), hidden=(8,)))
    assert cli.main(["export", str(tmp_path / "ae"), "--out", str(tmp_path / "e")]) == 2
    assert "only VAE checkpoints can be exported" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "ae"), "--out", str(tmp_path / "e"),
                     "--batch", "many"]) == 2
    assert "--batch" in capsys.readouterr().err
    (tmp_path / "vae").mkdir()
    checkpoint.save(tmp_path / "vae", seeded(MLPVAE, input_shape=(64,), hidden=(8,)))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert cli.main(["export", str(tmp_path / "vae"), "--out", str(tmp_path / "busy")]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "vae"), "--out",
                     str(tmp_path / "busy" / "keep.txt" / "e")]) == 2
    err = capsys.readouterr().err
    assert "keep.txt' is not a directory" in err and "Errno" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["ae", "busy", "vae"]


class BCELogitsLoss(nn.Module):
    def forward(self, logits, x, mu, logvar):
        return fastvae.vae_loss(logits, x, mu, logvar, recon="bce_logits", reduction="none")


def test_user_module_bce_logits_stays_finite_for_saturated_logits(tmp_path):
    """onnxruntime's Sigmoid is 0 below about -17: the exported loss must not go through log(sigmoid)."""
    logits = torch.tensor([[-30.0, -20.0, -17.0, 5.0], [60.0, -90.0, 0.5, -3.0]])
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.5, 0.25]])
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    program = torch.onnx.export(BCELogitsLoss().eval(), (logits, x, mu, logvar), dynamo=True,
                                verbose=False)
    path = tmp_path / "loss.onnx"
    program.save(str(path))
    s = session(path)
    (got,) = s.run(None, {i.name: t.numpy() for i, t in zip(s.get_inputs(), (logits, x, mu, logvar))})
    want = recon_rows(logits.double().numpy(), x.double().numpy(), "bce_logits")
    assert np.isfinite(got).all()
    assert rel_err(got, want) <= RTOL


def test_the_export_flag_fastvae_reads_is_torchs(monkeypatch):
    """fastvae reads the exporters' flags itself (torch.onnx.is_in_onnx_export imports
    two modules per call): with either flag set, or neither, it says what torch says.
    (A dynamo export traces under torch.compile, where torch's own function is asked;
    the flags matter to the TorchScript exporter.)"""
    from fastvae import functional

    assert functional._in_onnx_export() is torch.onnx.is_in_onnx_export() is False
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # a torch whose exporters keep their flags elsewhere: torch's function is asked
        assert functional._ONNX_FLAGS[0] is None
        return
    # the two torches fastvae is tested with (2.13 here, 2.11 on the GPU machine; 2.11 on the
    # CPU by `make test-gpu-versions`) read exactly these two: the shortcut is on
    if torch.__version__.startswith(("2.11", "2.13")):
        assert functional._ONNX_FLAGS[0] is not None
    for legacy, dynamo in ((False, False), (True, False), (False, True), (True, True)):
        monkeypatch.setattr(GLOBALS, "in_onnx_export", legacy)
        monkeypatch.setattr(_flags, "_is_onnx_exporting", dynamo)
        assert functional._in_onnx_export() is torch.onnx.is_in_onnx_export() is (legacy or dynamo)
