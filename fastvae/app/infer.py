"""The ``fastvae infer`` command: sample, reconstruct or score with an exported
model, through the torch-free ``fastvae.runtime`` (this module imports no torch
either), plus its array loading (as ``fastvae train`` reads data files) and PNG drawing."""

import math
import os

import numpy as np

from fastvae import _io
from fastvae.app.arrays import as_samples, read_array_file
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
    # (the options' own names, not the runtime's arguments n and seed)
    if args.sample is not None and args.sample < 1:
        raise ValueError(f"--sample must be >= 1, got {args.sample}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    try:
        rt = VAERuntime(args.dir, providers=args.providers, quantized=args.quantized)
    except ValueError as err:
        if args.quantized and str(err).startswith("quantized=True but"):
            raise ValueError(f"--quantized: {args.dir} has no int8 files; export them with "
                             f"`fastvae export --quantize`") from None
        raise
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
        write_grid_png(args.out, result, rt.input_shape)  # (Pillow missing: ImportError, exit 1)
    what = "scores" if args.score is not None else "samples"
    print(f"wrote {args.out} ({len(result)} {what})")
    return 0


def load_array(path, sample_shape):
    """The samples of a .npy/.npz data file, read as ``fastvae train`` reads it
    (``fastvae.app.arrays``: uint8 scaled to [0, 1], (N, H, W) as one channel), then
    put in ``sample_shape`` where only the layout differs: flat samples (N, D) and
    images of D values, or shapes that differ by size-1 axes (a channel)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"data file {path!r} is a directory; give a .npy or .npz file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    arr = as_samples(path, read_array_file(path)[0])  # labels, if any, are not needed
    sample_shape = tuple(sample_shape)
    have = tuple(arr.shape[1:])
    flat = arr.ndim == 2 or len(sample_shape) == 1
    # (N, H, W) became (N, 1, H, W) as in training; an export of an (H, W) model still takes it
    channel = [s for s in have if s != 1] == [s for s in sample_shape if s != 1]
    if have != sample_shape and math.prod(have) == math.prod(sample_shape) and (flat or channel):
        arr = arr.reshape((arr.shape[0],) + sample_shape)  # the values keep their order
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
    if not np.isfinite(images).all():  # (clipping would paint NaN black and inf white)
        bad = int(np.count_nonzero(~np.isfinite(images)))
        raise ValueError(f"the images to write hold {bad} NaN or infinite values of "
                         f"{images.size}; write .npy to keep them")
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
