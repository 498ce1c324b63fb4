"""Run an exported VAE with numpy and onnxruntime alone (no PyTorch).

``fastvae.onnx.export`` writes a directory with one ``.onnx`` file per part
(``encoder``: x -> (mu, logvar); ``decoder``: z -> x_hat in data space;
``scorer``: x -> per-sample VAE loss at z = mu) and ``metadata.json``.
``VAERuntime`` loads it; sampling draws z ~ N(0, I) with numpy, outside the
graphs, so the same seed gives the same samples on any runtime.

This module imports only numpy and onnxruntime (Pillow, lazily, to draw a PNG
grid): it must keep working where PyTorch is not installed.

Command line: ``fastvae infer DIR --sample 64 --out grid.png``,
``--score data.npy --out scores.csv``, ``--reconstruct data.npy --out out.npy``.
"""

import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

# ---- the export format (shared with fastvae.onnx, which writes it) --------

FORMAT = "fastvae-onnx"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
PARTS = ("encoder", "decoder", "scorer")
QUANTIZABLE_PARTS = ("encoder", "decoder")
# part -> (input names, output names) of its graph
PART_IO = {
    "encoder": (("x",), ("mu", "logvar")),
    "decoder": (("z",), ("x_hat",)),
    "scorer": (("x",), ("score",)),
}
RECONS = ("mse", "l1", "bce", "bce_logits", "gaussian", "laplace", "continuous_bernoulli")
UNIT_TARGET_RECONS = ("bce", "bce_logits", "continuous_bernoulli")  # data in [0, 1]
FLOAT32_MAX = float(np.finfo(np.float32).max)
# a prior logvar above this overflows its std, exp(logvar / 2), in float32: NaN samples
MAX_PRIOR_LOGVAR = 2.0 * math.log(FLOAT32_MAX)


def part_file(part: str, quantized: bool = False) -> str:
    """The file name of a part inside an export directory."""
    return f"{part}.int8.onnx" if quantized else f"{part}.onnx"


EXPORT_FILES = frozenset(
    [METADATA_FILE] + [part_file(p) for p in PARTS] + [part_file(p, True) for p in QUANTIZABLE_PARTS])


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check ``metadata.json`` of an export directory: every field the
    runtime uses is checked here, so a tampered file is one clear ``ValueError``."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)
    if not os.path.exists(out_dir):
        raise FileNotFoundError(f"out_dir {out_dir!r} does not exist")
    if not os.path.isdir(out_dir):
        raise NotADirectoryError(f"out_dir {out_dir!r} is not a directory")
    path = os.path.join(out_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"out_dir {out_dir!r} has no {METADATA_FILE}: not a fastvae ONNX export")
    if os.path.islink(path):  # (as the part files: nothing is read from outside the export)
        raise ValueError(f"{path} is a symlink; an export's files must be inside it")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        what = "nested too deeply" if isinstance(err, RecursionError) else f"not valid JSON: {err}"
        raise ValueError(f"{path} is corrupt ({what})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not fastvae ONNX metadata (format must be {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')!r}; "
                         f"this fastvae reads version {FORMAT_VERSION}")
    try:
        _check_fields(meta)
    except ValueError as err:
        raise ValueError(f"{path} is corrupt: {err}") from None
    return meta


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(meta):
    """The fields of the metadata, each named in the error when it is wrong."""
    for key in ("input_shape", "latent_shape"):
        shape = meta.get(key)
        if (not isinstance(shape, list) or not shape
                or not all(_is_int(s) and s > 0 for s in shape)):
            raise ValueError(f"{key} must be a non-empty list of positive ints, got {shape!r}")
    if meta.get("recon") not in RECONS:
        raise ValueError(f"recon must be one of {RECONS}, got {meta.get('recon')!r}")
    beta = meta.get("beta")
    if not (isinstance(beta, float) and math.isfinite(beta) or _is_int(beta) and abs(beta) < 2 ** 53):
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    batch = meta.get("batch", "dynamic")
    if batch != "dynamic" and not (_is_int(batch) and batch > 0):
        raise ValueError(f"batch must be 'dynamic' or a positive int, got {batch!r}")
    if "prior" in meta:
        _check_prior(meta["prior"], meta["latent_shape"])
    _check_part_table(meta, "parts", PARTS, quantized=False)
    if "quantized" in meta:
        _check_part_table(meta, "quantized", QUANTIZABLE_PARTS, quantized=True)


def _check_prior(prior, latent_shape):
    """A learned diagonal Gaussian prior: {"mu": [...], "logvar": [...]}, finite numbers,
    one per latent element (latent_shape[0] of a flat latent)."""
    if not isinstance(prior, dict) or set(prior) != {"mu", "logvar"}:
        raise ValueError(f"prior must be an object with keys 'mu' and 'logvar', got {prior!r:.80}")
    size = math.prod(latent_shape)
    for key, highest in (("mu", FLOAT32_MAX), ("logvar", MAX_PRIOR_LOGVAR)):
        values = prior[key]
        if (not isinstance(values, list) or len(values) != size
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) and -FLOAT32_MAX <= v <= highest
                           for v in values)):
            raise ValueError(f"prior.{key} must be a list of {size} finite float32 numbers (one "
                             f"per latent element) of at most {highest:.6g}, got {values!r:.80}")


def _check_part_table(meta, key, allowed, quantized):
    """Each part names exactly its own file (nothing else in or outside the
    directory can be loaded) with the SHA-256 the export recorded."""
    table = meta.get(key)
    if not isinstance(table, dict) or (not table and key == "parts"):
        raise ValueError(f"{key} must be a non-empty object, got {type(table).__name__}")
    for part, info in table.items():
        if part not in allowed:
            raise ValueError(f"{key}: unknown part {part!r} (known: {', '.join(allowed)})")
        if not isinstance(info, dict):
            raise ValueError(f"{key}.{part} must be an object, got {type(info).__name__}")
        expected = part_file(part, quantized)
        if info.get("file") != expected:
            raise ValueError(f"{key}.{part}.file must be {expected!r}, got {info.get('file')!r}")
        digest = info.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64
                and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError(f"{key}.{part}.sha256 must be the file's 64-digit hex SHA-256, "
                             f"got {digest!r}")


def _default_providers():
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _check_providers(providers):
    if providers is None:
        return _default_providers()
    if isinstance(providers, str) or not all(isinstance(p, str) for p in providers):
        raise TypeError(f"providers must be None or a list of provider names, got {providers!r}")
    providers = list(providers)
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown or not providers:
        raise ValueError(f"providers {providers!r}: not available in this onnxruntime "
                         f"(available: {', '.join(available)})")
    return providers


def open_session(path: str | os.PathLike[str], providers: Sequence[str],
                 sha256: str | None = None) -> ort.InferenceSession:
    """An ``InferenceSession`` with all graph optimizations, or a clear error for
    a missing or corrupt file (checked against ``sha256`` when given)."""
    if os.path.islink(path):
        raise ValueError(f"ONNX model file {path!r} is a symbolic link; an export holds plain files")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model file {path!r} is missing")
    if sha256 is not None and sha256_of(path) != sha256:
        raise ValueError(f"ONNX model file {path!r} is corrupt: its SHA-256 does not match "
                         f"the one recorded in {METADATA_FILE} at export")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; warnings go to stderr otherwise
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise ValueError(f"ONNX model file {path!r} cannot be loaded (corrupt?): {err}") from None


def _as_float32_batch(name, value, sample_shape):
    """Check an input batch of shape (N, *sample_shape) and return it as
    contiguous float32; float64/float16 are cast, other dtypes are errors."""
    if isinstance(value, (np.ndarray, list, tuple)) or hasattr(value, "__array__"):
        try:
            arr = np.asarray(value)
        except Exception as err:
            raise TypeError(f"{name} must be a float array, got {type(value).__name__}: {err}") from None
    else:
        raise TypeError(f"{name} must be a numpy array of floats, got {type(value).__name__}")
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must hold floating-point values (float32; float64 and float16 "
                        f"are cast), got dtype {arr.dtype}")
    expected = "(N, " + ", ".join(map(str, sample_shape)) + ")"
    if arr.ndim != len(sample_shape) + 1 or tuple(arr.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"{name} must have shape {expected}, got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch: shape {arr.shape}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: caught below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad = arr.size - int(finite.sum())
        raise ValueError(f"{name} contains NaN or Inf ({bad} of {arr.size} values, "
                         f"after the cast to float32)")
    return arr


class VAERuntime:
    """An exported VAE in onnxruntime.

    Args:
        out_dir: the directory written by ``fastvae.onnx.export``.
        providers: onnxruntime execution providers; default CUDA when this
            onnxruntime has it, then CPU.
        quantized: use the int8 encoder/decoder written by
            ``export(..., quantize=True)``.

    All methods take and return float32 numpy arrays with the batch first.
    """

    def __init__(self, out_dir: str | os.PathLike[str], providers: Sequence[str] | None = None, *,
                 quantized: bool = False) -> None:
        if not isinstance(quantized, bool):
            raise TypeError(f"quantized must be a bool, got {type(quantized).__name__} "
                            f"{quantized!r:.40}")
        self.metadata = meta = read_metadata(out_dir)
        self.out_dir = os.fspath(out_dir)
        self.input_shape = tuple(meta["input_shape"])
        self.latent_shape = tuple(meta["latent_shape"])
        self.recon = meta["recon"]
        self.beta = float(meta["beta"])
        batch = meta.get("batch", "dynamic")
        self.static_batch = None if batch == "dynamic" else batch
        self.providers = _check_providers(providers)
        self._sessions = {}
        for part, info in meta["parts"].items():
            use_int8 = quantized and part in QUANTIZABLE_PARTS
            if use_int8:
                info = meta.get("quantized", {}).get(part)
                if info is None:
                    raise ValueError(f"quantized=True but out_dir {self.out_dir!r} has no int8 "
                                     f"{part}; export with quantize=True")
            path = os.path.join(self.out_dir, info["file"])
            self._sessions[part] = open_session(path, self.providers, info["sha256"])
            self._check_graph_io(part, path)

    def _check_graph_io(self, part, path):
        session = self._sessions[part]
        names_in, names_out = PART_IO[part]
        got_in = tuple(i.name for i in session.get_inputs())
        got_out = tuple(o.name for o in session.get_outputs())
        if got_in != names_in or got_out != names_out:
            raise ValueError(f"ONNX model file {path!r} has inputs {got_in} and outputs {got_out}; "
                             f"a fastvae {part} has {names_in} and {names_out}")
        # the sample shapes in metadata.json must be the graph's (fixed sizes are ints,
        # the dynamic batch a name)
        data, latent = ("input_shape", self.input_shape), ("latent_shape", self.latent_shape)
        shapes = {"encoder": [data, latent, latent], "decoder": [latent, data], "scorer": [data, None]}
        graph_batch = session.get_inputs()[0].shape[0]
        if _is_int(graph_batch) and graph_batch != self.static_batch:
            raise ValueError(f"{METADATA_FILE} says batch {self.metadata.get('batch', 'dynamic')!r} but "
                             f"{path!r} takes batches of {graph_batch}")
        for arg, want in zip([*session.get_inputs(), *session.get_outputs()], shapes[part]):
            if want is None:
                continue
            got = tuple(arg.shape[1:])
            if len(got) != len(want[1]) or any(_is_int(g) and g != w for g, w in zip(got, want[1])):
                raise ValueError(f"{METADATA_FILE} says {want[0]} {list(want[1])} but {arg.name} of "
                                 f"{path!r} has sample shape {list(got)}")

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts this export has."""
        return tuple(self._sessions)

    def _session(self, part):
        if part not in self._sessions:
            raise ValueError(f"this export ({self.out_dir!r}) has no {part} part; "
                             f"export it with parts including {part!r}")
        return self._sessions[part]

    def _run(self, part, array):
        """Run a part on a checked batch; a static-batch export runs in padded chunks."""
        session = self._session(part)
        name = PART_IO[part][0][0]
        b = self.static_batch
        if b is None or len(array) == b:
            return session.run(None, {name: array})
        chunks = []
        for start in range(0, len(array), b):
            chunk = array[start:start + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
            chunks.append([out[:n] for out in session.run(None, {name: chunk})])
        return [np.concatenate(outs) for outs in zip(*chunks)]

    def encode(self, x: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """x (N, *input_shape) -> (mu, logvar), each (N, *latent_shape)."""
        x = _as_float32_batch("x", x, self.input_shape)
        mu, logvar = self._run("encoder", x)
        return mu, logvar

    def decode(self, z: npt.ArrayLike) -> np.ndarray:
        """z (N, *latent_shape) -> x_hat (N, *input_shape) in data space
        (probabilities for BCE models)."""
        z = _as_float32_batch("z", z, self.latent_shape)
        return self._run("decoder", z)[0]

    def reconstruct(self, x: npt.ArrayLike) -> np.ndarray:
        """Decode the posterior mean of each input: deterministic reconstructions."""
        mu, _ = self.encode(x)
        return self._run("decoder", mu)[0]

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        """Decode ``n`` codes drawn by numpy from ``seed`` (same seed -> same samples;
        None -> fresh randomness) from the model's prior: N(0, I), or the learned
        N(mu, exp(logvar)) recorded in the metadata."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"seed must be None or an int, got {type(seed).__name__}")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        rng = np.random.default_rng(seed)
        try:
            z = rng.standard_normal((int(n),) + self.latent_shape, dtype=np.float32)
        except (ValueError, MemoryError):  # numpy's "array is too big", or no memory for it
            raise ValueError(f"n={n}: {n} codes of shape {self.latent_shape} do not fit in "
                             f"memory") from None
        prior = self.metadata.get("prior")
        if prior is not None:
            shape = self.latent_shape
            mu = np.asarray(prior["mu"], dtype=np.float32).reshape(shape)
            with np.errstate(over="ignore", invalid="ignore"):
                std = np.exp(0.5 * np.asarray(prior["logvar"], dtype=np.float32)).reshape(shape)
                z = mu + std * z
            if not np.isfinite(z).all():  # (each number was checked finite: their sum overflowed)
                raise ValueError("the metadata's prior overflows float32 in its samples "
                                 "mu + exp(logvar / 2) * eps: its mu or logvar is too large")
        return self._run("decoder", z)[0]

    def score(self, x: npt.ArrayLike) -> np.ndarray:
        """Per-sample anomaly score (N,): the VAE loss (recon + beta * KL) at z = mu."""
        x = _as_float32_batch("x", x, self.input_shape)
        if self.recon in UNIT_TARGET_RECONS and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"x must hold values in [0, 1] for a {self.recon!r} model, "
                             f"got values in [{x.min():.6g}, {x.max():.6g}]")
        return self._run("scorer", x)[0]
