"""Hostile cases against the ONNX export, the torch-free runtime, `fastvae infer` and
the atomic writes (issue 11, items 5, 6, 10, 11): tampered metadata.json, a NaN
weight, absurd sizes, temporaries left by a SIGKILL. Each failed before its fix."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
pytest.importorskip("onnxruntime")

from fastvae import _io  # noqa: E402
from fastvae import onnx as fv_onnx  # noqa: E402
from fastvae.app import checkpoint, cli  # noqa: E402
from fastvae.models import MLPVAE  # noqa: E402
from fastvae.runtime import VAERuntime  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_vae(seed=0):
    torch.manual_seed(seed)
    return MLPVAE((12,), latent_dim=3, hidden=(16,), recon="bce_logits", beta=0.5).eval()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "export"
    fv_onnx.export(small_vae(), out)
    return out


@pytest.fixture
def copy(export_dir, tmp_path):
    """A fresh copy of the export to tamper with, and its metadata as a dict."""
    target = tmp_path / "export"
    shutil.copytree(export_dir, target)
    return target, json.loads((target / "metadata.json").read_text())


def write_meta(target, meta):
    (target / "metadata.json").write_text(json.dumps(meta))


# ---- item 5: the metadata names the files to load -------------------------------


def test_metadata_cannot_point_outside_the_export(copy, export_dir, tmp_path):
    target, meta = copy
    other = tmp_path / "other"
    shutil.copytree(export_dir, other)  # valid ONNX files, hashes matching, outside the export
    for path in ("../other/encoder.onnx", str(other / "encoder.onnx"), "/etc/passwd",
                 "decoder.onnx"):  # another part's file inside the export is refused too
        meta["parts"]["encoder"]["file"] = path
        write_meta(target, meta)
        with pytest.raises(ValueError, match=r"parts\.encoder\.file must be 'encoder\.onnx'"):
            VAERuntime(target)


def test_sha256_is_required(copy):
    target, meta = copy
    del meta["parts"]["decoder"]["sha256"]
    write_meta(target, meta)
    with pytest.raises(ValueError, match=r"parts\.decoder\.sha256 must be"):
        VAERuntime(target)


def test_a_part_file_that_is_a_symlink_is_refused(copy, export_dir, tmp_path):
    target, _ = copy
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(export_dir / "scorer.onnx", outside)  # same bytes: the hash matches
    os.remove(target / "scorer.onnx")
    os.symlink(outside, target / "scorer.onnx")
    with pytest.raises(ValueError, match="scorer.onnx.* is a symbolic link"):
        VAERuntime(target)


# ---- item 6: NaN in the parity check ----------------------------------------------


def test_a_nan_weight_fails_the_export_and_writes_nothing(tmp_path):
    model = small_vae()
    with torch.no_grad():
        model.decoder[0].weight[0, 0] = float("nan")
    with pytest.raises(fv_onnx.ExportParityError, match="NaN or Inf"):
        fv_onnx.export(model, tmp_path / "nan", parts=("decoder",))
    assert os.listdir(tmp_path) == []


def test_relative_error_of_non_finite_values_is_inf():
    ones = np.ones(4)
    for bad in (np.nan, np.inf):
        assert fv_onnx.relative_error(np.array([1, 1, 1, bad]), ones) == np.inf
        assert fv_onnx.relative_error(ones, np.array([1, 1, 1, bad])) == np.inf
    both = np.array([1.0, np.nan])
    assert fv_onnx.relative_error(both, both) == np.inf  # NaN == NaN in both is no agreement


# ---- item 10: tampered metadata and absurd requests are one-line errors ----------------


def _one_line_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


def _nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("beta"), "beta"),
    (lambda m: m["parts"]["encoder"].pop("file"), "parts.encoder.file"),
    (lambda m: m.update(batch=0), "batch"),
    (lambda m: m.update(batch=-3), "batch"),
    (lambda m: m.update(latent_shape=[4]), "latent_shape"),
    (lambda m: m["parts"].update(decoder="decoder.onnx"), "parts.decoder"),
    (lambda m: m.update(input_shape=["12"]), "input_shape"),
    (lambda m: m.update(input_shape="12"), "input_shape"),
    (lambda m: m.update(beta=float("inf")), "beta"),
], ids=["no-beta", "no-file", "batch-0", "batch-negative", "wrong-latent-shape", "part-a-string",
        "string-shape", "shape-a-string", "infinite-beta"])
def test_tampered_metadata_is_a_one_line_error(copy, tmp_path, capsys, edit, field):
    target, meta = copy
    edit(meta)
    write_meta(target, meta)
    code = cli.main(["infer", str(target), "--sample", "4", "--out", str(tmp_path / "s.npy")])
    _one_line_error(capsys, code, "metadata.json", field)


def test_deeply_nested_metadata_is_a_one_line_error(copy, tmp_path, capsys):
    target, _ = copy
    (target / "metadata.json").write_text(_nested(100_000))
    code = cli.main(["infer", str(target), "--sample", "4", "--out", str(tmp_path / "s.npy")])
    _one_line_error(capsys, code, "metadata.json is corrupt")


def test_infer_sample_of_absurd_size_and_score_of_a_directory(export_dir, tmp_path, capsys):
    code = cli.main(["infer", str(export_dir), "--sample", "10000000000",
                     "--out", str(tmp_path / "s.npy")])
    _one_line_error(capsys, code, "--sample 10000000000")
    (tmp_path / "dir").mkdir()
    code = cli.main(["infer", str(export_dir), "--score", str(tmp_path / "dir"),
                     "--out", str(tmp_path / "s.csv")])
    _one_line_error(capsys, code, "is a directory")
    assert sorted(os.listdir(tmp_path)) == ["dir"]


# ---- item 11: what a SIGKILL leaves behind is cleaned on the next write -----------------


def _killed_mid_write(script):
    """Run ``script`` in a child that SIGKILLs itself where the script says so."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _temporaries(directory):
    return [name for name in os.listdir(directory) if ".tmp" in name]


def test_checkpoint_temporaries_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    _killed_mid_write(f"""
        import os, signal
        from fastvae import _io

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)

        _io.atomic_write({str(tmp_path / checkpoint.FILENAME)!r}, write)
    """)
    assert len(_temporaries(tmp_path)) == 1  # the SIGKILL left it
    # one of a process still running (here: this one) must survive the clean-up
    alive = tmp_path / (_io.temp_prefix(tmp_path / checkpoint.FILENAME) + "busy")
    alive.write_bytes(b"being written")
    checkpoint.save(tmp_path, small_vae(), train={"epoch": 1})
    assert _temporaries(tmp_path) == [alive.name]
    assert checkpoint.load(tmp_path)[0]["train"] == {"epoch": 1}


def test_export_directories_of_a_killed_export_are_removed_by_the_next_export(tmp_path):
    out = tmp_path / "onnx"
    _killed_mid_write(f"""
        import os, signal, torch
        from fastvae import onnx
        from fastvae.models import MLPVAE

        onnx._install = lambda tmp, out_dir: os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(0)
        onnx.export(MLPVAE((12,), latent_dim=3, hidden=(16,)), {str(out)!r}, parts=("decoder",))
    """)
    left = _temporaries(tmp_path)
    assert len(left) == 1 and os.path.isdir(tmp_path / left[0])
    fv_onnx.export(small_vae(), out, parts=("decoder",))
    assert _temporaries(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["onnx"]
    assert VAERuntime(out).parts == ("decoder",)

