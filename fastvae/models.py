"""Autoencoders and VAEs built on fastvae's loss and sampling.

Four models with one interface, so that training, the demo and the ONNX
export treat them alike:

- ``MLPVAE`` / ``ConvVAE``: ``forward(x, generator=None) -> (out, mu, logvar)``
  where ``out`` is what ``fastvae.vae_loss`` takes (logits for
  ``recon="bce_logits"`` and ``"continuous_bernoulli"``, probabilities for
  ``"bce"``, values for mse/l1/gaussian/laplace);
  ``encode(x) -> (mu, logvar)``; ``decode(z)`` in data space (the mean of the
  likelihood: sigmoid of the logits for bce_logits, the continuous Bernoulli's
  mean sigmoid(l) - (1/l - 1/sinh l) for continuous_bernoulli);
  ``sample(n, generator=None)``; ``reconstruct(x)`` (decodes z = mu);
  ``score(x)``: per-sample loss at z = mu (an anomaly score);
  ``loss(x) -> LossParts`` (the batch-mean ELBO with a reparameterized sample).
- ``MLPAutoencoder`` / ``ConvAutoencoder``: the same without the KL:
  ``forward(x) -> out``, ``encode(x) -> code``, ``loss`` = reconstruction only.
  ``sample`` decodes z ~ N(0, I) too: an autoencoder has no prior, which is
  exactly what the demo measures.

Attributes used by the ONNX export: ``recon``, ``beta``, ``input_shape``,
``latent_shape``. ``config()`` / ``model_from_config`` rebuild a model for
checkpoints.

``obs_logvar`` (gaussian and laplace models only): None (0.0: unit variance /
scale), a float, ``"learned"`` (a scalar ``nn.Parameter``, initialised to 0 and
trained with the model: in its ``state_dict``, so in checkpoints and in the
exported scorer) or ``"optimal"`` (fitted to each batch, sigma-VAE style; a
score is then relative to the batch it is computed in).

``prior`` (VAEs only): ``"standard"`` (default, N(0, I)) or ``"learned"``: a
diagonal Gaussian N(prior_mu, exp(prior_logvar)) with (latent_dim,) parameters,
initialised to N(0, I) and trained with the model (the KL of the loss is taken
against it, by the fused op); ``sample`` draws from it, and the ONNX export
writes it into ``metadata.json`` so that the runtime samples from it too.
"""

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastvae import _numerics, _validate
from fastvae.functional import LossParts, kl_divergence, reparameterize, vae_loss


def _check_model_obs_logvar(obs_logvar, recon):
    """A model's obs_logvar: None, a finite float, "learned" or "optimal"."""
    if obs_logvar is None:
        return None
    if isinstance(obs_logvar, torch.Tensor):
        raise TypeError("obs_logvar of a model must be a float, 'learned' or 'optimal', got a tensor "
                        "(a model makes its own learned scalar: obs_logvar='learned')")
    if obs_logvar == "learned" or obs_logvar == "optimal":
        if recon not in _validate.OBS_SCALE_RECONS:
            _validate.check_obs_logvar(obs_logvar, recon, None)  # names the recon that takes none
        return obs_logvar
    if isinstance(obs_logvar, str):
        raise ValueError(f"obs_logvar of a model must be a float, 'learned' or 'optimal', got "
                         f"{obs_logvar!r:.60}")
    _, value, _ = _validate.check_obs_logvar(obs_logvar, recon, None)
    return value


PRIORS = ("standard", "learned")


def _as_int(name, value, what):
    """``value`` as a plain int if it is an integer (a numpy integer or an integer 0-d
    tensor too: anything with __index__); not a bool, a float or a string, which int()
    would truncate or parse. TypeError naming ``name`` otherwise."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r:.40}")


def _check_size(name, value):
    """A positive int, as a plain int: it goes into the JSON config."""
    value = _as_int(name, value, "a positive int")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _check_sizes(name, values, allow_empty=False):
    """A sequence of positive ints (a list, tuple, 1-d array), as a list of plain ints:
    what the model is built with and what its config records. Not a string, nor an
    iterator, which the first reader would use up (the config recorded [] for a model
    built from map(...))."""
    try:
        reusable = not isinstance(values, (str, bytes)) and iter(values) is not values
    except TypeError:  # not iterable (an int, a 0-d array)
        reusable = False
    if not reusable:
        raise TypeError(f"{name} must be a list or tuple of positive ints, got "
                        f"{type(values).__name__} {values!r:.40}")
    sizes = [_check_size(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if not sizes and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return sizes


def _check_shape(name, shape):
    return tuple(_check_sizes(name, shape))


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _mlp_nets(input_shape, encoder_out, latent_dim, hidden):
    """Encoder: flatten -> hidden layers -> encoder_out; decoder mirrors it."""
    sizes = [_numel(input_shape)] + hidden
    enc = [nn.Flatten()]
    for a, b in zip(sizes, sizes[1:]):
        enc += [nn.Linear(a, b), nn.SiLU()]
    enc.append(nn.Linear(sizes[-1], encoder_out))
    dec_sizes = [latent_dim] + hidden[::-1]
    dec = []
    for a, b in zip(dec_sizes, dec_sizes[1:]):
        dec += [nn.Linear(a, b), nn.SiLU()]
    dec += [nn.Linear(dec_sizes[-1], sizes[0]), nn.Unflatten(1, input_shape)]
    return nn.Sequential(*enc), nn.Sequential(*dec)


def _conv_nets(input_shape, encoder_out, latent_dim, channels):
    """Stride-2 4x4 convolutions halve H and W per level (transposed ones double
    them back), then one linear layer to and from the latent vector."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) for a conv model, got {input_shape}")
    c_in, h, w = input_shape
    factor = 2 ** len(channels)
    if h % factor or w % factor:
        raise ValueError(
            f"input_shape {input_shape}: H and W must be divisible by 2**len(channels) = {factor} "
            f"(channels={channels}); use fewer channel levels or pad the images")
    inner = (channels[-1], h // factor, w // factor)
    enc, prev = [], c_in
    for c in channels:
        enc += [nn.Conv2d(prev, c, 4, stride=2, padding=1), nn.SiLU()]
        prev = c
    enc += [nn.Flatten(), nn.Linear(_numel(inner), encoder_out)]
    dec = [nn.Linear(latent_dim, _numel(inner)), nn.Unflatten(1, inner)]
    outs = channels[-2::-1] + [c_in]
    for i, c in enumerate(outs):
        dec.append(nn.ConvTranspose2d(prev, c, 4, stride=2, padding=1))
        if i < len(outs) - 1:
            dec.append(nn.SiLU())
        prev = c
    return nn.Sequential(*enc), nn.Sequential(*dec)


class _Autoencoding(nn.Module):
    """What AEs and VAEs share: shapes, recon type, config, data-space decoding."""

    is_vae = False

    def __init__(self, input_shape, latent_dim, recon, beta, nets, obs_logvar=None,
                 prior="standard", **arch):
        super().__init__()
        _validate.check_choice("recon", recon, _validate.RECONS)
        _validate.check_choice("prior", prior, PRIORS)  # (autoencoders take none)
        self.prior = prior
        self.obs_logvar_mode = _check_model_obs_logvar(obs_logvar, recon)
        if self.obs_logvar_mode == "learned":
            # log sigma^2 (gaussian) or log b (laplace), one for all elements
            self.obs_logvar = nn.Parameter(torch.zeros(()))
        _validate.check_beta(beta)
        if isinstance(beta, torch.Tensor):
            raise TypeError("beta of a model must be a float (it is saved in the JSON config)")
        if beta < 0:  # (a negative KL weight rewards a KL without bound: the loss has no minimum)
            raise ValueError(f"beta of a model must be >= 0, got {beta}")
        latent_dim = _check_size("latent_dim", latent_dim)
        # (hidden sizes, channels): checked once, built with and recorded as the same lists
        arch = {k: _check_sizes(k, v, allow_empty=k == "hidden") for k, v in arch.items()}
        self.input_shape = _check_shape("input_shape", input_shape)
        self.latent_shape = (latent_dim,)
        self.recon, self.beta = recon, float(beta)
        encoder_out = 2 * latent_dim if self.is_vae else latent_dim
        self.encoder, self.decoder = nets(self.input_shape, encoder_out, latent_dim, **arch)
        if prior == "learned":  # N(prior_mu, exp(prior_logvar)), starting as N(0, I)
            self.prior_mu = nn.Parameter(torch.zeros(latent_dim))
            self.prior_logvar = nn.Parameter(torch.zeros(latent_dim))
        self._arch = {k: list(v) for k, v in arch.items()}

    def config(self) -> dict[str, Any]:
        """A JSON-able dict from which ``model_from_config`` rebuilds this model."""
        obs = {} if self.obs_logvar_mode is None else {"obs_logvar": self.obs_logvar_mode}
        if self.prior != "standard":
            obs["prior"] = self.prior
        return {"class": type(self).__name__, "input_shape": list(self.input_shape),
                "latent_dim": self.latent_shape[0], "recon": self.recon, "beta": self.beta,
                **obs, **self._arch}

    def _prior_args(self):
        """``prior_mu`` / ``prior_logvar`` keywords of the KL functions for this model."""
        if self.prior == "learned":
            return {"prior_mu": self.prior_mu, "prior_logvar": self.prior_logvar}
        return {}

    def _obs_logvar_arg(self):
        """``vae_loss``'s obs_logvar for this model (the parameter when learned)."""
        return self.obs_logvar if self.obs_logvar_mode == "learned" else self.obs_logvar_mode

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.input_shape))}) "
                             f"for this model, got {tuple(x.shape)}")

    def _to_data(self, out):
        """Decoder output -> data space (the mean of the likelihood)."""
        if self.recon == "continuous_bernoulli":
            # E[x] under CB(l) = d/dl of its log-partition softplus(l) - log C(l)
            return torch.sigmoid(out) - _numerics.cb_log_normalizer_grad(out)
        return torch.sigmoid(out) if self.recon == "bce_logits" else out

    def _decoder_out(self, z):
        out = self.decoder(z)
        # A "bce" model's decoder emits probabilities, which is what vae_loss takes.
        return torch.sigmoid(out) if self.recon == "bce" else out

    def decode(self, z: Tensor) -> Tensor:
        """Latent codes (N, latent_dim) -> data space (probabilities for BCE models)."""
        return self._to_data(self._decoder_out(z))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decode ``n`` codes drawn from the prior (N(0, I), or the learned one)."""
        n = _as_int("n", n, "an int >= 0")
        if n < 0:
            raise ValueError(f"n must be an int >= 0, got {n}")
        p = next(self.parameters())
        _validate.check_generator(generator, p.device)
        # drawn where the generator is (a CPU generator for a model on a GPU, as
        # forward() accepts), then moved
        z = torch.randn(int(n), *self.latent_shape, generator=generator,
                        device=p.device if generator is None else generator.device,
                        dtype=p.dtype).to(p.device)
        if self.prior == "learned":
            z = self.prior_mu + torch.exp(0.5 * self.prior_logvar) * z
        return self.decode(z)

    def loss(self, x: Tensor, *, beta: float | Tensor | None = None, free_bits: float = 0.0,
             generator: torch.Generator | None = None) -> LossParts:
        """``LossParts(loss, recon, kl)`` for a batch, averaged over the batch."""
        return self.criterion(x, self(x, generator=generator), beta=beta, free_bits=free_bits)

    def extra_repr(self):
        obs = "" if self.obs_logvar_mode is None else f", obs_logvar={self.obs_logvar_mode!r}"
        if self.prior != "standard":
            obs += f", prior={self.prior!r}"
        return (f"input_shape={self.input_shape}, latent_shape={self.latent_shape}, "
                f"recon={self.recon!r}{obs}")


class _VAE(_Autoencoding):
    is_vae = True

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (mu, logvar) of the Gaussian posterior q(z | x)."""
        self._check_input(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def forward(self, x: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, generator=generator)
        return self._decoder_out(z), mu, logvar

    def criterion(self, x: Tensor, outputs: tuple[Tensor, Tensor, Tensor], *,
                  beta: float | Tensor | None = None, free_bits: float = 0.0) -> LossParts:
        """The batch-mean ELBO of ``outputs = self(x)``.

        With ``free_bits`` > 0, each latent dimension's batch-mean KL counts as at
        least ``free_bits`` nats in the loss (Kingma et al. 2016), so the encoder
        is not pushed to collapse dimensions early (the fused op's ``free_bits``); the
        reported ``kl`` is the true KL (without gradient when free bits apply).
        """
        out, mu, logvar = outputs
        beta = self.beta if beta is None else beta
        parts = vae_loss(out, x, mu, logvar, recon=self.recon, beta=beta, reduction="batchmean",
                         return_parts=True, obs_logvar=self._obs_logvar_arg(),
                         free_bits=free_bits, **self._prior_args())
        if not free_bits:
            return parts
        with torch.no_grad():
            kl = kl_divergence(mu, logvar, reduction="batchmean", **self._prior_args())
        return LossParts(parts.loss, parts.recon, kl)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean: deterministic reconstructions in data space."""
        return self.decode(self.encode(x)[0])

    def score(self, x: Tensor) -> Tensor:
        """Per-sample loss (recon + beta * KL) at z = mu, shape (N,): higher = more anomalous."""
        mu, logvar = self.encode(x)
        return vae_loss(self._decoder_out(mu), x, mu, logvar, recon=self.recon, beta=self.beta,
                        reduction="none", obs_logvar=self._obs_logvar_arg(),
                        **self._prior_args())


class _AE(_Autoencoding):
    def encode(self, x: Tensor) -> Tensor:
        """x -> its code (N, latent_dim)."""
        self._check_input(x)
        return self.encoder(x)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # generator: the same call as a VAE's; unused
        return self._decoder_out(self.encode(x))

    def _recon_parts(self, x, out, reduction):
        # A dummy posterior equal to the prior, N(0, I), has KL exactly 0, so this is
        # the reconstruction term alone, through vae_loss's fused path.
        zeros = out.new_zeros(out.shape[0], 1, dtype=torch.float32)
        return vae_loss(out, x, zeros, zeros, recon=self.recon, beta=0.0,
                        reduction=reduction, return_parts=True, obs_logvar=self._obs_logvar_arg())

    def criterion(self, x: Tensor, outputs: Tensor, *, beta: float | Tensor | None = None,
                  free_bits: float = 0.0) -> LossParts:
        """The batch-mean reconstruction loss (``kl`` is 0: there is no posterior).
        ``beta`` and ``free_bits`` (a VAE's call) weigh nothing here, but are checked
        as a VAE checks them."""
        if beta is not None:
            _validate.check_beta(beta)
        _validate.check_free_bits(free_bits, "batchmean")
        return self._recon_parts(x, outputs, "batchmean")

    def reconstruct(self, x: Tensor) -> Tensor:
        return self._to_data(self(x))

    def score(self, x: Tensor) -> Tensor:
        """Per-sample reconstruction loss, shape (N,): higher = more anomalous."""
        return self._recon_parts(x, self(x), "none").recon


class MLPVAE(_VAE):
    """VAE with fully connected encoder and decoder."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 8,
                 hidden: Sequence[int] = (256, 128), recon: str = "bce_logits",
                 beta: float = 1.0, obs_logvar: float | str | None = None,
                 prior: str = "standard") -> None:
        super().__init__(input_shape, latent_dim, recon, beta, _mlp_nets, obs_logvar, prior,
                         hidden=hidden)


class ConvVAE(_VAE):
    """VAE with stride-2 convolutions; ``input_shape=(C, H, W)`` with H, W divisible
    by ``2**len(channels)`` (8x8 digits, 28x28 MNIST, 64x64 images...)."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 8,
                 channels: Sequence[int] = (32, 64), recon: str = "bce_logits",
                 beta: float = 1.0, obs_logvar: float | str | None = None,
                 prior: str = "standard") -> None:
        super().__init__(input_shape, latent_dim, recon, beta, _conv_nets, obs_logvar, prior,
                         channels=channels)


class MLPAutoencoder(_AE):
    """Plain autoencoder with the MLPVAE architecture."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 8,
                 hidden: Sequence[int] = (256, 128), recon: str = "bce_logits",
                 beta: float = 0.0, obs_logvar: float | str | None = None) -> None:
        super().__init__(input_shape, latent_dim, recon, beta, _mlp_nets, obs_logvar,
                         hidden=hidden)


class ConvAutoencoder(_AE):
    """Plain autoencoder with the ConvVAE architecture."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 8,
                 channels: Sequence[int] = (32, 64), recon: str = "bce_logits",
                 beta: float = 0.0, obs_logvar: float | str | None = None) -> None:
        super().__init__(input_shape, latent_dim, recon, beta, _conv_nets, obs_logvar,
                         channels=channels)


MODELS = {cls.__name__: cls for cls in (MLPVAE, ConvVAE, MLPAutoencoder, ConvAutoencoder)}

# (--model, --arch) on the command line -> class
BY_KIND = {("vae", "mlp"): MLPVAE, ("vae", "conv"): ConvVAE,
           ("ae", "mlp"): MLPAutoencoder, ("ae", "conv"): ConvAutoencoder}


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model (fresh weights) from ``model.config()``."""
    if not isinstance(config, dict) or config.get("class") not in MODELS:
        known = ", ".join(MODELS)
        raise ValueError(f"not a fastvae model config (class must be one of {known}): {config!r}")
    kwargs = {k: v for k, v in config.items() if k != "class"}
    for key in ("input_shape", "hidden", "channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return MODELS[config["class"]](**kwargs)
