"""fastvae.data: digits, arrays, image folders, torchvision, and clear errors."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae.app.data import check_range, load_data


def test_digits_scaled_with_a_fixed_split():
    from sklearn.datasets import load_digits

    a, b = load_data("digits"), load_data("digits")
    assert a.input_shape == (1, 8, 8)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == round(0.2 * 1797)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert a.train.dtype == torch.float32 and a.train.min() == 0 and a.train.max() == 1
    # train + test is exactly the 1,797 digits scaled by 1/16, each once, with its label
    raw = load_digits()
    expected = sorted((tuple((im / 16.0).astype(np.float32).ravel().tolist()), int(t))
                      for im, t in zip(raw.images, raw.target))
    got = sorted((tuple(x.ravel().tolist()), int(y)) for x, y in zip(
        torch.cat([a.train, a.test]).numpy(), torch.cat([a.train_labels, a.test_labels])))
    assert got == expected


def test_npy_uint8_and_float_arrays(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(20, 6, 7), dtype=np.uint8)
    np.save(tmp_path / "img.npy", images)
    data = load_data(str(tmp_path / "img.npy"))
    assert data.input_shape == (1, 6, 7) and len(data.train) + len(data.test) == 20
    expected = {tuple((im / 255.0).astype(np.float32).ravel()) for im in images}
    assert {tuple(x.ravel().tolist()) for x in torch.cat([data.train, data.test]).numpy()} == expected
    flat = np.random.default_rng(1).random((10, 5)).astype(np.float64)
    np.save(tmp_path / "flat.npy", flat)
    assert load_data(str(tmp_path / "flat.npy")).input_shape == (5,)


def test_npz_with_labels(tmp_path):
    x = np.random.default_rng(0).random((12, 3, 4, 4)).astype(np.float32)
    y = np.arange(12) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(str(tmp_path / "d.npz"))
    assert data.input_shape == (3, 4, 4)
    for xs, ys in ((data.train, data.train_labels), (data.test, data.test_labels)):
        for xi, yi in zip(xs.numpy(), ys.tolist()):
            i = int(np.flatnonzero((x == xi).all(axis=(1, 2, 3)))[0])
            assert y[i] == yi


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(8, 10), dtype=np.uint8) for _ in range(6)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_data(str(tmp_path))
    assert data.input_shape == (1, 8, 10)
    got = {tuple(x.ravel().tolist()) for x in torch.cat([data.train, data.test]).numpy()}
    assert got == {tuple((a / 255.0).astype(np.float32).ravel()) for a in arrays}


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_data(str(tmp_path / "missing.npy"))
    (tmp_path / "corrupt.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="cannot read data file .*corrupt.npy"):
        load_data(str(tmp_path / "corrupt.npy"))
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="unsupported type"):
        load_data(str(tmp_path / "data.csv"))
    np.savez(tmp_path / "two.npz", a=np.zeros((3, 2)), b=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="named 'x'"):
        load_data(str(tmp_path / "two.npz"))
    np.savez(tmp_path / "labels.npz", x=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(ValueError, match=r"labels 'y' must have shape \(3,\)"):
        load_data(str(tmp_path / "labels.npz"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot read data file"):  # never unpickled
        load_data(str(tmp_path / "obj.npy"))
    # string labels: "invalid literal for int() with base 10: np.str_('cat')", naming nothing
    np.savez(tmp_path / "named.npz", x=np.zeros((3, 2)), y=np.array(["cat", "dog", "cat"]))
    with pytest.raises(ValueError, match=r"named.npz.*labels 'y' must be numeric class ids, got dtype <U3"):
        load_data(str(tmp_path / "named.npz"))
    np.savez(tmp_path / "floats.npz", x=np.zeros((3, 2)), y=np.array([0.0, 1.0, 2.0]))  # as before
    assert load_data(str(tmp_path / "floats.npz")).train_labels.dtype == torch.int64


def test_an_array_reader_refuses_other_files(tmp_path):
    """`fastvae infer --score picture.png` said "This file contains pickled (object) data"."""
    from fastvae.app.arrays import read_array_file

    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(ValueError, match=r"picture.png: expected a .npy or .npz file"):
        read_array_file(str(tmp_path / "picture.png"))


@pytest.mark.parametrize("array,error,match", [
    (np.zeros(5), ValueError, r"got \(5,\)"),
    (np.zeros((2, 1, 1, 3, 3)), ValueError, r"got \(2, 1, 1, 3, 3\)"),
    (np.array([[0.5, np.nan], [0.1, 0.2]]), ValueError, "NaN or infinite"),
    (np.ones((4, 3), dtype=np.int32), TypeError, "int32 is ambiguous"),
    (np.ones((1, 3)), ValueError, "need at least 2"),
])
def test_bad_arrays(tmp_path, array, error, match):
    np.save(tmp_path / "a.npy", array)
    with pytest.raises(error, match=match):
        load_data(str(tmp_path / "a.npy"))


def test_bad_image_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_data(str(empty))
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    Image.new("L", (4, 4)).save(sizes / "a.png")
    Image.new("L", (5, 4)).save(sizes / "b.png")
    with pytest.raises(ValueError, match=r"differ in size: a.png is \(4, 4\), b.png is \(5, 4\)"):
        load_data(str(sizes))
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("L", (4, 4)).save(broken / "a.png")
    (broken / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*b.png"):
        load_data(str(broken))


def test_torchvision_sets_say_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    for name in ("mnist", "fashion-mnist"):
        with pytest.raises(ImportError, match=f"data '{name}' needs torchvision, which is not installed"):
            load_data(name)


def test_check_range(tmp_path):
    np.save(tmp_path / "wide.npy", np.linspace(-1, 2, 20).reshape(10, 2))
    data = load_data(str(tmp_path / "wide.npy"))
    with pytest.raises(ValueError, match=r"values in \[-1, 2\] but recon 'bce_logits' needs"):
        check_range(data, "bce_logits")
    with pytest.raises(ValueError, match="recon 'bce' needs"):
        check_range(data, "bce")
    check_range(data, "mse")  # any real values are fine for mse
