"""Export a trained VAE to ONNX, for inference without PyTorch (``fastvae.runtime``).

``export(model, out_dir)`` writes one graph per part and ``metadata.json``:

- ``encoder.onnx``: x -> (mu, logvar);
- ``decoder.onnx``: z -> x_hat in data space (probabilities for BCE models);
- ``scorer.onnx``:  x -> per-sample VAE loss (``reduction="none"``) at z = mu.

The graphs hold no random op: sampling draws its noise outside, in numpy.
Every file is checked with ``onnx.checker`` and every part is run in
onnxruntime against PyTorch before anything lands in ``out_dir``; the export
is built in a temporary directory that replaces ``out_dir`` only once it is
complete.

The model needs ``encode(x) -> (mu, logvar)``, ``decode(z)`` (data space) and
the attributes ``recon``, ``beta``, ``input_shape``, ``latent_shape`` (and, where
they apply, ``obs_logvar`` for gaussian/laplace, and ``prior = "learned"`` with
``prior_mu``, ``prior_logvar`` broadcastable to ``latent_shape``); its ``score(x)``
is used for the scorer when it has one. A fixed ``batch`` splits and pads the data
the runtime scores, so a model whose score of a sample depends on the rest of its
batch (``obs_logvar="optimal"`` fits the scale to the batch) exports its scorer
with a dynamic batch only. fastvae's loss and
sampling functions switch to plain torch formulas while
``torch.onnx.is_in_onnx_export()``, so the dynamo exporter sees standard ops.

Command line: ``fastvae export CHECKPOINT --out DIR``.
"""

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

import fastvae
from fastvae import _io
from fastvae import runtime as _rt

PARITY_RTOL = 1e-4
# ONNX ops whose results are unseeded or differ between runtimes: never in an export.
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                        "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})
MIN_OPSET = 18  # the dynamo exporter's lowest


class ExportParityError(RuntimeError):
    """onnxruntime disagrees with PyTorch on an exported part beyond ``PARITY_RTOL``."""


# ---- the parts, as modules with one input each ---------------------------


class _Encoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        mu, logvar = self.model.encode(x)
        return mu, logvar


class _Decoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z):
        return self.model.decode(z)


# Recons whose loss reads the decoder's logits, which decode(z) (data space) does not
# give back exactly: a model of one's own with these needs its own score(x) to export
# a scorer (bce on sigmoid(logits) clamps log(1 - p) at -100 where sigmoid rounds to 1,
# from logits ~17 in float32; the continuous Bernoulli's mean has no closed inverse).
_LOGIT_RECONS = ("bce_logits", "continuous_bernoulli")


class _Scorer(nn.Module):
    """Per-sample VAE loss at z = mu: ``model.score`` when the model has one;
    otherwise built from encode/decode (not for _LOGIT_RECONS, refused by
    _check_interface), with the model's ``obs_logvar`` (gaussian, laplace) and
    learned prior where it has them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        if hasattr(self.model, "score"):
            return self.model.score(x)
        mu, logvar = self.model.encode(x)
        recon = self.model.recon
        options = {}
        if getattr(self.model, "prior", "standard") == "learned":  # as the metadata records it
            options = {"prior_mu": self.model.prior_mu, "prior_logvar": self.model.prior_logvar}
        if recon in ("gaussian", "laplace"):
            options["obs_logvar"] = getattr(self.model, "obs_logvar", None)
        return fastvae.vae_loss(self.model.decode(mu), x, mu, logvar, recon=recon,
                                beta=self.model.beta, reduction="none", **options)


_PART_MODULES = {"encoder": _Encoder, "decoder": _Decoder, "scorer": _Scorer}


# ---- accurate lowerings of ops whose default ONNX translation is not -----
#
# onnxscript lowers aten.log_sigmoid (which binary_cross_entropy_with_logits
# uses) to Log(Sigmoid(x)), and onnxruntime's Sigmoid is a fast approximation
# that returns exactly 0 below x ~ -17 and is 17% off at -15. A BCE loss built
# on them gives inf, or a wrong score, wherever a logit is very negative, which
# for a trained model on mostly-dark images is everywhere. These lowerings are
# exact in the tails. The exact sigmoid is used in the scorer only, where a log
# may consume it (recon="bce"): in the decoder's data-space output the fast one
# is off by < 1e-7 absolute and saves a third of the batch-1 latency. (log_sigmoid
# through onnxruntime's Softplus is as exact but 2.5x slower: its Softplus kernel
# is not vectorized. Log(1 + t) loses only terms below 6e-8, an absolute error far
# under any sum's rounding.)


def _translation_table(part):
    from onnxscript import opset18 as op

    def log_sigmoid(x):
        # log sigmoid(x) = min(x, 0) - log(1 + exp(-|x|)): exp never overflows
        one = op.CastLike(1.0, x)
        zero = op.CastLike(0.0, x)
        return op.Sub(op.Min(x, zero), op.Log(op.Add(one, op.Exp(op.Neg(op.Abs(x))))))

    def sigmoid(x):
        one = op.CastLike(1.0, x)
        return op.Reciprocal(op.Add(one, op.Exp(op.Neg(x))))

    table = {torch.ops.aten.log_sigmoid.default: log_sigmoid}
    if part == "scorer":
        table[torch.ops.aten.sigmoid.default] = sigmoid
    return table


# ---- argument checks -----------------------------------------------------


def _shape_attr(model, name):
    value = getattr(model, name, None)
    try:
        shape = tuple(int(s) for s in value)
    except TypeError:
        shape = ()
    if not shape or min(shape) <= 0:
        raise TypeError(f"model.{name} must be a tuple of positive sizes, got {value!r}")
    return shape


def _model_facts(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for method in ("encode", "decode"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"model must have an {method}() method; {type(model).__name__} has none")
    recon = getattr(model, "recon", None)
    if recon not in _rt.RECONS:
        raise TypeError(f"model.recon must be one of {_rt.RECONS}, got {recon!r}")
    beta = getattr(model, "beta", None)
    if isinstance(beta, torch.Tensor) and beta.numel() == 1:
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise TypeError(f"model.beta must be a finite float, got {beta!r}")
    latent_shape = _shape_attr(model, "latent_shape")
    return {"input_shape": _shape_attr(model, "input_shape"),
            "latent_shape": latent_shape,
            "recon": recon, "beta": float(beta), "prior": _learned_prior(model, latent_shape)}


def _learned_prior(model, latent_shape):
    """{"mu": [...], "logvar": [...]} of a model with a learned diagonal Gaussian prior
    (``prior == "learned"``), for the runtime to sample from: one number per latent
    element, flat (the prior broadcast to ``latent_shape``); None for N(0, I)."""
    if getattr(model, "prior", "standard") != "learned":
        return None
    prior = {}
    for key, name in (("mu", "prior_mu"), ("logvar", "prior_logvar")):
        value = getattr(model, name, None)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model.{name} must be a tensor (model.prior is 'learned'), got "
                            f"{type(value).__name__}")
        value = value.detach().float().cpu()
        try:
            value = value.expand(latent_shape)
        except RuntimeError:
            raise ValueError(f"model.{name} of shape {list(value.shape)} does not broadcast to "
                             f"the latent shape {list(latent_shape)}") from None
        if not torch.isfinite(value).all():
            raise ValueError("model's learned prior is not finite; nothing is exported")
        if key == "logvar" and value.max() > _rt.MAX_PRIOR_LOGVAR:  # std = exp(logvar / 2)
            raise ValueError(f"model.prior_logvar reaches {value.max().item():.6g}, where its std "
                             f"overflows float32 (above {_rt.MAX_PRIOR_LOGVAR:.6g}); nothing is "
                             f"exported")
        prior[key] = value.reshape(-1).tolist()
    return prior


def _check_interface(model, facts, parts):
    """Run encode/decode once: a clear error now beats a confusing one from the exporter."""
    if "scorer" in parts and not hasattr(model, "score") and facts["recon"] in _LOGIT_RECONS:
        raise TypeError(
            f"a model with recon={facts['recon']!r} needs a score(x) method (the per-sample "
            f"loss at z = mu) to export a scorer: its loss reads the decoder's logits, which "
            f"decode(z) (probabilities / data space) does not give back exactly; or export "
            f"parts=('encoder', 'decoder')")
    x = torch.rand(2, *facts["input_shape"])
    z = torch.randn(2, *facts["latent_shape"])
    with torch.no_grad():
        encoded = model.encode(x)
        decoded = model.decode(z)
    latent = (2, *facts["latent_shape"])
    if (not isinstance(encoded, (tuple, list)) or len(encoded) != 2
            or any(not isinstance(t, torch.Tensor) or tuple(t.shape) != latent for t in encoded)):
        what = (f"a {type(encoded).__name__}" if not isinstance(encoded, (tuple, list))
                else f"{len(encoded)} values")
        raise TypeError(f"model.encode(x) must return (mu, logvar), each of shape (N, *latent_shape) "
                        f"= {latent} here, got {what} (an autoencoder has no posterior to export)")
    if not isinstance(decoded, torch.Tensor) or tuple(decoded.shape) != (2, *facts["input_shape"]):
        raise TypeError(f"model.decode(z) must return a tensor of shape (N, *input_shape) = "
                        f"{(2, *facts['input_shape'])} here, got "
                        f"{tuple(getattr(decoded, 'shape', ())) or type(decoded).__name__}")


def _max_opset():
    """The highest opset the installed onnx knows. Above it the exporter's version
    conversion fails, logs tracebacks and silently keeps its default opset; None when
    onnx is missing (the export then stops on the missing onnxscript)."""
    try:
        from onnx.defs import onnx_opset_version
    except ImportError:
        return None
    return onnx_opset_version()


def _check_options(parts, opset, batch, quantize):
    if isinstance(parts, str):
        parts = (parts,)
    parts = tuple(parts)
    unknown = [p for p in parts if p not in _rt.PARTS]
    if unknown or not parts or len(set(parts)) != len(parts):
        raise ValueError(f"parts must be distinct names among {_rt.PARTS}, got {parts!r}")
    if opset is not None:
        highest = _max_opset()
        if (isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET
                or highest is not None and opset > highest):
            supported = (f">= {MIN_OPSET}" if highest is None else
                         f"from {MIN_OPSET} to {highest} (the installed onnx's highest)")
            raise ValueError(f"opset must be None or an int {supported}, got {opset!r}")
    if batch != "dynamic" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be 'dynamic' or a positive int, got {batch!r}")
    if not isinstance(quantize, bool):
        raise TypeError(f"quantize must be a bool, got {type(quantize).__name__}")
    return tuple(p for p in _rt.PARTS if p in parts)


def _check_out_dir(out_dir):
    """``out_dir`` may be new, empty, or an earlier export (replaced whole);
    anything else is refused rather than deleted."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    while not os.path.lexists(parent):  # the nearest existing ancestor must be a directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"out_dir {out_dir!r}: {parent!r} is not a directory")
    if os.path.lexists(out_dir):
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise NotADirectoryError(
                f"out_dir {out_dir!r} exists and is not a directory (or is a symlink)")
        entries = set(os.listdir(out_dir))
        if entries:
            try:
                _rt.read_metadata(out_dir)
                # (our names, each a plain file: a folder or link under one is not ours)
                ours = entries <= _rt.EXPORT_FILES and all(
                    os.path.isfile(os.path.join(out_dir, name))
                    and not os.path.islink(os.path.join(out_dir, name)) for name in entries)
            except (ValueError, FileNotFoundError):
                ours = False
            if not ours:
                raise FileExistsError(
                    f"out_dir {out_dir!r} exists and is not empty, and is not an earlier fastvae "
                    f"export; refusing to replace it")
    return out_dir


def _missing_ancestors(out_dir):
    """The folders above ``out_dir`` that do not exist yet, deepest first."""
    missing, parent = [], os.path.dirname(out_dir)
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing


def _remove_empty(folders):
    """Remove ``folders`` (deepest first) that this export created, where still empty: a
    failed export leaves nothing behind."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # (not made, or something else wrote into it meanwhile)
            pass


def _check_batch_fits(batch, facts):
    """A fixed batch's example inputs (encoder/scorer: data; decoder: latents) are made in
    memory to trace and check the graphs: refuse one larger than this machine's memory
    instead of failing in the allocator."""
    if batch == "dynamic":
        return
    per_sample = max(math.prod(facts["input_shape"]), math.prod(facts["latent_shape"]))
    need = 4 * batch * per_sample  # float32
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # (no sysconf: not checked)
        return
    if need > have:
        raise ValueError(f"batch {batch}: its example inputs alone are {need / 2**30:.3g} GiB, "
                         f"more than this machine's {have / 2**30:.3g} GiB of memory")


def _interrupted(err):
    """Whether ``err`` is, or was caused by, a KeyboardInterrupt."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


# ---- export --------------------------------------------------------------


def export(model: nn.Module, out_dir: str | os.PathLike[str], *,
           parts: str | Sequence[str] = ("encoder", "decoder", "scorer"), opset: int | None = None,
           batch: int | Literal["dynamic"] = "dynamic", quantize: bool = False) -> dict[str, Any]:
    """Export ``model``'s parts to ONNX files in ``out_dir``; return the metadata.

    Args:
        model: a VAE (see the module docstring). It is copied to float32 on
            the CPU in eval mode for the export; the model itself is untouched.
        out_dir: the directory to write; created, or replaced if it holds an
            earlier export.
        parts: any of ``"encoder"``, ``"decoder"``, ``"scorer"``.
        opset: ONNX opset, from ``MIN_OPSET`` to the highest the installed onnx
            knows (``onnx.defs.onnx_opset_version()``); None takes the exporter's default.
        batch: ``"dynamic"`` (any batch size) or a fixed batch size.
        quantize: also write int8 (dynamic quantization) encoder/decoder files,
            with their error against PyTorch and speed against fp32 recorded.

    Raises ``ExportParityError`` if onnxruntime's fp32 result differs from
    PyTorch's by more than ``PARITY_RTOL`` (max abs error / max abs value).
    """
    facts = _model_facts(model)
    parts = _check_options(parts, opset, batch, quantize)
    out_dir = _check_out_dir(out_dir)
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise ImportError("fastvae.onnx.export needs onnxscript: pip install onnxscript "
                          "(or fastvae[onnx])") from None

    _check_batch_fits(batch, facts)
    source = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    _check_interface(source, facts, parts)
    if batch != "dynamic" and "scorer" in parts:
        _check_scores_are_per_sample(_Scorer(source).eval(), facts, batch)
    created = _missing_ancestors(out_dir)  # removed again if the export fails
    try:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        _io.remove_stale_temps(out_dir)  # what an export killed mid-way (SIGKILL) left behind
        tmp = tempfile.mkdtemp(prefix=_io.temp_prefix(out_dir), dir=os.path.dirname(out_dir))
    except OSError as err:  # (named by out_dir, not by the temporary's name)
        _remove_empty(created)
        raise _io.write_error(err, f"cannot write the export {out_dir}") from None
    try:
        meta = {"format": _rt.FORMAT, "format_version": _rt.FORMAT_VERSION,
                "fastvae_version": fastvae.__version__, "torch_version": torch.__version__,
                "model_class": type(model).__name__,
                "input_shape": list(facts["input_shape"]),
                "latent_shape": list(facts["latent_shape"]),
                "recon": facts["recon"], "beta": facts["beta"], "batch": batch,
                **({} if facts["prior"] is None else {"prior": facts["prior"]}),
                "parity_rtol": PARITY_RTOL, "parts": {}}
        opsets = set()
        for part in parts:
            path = os.path.join(tmp, _rt.part_file(part))
            module = _PART_MODULES[part](source).eval()
            opsets.add(_export_part(module, part, path, facts, opset, batch))
            err = _parity(module, part, path, facts, batch)
            if not err <= PARITY_RTOL:
                raise ExportParityError(
                    f"{part}: onnxruntime differs from PyTorch by a relative error of {err:.3g} "
                    f"> {PARITY_RTOL:g}" if math.isfinite(err) else
                    f"{part}: PyTorch or onnxruntime gives NaN or Inf on random inputs (a "
                    f"non-finite weight?); nothing is exported")
            meta["parts"][part] = {"file": _rt.part_file(part), "max_rel_err": err,
                                   "sha256": _rt.sha256_of(path)}
        meta["opset"] = max(opsets)
        if quantize:
            meta["quantized"] = {}
            for part in parts:
                if part in _rt.QUANTIZABLE_PARTS:
                    module = _PART_MODULES[part](source).eval()
                    meta["quantized"][part] = info = _quantize_part(module, part, tmp, facts, batch)
                    if not math.isfinite(info["max_rel_err"]):
                        raise ExportParityError(f"{part}: the int8 {part} gives NaN or Inf on "
                                                f"random inputs; nothing is exported")
        with open(os.path.join(tmp, _rt.METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, allow_nan=False)
            f.write("\n")
        _install(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if _interrupted(err):
            # Ctrl-C while torch imports its exporter lazily comes back wrapped in torch's
            # TorchExportError: it is still an interrupt
            raise KeyboardInterrupt from None
        if isinstance(err, OSError):
            # a full disk or a file-size limit names no file: say what failed; OSError(errno, ...)
            # keeps the errno's subclass
            raise _io.write_error(err, f"cannot write the export {out_dir}") from err
        raise
    return meta


class _DropNotice(logging.Filter):
    """Drops a logger's records that hold ``text``."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


# (logger, notice) the exporter emits on every export and that say nothing to a VAE's user:
# one warning per torchvision op when torchvision is absent; one per part when the opset
# asked for (26-28 with onnx 1.23) is reached by onnx's version converter, which the parity
# check after the export covers.
_NOTICES = (("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
            ("onnxscript.version_converter", "fallback is enabled"))


@contextlib.contextmanager
def _quiet_exporter():
    filters = [(logging.getLogger(name), _DropNotice(text)) for name, text in _NOTICES]
    for logger, notice in filters:
        logger.addFilter(notice)
    try:
        with warnings.catch_warnings():
            # torch's own pytree deprecation, raised inside the exporter: not the user's to fix
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
            yield
    finally:
        for logger, notice in filters:
            logger.removeFilter(notice)


def _example(part, facts, batch, generator):
    """A random input for a part: data in [0, 1] (valid for every recon), z ~ N(0, I)."""
    if part == "decoder":
        return torch.randn(batch, *facts["latent_shape"], generator=generator)
    return torch.rand(batch, *facts["input_shape"], generator=generator)


def _export_part(module, part, path, facts, opset, batch):
    """Export one part with the dynamo exporter, check the file; return its opset."""
    import onnx

    names_in, names_out = _rt.PART_IO[part]
    # torch.export specializes size-1 dims, so a dynamic batch is traced at 2.
    example = _example(part, facts, 2 if batch == "dynamic" else batch,
                       torch.Generator().manual_seed(0))
    dynamic_shapes = None
    if batch == "dynamic":
        dynamic_shapes = {names_in[0]: {0: torch.export.Dim("batch", min=1)}}
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=list(names_in),
            output_names=list(names_out), opset_version=opset, dynamic_shapes=dynamic_shapes,
            custom_translation_table=_translation_table(part), verbose=False)
    program.save(path, external_data=False)
    onnx.checker.check_model(path, full_check=True)
    proto = onnx.load(path)
    random_ops = sorted(_op_types(proto) & RANDOM_OPS)
    if random_ops:
        raise ValueError(f"the {part} graph holds random ops {random_ops}; export needs a "
                         f"deterministic {part} (eval mode, no sampling inside encode/decode/score)")
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _op_types(proto):
    """Every op type in a model: main graph, subgraphs and local functions."""
    found = set()

    def visit(graph):
        for node in graph.node:
            found.add(node.op_type)
            for attr in node.attribute:
                if attr.g is not None and attr.HasField("g"):
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(proto.graph)
    for function in proto.functions:
        for node in function.node:
            found.add(node.op_type)
    return found


def relative_error(got: npt.ArrayLike, want: npt.ArrayLike) -> float:
    """max |got - want| / max |want|: the error relative to the output's scale
    (element-wise ratios blow up where a value crosses zero). ``inf`` when the
    shapes differ or either holds a NaN or Inf: no finite error bounds them."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not (np.isfinite(got).all() and np.isfinite(want).all()):
        return math.inf
    scale = max(float(np.abs(want).max()), np.finfo(np.float32).tiny)
    return float(np.abs(got - want).max() / scale)


def _check_scores_are_per_sample(scorer, facts, batch):
    """A fixed batch makes the runtime split the data into batches of that size and pad
    the last one: right only if a sample's score does not depend on the others in its
    batch. Checked on random samples, scored together and one by one, to the parity
    check's tolerance (batch sizes may round differently; a fitted scale changes scores by
    far more). Non-finite scores are left to the parity check, which names them."""
    x = _example("scorer", facts, 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        together = scorer(x)
        alone = torch.cat([scorer(x[i:i + 1]) for i in range(len(x))])
    finite = bool(torch.isfinite(together).all() and torch.isfinite(alone).all())
    if finite and relative_error(together.numpy(), alone.numpy()) > PARITY_RTOL:
        raise ValueError(f"batch {batch}: this model's score of a sample depends on the other "
                         f"samples scored with it (obs_logvar='optimal' fits its scale to the "
                         f"batch), and a fixed batch splits and pads the data; export the scorer "
                         f"with a dynamic batch (batch='dynamic', --batch dynamic), or leave it "
                         f"out of the parts")


def _parity_batches(batch):
    return (1, 16) if batch == "dynamic" else (batch,)


def _parity(module, part, path, facts, batch, session=None):
    """Max relative error of onnxruntime against PyTorch over random inputs."""
    session = session or _rt.open_session(path, ["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for n in _parity_batches(batch):
        example = _example(part, facts, n, generator)
        with torch.no_grad():
            want = module(example)
        want = want if isinstance(want, tuple) else (want,)
        got = session.run(None, {_rt.PART_IO[part][0][0]: example.numpy()})
        if len(got) != len(want):
            return math.inf
        for g, w in zip(got, want):
            worst = max(worst, relative_error(g, w.numpy()))
    return worst


def _median_ms(fn, repeats=30):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _quantize_part(module, part, tmp, facts, batch):
    """int8 dynamic quantization of a part's weights; its error and speed."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    fp32_path = os.path.join(tmp, _rt.part_file(part))
    int8_path = os.path.join(tmp, _rt.part_file(part, quantized=True))
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        # shape inference + graph clean-up first, as onnxruntime recommends
        prepared = os.path.join(scratch, "prepared.onnx")
        quant_pre_process(fp32_path, prepared)
        quantize_dynamic(prepared, int8_path, weight_type=QuantType.QInt8)
    fp32 = _rt.open_session(fp32_path, ["CPUExecutionProvider"])
    int8 = _rt.open_session(int8_path, ["CPUExecutionProvider"])
    name = _rt.PART_IO[part][0][0]
    n = 1 if batch == "dynamic" else batch
    feed = {name: _example(part, facts, n, torch.Generator().manual_seed(2)).numpy()}
    return {"file": _rt.part_file(part, quantized=True),
            "max_rel_err": _parity(module, part, int8_path, facts, batch, session=int8),
            "latency_ms": {"batch": n,
                           "fp32": _median_ms(lambda: fp32.run(None, feed)),
                           "int8": _median_ms(lambda: int8.run(None, feed))},
            "sha256": _rt.sha256_of(int8_path)}


def _install(tmp, out_dir):
    """Move the finished export into place: ``out_dir`` never holds a partial export."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp made it private
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = tmp + ".old"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
