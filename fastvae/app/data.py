"""Data sets for training: everything lands in memory as float32 tensors (N, C, H, W)
or (N, D), scaled to [0, 1] for image data, with a fixed train/test split.

Sources (``load_data(source)``):
- ``"digits"`` (default): scikit-learn's bundled 8x8 digits, 1,797 images, no download;
- ``"mnist"`` / ``"fashion-mnist"``: through torchvision, from files already under
  ``root``; a download happens only with ``download=True``;
- a ``.npy`` file (an array), a ``.npz`` file (array ``x``, optional labels ``y``);
  shapes (N, D), (N, H, W) or (N, C, H, W); uint8 is divided by 255, floats are
  taken as they are (BCE models need them in [0, 1]: ``check_range``); read by
  ``fastvae.app.arrays``, which ``fastvae infer`` shares;
- a directory of images (png, jpg, bmp, gif, tif, webp), read with Pillow as
  grayscale and scaled to [0, 1] by their bit depth (8-bit / 255, 16-bit / 65535);
  32-bit integer or float images are refused (their range is unknown); all must
  have one size.
"""

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from fastvae import _validate
from fastvae.app.arrays import as_samples, read_array_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TORCHVISION_SETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
SPLIT_SEED = 0  # the fixed train/test split: a permutation drawn from this seed


@dataclass
class Data:
    name: str
    train: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor = None  # int64 class labels where the source has them
    test_labels: torch.Tensor = None
    root: str = None  # torchvision sets: the absolute directory their files were read from

    @property
    def input_shape(self):
        return tuple(self.train.shape[1:])


def _split(name, x, y, test_fraction):
    n = len(x)
    if n < 2:
        raise ValueError(f"data {name!r} has {n} sample(s); need at least 2 (train + test)")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y = None if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))
    return Data(name, x[train], x[test], None if y is None else y[train],
                None if y is None else y[test])


def _load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images[:, None].astype(np.float32) / 16.0, digits.target


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _grayscale_01(image, where):
    """A Pillow image -> float32 (H, W) in [0, 1], scaled by its bit depth."""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        # 16-bit grayscale (older Pillows open 16-bit PNGs as 32-bit mode "I"): 0..65535
        pixels = np.asarray(image, dtype=np.float32) / 65535.0
        if pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"image {where}: 16-bit values outside 0..65535")
        return pixels
    if image.mode in ("I", "F"):
        raise ValueError(f"image {where} has mode {image.mode!r} (32-bit integer or float pixels, "
                         f"range unknown); save it as 8- or 16-bit grayscale")
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _load_image_folder(path):
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in directory {path}")
    images = []
    for f in files:
        where = os.path.join(path, f)
        try:
            with Image.open(where) as im:
                images.append(_grayscale_01(im, where))
        except Image.DecompressionBombError as err:
            raise ValueError(f"image {where} is refused as a possible decompression bomb: "
                             f"{err}") from None
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {where}: {err}") from None
        if images[-1].shape != images[0].shape:
            raise ValueError(f"images in {path} differ in size: {files[0]} is "
                             f"{images[0].shape[::-1]}, {f} is {images[-1].shape[::-1]} (W, H)")
    return np.stack(images), None


def _load_torchvision(name, root, download):
    try:
        import torchvision.datasets as tvd
    except ImportError:  # (an ImportError: the CLI's "missing package" exit code, 1)
        raise ImportError(f"data {name!r} needs torchvision, which is not installed; install it "
                          f"or pass the images as a .npy/.npz file or an image folder") from None
    cls = getattr(tvd, TORCHVISION_SETS[name])
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True"
        raise FileNotFoundError(f"{name} files not found under {root!r} ({err}); pass "
                                f"--data-root DIR where they are, or --download to fetch them") from None
    to_x = lambda ds: ds.data.numpy()[:, None].astype(np.float32) / 255.0  # noqa: E731
    return Data(name, torch.from_numpy(to_x(train)), torch.from_numpy(to_x(test)),
                train.targets.clone(), test.targets.clone(), root=os.path.abspath(root))


def load_data(source="digits", *, root="data", download=False, test_fraction=0.2):
    """Load ``source`` (see the module docstring) as a ``Data`` with a fixed split."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"data source must be a name or a path, got {source!r}")
    if source == "digits":
        x, y = _load_digits()
        return _split(source, x, y, test_fraction)
    if source in TORCHVISION_SETS:
        return _load_torchvision(source, root, download)
    if os.path.isdir(source):
        x, y = _load_image_folder(source)
    elif source.endswith((".npy", ".npz")):
        x, y = read_array_file(source)
    elif os.path.exists(source):
        raise ValueError(f"data file {source}: unsupported type (use .npy, .npz or a folder of images)")
    else:
        raise FileNotFoundError(
            f"data {source!r} not found: give 'digits', 'mnist', 'fashion-mnist', a .npy/.npz "
            f"file or a folder of images")
    x = as_samples(source, x)
    if y is not None and (np.ndim(y) != 1 or len(y) != len(x)):
        raise ValueError(f"data {source!r}: labels 'y' must have shape ({len(x)},), got {np.shape(y)}")
    if y is not None and not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        # (numbers are taken as class ids, as before; strings made int() fail naming nothing)
        raise ValueError(f"data {source!r}: labels 'y' must be numeric class ids, got dtype "
                         f"{y.dtype} (training needs no labels: an .npz may hold 'x' alone)")
    return _split(source, x, y, test_fraction)


def check_range(data, recon):
    """BCE and continuous Bernoulli losses need targets in [0, 1]: say so before
    any training starts."""
    if recon in _validate.UNIT_TARGET_RECONS:
        lo = min(data.train.min().item(), data.test.min().item())
        hi = max(data.train.max().item(), data.test.max().item())
        if lo < 0 or hi > 1:
            raise ValueError(f"data {data.name!r} has values in [{lo:.4g}, {hi:.4g}] but recon "
                             f"{recon!r} needs them in [0, 1]: rescale the data or use --recon mse")


def fingerprint(data):
    """SHA-256 of the train and test tensors (shapes and values): what a resumed
    run checks to know it trains on the same data as before."""
    digest = hashlib.sha256()
    for part in (data.train, data.test):
        t = part.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{list(t.shape)}\n".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()
