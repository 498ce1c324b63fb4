"""`fastvae export` and `fastvae infer` on what `fastvae train` wrote: options the
exporter cannot honour, checkpoints it cannot export, and the data file a run was
trained on. Each failed before its fix (independent review of the CLI)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
pytest.importorskip("onnxruntime")

from cli_helpers import MARKS, ONE_EPOCH, REPO, assert_one_line  # noqa: E402

from fastvae import onnx as fv_onnx  # noqa: E402
from fastvae.app import checkpoint, cli  # noqa: E402
from fastvae.runtime import VAERuntime  # noqa: E402

pytestmark = MARKS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """uint8 (N, H, W) images, as `fastvae train` accepts them, and a VAE and an AE
    trained on them."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, size=(40, 8, 8), dtype=np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model in ("vae", "ae"):
            assert cli.main(["train", "--data", str(data), "--model", model,
                             "--out", str(root / model), *ONE_EPOCH]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "vae": root / "vae", "ae": root / "ae"}


# ---- export --opset above what the installed onnx knows -------------------------


def test_an_opset_above_the_installed_onnx_is_refused(runs, tmp_path, capsys):
    """--opset 29 with onnx 1.23 (highest 28) printed three tracebacks from the exporter's
    version conversion, then exported opset 18 and exited 0."""
    highest = onnx.defs.onnx_opset_version()
    model = checkpoint.load_model(runs["vae"])
    with pytest.raises(ValueError, match=rf"opset .*from 18 to {highest}.*got {highest + 1}"):
        fv_onnx.export(model, tmp_path / "lib", opset=highest + 1)
    capsys.readouterr()
    code = cli.main(["export", str(runs["vae"]), "--out", str(tmp_path / "cli"),
                     "--opset", str(highest + 1)])
    assert_one_line(code, capsys.readouterr().err, 2, "opset", f"to {highest}", f"got {highest + 1}")
    assert not (tmp_path / "lib").exists() and not (tmp_path / "cli").exists()
    # the bound is the exporter's real one: the highest opset exports as asked
    meta = fv_onnx.export(model, tmp_path / "top", parts=("encoder",), opset=highest)
    assert meta["opset"] == highest


# ---- infer reads a data file as train does --------------------------------------


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert cli.main(["export", str(runs["vae"]), "--out", str(out)]) == 0
    return out


def test_infer_scores_the_file_the_run_was_trained_on(runs, exported, tmp_path):
    """`fastvae train` took uint8 (N, H, W) images (scaled by 1/255, one channel); `fastvae
    infer --score` refused that file ("x must hold floating-point values ... got dtype uint8")."""
    images = torch.from_numpy(np.load(runs["data"]).astype(np.float32)[:, None] / 255)
    scores = tmp_path / "scores.npy"
    assert cli.main(["infer", str(exported), "--score", str(runs["data"]), "--out", str(scores)]) == 0
    expected = checkpoint.load_model(runs["vae"]).score(images).detach().numpy()
    np.testing.assert_allclose(np.load(scores), expected, rtol=1e-4)
    # an .npz with labels, as train takes it; flat (N, 64) float samples too
    np.savez(tmp_path / "labelled.npz", x=np.load(runs["data"]), y=np.arange(40) % 3)
    np.save(tmp_path / "flat.npy", images.numpy().reshape(40, 64))
    for data in ("labelled.npz", "flat.npy"):
        recon = tmp_path / f"{data}.recon.npy"
        assert cli.main(["infer", str(exported), "--reconstruct", str(tmp_path / data),
                         "--out", str(recon)]) == 0
        np.testing.assert_array_equal(np.load(recon), VAERuntime(exported).reconstruct(images.numpy()))


def test_infer_refuses_what_train_refuses_in_the_same_words(exported, tmp_path, capsys):
    np.save(tmp_path / "ints.npy", np.ones((4, 8, 8), np.int64))
    code = cli.main(["train", "--data", str(tmp_path / "ints.npy"), "--out", str(tmp_path / "r"), *ONE_EPOCH])
    assert_one_line(code, capsys.readouterr().err, 2, "int64 is ambiguous; give uint8 images")
    code = cli.main(["infer", str(exported), "--score", str(tmp_path / "ints.npy"),
                     "--out", str(tmp_path / "s.csv")])
    assert_one_line(code, capsys.readouterr().err, 2, "int64 is ambiguous; give uint8 images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ints.npy"]


BLOCK_TORCH = """
import sys

class BlockTorch:  # makes torch (and anything under it) unimportable
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, BlockTorch())
"""


def test_infer_reads_train_data_without_torch(runs, exported, tmp_path):
    """The shared reading of data files (fastvae.app.arrays) keeps `fastvae infer` torch-free."""
    expected = tmp_path / "expected.npy"
    assert cli.main(["infer", str(exported), "--score", str(runs["data"]), "--out", str(expected)]) == 0
    script = BLOCK_TORCH + f"""
from fastvae.app.cli import main
assert main(["infer", {str(exported)!r}, "--score", {str(runs["data"])!r},
             "--out", {str(tmp_path / "got.npy")!r}]) == 0
assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "got.npy"), np.load(expected))


# ---- export of an autoencoder ---------------------------------------------------


def test_exporting_an_autoencoder_says_only_vaes_export(runs, tmp_path, capsys):
    """The error was the exporter's interface check: "model.encode(x) must return (mu, logvar)..."."""
    code = cli.main(["export", str(runs["ae"]), "--out", str(tmp_path / "onnx")])
    assert_one_line(code, capsys.readouterr().err, 2, "only VAE checkpoints can be exported",
                    str(runs["ae"]), "autoencoder (--model ae)")
    assert not (tmp_path / "onnx").exists()


# ---- found by a second CLI review -------------------------------------------------


def test_a_png_without_pillow_is_a_missing_package_exit_code_1(exported, tmp_path, capsys,
                                                                monkeypatch):
    """A missing optional package is exit code 1 (README); without Pillow `infer --out x.png`
    was reported as bad input, exit code 2."""
    monkeypatch.setitem(sys.modules, "PIL", None)  # import fails as if not installed
    code = cli.main(["infer", str(exported), "--sample", "4", "--out", str(tmp_path / "s.png")])
    assert_one_line(code, capsys.readouterr().err, 1, "needs Pillow")
    assert not (tmp_path / "s.png").exists()


def test_a_fixed_batch_larger_than_memory_is_refused(runs, tmp_path, capsys):
    """Its example inputs are made in memory: a DefaultCPUAllocator traceback before."""
    code = cli.main(["export", str(runs["vae"]), "--out", str(tmp_path / "o"),
                     "--batch", "100000000000"])
    assert_one_line(code, capsys.readouterr().err, 2, "batch 100000000000", "GiB of memory")
    assert not (tmp_path / "o").exists()


def test_ctrl_c_inside_torchs_exporter_is_an_interrupt(runs, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt while torch imports its exporter comes back wrapped in torch's own
    error (a 112-line TorchExportError traceback, exit 1): it is exit code 130."""
    def interrupted_inside_torch(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise RuntimeError("Failed to export the model with torch.export") from err

    monkeypatch.setattr(torch.onnx, "export", interrupted_inside_torch)
    code = cli.main(["export", str(runs["vae"]), "--out", str(tmp_path / "o")])
    assert code == 130 and capsys.readouterr().err.strip() == "fastvae export: interrupted"
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []


def test_infer_and_export_name_their_options(runs, exported, tmp_path, capsys):
    """They named the runtime's and exporter's arguments ("n must be positive", "seed must be
    non-negative", "quantized=True but ...", "batch must be ...")."""
    for args, words in (
            (["infer", str(exported), "--sample", "0", "--out", str(tmp_path / "s.npy")],
             ["--sample must be >= 1, got 0"]),
            (["infer", str(exported), "--sample", "2", "--seed", "-1", "--out",
              str(tmp_path / "s.npy")], ["--seed must be >= 0, got -1"]),
            (["infer", str(exported), "--sample", "2", "--quantized", "--out",
              str(tmp_path / "s.npy")], ["--quantized:", "has no int8 files", "--quantize"]),
            (["export", str(runs["vae"]), "--out", str(tmp_path / "o"), "--batch", "0"],
             ["--batch must be 'dynamic' or a positive int, got '0'"])):
        capsys.readouterr()
        assert_one_line(cli.main(args), capsys.readouterr().err, 2, *words)
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "o").exists()


# ---- found by a third CLI review ---------------------------------------------------------


def test_a_png_of_non_finite_images_is_refused_and_not_written(tmp_path):
    """Clipping painted NaN black and inf white: a PNG of samples decoded from an
    overflowing prior looked like images (exit 0). It is refused; .npy keeps the values."""
    pytest.importorskip("PIL")
    from fastvae.app.infer import write_grid_png

    batch = np.full((2, 1, 4, 4), 0.5, np.float32)
    write_grid_png(str(tmp_path / "ok.png"), batch, (1, 4, 4))
    for bad in (np.nan, np.inf, -np.inf):
        batch[1, 0, 2, 3] = bad
        with pytest.raises(ValueError, match="1 NaN or infinite values of 32; write .npy"):
            write_grid_png(str(tmp_path / "bad.png"), batch, (1, 4, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]
