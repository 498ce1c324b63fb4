"""The ``fastvae infer`` command: sample, reconstruct or score with an exported
model, through the torch-free ``fastvae.runtime`` (this module imports no torch
either), plus its array loading and PNG drawing."""

import math
import os

import numpy as np

from fastvae import _io
from fastvae.runtime import VAERuntime

MAX_OUTPUT_BYTES = 2 ** 31  # what one command computes and writes at once (float32 results)


def add_arguments(parser):
    parser.add_argument("dir", help="directory written by `fastvae export`")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sample", type=int, metavar="N", help="decode N samples from the prior")
    what.add_argument("--score", metavar="DATA", help=".npy/.npz data to score (anomaly scores)")
    what.add_argument("--reconstruct", metavar="DATA", help=".npy/.npz data to reconstruct")
    parser.add_argument("--out", required=True,
                        help="output file: .png or .npy for --sample/--reconstruct, "
                             ".csv or .npy for --score")
    parser.add_argument("--seed", type=int, default=None, help="seed of --sample")
    parser.add_argument("--quantized", action="store_true", help="use the int8 encoder/decoder")
    parser.add_argument("--provider", action="append", dest="providers", metavar="NAME",
                        help="onnxruntime execution provider (repeatable; default CUDA then CPU)")


def run(args):
    if args.score is not None:
        allowed = (".csv", ".npy")
    else:
        allowed = (".png", ".npy")
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in allowed:
        raise ValueError(f"--out must end with {' or '.join(allowed)}, got {args.out!r}")
    rt = VAERuntime(args.dir, providers=args.providers, quantized=args.quantized)
    if args.sample is not None:
        size = 4 * args.sample * max(math.prod(rt.input_shape), math.prod(rt.latent_shape))
        if size > MAX_OUTPUT_BYTES:
            raise ValueError(f"--sample {args.sample}: that many samples of shape {rt.input_shape} "
                             f"are {size / 2**30:.3g} GiB; this command makes at most "
                             f"{MAX_OUTPUT_BYTES / 2**30:g} GiB at once (run it several times)")
        result = rt.sample(args.sample, seed=args.seed)
    else:
        data = load_array(args.score if args.score is not None else args.reconstruct,
                          rt.input_shape)
        result = rt.score(data) if args.score is not None else rt.reconstruct(data)
    if ext == ".npy":
        _write_atomic(args.out, lambda f: np.save(f, result))
    elif ext == ".csv":
        lines = ["index,score"] + [f"{i},{s:.9g}" for i, s in enumerate(result.tolist())]
        _write_atomic(args.out, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    else:
        try:
            write_grid_png(args.out, result, rt.input_shape)
        except ImportError as err:  # Pillow is optional
            raise ValueError(str(err)) from None
    what = "scores" if args.score is not None else "samples"
    print(f"wrote {args.out} ({len(result)} {what})")
    return 0


def load_array(path, sample_shape):
    """A float array of samples from a .npy file or a one-array .npz file. Flat
    samples (N, D) are reshaped to ``sample_shape`` when the sizes agree, and
    vice versa."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"data file {path!r} is a directory; give a .npy or .npz file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"data file {path!r} is not a readable .npy/.npz array: {err}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            if len(loaded.files) != 1:
                raise ValueError(f"data file {path!r} must hold exactly one array, "
                                 f"got {loaded.files}")
            loaded = loaded[loaded.files[0]]
    arr = loaded
    size = math.prod(sample_shape)
    flat_pair = arr.ndim == 2 or len(sample_shape) == 1
    if (arr.ndim >= 2 and tuple(arr.shape[1:]) != tuple(sample_shape) and flat_pair
            and math.prod(arr.shape[1:]) == size):
        arr = arr.reshape((arr.shape[0],) + tuple(sample_shape))
    return arr


def _write_atomic(path, write):
    """Write through ``write(file)`` into a temp file beside ``path``, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--out: directory {directory!r} does not exist")
    _io.atomic_write_stream(path, write)


def images_hwc(batch, sample_shape):
    """(N, *sample_shape) -> (N, H, W, C) for drawing: (C, H, W) with C = 1 or 3,
    (H, W), or flat (D,) with D a perfect square."""
    shape = tuple(sample_shape)
    if len(shape) == 3 and shape[0] in (1, 3):
        return batch.transpose(0, 2, 3, 1)
    if len(shape) == 2:
        return batch[..., None]
    if len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
        side = math.isqrt(shape[0])
        return batch.reshape(len(batch), side, side, 1)
    raise ValueError(f"samples of shape {shape} cannot be drawn as images; write .npy instead")


def write_grid_png(path, batch, sample_shape, min_tile=32):
    """Tile a batch of images (values clipped to [0, 1]) into one PNG, each image
    enlarged by an integer factor to at least ``min_tile`` pixels."""
    images = images_hwc(np.asarray(batch, dtype=np.float32), sample_shape)
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 2
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = image
    pixels = (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("writing a .png needs Pillow (pip install pillow); "
                          "or write .npy instead") from None
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    _write_atomic(path, lambda f: image.save(f, format="PNG"))
