"""``GaussianPosterior``: the diagonal-Gaussian posterior of latent-diffusion
autoencoders, on fastvae's fused sampling and KL ops.

Two result conventions (``semantics=``), side by side:

=====================  ==============================  =====================================
                       ``"fastvae"`` (default)          ``"diffusers"``
=====================  ==============================  =====================================
kl / nll dtype         float32 for float16/bfloat16     the inputs' promoted dtype (float16
                       inputs (float64 where any        in, float16 out), computed in float32
                       input is float64)                and rounded once at the end; float32
                                                        (so sample, std and var too) when built
                                                        under CUDA autocast, as diffusers'
                                                        (its exp runs in float32 there)
dims kl sums           every non-batch dim              dims 1, 2, 3 (a 5-D video posterior
                                                        gives (N, W)); every non-batch dim
                                                        below 4-D, where diffusers fails
nll default ``dims``   every non-batch dim              [1, 2, 3] (as above below 4-D)
deterministic kl/nll   zeros of shape (N,) on the       zeros of shape (1,), default dtype,
                       parameters' device               on the parameters' device (diffusers:
                                                        on the CPU, which breaks CUDA sums)
kl against a           ValueError (zero variance:       +inf per sample (diffusers divides by
deterministic other    the KL is infinite)              the zero variance: inf, or nan where
                                                        the means coincide)
=====================  ==============================  =====================================

Both conventions: ``kl(other)`` takes a ``GaussianPosterior`` or anything with
``mean`` and ``logvar`` tensors (diffusers' ``DiagonalGaussianDistribution``);
``kl(other)`` and ``nll(sample)`` broadcast (a batch-1 prior is fine);
``sample(generator)`` takes a generator or a list of them, one per sample; a
channels_last posterior samples channels_last; ``nll(sample, dims=...)``.

fastvae's defaults stay float32 for half inputs on purpose: a KL summed over a
latent in float16 loses about three significant digits and overflows to inf
beyond 65504, which float32 does not. The diffusers convention computes in
float32 too and only rounds the per-sample result to the input dtype, so it is
still more accurate than diffusers' own half-precision arithmetic.

Sampling draws its noise inside fastvae's op from a seed taken from the
generator: the same distribution as diffusers' ``randn_tensor`` but not the same
stream of numbers for a given generator.
"""

import math
import numbers

import torch

from fastvae import _numerics, _validate
from fastvae.functional import kl_divergence, reparameterize, sample_and_kl

_LOG_2PI = math.log(2.0 * math.pi)
SEMANTICS = ("fastvae", "diffusers")
# the dims diffusers' DiagonalGaussianDistribution sums kl and (by default) nll over
_DIFFUSERS_DIMS = (1, 2, 3)
# Device types whose autocast runs exp (and pow, sum) in float32 (PyTorch's CUDA op
# lists; the CPU's keep them in bfloat16): built under autocast there, diffusers' std and
# var (exp, at construction) are float32, and with them its sample, kl and nll
_AUTOCAST_WIDENS_EXP = ("cuda",)


class GaussianPosterior:
    """N(mean, exp(logvar)) with ``mean`` and ``logvar`` the two halves of
    ``parameters`` along ``dim``; logvar is clamped to ``logvar_clamp``.

    With ``deterministic=True`` the distribution collapses to its mean:
    ``std`` and ``var`` are zero, ``sample()`` returns the mean, and ``kl`` /
    ``nll`` are zeros. ``semantics`` picks how results are shaped and typed
    (see the module docstring): ``"fastvae"`` (per-sample float32-or-better
    sums over every non-batch dim) or ``"diffusers"`` (diffusers'
    ``DiagonalGaussianDistribution``'s conventions).

    ``sample()`` draws z and the KL against N(0, I) in one fused pass; a later
    ``kl()`` returns (a copy of) that KL instead of computing it again. Assigning
    ``mean``, ``logvar``, ``std`` or ``var`` (plain attributes in diffusers: ``post.std *= t``
    samples at temperature t), or writing one in place, switches ``sample``, ``kl`` and
    ``nll`` to diffusers' formulas on the attributes as they are (std and var stay those
    built from the original logvar when logvar is assigned or written, as in diffusers).
    """

    def __init__(self, parameters: torch.Tensor, dim: int = 1,
                 logvar_clamp: tuple[float, float] | None = (-30.0, 20.0),
                 deterministic: bool = False, *, semantics: str = "fastvae") -> None:
        _validate.check_tensor("parameters", parameters)
        _validate.check_choice("semantics", semantics, SEMANTICS)
        if parameters.dim() < 2:
            raise ValueError(
                f"parameters must have a batch dim and a dim to split, got shape {tuple(parameters.shape)}")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be an int, got {type(dim).__name__} {dim!r:.40}")
        if not -parameters.dim() <= dim < parameters.dim():
            raise ValueError(f"dim={dim} is out of range for parameters of shape {tuple(parameters.shape)}")
        if parameters.shape[dim] % 2:
            raise ValueError(
                f"parameters must have an even size along dim={dim} (mean and logvar), "
                f"got shape {tuple(parameters.shape)}")
        lo, hi = _validate.check_logvar_clamp(logvar_clamp)
        self._clamp = None if lo is None else (lo, hi)  # as the ops take it
        self.parameters = parameters
        self.deterministic = deterministic
        self.semantics = semantics
        self._mean, self._raw_logvar = torch.chunk(parameters, 2, dim=dim)
        self._logvar = self._raw_logvar if lo is None else self._raw_logvar.clamp(lo, hi)
        # mean, logvar, std or var assigned by the user (diffusers' attributes are plain, so
        # `posterior.std = posterior.std * t` samples at temperature t there): from then
        # on each result reads the attributes as diffusers' formulas do, not the fused ops
        self._assigned = False
        # std and var are computed when first read (a training step reads neither), in the
        # grad mode of construction, as if computed here
        self._grad_at_init = torch.is_grad_enabled()
        self._std = self._var = None
        self._std_version = self._var_version = None
        if deterministic:
            self._std = self._var = torch.zeros_like(self.mean)
            self._std_version = self._var_version = _version_of(self._std)
        # diffusers fixes std and var (zeros if deterministic) when built: a posterior built
        # deterministic and switched off later samples its mean, and its kl and nll read var = 0
        self._deterministic_at_init = deterministic
        # the moments' version counters now: a moment written in place later (mean.mul_(0),
        # std.mul_(t)) is read as diffusers reads its attributes, not through the fused ops
        self._versions = (_version_of(self._mean), _version_of(self._logvar))
        self._kl_of_sample = None  # (per-sample KL, grad mode) from the last fused sample()
        # diffusers' results are float32 (not the half-precision parameters' dtype) when it
        # is built under an autocast that widens exp: so are these, in its conventions
        device_type = parameters.device.type
        self._autocast_float32 = (semantics == "diffusers" and device_type in _AUTOCAST_WIDENS_EXP
                                  and parameters.dtype in (torch.float16, torch.bfloat16)
                                  and torch.is_autocast_enabled(device_type))

    @property
    def mean(self) -> torch.Tensor:
        return self._mean

    @mean.setter
    def mean(self, value):
        self._mean, self._assigned = value, True

    @property
    def logvar(self) -> torch.Tensor:
        return self._logvar

    @logvar.setter
    def logvar(self, value):
        # diffusers computed std and var from the logvar it was built with: so do they here
        self._std, self._var = self.std, self.var  # (computed now if not yet, from the old one)
        self._logvar, self._assigned = value, True

    @property
    def std(self) -> torch.Tensor:
        if self._std is None:
            with torch.set_grad_enabled(self._grad_at_init):
                half_lv = 0.5 * self._logvar_at_init()
                self._std = torch.exp(half_lv.float() if self._autocast_float32 else half_lv)
                self._std_version = _version_of(self._std)
        return self._std

    @std.setter
    def std(self, value):
        self._std, self._assigned = value, True

    @property
    def var(self) -> torch.Tensor:
        if self._var is None:
            with torch.set_grad_enabled(self._grad_at_init):
                lv = self._logvar_at_init()
                self._var = torch.exp(lv.float() if self._autocast_float32 else lv)
                self._var_version = _version_of(self._var)
        return self._var

    @var.setter
    def var(self, value):
        self._var, self._assigned = value, True

    def _logvar_at_init(self):
        """The logvar this posterior was built with (diffusers makes std and var from it
        then): the clamped one again if it was written in place since (the clamp's output
        is its own tensor; the parameters' half it was made from is intact)."""
        lv = self._logvar
        if self._clamp is not None and self._versions[1] is not None \
                and not torch.compiler.is_compiling() and lv._version != self._versions[1]:
            lv = self._raw_logvar.clamp(*self._clamp)
        return lv

    @property
    def _moments_assigned(self) -> bool:
        """Whether the results read the attributes by diffusers' formulas: a moment was
        assigned or written in place, or a posterior built deterministic was switched off."""
        if self._assigned or (self._deterministic_at_init and not self.deterministic):
            return True
        if torch.compiler.is_compiling():  # (version counters are not traced)
            return False
        for t, version in ((self._mean, self._versions[0]), (self._logvar, self._versions[1]),
                           (self._std, self._std_version), (self._var, self._var_version)):
            if version is not None and t._version != version:
                return True
        return False

    # ---- sampling ---------------------------------------------------------

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from ``generator`` (one
        generator, one per sample in a list, or None for PyTorch's default)."""
        if self._deterministic_at_init and not self._moments_assigned:
            return self.mean.clone()  # a new tensor, as diffusers' mean + 0 * eps (z may be written)
        generator, generators = _split_generators(generator, self.mean.shape[0],
                                                  extra_ok=self.semantics == "diffusers")
        if self._moments_assigned:  # diffusers' formula on the attributes as they are now
            self._kl_of_sample = None
            zeros = torch.zeros_like(self.mean)  # fastvae's noise: 0 + exp(0) eps = eps
            if generators is None:
                eps = reparameterize(zeros, zeros, generator=generator)
            else:
                eps = torch.cat([reparameterize(zeros[i:i + 1], zeros[i:i + 1], generator=g)
                                 for i, g in enumerate(generators)])
            return self.mean + self.std * eps
        mean, raw_logvar = self.mean, self._raw_logvar
        if self._autocast_float32:  # a float32 z and KL, as diffusers' float32 std makes them
            mean, raw_logvar = mean.float(), raw_logvar.float()
        if generators is None:
            z, kl = sample_and_kl(mean, raw_logvar, generator=generator, logvar_clamp=self._clamp)
        else:  # sample i from generators[i] alone, as diffusers' randn_tensor draws it
            rows = [sample_and_kl(mean[i:i + 1], raw_logvar[i:i + 1], generator=g,
                                  logvar_clamp=self._clamp)
                    for i, g in enumerate(generators)]
            z = torch.cat([r[0] for r in rows])
            kl = torch.cat([r[1] for r in rows])
        self._kl_of_sample = (kl, torch.is_grad_enabled())
        return self._in_layout_of_mean(z)

    def _in_layout_of_mean(self, z):
        """``z`` in the memory layout of ``mean``: channels_last (3d) parameters sample
        channels_last (the op's output is contiguous)."""
        m = self.mean
        if m.dim() in (4, 5) and m.shape[1] > 1 and m.stride(1) == 1 < m.stride(-1):
            fmt = torch.channels_last if m.dim() == 4 else torch.channels_last_3d
            return z.contiguous(memory_format=fmt)
        return z

    def mode(self) -> torch.Tensor:
        return self.mean

    # ---- divergences --------------------------------------------------------

    def _zeros(self):
        if self.semantics == "diffusers":
            return torch.zeros(1, device=self.parameters.device)
        return torch.zeros(self.mean.shape[0], device=self.mean.device,
                           dtype=torch.promote_types(self.mean.dtype, torch.float32))

    def _sum_dims(self, t, dims=None):
        """Sum of per-element terms ``t`` over ``dims``, or the mode's default dims."""
        if dims is None:
            if self.semantics == "fastvae":
                return t.flatten(1).sum(1)
            dims = [d for d in _DIFFUSERS_DIMS if d < t.dim()]
        return t.sum(dim=dims)

    def kl(self, other: object | None = None) -> torch.Tensor:
        """KL(self || other) per sample; ``other`` defaults to N(0, I)."""
        if self.deterministic:
            return self._zeros()
        if other is None:
            if self._moments_assigned:
                return self._kl_of_attributes(None, None)
            return self._kl_standard_normal()
        om, olv = _moments_of("other", other)
        shape = _broadcast_shape("self.mean", self.mean, "other.mean", om)
        dtype = _compute_dtype(self.mean, om)
        if getattr(other, "deterministic", False):
            if self.semantics == "fastvae":
                raise ValueError("KL against a deterministic GaussianPosterior (zero variance) is infinite")
            inf = torch.full(shape, math.inf, dtype=dtype, device=self.mean.device)
            return self._sum_dims(inf).to(self._diffusers_dtype(self.mean.dtype, om.dtype))
        other_var = getattr(other, "var", None)
        other_var = other_var if isinstance(other_var, torch.Tensor) else None
        # diffusers' kl(other) divides by other.var as it stands: read it where it may not
        # be e^logvar (assigned to a posterior, or another object's own attribute)
        if self._moments_assigned or getattr(other, "_moments_assigned", False) or (
                other_var is not None and not isinstance(other, GaussianPosterior)):
            return self._kl_of_attributes(om, olv, other_var)
        result_dtype = self._diffusers_dtype(self.mean.dtype, om.dtype)
        sums_every_dim = self.semantics == "fastvae" or self.mean.dim() <= len(_DIFFUSERS_DIMS) + 1
        if sums_every_dim and dtype == _compute_dtype(self.mean) and olv.shape == om.shape:
            # the fused KL against a diagonal Gaussian prior (same formula, TwoSum
            # included); self broadcast to the common shape first when other is larger
            mean, raw_logvar = self.mean, self._raw_logvar
            if tuple(mean.shape) != tuple(shape):
                mean, raw_logvar = mean.expand(shape), raw_logvar.expand(shape)
            per_sample = kl_divergence(mean, raw_logvar, reduction="none",
                                       logvar_clamp=self._clamp, prior_mu=om, prior_logvar=olv)
            return per_sample if self.semantics == "fastvae" else per_sample.to(result_dtype)
        m, lv, om, olv = (t.to(dtype) for t in (self.mean, self.logvar, om, olv))
        # 2 KL = (m - om)^2 / ov + v / ov - 1 - log(v / ov), v / ov - 1 = expm1(lv - olv)
        # with the difference's rounding error carried (exp(lv - olv) of the rounded
        # difference is off by ~2e-6 relative in float32 when the logvars are 50 apart, and
        # so is the gradient with respect to either logvar)
        em1, lv_minus_olv = _numerics.expm1_of_difference(lv, olv)
        terms = (m - om).square() * torch.exp(-olv) + em1 - lv_minus_olv
        per_sample = 0.5 * self._sum_dims(terms)
        return per_sample if self.semantics == "fastvae" else per_sample.to(result_dtype)

    def _kl_of_attributes(self, om, olv, other_var=None):
        """KL(self || N(om, ovar)) (None: N(0, I)) by diffusers' formula on the
        attributes as assigned (var and logvar may disagree: each term reads its own),
        0.5 sum[(mean - om)^2 / ovar + var / ovar - 1 - logvar + ologvar], ovar =
        ``other_var`` (other's var attribute) or e^olv."""
        tensors = [self.mean, self.var, self.logvar] + ([] if om is None else [om, olv])
        _broadcast_shape("self.var", self.var, "self.mean", self.mean)
        _broadcast_shape("self.logvar", self.logvar, "self.mean", self.mean)
        dtype = _compute_dtype(*tensors)
        m, var, lv = (t.to(dtype) for t in tensors[:3])
        if om is None:
            terms = m.square() + var - 1.0 - lv
        else:
            om, olv = om.to(dtype), olv.to(dtype)
            ovar = torch.exp(olv) if other_var is None else other_var.to(dtype)
            terms = ((m - om).square() + var) / ovar - 1.0 - lv + olv
        per_sample = 0.5 * self._sum_dims(terms)
        if self.semantics == "fastvae":
            return per_sample
        return per_sample.to(self._diffusers_dtype(*(t.dtype for t in tensors)))

    def _kl_standard_normal(self):
        diffusers_video = self.semantics == "diffusers" and self.mean.dim() > len(_DIFFUSERS_DIMS) + 1
        if diffusers_video:  # sums dims 1-3 only: the trailing dims become batch rows of the fused op
            n = self.mean.shape[0]
            rows = [t.flatten(4).movedim(-1, 1).flatten(0, 1) for t in (self.mean, self._raw_logvar)]
            kl = kl_divergence(*rows, reduction="none", logvar_clamp=self._clamp)
            return kl.reshape((n,) + tuple(self.mean.shape[4:])).to(
                self._diffusers_dtype(self.parameters.dtype))
        cached = self._kl_of_sample
        if cached is not None and (cached[1] or not torch.is_grad_enabled()):
            # a new tensor per call (as computing it again would give): writing one in place
            # must not change the next
            kl = cached[0].clone() if torch.is_grad_enabled() else cached[0].detach().clone()
        else:
            kl = kl_divergence(self.mean, self._raw_logvar, reduction="none", logvar_clamp=self._clamp)
        return kl if self.semantics == "fastvae" else kl.to(self._diffusers_dtype(self.parameters.dtype))

    def nll(self, sample: torch.Tensor,
            dims: int | list[int] | tuple[int, ...] | None = None) -> torch.Tensor:
        """-log N(sample; mean, var), summed over ``dims`` (default: the mode's
        default dims, see the module docstring)."""
        if self.deterministic:
            return self._zeros()
        _validate.check_tensor("sample", sample)
        shape = _broadcast_shape("sample", sample, "mean", self.mean)
        dims = _check_dims(dims, len(shape))
        x, m, lv = (t.to(_compute_dtype(self.mean, sample)) for t in (sample, self.mean, self.logvar))
        if self._moments_assigned:  # diffusers' formula: each term reads its own attribute
            terms = _LOG_2PI + lv + (x - m).square() / self.var.to(lv.dtype)
        else:
            terms = _LOG_2PI + lv + (x - m).square() * torch.exp(-lv)
        per_sample = 0.5 * self._sum_dims(terms, dims)
        if self.semantics == "fastvae":
            return per_sample
        return per_sample.to(self._diffusers_dtype(self.mean.dtype, sample.dtype))

    def _diffusers_dtype(self, *dtypes):
        """The dtype of a result in diffusers' conventions: the operands' promoted dtype,
        at least float32 where diffusers, built under an autocast that widens exp,
        computes in float32."""
        out = torch.float32 if self._autocast_float32 else dtypes[0]
        for dtype in dtypes:
            out = torch.promote_types(out, dtype)
        return out


def _version_of(t):
    """``t``'s version counter; None for an inference tensor (which has none) and while
    torch.compile traces (which reads neither)."""
    if torch.compiler.is_compiling() or t.is_inference():
        return None
    return t._version


def _split_generators(generator, batch, extra_ok=False):
    """``(generator, None)`` for one generator (or None, or a list of one);
    ``(None, generators)`` for a list of one generator per sample. ``extra_ok``: a
    longer list gives its first ``batch`` (diffusers' randn_tensor reads those)."""
    if not isinstance(generator, (list, tuple)):
        _validate.check_generator(generator)
        return generator, None
    for g in generator:
        _validate.check_generator(g)
    if len(generator) == 1:
        return generator[0], None
    if extra_ok and len(generator) > batch:
        generator = generator[:batch]
    if len(generator) != batch:
        raise ValueError(f"generator: a list needs one generator per sample ({batch}) or exactly one, "
                         f"got {len(generator)}")
    return None, list(generator)


def _compute_dtype(*tensors):
    """float32, or float64 where any input is."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _moments_of(name, other):
    mean, logvar = getattr(other, "mean", None), getattr(other, "logvar", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(logvar, torch.Tensor)):
        raise TypeError(
            f"{name} must be a GaussianPosterior, a diffusers DiagonalGaussianDistribution (anything with "
            f"mean and logvar tensors) or None, got {type(other).__name__}")
    _validate.check_tensor(f"{name}.mean", mean)
    _validate.check_tensor(f"{name}.logvar", logvar)
    return mean, logvar


def _broadcast_shape(name_a, a, name_b, b):
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape or broadcast, got "
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)}") from None
    _validate.check_same_device(**{name_a: a, name_b: b})
    return shape


def _check_dims(dims, ndim):
    if dims is None:
        return None
    as_list = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
    if as_list is None or not all(isinstance(d, int) and not isinstance(d, bool) for d in as_list):
        raise TypeError(f"dims must be an int or a list/tuple of ints, got {dims!r}")
    for d in as_list:
        if not -ndim <= d < ndim:
            raise ValueError(f"dims={dims!r} is out of range for a {ndim}-dim sample")
    return as_list
