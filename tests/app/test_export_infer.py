"""`fastvae export` and `fastvae infer` on what `fastvae train` wrote: options the
exporter cannot honour, checkpoints it cannot export, and the data file a run was
trained on. Each failed before its fix (independent review of the CLI)."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
pytest.importorskip("onnxruntime")

from fastvae import onnx as fv_onnx  # noqa: E402
from fastvae.app import checkpoint, cli  # noqa: E402

SMALL = ["--hidden", "32", "16", "--latent-dim", "4", "--epochs", "1", "--no-progress"]
# torch's exporter trips its own deprecation warning (torch 2.13); not ours to fix
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")]


def one_line_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


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
                             "--out", str(root / model), *SMALL]) == 0
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
    one_line_error(capsys, code, "opset", f"to {highest}", f"got {highest + 1}")
    assert not (tmp_path / "lib").exists() and not (tmp_path / "cli").exists()
    # the bound is the exporter's real one: the highest opset exports as asked
    meta = fv_onnx.export(model, tmp_path / "top", parts=("encoder",), opset=highest)
    assert meta["opset"] == highest
