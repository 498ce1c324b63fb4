"""Sample arrays from .npy/.npz files, read the same way by ``fastvae train``
(``fastvae.app.data``) and ``fastvae infer``, so that a model scores the very file it
was trained on. numpy only: ``fastvae infer`` runs where PyTorch is not installed.

- a ``.npy`` file holds the array; an ``.npz`` file holds array ``x`` (optional
  labels ``y``) or a single array;
- shapes (N, D), (N, H, W) (one channel: becomes (N, 1, H, W)) or (N, C, H, W);
- uint8 is divided by 255, floats are taken as they are, other integers are refused
  (their range is unknown).
"""

import numpy as np


def read_array_file(path):
    """``(x, y)`` of a .npy or .npz file; ``y`` (labels) is None unless an .npz has it."""
    if not str(path).lower().endswith((".npy", ".npz")):  # (an image read as an array said
        # "This file contains pickled (object) data")
        raise ValueError(f"data file {path}: expected a .npy or .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                keys = list(loaded.keys())
                key = "x" if "x" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise ValueError(f"an .npz needs an array named 'x' (optional labels 'y'); "
                                     f"found {keys}")
                return loaded[key], (loaded["y"] if "y" in keys else None)
        return loaded, None
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except Exception as err:  # numpy raises many kinds on a corrupt file
        raise ValueError(f"cannot read data file {path}: {err}") from None


def as_samples(name, x):
    """Array -> float32 (N, D) or (N, C, H, W), uint8 scaled to [0, 1]."""
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TypeError(f"data {name!r}: expected a numeric array, got dtype {x.dtype}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.complexfloating):
        raise TypeError(f"data {name!r}: dtype {x.dtype} is ambiguous; give uint8 images "
                        f"(0..255) or floating-point values (in [0, 1] for BCE models)")
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim not in (2, 4):
        raise ValueError(f"data {name!r}: expected shape (N, D), (N, H, W) or (N, C, H, W), "
                         f"got {x.shape}")
    if 0 in x.shape[1:]:
        raise ValueError(f"data {name!r}: each sample must hold values, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"data {name!r} contains NaN or infinite values")
    return x
